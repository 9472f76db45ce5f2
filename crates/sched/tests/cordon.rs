//! Cordoned (unschedulable) hosts: nothing new is placed on them, whatever the request (property
//! test over random hosts, cordon sets and requests); what they hold stays; the flag survives a
//! host update; uncordoning makes them usable again.

use std::collections::BTreeSet;

use proptest::prelude::*;
use telvirt_sched::{
    CpuPolicy, CpuRequest, HostSpec, Redundancy, ReservePolicy, Runtime, SchedConfig, SchedError,
    Scheduler, VnfRequest,
};

fn config() -> SchedConfig {
    SchedConfig {
        reserve: ReservePolicy::None,
        ..SchedConfig::default()
    }
}

fn host(i: usize) -> HostSpec {
    let mut h = HostSpec::synthetic(format!("h{i}"), 1, 4, 2);
    h.labels.insert("zone".into(), format!("z{}", i % 2));
    h
}

fn request(n: usize, kind: u8, count: u32, cpu: u32, redundant: bool) -> VnfRequest {
    let mut req = CpuRequest {
        count,
        ..Default::default()
    };
    match kind {
        0 => {}
        1 => {
            req.policy = CpuPolicy::Shared;
            req.group = Some("g".into());
        }
        _ => {
            req.policy = CpuPolicy::Pinned;
            req.count = 0;
            req.cores = vec![cpu];
        }
    }
    VnfRequest {
        name: format!("v{n}"),
        authority: "a".into(),
        runtime: Runtime::Wasm,
        cpu: req,
        redundancy: if redundant {
            Redundancy::ActiveStandby
        } else {
            Redundancy::None
        },
        zone_anti_affinity: false,
        emulator: Default::default(),
        memory_per_node: 0,
    }
}

proptest! {
    #[test]
    fn nothing_is_placed_on_an_unschedulable_host(
        hosts in 1usize..5,
        cordoned in prop::collection::btree_set(0usize..5, 0..5),
        asks in prop::collection::vec((0u8..3, 1u32..4, 0u32..8, any::<bool>()), 1..30),
    ) {
        let mut s = Scheduler::new(config()).unwrap();
        for i in 0..hosts {
            s.add_host(host(i)).unwrap();
        }
        let cordoned: BTreeSet<String> =
            cordoned.into_iter().filter(|i| *i < hosts).map(|i| format!("h{i}")).collect();
        for name in &cordoned {
            s.set_schedulable(name, false).unwrap();
        }
        for (n, (kind, count, cpu, redundant)) in asks.into_iter().enumerate() {
            match s.place(&request(n, kind, count, cpu, redundant)) {
                Ok(p) => {
                    for role in std::iter::once(&p.act).chain(p.sby.as_ref()) {
                        prop_assert!(!cordoned.contains(&role.host), "placed on cordoned {}", role.host);
                    }
                }
                Err(SchedError::NoPlacement { reasons, .. }) => {
                    for r in &reasons.0 {
                        if cordoned.contains(&r.host) {
                            prop_assert!(r.reason.contains("cordoned"), "{}: {}", r.host, r.reason);
                        }
                    }
                }
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
        prop_assert!(s.self_check().is_ok());
    }
}

#[test]
fn cordon_keeps_what_a_host_holds_survives_an_update_and_uncordon_reopens_it() {
    let mut s = Scheduler::new(config()).unwrap();
    s.add_host(host(0)).unwrap();
    let first = s.place(&request(0, 0, 2, 0, false)).unwrap();
    assert_eq!(first.act.host, "h0");
    s.set_schedulable("h0", false).unwrap();
    assert!(!s.is_schedulable("h0").unwrap());
    // What it holds stays.
    assert_eq!(s.placement("v0").unwrap(), first);
    let err = s.place(&request(1, 0, 1, 0, false)).unwrap_err();
    assert!(err.to_string().contains("cordoned"), "{err}");
    // A new description of the host keeps the flag.
    let mut spec = host(0);
    spec.labels.insert("rack".into(), "r1".into());
    s.update_host(spec).unwrap();
    assert!(!s.is_schedulable("h0").unwrap());
    assert!(s.place(&request(1, 0, 1, 0, false)).is_err());
    s.set_schedulable("h0", true).unwrap();
    assert_eq!(s.place(&request(1, 0, 1, 0, false)).unwrap().act.host, "h0");
    assert!(matches!(
        s.set_schedulable("nope", false),
        Err(SchedError::UnknownHost(_))
    ));
}
