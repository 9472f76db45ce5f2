//! A check of what the store holds against the invariants the controller keeps: every
//! allocation belongs to a VNF that exists and is placed where the allocation says, every placed
//! VNF has its allocation, and the allocations, replayed into an empty scheduler over the stored
//! hosts, fit together (no CPU held by two VNFs, no shared core over its capacity).
//!
//! Owns reading the records and describing what is wrong. It must not repair anything: it is
//! read-only, for chaos tests, benchmarks and an operator who wants to know.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use telvirt_sched::{Allocation, CpuPolicy, SchedConfig};
use telvirt_store::Store;

use crate::placement;
use crate::records::{self, VnfRecord};
use crate::service::{ControllerError, decode};

type Result<T, E = ControllerError> = std::result::Result<T, E>;

/// What [`check`] found.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct ConsistencyReport {
    /// The store did not change while it was read: the report describes one revision.
    pub settled: bool,
    /// VNF records.
    pub vnfs: usize,
    /// Allocation records.
    pub allocations: usize,
    /// Allocations whose VNF record is gone.
    pub allocations_without_vnf: Vec<String>,
    /// VNFs with placements but no allocation (their CPUs are held on nobody's books).
    pub placed_without_allocation: Vec<String>,
    /// VNFs placed elsewhere than their allocation says.
    pub placement_mismatch: Vec<String>,
    /// `host/cpu` held by more than one dedicated or pinned VNF.
    pub cpus_held_twice: Vec<String>,
    /// Allocations that do not fit with the ones before them when replayed, with the reason.
    pub conflicts: Vec<String>,
}

impl ConsistencyReport {
    /// Whether no invariant is broken (in a settled report).
    pub fn is_consistent(&self) -> bool {
        self.settled
            && self.allocations_without_vnf.is_empty()
            && self.placed_without_allocation.is_empty()
            && self.placement_mismatch.is_empty()
            && self.cpus_held_twice.is_empty()
            && self.conflicts.is_empty()
    }
}

/// How many times [`check`] reads again when the store changed while it read.
const SETTLE_ATTEMPTS: u32 = 20;

/// Reads the hosts, VNFs and allocations from `store` and checks them. The lists are read one
/// after the other: when the store's revision moved meanwhile, they are read again (a few
/// times, 50 ms apart); a report that never saw a still store says so (`settled: false`), and
/// may show a write in flight as a broken invariant.
pub async fn check(store: &dyn Store, config: SchedConfig) -> Result<ConsistencyReport> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        let before = store.current_revision().await?;
        let mut report = check_once(store, config).await?;
        report.settled = store.current_revision().await? == before;
        if report.settled || attempt == SETTLE_ATTEMPTS {
            return Ok(report);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn check_once(store: &dyn Store, config: SchedConfig) -> Result<ConsistencyReport> {
    let mut vnfs = BTreeMap::new();
    for (key, v) in store.list(records::VNFS).await? {
        let record: VnfRecord = decode(&key, &v.value)?;
        vnfs.insert(record.vnf.name.to_string(), record);
    }
    let mut allocations = BTreeMap::new();
    for (key, v) in store.list(records::ALLOCATIONS).await? {
        let alloc: Allocation = decode(&key, &v.value)?;
        allocations.insert(alloc.request.name.clone(), alloc);
    }
    let mut report = ConsistencyReport {
        vnfs: vnfs.len(),
        allocations: allocations.len(),
        ..ConsistencyReport::default()
    };
    for (name, alloc) in &allocations {
        match vnfs.get(name) {
            None => report.allocations_without_vnf.push(name.clone()),
            Some(record) => {
                let expected = placement::placements(&alloc.placement, &record.vnf.descriptor);
                if record.vnf.placements != expected {
                    report.placement_mismatch.push(name.clone());
                }
            }
        }
    }
    for (name, record) in &vnfs {
        if !record.vnf.placements.is_empty() && !allocations.contains_key(name) {
            report.placed_without_allocation.push(name.clone());
        }
    }
    let mut holders = BTreeMap::<(String, u32), BTreeSet<&str>>::new();
    for (name, alloc) in &allocations {
        if alloc.request.cpu.policy == CpuPolicy::Shared {
            continue;
        }
        let p = &alloc.placement;
        for role in std::iter::once(&p.act).chain(p.sby.iter()) {
            for cpu in role.cpus.iter().flat_map(|c| c.cpus().to_vec()) {
                holders
                    .entry((role.host.clone(), cpu))
                    .or_default()
                    .insert(name);
            }
        }
    }
    report.cpus_held_twice = holders
        .iter()
        .filter(|(_, names)| names.len() > 1)
        .map(|((host, cpu), names)| {
            let names: Vec<&str> = names.iter().copied().collect();
            format!("{host}/{cpu} ({})", names.join(", "))
        })
        .collect();
    let mut scheduler = crate::service::scheduler_with_hosts(store, config).await?;
    for (name, alloc) in &allocations {
        if let Err(e) = scheduler.restore(alloc) {
            report.conflicts.push(format!("{name}: {e}"));
        }
    }
    Ok(report)
}
