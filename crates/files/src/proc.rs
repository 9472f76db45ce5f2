//! Reads of `/proc` for every crate that reports what a process costs the host (the node's
//! own `/metrics`, a vm VNF's QEMU): CPU time, memory, threads and their scheduling times,
//! open files. Reads only; it must never signal or change a process.

use std::path::Path;
use std::time::{Duration, Instant};

/// One process as `/proc/<pid>/stat` tells it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStat {
    /// User and system CPU time of every thread, nanoseconds.
    pub cpu_ns: u64,
    pub threads: u64,
    /// When it started, seconds since the Unix epoch.
    pub start_time_unix_s: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

/// One thread's scheduling times (`/proc/<pid>/task/<tid>/schedstat`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ThreadTimes {
    pub tid: i32,
    /// Its name (`comm`), as the process set it.
    pub name: String,
    /// Time it ran on a CPU, nanoseconds.
    pub run_ns: u64,
    /// Time it was runnable but waited for a CPU, nanoseconds.
    pub wait_ns: u64,
}

/// Process `pid`'s stat; `None` when it is gone or the file cannot be parsed.
pub fn process(pid: i32) -> Option<ProcessStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&stat)?;
    // Fields are numbered from 1 as in proc(5); `f[0]` is field 3 (the state).
    let field = |n: usize| -> Option<u64> { f.get(n - 3)?.parse().ok() };
    let tick_ns = 1_000_000_000 / clock_ticks_per_second();
    let start_ticks = field(22)?;
    Some(ProcessStat {
        cpu_ns: (field(14)? + field(15)?).saturating_mul(tick_ns),
        threads: field(20)?,
        start_time_unix_s: boot_time_unix_s()? as f64
            + start_ticks as f64 / clock_ticks_per_second() as f64,
        virtual_bytes: field(23)?,
        resident_bytes: field(24)?.saturating_mul(page_size()),
    })
}

/// The ids of the host's processes now (one may exit before it is read).
pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Process `pid`'s real, effective, saved and filesystem uids; `None` when it is gone.
pub fn uids(pid: i32) -> Option<Vec<u32>> {
    status_uids(&status_text(pid)?)
}

/// Process `pid`'s `/proc/<pid>/status`; `None` when it is gone.
fn status_text(pid: i32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// The value of a `/proc/PID/status` text's line `field` (its name and colon, `Uid:`).
fn status_field<'a>(status: &'a str, field: &str) -> Option<&'a str> {
    status.lines().find_map(|l| l.strip_prefix(field))
}

/// The uids of a `/proc/PID/status` text's `Uid:` line.
fn status_uids(status: &str) -> Option<Vec<u32>> {
    let ids = status_field(status, "Uid:")?;
    Some(
        ids.split_whitespace()
            .filter_map(|u| u.parse().ok())
            .collect(),
    )
}

/// How many seccomp filters process `pid` runs under (`Seccomp_filters:` in its status, Linux
/// 5.9 and later; a filter stays for the life of a process and its children inherit it);
/// `None` when it is gone or its kernel does not say.
pub fn seccomp_filters(pid: i32) -> Option<u32> {
    status_seccomp_filters(&status_text(pid)?)
}

/// The count of a `/proc/PID/status` text's `Seccomp_filters:` line.
fn status_seccomp_filters(status: &str) -> Option<u32> {
    status_field(status, "Seccomp_filters:")?
        .trim()
        .parse()
        .ok()
}

/// Process `pid`'s state letter (`R`, `S`, `D`, `Z`, ...) and the id of its session; `None`
/// when it is gone.
pub fn state_and_session(pid: i32) -> Option<(char, i32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f = stat_fields(&stat)?;
    // Field 3 is the state, field 6 the session.
    Some((f.first()?.chars().next()?, f.get(6 - 3)?.parse().ok()?))
}

/// Process `pid`'s arguments joined by spaces; `None` when it is gone.
pub fn command_line(pid: i32) -> Option<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        String::from_utf8_lossy(&raw)
            .replace('\0', " ")
            .trim_end()
            .to_owned(),
    )
}

/// Whether a process in `state` runs: neither a zombie nor dead.
pub fn runs(state: char) -> bool {
    !matches!(state, 'Z' | 'X')
}

