//! VM lifecycle against real QEMU under TCG: start → Running after the guest agent, pinning
//! read back from /proc, lock/unlock, peripherals and their error cases, graceful stop, crash
//! detection, re-adoption. Every QEMU is killed by a guard even when a test fails.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::Duration;

use common::{BOOT_SLOT, PidGuard, VmGuard};
use telvirt_runtime_vm::guest_proto::{Body, Request, Workload};
use telvirt_runtime_vm::uid_lease::{LEASE_DIR, OWN_UIDS, UidLease};
use telvirt_runtime_vm::{
    AccelChoice, AccelProbe, CpuPlacement, CpuSet, DiskFormat, DiskImage, Error, Grant,
    HugePageSize, Peripheral, QmpEvent, StopMethod, VmPhase, pin,
};

const T: Duration = Duration::from_secs(30);

/// The next STOP or RESUME event (others are skipped), within 10 s.
async fn next_lifecycle_event(rx: &mut tokio::sync::broadcast::Receiver<QmpEvent>) -> QmpEvent {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match rx.recv().await.unwrap() {
                e @ (QmpEvent::Stop | QmpEvent::Resume) => return e,
                _ => continue,
            }
        }
    })
    .await
    .expect("a STOP or RESUME event within 10 s")
}

struct Tap(String);

impl Tap {
    fn new(name: &str) -> Option<Self> {
        let ok = std::process::Command::new("ip")
            .args(["tuntap", "add", "dev", name, "mode", "tap"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| Tap(name.to_string()))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.0])
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_pinning_lock_peripherals_and_stop() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let online = pin::online_cpus().unwrap();
    let cpus: Vec<usize> = online.iter().collect();
    let vcpu_cpu = *cpus.last().unwrap();
    let emu_cpu = cpus[0];
    let mut cfg = common::config("lifecycle1");
    cfg.cpu.vcpu_cpus = vec![CpuSet::single(vcpu_cpu)];
    cfg.cpu.emulator_cpus = Some(CpuSet::single(emu_cpu));
    cfg.peripherals = vec![Grant {
        id: "rng0".into(),
        peripheral: Peripheral::VirtioRng,
    }];
    let vm = mgr.start(cfg).await.unwrap();
    let guard = VmGuard(vm.clone());
    assert_eq!(vm.phase(), VmPhase::Running);
    let pid = vm.pid();

    // The process carries the VNF's name.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "lifecycle1");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains("guest=lifecycle1"));

    // Pinning, as the kernel reports it.
    assert_eq!(vm.vcpu_threads().len(), 1);
    let vcpu_tids: Vec<i32> = vm.vcpu_threads().iter().map(|v| v.thread_id).collect();
    for &tid in &vcpu_tids {
        assert_eq!(
            pin::allowed_cpus(pid, tid).unwrap(),
            CpuSet::single(vcpu_cpu),
            "vCPU thread {tid}"
        );
    }
    for tid in pin::thread_ids(pid).unwrap() {
        if !vcpu_tids.contains(&tid) {
            assert_eq!(
                pin::allowed_cpus(pid, tid).unwrap(),
                CpuSet::single(emu_cpu),
                "emulator thread {tid}"
            );
        }
    }

    // Health from the guest agent.
    let h1 = vm.health(T).await.unwrap();
    assert!(h1.uptime_ms > 0);
    assert!(h1.mem_total_kib > 100 * 1024, "{h1:?}");

    // A re-pin moves the threads while the guest runs on (its clock goes on: no reboot),
    // then back.
    for (vcpu, emu) in [(emu_cpu, vcpu_cpu), (vcpu_cpu, emu_cpu)] {
        vm.repin(&CpuPlacement {
            vcpu_cpus: vec![CpuSet::single(vcpu)],
            emulator_cpus: Some(CpuSet::single(emu)),
            realtime_priority: None,
        })
        .await
        .unwrap();
        for tid in pin::thread_ids(pid).unwrap() {
            let want = if vcpu_tids.contains(&tid) { vcpu } else { emu };
            assert_eq!(
                pin::allowed_cpus(pid, tid).unwrap(),
                CpuSet::single(want),
                "thread {tid} after the re-pin to vCPU {vcpu}, emulator {emu}"
            );
        }
        let after = vm.health(T).await.unwrap();
        assert!(after.uptime_ms >= h1.uptime_ms, "{h1:?} then {after:?}");
    }

