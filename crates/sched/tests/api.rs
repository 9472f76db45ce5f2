//! Behaviour of the public scheduler API on small synthetic clusters.

use telvirt_sched::coremap::{CpuState, host_map, render_host_map};
use telvirt_sched::{
    Allocation, Change, CpuList, CpuPolicy, CpuRequest, EmulatorPolicy, HostSpec, Inventory,
    Redundancy, ReservePolicy, Role, Runtime, SchedConfig, SchedError, Scheduler, ThreadPolicy,
    VnfRequest,
};

/// 1 socket × 4 cores × 2 threads: core0 = cpus 0,4 (shared), cores 1..3 = 1,5 / 2,6 / 3,7.
fn small(name: &str, zone: &str) -> HostSpec {
    let mut h = HostSpec::synthetic(name, 1, 4, 2);
    h.labels.insert("zone".into(), zone.into());
    h
}

fn sched(reserve: ReservePolicy, hosts: &[HostSpec]) -> Scheduler {
    let mut s = Scheduler::new(SchedConfig {
        reserve,
        ..SchedConfig::default()
    })
    .expect("valid config");
    for h in hosts {
        s.add_host(h.clone()).expect("test hosts are valid");
    }
    s
}

fn ded(name: &str, count: u32) -> VnfRequest {
    VnfRequest {
        name: name.into(),
        authority: "op".into(),
        runtime: Runtime::Wasm,
        cpu: CpuRequest {
            count,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn shared(name: &str, auth: &str, group: &str, count: u32) -> VnfRequest {
    VnfRequest {
        name: name.into(),
        authority: auth.into(),
        runtime: Runtime::Wasm,
        cpu: CpuRequest {
            policy: CpuPolicy::Shared,
            count,
            group: Some(group.into()),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn pinned(name: &str, cores: &[u32]) -> VnfRequest {
    VnfRequest {
        name: name.into(),
        authority: "op".into(),
        runtime: Runtime::Wasm,
        cpu: CpuRequest {
            policy: CpuPolicy::Pinned,
            cores: cores.to_vec(),
            ..Default::default()
        },
        ..Default::default()
    }
}

fn cpus(l: &[CpuList]) -> Vec<String> {
    l.iter().map(ToString::to_string).collect()
}

#[test]
fn dedicated_thread_policies() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    let mut iso = ded("iso", 1);
    iso.cpu.thread_policy = ThreadPolicy::Isolate;
    let p = s.place(&iso).unwrap();
    assert_eq!(cpus(&p.act.cpus), ["1"]);
    assert_eq!(p.act.held.to_string(), "5");
    assert_eq!(p.act.emulator_cpus, None);

    let mut req = ded("req", 2);
    req.cpu.thread_policy = ThreadPolicy::Require;
    let p = s.place(&req).unwrap();
    assert_eq!(cpus(&p.act.cpus), ["2", "6"]);
    assert!(p.act.held.is_empty());

    // Only core 3 (3,7) is left: 3 cpus do not fit, and the reason says so per node.
    let e = s.place(&ded("big", 3)).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("h1: needs 3 dedicated cpus on one NUMA node; node0 has 2 free"),
        "{msg}"
    );
    let p = s.place(&ded("two", 2)).unwrap();
    assert_eq!(cpus(&p.act.cpus), ["3", "7"]);
    assert_eq!(p.act.numa_nodes, vec![0]);
    assert_eq!(s.stats().free_cpus, 0);
}

/// `thread_policy: require` on a host of 4 threads a core: 4 vCPUs fill one whole core, so a
/// node with one core left takes them (it was refused as needing two cores, as on SMT2).
#[test]
fn require_fills_whole_cores_of_four_threads() {
    // 1 socket × 3 cores × 4 threads: core 0 shared, cores 1 and 2 dedicated.
    let smt4 = HostSpec::synthetic("h4", 1, 3, 4);
    for search in [
        telvirt_sched::Search::FirstFit,
        telvirt_sched::Search::Indexed,
    ] {
        let mut s = Scheduler::new(SchedConfig {
            reserve: ReservePolicy::None,
            search,
            ..SchedConfig::default()
        })
        .unwrap();
        s.add_host(smt4.clone()).unwrap();
        let mut first = ded("first", 4);
        first.cpu.thread_policy = ThreadPolicy::Require;
        let p = s.place(&first).unwrap();
        assert_eq!(p.act.cpus.len(), 4, "{search:?}");
        let mut second = ded("second", 4);
        second.cpu.thread_policy = ThreadPolicy::Require;
        let p = s
            .place(&second)
            .unwrap_or_else(|e| panic!("{search:?}: one whole core of 4 is left: {e}"));
        assert_eq!(p.act.cpus.len(), 4);
        assert_eq!(s.stats().free_cpus, 0, "{search:?}");
        let mut third = ded("third", 1);
        third.cpu.thread_policy = ThreadPolicy::Require;
        assert!(s.place(&third).is_err(), "{search:?}: no core left");
    }
}

#[test]
fn diagnostics_match_the_issue_example() {
    // host-2 with two nodes: node0 has 3 free cpus, node1 has 2 free.
    let mut h = HostSpec::synthetic("host-2", 2, 4, 1);
    h.shared = CpuList::from_cpus([0]);
    h.reserved = CpuList::from_cpus([5, 6]);
    let mut s = sched(ReservePolicy::None, &[h]);
    let e = s.place(&ded("fw", 4)).unwrap_err();
    assert!(matches!(e, SchedError::NoPlacement { .. }));
    let msg = e.to_string();
    assert!(
        msg.contains(
            "host-2: needs 4 dedicated cpus on one NUMA node; node0 has 3 free, node1 has 2 free"
        ),
        "{msg}"
    );
    // Nothing changed.
    assert_eq!(s.stats().free_cpus, 5);
    assert_eq!(s.stats().vnfs, 0);
}

#[test]
fn shared_groups_are_per_authority_and_exclusive() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    let a = s.place(&shared("a", "op", "light", 2)).unwrap();
    let b = s.place(&shared("b", "op", "light", 3)).unwrap();
    let c = s.place(&shared("c", "ent", "light", 1)).unwrap();
    assert_eq!(cpus(&a.act.cpus), ["1,5", "1,5"]);
    assert_eq!(cpus(&b.act.cpus), ["1,5", "1,5", "1,5"]);
    assert_eq!(
        cpus(&c.act.cpus),
        ["2,6"],
        "another authority never shares op's core"
    );
    let m = host_map(&s, "h1").unwrap();
    let core1 = &m.nodes[0].cores[1];
    assert!(
        matches!(&core1.threads[0].state, CpuState::Group { group, authority, vcpus: 5 } if group == "light" && authority == "op")
    );
    // A full group core makes the group open a new one (capacity 8).
    let d = s.place(&shared("d", "op", "light", 4)).unwrap();
    assert_eq!(cpus(&d.act.cpus)[0], "3,7");
    // Releasing the last member frees the core exactly.
    s.release("c").unwrap();
    assert!(matches!(
        host_map(&s, "h1").unwrap().nodes[0].cores[2].threads[0].state,
        CpuState::Free
    ));
}

#[test]
fn pinned_refusals_say_why() {
    let mut h = small("h1", "a");
    h.reserved = CpuList::from_cpus([3]);
    let mut s = sched(ReservePolicy::None, &[h]);
    let p = s.place(&pinned("p1", &[2, 6])).unwrap();
    assert_eq!(cpus(&p.act.cpus), ["2", "6"]);
    for (cores, why) in [
        (vec![2], "cpu 2 is taken by vnf `p1`"),
        (vec![3], "cpu 3 is reserved, not dedicated"),
        (vec![0], "cpu 0 is in the shared set, not dedicated"),
        (vec![42], "cpu 42 does not exist"),
    ] {
        let e = s.place(&pinned("p2", &cores)).unwrap_err().to_string();
        assert!(e.contains(&format!("h1: {why}")), "{e}");
    }
    let mut near = pinned("p3", &[1]);
    near.cpu.numa_node = Some(1);
    assert!(
        s.place(&near)
            .unwrap_err()
            .to_string()
            .contains("has no NUMA node 1")
    );
}

#[test]
fn locality_and_emulator() {
    let mut s = sched(ReservePolicy::None, &[HostSpec::synthetic("h1", 2, 4, 2)]);
    let mut r = ded("vm1", 2);
    r.runtime = Runtime::Vm;
    r.cpu.near_nic = Some("nic1".into());
    r.emulator = EmulatorPolicy::Isolate;
    let p = s.place(&r).unwrap();
    assert_eq!(p.act.numa_nodes, vec![1]);
    // socket 1 cores: 4(shared),5,6,7 → threads 5,13 / 6,14 / 7,15
    assert_eq!(cpus(&p.act.cpus), ["5", "13"]);
    assert_eq!(p.act.emulator_cpus.unwrap().to_string(), "6");

    let mut r = ded("vm2", 1);
    r.runtime = Runtime::Vm;
    r.cpu.numa_node = Some(0);
    let p = s.place(&r).unwrap();
    assert_eq!(p.act.numa_nodes, vec![0]);
    assert_eq!(
        p.act.emulator_cpus.unwrap().to_string(),
        "0,4,8,12",
        "share = the host's shared set"
    );

    let mut r = ded("vm3", 1);
    r.cpu.near_nic = Some("eth9".into());
    assert!(
        s.place(&r)
            .unwrap_err()
            .to_string()
            .contains("h1: has no nic `eth9`")
    );
}

#[test]
fn memory_is_tracked_per_node() {
    let mut h = small("h1", "a");
    h.topology.as_mut().unwrap().memory_per_node = Some(1000);
    let mut s = sched(ReservePolicy::None, &[h]);
    let mut r = ded("m1", 1);
    r.memory_per_node = 600;
    s.place(&r).unwrap();
    let mut r2 = ded("m2", 1);
    r2.memory_per_node = 600;
    let e = s.place(&r2).unwrap_err().to_string();
    assert!(
        e.contains("400 bytes of memory free (the VNF needs 600 bytes)"),
        "{e}"
    );
    s.release("m1").unwrap();
    s.place(&r2).unwrap();
}

fn redundant(name: &str, count: u32) -> VnfRequest {
    VnfRequest {
        redundancy: Redundancy::ActiveStandby,
        ..ded(name, count)
    }
}

#[test]
fn act_and_sby_on_different_hosts_and_zones() {
    let mut s = sched(
        ReservePolicy::None,
        &[small("h1", "a"), small("h2", "a"), small("h3", "b")],
    );
    let p = s.place(&redundant("r1", 2)).unwrap();
    let sby = p.sby.unwrap();
    assert_ne!(p.act.host, sby.host);
    let mut z = redundant("r2", 1);
    z.zone_anti_affinity = true;
    let p = s.place(&z).unwrap();
    let zone = |h: &str| s.host_spec(h).unwrap().labels["zone"].clone();
    assert_ne!(zone(&p.act.host), zone(&p.sby.as_ref().unwrap().host));

    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "a")]);
    let e = s.place(&z).unwrap_err().to_string();
    assert!(e.contains("is in zone `a` like the other role"), "{e}");
    assert_eq!(s.stats().free_cpus, 12, "the ACT was rolled back");
}

