//! The link graph of a network service: which port feeds which. Pure data: parsing,
//! validation with precise errors, and the plain-text rendering `telvirt net show` prints.
//!
//! Owns the rules a graph must satisfy; must not touch rings or threads (the
//! [`crate::panel`] applies a validated graph).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::{Error, Result};
use crate::node::CounterSnapshot;

/// Prefix of host ports (`host:veth1`).
pub const HOST_PREFIX: &str = "host:";

/// One end of a link: `node.port`, or `host:IFNAME` for a host interface (whose single port
/// has the empty name).
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct PortRef {
    /// Node (VNF instance, endpoint, generator, `host:IFNAME`).
    pub node: String,
    /// Port of the node (empty for host ports).
    pub port: String,
}

impl PortRef {
    /// `node.port`.
    pub fn new(node: &str, port: &str) -> Self {
        PortRef {
            node: node.to_string(),
            port: port.to_string(),
        }
    }

    /// `host:IFNAME`.
    pub fn host(ifname: &str) -> Self {
        PortRef::new(&format!("{HOST_PREFIX}{ifname}"), "")
    }

    /// Parse `node.port` or `host:IFNAME`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(ifname) = s.strip_prefix(HOST_PREFIX) {
            if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '.']) {
                return Err(Error::Graph(format!(
                    "{s:?}: host interface name must be 1-15 characters without '/', ' ' or '.'"
                )));
            }
            return Ok(PortRef::host(ifname));
        }
        match s.split_once('.') {
            Some((n, p)) if !n.is_empty() && !p.is_empty() => Ok(PortRef::new(n, p)),
            _ => Err(Error::Graph(format!(
                "{s:?}: a port is written NODE.PORT (e.g. fw1.in) or host:IFNAME"
            ))),
        }
    }

    /// True for `host:IFNAME` ports.
    pub fn is_host(&self) -> bool {
        self.node.starts_with(HOST_PREFIX)
    }
}

impl fmt::Display for PortRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.port.is_empty() {
            write!(f, "{}", self.node)
        } else {
            write!(f, "{}.{}", self.node, self.port)
        }
    }
}

/// A directed link: packets sent out of `from` arrive on `to`.
#[derive(
    Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct LinkSpec {
    /// Sending port.
    pub from: PortRef,
    /// Receiving port.
    pub to: PortRef,
}

impl LinkSpec {
    /// A link from `from` to `to`.
    pub fn new(from: PortRef, to: PortRef) -> Self {
        LinkSpec { from, to }
    }

    /// Parse `FROM -> TO` (`→` is accepted too).
    pub fn parse(s: &str) -> Result<Self> {
        let (a, b) = s
            .split_once("->")
            .or_else(|| s.split_once('→'))
            .ok_or_else(|| Error::Graph(format!("{s:?}: a link is written FROM -> TO")))?;
        Ok(LinkSpec::new(PortRef::parse(a)?, PortRef::parse(b)?))
    }
}

impl fmt::Display for LinkSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.from, self.to)
    }
}

/// Check `links` against the known `nodes` (node name → port names). Rules: both ends exist;
/// no port sends on two links nor receives from two links; a link never connects a node to
/// itself (a loop with no VNF in between); no link is listed twice. Cycles through several
/// nodes are allowed (bidirectional chains need them). Every error names the link (1-based
/// position and text) and what would be valid.
pub fn validate(nodes: &BTreeMap<String, Vec<String>>, links: &[LinkSpec]) -> Result<()> {
    let mut senders: BTreeMap<&PortRef, usize> = BTreeMap::new();
    let mut receivers: BTreeMap<&PortRef, usize> = BTreeMap::new();
    let mut seen: BTreeSet<&LinkSpec> = BTreeSet::new();
    for (i, l) in links.iter().enumerate() {
        let n = i + 1;
        for end in [&l.from, &l.to] {
            check_port(nodes, end).map_err(|why| Error::Graph(format!("link {n} ({l}): {why}")))?;
        }
        if !seen.insert(l) {
            return Err(Error::Graph(format!("link {n} ({l}) is listed twice")));
        }
        if l.from.node == l.to.node {
            return Err(Error::Graph(format!(
                "link {n} ({l}) connects {} to itself; packets would loop without passing \
                 another node",
                l.from.node
            )));
        }
        if let Some(prev) = senders.insert(&l.from, n) {
            return Err(Error::Graph(format!(
                "link {n} ({l}): port {} already sends on link {prev}; a port sends on at most \
                 one link (use a steering endpoint to choose between instances)",
                l.from
            )));
        }
        if let Some(prev) = receivers.insert(&l.to, n) {
            return Err(Error::Graph(format!(
                "link {n} ({l}): port {} already receives from link {prev}; a port receives \
                 from at most one link",
                l.to
            )));
        }
    }
    Ok(())
}

