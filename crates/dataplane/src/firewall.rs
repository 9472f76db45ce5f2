//! A plain Rust 5-tuple firewall stage for tests and benchmarks (the production firewall is a
//! wasm VNF). First matching rule wins; non-IPv4 frames (ARP, ...) always pass so that L2
//! neighbours still resolve. Must not hold per-flow state.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::node::{PacketProcessor, Verdict};
use crate::packet::{FiveTuple, five_tuple, proto};
use crate::pool::{Packet, Pool};

/// What a rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Forward the packet.
    Allow,
    /// Drop the packet.
    Deny,
}

/// One rule; `None` fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Allow or deny.
    pub action: Action,
    /// IP protocol.
    pub proto: Option<u8>,
    /// Source prefix (address, length).
    pub src: Option<(Ipv4Addr, u8)>,
    /// Destination prefix.
    pub dst: Option<(Ipv4Addr, u8)>,
    /// Source port range (inclusive).
    pub src_ports: Option<(u16, u16)>,
    /// Destination port range (inclusive).
    pub dst_ports: Option<(u16, u16)>,
}

impl Rule {
    /// Parse `allow|deny [proto=tcp|udp|icmp|N] [src=A.B.C.D/L] [dst=...] [sport=P[-Q]]
    /// [dport=P[-Q]]`.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: String| Error::config("firewall.rule", format!("{s:?}: {why}"));
        let mut words = s.split_whitespace();
        let action = match words.next() {
            Some("allow") => Action::Allow,
            Some("deny") => Action::Deny,
            other => {
                return Err(bad(format!(
                    "starts with {other:?}, expected allow or deny"
                )));
            }
        };
        let mut r = Rule {
            action,
            proto: None,
            src: None,
            dst: None,
            src_ports: None,
            dst_ports: None,
        };
        for w in words {
            let (k, v) = w
                .split_once('=')
                .ok_or_else(|| bad(format!("{w:?} is not KEY=VALUE")))?;
            match k {
                "proto" => {
                    r.proto = Some(match v {
                        "tcp" => proto::TCP,
                        "udp" => proto::UDP,
                        "icmp" => proto::ICMP,
                        n => n.parse().map_err(|_| {
                            bad(format!("proto {n:?}: expected tcp, udp, icmp or 0-255"))
                        })?,
                    })
                }
                "src" | "dst" => {
                    let (a, l) = v.split_once('/').unwrap_or((v, "32"));
                    let addr: Ipv4Addr = a
                        .parse()
                        .map_err(|_| bad(format!("{k} {a:?} is not an IPv4 address")))?;
                    let len: u8 = l
                        .parse()
                        .ok()
                        .filter(|l| *l <= 32)
                        .ok_or_else(|| bad(format!("{k} prefix length {l:?} is not 0-32")))?;
                    if k == "src" {
                        r.src = Some((addr, len));
                    } else {
                        r.dst = Some((addr, len));
                    }
                }
                "sport" | "dport" => {
                    let (a, b) = v.split_once('-').unwrap_or((v, v));
                    let range = a
                        .parse::<u16>()
                        .ok()
                        .zip(b.parse::<u16>().ok())
                        .filter(|(a, b)| a <= b)
                        .ok_or_else(|| bad(format!("{k} {v:?} is not P or P-Q with P <= Q")))?;
                    if k == "sport" {
                        r.src_ports = Some(range);
                    } else {
                        r.dst_ports = Some(range);
                    }
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (valid: proto, src, dst, sport, dport)"
                    )));
                }
            }
        }
        Ok(r)
    }

    /// Does the rule match `t`?
    pub fn matches(&self, t: &FiveTuple) -> bool {
        let prefix = |p: Option<(Ipv4Addr, u8)>, a: Ipv4Addr| {
            p.is_none_or(|(net, len)| {
                let mask = if len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(len))
                };
                u32::from(net) & mask == u32::from(a) & mask
            })
        };
        let range = |r: Option<(u16, u16)>, p: u16| r.is_none_or(|(a, b)| (a..=b).contains(&p));
        self.proto.is_none_or(|p| p == t.proto)
            && prefix(self.src, t.src)
            && prefix(self.dst, t.dst)
            && range(self.src_ports, t.src_port)
            && range(self.dst_ports, t.dst_port)
    }
}