#[test]
fn reserve_refuses_placements_that_break_healing() {
    // 3 hosts × 6 dedicated cpus. Redundant load per host must stay healable elsewhere.
    let hosts = [small("h1", "a"), small("h2", "b"), small("h3", "c")];
    let mut s = sched(ReservePolicy::NPlusOne, &hosts);
    s.place(&redundant("r1", 4)).unwrap(); // h1: 4, h2: 4 → free 2,2,6
    let e = s.place(&ded("filler", 5)).unwrap_err();
    match &e {
        SchedError::ReserveViolation { needed, free, .. } => assert!(needed > free, "{e}"),
        other => panic!("expected reserve violation, got {other}"),
    }
    assert!(e.to_string().contains("n+1 healing reserve"));
    assert!(s.reserve_holds());
    // The same placement without the reserve is accepted.
    let mut s2 = sched(ReservePolicy::None, &hosts);
    s2.place(&redundant("r1", 4)).unwrap();
    s2.place(&ded("filler", 5)).unwrap();
}

#[test]
fn fail_host_replaces_and_promotes() {
    let mut s = sched(
        ReservePolicy::NPlusOne,
        &[small("h1", "a"), small("h2", "b"), small("h3", "c")],
    );
    let p = s.place(&redundant("r1", 2)).unwrap();
    s.place(&ded("solo", 1)).unwrap();
    let act_host = p.act.host.clone();
    let out = s.fail_host(&act_host).unwrap();
    let r1 = out.iter().find(|r| r.vnf == "r1").unwrap();
    assert_eq!(r1.lost, Role::Act);
    assert!(r1.promoted);
    let new = r1.result.as_ref().unwrap();
    assert_eq!(new.role, Role::Sby);
    let now = s.placement("r1").unwrap();
    assert_eq!(
        now.act.host,
        p.sby.unwrap().host,
        "the old SBY is the ACT now"
    );
    assert_eq!(now.sby.unwrap().host, new.host);
    assert_ne!(new.host, act_host);
    assert!(s.host_spec(&act_host).is_err());
    assert_eq!(
        s.fail_host("nope").unwrap_err(),
        SchedError::UnknownHost("nope".into())
    );
}

