//! Property tests of the scheduler's invariants over random operation sequences:
//! no cpu held by two VNF roles, a shared-group core holds only its group, every allocation
//! lies in the dedicated set, ACT and SBY never share a host, same inputs give the same
//! placements, freeing (release, abort) restores capacity exactly, the reserve holds after
//! every accepted placement, and restore rebuilds the same state.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use telvirt_sched::coremap::{CpuState, HostMap, host_map};
use telvirt_sched::{
    Change, CpuList, CpuPolicy, CpuRequest, EmulatorPolicy, HostSpec, Redundancy, ReservePolicy,
    Role, Runtime, SchedConfig, Scheduler, ThreadPolicy, VnfRequest,
};

#[derive(Debug, Clone)]
enum Op {
    Place {
        kind: u8,
        count: u32,
        group: u8,
        auth: u8,
        redundant: bool,
        zone: bool,
        locality: u8,
        emulator: bool,
        cores: Vec<u32>,
    },
    Release(usize),
    Fail(usize),
    Resize(usize, u32),
    Move(usize),
    Finish(usize, bool),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..6, 1u32..5, 0u8..3, 0u8..2, any::<bool>(), any::<bool>(), 0u8..5, any::<bool>(),
              prop::collection::vec(0u32..18, 1..3))
            .prop_map(|(kind, count, group, auth, redundant, zone, locality, emulator, cores)| Op::Place {
                kind, count, group, auth, redundant, zone, locality, emulator, cores
            }),
        2 => any::<usize>().prop_map(Op::Release),
        1 => any::<usize>().prop_map(Op::Fail),
        1 => (any::<usize>(), 1u32..5).prop_map(|(i, c)| Op::Resize(i, c)),
        1 => any::<usize>().prop_map(Op::Move),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, b)| Op::Finish(i, b)),
    ]
}

/// Host `i`: 2 sockets × 4 cores × 2 threads (cpus 0..16), zone `z{i%3}`, one reserved cpu.
fn host(i: usize) -> HostSpec {
    let mut h = HostSpec::synthetic(format!("h{i}"), 2, 4, 2);
    h.labels.insert("zone".into(), format!("z{}", i % 3));
    h.reserved = CpuList::from_cpus([1 + (i as u32 % 3)]);
    h
}

fn request(n: usize, op: &Op) -> Option<VnfRequest> {
    let Op::Place {
        kind,
        count,
        group,
        auth,
        redundant,
        zone,
        locality,
        emulator,
        cores,
    } = op
    else {
        return None;
    };
    let mut cpu = CpuRequest {
        count: *count,
        ..Default::default()
    };
    match kind {
        0 | 1 => {}
        2 => cpu.thread_policy = ThreadPolicy::Isolate,
        3 => cpu.thread_policy = ThreadPolicy::Require,
        4 => {
            cpu.policy = CpuPolicy::Shared;
            cpu.group = Some(format!("g{group}"));
        }
        _ => {
            cpu.policy = CpuPolicy::Pinned;
            cpu.count = 0;
            cpu.cores = cores
                .iter()
                .copied()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
        }
    }
    match locality {
        0 => cpu.numa_node = Some(0),
        1 => cpu.near_nic = Some("nic1".into()),
        _ => {}
    }
    Some(VnfRequest {
        name: format!("v{n}"),
        authority: format!("a{auth}"),
        runtime: if *emulator || n.is_multiple_of(2) {
            Runtime::Vm
        } else {
            Runtime::Wasm
        },
        cpu,
        redundancy: if *redundant {
            Redundancy::ActiveStandby
        } else {
            Redundancy::None
        },
        zone_anti_affinity: *redundant && *zone,
        emulator: if *emulator {
            EmulatorPolicy::Isolate
        } else {
            EmulatorPolicy::Share
        },
        memory_per_node: 0,
    })
}

fn dedicated_set(h: &HostSpec) -> BTreeSet<u32> {
    let all = h.expanded_sockets().expect("valid host");
    all.iter()
        .flat_map(|s| s.numa_nodes.iter())
        .flat_map(|n| n.cores.iter())
        .flat_map(|c| c.cpus().iter().copied())
        .filter(|c| !h.shared.contains(*c) && !h.reserved.contains(*c))
        .collect()
}

fn maps(s: &Scheduler) -> Vec<HostMap> {
    s.host_names()
        .iter()
        .map(|h| host_map(s, h).expect("live host"))
        .collect()
}

