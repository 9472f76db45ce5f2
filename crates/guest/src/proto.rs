//! Wire protocol of the guest agent: one JSON object per line over a virtio-serial port.
//! Owns the message types and their encoding; must not do I/O.
//!
//! The host sends [`Request`]s wrapped with an id; the agent answers each with a [`Message`]
//! carrying the same id. The agent also sends unsolicited messages without an id (the
//! `ready` announcement when it opens the port).

use serde::{Deserialize, Serialize};

/// Name of the virtio-serial port the agent listens on (`-device virtserialport,name=...`).
pub const AGENT_PORT_NAME: &str = "org.telvirt.agent";
/// Protocol version announced in [`Ready`].
pub const PROTOCOL_VERSION: u32 = 1;
/// Longest a timer latency probe may run, in microseconds (it blocks the agent meanwhile).
pub const MAX_TIMER_PROBE_US: u64 = 60_000_000;

/// A request with the id its reply will carry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

/// What the host can ask the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Answered with [`Body::Ready`].
    Hello,
    /// Answered with [`Body::Health`].
    Health,
    /// Run a workload: dirty memory in the background, or probe timer latency (answered when done).
    Run { workload: Workload },
    /// Stop the background workload, if any.
    StopWorkload,
    /// Power the guest off (answered before the guest goes down).
    Shutdown,
}

/// Workloads the agent can run on command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Workload {
    /// Keep `size_mib` of memory allocated and write one byte per 4 KiB page at `mib_per_s`.
    DirtyMemory { size_mib: u64, mib_per_s: u64 },
    /// Sleep `interval_us` `count` times and measure how late each wake-up is.
    TimerLatency { interval_us: u64, count: u64 },
}

/// A line from the agent: a reply (with the request's id) or an unsolicited event (no id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(flatten)]
    pub body: Body,
}

/// Content of a [`Message`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Body {
    Ready(Ready),
    Health(Health),
    /// A background workload was started.
    Started {
        workload: String,
    },
    /// The background workload was stopped (`None` when none was running).
    Stopped {
        workload: Option<String>,
    },
    TimerResult(TimerStats),
    ShuttingDown,
    Error {
        message: String,
    },
}

/// The agent is up and serving requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ready {
    pub protocol: u32,
    pub agent_version: String,
    pub uptime_ms: u64,
}

/// Health figures read inside the guest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Health {
    pub uptime_ms: u64,
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// Name of the running background workload, if any.
    pub workload: Option<String>,
    /// MiB written by the memory dirtier since it started.
    pub dirtied_mib: u64,
    /// The guest's network interfaces (not loopback) as its kernel counts them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<GuestNic>,
    /// Frames the guest kernel's per-CPU input backlogs dropped (`/proc/net/softnet_stat`).
    #[serde(default)]
    pub backlog_dropped: u64,
    /// Every buffer the guest kernel dropped, by where and why (`None`: an agent older than
    /// this record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel_drops: Option<KernelDrops>,
}

/// How many drop sites a health answer lists at most; the rest are summed.
pub const MAX_DROP_SITES: usize = 16;

/// The buffers the guest kernel freed as dropped since its agent first started, as the
/// `skb:kfree_skb` tracepoint counts them: every drop the kernel records a reason for,
/// including those no interface or queue counter shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelDrops {
    /// Why the drops are not traced (tracefs or the trigger unavailable); `sites` is empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub untraced: Option<String>,
    /// Where and why, most first: at most [`MAX_DROP_SITES`].
    #[serde(default)]
    pub sites: Vec<GuestDrop>,
    /// Drops at the sites beyond those listed.
    #[serde(default)]
    pub elsewhere: u64,
}

/// The buffers one kernel function dropped for one reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestDrop {
    /// The function that freed them (with its module in brackets when not built in).
    pub function: String,
    /// The kernel's drop reason (`NOT_SPECIFIED` where the code gives none).
    pub reason: String,
    pub count: u64,
}

/// One network interface of the guest, from `/sys/class/net/IF/statistics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNic {
    pub name: String,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub rx_dropped: u64,
    pub tx_dropped: u64,
    /// Frames received with an error (length, CRC, frame, FIFO, missed): not delivered.
    #[serde(default)]
    pub rx_errors: u64,
    /// Frames that failed to be sent.
    #[serde(default)]
    pub tx_errors: u64,
    /// Frames its root queue discipline dropped before the device took them (`None`: it has
    /// none, e.g. `noqueue` on a bridge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdisc_dropped: Option<u64>,
    /// Frames its root queue discipline holds now, waiting for the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qdisc_queued: Option<u64>,
}

/// Result of a timer latency probe (wake-up lateness, microseconds).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimerStats {
    pub count: u64,
    pub min_us: u64,
    pub avg_us: u64,
    pub max_us: u64,
}

/// Encode one value as a protocol line (JSON followed by `\n`).
pub fn encode_line<T: Serialize>(value: &T) -> Result<String, serde_json::Error> {
    let mut s = serde_json::to_string(value)?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_roundtrip_and_shape() {
        let req = RequestEnvelope {
            id: 7,
            request: Request::Run {
                workload: Workload::DirtyMemory {
                    size_mib: 64,
                    mib_per_s: 100,
                },
            },
        };
        let line = encode_line(&req).unwrap();
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["op"], "run");
        assert_eq!(v["id"], 7);
        assert_eq!(v["workload"]["kind"], "dirty_memory");
        let back: RequestEnvelope = serde_json::from_str(&line).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn event_has_no_id() {
        let m = Message {
            id: None,
            body: Body::Ready(Ready {
                protocol: PROTOCOL_VERSION,
                agent_version: "x".into(),
                uptime_ms: 1,
            }),
        };
        let line = encode_line(&m).unwrap();
        assert!(!line.contains("\"id\""));
        let back: Message = serde_json::from_str(&line).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn unknown_op_is_rejected() {
        assert!(serde_json::from_str::<RequestEnvelope>(r#"{"id":1,"op":"format_disk"}"#).is_err());
    }
}
