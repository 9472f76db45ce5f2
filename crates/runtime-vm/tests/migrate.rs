//! Live migration against real QEMU under TCG: a running guest moves to another QEMU and goes
//! on (its uptime continues, nothing rebooted), pinned where the destination's configuration
//! says; a migration to a destination that is not there leaves the guest running on its
//! source; the benchmark reports both tunings. A guest dirtying memory is moved by the
//! benchmark only: under QEMU 7.2's TCG some such migrations deliver a guest that panics (its
//! report counts them), which a test cannot assert away. Every QEMU is killed by a guard even
//! when a test fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{BOOT_SLOT, PidGuard, VmGuard};
use telvirt_runtime_vm::guest_proto::{Body, Health, Request};
use telvirt_runtime_vm::{CpuSet, MigrationChannel, MigrationTuning, StreamSecret, VmPhase, pin};

const T: Duration = Duration::from_secs(30);

async fn health(vm: &telvirt_runtime_vm::VmHandle) -> Health {
    match vm.agent_request(Request::Health, T).await.unwrap() {
        Body::Health(h) => h,
        other => panic!("health answered {other:?}"),
    }
}

/// Migrates `src` over `to`, which fails: the error says the guest runs on at its source, and
/// it does.
async fn fails_and_runs_on(
    src: &telvirt_runtime_vm::VmHandle,
    to: &MigrationChannel,
    tuning: &MigrationTuning,
    deadline: Duration,
) {
    let err = src
        .migrate_to(to, tuning, deadline, |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("the guest runs on here"), "{err}");
    assert_eq!(src.phase(), VmPhase::Running);
    assert!(src.qmp().query_status().await.unwrap().running);
}

/// A loopback address nobody listens on now.
fn free_address() -> SocketAddr {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    taken.local_addr().unwrap()
}

