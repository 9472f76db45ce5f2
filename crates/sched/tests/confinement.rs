//! A refusal never names another authority's VNF or shared group (issue #12, item 6): a pinned
//! request for a cpu someone else holds is told only that the cpu is in use; the owner of the
//! holder is told which of its own VNFs or groups has it.

use telvirt_sched::{
    CpuPolicy, CpuRequest, HostSpec, ReservePolicy, Runtime, SchedConfig, Scheduler, VnfRequest,
};

fn request(name: &str, authority: &str, cpu: CpuRequest) -> VnfRequest {
    VnfRequest {
        name: name.into(),
        authority: authority.into(),
        runtime: Runtime::Wasm,
        cpu,
        ..Default::default()
    }
}

fn pinned(name: &str, authority: &str, cpu: u32) -> VnfRequest {
    request(
        name,
        authority,
        CpuRequest {
            policy: CpuPolicy::Pinned,
            cores: vec![cpu],
            ..Default::default()
        },
    )
}

#[test]
fn a_pinned_refusal_names_only_the_callers_own_holders() {
    let mut s = Scheduler::new(SchedConfig {
        reserve: ReservePolicy::None,
        ..SchedConfig::default()
    })
    .unwrap();
    s.add_host(HostSpec::synthetic("h1", 1, 4, 1)).unwrap();
    let fw = request(
        "alicefw",
        "alice",
        CpuRequest {
            count: 1,
            ..Default::default()
        },
    );
    let held = s.place(&fw).unwrap().act.cpus[0].cpus()[0];
    let light = request(
        "alicelight",
        "alice",
        CpuRequest {
            policy: CpuPolicy::Shared,
            count: 1,
            group: Some("rg".into()),
            ..Default::default()
        },
    );
    let core = s.place(&light).unwrap().act.cpus[0].cpus()[0];

    for cpu in [held, core] {
        let theirs = s
            .place(&pinned("bobpin", "bob", cpu))
            .unwrap_err()
            .to_string();
        assert!(
            theirs.contains(&format!("cpu {cpu} is in use by another authority")),
            "{theirs}"
        );
        for name in ["alice", "rg"] {
            assert!(!theirs.contains(name), "bob is told {name}: {theirs}");
        }
    }
    let own = s
        .place(&pinned("alicepin", "alice", held))
        .unwrap_err()
        .to_string();
    assert!(
        own.contains(&format!("cpu {held} is taken by vnf `alicefw`")),
        "{own}"
    );
    let own = s
        .place(&pinned("alicepin", "alice", core))
        .unwrap_err()
        .to_string();
    assert!(own.contains("shared group `rg`"), "{own}");
}
