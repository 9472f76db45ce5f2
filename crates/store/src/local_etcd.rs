//! An etcd on loopback, one member or a small cluster of them, started as child processes: the
//! store of a cluster laid out on one machine (`telvirt cluster up`, `make demo`) and of the
//! tests and benchmarks that need a real etcd (a three-member one for the chaos tests).
//!
//! Owns choosing free ports, the etcd command line (a short heartbeat and election timeout, so
//! it elects itself at once and its minimum lease TTL is 1 s), waiting until it answers, and
//! stopping it. It must not be used for a production cluster: a real deployment runs its own
//! etcd members and gives their endpoints to `--store`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdStore, Store, StoreError};

/// Where Debian's etcd-server package installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";
/// How long etcd may take to answer after it was started.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// One etcd member: its process (while it runs), ports and files.
struct Member {
    name: String,
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
}

impl Member {
    fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    fn log(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }
}

/// A running etcd of one or more members on loopback (stopped on drop unless
/// [`LocalEtcd::detach`]ed).
pub struct LocalEtcd {
    members: Vec<Member>,
    /// Whether etcd dies with the process that started it.
    tied: bool,
}

/// Two loopback ports per member that nothing listens on now.
fn free_ports(members: usize) -> Result<Vec<(u16, u16)>, StoreError> {
    let io = |e: std::io::Error| StoreError::Backend(format!("finding free ports for etcd: {e}"));
    let mut held = Vec::new();
    for _ in 0..members * 2 {
        held.push(TcpListener::bind("127.0.0.1:0").map_err(io)?);
    }
    let mut ports = Vec::new();
    for pair in held.chunks(2) {
        ports.push((
            pair[0].local_addr().map_err(io)?.port(),
            pair[1].local_addr().map_err(io)?.port(),
        ));
    }
    Ok(ports)
}

impl LocalEtcd {
    /// Starts a single-member etcd with its data and log in `dir` on free ports and waits until
    /// it answers. A port found free may be taken before etcd binds it: then etcd exits and
    /// other ports are tried. `tied`: etcd is killed when this process dies (tests); otherwise
    /// it outlives it.
    pub async fn start(dir: &Path, tied: bool) -> Result<Self, StoreError> {
        Self::start_members(dir, 1, tied).await
    }

    /// Starts an etcd cluster of `members` members (`dir/m1`, `dir/m2`, ...; a single member
    /// keeps its files in `dir` itself) and waits until every member answers.
    pub async fn start_members(dir: &Path, members: usize, tied: bool) -> Result<Self, StoreError> {
        if !Path::new(ETCD).exists() {
            return Err(StoreError::Backend(format!(
                "{ETCD} is missing: install Debian's etcd-server package (scripts/deps.sh does)"
            )));
        }
        if members == 0 {
            return Err(StoreError::Backend(
                "an etcd cluster needs at least one member".into(),
            ));
        }
        let mut last = String::new();
        for _ in 0..4 {
            let ports = free_ports(members)?;
            let mut etcd = Self {
                members: ports
                    .into_iter()
                    .enumerate()
                    .map(|(i, (client_port, peer_port))| Member {
                        name: if members == 1 {
                            "telvirt".into()
                        } else {
                            format!("telvirt{}", i + 1)
                        },
                        child: None,
                        dir: if members == 1 {
                            dir.to_owned()
                        } else {
                            dir.join(format!("m{}", i + 1))
                        },
                        client_port,
                        peer_port,
                    })
                    .collect(),
                tied,
            };
            for i in 0..members {
                etcd.spawn_member(i)?;
            }
            match etcd.wait_until_answering().await {
                Ok(()) => return Ok(etcd),
                Err(e) => {
                    last = format!(
                        "{e}\nits log ({}):\n{}",
                        etcd.members[0].log().display(),
                        etcd.log_tail()
                    );
                    etcd.kill();
                }
            }
        }
        Err(StoreError::Backend(format!("etcd did not start: {last}")))
    }

