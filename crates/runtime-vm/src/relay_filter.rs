//! The seccomp filter a guest stream's relay runs under once it holds its key and its two
//! sockets: the system calls relaying makes (reads and writes on descriptors it already has,
//! polling, memory, its end) and nothing else. Opening a file, making or connecting a socket,
//! passing descriptors, starting a program, changing ids or signalling another process kill
//! the relay instead: bytes from the network that took a relay over reach nothing beyond its
//! stream.
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
/// (plain and socket forms, as the standard library issues them), waiting on its two sockets,
/// closing them, memory for its buffers, a contended lock, the clock, signal returns, and its
/// end. ([`confine_relay`] adds `fcntl`, for one question only.)
fn relay_system_calls() -> Vec<i64> {
    let mut calls = vec![
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_ppoll,
        libc::SYS_shutdown,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_futex,
        libc::SYS_clock_gettime,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    // `poll` is a system call of its own on x86_64 only (aarch64's C library uses `ppoll`).
    #[cfg(target_arch = "x86_64")]
    calls.push(libc::SYS_poll);
    calls
}

/// Confines the calling thread, and any thread or process it starts later, to
/// [`relay_system_calls`]: any other system call kills the whole process (`SIGSYS`). Sets
/// no-new-privileges first, as an unprivileged process must. An error when this machine's
/// architecture has no filter here (x86_64 and aarch64 have) or the kernel refuses it: a relay
/// then does not relay.
pub(crate) fn confine_relay() -> std::io::Result<()> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(refused)?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = relay_system_calls()
        .into_iter()
        .map(|call| (call, Vec::new()))
        .collect();
    // `fcntl` only to ask whether a descriptor is open (`F_GETFD`): the standard library asks
    // so before it closes one in a build with debug assertions.
    let asks_if_open = SeccompCondition::new(
        1,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::Eq,
        libc::F_GETFD as u64,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map_err(refused)?;
    rules.insert(libc::SYS_fcntl, vec![asks_if_open]);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )
    .map_err(refused)?;
    let program = BpfProgram::try_from(filter).map_err(refused)?;
    seccompiler::apply_filter(&program).map_err(refused)
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

    /// In the child: confined, it relays a little (a socket pair, polling, a large buffer),
    /// says so, then tries `what`, and says so if it lived.
    fn child(what: &str) {
        let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
        confine_relay().unwrap();
        let frame = vec![7u8; 1 << 20];
        a.write_all(&frame[..60_000]).unwrap();
        let mut got = vec![0u8; 60_000];
        b.read_exact(&mut got).unwrap();
        assert_eq!(got, frame[..60_000]);
        b.shutdown(std::net::Shutdown::Both).unwrap();
        drop((a, b));
        println!("relayed");
        let lived = match what {
            "open" => std::fs::File::open("/etc/hostname").is_ok(),
            "connect" => std::net::TcpStream::connect("127.0.0.1:9").is_ok(),
            "exec" => std::process::Command::new("/bin/true").status().is_ok(),
            // SAFETY: plain system calls with no memory arguments.
            "setuid" => (unsafe { libc::setuid(0) }) == 0,
            // SAFETY: as above.
            "kill" => (unsafe { libc::kill(1, 0) }) == 0,
            // SAFETY: as above; F_SETFL on standard input changes no memory.
            "fcntl" => (unsafe { libc::fcntl(0, libc::F_SETFL, libc::O_NONBLOCK) }) == 0,
            other => panic!("no such try: {other}"),
        };
        println!("{what} returned (it succeeded: {lived})");
    }

    #[test]
    fn a_confined_relay_relays_and_is_killed_by_anything_else() {
        if let Some(what) = std::env::var_os(CHILD_TRIES) {
            child(&what.to_string_lossy());
            return;
        }
        for what in ["open", "connect", "exec", "setuid", "kill", "fcntl"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "relay_filter::tests::a_confined_relay_relays_and_is_killed_by_anything_else",
                    "--exact",
                    "--nocapture",
                    "--test-threads=1",
                ])
                .env(CHILD_TRIES, what)
                .output()
                .unwrap();
            let said = String::from_utf8_lossy(&out.stdout);
            // It relayed under the filter, then died of the call it tried, at the call.
            assert!(said.contains("relayed"), "{what}: {said}");
            assert!(!said.contains("returned"), "{what}: {said}");
            assert_eq!(out.status.signal(), Some(libc::SIGSYS), "{what}: {said}");
        }
    }
}
