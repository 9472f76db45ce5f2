//! Host side of the guest agent protocol: connects to the unix socket QEMU exposes for the
//! agent's virtio-serial port, waits for `ready`, sends requests with deadlines. Owns request
//! ids and line framing; must not decide lifecycle (the manager does).

use std::path::Path;
use std::time::Duration;

use telvirt_guest::proto::{
    Body, Health, Message, Ready, Request, RequestEnvelope, TimerStats, Workload, encode_line,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::error::{Error, Result};
use crate::lines::{BoundedLines, shown};

/// Longest line taken from the guest agent (its messages are a few hundred bytes): a guest
/// that sends more without a newline loses the connection, not the node's memory.
const MAX_AGENT_LINE: usize = 1 << 20;

struct Conn {
    lines: BoundedLines<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

/// A connection to the telvirt guest agent.
pub struct AgentClient {
    conn: Mutex<Conn>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentClient")
    }
}

impl AgentClient {
    /// Connect to the agent socket (QEMU's chardev; it exists as soon as QEMU runs).
    pub async fn connect(path: &Path) -> Result<Self> {
        let s = UnixStream::connect(path)
            .await
            .map_err(|e| Error::Agent(format!("connect {}: {e}", path.display())))?;
        let (r, w) = s.into_split();
        Ok(Self {
            conn: Mutex::new(Conn {
                lines: BoundedLines::new(r, MAX_AGENT_LINE),
                writer: w,
                next_id: 1,
            }),
        })
    }

    /// Send `hello` and wait until the agent announces or answers `ready`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<Ready> {
        let fut = async {
            let mut c = self.conn.lock().await;
            let id = c.next_id;
            c.next_id += 1;
            send(&mut c.writer, id, Request::Hello).await?;
            loop {
                let msg = next_message(&mut c.lines).await?;
                if let Body::Ready(r) = msg.body {
                    return Ok(r);
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout {
                what: "the guest agent to report ready".into(),
                after: timeout,
            })?
    }

    /// Send one request and return the reply with its id (skipping unsolicited messages).
    pub async fn request(&self, request: Request, timeout: Duration) -> Result<Body> {
        let what = format!("guest agent reply to {request:?}");
        let fut = async {
            let mut c = self.conn.lock().await;
            let id = c.next_id;
            c.next_id += 1;
            send(&mut c.writer, id, request).await?;
            loop {
                let msg = next_message(&mut c.lines).await?;
                if msg.id == Some(id) {
                    return match msg.body {
                        Body::Error { message } => Err(Error::Agent(message)),
                        b => Ok(b),
                    };
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| Error::Timeout {
                what,
                after: timeout,
            })?
    }

    pub async fn health(&self, timeout: Duration) -> Result<Health> {
        match self.request(Request::Health, timeout).await? {
            Body::Health(h) => Ok(h),
            other => Err(unexpected(other)),
        }
    }

    /// Start a background workload (memory dirtier) or run a timer probe.
    pub async fn run(&self, workload: Workload, timeout: Duration) -> Result<Body> {
        self.request(Request::Run { workload }, timeout).await
    }

    pub async fn timer_probe(
        &self,
        interval_us: u64,
        count: u64,
        timeout: Duration,
    ) -> Result<TimerStats> {
        match self
            .run(Workload::TimerLatency { interval_us, count }, timeout)
            .await?
        {
            Body::TimerResult(t) => Ok(t),
            other => Err(unexpected(other)),
        }
    }

    /// Ask the guest to power off; returns once the agent acknowledged.
    pub async fn shutdown(&self, timeout: Duration) -> Result<()> {
        match self.request(Request::Shutdown, timeout).await? {
            Body::ShuttingDown => Ok(()),
            other => Err(unexpected(other)),
        }
    }
}

fn unexpected(b: Body) -> Error {
    Error::Agent(format!("unexpected reply {b:?}"))
}

async fn send(w: &mut OwnedWriteHalf, id: u64, request: Request) -> Result<()> {
    let line =
        encode_line(&RequestEnvelope { id, request }).map_err(|e| Error::Agent(e.to_string()))?;
    w.write_all(line.as_bytes())
        .await
        .map_err(|e| Error::Agent(format!("send: {e}")))
}

async fn next_message(lines: &mut BoundedLines<OwnedReadHalf>) -> Result<Message> {
    loop {
        let line = lines
            .next_line()
            .await
            .map_err(|e| Error::Agent(format!("read: {e}")))?
            .ok_or_else(|| Error::Agent("connection closed".into()))?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Message>(&line) {
            Ok(m) => return Ok(m),
            Err(e) => tracing::warn!("guest agent: unparsable line {:?}: {e}", shown(&line)),
        }
    }
}