/// Process `pid`'s command line while it runs, waiting up to `patience` while it reads empty:
/// a process in the middle of an exec (`ip netns exec` turning into the program it starts)
/// shows no arguments until its new program's are in place. `None` once it is gone or a
/// zombie (checked at every read); empty after the wait (a kernel thread's).
pub fn running_command_line(pid: i32, patience: Duration) -> Option<String> {
    read_past_exec(
        || {
            let (state, _) = state_and_session(pid)?;
            runs(state).then(|| command_line(pid)).flatten()
        },
        patience,
    )
}

/// What `read` gives once it gives something other than an empty line, or the empty line
/// after `patience`; `None` as soon as it gives none.
fn read_past_exec(mut read: impl FnMut() -> Option<String>, patience: Duration) -> Option<String> {
    let deadline = Instant::now() + patience;
    loop {
        let line = read()?;
        if !line.is_empty() || Instant::now() >= deadline {
            return Some(line);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The threads of process `pid`: each one's id and `/proc/<pid>/task/<tid>` directory (none
/// when it is gone).
fn tasks(pid: i32) -> Vec<(i32, std::path::PathBuf)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| Some((task.file_name().to_str()?.parse().ok()?, task.path())))
        .collect()
}

/// The threads of process `pid` with their scheduling times (empty when it is gone).
pub fn threads(pid: i32) -> Vec<ThreadTimes> {
    let mut out = Vec::new();
    for (tid, dir) in tasks(pid) {
        let name = read_trimmed(&dir.join("comm")).unwrap_or_default();
        let sched = read_trimmed(&dir.join("schedstat")).unwrap_or_default();
        let mut times = sched.split_whitespace().map(|v| v.parse().unwrap_or(0));
        out.push(ThreadTimes {
            tid,
            name,
            run_ns: times.next().unwrap_or(0),
            wait_ns: times.next().unwrap_or(0),
        });
    }
    out.sort_by_key(|t| t.tid);
    out
}

/// How a thread is scheduled, as its stat says: its policy (`SCHED_OTHER` 0, `SCHED_FIFO` 1,
/// `SCHED_RR` 2, `SCHED_BATCH` 3, `SCHED_IDLE` 5), real-time priority and nice value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SchedClass {
    pub policy: u32,
    pub rt_priority: u32,
    pub nice: i32,
}

/// The policies as a stat shows them (`sched_setscheduler(2)`'s numbers).
const SCHED_FIFO: u32 = libc::SCHED_FIFO as u32;
const SCHED_RR: u32 = libc::SCHED_RR as u32;
const SCHED_BATCH: u32 = libc::SCHED_BATCH as u32;
const SCHED_IDLE: u32 = libc::SCHED_IDLE as u32;

impl SchedClass {
    fn is_real_time(&self) -> bool {
        matches!(self.policy, SCHED_FIFO | SCHED_RR)
    }

    /// Whether the kernel favours it over `other`: a real-time class over any other, then a
    /// higher real-time priority, then any class over `SCHED_IDLE`, then a lower nice value.
    pub fn favoured_over(&self, other: &SchedClass) -> bool {
        let rank = |c: &SchedClass| {
            (
                c.is_real_time(),
                c.rt_priority,
                c.policy != SCHED_IDLE,
                -c.nice,
            )
        };
        rank(self) > rank(other)
    }
}

impl std::fmt::Display for SchedClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.policy {
            SCHED_FIFO => write!(f, "SCHED_FIFO {}", self.rt_priority),
            SCHED_RR => write!(f, "SCHED_RR {}", self.rt_priority),
            SCHED_BATCH => write!(f, "SCHED_BATCH nice {}", self.nice),
            SCHED_IDLE => write!(f, "SCHED_IDLE"),
            _ => write!(f, "nice {}", self.nice),
        }
    }
}

