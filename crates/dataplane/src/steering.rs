//! Steering: a logical endpoint (`fw`) maps to the one instance (`fw1`) that receives its
//! traffic, and switching it is a single atomic store (ADR 021).
//!
//! Owns the endpoint table and the [`SteeringNode`] that applies it to packets; must not decide
//! *when* to switch (failover and migration in the agent do).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{Error, Result};
use crate::node::{PacketProcessor, Verdict};
use crate::pool::{Packet, Pool};

/// Where an endpoint points at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Target {
    /// Index into the endpoint's instance list.
    pub index: u32,
    /// Incremented by every switch; lets an observer order switches.
    pub generation: u32,
}

impl Target {
    fn pack(self) -> u64 {
        (u64::from(self.generation) << 32) | u64::from(self.index)
    }
    fn unpack(v: u64) -> Self {
        Target {
            index: v as u32,
            generation: (v >> 32) as u32,
        }
    }
}

/// One logical endpoint and the instances it may point at.
#[derive(Debug)]
pub struct Endpoint {
    name: String,
    instances: Vec<String>,
    state: AtomicU64,
}

impl Endpoint {
    /// Endpoint `name` that can point at `instances`, initially at `initial`.
    pub fn new(name: &str, instances: &[&str], initial: &str) -> Result<Arc<Self>> {
        if name.is_empty() {
            return Err(Error::Steering("endpoint name must not be empty".into()));
        }
        if instances.is_empty() {
            return Err(Error::Steering(format!(
                "endpoint {name:?} needs at least one instance"
            )));
        }
        for (i, a) in instances.iter().enumerate() {
            if instances[..i].contains(a) {
                return Err(Error::Steering(format!(
                    "endpoint {name:?}: instance {a:?} listed twice"
                )));
            }
        }
        let index = position(name, instances.iter().copied(), initial)?;
        Ok(Arc::new(Endpoint {
            name: name.to_string(),
            instances: instances.iter().map(|s| s.to_string()).collect(),
            state: AtomicU64::new(
                Target {
                    index,
                    generation: 0,
                }
                .pack(),
            ),
        }))
    }

    /// Point the endpoint at `instance` in one atomic step: every packet the
    /// [`SteeringNode`] handles after this returns goes to `instance`, every packet of a batch
    /// that started before goes to the old one, and none goes to both or neither.
    pub fn switch(&self, instance: &str) -> Result<Switched> {
        let index = position(
            &self.name,
            self.instances.iter().map(String::as_str),
            instance,
        )?;
        let prev = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
                let old = Target::unpack(v);
                Some(
                    Target {
                        index,
                        generation: old.generation.wrapping_add(1),
                    }
                    .pack(),
                )
            })
            .unwrap_or_else(|v| v);
        let old = Target::unpack(prev);
        Ok(Switched {
            from: self.instances[old.index as usize].clone(),
            to: instance.to_string(),
            generation: old.generation.wrapping_add(1),
        })
    }

    /// The endpoint's current target (one Acquire load).
    pub fn current(&self) -> Target {
        Target::unpack(self.state.load(Ordering::Acquire))
    }

    /// Name of the instance currently receiving traffic.
    pub fn current_instance(&self) -> &str {
        &self.instances[self.current().index as usize]
    }

    /// The instances, in port order (output port k of the [`SteeringNode`] is instance k).
    pub fn instances(&self) -> &[String] {
        &self.instances
    }

    /// Endpoint name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// Result of a switch.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Switched {
    /// Instance before the switch.
    pub from: String,
    /// Instance after the switch.
    pub to: String,
    /// Generation after the switch.
    pub generation: u32,
}

/// All endpoints of a host.
#[derive(Debug, Default)]
pub struct SteeringTable {
    endpoints: BTreeMap<String, Arc<Endpoint>>,
}

impl SteeringTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Add endpoint `name` that can point at `instances`, initially at `initial`.
    pub fn add_endpoint(
        &mut self,
        name: &str,
        instances: &[&str],
        initial: &str,
    ) -> Result<Arc<Endpoint>> {
        if self.endpoints.contains_key(name) {
            return Err(Error::Steering(format!("endpoint {name:?} already exists")));
        }
        let ep = Endpoint::new(name, instances, initial)?;
        self.endpoints.insert(name.to_string(), Arc::clone(&ep));
        Ok(ep)
    }

    /// The endpoint called `name`.
    pub fn endpoint(&self, name: &str) -> Result<Arc<Endpoint>> {
        self.endpoints.get(name).cloned().ok_or_else(|| {
            Error::Steering(format!(
                "unknown endpoint {name:?} (known: {})",
                self.endpoints
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })
    }

    /// Point `endpoint` at `instance` in one atomic step (see [`Endpoint::switch`]).
    pub fn switch(&self, endpoint: &str, instance: &str) -> Result<Switched> {
        self.endpoint(endpoint)?.switch(instance)
    }

    /// Removes endpoint `name` (its [`SteeringNode`] keeps the last target it read).
    pub fn remove_endpoint(&mut self, name: &str) -> Option<Arc<Endpoint>> {
        self.endpoints.remove(name)
    }

    /// Every endpoint and its current instance.
    pub fn snapshot(&self) -> Vec<(String, String)> {
        self.endpoints
            .values()
            .map(|e| (e.name.clone(), e.current_instance().to_string()))
            .collect()
    }
}

fn position<'a>(
    endpoint: &str,
    mut instances: impl Iterator<Item = &'a str> + Clone,
    wanted: &str,
) -> Result<u32> {
    let all = instances.clone().collect::<Vec<_>>().join(", ");
    instances
        .position(|i| i == wanted)
        .map(|i| u32::try_from(i).expect("instance count fits u32"))
        .ok_or_else(|| {
            Error::Steering(format!(
                "endpoint {endpoint:?} has no instance {wanted:?} (valid: {all})"
            ))
        })
}