/// A destination QEMU `name` waiting on a free loopback address (the channel to stream to),
/// killed when its guard drops.
async fn waiting_destination(
    mgr: &telvirt_runtime_vm::VmManager,
    name: &str,
    tuning: &MigrationTuning,
) -> (MigrationChannel, VmGuard) {
    let to = MigrationChannel::Tcp(free_address());
    let dst = mgr
        .start_incoming(common::config(name), &to, tuning)
        .await
        .unwrap();
    (to, VmGuard(dst))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_guest_moves_over_a_passed_socket_to_another_qemu_pinned_there_and_goes_on() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let src = mgr.start(common::config("migsrc")).await.unwrap();
    // Its guest has been up since at least now (its agent answered).
    let src_ready = std::time::Instant::now();
    let _src_guard = VmGuard(src.clone());
    // Up long enough that a guest rebooted by the move would show a smaller uptime after it.
    let before = loop {
        let h = health(&src).await;
        if h.uptime_ms >= 8_000 {
            break h;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The stream crosses a connection the caller made (as agents do), sealed by a relay at
    // each end with a key both ends are given; each QEMU streams into its relay's socket.
    let secret = StreamSecret::new([7; StreamSecret::LEN]);
    let encrypted = |secret: &StreamSecret| {
        let (out, into) = std::os::unix::net::UnixStream::pair().unwrap();
        (
            MigrationChannel::encrypted(out.into(), secret.clone()),
            MigrationChannel::encrypted(into.into(), secret.clone()),
        )
    };
    let tuning = src.tuning();

    // A destination given another key: its first frame does not open, the destination's
    // relay closes the connection, and the guest runs on here (a stream in the clear would
    // have moved the guest).
    let (out, into) = std::os::unix::net::UnixStream::pair().unwrap();
    let (to, from) = (
        MigrationChannel::encrypted(out.into(), secret.clone()),
        MigrationChannel::encrypted(into.into(), StreamSecret::new([8; StreamSecret::LEN])),
    );
    // A descriptor of this process without close-on-exec, as a guest's RAM is that the node's
    // vhost-user daemon received: no relay may hold it.
    // SAFETY: memfd_create with a valid name; the descriptor is owned below.
    let stand_in = unsafe { libc::memfd_create(c"guest-ram-stand-in".as_ptr(), 0) };
    assert!(stand_in >= 0, "{}", std::io::Error::last_os_error());
    // SAFETY: a descriptor this test just made and nothing else owns.
    let _stand_in =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(stand_in) };
    let stranger = mgr
        .start_incoming(common::config("migother"), &from, &tuning)
        .await
        .unwrap();
    let _stranger_guard = VmGuard(stranger.clone());
    // The relay holds its own copy of the socket: this one closed, as an agent's is.
    drop(from);
    // The destination's relay, waiting for the stream, holds its stdio, the connection (3) and
    // its QEMU's end (4): nothing else of this process. Polled: a descriptor inherited stays
    // for good, while one seen once under load (make test, not reproduced; what it was went
    // unrecorded) may be the relay's own for a moment; what each is comes with a failure.
    let relay = relay_of("destination").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let held = telvirt_files::proc::descriptors(relay).unwrap();
        if held == [0, 1, 2, 3, 4] {
            break;
        }
        let what: Vec<String> = held
            .iter()
            .map(|fd| {
                let target = std::fs::read_link(format!("/proc/{relay}/fd/{fd}"));
                format!("{fd} -> {target:?}")
            })
            .collect();
        assert!(
            std::time::Instant::now() < deadline,
            "relay {relay} holds {what:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It relays under a seccomp filter of its own (one more than this process runs under),
    // installed once it has its key and sockets: polled.
    let ours = telvirt_files::proc::seccomp_filters(std::process::id() as i32).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let filters = telvirt_files::proc::seccomp_filters(relay).unwrap();
        if filters == ours + 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "relay {relay} runs under {filters} seccomp filters, this test under {ours}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It runs as its QEMU's own uid where QEMU has one (as root: ADR 068), not as this process.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let own = stranger.confinement().filter(|c| c.own_uid).map(|c| c.uid);
        let uid = own.expect("as root, each QEMU has a uid of its own");
        // It changes its uid first thing after it starts: polled.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let uids = telvirt_files::proc::uids(relay).unwrap();
            if uids == [uid; 4] {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "relay {relay} runs as {uids:?}, not {uid}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    fails_and_runs_on(&src, &to, &tuning, Duration::from_secs(60)).await;
    // It took nothing: its stream ended before any of the guest opened.
    assert!(
        stranger
            .finish_incoming(Duration::from_secs(5))
            .await
            .is_err()
    );

    // The destination: the same guest, another name and state dir, pinned to the last CPU.
    let online: Vec<usize> = pin::online_cpus().unwrap().iter().collect();
    let target_cpu = *online.last().unwrap();
    let mut cfg = common::config("migdst");
    cfg.cpu.vcpu_cpus = vec![CpuSet::single(target_cpu)];
    // Another connection, another key (a key seals one stream).
    let (to, from) = encrypted(&StreamSecret::new([9; StreamSecret::LEN]));
    let dst = mgr.start_incoming(cfg, &from, &tuning).await.unwrap();
    let _dst_guard = VmGuard(dst.clone());
    assert_eq!(dst.phase(), VmPhase::Incoming);

    // Through its commit point: asked once, with the guest stopped here, and let through.
    let mut seen = Vec::new();
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let gate: telvirt_runtime_vm::SwitchoverGate = {
        let (asked, src) = (asked.clone(), src.clone());
        Box::new(move || {
            let (asked, src) = (asked.clone(), src.clone());
            Box::pin(async move {
                let running = src.qmp().query_status().await.unwrap().running;
                asked.lock().unwrap().push(running);
                true
            })
        })
    };
    let done = src
        .migrate_to_gated(
            &to,
            &tuning,
            Duration::from_secs(120),
            |p| seen.push(p.status.clone()),
            Some(gate),
        )
        .await
        .unwrap();
    assert_eq!(done.status, "completed");
    assert_eq!(
        *asked.lock().unwrap(),
        [false],
        "asked once, the guest stopped"
    );
    assert!(seen.iter().any(|s| s == "pre-switchover"), "{seen:?}");
    assert!(
        done.transferred_bytes > 0 && done.total_bytes >= 256 << 20,
        "{done:?}"
    );
    assert!(done.downtime_ms.is_some(), "{done:?}");
    assert!(seen.iter().any(|s| s == "active"), "{seen:?}");
    // The source holds a stopped copy until it is stopped here, and never resumes it.
    assert_eq!(src.phase(), VmPhase::Migrated);
    assert!(!src.qmp().query_status().await.unwrap().running);
    let err = src.resume().await.unwrap_err().to_string();
    assert!(err.contains("migrated"), "{err}");

    // Its agent answered here, stating the guest's uptime: up since before the source's
    // start returned (it did not boot again here).
    let uptime = dst.finish_incoming(T).await.unwrap();
    assert!(
        uptime.is_some_and(|up| up >= src_ready.elapsed()),
        "{uptime:?} against {:?} since the source ran",
        src_ready.elapsed()
    );
    assert_eq!(dst.phase(), VmPhase::Running);
    // Its whole pause: from when the source's QEMU began stopping the guest until its resume
    // here, by the two QEMUs' own times on this host's clock.
    let (stopped, resumed) = (done.stopped_at_us.unwrap(), dst.resumed_at_us().unwrap());
    assert!(resumed > stopped, "stopped {stopped}, resumed {resumed}");
    // Where the pause went: stopped, at the commit point, let through, the last byte sent,
    // resumed, in that order by QEMU's own event times.
    let phases = telvirt_model::api::PausePhases::of(
        &telvirt_model::api::GuestStream {
            stopped_at_us: done.stopped_at_us,
            commit_point_at_us: done.commit_point_at_us,
            continued_at_us: done.continued_at_us,
            completed_at_us: done.completed_at_us,
            ..Default::default()
        },
        Some(resumed),
    )
    .unwrap_or_else(|| panic!("no phases in {done:?}, resumed {resumed}"));
    assert!(
        phases.stopping_ms.is_some() && phases.commit_point_ms.is_some(),
        "{phases:?} from {done:?}"
    );
    // The pause holds QEMU's own downtime (until the source's last byte) when the destination
    // resumed after that byte by the stamps (its part stated): on a loaded host the source
    // may stamp its last byte only after the destination already resumed.
    let downtime_us = done.downtime_ms.unwrap() * 1000;
    if phases.destination_ms.is_some() {
        assert!(
            resumed - stopped >= downtime_us,
            "stopped {stopped}, resumed {resumed}, downtime {downtime_us} µs"
        );
    }
    // The same guest goes on: no reboot (its uptime continues past the 8 s it had; a fresh
    // boot answers after about 3 s), its agent answers here.
    let after = health(&dst).await;
    assert!(
        after.uptime_ms > before.uptime_ms,
        "{before:?} -> {after:?}"
    );
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
async fn the_migration_benchmark_reports_both_tunings_and_whether_the_guest_came_through() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let img = common::image();
    let mut guest = telvirt_runtime_vm::BenchOptions::new(&img.kernel, &img.initrd, root.path());
    guest.rounds = 1;
    guest.accel = telvirt_runtime_vm::AccelChoice::Tcg;
    let opts = telvirt_runtime_vm::migrate_bench::MigrateBenchOptions {
        guest,
        dirty_mib: 32,
        rates: vec![0],
        deadline: Duration::from_secs(60),
    };
    let mut steps = Vec::new();
    let report = telvirt_runtime_vm::migrate_bench::run(&opts, &mut |d, t| steps.push((d, t)))
        .await
        .unwrap();
    assert_eq!(steps.last(), Some(&(2, 2)));
    assert_eq!(report.rates.len(), 1);
    let idle = &report.rates[0];
    for side in [&idle.telvirt, &idle.qemu_defaults] {
        assert_eq!(side.samples.len(), 1);
        // An idle guest converges and comes through.
        assert_eq!((side.converged, side.intact), (1, 1), "{side:?}");
        assert!(
            side.total_ms > 0.0 && side.transferred_mib > 0.0,
            "{side:?}"
        );
        assert_eq!(side.samples[0].failed, None);
        // The whole pause (source stop to destination resume) and QEMU's downtime are both
        // measured. (Whether the pause holds the downtime depends on the destination resuming
        // after the source stamped its last byte, which a loaded host may reorder: the
        // migration test above checks it where the stamps say so.)
        let (paused, downtime) = (side.samples[0].paused_ms, side.samples[0].downtime_ms);
        assert!(
            paused.is_some_and(|p| p > 0.0) && downtime.is_some() && side.paused_ms > 0.0,
            "{side:?}"
        );
    }
    assert!(idle.telvirt.tuning.auto_converge && !idle.qemu_defaults.tuning.auto_converge);
    // telvirt's side streams as its agents do: one passed connection, so no multifd.
    assert!(
        idle.telvirt.channel.contains("passed") && idle.telvirt.tuning.multifd_channels == 0,
        "{:?}",
        idle.telvirt
    );
    assert!(idle.qemu_defaults.channel.contains("QEMU's own"));
    let ratio = idle.telvirt.total_ms / idle.qemu_defaults.total_ms;
    assert!((idle.total_ratio - ratio).abs() < 1e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_to_no_destination_or_past_its_deadline_leaves_the_guest_running_on_its_source()
{
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let src = mgr.start(common::config("migalone")).await.unwrap();
    let _guard = VmGuard(src.clone());
    let before = health(&src).await;
    fails_and_runs_on(
        &src,
        &MigrationChannel::Tcp(free_address()),
        &src.tuning(),
        Duration::from_secs(30),
    )
    .await;
    // Not rebooted, and its clock goes on (`/proc/uptime` counts in 10 ms steps, and a refused
    // connection fails faster than that).
    let after = health(&src).await;
    assert!(
        after.uptime_ms >= before.uptime_ms,
        "{before:?} then {after:?}"
    );
    let deadline = std::time::Instant::now() + T;
    while health(&src).await.uptime_ms <= before.uptime_ms {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest's clock stood still"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A migration past its deadline is cancelled, and the guest runs on here.
    let tuning = src.tuning();
    let (to, _late) = waiting_destination(&mgr, "migtoolate", &tuning).await;
    let err = src
        .migrate_to(&to, &tuning, Duration::from_millis(1), |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not done within") && err.contains("the guest runs on here"),
        "{err}"
    );
    assert_eq!(src.phase(), VmPhase::Running);
    assert!(src.qmp().query_status().await.unwrap().running);
    health(&src).await;
    // A migration its commit point does not let through is cancelled with the guest stopped
    // for its final copy: the guest runs on here, and the destination never got it.
    let (to, refused) = waiting_destination(&mgr, "migrefused", &tuning).await;
    let refuse: telvirt_runtime_vm::SwitchoverGate = Box::new(|| Box::pin(async { false }));
    let mut seen = Vec::new();
    let err = src
        .migrate_to_gated(
            &to,
            &tuning,
            T,
            |p| seen.push(p.status.clone()),
            Some(refuse),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cancelled at its commit point") && err.contains("the guest runs on here"),
        "{err}"
    );
    assert!(seen.iter().any(|s| s == "pre-switchover"), "{seen:?}");
    assert_eq!(src.phase(), VmPhase::Running);
    assert!(src.qmp().query_status().await.unwrap().running);
    let after = health(&src).await;
    assert!(
        after.uptime_ms >= before.uptime_ms,
        "{before:?} then {after:?}"
    );
    assert_ne!(refused.0.phase(), VmPhase::Running);
    // A completed stream whose guest never ran at its destination (that QEMU gone, as after
    // an arrival that broke): the copy the source kept resumes there, the same guest (its
    // clock goes on from where it stopped). Only such a copy resumes that way.
    let err = src.resume_moved_copy().await.unwrap_err().to_string();
    assert!(
        err.contains("only a copy left by a completed stream"),
        "{err}"
    );
    let stopped = health(&src).await.uptime_ms;
    let (to, lost) = waiting_destination(&mgr, "miglost", &tuning).await;
    let done = src.migrate_to(&to, &tuning, T, |_| {}).await.unwrap();
    assert_eq!(done.status, "completed");
    assert_eq!(src.phase(), VmPhase::Migrated);
    lost.0.kill().await.unwrap();
    src.resume_moved_copy().await.unwrap();
    assert_eq!(src.phase(), VmPhase::Running);
    assert!(src.qmp().query_status().await.unwrap().running);
    let resumed = health(&src).await;
    assert!(
        resumed.uptime_ms >= stopped,
        "up {stopped} ms before the stream, {resumed:?} after"
    );
    // A VM that is not running does not move, and says so.
    src.pause().await.unwrap();
    let err = src
        .migrate_to(
            &MigrationChannel::Tcp(free_address()),
            &src.tuning(),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adopted_qemu_ends_the_stream_its_gone_agent_left_at_the_commit_point_and_runs_on() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let (pid, before) = {
        let mgr = common::manager(root.path());
        let src = mgr.start(common::config("migorphan")).await.unwrap();
        let before = health(&src).await;
        let tuning = src.tuning();
        let (to, _dst) = waiting_destination(&mgr, "migorphandst", &tuning).await;
        // The agent reaches the commit point and goes away before it answers: the guest waits
        // stopped at its final copy, with nobody to let it through or cancel it.
        let (at, reached) = tokio::sync::oneshot::channel();
        let mut at = Some(at);
        let gate: telvirt_runtime_vm::SwitchoverGate = Box::new(move || {
            let at = at.take();
            Box::pin(async move {
                if let Some(at) = at {
                    let _ = at.send(());
                }
                std::future::pending::<bool>().await
            })
        });
        let task = tokio::spawn({
            let src = src.clone();
            async move {
                src.migrate_to_gated(&to, &tuning, T, |_| {}, Some(gate))
                    .await
            }
        });
        tokio::time::timeout(T, reached).await.unwrap().unwrap();
        assert!(!src.qmp().query_status().await.unwrap().running);
        task.abort();
        let _ = task.await;
        (src.pid(), before)
        // The handles go away; QEMU keeps running, its guest stopped.
    };
    let _guard = PidGuard(pid);
    let vm = common::manager(root.path())
        .adopt("migorphan")
        .await
        .unwrap();
    // Adopted, the stream is ended and the guest runs on here: the same guest, its clock on.
    assert_eq!(vm.phase(), VmPhase::Running);
    assert!(vm.outgoing_stream_undone(), "the move did not happen");
    assert!(vm.qmp().query_status().await.unwrap().running);
    let after = health(&vm).await;
    assert!(
        after.uptime_ms > before.uptime_ms,
        "{before:?} then {after:?}"
    );
    let status = vm.status().await;
    assert!(
        status
            .warnings
            .iter()
            .any(|w| w.contains("(pre-switchover) was left by the agent that started it")),
        "{:?}",
        status.warnings
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_adopted_mid_stream_runs_the_guest_that_arrived_by_itself() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let src = mgr.start(common::config("migadopt")).await.unwrap();
    let _src_guard = VmGuard(src.clone());
    let before = health(&src).await;
    let tuning = src.tuning();
    // The destination takes the stream; then its handle goes away, as with its agent.
    let to = MigrationChannel::Tcp(free_address());
    let dst_pid = {
        let dst = mgr
            .start_incoming(common::config("migadoptdst"), &to, &tuning)
            .await
            .unwrap();
        dst.pid()
    };
    let _dst_guard = PidGuard(dst_pid);
    // The source holds its final copy until the destination was adopted mid-stream.
    let (reached_tx, reached) = tokio::sync::oneshot::channel();
    let (go_tx, go) = tokio::sync::oneshot::channel::<bool>();
    let mut gate_ends = Some((reached_tx, go));
    let gate: telvirt_runtime_vm::SwitchoverGate = Box::new(move || {
        let ends = gate_ends.take();
        Box::pin(async move {
            let Some((reached, go)) = ends else {
                return false;
            };
            let _ = reached.send(());
            go.await.unwrap_or(false)
        })
    });
    let task = tokio::spawn({
        let src = src.clone();
        async move {
            src.migrate_to_gated(&to, &tuning, Duration::from_secs(120), |_| {}, Some(gate))
                .await
        }
    });
    tokio::time::timeout(T, reached).await.unwrap().unwrap();
    let dst = common::manager(root.path())
        .adopt("migadoptdst")
        .await
        .unwrap();
    assert_eq!(dst.phase(), VmPhase::Incoming);
    assert!(dst.incoming_stream_taken(), "its stream runs");
    assert!(!dst.outgoing_stream_undone(), "a destination sends nothing");
    go_tx.send(true).unwrap();
    let done = tokio::time::timeout(Duration::from_secs(150), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(done.status, "completed");
    // The destination loaded it all and resumed the guest itself as the stream completed
    // (the stream was taken with QEMU's autostart set), though nobody watched it.
    let deadline = std::time::Instant::now() + T;
    while !dst.qmp().query_status().await.unwrap().running {
        assert!(
            std::time::Instant::now() < deadline,
            "the destination did not resume the guest that arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Adopted again, it is a running guest, the same one, its clock on.
    drop(dst);
    let dst = common::manager(root.path())
        .adopt("migadoptdst")
        .await
        .unwrap();
    assert_eq!(dst.phase(), VmPhase::Running);
    let after = health(&dst).await;
    assert!(
        after.uptime_ms > before.uptime_ms,
        "{before:?} then {after:?}"
    );
    // Resumed, it is an ordinary guest for the next adopter: paused by an operator, it stays
    // paused.
    dst.pause().await.unwrap();
    drop(dst);
    let dst = common::manager(root.path())
        .adopt("migadoptdst")
        .await
        .unwrap();
    assert_eq!(dst.phase(), VmPhase::Paused);
    src.kill().await.unwrap();
}

/// The sealing relay (`end`) this test process started, once it runs (polled up to 10 s).
async fn relay_of(end: &str) -> i32 {
    let me = i32::try_from(std::process::id()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let found = telvirt_files::proc::pids().into_iter().find(|&pid| {
            telvirt_files::proc::parent(pid) == Some(me)
                && telvirt_files::proc::command_line(pid).is_some_and(|c| {
                    c.contains("telvirt-stream-relay") && c.contains(&format!(" {end}"))
                })
        });
        if let Some(pid) = found {
            return pid;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no {end} relay started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether process `pid` sleeps in `poll` or `ppoll`, or in the `restart_syscall` a `poll`
/// that was stopped and continued resumes as (the first number of its `/proc` syscall line).
fn waits_in_poll(pid: i32) -> bool {
    #[cfg(target_arch = "x86_64")]
    let polls = [libc::SYS_poll, libc::SYS_ppoll, libc::SYS_restart_syscall];
    #[cfg(not(target_arch = "x86_64"))]
    let polls = [libc::SYS_ppoll, libc::SYS_restart_syscall];
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .ok()
        .and_then(|line| line.split_whitespace().next()?.parse::<i64>().ok())
        .is_some_and(|call| polls.contains(&call))
}

/// Polls (up to 10 s) until `relay` sleeps in a system call and `waiting` says it is in the
/// one expected; fails when it ended meanwhile.
fn relay_waits(relay: &mut std::process::Child, what: &str, waiting: fn(i32) -> bool) {
    let pid = relay.id() as i32;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = relay.try_wait().unwrap() {
            panic!("the {what} relay ended while it should wait: {status}");
        }
        let sleeping = telvirt_files::proc::state_and_session(pid).is_some_and(|(s, _)| s == 'S');
        if sleeping && waiting(pid) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the {what} relay never waited"
        );
        std::thread::yield_now();
    }
}

/// Stops `relay` and lets it go on, as a debugger attaching or a freezer would.
fn stop_and_continue(relay: &std::process::Child) {
    let pid = relay.id() as i32;
    // SAFETY: plain system calls on a child this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while telvirt_files::proc::state_and_session(pid).is_none_or(|(s, _)| s != 'T') {
        assert!(
            std::time::Instant::now() < deadline,
            "relay {pid} never stopped"
        );
        std::thread::yield_now();
    }
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
}

#[test]
fn sealing_relays_stopped_and_continued_while_they_wait_relay_and_end_cleanly() {
    use std::io::{Read, Write};
    use std::os::fd::OwnedFd;
    use telvirt_runtime_vm::migrate::StreamEnd;
    use telvirt_runtime_vm::stream_seal::start_relay;

    let secret = StreamSecret::random().unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let out = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (into, _) = listener.accept().unwrap();
    let program = common::relay_program();
    // Each relay holds its own copy of its end of the connection; this test's goes.
    let start = |end, connection: std::net::TcpStream| {
        start_relay(&program, &OwnedFd::from(connection), &secret, end, None).unwrap()
    };
    let (to_qemu, mut destination) = start(StreamEnd::Destination, into);
    let (from_qemu, mut source) = start(StreamEnd::Source, out);
    let _ended = (
        PidGuard(destination.id() as i32),
        PidGuard(source.id() as i32),
    );
    // Each waits under its filter (the destination in poll, for the first frame; the source
    // in a read, for QEMU's first bytes), is stopped and continued, and waits on: a wait that
    // resumes (`restart_syscall` after poll) is one of relaying's system calls.
    relay_waits(&mut destination, "destination", waits_in_poll);
    relay_waits(&mut source, "source", |_| true);
    for relay in [&destination, &source] {
        stop_and_continue(relay);
    }
    relay_waits(&mut destination, "destination", waits_in_poll);
    relay_waits(&mut source, "source", |_| true);
    // Then the stream crosses whole, and each relay ends as a relay that did its work does.
    let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let writer = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            let mut qemu = std::os::unix::net::UnixStream::from(from_qemu);
            qemu.write_all(&sent).unwrap();
        })
    };
    let mut got = Vec::new();
    std::os::unix::net::UnixStream::from(to_qemu)
        .read_to_end(&mut got)
        .unwrap();
    writer.join().unwrap();
    assert!(got == sent, "{} bytes arrived of {}", got.len(), sent.len());
    for (what, relay) in [("source", &mut source), ("destination", &mut destination)] {
        let status = relay.wait().unwrap();
        assert!(status.success(), "the {what} relay ended: {status}");
    }
}
