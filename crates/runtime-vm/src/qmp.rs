//! QMP client: a thin, typed, async client for QEMU's machine protocol over a unix socket.
//! Owns the connection, request ids, per-call timeouts and the event stream; must not decide
//! anything about VM lifecycle (the manager does).
//!
//! One reader task parses every line: replies go to the waiting caller (matched by `id`),
//! events are broadcast to every subscriber.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::{Mutex, broadcast, oneshot};

use crate::error::{Error, Result};

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

/// A connected QMP session (capabilities negotiated).
#[derive(Clone)]
pub struct QmpClient {
    writer: Arc<Mutex<OwnedWriteHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: Arc<AtomicU64>,
    timeout: Duration,
}

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
            let mut lines = BufReader::new(read).lines();
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
            let client = QmpClient {
                writer: Arc::new(Mutex::new(write)),
                pending: Arc::clone(&pending),
                events: events.clone(),
                next_id: Arc::new(AtomicU64::new(1)),
                timeout,
            };
            tokio::spawn(read_loop(lines, pending, events));
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
            w.write_all(line.as_bytes()).await?;
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

async fn read_loop(
    mut lines: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            tracing::warn!("QMP: unparsable line {line:?}");
            continue;
        };
        if let Some(name) = v.get("event").and_then(Value::as_str) {
            let data = v.get("data").cloned().unwrap_or(Value::Null);
            let _ = events.send(QmpEvent::parse(name, data));
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
    use tokio::net::UnixListener;

    /// A scripted QMP server: greeting, then answers by command name.
    async fn fake_server(listener: UnixListener, answer_quit: bool) {
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        while let Ok(Some(line)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].clone();
            let reply = match v["execute"].as_str().unwrap() {
                "qmp_capabilities" | "cont" => json!({"return": {}, "id": id}),
                "stop" => {
                    w.write_all(b"{\"event\": \"STOP\", \"data\": {}, \"timestamp\": {}}\n")
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
        c.stop().await.unwrap();
        assert_eq!(ev.recv().await.unwrap(), QmpEvent::Stop);
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
