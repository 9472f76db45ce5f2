//! What a VM's QEMU process costs the host: resident memory, CPU time, and per vCPU thread the
//! time it ran and the time it waited for a CPU (the host's view of the guest's steal time).
//! Reads `/proc` through `telvirt_files::proc`; it must never signal or change a process.

use std::path::Path;

/// One QEMU process's use of the host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VmUsage {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// CPU time of every thread, user and system, nanoseconds.
    pub cpu_ns: u64,
    /// The vCPU threads (named `CPU N/KVM` or `CPU N/TCG` by QEMU), by index.
    pub vcpus: Vec<VcpuUsage>,
}

/// One vCPU thread's time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VcpuUsage {
    pub index: u32,
    /// Time it ran on a CPU, nanoseconds.
    pub run_ns: u64,
    /// Time it was runnable but waited for a CPU, nanoseconds: what the guest sees as steal.
    pub wait_ns: u64,
}

/// The usage of the QEMU of VM `name` whose state directory is `dir`; `None` when no QEMU of
/// that VM runs (no pid file, or the pid is another process now).
pub fn vm_usage(dir: &Path, name: &str) -> Option<VmUsage> {
    let pid = crate::manager::running_pid(dir, name)?;
    let stat = telvirt_files::proc::process(pid)?;
    let mut vcpus: Vec<VcpuUsage> = telvirt_files::proc::threads(pid)
        .into_iter()
        .filter_map(|t| {
            Some(VcpuUsage {
                index: vcpu_index(&t.name)?,
                run_ns: t.run_ns,
                wait_ns: t.wait_ns,
            })
        })
        .collect();
    vcpus.sort_by_key(|v| v.index);
    Some(VmUsage {
        rss_bytes: stat.resident_bytes,
        cpu_ns: stat.cpu_ns,
        vcpus,
    })
}

/// The vCPU index of a QEMU thread named `CPU N/<accelerator>`.
fn vcpu_index(comm: &str) -> Option<u32> {
    let rest = comm.trim().strip_prefix("CPU ")?;
    let (n, _accel) = rest.split_once('/')?;
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_are_told_by_their_name() {
        assert_eq!(vcpu_index("CPU 0/TCG\n"), Some(0));
        assert_eq!(vcpu_index("CPU 12/KVM"), Some(12));
        assert_eq!(vcpu_index("qemu-system-x86"), None);
        assert_eq!(vcpu_index("CPU x/KVM"), None);
    }

    #[test]
    fn a_directory_without_a_running_qemu_has_no_usage() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(vm_usage(dir.path(), "vm1"), None);
        // A pid file naming a process that is not that VM's QEMU (this test) is not believed.
        std::fs::write(dir.path().join("qemu.pid"), std::process::id().to_string()).unwrap();
        assert_eq!(vm_usage(dir.path(), "vm1"), None);
    }
}
