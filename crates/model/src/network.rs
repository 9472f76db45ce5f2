//! The network descriptor, v1 (`apiVersion: telvirt/v1`, `kind: Network`): which VNF ports,
//! host interfaces and built-in traffic nodes are linked on a node's data plane.
//!
//! Owns the descriptor's shape (strict: unknown fields are errors) and the rules that need no
//! other facts (link syntax, a port used once per direction, built-in node names and ports).
//! It must not look at VNFs, hosts or the store: whether `fw1` has a port `in` is checked by the
//! controller, which knows the VNFs.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::error::{FieldError, ModelError};
use crate::name::Name;
use crate::parse::{Format, from_text};
use crate::vnf::{ApiVersion, Metadata};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum NetworkKind {
    Network,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkDescriptor {
    #[serde(rename = "apiVersion")]
    pub api_version: ApiVersion,
    pub kind: NetworkKind,
    pub metadata: Metadata,
    pub spec: NetworkSpec,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Built-in nodes this network adds to the data plane (traffic generator, latency sink).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<BuiltinNode>,
    /// Links `node.port -> node.port`; `host:IFNAME` names a host interface.
    pub links: Vec<String>,
}

/// What a built-in node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum BuiltinKind {
    /// Sends UDP test frames (sequence number and timestamp inside) out of port `out`.
    Generator,
    /// Receives on port `in` and records latency, loss and reordering.
    Sink,
}

impl BuiltinKind {
    /// The node's only port.
    pub fn port(self) -> &'static str {
        match self {
            BuiltinKind::Generator => "out",
            BuiltinKind::Sink => "in",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BuiltinNode {
    pub name: Name,
    pub kind: BuiltinKind,
    /// Generator: packets per second (default 10000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_pps: Option<u64>,
    /// Generator: frame size in bytes (default 64).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u32>,
    /// Generator: number of UDP flows (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<u32>,
}

/// One end of a link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Endpoint {
    /// `node.port`: a VNF's or a built-in node's port.
    Port { node: String, port: String },
    /// `host:IFNAME`.
    Host(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Port { node, port } => write!(f, "{node}.{port}"),
            Endpoint::Host(i) => write!(f, "host:{i}"),
        }
    }
}

/// A parsed link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub from: Endpoint,
    pub to: Endpoint,
}

fn endpoint(s: &str) -> Result<Endpoint, String> {
    let s = s.trim();
    if let Some(ifname) = s.strip_prefix("host:") {
        if ifname.is_empty() || ifname.len() > 15 || ifname.contains(['/', ' ', '.']) {
            return Err(format!(
                "`{s}`: a host interface name has 1 to 15 characters without '/', '.' or ' '"
            ));
        }
        return Ok(Endpoint::Host(ifname.to_owned()));
    }
    let Some((node, port)) = s.split_once('.') else {
        return Err(format!("`{s}` must be `node.port` or `host:IFNAME`"));
    };
    node.parse::<Name>()
        .map_err(|e| format!("`{s}`: node: {e}"))?;
    port.parse::<Name>()
        .map_err(|e| format!("`{s}`: port: {e}"))?;
    Ok(Endpoint::Port {
        node: node.to_owned(),
        port: port.to_owned(),
    })
}

/// Parses `A -> B`.
pub fn parse_link(s: &str) -> Result<Link, String> {
    let Some((a, b)) = s.split_once("->") else {
        return Err(format!(
            "`{s}` must be `from -> to`, e.g. `fw1.out -> nat1.in`"
        ));
    };
    Ok(Link {
        from: endpoint(a)?,
        to: endpoint(b)?,
    })
}

impl NetworkDescriptor {
    pub fn name(&self) -> &Name {
        &self.metadata.name
    }

    /// The links, parsed (valid descriptors only: [`parse_network`] checked them).
    pub fn parsed_links(&self) -> Vec<(usize, Link)> {
        self.spec
            .links
            .iter()
            .enumerate()
            .filter_map(|(i, l)| parse_link(l).ok().map(|l| (i, l)))
            .collect()
    }

