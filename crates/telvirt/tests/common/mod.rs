//! One harness for the binary's end-to-end tests: a real `telvirt serve` process working in a
//! temp directory (its data dir is `<dir>/data`), the CLI run against it, and polling with
//! deadlines. The process is SIGKILLed when the harness is dropped, even when a test fails.
//! [`lay_out_examples`] gives a test directory the layout of a checkout after `telvirt wasm
//! examples`, so the example descriptors' `module: ../vnfs/<name>.wasm` resolves.

#![allow(dead_code)]

pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_telvirt");
pub const DEADLINE: Duration = Duration::from_secs(30);
/// How long a started process may take to serve: longer than [`DEADLINE`], since a start under
/// the whole suite's load (a store to open, certificates to write, a campaign) is slow.
pub const PROCESS_START: Duration = Duration::from_secs(90);

/// The guest image cache of the tests: `TELVIRT_TEST_CACHE`, else `<target>/telvirt-test-cache`.
pub fn shared_image_cache() -> PathBuf {
    std::env::var_os("TELVIRT_TEST_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(BIN)
                .parent()
                .and_then(Path::parent)
                .map_or_else(|| repo("target"), Path::to_path_buf)
                .join("telvirt-test-cache")
        })
}

/// The static guest agent: `TELVIRT_GUEST_BIN`, else built here with crt-static into
/// `<target>/guest-static` (the outer cargo holds the lock of the main target dir).
pub fn guest_binary() -> PathBuf {
    static BIN_PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN_PATH
        .get_or_init(|| {
            if let Some(p) = std::env::var_os("TELVIRT_GUEST_BIN") {
                return PathBuf::from(p);
            }
            let tdir = Path::new(BIN)
                .parent()
                .and_then(Path::parent)
                .map_or_else(|| repo("target"), Path::to_path_buf)
                .join("guest-static");
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .current_dir(repo(""))
                .args(["rustc", "-q", "-p", "telvirt-guest", "--release"])
                .args([
                    "--bin",
                    "telvirt-guest",
                    "--",
                    "-C",
                    "target-feature=+crt-static",
                ])
                .env("CARGO_TARGET_DIR", &tdir)
                .status()
                .expect("run cargo to build the static guest agent");
            assert!(status.success(), "building the static guest agent failed");
            tdir.join("release/telvirt-guest")
        })
        .clone()
}

/// A second QEMU, newer than the system's: `TELVIRT_TEST_QEMU_NEXT`, else what `make
/// qemu-next` unpacked into `<target>/qemu-next` (the target dir this test was built in).
/// `None`, said on stderr, where there is none (a release without a known newer QEMU, or
/// `make qemu-next` not run): the caller skips.
pub fn qemu_next() -> Option<PathBuf> {
    let path = match std::env::var_os("TELVIRT_TEST_QEMU_NEXT") {
        Some(p) => PathBuf::from(p),
        None => Path::new(BIN)
            .parent()
            .and_then(Path::parent)
            .map_or_else(|| repo("target"), Path::to_path_buf)
            .join("qemu-next/usr/bin/qemu-system-x86_64"),
    };
    if path.is_file() {
        return Some(path);
    }
    eprintln!(
        "skipped: no newer QEMU at {} (`make qemu-next` unpacks one on Debian 12)",
        path.display()
    );
    None
}

/// A path inside the repository.
pub fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Lays out `<root>/examples/` as a checkout has it after `telvirt wasm examples`: the built-in
/// modules written by `telvirt wasm examples --out examples/vnfs` (not in git), and copies of the
/// repository's example descriptors and inventories. A descriptor there names its module
/// `../vnfs/<name>.wasm`, relative to itself, which the CLI uploads.
pub fn lay_out_examples(root: &Path) {
    let out = Command::new(BIN)
        .args(["wasm", "examples", "--out", "examples/vnfs"])
        .current_dir(root)
        .output()
        .unwrap();
    assert!(out.status.success(), "wasm examples: {}", stderr(&out));
    for m in ["firewall", "nat", "gtpu"] {
        let module = root.join(format!("examples/vnfs/{m}.wasm"));
        assert!(module.is_file(), "{} was not written", module.display());
    }
    for sub in ["descriptors", "inventory"] {
        let to = root.join("examples").join(sub);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(repo(&format!("examples/{sub}"))).unwrap() {
            let from = entry.unwrap().path();
            std::fs::copy(&from, to.join(from.file_name().unwrap())).unwrap();
        }
    }
}