fn check_port(
    nodes: &BTreeMap<String, Vec<String>>,
    p: &PortRef,
) -> std::result::Result<(), String> {
    let Some(ports) = nodes.get(&p.node) else {
        let known = nodes.keys().cloned().collect::<Vec<_>>().join(", ");
        return Err(format!("unknown node {:?} (known: {known})", p.node));
    };
    if !ports.contains(&p.port) {
        return Err(format!(
            "node {} has no port {:?} (ports: {})",
            p.node,
            p.port,
            ports.join(", ")
        ));
    }
    Ok(())
}

/// A link with its counters, for display.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LinkStatus {
    /// The link.
    pub link: LinkSpec,
    /// Its counters.
    pub counters: CounterSnapshot,
}

/// Render links as a text table in chain order (links leaving nodes that nothing feeds come
/// first, then what they feed), for `telvirt net show`.
pub fn render(links: &[LinkStatus]) -> String {
    let ordered = chain_order(links);
    let rows: Vec<[String; 4]> = ordered
        .iter()
        .map(|l| {
            [
                l.link.to_string(),
                l.counters.packets.to_string(),
                l.counters.bytes.to_string(),
                l.counters.drops.to_string(),
            ]
        })
        .collect();
    let header = ["LINK", "PACKETS", "BYTES", "DROPS"];
    let mut w = header.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let mut out = String::new();
    let line = |cells: [&str; 4], out: &mut String| {
        out.push_str(&format!(
            "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}\n",
            cells[0],
            cells[1],
            cells[2],
            cells[3],
            w0 = w[0],
            w1 = w[1],
            w2 = w[2],
            w3 = w[3]
        ));
    };
    line(header, &mut out);
    for r in &rows {
        line([&r[0], &r[1], &r[2], &r[3]], &mut out);
    }
    if rows.is_empty() {
        out.push_str("(no links)\n");
    }
    out
}

