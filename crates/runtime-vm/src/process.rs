//! A QEMU process held by a pidfd (`pidfd_open(2)`), so a signal reaches that process and no
//! other: a bare pid may name another process once QEMU has exited and the number was given
//! again (an adopted QEMU, not this process's child, is reaped by whoever its parent was, at
//! any time). Owns opening the handle and checking it still names the QEMU it was opened
//! for, signalling through it, and telling when the process ended; must not start or reap
//! processes.

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

/// A process, held by its pidfd.
#[derive(Debug)]
pub struct ProcessHandle {
    pid: i32,
    fd: OwnedFd,
}

impl ProcessHandle {
    /// Opens a handle on the process `pid` names now. The caller checks it is the process it
    /// wants *after* this (`/proc` read while [`ProcessHandle::has_exited`] is false names the
    /// same process: a running process keeps its pid).
    pub fn open(pid: i32) -> std::io::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("pidfd out of range"))?;
        // SAFETY: the descriptor was just returned to us and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(ProcessHandle { pid, fd })
    }

    /// The pid it was opened with.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether the process has exited (a zombie not yet reaped included).
    pub fn has_exited(&self) -> bool {
        let mut poll = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, no wait.
        let ready = unsafe { libc::poll(&mut poll, 1, 0) };
        ready != 0
    }

    /// Sends SIGKILL to the process, if it still runs; a process that has exited is left be
    /// (its pid, given again, is never signalled).
    pub fn kill(&self) {
        // SAFETY: pidfd_send_signal on our own descriptor, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Waits until the process has exited. One waiter at a time (the descriptor is registered
    /// with the runtime for the wait).
    pub async fn exited(&self) -> std::io::Result<()> {
        // SAFETY: the descriptor is `self.fd`, open for as long as `self` lives, which outlives
        // this registration (dropped at the end of this call).
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                self.fd.as_fd(),
                tokio::io::Interest::READABLE,
            )
        }
        .map_err(|e| e.into_parts().1)?;
        let _ = fd.readable().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handle tells a running process from one that exited (before and after it is reaped),
    /// and its kill reaches the process it was opened on.
    #[tokio::test]
    async fn a_handle_kills_its_process_and_sees_it_end() {
        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let handle = ProcessHandle::open(pid).unwrap();
        assert_eq!(handle.pid(), pid);
        assert!(!handle.has_exited());
        handle.kill();
        tokio::time::timeout(std::time::Duration::from_secs(10), handle.exited())
            .await
            .expect("the process ends within 10 s")
            .unwrap();
        assert!(handle.has_exited(), "a zombie has exited");
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
        assert!(handle.has_exited(), "reaped");
        handle.kill(); // after its end: nothing to reach, no panic
        assert!(ProcessHandle::open(i32::MAX).is_err(), "no such process");
    }
}