    /// The built-in node named `name`.
    pub fn builtin(&self, name: &str) -> Option<&BuiltinNode> {
        self.spec.nodes.iter().find(|n| n.name.as_str() == name)
    }

    /// Every rule that needs no other facts, each with its field path.
    pub fn violations(&self) -> Vec<FieldError> {
        let mut out = Vec::new();
        let mut builtins: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, n) in self.spec.nodes.iter().enumerate() {
            if let Some(j) = builtins.insert(n.name.as_str(), i) {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].name"),
                    format!("`{}` is already the name of spec.nodes[{j}]", n.name),
                ));
            }
            let generator_only = [
                ("rate_pps", n.rate_pps.is_some()),
                ("size", n.size.is_some()),
                ("flows", n.flows.is_some()),
            ];
            if n.kind == BuiltinKind::Sink {
                for (field, set) in generator_only {
                    if set {
                        out.push(FieldError::new(
                            format!("spec.nodes[{i}].{field}"),
                            "only a generator takes this field",
                        ));
                    }
                }
            }
            if n.rate_pps == Some(0) {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].rate_pps"),
                    "must be at least 1 packet per second",
                ));
            }
            if let Some(size) = n.size
                && !(60..=1514).contains(&size)
            {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].size"),
                    format!("{size} is not a frame size in 60..=1514"),
                ));
            }
            if n.flows == Some(0) {
                out.push(FieldError::new(
                    format!("spec.nodes[{i}].flows"),
                    "must be at least 1",
                ));
            }
        }
        if self.spec.links.is_empty() {
            out.push(FieldError::new(
                "spec.links",
                "a network needs at least one link",
            ));
        }
        let mut sources: BTreeMap<Endpoint, usize> = BTreeMap::new();
        let mut targets: BTreeMap<Endpoint, usize> = BTreeMap::new();
        for (i, text) in self.spec.links.iter().enumerate() {
            let link = match parse_link(text) {
                Ok(l) => l,
                Err(e) => {
                    out.push(FieldError::new(format!("spec.links[{i}]"), e));
                    continue;
                }
            };
            for (end, ep, seen) in [
                ("from", &link.from, &mut sources),
                ("to", &link.to, &mut targets),
            ] {
                let path = format!("spec.links[{i}].{end}");
                if let Endpoint::Port { node, port } = ep
                    && let Some(b) = self.builtin(node)
                    && port != b.kind.port()
                {
                    out.push(FieldError::new(
                        &path,
                        format!(
                            "built-in node {node} ({:?}) has the single port `{}`",
                            b.kind,
                            b.kind.port()
                        ),
                    ));
                }
                if let Some(j) = seen.insert(ep.clone(), i) {
                    out.push(FieldError::new(
                        &path,
                        format!(
                            "port {ep} is already linked {} by spec.links[{j}]; a port sends \
                             on at most one link and receives from at most one",
                            if end == "from" { "out" } else { "in" }
                        ),
                    ));
                }
            }
            if link.from == link.to {
                out.push(FieldError::new(
                    format!("spec.links[{i}]"),
                    "a port cannot be linked to itself",
                ));
            }
        }
        out
    }
}

/// A stored network as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Network {
    pub name: Name,
    /// The authority that owns it.
    pub owner: Name,
    pub descriptor: NetworkDescriptor,
    pub created_at: String,
    /// What the node's data plane holds now (filled by `GET /v1/networks/{name}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<NetworkStatus>,
}

/// The live state of a network on the node's data plane.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkStatus {
    /// One entry per descriptor link, in descriptor order.
    pub links: Vec<LinkState>,
    /// The `net show` table: links in chain order with their counters.
    pub table: String,
    /// Why links are not live, if any are not.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub waiting: Vec<String>,
}

/// One link with its counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct LinkState {
    pub link: String,
    /// Wired on the data plane now (false while an end is not running).
    pub active: bool,
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped because the link's ring was full.
    pub drops: u64,
}