/// Checks every structural invariant; `accepted` = a placement was just accepted.
fn check(s: &Scheduler, reserve_after_accept: bool) {
    s.self_check()
        .expect("counters and indexes match the holders");
    let mut exclusive: BTreeMap<(String, u32), (String, Role)> = BTreeMap::new();
    let mut groups: BTreeMap<(String, u32), (String, String)> = BTreeMap::new();
    let mut need: BTreeMap<String, u64> = BTreeMap::new();
    let mut pending = Vec::new();
    for a in s.allocations() {
        if let Some((req, p)) = s.pending_change(&a.request.name).expect("listed vnf") {
            pending.push((req, p));
        }
    }
    let committed = s
        .allocations()
        .into_iter()
        .map(|a| (a.request, a.placement, false));
    for (r, placement, is_pending) in
        committed.chain(pending.into_iter().map(|(r, p)| (r, p, true)))
    {
        let roles: Vec<_> = std::iter::once(&placement.act)
            .chain(placement.sby.iter())
            .collect();
        if roles.len() == 2 {
            assert_ne!(
                roles[0].host, roles[1].host,
                "ACT and SBY of {} share a host",
                r.name
            );
        }
        for rp in roles {
            let ded = dedicated_set(s.host_spec(&rp.host).expect("host of a placement exists"));
            let ex = rp.exclusive_cpus(r.cpu.policy, r.emulator);
            for &c in ex.cpus() {
                assert!(
                    ded.contains(&c),
                    "{} holds cpu {c} outside the dedicated set",
                    r.name
                );
                let key = (rp.host.clone(), c);
                match exclusive.get(&key) {
                    None => {
                        exclusive.insert(key, (r.name.clone(), rp.role));
                    }
                    // A change in progress may reuse the VNF's own cpus, never anyone else's.
                    Some(prev) => assert!(
                        is_pending && prev.0 == r.name,
                        "cpu {c} on {} held by {prev:?} and {}",
                        rp.host,
                        r.name
                    ),
                }
            }
            if r.cpu.policy == CpuPolicy::Shared {
                for &c in rp.cpus[0].cpus() {
                    assert!(ded.contains(&c));
                    let g = (
                        r.authority.clone(),
                        r.cpu.group.clone().expect("shared has group"),
                    );
                    let prev = groups.insert((rp.host.clone(), c), g.clone());
                    assert!(
                        prev.is_none() || prev == Some(g),
                        "group core cpu {c} holds two groups"
                    );
                }
            }
            if r.redundancy == Redundancy::ActiveStandby && !is_pending {
                let n = match r.cpu.policy {
                    CpuPolicy::Shared => 2 + (r.emulator == EmulatorPolicy::Isolate) as u64,
                    _ => ex.len() as u64,
                };
                *need.entry(rp.host.clone()).or_default() += n;
            }
        }
    }
    for k in groups.keys() {
        assert!(
            !exclusive.contains_key(k),
            "group core cpu {k:?} is also held exclusively"
        );
    }
    // The core map agrees with the placements, and counts free cpus exactly.
    let mut free: BTreeMap<String, u64> = BTreeMap::new();
    for m in maps(s) {
        let mut n_free = 0;
        for t in m
            .nodes
            .iter()
            .flat_map(|n| n.cores.iter())
            .flat_map(|c| c.threads.iter())
        {
            let key = (m.host.clone(), t.cpu);
            match &t.state {
                CpuState::Free => {
                    n_free += 1;
                    assert!(!exclusive.contains_key(&key) && !groups.contains_key(&key));
                }
                CpuState::Vnf {
                    vnf,
                    role,
                    pending: false,
                    ..
                } => {
                    assert_eq!(exclusive.get(&key), Some(&(vnf.clone(), *role)));
                }
                CpuState::Vnf {
                    vnf, pending: true, ..
                } => {
                    assert_eq!(exclusive.get(&key).map(|e| &e.0), Some(vnf));
                }
                CpuState::Group {
                    authority, group, ..
                } => {
                    assert_eq!(groups.get(&key), Some(&(authority.clone(), group.clone())));
                }
                _ => assert!(!exclusive.contains_key(&key) && !groups.contains_key(&key)),
            }
        }
        assert_eq!(n_free, m.free_cpus as u64);
        free.insert(m.host.clone(), n_free);
    }
    assert_eq!(free.values().sum::<u64>(), s.stats().free_cpus);
    if reserve_after_accept && s.config().reserve == ReservePolicy::NPlusOne {
        let total: u64 = free.values().sum();
        for (h, n) in &need {
            assert!(
                *n <= total - free[h],
                "reserve broken: {h} needs {n}, others have {}",
                total - free[h]
            );
        }
    }
}