#[test]
fn relocate_promotes_the_standby_and_moves_what_lost_its_host() {
    let mut s = sched(
        ReservePolicy::NPlusOne,
        &[small("h1", "a"), small("h2", "b"), small("h3", "c")],
    );
    let p = s.place(&redundant("r1", 2)).unwrap();
    let (act, sby) = (p.act.host.clone(), p.sby.clone().unwrap().host);
    s.set_schedulable(&act, false).unwrap();
    let r = s.relocate("r1", &act).unwrap();
    assert_eq!((r.lost, r.promoted), (Role::Act, true));
    let now = s.placement("r1").unwrap();
    assert_eq!(now.act.host, sby, "the old SBY is the ACT now");
    assert_eq!(now.act.role, Role::Act);
    let new = r.replaced.unwrap();
    assert_eq!(now.sby.unwrap(), new);
    assert!(new.host != act && new.host != sby, "{new:?}");
    assert_eq!(
        s.host_roles(&act).unwrap(),
        0,
        "the failed host holds nothing"
    );
    assert!(s.host_spec(&act).is_ok(), "the host itself is kept");
    s.self_check().unwrap();

    // A lost SBY gets a new host; with none left, the VNF runs without one.
    let sby_host = s.placement("r1").unwrap().sby.unwrap().host;
    s.set_schedulable(&sby_host, false).unwrap();
    let r = s.relocate("r1", &sby_host).unwrap();
    assert_eq!((r.lost, r.promoted, r.replaced), (Role::Sby, false, None));
    assert!(s.placement("r1").unwrap().sby.is_none());
    s.self_check().unwrap();
    assert!(matches!(
        s.relocate("r1", &sby_host),
        Err(SchedError::InvalidChange { .. })
    ));
}