/// Parses and validates a network descriptor; every violation is reported with its path.
pub fn parse_network(text: &[u8], format: Format) -> Result<NetworkDescriptor, ModelError> {
    let descriptor: NetworkDescriptor = from_text(text, format)?;
    let violations = descriptor.violations();
    if violations.is_empty() {
        Ok(descriptor)
    } else {
        Err(ModelError::Invalid(violations))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAIN: &str = r#"
apiVersion: telvirt/v1
kind: Network
metadata: { name: chain1 }
spec:
  nodes:
    - { name: gen, kind: generator, rate_pps: 1000 }
    - { name: sink, kind: sink }
  links:
    - gen.out -> fw1.in
    - fw1.out -> host:veth1
"#;

    fn refused(text: &str) -> FieldError {
        let err = parse_network(text.as_bytes(), Format::Yaml).expect_err("must be refused");
        let fields = err.fields();
        assert_eq!(fields.len(), 1, "expected one error, got {fields:?}");
        fields[0].clone()
    }

    fn edit(from: &str, to: &str) -> String {
        assert!(CHAIN.contains(from), "test edit target missing: {from}");
        CHAIN.replacen(from, to, 1)
    }

    #[test]
    fn chain_parses() {
        let n = parse_network(CHAIN.as_bytes(), Format::Yaml).unwrap();
        assert_eq!(n.name().as_str(), "chain1");
        let links = n.parsed_links();
        assert_eq!(links.len(), 2);
        assert_eq!(links[1].1.to, Endpoint::Host("veth1".into()));
        assert_eq!(links[0].1.from.to_string(), "gen.out");
    }

    #[test]
    fn unknown_field_is_refused_with_its_path() {
        let e = refused(&edit("links:", "colour: red\n  links:"));
        assert_eq!(e.path, "spec.colour");
        assert!(e.reason.contains("unknown field `colour`"), "{e}");
    }

    #[test]
    fn bad_link_syntax_is_refused() {
        let e = refused(&edit("gen.out -> fw1.in", "gen.out => fw1.in"));
        assert_eq!(e.path, "spec.links[0]");
        assert!(e.reason.contains("from -> to"), "{e}");
        let e = refused(&edit("gen.out -> fw1.in", "gen.out -> fw1"));
        assert_eq!(e.path, "spec.links[0]");
        assert!(e.reason.contains("node.port"), "{e}");
    }

    #[test]
    fn port_linked_twice_is_refused() {
        let e = refused(&edit(
            "fw1.out -> host:veth1",
            "fw1.out -> host:veth1\n    - fw1.out -> sink.in",
        ));
        assert_eq!(e.path, "spec.links[2].from");
        assert!(
            e.reason.contains("already linked out by spec.links[1]"),
            "{e}"
        );
    }

    #[test]
    fn builtin_node_has_one_port() {
        let e = refused(&edit("gen.out -> fw1.in", "gen.tx -> fw1.in"));
        assert_eq!(e.path, "spec.links[0].from");
        assert!(e.reason.contains("single port `out`"), "{e}");
    }

    #[test]
    fn generator_fields_are_checked() {
        let e = refused(&edit("rate_pps: 1000", "rate_pps: 0"));
        assert_eq!(e.path, "spec.nodes[0].rate_pps");
        let e = refused(&edit("kind: sink", "kind: sink, size: 64"));
        assert_eq!(e.path, "spec.nodes[1].size");
    }

    #[test]
    fn duplicate_builtin_is_refused() {
        let e = refused(&edit("name: sink", "name: gen"));
        assert_eq!(e.path, "spec.nodes[1].name");
    }

    #[test]
    fn no_links_is_refused() {
        let e = refused(
            "apiVersion: telvirt/v1\nkind: Network\nmetadata: { name: n }\nspec: { links: [] }\n",
        );
        assert_eq!(e.path, "spec.links");
    }
}