fn run(ops: &[Op], reserve: ReservePolicy) -> Scheduler {
    let mut s = Scheduler::new(SchedConfig {
        reserve,
        shared_core_capacity: 4,
        ..SchedConfig::default()
    })
    .expect("valid config");
    let mut next_host = 0;
    for _ in 0..4 {
        s.add_host(host(next_host)).expect("valid host");
        next_host += 1;
    }
    let mut names: Vec<String> = Vec::new();
    for (n, op) in ops.iter().enumerate() {
        let pick = |i: usize, names: &Vec<String>| {
            (!names.is_empty()).then(|| names[i % names.len()].clone())
        };
        let mut accepted = false;
        match op {
            Op::Place { .. } => {
                let req = request(n, op).expect("place op");
                let before = maps(&s);
                if s.place(&req).is_ok() {
                    accepted = true;
                    names.push(req.name.clone());
                    let mut c = s.clone();
                    c.release(&req.name).expect("just placed");
                    assert_eq!(maps(&c), before, "release did not restore capacity exactly");
                } else {
                    assert_eq!(maps(&s), before, "a refused placement changed state");
                }
            }
            Op::Release(i) => {
                if let Some(v) = pick(*i, &names) {
                    s.release(&v).expect("placed");
                    names.retain(|x| *x != v);
                }
            }
            Op::Fail(i) => {
                let hosts = s.host_names();
                let h = hosts[i % hosts.len()].clone();
                for r in s.fail_host(&h).expect("live host") {
                    if let Ok(rp) = &r.result {
                        assert_ne!(rp.host, h);
                    }
                }
                names.retain(|v| s.placement(v).is_ok());
                s.add_host(host(next_host)).expect("valid host");
                next_host += 1;
            }
            Op::Resize(i, _) | Op::Move(i) if pick(*i, &names).is_some() => {
                let v = pick(*i, &names).expect("checked");
                let change = match op {
                    Op::Resize(_, count) => Change::Resize { count: *count },
                    _ => Change::Move {
                        role: Role::Act,
                        to: None,
                    },
                };
                let before = maps(&s);
                if s.begin_change(&v, &change).is_ok() {
                    accepted = true;
                    let mut c = s.clone();
                    c.abort_change(&v).expect("pending");
                    assert_eq!(maps(&c), before, "abort did not restore capacity exactly");
                } else {
                    assert_eq!(maps(&s), before, "a refused change changed state");
                }
            }
            Op::Finish(i, commit) => {
                if let Some(v) = pick(*i, &names) {
                    let _ = if *commit {
                        s.commit_change(&v).map(|_| ())
                    } else {
                        s.abort_change(&v)
                    };
                }
            }
            _ => {}
        }
        check(&s, accepted);
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(96), ..ProptestConfig::default() })]

    #[test]
    fn invariants_hold(ops in prop::collection::vec(op(), 1..40), reserve in any::<bool>()) {
        let reserve = if reserve { ReservePolicy::NPlusOne } else { ReservePolicy::None };
        let s = run(&ops, reserve);
        // Same inputs → same placements.
        let t = run(&ops, reserve);
        prop_assert_eq!(s.allocations(), t.allocations());
        // Restore rebuilds the same state (after finishing changes in progress).
        let mut s = s;
        for a in s.allocations() {
            let _ = s.abort_change(&a.request.name);
        }
        let mut r = Scheduler::new(*s.config()).expect("valid config");
        for h in s.host_names() {
            r.add_host(s.host_spec(&h).expect("live").clone()).expect("valid");
        }
        for a in s.allocations() {
            r.restore(&a).expect("a live allocation restores");
        }
        prop_assert_eq!(maps(&r), maps(&s));
        prop_assert_eq!(r.allocations(), s.allocations());
        // A restored scheduler decides exactly like the one that never restarted.
        for (i, op) in ops.iter().enumerate().filter(|(_, o)| matches!(o, Op::Place { .. })).take(6) {
            let mut req = request(i, op).expect("place op");
            req.name = format!("after-restart-{i}");
            prop_assert_eq!(s.place(&req), r.place(&req));
        }
    }
}