#[test]
fn swapping_roles_makes_the_standby_active_on_the_same_cpus() {
    let mut s = sched(
        ReservePolicy::NPlusOne,
        &[small("h1", "a"), small("h2", "b"), small("h3", "c")],
    );
    let before = s.place(&redundant("r1", 2)).unwrap();
    let after = s.swap_roles("r1").unwrap();
    let sby = before.sby.clone().unwrap();
    assert_eq!(
        (after.act.host.as_str(), &after.act.cpus),
        (sby.host.as_str(), &sby.cpus)
    );
    assert_eq!(after.act.role, Role::Act);
    let new_sby = after.sby.unwrap();
    assert_eq!(
        (new_sby.host, new_sby.cpus),
        (before.act.host, before.act.cpus)
    );
    assert_eq!(new_sby.role, Role::Sby);
    s.self_check().unwrap();
    // Without a standby there is nothing to swap, and nothing changes.
    let solo = s.place(&ded("solo", 1)).unwrap();
    assert!(matches!(
        s.swap_roles("solo"),
        Err(SchedError::InvalidChange { .. })
    ));
    assert_eq!(s.placement("solo").unwrap(), solo);
}

#[test]
fn a_move_holds_both_places_then_only_the_new_one() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "b")]);
    let before = s.place(&ded("solo", 2)).unwrap();
    let from = before.act.host.clone();
    let to = if from == "h1" { "h2" } else { "h1" };
    assert!(matches!(
        s.add_standby("solo", Some(&from), &[]),
        Err(SchedError::InvalidChange { .. })
    ));
    let dest = s.add_standby("solo", Some(to), &[]).unwrap();
    assert_eq!(dest.host, to);
    s.self_check().unwrap();
    assert!(matches!(
        s.add_standby("solo", None, &[]),
        Err(SchedError::InvalidChange { .. })
    ));
    let swapped = s.swap_roles("solo").unwrap();
    assert_eq!(swapped.act.cpus, dest.cpus);
    let after = s.drop_standby("solo").unwrap();
    assert_eq!(after.act.host, to);
    assert!(after.sby.is_none());
    s.self_check().unwrap();
    // The old place is free again: the same VNF fits there once more.
    s.add_standby("solo", Some(&from), &[]).unwrap();
    s.self_check().unwrap();
}

#[test]
fn a_move_never_picks_a_host_the_caller_left_out() {
    let hosts = [small("h1", "a"), small("h2", "b"), small("h3", "c")];
    let mut s = sched(ReservePolicy::None, &hosts);
    let from = s.place(&ded("solo", 2)).unwrap().act.host;
    let others: Vec<String> = ["h1", "h2", "h3"]
        .into_iter()
        .filter(|h| *h != from)
        .map(str::to_owned)
        .collect();
    // Each other host left out in turn: the pick is the one left.
    for (i, out) in others.iter().enumerate() {
        let dest = s
            .add_standby("solo", None, &[out.clone(), "no-such-host".into()])
            .unwrap();
        assert_eq!(dest.host, others[1 - i]);
        s.drop_standby("solo").unwrap();
    }
    // Both left out: no place, and nothing changed.
    let before = s.placement("solo").unwrap();
    let e = s.add_standby("solo", None, &others).unwrap_err();
    assert!(matches!(e, SchedError::NoPlacement { .. }), "{e}");
    for out in &others {
        assert!(
            e.to_string().contains(&format!(
                "{out}: cannot take this VNF (the caller says why)"
            )),
            "{e}"
        );
    }
    assert_eq!(s.placement("solo").unwrap(), before);
    s.self_check().unwrap();
}

#[test]
fn relocating_a_single_vnf_moves_it_or_changes_nothing() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "b")]);
    let p = s.place(&ded("solo", 2)).unwrap();
    let from = p.act.host.clone();
    s.set_schedulable(&from, false).unwrap();
    let r = s.relocate("solo", &from).unwrap();
    let moved = r.replaced.unwrap();
    assert_ne!(moved.host, from);
    assert_eq!(s.placement("solo").unwrap().act, moved);
    s.self_check().unwrap();

    // Nowhere to go: refused, and the VNF keeps what it holds.
    s.set_schedulable(&from, true).unwrap();
    s.set_schedulable(&moved.host, false).unwrap();
    let mut n = 0;
    while s.place(&ded(&format!("filler{n}"), 1)).is_ok() {
        n += 1;
    }
    assert!(n > 0);
    let before = s.placement("solo").unwrap();
    assert!(matches!(
        s.relocate("solo", &moved.host),
        Err(SchedError::NoPlacement { .. })
    ));
    assert_eq!(s.placement("solo").unwrap(), before);
    s.self_check().unwrap();
}

#[test]
fn fail_host_reports_what_cannot_be_replaced() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    s.place(&ded("solo", 2)).unwrap();
    let out = s.fail_host("h1").unwrap();
    assert_eq!(out.len(), 1);
    assert!(matches!(out[0].result, Err(SchedError::NoPlacement { .. })));
    assert!(
        s.placement("solo").is_err(),
        "a VNF with no role left is forgotten"
    );
}

