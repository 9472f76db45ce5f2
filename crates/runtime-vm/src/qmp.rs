//! QMP client: a thin, typed, async client for QEMU's machine protocol over a unix socket.
//! Owns the connection, request ids, per-call timeouts and the event stream; must not decide
//! anything about VM lifecycle (the manager does).
//!
//! One reader task parses every line: replies go to the waiting caller (matched by `id`),
//! events are broadcast to every subscriber.
//!
//! File descriptors travel to QEMU the way libvirt sends them: the command line that uses the
//! fd (`getfd`, `add-fd`) is sent with one `sendmsg` carrying the fd as `SCM_RIGHTS`, so QEMU can
//! use files, TAP queues and sockets it could not open itself (it may run as an unprivileged
//! user under a seccomp filter).

use std::collections::HashMap;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

use crate::error::{Error, Result};
use crate::lines::{BoundedLines, shown};

/// Default deadline for one QMP command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

type Pending = Arc<
    std::sync::Mutex<
        Option<HashMap<u64, oneshot::Sender<std::result::Result<Value, QmpErrorBody>>>>,
    >,
>;

/// The `error` member of a failed QMP reply.
#[derive(Debug, Clone, Deserialize)]
pub struct QmpErrorBody {
    pub class: String,
    pub desc: String,
}

/// An asynchronous QMP event.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpEvent {
    Stop,
    Resume,
    Shutdown {
        guest: bool,
        reason: String,
    },
    DeviceDeleted {
        device: Option<String>,
        path: String,
    },
    Migration {
        status: String,
    },
    Other {
        name: String,
        data: Value,
    },
}

impl QmpEvent {
    fn parse(name: &str, data: Value) -> Self {
        let s = |k: &str| data.get(k).and_then(Value::as_str).map(str::to_string);
        match name {
            "STOP" => Self::Stop,
            "RESUME" => Self::Resume,
            "SHUTDOWN" => Self::Shutdown {
                guest: data.get("guest").and_then(Value::as_bool).unwrap_or(false),
                reason: s("reason").unwrap_or_default(),
            },
            "DEVICE_DELETED" => Self::DeviceDeleted {
                device: s("device"),
                path: s("path").unwrap_or_default(),
            },
            "MIGRATION" => Self::Migration {
                status: s("status").unwrap_or_default(),
            },
            _ => Self::Other {
                name: name.to_string(),
                data,
            },
        }
    }
}

/// Reply of `query-status`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

/// One entry of `query-cpus-fast`.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct CpuInfoFast {
    #[serde(rename = "cpu-index")]
    pub cpu_index: u32,
    #[serde(rename = "thread-id")]
    pub thread_id: i32,
    #[serde(default)]
    pub target: Option<String>,
}

/// Reply of `add-fd`: the fd set the descriptor joined and its number inside QEMU.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct AddFdInfo {
    #[serde(rename = "fdset-id")]
    pub fdset_id: u64,
    pub fd: i64,
}

/// One descriptor of an fd set (`query-fdsets`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetFd {
    pub fd: i64,
    #[serde(default)]
    pub opaque: Option<String>,
}

/// One fd set (`query-fdsets`); `/dev/fdset/<fdset_id>` opens a copy of a matching descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct FdsetInfo {
    #[serde(rename = "fdset-id")]
    pub fdset_id: u64,
    pub fds: Vec<FdsetFd>,
}

/// A connected QMP session (capabilities negotiated).
#[derive(Clone)]
pub struct QmpClient {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    /// When QEMU last sent each event, by name: its own timestamp, µs since the Unix epoch.
    event_times: EventTimes,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
}

type EventTimes = Arc<std::sync::Mutex<HashMap<String, u64>>>;

/// Longest line read from QMP (a reply or an event; QEMU's longest answers to what telvirt
/// asks are tens of KiB): a QEMU that sends more without a newline loses its connection.
const MAX_QMP_LINE: usize = 8 << 20;

/// Most event names (and migration states) whose last time is kept.
const MAX_EVENT_TIMES: usize = 256;