/// The packet stage of an endpoint. It stands in the graph where one VNF would: for each port
/// name `p` it mirrors, traffic arriving on the endpoint's port `p` leaves on `INSTANCE/p` of the
/// instance the endpoint points at (wired to that instance's port `p`), and traffic coming back
/// from any instance on `INSTANCE/p` leaves on the endpoint's port `p`. The target is read once
/// per batch, so a whole batch goes to exactly one instance; packets still inside the old
/// instance come out on the endpoint's port after a switch (nothing is lost by switching).
#[derive(Debug)]
pub struct SteeringNode {
    endpoint: Arc<Endpoint>,
    /// The mirrored port names (the endpoint's own ports, indices `0..n`).
    ports: Vec<String>,
    /// Port chosen by `next_output` for the batch about to be processed.
    chosen: Option<u16>,
}

impl SteeringNode {
    /// A stage for `endpoint` mirroring the instance ports `ports` (e.g. `["in", "out"]`).
    pub fn new(endpoint: Arc<Endpoint>, ports: &[&str]) -> Result<Self> {
        if ports.is_empty() {
            return Err(Error::Steering(format!(
                "endpoint {:?} needs at least one port to mirror",
                endpoint.name
            )));
        }
        for (i, p) in ports.iter().enumerate() {
            if p.is_empty() || p.contains('/') || ports[..i].contains(p) {
                return Err(Error::Steering(format!(
                    "endpoint {:?}: port {p:?} is empty, contains '/' or is listed twice",
                    endpoint.name
                )));
            }
        }
        let total = ports.len() * (1 + endpoint.instances.len());
        if u16::try_from(total).is_err() {
            return Err(Error::Steering(format!(
                "endpoint {:?}: {total} ports exceed the node limit",
                endpoint.name
            )));
        }
        Ok(SteeringNode {
            endpoint,
            ports: ports.iter().map(|p| p.to_string()).collect(),
            chosen: None,
        })
    }

    /// Name of the internal port that carries mirrored port `port` to and from `instance`.
    pub fn instance_port(instance: &str, port: &str) -> String {
        format!("{instance}/{port}")
    }

    /// Port names for the patch panel: the mirrored ports, then `INSTANCE/PORT` for every
    /// instance in order.
    pub fn port_names(&self) -> Vec<String> {
        let inner = self
            .endpoint
            .instances
            .iter()
            .flat_map(|i| self.ports.iter().map(|p| Self::instance_port(i, p)));
        self.ports.iter().cloned().chain(inner).collect()
    }

    /// Output port of a batch that arrived on `input`, with the target read now.
    fn output_for(&self, input: usize) -> u16 {
        let n = self.ports.len();
        let port = if input < n {
            n * (1 + self.endpoint.current().index as usize) + input
        } else {
            (input - n) % n
        };
        // `new` checked that every port index fits u16.
        u16::try_from(port).unwrap_or(u16::MAX)
    }
}

impl PacketProcessor for SteeringNode {
    fn process(
        &mut self,
        input: usize,
        _pool: &Pool,
        pkts: &mut [Packet],
        verdicts: &mut Vec<Verdict>,
    ) {
        // One load per batch (or the one `next_output` made): the whole batch goes to a single
        // instance, whatever switches happen meanwhile.
        let port = self.chosen.take().unwrap_or_else(|| self.output_for(input));
        verdicts.extend(pkts.iter().map(|_| Verdict::Forward(port)));
    }

    fn next_output(&mut self, input: usize) -> Option<u16> {
        let port = self.output_for(input);
        self.chosen = Some(port);
        Some(port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_changes_target_and_generation() {
        let mut t = SteeringTable::new();
        let ep = t.add_endpoint("fw", &["fw1", "fw2"], "fw1").unwrap();
        assert_eq!(ep.current_instance(), "fw1");
        let s = t.switch("fw", "fw2").unwrap();
        assert_eq!(
            (s.from.as_str(), s.to.as_str(), s.generation),
            ("fw1", "fw2", 1)
        );
        assert_eq!(ep.current_instance(), "fw2");
        assert_eq!(t.snapshot(), vec![("fw".to_string(), "fw2".to_string())]);
    }

    #[test]
    fn bad_requests_are_precise_and_change_nothing() {
        let mut t = SteeringTable::new();
        t.add_endpoint("fw", &["fw1", "fw2"], "fw1").unwrap();
        let e = t.switch("fw", "fw9").unwrap_err().to_string();
        assert!(e.contains("fw9") && e.contains("fw1, fw2"), "{e}");
        let e = t.switch("nat", "x").unwrap_err().to_string();
        assert!(
            e.contains("unknown endpoint \"nat\"") && e.contains("fw"),
            "{e}"
        );
        assert!(t.add_endpoint("fw", &["a"], "a").is_err());
        assert!(t.add_endpoint("n", &[], "a").is_err());
        assert!(t.add_endpoint("n", &["a", "a"], "a").is_err());
        assert!(t.add_endpoint("n", &["a"], "b").is_err());
        assert_eq!(t.endpoint("fw").unwrap().current().generation, 0);
        assert_eq!(t.snapshot().len(), 1);
    }
}