#[test]
fn restore_rebuilds_the_same_state_and_validates() {
    let hosts = [small("h1", "a"), small("h2", "b")];
    let mut s = sched(ReservePolicy::None, &hosts);
    s.place(&redundant("r1", 1)).unwrap();
    s.place(&shared("g1", "op", "light", 2)).unwrap();
    let mut iso = ded("iso", 1);
    iso.cpu.thread_policy = ThreadPolicy::Isolate;
    iso.runtime = Runtime::Vm;
    iso.emulator = EmulatorPolicy::Isolate;
    s.place(&iso).unwrap();
    s.place(&pinned("p1", &[7])).unwrap();
    let allocs = s.allocations();
    let json = serde_json::to_string(&allocs).unwrap();
    let back: Vec<Allocation> = serde_json::from_str(&json).unwrap();

    let mut t = sched(ReservePolicy::None, &hosts);
    for a in &back {
        t.restore(a).unwrap();
    }
    assert_eq!(t.allocations(), allocs);
    for h in ["h1", "h2"] {
        assert_eq!(host_map(&t, h).unwrap(), host_map(&s, h).unwrap());
    }
    // Restoring again: every cpu is taken now.
    let e = t.restore(&back[0]).unwrap_err();
    assert_eq!(e, SchedError::DuplicateVnf(back[0].request.name.clone()));
    let mut other = back
        .iter()
        .find(|a| a.request.name == "p1")
        .unwrap()
        .clone();
    other.request.name = "p2".into();
    other.placement.vnf = "p2".into();
    let e = t.restore(&other).unwrap_err().to_string();
    assert!(e.contains("cpu 7 is already taken"), "{e}");

    let mut fresh = sched(ReservePolicy::None, &hosts);
    let mut bad = back
        .iter()
        .find(|a| a.request.name == "r1")
        .unwrap()
        .clone();
    bad.placement.sby.as_mut().unwrap().host = bad.placement.act.host.clone();
    assert!(
        fresh
            .restore(&bad)
            .unwrap_err()
            .to_string()
            .contains("both on host")
    );
    let mut bad = back[0].clone();
    bad.placement.act.host = "h9".into();
    assert_eq!(
        fresh.restore(&bad).unwrap_err(),
        SchedError::UnknownHost("h9".into())
    );
    let mut bad = back
        .iter()
        .find(|a| a.request.name == "p1")
        .unwrap()
        .clone();
    bad.placement.act.cpus = vec![CpuList::from_cpus([0])];
    assert!(
        fresh
            .restore(&bad)
            .unwrap_err()
            .to_string()
            .contains("pins it to 7")
    );
    assert_eq!(fresh.stats().vnfs, 0);
    assert_eq!(
        fresh.stats().free_cpus,
        12,
        "failed restores change nothing"
    );
}

#[test]
fn resize_grows_in_place_and_never_overlaps() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "b")]);
    let p = s.place(&ded("a", 2)).unwrap();
    s.place(&ded("b", 2)).unwrap();
    let p2 = s.begin_change("a", &Change::Resize { count: 3 }).unwrap();
    assert_eq!(p2.act.host, p.act.host);
    assert_eq!(
        p2.act.cpus[..2],
        p.act.cpus[..],
        "existing vCPUs keep their cpus"
    );
    assert!(
        s.begin_change("a", &Change::Resize { count: 1 }).is_err(),
        "one change at a time"
    );
    let b = s.placement("b").unwrap();
    let new_cpu = p2.act.cpus[2].cpus()[0];
    assert!(b.act.host != p2.act.host || b.act.cpus.iter().all(|c| !c.contains(new_cpu)));
    let done = s.commit_change("a").unwrap();
    assert_eq!(done.act.cpus.len(), 3);
    // Shrink frees exactly the dropped cpu.
    let before = s.stats().free_cpus;
    s.begin_change("a", &Change::Resize { count: 1 }).unwrap();
    s.commit_change("a").unwrap();
    assert_eq!(s.stats().free_cpus, before + 2);
    assert_eq!(s.placement("a").unwrap().act.cpus, p.act.cpus[..1]);
    assert_eq!(
        s.commit_change("a").unwrap_err(),
        SchedError::NoChangePending {
            vnf: "a".into(),
            role: Role::Act
        }
    );
}

