//! The seccomp filter a guest stream's relay runs under once it holds its key and its two
//! sockets: the system calls relaying makes (reads and writes on descriptors it already has,
//! polling, memory that is never code, its end) and nothing else. Opening a file, making or
//! connecting a socket, passing descriptors, starting a program, changing ids, signalling
//! another process or mapping code kill the relay instead: bytes from the network that took a
//! relay over reach nothing beyond its stream. An abort (a relay that finds its own state
//! broken) still ends it by `SIGABRT`, so its agent tells an abort from a forbidden call.
//!
//! Owns that list and its installation. It must not be applied to a process that does anything
//! but relay afterwards (the filter stays for the life of the process), nor before the relay
//! has its key and its sockets' timeouts set.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The system calls a confined relay makes whatever their arguments: its reads and writes
/// (plain and socket forms, as the standard library issues them), waiting on its two sockets
/// (and resuming that wait after the relay was stopped or traced: `restart_syscall`), closing
/// them, memory for its buffers, the clock, signal returns, its end, and the ids an abort
/// asks for. ([`confine_relay`] adds `mmap`, `futex`, `fcntl` and `tgkill` for some arguments
/// only.)
fn relay_system_calls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_ppoll,
        libc::SYS_restart_syscall,
        libc::SYS_shutdown,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_clock_gettime,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
        // The C library's abort asks for its process's and thread's ids to signal itself.
        libc::SYS_getpid,
        libc::SYS_gettid,
    ];
    // `poll` is a system call of its own on x86_64 only (aarch64's C library uses `ppoll`).
    #[cfg(target_arch = "x86_64")]
    calls.push(libc::SYS_poll);
    calls
}

/// A rule that holds when argument `index` (32 bits) is `value`.
fn argument_is(index: u8, value: u64) -> std::io::Result<SeccompRule> {
    argument_masked(index, u64::from(u32::MAX), value)
}

/// A rule that holds when argument `index`'s bits under `mask` (32 bits) are `value`.
fn argument_masked(index: u8, mask: u64, value: u64) -> std::io::Result<SeccompRule> {
    all_of(vec![masked_condition(index, mask, value)?])
}

/// The condition that argument `index`'s bits under `mask` (32 bits) are `value`.
fn masked_condition(index: u8, mask: u64, value: u64) -> std::io::Result<SeccompCondition> {
    SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        value,
    )
    .map_err(refused)
}

/// A rule that holds when every one of `conditions` does.
fn all_of(conditions: Vec<SeccompCondition>) -> std::io::Result<SeccompRule> {
    SeccompRule::new(conditions).map_err(refused)
}

/// Confines this process (every thread of it, and anything it starts later) to
/// [`relay_system_calls`], and to `mmap` of memory that is never executable, `futex` waits and
/// wakes on private locks, `fcntl` asking whether a descriptor is open, and `tgkill` sending
/// `SIGABRT` to this process (an abort): any other system call kills the whole process
/// (`SIGSYS`). Sets no-new-privileges first, as an unprivileged
/// process must. An error when this machine's architecture has no filter here (x86_64 and
/// aarch64 have) or the kernel refuses it: a relay then does not relay.
pub(crate) fn confine_relay() -> std::io::Result<()> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(refused)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = relay_system_calls()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    // Buffers, never code: no mapping with PROT_EXEC (and no mprotect at all).
    rules.insert(
        libc::SYS_mmap,
        vec![argument_masked(2, libc::PROT_EXEC as u64, 0)?],
    );
    // The standard library's and the C library's own locks: private waits and wakes only.
    let private = libc::FUTEX_PRIVATE_FLAG;
    rules.insert(
        libc::SYS_futex,
        [
            libc::FUTEX_WAIT | private,
            libc::FUTEX_WAKE | private,
            libc::FUTEX_WAIT_BITSET | private,
            libc::FUTEX_WAIT_BITSET | private | libc::FUTEX_CLOCK_REALTIME,
        ]
        .into_iter()
        .map(|op| argument_is(1, op as u64))
        .collect::<std::io::Result<_>>()?,
    );
    // Only to ask whether a descriptor is open (`F_GETFD`): the standard library asks so
    // before it closes one in a build with debug assertions.
    rules.insert(libc::SYS_fcntl, vec![argument_is(1, libc::F_GETFD as u64)?]);
    // An abort: SIGABRT to a thread of this process, nothing else to anyone.
    let this_process = u64::from(std::process::id());
    let whole = u64::from(u32::MAX);
    rules.insert(
        libc::SYS_tgkill,
        vec![all_of(vec![
            masked_condition(0, whole, this_process)?,
            masked_condition(2, whole, libc::SIGABRT as u64)?,
        ])?],
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(refused)?;
    let program = BpfProgram::try_from(filter).map_err(refused)?;
    seccompiler::apply_filter_all_threads(&program).map_err(refused)
}

