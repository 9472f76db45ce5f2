//! Host thread placement: CPU affinity (sched_setaffinity), SCHED_FIFO priority, the online CPU
//! list and per-thread allowed lists from /proc. Owns the unsafe libc calls; must not decide
//! which thread goes where (the manager does).

use std::path::Path;

use crate::config::CpuSet;
use crate::error::{Error, Result};

/// CPUs the host has online (`/sys/devices/system/cpu/online`).
pub fn online_cpus() -> Result<CpuSet> {
    let s = std::fs::read_to_string("/sys/devices/system/cpu/online")
        .map_err(Error::io("read /sys/devices/system/cpu/online"))?;
    s.trim().parse()
}

/// Restrict thread `tid` to `cpus`.
pub fn set_affinity(tid: i32, cpus: &CpuSet) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus.iter() {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(Error::Pinning(format!("cpu {c} is beyond CPU_SETSIZE")));
        }
        // SAFETY: c < CPU_SETSIZE, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: valid pointer to a cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::Pinning(format!(
            "sched_setaffinity(thread {tid}, cpus {cpus}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Give thread `tid` (0: the calling thread) SCHED_FIFO at `priority`. Threads and processes
/// it creates from then on start as SCHED_OTHER (`SCHED_RESET_ON_FORK`), not at its priority.
pub fn set_fifo(tid: i32, priority: u8) -> Result<()> {
    sched_fifo(tid, priority)
        .map_err(|e| Error::Pinning(format!("SCHED_FIFO {priority} for thread {tid}: {e}")))
}

/// [`set_fifo`] with the system's own error.
pub fn sched_fifo(tid: i32, priority: u8) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: valid pointer to an initialised sched_param.
    let rc = unsafe {
        libc::sched_setscheduler(tid, libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK, &param)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Thread ids of process `pid`.
pub fn thread_ids(pid: i32) -> Result<Vec<i32>> {
    let dir = format!("/proc/{pid}/task");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir)
        .map_err(Error::io(format!("read {dir}")))?
        .flatten()
    {
        if let Some(t) = e.file_name().to_str().and_then(|s| s.parse().ok()) {
            out.push(t);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `Cpus_allowed_list` of one thread, as the kernel reports it.
pub fn allowed_cpus(pid: i32, tid: i32) -> Result<CpuSet> {
    let path = format!("/proc/{pid}/task/{tid}/status");
    let s = std::fs::read_to_string(&path).map_err(Error::io(format!("read {path}")))?;
    let line = s
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| Error::Pinning(format!("no Cpus_allowed_list in {path}")))?;
    line.trim().parse()
}

/// Scheduling policy number of one thread (field 41 of /proc/<pid>/task/<tid>/stat).
pub fn sched_policy(pid: i32, tid: i32) -> Result<u32> {
    let path = format!("/proc/{pid}/task/{tid}/stat");
    let s = std::fs::read_to_string(&path).map_err(Error::io(format!("read {path}")))?;
    let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    // Fields after the command start at field 3; policy is field 41.
    after
        .split_whitespace()
        .nth(41 - 3)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::Pinning(format!("cannot parse policy from {path}")))
}

/// Whether `pid` is alive (not gone, not a zombie).
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
    else {
        return false;
    };
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pin_a_thread_and_read_it_back() {
        let online = online_cpus().unwrap();
        let first = online.iter().next().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            tx.send(unsafe { libc::gettid() }).unwrap();
            done_rx.recv().unwrap();
        });
        let tid = rx.recv().unwrap();
        let pid = std::process::id() as i32;
        set_affinity(tid, &CpuSet::single(first)).unwrap();
        assert_eq!(allowed_cpus(pid, tid).unwrap(), CpuSet::single(first));
        assert!(thread_ids(pid).unwrap().contains(&tid));
        assert_eq!(sched_policy(pid, tid).unwrap(), 0);
        done_tx.send(()).unwrap();
        t.join().unwrap();
        assert!(process_alive(pid));
        assert!(!process_alive(i32::MAX));
    }

    #[test]
    fn bad_cpu_is_refused() {
        let e = set_affinity(0, &CpuSet::single(100_000)).unwrap_err();
        assert!(e.to_string().contains("CPU_SETSIZE"), "{e}");
    }
}