fn chain_order(links: &[LinkStatus]) -> Vec<&LinkStatus> {
    let fed: BTreeSet<&str> = links.iter().map(|l| l.link.to.node.as_str()).collect();
    let mut sorted: Vec<&LinkStatus> = links.iter().collect();
    sorted.sort_by(|a, b| a.link.cmp(&b.link));
    let mut out: Vec<&LinkStatus> = Vec::with_capacity(links.len());
    let mut done = vec![false; sorted.len()];
    let mut queue: Vec<&str> = Vec::new();
    for l in &sorted {
        if !fed.contains(l.link.from.node.as_str()) && !queue.contains(&l.link.from.node.as_str()) {
            queue.push(&l.link.from.node);
        }
    }
    let mut qi = 0;
    loop {
        while qi < queue.len() {
            let node = queue[qi];
            qi += 1;
            for (i, l) in sorted.iter().enumerate() {
                if !done[i] && l.link.from.node == node {
                    done[i] = true;
                    out.push(l);
                    if !queue.contains(&l.link.to.node.as_str()) {
                        queue.push(&l.link.to.node);
                    }
                }
            }
        }
        // Cycles with no entry point: start from the first remaining link.
        match done.iter().position(|d| !d) {
            Some(i) => queue.push(&sorted[i].link.from.node),
            None => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes() -> BTreeMap<String, Vec<String>> {
        let mut m = BTreeMap::new();
        m.insert("gen".into(), vec!["out".into()]);
        m.insert("fw1".into(), vec!["in".into(), "out".into()]);
        m.insert("nat1".into(), vec!["in".into(), "out".into()]);
        m.insert("host:veth1".into(), vec!["".into()]);
        m
    }

    fn links(specs: &[&str]) -> Vec<LinkSpec> {
        specs.iter().map(|s| LinkSpec::parse(s).unwrap()).collect()
    }

    #[test]
    fn parse_and_display_round_trip() {
        let l = LinkSpec::parse("gen.out → fw1.in").unwrap();
        assert_eq!(l.to_string(), "gen.out -> fw1.in");
        let h = LinkSpec::parse("nat1.out -> host:veth1").unwrap();
        assert!(h.to.is_host());
        assert_eq!(h.to.to_string(), "host:veth1");
        for bad in [
            "gen.out fw1.in",
            "gen -> fw1.in",
            "gen.out -> host:",
            "a. -> b.c",
        ] {
            assert!(LinkSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn valid_chain_passes() {
        let l = links(&[
            "gen.out -> fw1.in",
            "fw1.out -> nat1.in",
            "nat1.out -> host:veth1",
        ]);
        validate(&nodes(), &l).unwrap();
    }

    #[test]
    fn errors_are_precise() {
        let cases: &[(&[&str], &str)] = &[
            (
                &["gen.out -> fw9.in"],
                "link 1 (gen.out -> fw9.in): unknown node \"fw9\"",
            ),
            (
                &["gen.out -> fw1.x"],
                "node fw1 has no port \"x\" (ports: in, out)",
            ),
            (
                &["gen.out -> fw1.in", "gen.out -> nat1.in"],
                "port gen.out already sends on link 1",
            ),
            (
                &["gen.out -> fw1.in", "nat1.out -> fw1.in"],
                "port fw1.in already receives from link 1",
            ),
            (&["fw1.out -> fw1.in"], "connects fw1 to itself"),
            (
                &["gen.out -> fw1.in", "gen.out -> fw1.in"],
                "link 2 (gen.out -> fw1.in) is listed twice",
            ),
        ];
        for (spec, want) in cases {
            let e = validate(&nodes(), &links(spec)).unwrap_err().to_string();
            assert!(e.contains(want), "{spec:?}: got {e}");
        }
    }

    #[test]
    fn bidirectional_cycle_is_allowed() {
        let l = links(&[
            "fw1.out -> nat1.in",
            "nat1.out -> fw1.in",
            "host:veth1 -> gen.out",
        ]);
        // gen.out is a sending port used as a receiver here: it exists, so this is allowed too.
        validate(&nodes(), &l).unwrap();
    }

    #[test]
    fn render_lists_chain_in_order_with_counters() {
        let l = links(&[
            "nat1.out -> host:veth1",
            "fw1.out -> nat1.in",
            "gen.out -> fw1.in",
        ]);
        let st: Vec<LinkStatus> = l
            .into_iter()
            .enumerate()
            .map(|(i, link)| LinkStatus {
                link,
                counters: CounterSnapshot {
                    packets: 10 * i as u64,
                    bytes: 640 * i as u64,
                    drops: i as u64,
                    since_unix_ms: 0,
                },
            })
            .collect();
        let text = render(&st);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("LINK"));
        assert!(lines[1].starts_with("gen.out -> fw1.in"), "{text}");
        let cells: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(
            cells,
            ["gen.out", "->", "fw1.in", "20", "1280", "2"],
            "{text}"
        );
        assert!(lines[2].starts_with("fw1.out -> nat1.in"), "{text}");
        assert!(lines[3].starts_with("nat1.out -> host:veth1"), "{text}");
        assert_eq!(render(&[]).lines().nth(1), Some("(no links)"));
    }
}