/// Each thread of process `pid` by its name, with its scheduling class (fields 2, 19, 40 and
/// 41 of its stat; empty when it is gone).
pub fn thread_classes(pid: i32) -> Vec<(String, SchedClass)> {
    tasks(pid)
        .into_iter()
        .filter_map(|(_, dir)| {
            let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
            let name = stat.split_once('(')?.1.rsplit_once(')')?.0.to_owned();
            let f = stat_fields(&stat)?;
            let class = SchedClass {
                nice: f.get(19 - 3)?.parse().ok()?,
                rt_priority: f.get(40 - 3)?.parse().ok()?,
                policy: f.get(41 - 3)?.parse().ok()?,
            };
            Some((name, class))
        })
        .collect()
}

/// Files process `pid` holds open; `None` when its fd directory cannot be read.
pub fn open_fds(pid: i32) -> Option<u64> {
    Some(descriptors(pid)?.len() as u64)
}

/// The open flags of descriptor `fd` of process `pid` (the `flags:` of
/// `/proc/PID/fdinfo/FD`, octal); `None` when it cannot be read.
pub fn fd_flags(pid: i32, fd: i32) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).ok()?;
    u32::from_str_radix(status_field(&info, "flags:")?.trim(), 8).ok()
}

/// The descriptors process `pid` holds open, in order; `None` when its fd directory cannot be
/// read.
pub fn descriptors(pid: i32) -> Option<Vec<i32>> {
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    Some(fds)
}

/// The parent of process `pid` (field 4 of its stat); `None` when it is gone.
pub fn parent(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat_fields(&stat)?.get(1)?.parse().ok()
}

/// The soft limit on open files of process `pid` (`Max open files` in its limits).
pub fn max_fds(pid: i32) -> Option<u64> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The fields of a stat line after the command: the command (field 2) may hold spaces and
/// parentheses, so fields resume after its last `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    Some(stat.rsplit_once(')')?.1.split_whitespace().collect())
}

fn read_trimmed(path: &Path) -> Option<String> {
    Some(std::fs::read_to_string(path).ok()?.trim().to_owned())
}

