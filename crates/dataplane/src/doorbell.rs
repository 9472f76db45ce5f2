//! A worker's doorbell: the futex word a worker that is not busy polling sleeps on, and the
//! ring a sender on another worker (a packet pushed onto one of its incoming links) or the
//! panel (a command) gives it, so packets crossing workers do not wait out a whole sleep.
//!
//! Owns the sleep and the wake-up; must not decide when a worker sleeps (the
//! [`crate::worker`] does) nor know about rings or nodes. A missed ring costs at most the
//! sleep's timeout, never a packet: the worker polls again when it ends.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::Duration;

const AWAKE: u32 = 0;
const ASLEEP: u32 = 1;

/// The futex word of one worker: [`ASLEEP`] while it waits on it.
#[derive(Debug, Default)]
pub struct Doorbell {
    state: AtomicU32,
    /// Rings that woke a sleeping worker (a system call each).
    wakes: AtomicU64,
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
    /// asleep) finds work, or until [`Doorbell::ring`]. Returns whether it slept.
    pub fn sleep(&self, timeout: Duration, has_work: impl FnOnce() -> bool) -> bool {
        self.state.store(ASLEEP, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if has_work() {
            self.state.store(AWAKE, Ordering::Relaxed);
            return false;
        }
        futex_wait(&self.state, ASLEEP, timeout);
        self.state.store(AWAKE, Ordering::Relaxed);
        true
    }

    /// How many rings woke the worker so far.
    pub fn wakes(&self) -> u64 {
        self.wakes.load(Ordering::Relaxed)
    }

    /// Whether the worker sleeps on this doorbell now.
    pub fn is_asleep(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ASLEEP
    }
}

/// Waits while `word` holds `expected`, at most `timeout` (a ring, a signal or a spurious
/// wake-up ends it sooner; the caller polls either way).
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(timeout.subsec_nanos()),
    };
    // SAFETY: `word` is a valid, aligned u32 for the call's duration; `ts` outlives it. The
    // kernel only reads both. Errors (EAGAIN: the word changed; EINTR; ETIMEDOUT) all mean
    // "poll again".
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes one thread waiting on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32; FUTEX_WAKE reads nothing else.
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