    // Lock: paused, changes refused, nothing changed.
    let mut events = vm.qmp().events();
    vm.pause().await.unwrap();
    assert_eq!(next_lifecycle_event(&mut events).await, QmpEvent::Stop);
    assert_eq!(vm.phase(), VmPhase::Paused);
    assert!(!vm.qmp().query_status().await.unwrap().running);
    let err = vm
        .attach(Grant {
            id: "ser1".into(),
            peripheral: Peripheral::VirtioSerial {
                name: "org.x.data".into(),
            },
        })
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Locked { .. }), "{err}");
    assert!(matches!(
        vm.detach("rng0").await.unwrap_err(),
        Error::Locked { .. }
    ));
    assert_eq!(vm.peripherals().await.len(), 1);
    vm.resume().await.unwrap();
    assert_eq!(next_lifecycle_event(&mut events).await, QmpEvent::Resume);
    assert_eq!(vm.phase(), VmPhase::Running);
    let h2 = vm.health(T).await.unwrap();
    assert!(
        h2.uptime_ms >= h1.uptime_ms,
        "guest clock went back: {h1:?} {h2:?}"
    );

    // Peripherals: serial port, duplicate, missing, block device, TAP.
    vm.attach(Grant {
        id: "ser1".into(),
        peripheral: Peripheral::VirtioSerial {
            name: "org.x.data".into(),
        },
    })
    .await
    .unwrap();
    assert!(vm.state_dir().join("ser1.sock").exists());
    let dup = vm
        .attach(Grant {
            id: "ser1".into(),
            peripheral: Peripheral::VirtioRng,
        })
        .await
        .unwrap_err();
    assert!(matches!(dup, Error::DuplicatePeripheral { .. }), "{dup}");
    let missing = vm.detach("nope").await.unwrap_err();
    assert!(missing.to_string().contains("rng0, ser1"), "{missing}");
    let ids = vm.qmp().peripheral_ids().await.unwrap();
    assert!(
        ids.contains(&"ser1".to_string()) && ids.contains(&"rng0".to_string()),
        "{ids:?}"
    );
    vm.detach("ser1").await.unwrap();
    assert!(
        !vm.qmp()
            .peripheral_ids()
            .await
            .unwrap()
            .contains(&"ser1".to_string())
    );

    let img = root.path().join("data.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let bad = vm
        .attach(Grant {
            id: "disk1".into(),
            peripheral: Peripheral::VirtioBlk {
                path: root.path().join("missing.img"),
                format: DiskFormat::Raw,
                read_only: false,
            },
        })
        .await
        .unwrap_err();
    assert!(bad.to_string().contains("missing.img"), "{bad}");
    vm.attach(Grant {
        id: "disk1".into(),
        peripheral: Peripheral::VirtioBlk {
            path: img,
            format: DiskFormat::Raw,
            read_only: true,
        },
    })
    .await
    .unwrap();
    vm.detach("disk1").await.unwrap();
    vm.detach("rng0").await.unwrap();

    let tap_name = format!("tvt{}", std::process::id() % 100_000);
    if let Some(_tap) = Tap::new(&tap_name) {
        vm.attach(Grant {
            id: "net0".into(),
            peripheral: Peripheral::VirtioNet {
                tap: tap_name.clone(),
                mac: None,
            },
        })
        .await
        .unwrap();
        assert_eq!(vm.peripherals().await.len(), 1);
        vm.detach("net0").await.unwrap();
    }
    let no_tap = vm
        .attach(Grant {
            id: "net1".into(),
            peripheral: Peripheral::VirtioNet {
                tap: "tvnosuch0".into(),
                mac: None,
            },
        })
        .await
        .unwrap_err();
    assert!(no_tap.to_string().contains("does not exist"), "{no_tap}");
    assert!(vm.peripherals().await.is_empty());
    let grants: Vec<Grant> =
        serde_json::from_slice(&std::fs::read(vm.state_dir().join("grants.json")).unwrap())
            .unwrap();
    assert!(grants.is_empty());

    // Workload on command.
    let started = vm
        .agent_request(
            Request::Run {
                workload: Workload::DirtyMemory {
                    size_mib: 16,
                    mib_per_s: 64,
                },
            },
            T,
        )
        .await
        .unwrap();
    assert!(matches!(started, Body::Started { .. }), "{started:?}");
    assert!(vm.health(T).await.unwrap().workload.is_some());
    vm.agent_request(Request::StopWorkload, T).await.unwrap();
    let probe = vm
        .agent_request(
            Request::Run {
                workload: Workload::TimerLatency {
                    interval_us: 1000,
                    count: 50,
                },
            },
            T,
        )
        .await
        .unwrap();
    match probe {
        Body::TimerResult(t) => {
            assert_eq!(t.count, 50);
            assert!(t.min_us <= t.avg_us && t.avg_us <= t.max_us, "{t:?}");
        }
        other => panic!("unexpected {other:?}"),
    }

    // Graceful stop through the guest agent.
    assert_eq!(vm.stop().await.unwrap(), StopMethod::GuestAgent);
    assert_eq!(vm.phase(), VmPhase::Stopped);
    assert!(vm.failure().is_none());
    assert!(!pin::process_alive(pid));
    let console = std::fs::read_to_string(vm.console_log()).unwrap();
    assert!(
        console.contains("telvirt-init: modules loaded"),
        "{console}"
    );
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_is_detected_with_status_and_console() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    // Logs held to 1 KiB: the guest's boot passes that on its console (every kernel message
    // printed there, below).
    let mgr = common::manager(root.path()).log_cap(1024);

    // A missing kernel is refused before anything starts.
    let mut bad = common::config("crash1");
    bad.kernel = Some(root.path().join("no-such-vmlinuz"));
    let e = mgr.start(bad).await.unwrap_err();
    assert!(
        matches!(
            e,
            Error::FileUnreadable {
                field: "kernel",
                ..
            }
        ),
        "{e}"
    );
    assert!(!root.path().join("crash1/qemu.pid").exists());

    // Shared memfd guest RAM and SCHED_FIFO vCPUs (or a warning where not permitted).
    let mut cfg = common::config("crash1");
    cfg.append =
        Some(telvirt_runtime_vm::image::DEFAULT_APPEND.replace("loglevel=4", "loglevel=8"));
    cfg.shared_memory = true;
    // SAFETY: geteuid has no preconditions. Locking 256 MiB needs root (RLIMIT_MEMLOCK).
    let root_user = unsafe { libc::geteuid() } == 0;
    cfg.lock_memory = root_user;
    cfg.cpu.realtime_priority = Some(1);
    // Resource and peripheral checks refuse before any process starts.
    let mut huge = cfg.clone();
    huge.hugepages = Some(HugePageSize::Size1G);
    huge.memory_mib = 1024 * 1024;
    let e = mgr.start(huge).await.unwrap_err();
    assert!(
        matches!(e, Error::HugePagesShort { .. } | Error::HugePages(_)),
        "{e}"
    );
    let mut vfio = cfg.clone();
    vfio.peripherals = vec![Grant {
        id: "nic0".into(),
        peripheral: Peripheral::Vfio {
            host: "0000:3b:00.0".into(),
        },
    }];
    let e = mgr.start(vfio).await.unwrap_err();
    assert!(matches!(e, Error::PeripheralRefused { .. }), "{e}");
    assert!(!root.path().join("crash1/qemu.pid").exists());

    let vm = mgr.start(cfg).await.unwrap();
    let _guard = VmGuard(vm.clone());
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.pid())).unwrap();
    let locked_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmLck:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    assert!(
        !root_user || locked_kib >= 256 * 1024,
        "guest memory not locked: VmLck {locked_kib} kB"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid())).unwrap();
    assert!(
        maps.contains("/memfd:memory-backend-memfd"),
        "guest RAM is not a memfd"
    );
    let st = vm.status().await;
    // Locked memory and an unprivileged QEMU: either QEMU dropped its user (the limit could be
    // lifted) or it kept telvirt's and the status says why.
    let applied = vm.confinement().unwrap();
    assert!(
        applied.dropped || !root_user || st.warnings.iter().any(|w| w.contains("RLIMIT_MEMLOCK")),
        "{applied:?} {:?}",
        st.warnings
    );
    for v in vm.vcpu_threads() {
        let policy = pin::sched_policy(vm.pid(), v.thread_id).unwrap();
        assert!(
            policy == 1 || !st.warnings.is_empty(),
            "vCPU {v:?} policy {policy}, no warning"
        );
    }
    // The console past its cap: its older half in console.log.1, the log itself within the
    // cap and written on from its start (QEMU appends: no hole where the rotation emptied it).
    let console = vm.console_log();
    let older = root.path().join("crash1/console.log.1");
    assert!(
        common::poll_until(20, || older.exists()
            && std::fs::metadata(&console).is_ok_and(|m| m.len() <= 1024))
        .await,
        "console.log.1 {:?}, console.log {:?} bytes",
        std::fs::metadata(&older).map(|m| m.len()),
        std::fs::metadata(&console).map(|m| m.len())
    );
    assert!(std::fs::metadata(&older).unwrap().len() <= 512);
    assert!(!std::fs::read(&console).unwrap().contains(&0), "a hole");
    // A second start of the same VM is refused instead of duplicating it.
    let dup = mgr.start(common::config("crash1")).await.unwrap_err();
    assert!(matches!(dup, Error::AlreadyRunning { .. }), "{dup}");

    // SAFETY: killing the QEMU this test started.
    unsafe { libc::kill(vm.pid(), libc::SIGKILL) };
    assert!(
        common::poll_until(20, || vm.phase() == VmPhase::Failed).await,
        "phase {:?}",
        vm.phase()
    );
    let f = vm.failure().unwrap();
    assert_eq!(f.exit.signal, Some(libc::SIGKILL));
    assert!(
        f.console_tail.iter().any(|l| l.contains("telvirt-guest")),
        "{:?}",
        f.console_tail
    );
    let st = vm.status().await;
    assert_eq!(st.phase, VmPhase::Failed);
    assert!(matches!(
        vm.pause().await.unwrap_err(),
        Error::NotRunning { .. }
    ));
    // The console stays readable through the manager, and the state can be removed.
    assert!(!mgr.console_tail("crash1", 5).is_empty());
    assert!(matches!(
        mgr.adopt("crash1").await.unwrap_err(),
        Error::NotAdoptable { .. }
    ));
    mgr.remove("crash1").unwrap();
    assert!(!root.path().join("crash1").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_manager_adopts_running_vm() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let pid = {
        let mgr = common::manager(root.path());
        // A raw disk image the VM sees as its first disk, and one granted peripheral.
        let disk = root.path().join("disk.raw");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        let mut cfg = common::config("adopt1");
        cfg.disk = Some(DiskImage {
            path: disk,
            format: DiskFormat::Raw,
        });
        cfg.peripherals = vec![Grant {
            id: "rng0".into(),
            peripheral: Peripheral::VirtioRng,
        }];
        let vm = mgr.start(cfg).await.unwrap();
        vm.pid()
        // The first manager and its handle go away; QEMU keeps running.
    };
    let _guard = PidGuard(pid);
    assert!(pin::process_alive(pid));
    let mgr2 = common::manager(root.path());
    let all = mgr2.adopt_all().await;
    assert_eq!(all.len(), 1);
    let (name, vm) = all.into_iter().next().unwrap();
    assert_eq!(name, "adopt1");
    let vm = vm.unwrap();
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.phase(), VmPhase::Running);
    assert!(vm.status().await.adopted);
    // The confinement recorded at start is known after adoption.
    assert!(
        vm.confinement().is_some_and(|c| c.sandbox.is_some()),
        "{:?}",
        vm.confinement()
    );
    vm.health(T).await.unwrap();
    // Grants and devices survive the manager restart.
    let grants: Vec<String> = vm.peripherals().await.into_iter().map(|g| g.id).collect();
    assert_eq!(grants, vec!["rng0".to_string()]);
    let devices = vm.qmp().peripheral_ids().await.unwrap();
    assert!(
        devices.contains(&"tv-disk0-dev".to_string()) && devices.contains(&"rng0".to_string()),
        "{devices:?}"
    );
    // Starting it again is refused: no duplicate QEMU.
    assert!(matches!(
        mgr2.start(common::config("adopt1")).await.unwrap_err(),
        Error::AlreadyRunning { .. }
    ));
    // Deleting a locked VM: no guest involvement, QMP quit.
    vm.pause().await.unwrap();
    assert_eq!(vm.stop().await.unwrap(), StopMethod::QmpQuit);
    assert!(common::poll_until(20, || !pin::process_alive(pid)).await);
    assert_eq!(vm.phase(), VmPhase::Stopped);
    let gone = mgr2.adopt("adopt1").await.unwrap_err();
    assert!(matches!(gone, Error::NotAdoptable { .. }), "{gone}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_without_agent_runs_and_stops_via_acpi() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let mut cfg = common::config("noagent1");
    cfg.wait_for_agent = false;
    // One set per vCPU: vCPU i on the i-th online CPU (wrapping on 1-CPU hosts).
    let online: Vec<usize> = pin::online_cpus().unwrap().iter().collect();
    cfg.vcpus = 2;
    cfg.cpu.vcpu_cpus = (0..2)
        .map(|i| CpuSet::single(online[i % online.len()]))
        .collect();
    let want = cfg.cpu.vcpu_cpus.clone();
    // An explicit state directory outside the manager's root.
    let own = common::state_root();
    cfg.state_dir = Some(own.path().join("vm"));
    let first = mgr.start(cfg).await.unwrap();
    let _guard = PidGuard(first.pid());
    assert_eq!(first.phase(), VmPhase::Running);
    assert_eq!(first.state_dir(), own.path().join("vm"));
    assert!(own.path().join("vm/qmp.sock").exists());
    assert_eq!(first.vcpu_threads().len(), 2);
    for (v, set) in first.vcpu_threads().iter().zip(&want) {
        assert_eq!(
            pin::allowed_cpus(first.pid(), v.thread_id).unwrap(),
            *set,
            "{v:?}"
        );
    }
    assert!(first.qmp().query_status().await.unwrap().running);
    // QMP takes one client: drop the first handle, then adopt by directory (the name-based
    // root has nothing).
    let pid = first.pid();
    drop(first);
    assert!(mgr.adopt("noagent1").await.is_err());
    let vm = mgr.adopt_dir(&own.path().join("vm")).await.unwrap();
    assert_eq!(vm.pid(), pid);
    assert_eq!(vm.phase(), VmPhase::Running);
    // No agent connection: agent requests fail clearly.
    let e = vm.health(T).await.unwrap_err();
    assert!(e.to_string().contains("no guest agent"), "{e}");
    // Wait until the guest is up (its agent announces itself on the console), then stop:
    // without an agent connection the ACPI power button (system_powerdown) powers it off.
    assert!(
        common::poll_until(60, || vm
            .console_tail(50)
            .iter()
            .any(|l| l.contains("telvirt-guest: serving")))
        .await,
        "guest did not come up: {:?}",
        vm.console_tail(10)
    );
    assert_eq!(vm.stop().await.unwrap(), StopMethod::AcpiPowerdown);
    assert_eq!(vm.phase(), VmPhase::Stopped);
    assert!(!pin::process_alive(vm.pid()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accel_probes_once_with_a_deadline_and_caches() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let img = common::image();
    let cache = common::state_root();
    let probe = AccelProbe::new(cache.path())
        .with_guest(&img.kernel, &img.initrd)
        .deadline(Duration::from_secs(15));
    let d = probe.resolve(AccelChoice::Auto).await.unwrap();
    assert!(!d.from_cache);
    match d.accel {
        // A host where KVM really boots the guest.
        telvirt_runtime_vm::Accel::Kvm => assert!(d.warning.is_none(), "{d:?}"),
        // This kind of machine: visible warning.
        telvirt_runtime_vm::Accel::Tcg => {
            assert!(d.warning.as_deref().unwrap_or("").contains("TCG"), "{d:?}")
        }
    }
    // The probe QEMU is gone.
    let probe_dir = cache.path().to_string_lossy().into_owned();
    assert!(
        common::poll_until(10, || {
            !std::process::Command::new("pgrep")
                .args(["-f", &probe_dir])
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .await,
        "probe QEMU left running"
    );
    // Cached: a fresh probe (a restarted process) answers from the file without booting.
    let again = AccelProbe::new(cache.path())
        .with_guest(&img.kernel, &img.initrd)
        .resolve(AccelChoice::Auto)
        .await
        .unwrap();
    assert!(again.from_cache);
    assert_eq!(again.accel, d.accel);
}

/// Reserves 2 MiB huge pages and mounts a private hugetlbfs; undoes both on drop.
struct HugePages {
    original: u64,
    mount: tempfile::TempDir,
}

const NR_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const FREE_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";

fn read_u64(p: &str) -> u64 {
    std::fs::read_to_string(p).unwrap().trim().parse().unwrap()
}

impl HugePages {
    /// None where this process may not reserve pages or mount (not root).
    fn reserve(extra: u64) -> Option<Self> {
        let original = read_u64(NR_2M);
        std::fs::write(NR_2M, (original + extra).to_string()).ok()?;
        let mount = tempfile::Builder::new()
            .prefix("tvhp")
            .tempdir_in("/tmp")
            .unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(mount.path())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        let hp = HugePages { original, mount };
        ok.then_some(hp)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.mount.path())
            .status();
        let _ = std::fs::write(NR_2M, self.original.to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hugepage_backed_guest_preallocates_its_pages() {
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let Some(hp) = HugePages::reserve(64) else {
        eprintln!("skipped: cannot reserve huge pages or mount hugetlbfs here (needs root)");
        return;
    };
    let free_before = read_u64(FREE_2M);
    assert!(
        free_before >= 64,
        "kernel reserved only {free_before} free pages"
    );
    let root = common::state_root();
    let mgr = common::manager(root.path());
    let mut cfg = common::config("huge1");
    cfg.memory_mib = 128;
    cfg.hugepages = Some(HugePageSize::Size2M);
    let vm = mgr.start(cfg).await.unwrap();
    let _guard = VmGuard(vm.clone());
    assert_eq!(vm.phase(), VmPhase::Running);
    // Pre-allocated: all 64 pages are taken while the guest runs, backed by our mount.
    assert!(
        read_u64(FREE_2M) + 64 <= free_before,
        "pages not preallocated"
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.pid())).unwrap();
    assert!(
        maps.contains(&*hp.mount.path().to_string_lossy()),
        "guest RAM not on the hugetlbfs mount"
    );
    vm.stop().await.unwrap();
    assert!(
        common::poll_until(10, || read_u64(FREE_2M) >= free_before).await,
        "pages not returned"
    );
}

/// One line of /proc/PID/status, split into its fields.
fn proc_status_field(pid: i32, key: &str) -> Vec<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Whether QEMU holds `path` open (a link in /proc/PID/fd).
fn holds_open(pid: i32, path: &std::path::Path) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == path))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_runs_sandboxed_unprivileged_and_gets_files_as_descriptors() {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    use telvirt_runtime_vm::{Confinement, QemuUser};
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };

    // A user that does not exist is refused before anything starts.
    let missing = common::manager(root.path()).confinement(Confinement {
        sandbox: true,
        user: QemuUser::Named("telvirt-no-such-user".into()),
    });
    match missing.start(common::config("confine1")).await {
        Err(Error::InvalidConfig { field, reason }) => {
            assert_eq!(field, "qemu user");
            assert!(reason.contains("telvirt-no-such-user"), "{reason}");
        }
        other => panic!("expected a qemu user error, got {other:?}"),
    }
    assert!(!root.path().join("confine1").exists());

    // A descriptor this process holds without close-on-exec (as the vhost-user daemon holds
    // other VMs' guest RAM) does not reach QEMU.
    let secret = root.path().join("other-vm-ram");
    std::fs::write(&secret, b"x").unwrap();
    let secret_fd = std::fs::File::open(&secret).unwrap();
    // SAFETY: fcntl on a descriptor this test owns.
    assert_eq!(
        unsafe { libc::fcntl(secret_fd.as_raw_fd(), libc::F_SETFD, 0) },
        0
    );
    let mgr = common::manager(root.path());
    let vm = mgr.start(common::config("confine1")).await.unwrap();
    let _guard = VmGuard(vm.clone());
    assert_eq!(vm.phase(), VmPhase::Running);
    let pid = vm.pid();
    assert!(
        !holds_open(pid, &secret),
        "QEMU inherited a descriptor of the node's"
    );
    drop(secret_fd);

    // The kernel says QEMU runs under a seccomp filter (mode 2) ...
    assert_eq!(proc_status_field(pid, "Seccomp"), vec!["2"]);
    let applied = vm.confinement().unwrap().clone();
    let sandbox = applied.sandbox.clone().unwrap();
    for deny in ["obsolete=deny", "spawn=deny", "resourcecontrol=deny"] {
        assert!(sandbox.contains(deny), "{sandbox}");
    }
    // ... and with a non-zero uid (real, effective, saved, fs) and no capabilities.
    let uids: Vec<u32> = proc_status_field(pid, "Uid")
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    if euid == 0 {
        assert!(applied.dropped, "{applied:?}");
        assert_eq!(uids, vec![applied.uid; 4], "{applied:?}");
        assert_ne!(applied.uid, 0);
        assert_eq!(proc_status_field(pid, "CapEff"), vec!["0000000000000000"]);
        // A uid of its own (Debian's QEMU takes a numeric uid:gid): held for it alone while
        // it runs, and no other process of the host has it.
        assert!(applied.own_uid, "{applied:?}");
        assert!(OWN_UIDS.contains(&applied.uid), "{applied:?}");
        assert!(
            UidLease::held(Path::new(LEASE_DIR), applied.uid).unwrap(),
            "the uid of a running QEMU is not held"
        );
        let others = telvirt_files::proc::pids()
            .into_iter()
            .filter(|p| *p != pid)
            .filter(|p| telvirt_files::proc::uids(*p).is_some_and(|u| u.contains(&applied.uid)))
            .count();
        assert_eq!(others, 0, "another process runs as QEMU's own uid");
    } else {
        eprintln!("not root: QEMU runs as uid {euid}, the user change is not tested");
        assert_eq!(uids, vec![euid; 4]);
        assert!(sandbox.contains("elevateprivileges=deny"), "{sandbox}");
    }

    // A root-owned image QEMU's user cannot open (mode 0600 in a 0700 directory) is attached
    // read-write through fd passing, seen by QEMU as /dev/fdset/N, and let go on detach.
    let img = root.path().join("secret.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    std::fs::set_permissions(&img, std::fs::Permissions::from_mode(0o600)).unwrap();
    if applied.dropped {
        // QEMU itself cannot open it by path: the user change is real.
        let by_path = vm
            .qmp()
            .blockdev_add(serde_json::json!({
                "driver": "raw", "node-name": "bypath",
                "file": {"driver": "file", "filename": img.to_string_lossy()}}))
            .await
            .unwrap_err();
        assert!(
            by_path.to_string().contains("Permission denied"),
            "{by_path}"
        );
    }
    vm.attach(Grant {
        id: "disk1".into(),
        peripheral: Peripheral::VirtioBlk {
            path: img.clone(),
            format: DiskFormat::Raw,
            read_only: false,
        },
    })
    .await
    .unwrap();
    assert!(holds_open(pid, &img), "QEMU does not hold the image open");
    let sets = vm.qmp().query_fdsets().await.unwrap();
    let set = sets
        .iter()
        .find(|s| {
            s.fds
                .iter()
                .any(|f| f.opaque.as_deref() == Some("tv-blk:disk1"))
        })
        .unwrap_or_else(|| panic!("no fd set for disk1: {sets:?}"));
    let nodes = vm
        .qmp()
        .execute_raw("query-named-block-nodes", None, T)
        .await
        .unwrap();
    let want = format!("/dev/fdset/{}", set.fdset_id);
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["file"].as_str() == Some(want.as_str()) && n["ro"] == false),
        "no read-write node on {want}: {nodes}"
    );
    assert!(
        vm.qmp()
            .peripheral_ids()
            .await
            .unwrap()
            .contains(&"disk1".to_string())
    );
    vm.detach("disk1").await.unwrap();
    assert!(
        common::poll_until(10, || !holds_open(pid, &img)).await,
        "QEMU still holds the image after detach"
    );
    let left = vm.qmp().query_fdsets().await.unwrap();
    assert!(
        !left.iter().any(|s| s
            .fds
            .iter()
            .any(|f| f.opaque.as_deref() == Some("tv-blk:disk1"))),
        "{left:?}"
    );
    vm.health(T).await.unwrap();

    // Outside the sandbox: a migration to `exec:` makes QEMU fork a shell; the filter kills
    // QEMU (SIGSYS) before the command runs.
    let marker = root.path().join("spawned");
    let uri = format!("exec:touch {}", marker.display());
    let _ = vm
        .qmp()
        .execute_raw("migrate", Some(serde_json::json!({ "uri": uri })), T)
        .await;
    assert!(
        common::poll_until(20, || vm.phase() == VmPhase::Failed).await,
        "phase {:?}",
        vm.phase()
    );
    assert_eq!(vm.failure().unwrap().exit.signal, Some(libc::SIGSYS));
    assert!(!marker.exists(), "the spawned command ran");
    // QEMU is gone (killed by its filter): its uid is free again.
    if applied.own_uid {
        assert!(!UidLease::held(Path::new(LEASE_DIR), applied.uid).unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_keeping_telvirts_user_is_sandboxed_with_elevateprivileges_denied() {
    use telvirt_runtime_vm::{Confinement, QemuUser};
    let _slot = BOOT_SLOT.acquire().await.unwrap();
    let root = common::state_root();
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    // Root is never a user to drop to.
    let as_root = common::manager(root.path()).confinement(Confinement {
        sandbox: true,
        user: QemuUser::Named("root".into()),
    });
    let e = as_root
        .start(common::config("keep1"))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("qemu user") && e.contains("uid 0"), "{e}");
    assert!(!root.path().join("keep1").exists());

    // The user telvirt runs as: the full filter, elevateprivileges=deny included, on a real guest.
    let mgr = common::manager(root.path()).confinement(Confinement {
        sandbox: true,
        user: QemuUser::Current,
    });
    let vm = mgr.start(common::config("keep1")).await.unwrap();
    let _guard = VmGuard(vm.clone());
    let pid = vm.pid();
    assert_eq!(proc_status_field(pid, "Seccomp"), vec!["2"]);
    let uids: Vec<u32> = proc_status_field(pid, "Uid")
        .iter()
        .map(|u| u.parse().unwrap())
        .collect();
    assert_eq!(uids, vec![euid; 4]);
    let applied = vm.confinement().unwrap();
    assert!(!applied.dropped);
    assert!(
        applied
            .sandbox
            .as_deref()
            .is_some_and(|s| s.contains("elevateprivileges=deny")),
        "{applied:?}"
    );
    vm.health(T).await.unwrap();
    // A serial port through a passed listening socket: the host side connects.
    vm.attach(Grant {
        id: "ser1".into(),
        peripheral: Peripheral::VirtioSerial {
            name: "org.x.data".into(),
        },
    })
    .await
    .unwrap();
    let sock = vm.state_dir().join("ser1.sock");
    tokio::net::UnixStream::connect(&sock).await.unwrap();
    vm.detach("ser1").await.unwrap();
    assert!(!sock.exists());
    assert_eq!(vm.stop().await.unwrap(), StopMethod::GuestAgent);
}