fn boot_time_unix_s() -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(hz).ok().filter(|h| *h > 0).unwrap_or(100)
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A command line that reads empty for a moment (a process in the middle of an exec) is
    /// read again until it shows; one that stays empty is given up on; a process gone (or a
    /// zombie) is gone.
    #[test]
    fn a_command_line_read_mid_exec_is_read_again() {
        let mut reads = vec![
            Some("telvirt agent --data-dir /c/h1/data".to_owned()),
            Some(String::new()),
            Some(String::new()),
        ];
        let line = read_past_exec(|| reads.pop().flatten(), Duration::from_secs(10));
        assert_eq!(line.as_deref(), Some("telvirt agent --data-dir /c/h1/data"));
        assert!(reads.is_empty(), "{reads:?}");
        let t0 = Instant::now();
        let patience = Duration::from_millis(20);
        assert_eq!(
            read_past_exec(|| Some(String::new()), patience).as_deref(),
            Some("")
        );
        assert!(t0.elapsed() >= patience);
        let t0 = Instant::now();
        let mut reads = vec![None, Some(String::new())];
        assert_eq!(
            read_past_exec(|| reads.pop().flatten(), Duration::from_secs(10)),
            None
        );
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    }

    /// A thread given a nice value shows it, and the process's other threads are favoured over it.
    #[test]
    fn a_threads_class_is_read_from_its_stat() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: a plain system call; on Linux `PRIO_PROCESS` 0 is the calling thread.
            let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
            tx.send(rc).unwrap();
            done_rx.recv().unwrap();
        });
        assert_eq!(rx.recv().unwrap(), 0);
        let classes = thread_classes(me());
        let niced = SchedClass {
            policy: 0,
            rt_priority: 0,
            nice: 19,
        };
        assert!(classes.iter().any(|(_, c)| *c == niced), "{classes:?}");
        assert!(
            classes.iter().any(|(name, _)| !name.is_empty()),
            "{classes:?}"
        );
        assert_eq!(niced.to_string(), "nice 19");
        // The test's other threads (nice 19 is the least favoured a thread can be), unless the
        // whole run is at nice 19.
        if let Some((_, main)) = classes.iter().find(|(_, c)| c.nice != 19) {
            assert!(
                main.favoured_over(&niced) && !niced.favoured_over(main),
                "{main:?}"
            );
        }
        let fifo = SchedClass {
            policy: 1,
            rt_priority: 2,
            nice: 0,
        };
        let idle = SchedClass { policy: 5, ..niced };
        assert!(fifo.favoured_over(&niced) && fifo.to_string() == "SCHED_FIFO 2");
        assert!(niced.favoured_over(&idle) && !idle.favoured_over(&niced));
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }

    /// A zombie has no running command line (at once, not after the patience); this process has.
    #[test]
    fn a_zombie_has_no_running_command_line() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(10);
        while state_and_session(pid).is_some_and(|(s, _)| runs(s)) {
            assert!(Instant::now() < deadline, "`true` never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        let t0 = Instant::now();
        assert_eq!(running_command_line(pid, Duration::from_secs(10)), None);
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        child.wait().unwrap();
        assert!(running_command_line(me(), Duration::from_secs(1)).is_some_and(|c| !c.is_empty()));
    }

    fn me() -> i32 {
        std::process::id() as i32
    }

    #[test]
    fn the_host_s_processes_and_their_uids_are_read() {
        assert!(pids().contains(&me()));
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        assert_eq!(uids(me()).map(|u| u[0]), Some(uid));
        assert_eq!(
            status_uids(
                "Name:\tqemu\nUid:\t1900000001\t1900000001\t1900000001\t1900000001\nGid:\t0\n"
            ),
            Some(vec![1_900_000_001; 4])
        );
        assert_eq!(status_uids("Name:\tx\n"), None);
        assert_eq!(
            status_seccomp_filters(
                "Seccomp:\t2\nSeccomp_filters:\t3\nSpeculation_Store_Bypass:\tx\n"
            ),
            Some(3)
        );
        assert_eq!(status_seccomp_filters("Seccomp:\t0\n"), None);
        assert!(seccomp_filters(me()).is_some());
    }

    #[test]
    fn a_process_reads_its_own_state_session_and_command_line() {
        let (state, session) = state_and_session(me()).unwrap();
        // The process's main thread waits for this test's thread: running or sleeping.
        assert!(matches!(state, 'R' | 'S'), "{state}");
        // SAFETY: getsid has no preconditions.
        assert_eq!(session, unsafe { libc::getsid(0) });
        let exe = std::env::args().next().unwrap();
        assert!(command_line(me()).unwrap().starts_with(&exe));
        assert_eq!(state_and_session(i32::MAX), None);
    }

    #[test]
    fn fields_resume_after_the_last_parenthesis_of_the_command() {
        let f = stat_fields("42 (a b) c) S 1 42").unwrap();
        assert_eq!(f, ["S", "1", "42"]);
        assert_eq!(stat_fields("garbage"), None);
    }

    #[test]
    fn this_process_uses_memory_cpu_threads_and_files() {
        let mut x = 0u64;
        let until = std::time::Instant::now() + std::time::Duration::from_millis(50);
        while std::time::Instant::now() < until {
            x = x.wrapping_add(1);
        }
        assert!(x > 0);
        let p = process(me()).unwrap();
        assert!(p.cpu_ns > 0, "{p:?}");
        assert!(p.resident_bytes > 1024 * 1024, "{p:?}");
        assert!(p.virtual_bytes >= p.resident_bytes, "{p:?}");
        assert!(p.threads >= 1, "{p:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        assert!(
            p.start_time_unix_s <= now + 1.0 && p.start_time_unix_s > now - 3600.0,
            "{p:?}"
        );
        let threads = threads(me());
        assert!(
            threads.iter().any(|t| t.tid == me() && t.run_ns > 0),
            "{threads:?}"
        );
        assert!(open_fds(me()).unwrap() >= 3);
        let fds = descriptors(me()).unwrap();
        assert!(fds.starts_with(&[0, 1, 2]) && fds.is_sorted(), "{fds:?}");
        // SAFETY: getppid has no preconditions.
        assert_eq!(parent(me()), Some(unsafe { libc::getppid() }));
        assert_eq!((descriptors(i32::MAX), parent(i32::MAX)), (None, None));
        assert!(max_fds(me()).unwrap() >= open_fds(me()).unwrap());
        assert_eq!(process(i32::MAX), None);
        assert!(super::threads(i32::MAX).is_empty());
    }
}