/// Packets allowed and denied so far.
#[derive(Debug, Default)]
pub struct FirewallCounters {
    /// Forwarded.
    pub allowed: AtomicU64,
    /// Dropped by a rule or the default.
    pub denied: AtomicU64,
}

/// Two-port firewall: packets arriving on port 0 leave on port 1 and vice versa, when allowed.
#[derive(Debug)]
pub struct Firewall {
    rules: Vec<Rule>,
    default: Action,
    counters: Arc<FirewallCounters>,
}

impl Firewall {
    /// A firewall with `rules` (first match wins) and `default` for IPv4 packets no rule
    /// matches.
    pub fn new(rules: Vec<Rule>, default: Action) -> Self {
        Firewall {
            rules,
            default,
            counters: Arc::new(FirewallCounters::default()),
        }
    }

    /// Shared counters (readable while the firewall runs on a worker).
    pub fn counters(&self) -> Arc<FirewallCounters> {
        Arc::clone(&self.counters)
    }

    /// The action for one frame.
    pub fn decide(&self, frame: &[u8]) -> Action {
        match five_tuple(frame) {
            None => Action::Allow,
            Some(t) => self
                .rules
                .iter()
                .find(|r| r.matches(&t))
                .map_or(self.default, |r| r.action),
        }
    }
}

impl PacketProcessor for Firewall {
    fn process(
        &mut self,
        input: usize,
        pool: &Pool,
        pkts: &mut [Packet],
        verdicts: &mut Vec<Verdict>,
    ) {
        let out = if input == 0 { 1 } else { 0 };
        let (mut allowed, mut denied) = (0u64, 0u64);
        for p in pkts.iter() {
            match self.decide(pool.data(p)) {
                Action::Allow => {
                    allowed += 1;
                    verdicts.push(Verdict::Forward(out));
                }
                Action::Deny => {
                    denied += 1;
                    verdicts.push(Verdict::Drop);
                }
            }
        }
        self.counters.allowed.fetch_add(allowed, Ordering::Relaxed);
        self.counters.denied.fetch_add(denied, Ordering::Relaxed);
    }

    fn next_output(&mut self, input: usize) -> Option<u16> {
        Some(if input == 0 { 1 } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::write_test_frame;

    #[test]
    fn parse_and_match() {
        let r = Rule::parse("deny proto=udp src=10.0.0.0/8 dport=9").unwrap();
        let mut buf = [0u8; 64];
        write_test_frame(&mut buf, 64, 0, 0, 0);
        let t = five_tuple(&buf).unwrap();
        assert!(r.matches(&t));
        assert!(!Rule::parse("deny dport=10-20").unwrap().matches(&t));
        assert!(!Rule::parse("deny src=11.0.0.0/8").unwrap().matches(&t));
        assert!(Rule::parse("allow src=0.0.0.0/0").unwrap().matches(&t));
        let fw = Firewall::new(vec![r], Action::Allow);
        assert_eq!(fw.decide(&buf), Action::Deny);
        let fw = Firewall::new(vec![], Action::Deny);
        assert_eq!(fw.decide(&buf), Action::Deny);
        assert_eq!(
            fw.decide(&[0u8; 60]),
            Action::Allow,
            "non-IPv4 always passes"
        );
    }

    #[test]
    fn parse_errors_are_precise() {
        for (s, want) in [
            ("permit", "expected allow or deny"),
            ("deny proto=xyz", "proto \"xyz\""),
            ("deny src=1.2.3/8", "not an IPv4 address"),
            ("deny dst=1.2.3.4/33", "prefix length"),
            ("deny dport=9-1", "P <= Q"),
            ("deny color=red", "unknown key \"color\""),
            ("deny tcp", "not KEY=VALUE"),
        ] {
            let e = Rule::parse(s).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("firewall.rule"), "{s}: {e}");
        }
    }
}
