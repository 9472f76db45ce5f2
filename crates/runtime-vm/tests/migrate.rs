//! Live migration against real QEMU under TCG: a guest that dirties memory moves to another
//! QEMU and goes on (its uptime and its dirtier's count continue, nothing rebooted), pinned
//! where the destination's configuration says; a migration to a destination that is not there
//! leaves the guest running on its source. Every QEMU is killed by a guard even when a test
//! fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{BOOT_SLOT, VmGuard};
use telvirt_runtime_vm::guest_proto::{Body, Health, Request, Workload};
use telvirt_runtime_vm::{CpuSet, MigrationTuning, VmPhase, pin};

const T: Duration = Duration::from_secs(30);

async fn health(vm: &telvirt_runtime_vm::VmHandle) -> Health {
    match vm.agent_request(Request::Health, T).await.unwrap() {
        Body::Health(h) => h,
        other => panic!("health answered {other:?}"),
    }
}

/// A loopback address nobody listens on now.
fn free_address() -> SocketAddr {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    taken.local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_dirtying_memory_moves_to_another_qemu_and_goes_on() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let src = mgr.start(common::config("migsrc")).await.unwrap();
    let _src_guard = VmGuard(src.clone());
    let dirty = Workload::DirtyMemory {
        size_mib: 32,
        mib_per_s: 20,
    };
    let started = src
        .agent_request(Request::Run { workload: dirty }, T)
        .await
        .unwrap();
    let Body::Started { workload } = started else {
        panic!("the dirtier did not start: {started:?}");
    };
    // The dirtier has written something before the move.
    let before = loop {
        let h = health(&src).await;
        if h.dirtied_mib > 0 {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    // The destination: the same guest, another name and state dir, pinned to the last CPU.
    let online: Vec<usize> = pin::online_cpus().unwrap().iter().collect();
    let target_cpu = *online.last().unwrap();
    let mut cfg = common::config("migdst");
    cfg.cpu.vcpu_cpus = vec![CpuSet::single(target_cpu)];
    let to = free_address();
    let tuning = MigrationTuning::tuned(src.accel());
    let dst = mgr.start_incoming(cfg, to, &tuning).await.unwrap();
    let _dst_guard = VmGuard(dst.clone());
    assert_eq!(dst.phase(), VmPhase::Incoming);

    let mut seen = Vec::new();
    let done = src
        .migrate_to(to, &tuning, Duration::from_secs(120), |p| {
            seen.push(p.status.clone())
        })
        .await
        .unwrap();
    assert_eq!(done.status, "completed");
    assert!(
        done.transferred_bytes > 0 && done.total_bytes >= 256 << 20,
        "{done:?}"
    );
    assert!(done.downtime_ms.is_some(), "{done:?}");
    assert!(seen.iter().any(|s| s == "active"), "{seen:?}");
    // The source holds the guest stopped until it is stopped here.
    assert_eq!(src.phase(), VmPhase::Paused);
    assert!(!src.qmp().query_status().await.unwrap().running);

    dst.finish_incoming(T).await.unwrap();
    assert_eq!(dst.phase(), VmPhase::Running);
    // The same guest goes on: no reboot, the dirtier still running and counting on.
    let after = health(&dst).await;
    assert!(
        after.uptime_ms > before.uptime_ms,
        "{before:?} -> {after:?}"
    );
    assert_eq!(
        after.workload.as_deref(),
        Some(workload.as_str()),
        "{after:?}"
    );
    let later = loop {
        let h = health(&dst).await;
        if h.dirtied_mib > after.dirtied_mib {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(later.dirtied_mib >= before.dirtied_mib);
    // Its vCPU runs on the destination's CPU.
    let vcpu = dst.vcpu_threads()[0].thread_id;
    let allowed = std::fs::read_to_string(format!("/proc/{}/task/{vcpu}/status", dst.pid()))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_owned())
        })
        .unwrap();
    assert_eq!(allowed, target_cpu.to_string());
    src.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_to_no_destination_leaves_the_guest_running_on_its_source() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let src = mgr.start(common::config("migalone")).await.unwrap();
    let _guard = VmGuard(src.clone());
    let before = health(&src).await;
    let err = src
        .migrate_to(
            free_address(),
            &MigrationTuning::tuned(src.accel()),
            Duration::from_secs(30),
            |_| {},
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("the guest runs on here"), "{err}");
    assert_eq!(src.phase(), VmPhase::Running);
    assert!(src.qmp().query_status().await.unwrap().running);
    let after = health(&src).await;
    assert!(after.uptime_ms > before.uptime_ms);
    // A VM that is not running does not move, and says so.
    src.pause().await.unwrap();
    let err = src
        .migrate_to(
            free_address(),
            &MigrationTuning::tuned(src.accel()),
            T,
            |_| {},
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only a running VM moves; this one is paused"),
        "{err}"
    );
}