#[test]
fn move_holds_both_until_commit_and_abort_restores() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "b")]);
    let p = s.place(&ded("a", 2)).unwrap();
    let free0 = s.stats().free_cpus;
    let m = s
        .begin_change(
            "a",
            &Change::Move {
                role: Role::Act,
                to: None,
            },
        )
        .unwrap();
    assert_ne!(m.act.host, p.act.host);
    assert_eq!(
        s.stats().free_cpus,
        free0 - 2,
        "old and new are both held while moving"
    );
    let map = render_host_map(&host_map(&s, &m.act.host).unwrap());
    assert!(map.contains("a/ACT vcpu0 (pending)"), "{map}");
    s.abort_change("a").unwrap();
    assert_eq!(s.stats().free_cpus, free0);
    assert_eq!(s.placement("a").unwrap(), p);

    s.begin_change(
        "a",
        &Change::Move {
            role: Role::Act,
            to: Some("h2".into()),
        },
    )
    .unwrap();
    let done = s.commit_change("a").unwrap();
    assert_eq!(done.act.host, "h2");
    assert_eq!(s.stats().free_cpus, free0);
    let e = s
        .begin_change(
            "a",
            &Change::Move {
                role: Role::Sby,
                to: None,
            },
        )
        .unwrap_err();
    assert_eq!(
        e,
        SchedError::UnknownRole {
            vnf: "a".into(),
            role: Role::Sby
        }
    );
    let e = s
        .begin_change("a", &Change::Repin { cores: vec![1] })
        .unwrap_err()
        .to_string();
    assert!(e.contains("repin only applies to policy pinned"), "{e}");
}

#[test]
fn repin_moves_pinned_cpus() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    s.place(&pinned("p", &[1, 2])).unwrap();
    assert!(s.begin_change("p", &Change::Resize { count: 3 }).is_err());
    let p = s
        .begin_change("p", &Change::Repin { cores: vec![2, 3] })
        .unwrap();
    assert_eq!(cpus(&p.act.cpus), ["2", "3"]);
    s.commit_change("p").unwrap();
    let m = host_map(&s, "h1").unwrap();
    assert!(
        matches!(m.nodes[0].cores[1].threads[0].state, CpuState::Free),
        "cpu 1 freed"
    );
}

/// A change on the VNF's own host keeps its memory where it is: a re-pin of a VNF that holds
/// 600 of a node's 1000 bytes fits (it needed 1200 free before), and the memory is counted
/// once while the change is pending, after it is committed and after one is abandoned.
#[test]
fn a_repin_on_its_host_counts_the_vnfs_memory_once() {
    let mut h = small("h1", "a");
    h.topology.as_mut().unwrap().memory_per_node = Some(1000);
    let mut s = sched(ReservePolicy::None, &[h]);
    let mut p = pinned("p", &[1, 2]);
    p.memory_per_node = 600;
    s.place(&p).unwrap();
    let free_memory = |s: &mut Scheduler| {
        let mut probe = ded("probe", 1);
        probe.memory_per_node = 401;
        let e = s.place(&probe).unwrap_err().to_string();
        probe.memory_per_node = 400;
        s.place(&probe).unwrap();
        s.release("probe").unwrap();
        e
    };
    assert!(free_memory(&mut s).contains("400 bytes of memory free"));

    s.begin_change("p", &Change::Repin { cores: vec![3, 5] })
        .unwrap();
    assert!(
        free_memory(&mut s).contains("400 bytes of memory free"),
        "while pending"
    );
    s.abort_change("p").unwrap();
    assert!(
        free_memory(&mut s).contains("400 bytes of memory free"),
        "abandoned"
    );

    let moved = s
        .begin_change("p", &Change::Repin { cores: vec![3, 5] })
        .unwrap();
    assert_eq!(cpus(&moved.act.cpus), ["3", "5"]);
    s.commit_change("p").unwrap();
    assert!(
        free_memory(&mut s).contains("400 bytes of memory free"),
        "committed"
    );
    s.release("p").unwrap();
    let mut all = ded("all", 1);
    all.memory_per_node = 1000;
    s.place(&all).unwrap();
}

#[test]
fn hosts_add_remove_update() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    assert_eq!(
        s.add_host(small("h1", "a")).unwrap_err(),
        SchedError::DuplicateHost("h1".into())
    );
    s.place(&pinned("p", &[3])).unwrap();
    let e = s.remove_host("h1").unwrap_err().to_string();
    assert!(e.contains("p/ACT"), "{e}");
    // Updating h1 so that cpu 3 becomes reserved is refused and changes nothing.
    let mut h = small("h1", "a");
    h.reserved = CpuList::from_cpus([3]);
    let e = s.update_host(h).unwrap_err().to_string();
    assert!(e.contains("cpu 3 is not in the dedicated set"), "{e}");
    assert_eq!(s.placement("p").unwrap().act.host, "h1");
    let mut h = small("h1", "z");
    h.reserved = CpuList::from_cpus([1]);
    s.update_host(h).unwrap();
    assert_eq!(s.host_spec("h1").unwrap().labels["zone"], "z");
    assert_eq!(s.stats().free_cpus, 4);
    s.release("p").unwrap();
    s.remove_host("h1").unwrap();
    assert_eq!(s.stats().hosts, 0);
}