    /// `127.0.0.1:PORT`, the first member's client endpoint.
    pub fn endpoint(&self) -> String {
        self.endpoints().swap_remove(0)
    }

    /// Every member's client endpoint, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// The `--store` URL of namespace `namespace` (`/name` or empty) on this etcd, naming every
    /// member.
    pub fn store_url(&self, namespace: &str) -> String {
        format!("etcd://{}{namespace}", self.endpoints().join(","))
    }

    /// The pid of the first member's process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.members[0].child.as_ref().map(Child::id)
    }

    /// Starts every member that is not running (again, after [`LocalEtcd::kill`]) on the same
    /// ports and data.
    pub fn spawn(&mut self) -> Result<(), StoreError> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn_member(i)?;
            }
        }
        Ok(())
    }

    /// Starts member `i` (0-based) on its ports and data.
    pub fn spawn_member(&mut self, i: usize) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Backend(format!("starting {ETCD}: {e}"));
        let initial_cluster = self
            .members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url()))
            .collect::<Vec<_>>()
            .join(",");
        let tied = self.tied;
        let Some(member) = self.members.get_mut(i) else {
            return Err(StoreError::Backend(format!("etcd has no member {i}")));
        };
        std::fs::create_dir_all(&member.dir).map_err(io)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(member.log())
            .map_err(io)?;
        let (client, peer) = (member.client_url(), member.peer_url());
        let mut command = Command::new(ETCD);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure runs in the child between fork and exec and calls only prctl
            // and setsid, which are async-signal-safe.
            unsafe {
                command.pre_exec(move || {
                    let ok = if tied {
                        // Dies with the process that started it.
                        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == 0
                    } else {
                        // Outlives it, and the terminal it ran in: a session of its own.
                        libc::setsid() != -1
                    };
                    if ok {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let child = command
            .arg(format!("--name={}", member.name))
            .arg(format!("--data-dir={}", member.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster={initial_cluster}"))
            .arg("--initial-cluster-state=new")
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=100")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log)
            .spawn()
            .map_err(io)?;
        member.child = Some(child);
        Ok(())
    }

    /// SIGKILL to every member, and waits for them.
    pub fn kill(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// SIGKILL to member `i` (0-based), and waits for it.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members.get_mut(i).and_then(|m| m.child.take()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Leaves etcd running after this value is dropped (`telvirt cluster up`); the first
    /// member's pid.
    pub fn detach(mut self) -> Option<u32> {
        let mut pids = self
            .members
            .iter_mut()
            .filter_map(|m| m.child.take().map(|c| c.id()));
        pids.next()
    }

    /// The last lines of the first member's log.
    pub fn log_tail(&self) -> String {
        telvirt_files::last_lines(&self.members[0].log(), 20)
    }

    /// Waits until every running member answers a read; `Err` when one exited or did not
    /// answer in time.
    pub async fn wait_until_answering(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_PATIENCE;
        for i in 0..self.members.len() {
            let endpoint = format!("127.0.0.1:{}", self.members[i].client_port);
            while let Some(child) = self.members[i].child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.members[i].child = None;
                    return Err(format!("etcd member {} exited at start ({status})", i + 1));
                }
                match EtcdStore::connect(std::slice::from_ref(&endpoint), "").await {
                    Ok(store) => {
                        // A member of a cluster answers reads only once the cluster has a
                        // leader: a linearizable read proves it.
                        if store.get("/").await.is_ok() {
                            break;
                        }
                    }
                    Err(e) if Instant::now() > deadline => {
                        self.kill_member(i);
                        return Err(format!(
                            "etcd member {} did not answer within {START_PATIENCE:?}: {e}",
                            i + 1
                        ));
                    }
                    Err(_) => {}
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "etcd member {} did not answer reads within {START_PATIENCE:?}",
                        i + 1
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