/// The string `key` (`server`, `token`, `ca`) of the client config at `config`.
pub fn config_value(config: &Path, key: &str) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let parsed: toml::Table = toml::from_str(&text).unwrap();
    parsed
        .get(key)
        .and_then(|v| v.as_str())
        .unwrap_or_else(|| panic!("the client config {} has no {key}", config.display()))
        .to_owned()
}

/// The certificates (PEM) of the servers this test process started: [`http`] trusts these and
/// nothing else. Each [`Serve`] adds the `ca` of its client config once it is up.
static TRUSTED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Trusts `pem` (a server's certificate or CA) in [`http`] from now on.
pub fn trust(pem: &str) {
    let mut trusted = TRUSTED.lock().unwrap();
    if !trusted.iter().any(|t| t == pem) {
        trusted.push(pem.to_owned());
    }
}

/// A TLS client session trusting [`TRUSTED`], for `host`.
fn tls_session(host: &str) -> std::io::Result<rustls::ClientConnection> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for pem in TRUSTED.lock().unwrap().iter() {
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
            roots.add(cert.unwrap()).unwrap();
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    rustls::ClientConnection::new(std::sync::Arc::new(config), name).map_err(std::io::Error::other)
}

pub struct Serve {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `serve`, or `controller` (no agent of its own).
    subcommand: &'static str,
    args: Vec<String>,
    /// A command the server and the CLI run under (e.g. `ip netns exec NS`); empty: none.
    wrapper: Vec<String>,
}

impl Serve {
    /// A fresh temp directory to prepare files in before [`Serve::start_in`].
    pub fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    /// `telvirt serve --listen 127.0.0.1:0 --data-dir data <args>` in a new temp directory.
    pub fn start(args: &[&str]) -> Serve {
        Self::start_in(Self::dir(), args)
    }

    pub fn start_in(dir: tempfile::TempDir, args: &[&str]) -> Serve {
        Self::start_wrapped(dir, args, &[])
    }

    /// [`Serve::start`] in a directory laid out by [`lay_out_examples`]: `args` may name
    /// `examples/inventory/...`, and the CLI `examples/descriptors/...`.
    pub fn with_examples(args: &[&str]) -> Serve {
        let dir = Self::dir();
        lay_out_examples(dir.path());
        Self::start_in(dir, args)
    }

    /// [`Serve::start_in`] with the server and every CLI call run under `wrapper` (a command
    /// that ends by exec'ing its arguments, such as `ip netns exec NS`, so the pid is the
    /// server's own).
    pub fn start_wrapped(dir: tempfile::TempDir, args: &[&str], wrapper: &[&str]) -> Serve {
        let mut serve = Serve {
            child: None,
            dir,
            subcommand: "serve",
            args: args.iter().map(|a| a.to_string()).collect(),
            wrapper: wrapper.iter().map(|a| a.to_string()).collect(),
        };
        serve.restart();
        serve
    }

    /// `telvirt controller --listen 127.0.0.1:0 --data-dir data <args>` in `dir`: the control
    /// plane without an agent; hosts join with [`Agent::start`].
    pub fn controller_in(dir: tempfile::TempDir, args: &[&str]) -> Serve {
        let mut serve = Serve {
            child: None,
            dir,
            subcommand: "controller",
            args: args.iter().map(|a| a.to_string()).collect(),
            wrapper: Vec::new(),
        };
        serve.restart();
        serve
    }

    /// The API endpoint written into the client config.
    pub fn server(&self) -> String {
        config_value(&self.config(), "server")
    }

    /// The telvirt binary under the wrapper, working in the test directory. Every node of every
    /// test shares one guest image cache (built once, under its lock, where the vm tests keep
    /// theirs): each fresh data dir otherwise built the image and probed the accelerator again,
    /// taking the CPU other tests measure with.
    pub fn command(&self) -> Command {
        let mut c = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        c.current_dir(self.dir.path())
            .env("TELVIRT_IMAGE_CACHE", shared_image_cache());
        c
    }

    /// Starts the server (again) on the same directory and waits until the API answers.
    pub fn restart(&mut self) {
        let _ = std::fs::remove_file(self.config());
        let child = self
            .command()
            .args([
                self.subcommand,
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "data",
            ])
            .args(&self.args)
            .env("TELVIRT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(self.log_file())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + PROCESS_START;
        while !(self.config().exists() && self.cli(&["vnf", "list"]).status.success()) {
            assert!(
                Instant::now() < deadline,
                "telvirt {} did not become ready; its log ends:\n{}",
                self.subcommand,
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        if self.server().starts_with("https://") {
            trust(&config_value(&self.config(), "ca"));
        }
    }

    /// The server's log (info and above, every start appended): `<dir>/serve.log`.
    fn log_file(&self) -> std::fs::File {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("serve.log"))
            .unwrap()
    }

    /// The last lines of the server's log, and how it ended if it did, to explain a failed
    /// call.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.path("serve.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(20)..].join("\n");
        if let Some(child) = &self.child {
            // SAFETY: a zeroed siginfo_t is valid; WNOWAIT leaves the child to be reaped by
            // its `Child`.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            let peeked = unsafe {
                libc::waitid(
                    libc::P_PID,
                    child.id(),
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                )
            };
            // SAFETY: waitid filled `info` for an exited child (si_pid set), else left it zero.
            if peeked == 0 && unsafe { info.si_pid() } != 0 {
                let (code, status) = (info.si_code, unsafe { info.si_status() });
                tail.push_str(&format!(
                    "\n(the server has ended: si_code {code}, status or signal {status})"
                ));
            }
        }
        tail
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    /// SIGTERM, as systemd or an operator's `kill` would, and waits (with a deadline) until the
    /// process has shut down gracefully; panics unless it exited successfully.
    pub fn terminate(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: `pid` is our own child, not yet reaped (we hold its `Child`).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "telvirt serve exited with {status}");
                return;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("telvirt serve did not shut down after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as an operator's `kill -9` or a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn config(&self) -> PathBuf {
        self.path("data/client.toml")
    }

    /// The admin's token, from the client config.
    pub fn admin_token(&self) -> String {
        config_value(&self.config(), "token")
    }

    /// The CLI against this server, as its admin.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .env("TELVIRT_CONFIG", self.config())
            .env_remove("TELVIRT_SERVER")
            .env_remove("TELVIRT_TOKEN")
            .output()
            .unwrap()
    }

    /// The CLI against this server, run from working directory `cwd`, as the authority whose
    /// token is `token` (`None`: the admin).
    pub fn cli_at(&self, cwd: &Path, token: Option<&str>, args: &[&str]) -> Output {
        let mut c = self.command();
        c.current_dir(cwd);
        if let Some(token) = token {
            c.args(["--token", token]);
        }
        c.args(args)
            .env("TELVIRT_CONFIG", self.config())
            .env_remove("TELVIRT_SERVER")
            .env_remove("TELVIRT_TOKEN")
            .output()
            .unwrap()
    }

    /// The CLI against this server as the authority whose token is `token`.
    pub fn cli_as(&self, token: &str, args: &[&str]) -> Output {
        self.cli_at(self.dir.path(), Some(token), args)
    }

    /// [`Serve::cli_as`], which must succeed.
    pub fn ok_as(&self, token: &str, args: &[&str]) -> Output {
        let out = self.cli_as(token, args);
        assert!(
            out.status.success(),
            "telvirt {args:?} as a non-admin: {}",
            stderr(&out)
        );
        out
    }

    /// [`Serve::json`] as the authority whose token is `token`.
    pub fn json_as(&self, token: &str, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_slice(&self.ok_as(token, &all).stdout).unwrap()
    }

    /// Creates authority `name` (in the default security domain) and returns its token.
    pub fn authority(&self, name: &str) -> String {
        let created = self.json(&["authority", "create", name]);
        created["token"]
            .as_str()
            .unwrap_or_else(|| panic!("no token in {created}"))
            .to_owned()
    }

    pub fn ok(&self, args: &[&str]) -> Output {
        let out = self.cli_past_lapses(args);
        assert!(
            out.status.success(),
            "telvirt {args:?}: {}\nthe server's log ends:\n{}",
            stderr(&out),
            self.log_tail()
        );
        out
    }

    /// The CLI, asked again (with a deadline) while it is refused because the host's lease
    /// lapsed for a moment: a heartbeat late on a loaded machine makes the host NotReady and
    /// its VNFs Unknown until the next beat, and a request routed there is refused before
    /// anything is done. Not what the tests that use it check.
    pub fn cli_past_lapses(&self, args: &[&str]) -> Output {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let out = self.cli(args);
            let err = stderr(&out);
            // Not the CLI's own `--wait` that timed out on Unknown (its request was sent).
            let lapsed = err.contains("is not Ready (no live heartbeat)")
                || (err.contains(" is Unknown") && !err.contains(" is Unknown after "));
            if out.status.success() || !lapsed || Instant::now() >= deadline {
                return out;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs the CLI expecting it to fail with `needle` in its error output; returns that output.
    pub fn fails(&self, args: &[&str], needle: &str) -> String {
        let out = self.cli(args);
        let err = stderr(&out);
        assert!(!out.status.success(), "telvirt {args:?} should have failed");
        assert!(err.contains(needle), "telvirt {args:?}: {err}");
        err
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_slice(&self.ok(&all).stdout).unwrap()
    }

    /// Writes `text` into the test directory and creates a VNF from it.
    pub fn create(&self, file: &str, text: &str) {
        let path = self.path(file);
        std::fs::write(&path, text).unwrap();
        self.ok(&["vnf", "create", "-f", path.to_str().unwrap()]);
    }

    /// Polls `vnf show` until `pred` holds, with a deadline.
    pub fn wait_vnf(&self, name: &str, pred: impl Fn(&Value) -> bool) -> Value {
        self.wait_vnf_for(name, DEADLINE, pred)
    }

    /// [`Serve::wait_vnf`] with a deadline of `limit`.
    pub fn wait_vnf_for(
        &self,
        name: &str,
        limit: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let v = self.json(&["vnf", "show", name]);
            if pred(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{name} never reached the state: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn wait_phase(&self, name: &str, phase: &str) -> Value {
        self.wait_vnf(name, |v| v["phase"] == phase)
    }
}

/// A `telvirt agent` process working in a [`Serve`]'s directory, SIGKILLed when dropped.
pub struct Agent {
    child: Option<Child>,
}

impl Agent {
    /// `telvirt agent --controller <node's server> <args>` run in the node's directory (output
    /// to `<dir>/<log>`); returns at once.
    pub fn start(node: &Serve, log: &str, args: &[&str]) -> Agent {
        Self::start_at(node, &node.server(), log, args)
    }

    /// [`Agent::start`] against `controllers` (comma-separated API addresses).
    pub fn start_at(node: &Serve, controllers: &str, log: &str, args: &[&str]) -> Agent {
        Self::start_with_env(node, controllers, log, args, &[])
    }

    /// [`Agent::start_at`] with `env` set for the agent process.
    pub fn start_with_env(
        node: &Serve,
        controllers: &str,
        log: &str,
        args: &[&str],
        env: &[(&str, &Path)],
    ) -> Agent {
        let log = std::fs::File::create(node.path(log)).unwrap();
        let child = node
            .command()
            .envs(env.iter().copied())
            .args(["agent", "--controller", controllers])
            // The node's own certificate, generated into its data dir.
            .args(["--controller-ca", "data/tls/server.crt"])
            // Several hosts on one machine: no worker takes a core for itself.
            .arg("--no-busy-poll")
            .args(args)
            .env("TELVIRT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Agent { child: Some(child) }
    }

    /// Waits (with a deadline) for the process to exit by itself; its status.
    pub fn wait_exit(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("agent running");
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("telvirt agent did not exit");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to the agent process (SIGSTOP stalls it as a host cut off from everyone
    /// would be; SIGCONT lets it go on).
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.as_ref().expect("agent running").id()).unwrap();
        // SAFETY: `pid` is our own child, not yet reaped (we hold its `Child`).
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }

    /// SIGTERM, then waits (with a deadline) for a clean exit.
    pub fn terminate(&mut self) {
        let pid = libc::pid_t::try_from(self.child.as_ref().expect("agent running").id()).unwrap();
        // SAFETY: `pid` is our own child, not yet reaped (we hold its `Child`).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.wait_exit();
        assert!(status.success(), "telvirt agent exited with {status}");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Entries of map `map` of wasm VNF `vnf` as `vnf maps` shows them (`None` while it cannot
/// be read).
pub fn map_entries(node: &Serve, vnf: &str, map: &str) -> Option<u64> {
    let out = node.cli_past_lapses(&["vnf", "maps", vnf, "-o", "json"]);
    if !out.status.success() {
        return None;
    }
    let maps: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    maps.as_array()?
        .iter()
        .find(|m| m["name"] == map)
        .and_then(|m| m["entries"].as_u64())
}

/// Polls `f` every 50 ms until it holds; panics naming `what` after [`DEADLINE`].
pub fn wait_until(what: &str, f: impl FnMut() -> bool) {
    wait_until_for(what, DEADLINE, f);
}

/// [`wait_until`] with its own deadline.
pub fn wait_until_for(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One HTTP/1.1 request to `addr` (`https://HOST:PORT` over TLS trusting only the certificates
/// of [`trust`]; `http://HOST:PORT` or `HOST:PORT` in plain) with an optional bearer token and
/// YAML body: (status, body).
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    try_http(addr, method, path, token, body)
        .unwrap_or_else(|e| panic!("{method} {addr}{path}: {e}"))
}

/// [`http`] that answers an error instead of panicking when the server cannot be reached or
/// does not answer within 10 s.
pub fn try_http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let (tls, addr) = match addr.strip_prefix("https://") {
        Some(rest) => (true, rest),
        None => (false, addr.trim_start_matches("http://")),
    };
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/yaml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    if tls {
        let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut session = rustls::StreamOwned::new(tls_session(host)?, tcp);
        session.write_all(request.as_bytes())?;
        // A server that closes without close_notify still said all it had to say.
        match session.read_to_string(&mut answer) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
            other => {
                other?;
            }
        }
    } else {
        let mut tcp = tcp;
        tcp.write_all(request.as_bytes())?;
        tcp.read_to_string(&mut answer)?;
    }
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// One sample of a scrape: a counter's or gauge's value, or a histogram's cumulative buckets.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub metric: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
    /// (upper bound, cumulative count), for a histogram.
    pub buckets: Vec<(f64, f64)>,
}

/// `GET /metrics` from `server` with `token` (`None`: without one): the status and, when 200, the families
/// declared and their samples, as a strict Prometheus text-format parser reads them.
pub fn scrape(
    server: &str,
    token: Option<&str>,
) -> (u16, std::collections::BTreeSet<String>, Vec<Sampled>) {
    use openmetrics_parser::PrometheusValue;
    let (status, body) = http(server, "GET", "/metrics", token, "");
    let (mut families, mut samples) = (std::collections::BTreeSet::new(), Vec::new());
    if status != 200 {
        return (status, families, samples);
    }
    let exposition = openmetrics_parser::prometheus::parse_prometheus(&body)
        .unwrap_or_else(|e| panic!("not Prometheus text: {e:?}\n{body}"));
    for (name, family) in exposition.families {
        for s in family.iter_samples() {
            let labels = s
                .get_labelset()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let (value, buckets) = match &s.value {
                PrometheusValue::Counter(c) => (c.value.as_f64(), Vec::new()),
                PrometheusValue::Gauge(n) | PrometheusValue::Unknown(n) => (n.as_f64(), Vec::new()),
                PrometheusValue::Histogram(h) => (
                    h.count.unwrap_or(0) as f64,
                    h.buckets
                        .iter()
                        .map(|b| (b.upper_bound, b.count.as_f64()))
                        .collect(),
                ),
                PrometheusValue::Summary(_) => panic!("{name}: no summary is expected"),
            };
            samples.push(Sampled {
                metric: name.clone(),
                labels,
                value,
                buckets,
            });
        }
        families.insert(name);
    }
    (status, families, samples)
}

/// The value of metric `metric` whose labels include `labels`.
pub fn sample(samples: &[Sampled], metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .filter(|s| s.metric == metric)
        .find(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// A further `telvirt controller` working in a [`Serve`]'s directory (its data dir `data`),
/// on a store the first one shares; SIGKILLed when dropped.
pub struct ExtraController {
    /// Its API address, `https://127.0.0.1:PORT`.
    pub api: String,
    child: Option<Child>,
}

impl ExtraController {
    /// `telvirt controller --listen 127.0.0.1:0 --data-dir data <args>` logging to
    /// `<dir>/<log>`; returns once its log says where it listens.
    pub fn start(node: &Serve, args: &[&str], log: &str) -> ExtraController {
        let file = std::fs::File::create(node.path(log)).unwrap();
        let child = Command::new(BIN)
            .current_dir(node.path(""))
            .args([
                "controller",
                "--listen",
                "127.0.0.1:0",
                "--data-dir",
                "data",
            ])
            .args(args)
            .env("TELVIRT_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .unwrap();
        let mut controller = ExtraController {
            api: String::new(),
            child: Some(child),
        };
        wait_until_for(
            "a further controller to say where it listens",
            PROCESS_START,
            || {
                let text = std::fs::read_to_string(node.path(log)).unwrap_or_default();
                // "... on https://127.0.0.1:PORT: campaigning ..."
                if let Some(addr) = text
                    .split(" on https://")
                    .nth(1)
                    .and_then(|rest| rest.split(": ").next())
                {
                    controller.api = format!("https://{addr}");
                }
                !controller.api.is_empty()
            },
        );
        controller
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ExtraController {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The arguments of an agent for host a1 (inventory `inventory.yaml`, data in `agent-data`,
/// credential in `token_file`, a heartbeat every 200 ms), followed by `extra`.
pub fn a1_agent_args<'a>(token_file: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "--token-file",
        token_file,
        "--data-dir",
        "agent-data",
        "--inventory",
        "inventory.yaml",
        "--host-name",
        "a1",
        "--heartbeat-interval-ms",
        "200",
    ];
    args.extend_from_slice(extra);
    args
}

/// `Cpus_allowed_list` of every thread of QEMU `pid` that is a vCPU (`vcpu`) or is not.
pub fn allowed_cpus(pid: i32, vcpu: bool) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("CPU ") != vcpu {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        if let Some(line) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")) {
            out.push(line["Cpus_allowed_list:".len()..].trim().to_owned());
        }
    }
    out
}

pub fn cpu_list(v: &Value) -> String {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(Value::as_u64)
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            // State is the field after the parenthesised command name; Z is a zombie.
            s.rsplit_once(')')
                .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
                .unwrap_or(false)
        })
        .unwrap_or(false)
}

pub fn sigkill(pid: i32) {
    let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
}

/// Live QEMUs started for VM `name`.
pub fn qemu_pids(name: &str) -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("guest={name},")])
        .output()
        .expect("run pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p| alive(p))
        .collect()
}

/// SIGKILLs every QEMU of VM `name` when dropped (they run in process groups of their own
/// and outlive the agent or node that started them), even when an assertion fails.
pub struct QemuGuard(pub &'static str);

impl Drop for QemuGuard {
    fn drop(&mut self) {
        for pid in qemu_pids(self.0) {
            sigkill(pid);
        }
    }
}