#[test]
fn inventory_file_shape() {
    let inv: Inventory = serde_json::from_str(
        r#"{"hosts":[
          {"name":"a","labels":{"zone":"z1","rack":"r1"},
           "topology":{"sockets":2,"cores_per_socket":8,"threads_per_core":2},
           "nics":[{"name":"eth1","numa_node":1}],
           "shared":"0,16","reserved":"8,24"},
          {"name":"b","sockets":[{"id":0,"numa_nodes":[{"id":0,"memory":1073741824,
             "cores":["0,2","1,3"]}]}], "shared":[0,2]}
        ]}"#,
    )
    .unwrap();
    let mut s = sched(ReservePolicy::None, &[]);
    s.add_inventory(&inv).unwrap();
    assert_eq!(s.host_names(), ["a", "b"]);
    assert_eq!(s.stats().dedicated_cpus, 28 + 2);
    let bad = serde_json::from_str::<Inventory>(r#"{"hosts":[{"name":"x","sokets":[]}]}"#);
    assert!(
        bad.unwrap_err()
            .to_string()
            .contains("unknown field `sokets`")
    );
}

#[test]
fn host_map_renders_every_state() {
    let mut h = small("h1", "a");
    h.reserved = CpuList::from_cpus([3, 7]);
    let mut s = sched(ReservePolicy::None, &[h]);
    let mut iso = ded("fw1", 1);
    iso.cpu.thread_policy = ThreadPolicy::Isolate;
    s.place(&iso).unwrap();
    s.place(&shared("l1", "op", "g", 1)).unwrap();
    let text = render_host_map(&host_map(&s, "h1").unwrap());
    let want = "host h1 (zone=a): 0 of 4 dedicated cpus free\n  node 0 (socket 0):\n    core 0: cpu0 shared | cpu4 shared\n    core 1: cpu1 fw1/ACT vcpu0 | cpu5 fw1/ACT held\n    core 2: cpu2 group op/g (1 vcpus) | cpu6 group op/g (1 vcpus)\n    core 3: cpu3 reserved | cpu7 reserved\n";
    assert_eq!(text, want);
    let json = serde_json::to_value(host_map(&s, "h1").unwrap()).unwrap();
    assert_eq!(json["nodes"][0]["cores"][1]["threads"][1]["state"], "vnf");
    assert_eq!(json["nodes"][0]["cores"][1]["threads"][1]["use"], "held");
}

#[test]
fn heal_places_a_missing_role() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "b")]);
    let p = s.place(&redundant("r", 3)).unwrap();
    let out = s.fail_host(&p.sby.unwrap().host).unwrap();
    assert!(out[0].result.is_err(), "only one host left");
    assert!(s.placement("r").unwrap().sby.is_none());
    s.add_host(small("h3", "c")).unwrap();
    let rp = s.heal("r").unwrap();
    assert_eq!(rp.host, "h3");
    assert_eq!(rp.role, Role::Sby);
    assert!(s.heal("r").is_err());
}

#[test]
fn require_needs_smt_and_says_so() {
    let mut s = sched(
        ReservePolicy::None,
        &[HostSpec::synthetic("nosmt", 1, 4, 1)],
    );
    let mut r = ded("r", 2);
    r.cpu.thread_policy = ThreadPolicy::Require;
    let e = s.place(&r).unwrap_err().to_string();
    assert!(e.contains("nosmt: has no SMT siblings"), "{e}");
}

#[test]
fn isolated_emulator_for_shared_and_pinned() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    let mut g = shared("g", "op", "light", 2);
    g.runtime = Runtime::Vm;
    g.emulator = EmulatorPolicy::Isolate;
    let p = s.place(&g).unwrap();
    assert_eq!(cpus(&p.act.cpus), ["1,5", "1,5"]);
    let emu = p.act.emulator_cpus.unwrap();
    assert_eq!(emu.len(), 1);
    assert!(
        !emu.contains(1) && !emu.contains(5),
        "emulator is not on the group core"
    );
    let mut pin = pinned("p", &[3]);
    pin.runtime = Runtime::Vm;
    pin.emulator = EmulatorPolicy::Isolate;
    let p = s.place(&pin).unwrap();
    let pe = p.act.emulator_cpus.unwrap();
    assert_eq!(pe.len(), 1);
    assert!(!pe.contains(3) && pe != emu);
    assert_eq!(s.stats().free_cpus, 6 - 2 - 1 - 1 - 1);
}

#[test]
fn failover_keeps_zone_anti_affinity() {
    let hosts = [
        small("a1", "a"),
        small("a2", "a"),
        small("b1", "b"),
        small("c1", "c"),
    ];
    let mut s = sched(ReservePolicy::None, &hosts);
    let mut r = redundant("r", 1);
    r.zone_anti_affinity = true;
    let p = s.place(&r).unwrap();
    let out = s.fail_host(&p.sby.unwrap().host).unwrap();
    let new = out[0].result.as_ref().unwrap();
    let zone = |h: &str| s.host_spec(h).unwrap().labels["zone"].clone();
    assert_ne!(zone(&new.host), zone(&p.act.host));
    s.self_check().unwrap();
}