/// Why the filter could not be made or installed, as the relay says it.
fn refused(e: impl Into<seccompiler::Error>) -> std::io::Error {
    std::io::Error::other(format!("the stream relay's seccomp filter: {}", e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::process::ExitStatusExt;

    /// Set in the child process this module's test starts: what it tries once confined.
    const CHILD_TRIES: &str = "TELVIRT_RELAY_FILTER_TRIES";

    /// In the child: confined, it relays a little (a socket pair, a wait on it, a large
    /// buffer, locks), says so, then makes the one system call `what` names directly (nothing
    /// else runs between the saying and the call), and says so if it lived.
    fn child(what: &str) {
        use std::os::fd::AsRawFd;
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // SAFETY: no arguments.
        let thread = unsafe { libc::gettid() };
        confine_relay().unwrap();
        let frame = vec![7u8; 1 << 20];
        a.write_all(&frame[..60_000]).unwrap();
        let mut ready = [libc::pollfd {
            fd: b.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for the call's duration.
        assert_eq!(unsafe { libc::poll(ready.as_mut_ptr(), 1, -1) }, 1);
        let mut got = vec![0u8; 60_000];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, frame[..60_000]);
        let lock = std::sync::Mutex::new(got.len());
        assert_eq!(*lock.lock().unwrap(), 60_000);
        b.shutdown(std::net::Shutdown::Both).unwrap();
        drop((a, b));
        println!("relayed");
        let to = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 9u16.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let path = c"/etc/hostname";
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // SAFETY: each call gets valid pointers (or none) for its duration; the ones that
        // succeed change nothing this test relies on, and the filter is to stop each first.
        let answer = unsafe {
            match what {
                "open" => libc::syscall(
                    libc::SYS_openat,
                    libc::AT_FDCWD,
                    path.as_ptr(),
                    libc::O_RDONLY,
                ),
                "socket" => libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0),
                "connect" => libc::syscall(
                    libc::SYS_connect,
                    socket.as_raw_fd(),
                    &to as *const libc::sockaddr_in,
                    std::mem::size_of::<libc::sockaddr_in>(),
                ),
                "exec" => libc::syscall(libc::SYS_execve, argv[0], argv.as_ptr(), envp.as_ptr()),
                "setresuid" => libc::syscall(libc::SYS_setresuid, 0, 0, 0),
                "kill" => libc::syscall(libc::SYS_kill, 1, 0),
                // Another signal than SIGABRT to itself (unfiltered, SIGUSR1 would end it).
                "tgkill_usr1" => {
                    libc::syscall(libc::SYS_tgkill, std::process::id(), thread, libc::SIGUSR1)
                }
                "abort" => std::process::abort(),
                "fcntl" => libc::syscall(libc::SYS_fcntl, 0, libc::F_SETFL, libc::O_NONBLOCK),
                "mmap_exec" => libc::syscall(
                    libc::SYS_mmap,
                    0,
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                ),
                "futex_requeue" => libc::syscall(
                    libc::SYS_futex,
                    std::ptr::null::<u32>(),
                    libc::FUTEX_CMP_REQUEUE | libc::FUTEX_PRIVATE_FLAG,
                    0,
                    0,
                    std::ptr::null::<u32>(),
                    0,
                ),
                other => panic!("no such try: {other}"),
            }
        };
        println!("{what} returned {answer}");
    }

    #[test]
    fn a_confined_relay_relays_and_is_killed_by_anything_else_but_aborts_by_sigabrt() {
        if let Some(what) = std::env::var_os(CHILD_TRIES) {
            child(&what.to_string_lossy());
            return;
        }
        for (what, dies_of) in [
            ("open", libc::SIGSYS),
            ("socket", libc::SIGSYS),
            ("connect", libc::SIGSYS),
            ("exec", libc::SIGSYS),
            ("setresuid", libc::SIGSYS),
            ("kill", libc::SIGSYS),
            ("tgkill_usr1", libc::SIGSYS),
            ("fcntl", libc::SIGSYS),
            ("mmap_exec", libc::SIGSYS),
            ("futex_requeue", libc::SIGSYS),
            // An abort is told apart from a forbidden call.
            ("abort", libc::SIGABRT),
        ] {
            let out = crate::test_child::rerun_alone(
                "relay_filter::tests::a_confined_relay_relays_and_is_killed_by_anything_else_but_aborts_by_sigabrt",
                CHILD_TRIES,
                what,
            );
            let said = String::from_utf8_lossy(&out.stdout);
            // It relayed under the filter, then died of the call it tried, at the call.
            assert!(said.contains("relayed"), "{what}: {said}");
            assert!(!said.contains("returned"), "{what}: {said}");
            assert_eq!(out.status.signal(), Some(dies_of), "{what}: {said}");
        }
    }
}