impl std::fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QmpClient")
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl QmpClient {
    /// Connect to a QMP socket, read the greeting and negotiate capabilities, all within
    /// `timeout`, which also becomes the default deadline of every later call.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self> {
        let fut = async {
            let stream = UnixStream::connect(path).await.map_err(|e| Error::Qmp {
                command: "connect".into(),
                reason: format!("{}: {e}", path.display()),
            })?;
            let (read, write) = stream.into_split();
            let mut lines = BoundedLines::new(read, MAX_QMP_LINE);
            let greeting = lines.next_line().await.map_err(|e| Error::Qmp {
                command: "greeting".into(),
                reason: e.to_string(),
            })?;
            match greeting.as_deref().map(serde_json::from_str::<Value>) {
                Some(Ok(v)) if v.get("QMP").is_some() => {}
                other => {
                    return Err(Error::Qmp {
                        command: "greeting".into(),
                        reason: format!("unexpected greeting {other:?}"),
                    });
                }
            }
            let (events, _) = broadcast::channel(256);
            let pending: Pending = Arc::new(std::sync::Mutex::new(Some(HashMap::new())));
            let event_times = EventTimes::default();
            let client = QmpClient {
                writer: Arc::new(Mutex::new(write)),
                pending: Arc::clone(&pending),
                events: events.clone(),
                event_times: Arc::clone(&event_times),
                next_id: Arc::new(AtomicU64::new(1)),
                timeout,
            };
            tokio::spawn(read_loop(lines, pending, events, event_times));
            client
                .execute_raw("qmp_capabilities", None, timeout)
                .await?;
            Ok(client)
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout {
                what: format!("QMP connect to {}", path.display()),
                after: timeout,
            })?
    }

    /// Subscribe to events received from now on.
    pub fn events(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// When QEMU last sent event `name` (`STOP`, `RESUME`, ...) on this connection, by its own
    /// timestamp: µs since the Unix epoch on the host's clock; `None` if it has not. A
    /// `MIGRATION` event is kept by its status too: `MIGRATION:completed` is when the stream
    /// last reached `completed`.
    pub fn last_event_at(&self, name: &str) -> Option<u64> {
        self.event_times
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .copied()
    }

    /// When this connection's migration stream last reached `status` (its `MIGRATION` event),
    /// as [`QmpClient::last_event_at`] tells.
    pub fn last_migration_at(&self, status: &str) -> Option<u64> {
        self.last_event_at(&migration_key(status))
    }

    /// Whether the connection is still open.
    pub fn is_connected(&self) -> bool {
        self.pending.lock().map(|p| p.is_some()).unwrap_or(false)
    }

    /// Run a command with explicit arguments and deadline; returns the `return` member.
    pub async fn execute_raw(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.execute_inner(command, arguments, None, timeout).await
    }

    /// Run a command whose line carries `fd` as `SCM_RIGHTS` (QEMU keeps its own copy; the
    /// caller may close `fd` afterwards). Only commands that take a passed descriptor
    /// (`getfd`, `add-fd`) consume it; QEMU closes it after any other command.
    pub async fn execute_with_fd(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: BorrowedFd<'_>,
        timeout: Duration,
    ) -> Result<Value> {
        self.execute_inner(command, arguments, Some(fd), timeout)
            .await
    }

    async fn execute_inner(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut guard = self.pending.lock().map_err(|_| Error::Qmp {
                command: command.into(),
                reason: "client state poisoned".into(),
            })?;
            let Some(map) = guard.as_mut() else {
                return Err(Error::QmpDisconnected {
                    command: command.into(),
                });
            };
            map.insert(id, tx);
        }
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        let cleanup = || {
            if let Ok(mut g) = self.pending.lock()
                && let Some(m) = g.as_mut()
            {
                m.remove(&id);
            }
        };
        let io = async {
            let mut w = self.writer.lock().await;
            let mut sent = 0;
            if let Some(fd) = fd {
                let stream: &UnixStream = (*w).as_ref();
                sent = loop {
                    stream.writable().await?;
                    match stream.try_io(Interest::WRITABLE, || {
                        send_with_fd(stream.as_raw_fd(), line.as_bytes(), fd.as_raw_fd())
                    }) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e),
                    }
                };
            }
            w.write_all(&line.as_bytes()[sent..]).await?;
            w.flush().await
        };
        match tokio::time::timeout(timeout, io).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => {
                cleanup();
                return Err(Error::QmpDisconnected {
                    command: command.into(),
                });
            }
            Err(_) => {
                cleanup();
                return Err(Error::Timeout {
                    what: format!("QMP {command}"),
                    after: timeout,
                });
            }
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err(e))) => Err(Error::Qmp {
                command: command.into(),
                reason: format!("{}: {}", e.class, e.desc),
            }),
            Ok(Err(_)) => Err(Error::QmpDisconnected {
                command: command.into(),
            }),
            Err(_) => {
                cleanup();
                Err(Error::Timeout {
                    what: format!("QMP {command}"),
                    after: timeout,
                })
            }
        }
    }

    /// Run a command with the default deadline and decode its reply.
    pub async fn execute<R: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<R> {
        let v = self.execute_raw(command, arguments, self.timeout).await?;
        serde_json::from_value(v).map_err(|e| Error::Qmp {
            command: command.into(),
            reason: format!("unexpected reply: {e}"),
        })
    }

    async fn unit(&self, command: &str, arguments: Option<Value>) -> Result<()> {
        self.execute_raw(command, arguments, self.timeout)
            .await
            .map(|_| ())
    }

    pub async fn query_status(&self) -> Result<StatusInfo> {
        self.execute("query-status", None).await
    }

    pub async fn query_cpus_fast(&self) -> Result<Vec<CpuInfoFast>> {
        self.execute("query-cpus-fast", None).await
    }

    /// Pause all vCPUs.
    pub async fn stop(&self) -> Result<()> {
        self.unit("stop", None).await
    }

    /// Resume all vCPUs.
    pub async fn cont(&self) -> Result<()> {
        self.unit("cont", None).await
    }

    /// Press the ACPI power button.
    pub async fn system_powerdown(&self) -> Result<()> {
        self.unit("system_powerdown", None).await
    }

    /// Ask QEMU to exit. The connection may close before the reply arrives; that counts as done.
    pub async fn quit(&self) -> Result<()> {
        match self.unit("quit", None).await {
            Err(Error::QmpDisconnected { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `device_add` with the driver, id and further properties.
    pub async fn device_add(
        &self,
        driver: &str,
        id: &str,
        props: Map<String, Value>,
    ) -> Result<()> {
        let mut args = props;
        args.insert("driver".into(), driver.into());
        args.insert("id".into(), id.into());
        self.unit("device_add", Some(Value::Object(args))).await
    }

    /// Request removal of a device; completion is the `DEVICE_DELETED` event.
    pub async fn device_del(&self, id: &str) -> Result<()> {
        self.unit("device_del", Some(json!({ "id": id }))).await
    }

    pub async fn netdev_add(&self, args: Value) -> Result<()> {
        self.unit("netdev_add", Some(args)).await
    }

    pub async fn netdev_del(&self, id: &str) -> Result<()> {
        self.unit("netdev_del", Some(json!({ "id": id }))).await
    }

    pub async fn chardev_add(&self, id: &str, backend: Value) -> Result<()> {
        self.unit("chardev-add", Some(json!({ "id": id, "backend": backend })))
            .await
    }

    pub async fn chardev_remove(&self, id: &str) -> Result<()> {
        self.unit("chardev-remove", Some(json!({ "id": id }))).await
    }

    pub async fn blockdev_add(&self, args: Value) -> Result<()> {
        self.unit("blockdev-add", Some(args)).await
    }

    pub async fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.unit("blockdev-del", Some(json!({ "node-name": node_name })))
            .await
    }

    /// Hand QEMU a descriptor under a name (`getfd`): `netdev_add tap` (`fd`) and socket
    /// chardevs (`addr: {type: fd}`) take it by that name and own it from then on.
    pub async fn getfd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<()> {
        self.execute_with_fd("getfd", Some(json!({ "fdname": fdname })), fd, self.timeout)
            .await
            .map(|_| ())
    }

    /// Close a named descriptor QEMU still holds (one `getfd` gave it and nothing took it).
    pub async fn closefd(&self, fdname: &str) -> Result<()> {
        self.unit("closefd", Some(json!({ "fdname": fdname })))
            .await
    }

    /// Add a descriptor to an fd set (`add-fd`; a new set when `fdset_id` is `None`). QEMU
    /// opens `/dev/fdset/<id>` by duplicating the member whose access mode matches, so block
    /// devices work on files QEMU itself could not open. `opaque` is free text shown by
    /// [`QmpClient::query_fdsets`].
    pub async fn add_fd(
        &self,
        fd: BorrowedFd<'_>,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<AddFdInfo> {
        let mut args = Map::new();
        if let Some(id) = fdset_id {
            args.insert("fdset-id".into(), id.into());
        }
        if let Some(o) = opaque {
            args.insert("opaque".into(), o.into());
        }
        let v = self
            .execute_with_fd("add-fd", Some(Value::Object(args)), fd, self.timeout)
            .await?;
        serde_json::from_value(v).map_err(|e| Error::Qmp {
            command: "add-fd".into(),
            reason: format!("unexpected reply: {e}"),
        })
    }

    /// Remove one descriptor (`fd`) or the whole set from an fd set; QEMU closes them once
    /// nothing it opened through `/dev/fdset/<id>` still uses them.
    pub async fn remove_fd(&self, fdset_id: u64, fd: Option<i64>) -> Result<()> {
        let mut args = json!({ "fdset-id": fdset_id });
        if let Some(fd) = fd {
            args["fd"] = fd.into();
        }
        self.unit("remove-fd", Some(args)).await
    }

    /// The fd sets QEMU holds.
    pub async fn query_fdsets(&self) -> Result<Vec<FdsetInfo>> {
        self.execute("query-fdsets", None).await
    }

    /// Ids of the devices currently present (`qom-list` of /machine/peripheral).
    pub async fn peripheral_ids(&self) -> Result<Vec<String>> {
        #[derive(Deserialize)]
        struct Prop {
            name: String,
            #[serde(rename = "type")]
            kind: String,
        }
        let props: Vec<Prop> = self
            .execute("qom-list", Some(json!({ "path": "/machine/peripheral" })))
            .await?;
        Ok(props
            .into_iter()
            .filter(|p| p.kind.starts_with("child<"))
            .map(|p| p.name)
            .collect())
    }
}

/// One `sendmsg` of (a prefix of) `line` with `fd` attached as `SCM_RIGHTS`; returns the bytes
/// sent (the descriptor travels with the first of them).
fn send_with_fd(sock: RawFd, line: &[u8], fd: RawFd) -> std::io::Result<usize> {
    const FD_LEN: u32 = std::mem::size_of::<RawFd>() as u32;
    // Room for one cmsghdr with one int, aligned for cmsghdr (u64 alignment covers it).
    let mut control = [0u64; 4];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(FD_LEN) } as usize;
    assert!(
        space <= std::mem::size_of_val(&control),
        "invariant: one SCM_RIGHTS descriptor fits in 32 bytes of control data"
    );
    let mut iov = libc::iovec {
        iov_base: line.as_ptr() as *mut libc::c_void,
        iov_len: line.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` writable, aligned bytes, so the first header
    // exists and has room for one descriptor; sendmsg only reads `line` through the iovec.
    let n = unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(FD_LEN) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Where a `MIGRATION` event's time is kept, by its status.
fn migration_key(status: &str) -> String {
    format!("MIGRATION:{status}")
}

/// An event's `timestamp` (`{"seconds": S, "microseconds": U}`) in µs since the Unix epoch.
fn event_timestamp(v: &Value) -> Option<u64> {
    let t = v.get("timestamp")?;
    let seconds = t.get("seconds")?.as_u64()?;
    let micros = t.get("microseconds")?.as_u64()?;
    seconds.checked_mul(1_000_000)?.checked_add(micros)
}

async fn read_loop(
    mut lines: BoundedLines<tokio::net::unix::OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    event_times: EventTimes,
) {
    loop {
        let line = match lines.next_line().await {
            Ok(Some(line)) => line,
            Ok(None) => break,
            Err(e) => {
                // The connection is dropped: its pending calls fail as disconnected.
                tracing::warn!("QMP: {e}: the connection to QEMU is dropped");
                break;
            }
        };
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!("QMP: unparsable line {:?}", shown(&line));
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let event = QmpEvent::parse(name, v.get("data").cloned().unwrap_or(Value::Null));
            if let Some(at) = event_timestamp(&v) {
                let mut times = event_times.lock().unwrap_or_else(|p| p.into_inner());
                let mut note = |key: String| {
                    // As many names as QEMU may choose, at most so many kept.
                    if times.len() < MAX_EVENT_TIMES || times.contains_key(&key) {
                        times.insert(key, at);
                    }
                };
                if let QmpEvent::Migration { status } = &event {
                    note(migration_key(status));
                }
                note(name.to_owned());
            }
            let _ = events.send(event);
            continue;
        }
        let Some(id) = v.get("id").and_then(Value::as_u64) else {
            continue;
        };
        let result = if let Some(r) = v.get("return") {
            Ok(r.clone())
        } else {
            let err = v
                .get("error")
                .cloned()
                .and_then(|e| serde_json::from_value::<QmpErrorBody>(e).ok())
                .unwrap_or(QmpErrorBody {
                    class: "Unknown".into(),
                    desc: line.clone(),
                });
            Err(err)
        };
        let waiter = pending
            .lock()
            .ok()
            .and_then(|mut g| g.as_mut().and_then(|m| m.remove(&id)));
        if let Some(tx) = waiter {
            let _ = tx.send(result);
        }
    }
    // Connection closed: fail every waiter (dropping the senders) and refuse new calls.
    if let Ok(mut g) = pending.lock() {
        g.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::net::UnixListener;

    type ServerEnd = (
        tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
        tokio::net::unix::OwnedWriteHalf,
    );

    /// The server's end of the next connection, QMP's greeting sent.
    async fn greeted(listener: &UnixListener) -> ServerEnd {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        (BufReader::new(r).lines(), w)
    }

    /// A scripted QMP server: greeting, then answers by command name.
    async fn fake_server(listener: UnixListener, answer_quit: bool) {
        let (mut lines, mut w) = greeted(&listener).await;
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" | "cont" => json!({"return": {}, "id": id}),
                "stop" => {
                    w.write_all(b"{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {\"seconds\": 1764900000, \"microseconds\": 250}}\n")
                        .await
                        .unwrap();
                    json!({"return": {}, "id": id})
                }
                "migrate-continue" => {
                    w.write_all(b"{\"event\": \"MIGRATION\", \"data\": {\"status\": \"device\"}, \"timestamp\": {\"seconds\": 1764900000, \"microseconds\": 900}}\n")
                        .await
                        .unwrap();
                    json!({"return": {}, "id": id})
                }
                "query-status" => {
                    json!({"return": {"running": true, "status": "running"}, "id": id})
                }
                "query-cpus-fast" => {
                    json!({"return": [{"cpu-index": 0, "thread-id": 42, "target": "x86_64"}], "id": id})
                }
                "device_del" => {
                    json!({"error": {"class": "DeviceNotFound", "desc": "Device 'x' not found"}, "id": id})
                }
                "quit" if !answer_quit => return,
                "hang" => continue,
                _ => json!({"return": {}, "id": id}),
            };
            w.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
    }

    #[tokio::test]
    async fn typed_calls_errors_events_and_timeouts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(fake_server(listener, false));
        let c = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        let st = c.query_status().await.unwrap();
        assert!(st.running);
        assert_eq!(st.status, "running");
        let cpus = c.query_cpus_fast().await.unwrap();
        assert_eq!(cpus[0].thread_id, 42);
        let mut ev = c.events();
        assert_eq!(c.last_event_at("STOP"), None);
        c.stop().await.unwrap();
        assert_eq!(ev.recv().await.unwrap(), QmpEvent::Stop);
        // QEMU's own timestamp of the event, in µs.
        assert_eq!(c.last_event_at("STOP"), Some(1_764_900_000_000_250));
        assert_eq!(c.last_event_at("RESUME"), None);
        // A MIGRATION event is kept by its status too.
        c.execute_raw("migrate-continue", None, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(
            ev.recv().await.unwrap(),
            QmpEvent::Migration {
                status: "device".into()
            }
        );
        assert_eq!(
            c.last_event_at("MIGRATION:device"),
            Some(1_764_900_000_000_900)
        );
        assert_eq!(c.last_event_at("MIGRATION:completed"), None);
        match c.device_del("x").await {
            Err(Error::Qmp { command, reason }) => {
                assert_eq!(command, "device_del");
                assert!(reason.contains("DeviceNotFound"), "{reason}");
            }
            other => panic!("unexpected {other:?}"),
        }
        match c
            .execute_raw("hang", None, Duration::from_millis(200))
            .await
        {
            Err(Error::Timeout { what, .. }) => assert!(what.contains("hang")),
            other => panic!("unexpected {other:?}"),
        }
        // The server closes on quit without answering: quit still succeeds, later calls fail.
        c.quit().await.unwrap();
        server.await.unwrap();
        assert!(matches!(
            c.query_status().await,
            Err(Error::QmpDisconnected { .. })
        ));
        assert!(!c.is_connected());
    }

    /// Receive bytes and any `SCM_RIGHTS` descriptors from a blocking unix socket.
    fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<std::os::fd::OwnedFd>) -> usize {
        use std::os::fd::FromRawFd;
        let mut control = [0u64; 8];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = unsafe { libc::recvmsg(sock, &mut msg, 0) };
        assert!(n >= 0, "recvmsg: {}", std::io::Error::last_os_error());
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let fd = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                    fds.push(std::os::fd::OwnedFd::from_raw_fd(fd));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        n as usize
    }

    /// A server that answers `add-fd` and `getfd` by reading the descriptor that came with the
    /// command: the reply carries the file's content, proving the fd really arrived.
    fn fd_server(listener: std::os::unix::net::UnixListener) {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        s.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .unwrap();
        let mut pending = Vec::new();
        let mut fds = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = recv_with_fds(s.as_raw_fd(), &mut buf, &mut fds);
            if n == 0 {
                return;
            }
            pending.extend_from_slice(&buf[..n]);
            while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                let id = v["id"].clone();
                let reply = match v["execute"].as_str().unwrap() {
                    "add-fd" | "getfd" if fds.is_empty() => json!({"error": {
                        "class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}, "id": id}),
                    cmd @ ("add-fd" | "getfd") => {
                        let mut f = std::fs::File::from(fds.remove(0));
                        let mut content = String::new();
                        f.read_to_string(&mut content).unwrap();
                        if cmd == "add-fd" {
                            assert_eq!(v["arguments"]["opaque"], "tv-blk:disk1");
                            json!({"return": {"fdset-id": content.len(), "fd": 21}, "id": id})
                        } else {
                            assert_eq!(v["arguments"]["fdname"], content.trim());
                            json!({"return": {}, "id": id})
                        }
                    }
                    _ => json!({"return": {}, "id": id}),
                };
                s.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn descriptors_travel_with_their_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || fd_server(listener));
        let c = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        let file = dir.path().join("blob");
        std::fs::write(&file, "12345").unwrap();
        let f = std::fs::File::open(&file).unwrap();
        let info = c
            .add_fd(f.as_fd(), None, Some("tv-blk:disk1"))
            .await
            .unwrap();
        assert_eq!(
            info,
            AddFdInfo {
                fdset_id: 5,
                fd: 21
            }
        );
        std::fs::write(&file, "net0-be-fd\n").unwrap();
        let f = std::fs::File::open(&file).unwrap();
        c.getfd("net0-be-fd", f.as_fd()).await.unwrap();
        // Without a descriptor the same command is refused by the server.
        let e = c
            .execute_raw(
                "getfd",
                Some(json!({"fdname": "x"})),
                Duration::from_secs(5),
            )
            .await
            .unwrap_err();
        assert!(e.to_string().contains("SCM_RIGHTS"), "{e}");
        drop(c);
        server.join().unwrap();
    }

    /// A QEMU that sends a line past the bound (here an endless one) loses its connection:
    /// the call waiting fails as disconnected, nothing grows without end.
    #[tokio::test]
    async fn a_qmp_line_past_the_bound_drops_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let (mut lines, mut w) = greeted(&listener).await;
            let line = lines.next_line().await.unwrap().unwrap();
            let id = serde_json::from_str::<Value>(&line).unwrap()["id"].clone();
            let reply = format!("{}\n", json!({"return": {}, "id": id}));
            w.write_all(reply.as_bytes()).await.unwrap();
            // The next call is answered with bytes and no newline, past the bound.
            lines.next_line().await.unwrap().unwrap();
            let chunk = vec![b'x'; 1 << 20];
            for _ in 0..=MAX_QMP_LINE >> 20 {
                if w.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = lines.next_line().await;
        });
        let c = QmpClient::connect(&path, Duration::from_secs(5))
            .await
            .unwrap();
        let e = c.query_status().await.unwrap_err();
        assert!(matches!(e, Error::QmpDisconnected { .. }), "{e}");
        // Its socket closes with the client: the server's writes end.
        drop(c);
        server.await.unwrap();
    }

    #[tokio::test]
    async fn connect_to_missing_socket_fails_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let err = QmpClient::connect(&dir.path().join("nope.sock"), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("nope.sock"), "{err}");
    }

    #[test]
    fn events_are_typed() {
        assert_eq!(
            QmpEvent::parse(
                "SHUTDOWN",
                json!({"guest": true, "reason": "guest-shutdown"})
            ),
            QmpEvent::Shutdown {
                guest: true,
                reason: "guest-shutdown".into()
            }
        );
        assert_eq!(
            QmpEvent::parse(
                "DEVICE_DELETED",
                json!({"device": "rng0", "path": "/machine/peripheral/rng0"})
            ),
            QmpEvent::DeviceDeleted {
                device: Some("rng0".into()),
                path: "/machine/peripheral/rng0".into()
            }
        );
        assert_eq!(
            QmpEvent::parse("MIGRATION", json!({"status": "completed"})),
            QmpEvent::Migration {
                status: "completed".into()
            }
        );
        assert!(matches!(
            QmpEvent::parse("RTC_CHANGE", json!({})),
            QmpEvent::Other { .. }
        ));
    }
}
