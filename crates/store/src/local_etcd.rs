//! A single-member etcd on loopback, started as a child process: the store of a cluster laid out
//! on one machine (`telvirt cluster up`, `make demo`) and of the tests that need a real etcd.
//!
//! Owns choosing free ports, the etcd command line (a short heartbeat and election timeout, so
//! it elects itself at once and its minimum lease TTL is 1 s), waiting until it answers, and
//! stopping it. It must not be used for a production cluster: a real deployment runs its own
//! etcd members and gives their endpoints to `--store`.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{EtcdStore, StoreError};

/// Where Debian's etcd-server package installs etcd.
pub const ETCD: &str = "/usr/bin/etcd";
/// How long etcd may take to answer after it was started.
const START_PATIENCE: Duration = Duration::from_secs(20);

/// A running etcd (stopped on drop unless [`LocalEtcd::detach`]ed).
pub struct LocalEtcd {
    child: Option<Child>,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    /// Whether etcd dies with the process that started it.
    tied: bool,
}

/// Two loopback ports nothing listens on now.
fn free_ports() -> Result<(u16, u16), StoreError> {
    let io = |e: std::io::Error| StoreError::Backend(format!("finding free ports for etcd: {e}"));
    let a = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let b = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    Ok((
        a.local_addr().map_err(io)?.port(),
        b.local_addr().map_err(io)?.port(),
    ))
}

impl LocalEtcd {
    /// Starts etcd with its data and log in `dir` on free ports and waits until it answers. A
    /// port found free may be taken before etcd binds it: then etcd exits and other ports are
    /// tried. `tied`: etcd is killed when this process dies (tests); otherwise it outlives it.
    pub async fn start(dir: &Path, tied: bool) -> Result<Self, StoreError> {
        if !Path::new(ETCD).exists() {
            return Err(StoreError::Backend(format!(
                "{ETCD} is missing: install Debian's etcd-server package (scripts/deps.sh does)"
            )));
        }
        let mut last = String::new();
        for _ in 0..4 {
            let (client_port, peer_port) = free_ports()?;
            let mut etcd = Self {
                child: None,
                dir: dir.to_owned(),
                client_port,
                peer_port,
                tied,
            };
            etcd.spawn()?;
            match etcd.wait_until_answering().await {
                Ok(()) => return Ok(etcd),
                Err(e) => last = e,
            }
        }
        Err(StoreError::Backend(format!(
            "etcd did not start: {last}\nits log ({}):\n{}",
            dir.join("etcd.log").display(),
            log_tail(&dir.join("etcd.log"))
        )))
    }

    /// `127.0.0.1:PORT`, its client endpoint.
    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.client_port)
    }

    /// The `--store` URL of namespace `namespace` (`/name` or empty) on this etcd.
    pub fn store_url(&self, namespace: &str) -> String {
        format!("etcd://{}{namespace}", self.endpoint())
    }

    /// The pid of the etcd process, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts etcd (again, after [`LocalEtcd::kill`]) on the same ports and data.
    pub fn spawn(&mut self) -> Result<(), StoreError> {
        let io = |e: std::io::Error| StoreError::Backend(format!("starting {ETCD}: {e}"));
        std::fs::create_dir_all(&self.dir).map_err(io)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .map_err(io)?;
        let client = format!("http://127.0.0.1:{}", self.client_port);
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(ETCD);
        {
            use std::os::unix::process::CommandExt;
            let tied = self.tied;
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
            .arg("--name=telvirt")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=telvirt={peer}"))
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=100")
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io)?)
            .stderr(log)
            .spawn()
            .map_err(io)?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL, and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Leaves etcd running after this value is dropped (`telvirt cluster up`); its pid.
    pub fn detach(mut self) -> Option<u32> {
        self.child.take().map(|c| c.id())
    }

    /// The last lines of etcd's log.
    pub fn log_tail(&self) -> String {
        log_tail(&self.dir.join("etcd.log"))
    }

    /// Waits until etcd answers a read; `Err` when it exited or did not answer in time.
    pub async fn wait_until_answering(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            let connected = EtcdStore::connect(&[self.endpoint()], "").await;
            if connected.is_ok() {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("etcd exited at start ({status})"));
            }
            if let Err(e) = connected
                && Instant::now() > deadline
            {
                self.kill();
                return Err(format!(
                    "etcd did not answer within {START_PATIENCE:?}: {e}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Drop for LocalEtcd {
    fn drop(&mut self) {
        self.kill();
    }
}
