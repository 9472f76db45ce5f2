//! A worker's doorbell: the futex word a worker that is not busy polling sleeps on, and the
//! ring a sender on another worker (a packet pushed onto one of its incoming links) or the
//! panel (a command) gives it, so packets crossing workers do not wait out a whole sleep.
//!
//! Owns the sleep and the wake-up; must not decide when a worker sleeps (the
//! [`crate::worker`] does) nor know about rings or nodes. A missed ring costs at most the
//! sleep's timeout, never a packet: the worker polls again when it ends. The futex is private
//! to this process: a ring shared with another process could not ring it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

const AWAKE: u32 = 0;
const ASLEEP: u32 = 1;

/// The futex word of one worker: [`ASLEEP`] while it waits on it. On a cache line of its own:
/// senders read it after every push, and only its worker writes it (falling asleep, waking).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Doorbell {
    state: AtomicU32,
    /// Rings that found the worker asleep (one `FUTEX_WAKE` system call each).
    wakes: AtomicU64,
}

/// What became of one wait on the futex.
#[derive(Debug, PartialEq, Eq)]
enum Waited {
    /// Woken, timed out, interrupted, or the word had changed already: look at the word.
    Returned,
    /// The system call failed otherwise (a seccomp filter refusing futex, say).
    Failed,
}

impl Doorbell {
    /// Wakes the worker if it sleeps. Call after publishing the work it should see (a ring's
    /// producer index, a queued command): the fence orders that write before the read of the
    /// state, and [`Doorbell::sleep`] orders its write of the state before its last look for
    /// work, so either the worker sees the work or this sees it asleep.
    pub fn ring(&self) {
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) == ASLEEP
            && self.state.swap(AWAKE, Ordering::AcqRel) == ASLEEP
        {
            self.wakes.fetch_add(1, Ordering::Relaxed);
            futex_wake(&self.state);
        }
    }

    /// Sleeps up to `timeout` unless `has_work` (asked after the worker has marked itself
    /// asleep) finds work, or until [`Doorbell::ring`]. A wait the kernel ends early without a
    /// ring (a signal) waits on; should the futex fail, the rest is slept without it. Returns
    /// whether it slept.
    pub fn sleep(&self, timeout: Duration, has_work: impl FnOnce() -> bool) -> bool {
        self.state.store(ASLEEP, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if has_work() {
            self.state.store(AWAKE, Ordering::Relaxed);
            return false;
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.state.load(Ordering::Acquire) != ASLEEP {
                break;
            }
            if futex_wait(&self.state, ASLEEP, left) == Waited::Failed {
                std::thread::sleep(left);
                break;
            }
        }
        self.state.store(AWAKE, Ordering::Relaxed);
        true
    }

    /// How many rings found the worker asleep so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// Whether the worker sleeps on this doorbell now.
    pub fn is_asleep(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ASLEEP
    }
}

/// Waits while `word` holds `expected`, at most `timeout`.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) -> Waited {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        // Below 10^9: fits every c_long.
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the call's duration; `ts` outlives it. The
    // kernel only reads both.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        )
    };
    if rc == 0 {
        return Waited::Returned;
    }
    match std::io::Error::last_os_error().raw_os_error() {
        Some(libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT) => Waited::Returned,
        _ => Waited::Failed,
    }
}

/// Wakes one thread waiting on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE reads nothing else. A failure leaves
    // the worker to wake at its timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            1i32,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    /// With nothing to wake it, a sleep lasts its timeout; with work already there it does
    /// not sleep at all.
    #[test]
    fn a_sleep_lasts_its_timeout_unless_work_is_there() {
        let bell = Doorbell::default();
        let t0 = Instant::now();
        assert!(bell.sleep(Duration::from_millis(20), || false));
        assert!(
            t0.elapsed() >= Duration::from_millis(20),
            "{:?}",
            t0.elapsed()
        );
        let t0 = Instant::now();
        assert!(!bell.sleep(Duration::from_secs(10), || true));
        assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
        assert_eq!(bell.wakes(), 0);
        // A ring with nobody asleep makes no system call and counts nothing.
        bell.ring();
        assert_eq!(bell.wakes(), 0);
    }

    /// A ring ends a long sleep: the sleeper is back well before its timeout.
    #[test]
    fn a_ring_wakes_a_sleeping_worker() {
        let bell = Arc::new(Doorbell::default());
        let sleeper = {
            let bell = Arc::clone(&bell);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                bell.sleep(Duration::from_secs(30), || false);
                t0.elapsed()
            })
        };
        // Ring until the sleeper was asleep when rung (a ring before it slept wakes nobody).
        let deadline = Instant::now() + Duration::from_secs(10);
        while bell.wakes() == 0 {
            assert!(Instant::now() < deadline, "never found the sleeper asleep");
            bell.ring();
            std::thread::sleep(Duration::from_millis(1));
        }
        let slept = sleeper.join().unwrap();
        assert!(
            slept < Duration::from_secs(10),
            "slept {slept:?}: the ring did not wake it"
        );
    }
}