#[test]
fn update_host_keeps_shared_groups_and_config_is_validated() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    s.place(&shared("g1", "op", "light", 2)).unwrap();
    s.place(&shared("g2", "op", "light", 1)).unwrap();
    let before = host_map(&s, "h1").unwrap().nodes;
    let mut h = small("h1", "b");
    h.reserved = CpuList::from_cpus([3, 7]);
    s.update_host(h).unwrap();
    assert_eq!(
        host_map(&s, "h1").unwrap().nodes[0].cores[1],
        before[0].cores[1]
    );
    s.self_check().unwrap();

    let e = Scheduler::new(SchedConfig {
        shared_core_capacity: 0,
        ..SchedConfig::default()
    })
    .unwrap_err();
    assert!(e.to_string().contains("shared_core_capacity"), "{e}");
    let c: SchedConfig =
        serde_json::from_str(r#"{"reserve":"none","search":"first-fit"}"#).unwrap();
    assert_eq!(c.reserve, ReservePolicy::None);
    assert_eq!(c.shared_core_capacity, 8);
}

#[test]
fn documented_inventory_example_parses_and_loads() {
    let doc = include_str!("../../../docs/scheduling.md");
    let section = doc
        .split("## Inventory file")
        .nth(1)
        .expect("doc has the inventory section");
    let yaml = section
        .split("```yaml")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("yaml block");
    let inv: Inventory = yaml_serde::from_str(yaml).expect("documented example parses");
    let mut s = sched(ReservePolicy::NPlusOne, &[]);
    s.add_inventory(&inv).expect("documented example is valid");
    assert_eq!(s.host_names(), ["host-1", "host-2"]);
    // host-1: 128 cpus - 4 shared - 2 reserved; host-2: 8 cpus - 2 shared.
    assert_eq!(s.stats().dedicated_cpus, 122 + 6);
    let mut r = ded("near", 2);
    r.cpu.near_nic = Some("eth2".into());
    assert_eq!(s.place(&r).expect("fits").act.numa_nodes, vec![1]);
}

#[test]
fn names_are_unique_and_unknown_names_are_refused() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a")]);
    s.place(&ded("a", 1)).unwrap();
    assert_eq!(
        s.place(&ded("a", 1)).unwrap_err(),
        SchedError::DuplicateVnf("a".into())
    );
    assert_eq!(
        s.release("zz").unwrap_err(),
        SchedError::UnknownVnf("zz".into())
    );
    assert_eq!(
        s.placement("zz").unwrap_err(),
        SchedError::UnknownVnf("zz".into())
    );
    let e = s.begin_change(
        "a",
        &Change::Move {
            role: Role::Act,
            to: Some("h9".into()),
        },
    );
    assert_eq!(e.unwrap_err(), SchedError::UnknownHost("h9".into()));
    assert!(matches!(s.heal("a"), Err(SchedError::InvalidChange { .. })));
    assert_eq!(s.stats().vnfs, 1);
}

#[test]
fn shared_refusal_shows_group_room() {
    let mut s = Scheduler::new(SchedConfig {
        reserve: ReservePolicy::None,
        shared_core_capacity: 4,
        ..SchedConfig::default()
    })
    .expect("valid config");
    let mut h = HostSpec::synthetic("h1", 1, 2, 2); // core0 shared, core1 = 1,3
    h.labels.insert("zone".into(), "a".into());
    s.add_host(h).expect("valid");
    s.place(&shared("a", "op", "light", 3)).unwrap();
    let e = s
        .place(&shared("b", "op", "light", 2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("h1: needs room for 2 vCPUs on a core of group `light` or a whole free core on one NUMA node; node0 has 0 whole free cores (its group core with most room has 1 free vCPU slots)"),
        "{e}"
    );
    s.place(&shared("c", "op", "light", 1)).unwrap();
}

#[test]
fn a_vnf_goes_only_to_hosts_whose_agent_offers_its_runtime() {
    let mut s = sched(ReservePolicy::None, &[small("h1", "a"), small("h2", "b")]);
    s.set_runtimes("h1", Some(vec![Runtime::Wasm])).unwrap();
    let vm = VnfRequest {
        runtime: Runtime::Vm,
        emulator: EmulatorPolicy::Share,
        ..ded("v1", 1)
    };
    assert_eq!(s.place(&vm).unwrap().act.host, "h2", "h1 runs no vm VNFs");
    s.set_runtimes("h2", Some(vec![Runtime::Vm])).unwrap();
    assert_eq!(
        s.place(&ded("w1", 1)).unwrap().act.host,
        "h1",
        "h2 runs no wasm VNFs"
    );
    // With no host offering vm, the refusal names why each host was passed over.
    s.set_runtimes("h2", Some(vec![Runtime::Wasm])).unwrap();
    let e = s
        .place(&VnfRequest {
            name: "v2".into(),
            ..vm.clone()
        })
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("does not run vm VNFs (its agent offers: wasm)"),
        "{e}"
    );
    // An update of the host's facts keeps what it offers; `None` offers every runtime again.
    let spec = s.host_spec("h2").unwrap().clone();
    s.update_host(spec).unwrap();
    assert!(
        s.place(&VnfRequest {
            name: "v3".into(),
            ..vm.clone()
        })
        .is_err()
    );
    s.set_runtimes("h2", None).unwrap();
    assert_eq!(
        s.place(&VnfRequest {
            name: "v4".into(),
            ..vm
        })
        .unwrap()
        .act
        .host,
        "h2"
    );
    assert!(s.set_runtimes("nope", None).is_err());
}
