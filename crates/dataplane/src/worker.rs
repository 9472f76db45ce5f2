//! Worker threads: each is optionally pinned to one core and polls its nodes in batches,
//! applying wiring commands only between rounds (so a rewire never splits a batch).
//!
//! Owns threads, CPU affinity and the command queue; must not decide the wiring (the
//! [`crate::panel`] sends the commands).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::doorbell::Doorbell;
use crate::error::{Error, Result};
use crate::node::{Node, NodeCounters, NodeIo, PortIo, RxLink, TxLink};
use crate::pool::{Packet, Pool, PoolCache};
use crate::ring::Consumer;

/// The cores this process may run on (from `sched_getaffinity`), ascending.
pub fn allowed_cores() -> Result<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid, writable cpu_set_t of the size we pass.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Err(Error::last_os("sched_getaffinity"));
    }
    Ok((0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` < CPU_SETSIZE, and `set` is initialised.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect())
}

/// Pin the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<()> {
    set_thread_affinity(0, &[core])
}

/// Let thread `tid` (0: the calling thread) run only on `cores`.
pub fn set_thread_affinity(tid: i32, cores: &[usize]) -> Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &core in cores {
        if core >= libc::CPU_SETSIZE as usize {
            return Err(Error::config(
                "core",
                format!("{core} is not below CPU_SETSIZE {}", libc::CPU_SETSIZE),
            ));
        }
        // SAFETY: `core` < CPU_SETSIZE (checked above).
        unsafe { libc::CPU_SET(core, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size we pass.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::last_os(format!(
            "sched_setaffinity(cores {cores:?})"
        )));
    }
    Ok(())
}

/// Prefix of the names of worker threads (`tv-<name>`).
pub const THREAD_PREFIX: &str = "tv-";

/// The core the calling thread runs on now.
pub fn current_core() -> Option<usize> {
    // SAFETY: no preconditions.
    let c = unsafe { libc::sched_getcpu() };
    usize::try_from(c).ok()
}

/// How a worker behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerConfig {
    /// Name (thread name `tv-<name>`).
    pub name: String,
    /// Core to pin to; `None` leaves the thread unpinned.
    pub core: Option<usize>,
    /// Never sleep when idle (dedicated core). When false, a worker that found no work for
    /// `idle_spin` sleeps `idle_sleep` after each round that finds none, which keeps shared
    /// cores usable. This is where the worker starts; the panel turns busy polling on and off
    /// while it runs for its nodes ([`crate::panel::PatchPanel::set_busy_poll`],
    /// [`Worker::busy_poll`]).
    pub busy_poll: bool,
    /// How long a worker that is not busy polling polls on without sleeping after its last
    /// work.
    pub idle_spin: Duration,
    /// Sleep between idle rounds once `idle_spin` has passed, when not busy polling; a packet
    /// pushed onto one of the worker's incoming links, or a command, ends it sooner (the
    /// worker's [`Doorbell`]).
    pub idle_sleep: Duration,
}

/// [`WorkerConfig::idle_spin`] by default: as long as one sleep. A spin counted in rounds
/// instead (1,024 before 2026-12-07) lasted 1-2 ms with a node or two to poll, so at a few
/// hundred to a few thousand packets a second a shared worker never slept (BENCHMARKS "Idle
/// workers sleep after 50 µs").
pub const IDLE_SPIN: Duration = Duration::from_micros(50);
/// [`WorkerConfig::idle_sleep`] by default.
pub const IDLE_SLEEP: Duration = Duration::from_micros(50);

/// When a worker that is not busy polling sleeps: once no round has found work for `spin`.
#[derive(Debug)]
struct IdleBackoff {
    spin: Duration,
    /// When the rounds began to find no work; `None` while they find some.
    idle_since: Option<Instant>,
}

impl IdleBackoff {
    fn new(spin: Duration) -> Self {
        Self {
            spin,
            idle_since: None,
        }
    }

    /// After a round that found no work, at `now`: whether to sleep before the next one.
    fn sleep_after_idle_round(&mut self, now: Instant) -> bool {
        let since = *self.idle_since.get_or_insert(now);
        now.saturating_duration_since(since) >= self.spin
    }

    /// Ends an idle spell: a round found work, or the worker busy polls (when it stops, its
    /// idle time counts from then).
    fn reset(&mut self) {
        self.idle_since = None;
    }
}

impl WorkerConfig {
    /// A worker named `name` on `core` that backs off when idle.
    pub fn new(name: &str, core: Option<usize>) -> Self {
        WorkerConfig {
            name: name.to_string(),
            core,
            busy_poll: false,
            idle_spin: IDLE_SPIN,
            idle_sleep: IDLE_SLEEP,
        }
    }
}

pub(crate) enum Cmd {
    AddNode {
        id: u64,
        node: Box<dyn Node>,
        ports: usize,
        node_drops: Arc<NodeCounters>,
    },
    RemoveNode {
        id: u64,
        done: mpsc::Sender<Box<dyn Node>>,
    },
    AttachTx {
        id: u64,
        port: usize,
        tx: TxLink,
    },
    /// Retire the port's outgoing link once the node's incoming links with the serials in
    /// `after` (removed in the same change) are drained.
    DetachTx {
        id: u64,
        port: usize,
        after: Vec<u64>,
    },
    AttachRx {
        id: u64,
        port: usize,
        serial: u64,
        rx: Consumer<Packet>,
    },
    Barrier(mpsc::Sender<()>),
}

#[derive(Default)]
struct Ctl {
    stop: AtomicBool,
    /// Poll without sleeping when idle.
    busy: AtomicBool,
    /// The worker thread's Linux thread id (0 until it started).
    tid: std::sync::atomic::AtomicI32,
    pending: AtomicBool,
    cmds: Mutex<Vec<Cmd>>,
    rounds: AtomicU64,
    /// What a sleeping worker waits on: rung by packets pushed onto its incoming links and
    /// by commands.
    bell: Arc<Doorbell>,
    /// The worker thread has ended (stopped, or a node panicked): commands sent from then on
    /// are dropped at once, so a caller waiting for an answer sees its channel close.
    gone: AtomicBool,
}

/// Marks its worker gone when the thread ends, however it ends (a node's panic unwinds
/// through it): drops the commands still queued, closing their answer channels.
struct GoneOnExit<'a>(&'a Ctl);

impl Drop for GoneOnExit<'_> {
    fn drop(&mut self) {
        let mut q = self.0.cmds.lock().unwrap_or_else(|p| p.into_inner());
        self.0.gone.store(true, Ordering::Release);
        q.clear();
    }
}

/// A running worker thread.
pub struct Worker {
    ctl: Arc<Ctl>,
    handle: Option<JoinHandle<Result<()>>>,
    config: WorkerConfig,
}

struct Slot {
    id: u64,
    node: Box<dyn Node>,
    ports: Vec<PortIo>,
}

impl Worker {
    /// Start a worker polling nodes with packets from `pool`.
    pub fn spawn(config: WorkerConfig, pool: Arc<Pool>) -> Result<Worker> {
        let ctl = Arc::new(Ctl {
            busy: AtomicBool::new(config.busy_poll),
            ..Ctl::default()
        });
        let c2 = Arc::clone(&ctl);
        let cfg = config.clone();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name(format!("{THREAD_PREFIX}{}", config.name))
            .spawn(move || {
                if let Some(core) = cfg.core
                    && let Err(e) = pin_current_thread(core)
                {
                    let msg = e.to_string();
                    let _ = ready_tx.send(Err(e));
                    return Err(Error::config("core", msg));
                }
                // SAFETY: gettid has no preconditions.
                c2.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
                let _ = ready_tx.send(Ok(()));
                let _gone = GoneOnExit(&c2);
                run(&cfg, &c2, &pool);
                Ok(())
            })
            .map_err(|e| Error::io("spawn worker thread", e))?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => return Err(Error::config("worker", "worker thread died while starting")),
        }
        Ok(Worker {
            ctl,
            handle: Some(handle),
            config,
        })
    }

    /// The worker's configuration.
    pub fn config(&self) -> &WorkerConfig {
        &self.config
    }

    /// The worker thread's Linux thread id.
    pub fn tid(&self) -> i32 {
        self.ctl.tid.load(Ordering::Relaxed)
    }

    /// Whether the worker polls without sleeping when idle.
    pub fn busy_poll(&self) -> bool {
        self.ctl.busy.load(Ordering::Relaxed)
    }

    pub(crate) fn set_busy_poll(&self, busy: bool) {
        self.ctl.busy.store(busy, Ordering::Relaxed);
        // A sleeping worker starts polling now, not when its sleep ends.
        self.ctl.bell.ring();
    }

    /// Polling rounds done so far (a liveness signal).
    pub fn rounds(&self) -> u64 {
        self.ctl.rounds.load(Ordering::Relaxed)
    }

    /// The worker's doorbell (senders onto its incoming links ring it).
    pub fn doorbell(&self) -> &Arc<Doorbell> {
        &self.ctl.bell
    }

    /// Queues `cmds` for the worker; a worker that has ended drops them (their answer
    /// channels close).
    pub(crate) fn send(&self, cmds: Vec<Cmd>) {
        let mut q = self.ctl.cmds.lock().unwrap_or_else(|p| p.into_inner());
        if self.ctl.gone.load(Ordering::Acquire) {
            return;
        }
        q.extend(cmds);
        self.ctl.pending.store(true, Ordering::Release);
        drop(q);
        self.ctl.bell.ring();
    }

    /// Asks the worker to answer once every command sent so far has been applied: the answer
    /// comes on the returned channel (or it closes, should the worker be gone).
    pub(crate) fn barrier_sent(&self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        self.send(vec![Cmd::Barrier(tx)]);
        rx
    }

    pub(crate) fn remove_node(&self, id: u64) -> Option<Box<dyn Node>> {
        let (tx, rx) = mpsc::channel();
        self.send(vec![Cmd::RemoveNode { id, done: tx }]);
        rx.recv().ok()
    }

    /// Stop the thread and drop its nodes.
    pub fn stop(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        self.ctl.bell.ring();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn apply(slots: &mut Vec<Slot>, cmds: Vec<Cmd>) {
    for cmd in cmds {
        match cmd {
            Cmd::AddNode {
                id,
                node,
                ports,
                node_drops,
            } => slots.push(Slot {
                id,
                node,
                ports: (0..ports)
                    .map(|_| PortIo {
                        node_drops: Arc::clone(&node_drops),
                        ..PortIo::default()
                    })
                    .collect(),
            }),
            Cmd::RemoveNode { id, done } => {
                if let Some(i) = slots.iter().position(|s| s.id == id) {
                    let s = slots.remove(i);
                    let _ = done.send(s.node);
                }
            }
            Cmd::AttachTx { id, port, tx } => {
                if let Some(p) = port_of(slots, id, port) {
                    p.tx = Some(tx);
                    p.retiring = None;
                }
            }
            Cmd::DetachTx { id, port, after } => {
                if let Some(p) = port_of(slots, id, port) {
                    p.retiring = Some(after);
                }
                retire_drained(slots);
            }
            Cmd::AttachRx {
                id,
                port,
                serial,
                rx,
            } => {
                if let Some(p) = port_of(slots, id, port) {
                    p.rx.push(RxLink { serial, ring: rx });
                }
            }
            Cmd::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

/// Drop the outgoing links marked `retiring` whose node no longer holds any of the incoming
/// rings they wait for (rings are discarded once their producer is gone and they are empty).
/// Until then the node keeps forwarding the old upstream's packets over the old downstream
/// link, so replacing a chain segment loses nothing. Returns true while some wait remains.
fn retire_drained(slots: &mut [Slot]) -> bool {
    let mut pending = false;
    for s in slots.iter_mut() {
        if !s.ports.iter().any(|p| p.retiring.is_some()) {
            continue;
        }
        let live: Vec<u64> = s
            .ports
            .iter_mut()
            .flat_map(|p| p.rx.iter_mut())
            .filter_map(|l| (!l.ring.is_finished()).then_some(l.serial))
            .collect();
        for p in s.ports.iter_mut() {
            let Some(after) = &p.retiring else { continue };
            if after.iter().any(|x| live.contains(x)) {
                pending = true;
            } else {
                p.tx = None;
                p.retiring = None;
            }
        }
    }
    pending
}

/// Whether any incoming ring of the worker's nodes got packets since it last looked.
fn has_new_input(slots: &mut [Slot]) -> bool {
    slots.iter_mut().any(|s| {
        s.ports
            .iter_mut()
            .any(|p| p.rx.iter_mut().any(|l| l.ring.has_new_items()))
    })
}

fn port_of(slots: &mut [Slot], id: u64, port: usize) -> Option<&mut PortIo> {
    slots
        .iter_mut()
        .find(|s| s.id == id)
        .and_then(|s| s.ports.get_mut(port))
}

fn run(cfg: &WorkerConfig, ctl: &Ctl, pool: &Pool) {
    let mut slots: Vec<Slot> = Vec::new();
    let mut cache = PoolCache::new();
    let mut backoff = IdleBackoff::new(cfg.idle_spin);
    let mut retiring = false;
    loop {
        if ctl.pending.load(Ordering::Acquire) {
            let cmds = {
                let mut q = ctl.cmds.lock().unwrap_or_else(|p| p.into_inner());
                ctl.pending.store(false, Ordering::Release);
                std::mem::take(&mut *q)
            };
            apply(&mut slots, cmds);
            retiring = true;
        }
        if ctl.stop.load(Ordering::Acquire) {
            break;
        }
        let mut work = 0;
        for s in slots.iter_mut() {
            let mut io = NodeIo {
                pool,
                cache: &mut cache,
                ports: &mut s.ports,
            };
            work += s.node.poll(&mut io);
        }
        if retiring {
            retiring = retire_drained(&mut slots);
        }
        ctl.rounds.fetch_add(1, Ordering::Relaxed);
        if work > 0 {
            backoff.reset();
        } else if ctl.busy.load(Ordering::Relaxed) {
            backoff.reset();
            std::hint::spin_loop();
        } else if backoff.sleep_after_idle_round(Instant::now()) {
            ctl.bell.sleep(cfg.idle_sleep, || {
                ctl.pending.load(Ordering::Acquire)
                    || ctl.stop.load(Ordering::Acquire)
                    || ctl.busy.load(Ordering::Relaxed)
                    || has_new_input(&mut slots)
            });
        } else {
            std::hint::spin_loop();
        }
    }
    // Packets still queued on this worker's incoming rings go back to the pool too.
    for s in slots.iter_mut() {
        for p in s.ports.iter_mut() {
            let mut v = Vec::new();
            for c in p.rx.iter_mut().map(|l| &mut l.ring) {
                while c.pop_into(&mut v, 256) > 0 {
                    cache.free_all(pool, &mut v);
                }
            }
        }
    }
    cache.flush(pool);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_worker_sleeps_only_once_it_found_no_work_for_its_spin() {
        let spin = Duration::from_micros(50);
        let mut b = IdleBackoff::new(spin);
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        // The first idle round starts the spell; rounds within the spin poll on.
        assert!(!b.sleep_after_idle_round(at(0)));
        assert!(!b.sleep_after_idle_round(at(49)));
        // From the spin on, every idle round sleeps.
        assert!(b.sleep_after_idle_round(at(50)));
        assert!(b.sleep_after_idle_round(at(400)));
        // Work ends the spell: the next idle rounds spin again for a whole spin.
        b.reset();
        assert!(!b.sleep_after_idle_round(at(500)));
        assert!(!b.sleep_after_idle_round(at(549)));
        assert!(b.sleep_after_idle_round(at(550)));
        // A clock read that comes out earlier than the spell's start does not sleep.
        b.reset();
        assert!(!b.sleep_after_idle_round(at(600)));
        assert!(!b.sleep_after_idle_round(at(590)));
    }

    /// Rounds `w` makes over about 100 ms, and the bound a worker that sleeps after every
    /// round cannot pass in that time (each round's sleep lasts at least `IDLE_SLEEP`).
    fn rounds_and_sleeping_bound(w: &Worker) -> (u64, u64) {
        let (r0, t0) = (w.rounds(), Instant::now());
        std::thread::sleep(Duration::from_millis(100));
        let rounds = w.rounds() - r0;
        let bound = (t0.elapsed().as_micros() / IDLE_SLEEP.as_micros()) as u64 + 2;
        (rounds, bound)
    }

    /// The worker loop itself: with no spin an idle worker sleeps after every round; busy
    /// polling keeps it polling; when it stops busy polling it sleeps again.
    #[test]
    fn an_idle_worker_sleeps_unless_it_busy_polls() {
        let pool = Arc::new(Pool::new("w", 4, 64).unwrap());
        let config = WorkerConfig {
            idle_spin: Duration::ZERO,
            ..WorkerConfig::new("idle", None)
        };
        let w = Worker::spawn(config, pool).unwrap();
        let (rounds, bound) = rounds_and_sleeping_bound(&w);
        assert!(
            rounds <= bound,
            "{rounds} rounds: it did not sleep (at most {bound})"
        );
        w.set_busy_poll(true);
        let (rounds, bound) = rounds_and_sleeping_bound(&w);
        assert!(
            rounds > bound,
            "{rounds} rounds: it slept while busy polling"
        );
        w.set_busy_poll(false);
        // The round under way when busy polling stopped may still spin: skip past it.
        let _ = rounds_and_sleeping_bound(&w);
        let (rounds, bound) = rounds_and_sleeping_bound(&w);
        assert!(
            rounds <= bound,
            "{rounds} rounds: it did not sleep again (at most {bound})"
        );
    }

    /// Busy polling switched on wakes a worker in a long sleep: it polls at once, not when
    /// its sleep ends.
    #[test]
    fn busy_polling_switched_on_wakes_a_sleeping_worker() {
        let pool = Arc::new(Pool::new("w", 4, 64).unwrap());
        let config = WorkerConfig {
            idle_spin: Duration::ZERO,
            idle_sleep: Duration::from_secs(60),
            ..WorkerConfig::new("wakes", None)
        };
        let w = Worker::spawn(config, pool).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.doorbell().is_asleep() {
            assert!(Instant::now() < deadline, "the worker never slept");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (r0, t0) = (w.rounds(), Instant::now());
        w.set_busy_poll(true);
        while w.rounds() < r0 + 1000 {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{} rounds in {:?}: still asleep",
                w.rounds() - r0,
                t0.elapsed()
            );
            std::thread::yield_now();
        }
    }

    #[test]
    fn allowed_cores_is_nonempty_and_pinning_works() {
        let cores = allowed_cores().unwrap();
        assert!(!cores.is_empty());
        let last = *cores.last().unwrap();
        std::thread::spawn(move || {
            pin_current_thread(last).unwrap();
            assert_eq!(current_core(), Some(last));
        })
        .join()
        .unwrap();
    }

    #[test]
    fn pinning_to_a_missing_core_fails_precisely() {
        let e = pin_current_thread(100_000).unwrap_err().to_string();
        assert!(e.contains("core"), "{e}");
        let pool = Arc::new(Pool::new("w", 4, 64).unwrap());
        let bad = allowed_cores().unwrap().last().unwrap() + 1000;
        let err = Worker::spawn(WorkerConfig::new("bad", Some(bad)), pool)
            .err()
            .unwrap();
        assert!(err.to_string().contains("sched_setaffinity"), "{err}");
    }

    /// A node that panics on its first poll.
    struct Panics;

    impl Node for Panics {
        fn poll(&mut self, _io: &mut NodeIo<'_>) -> usize {
            panic!("a node's panic, on purpose");
        }
    }

    /// Once a node's panic ended its worker, a barrier and a node's removal answer at once
    /// (their channels close) instead of waiting for a thread that is gone.
    #[test]
    fn a_worker_whose_thread_ended_answers_at_once() {
        let pool = Arc::new(Pool::new("w", 4, 64).unwrap());
        let w = Worker::spawn(WorkerConfig::new("panics", None), pool).unwrap();
        w.send(vec![Cmd::AddNode {
            id: 1,
            node: Box::new(Panics),
            ports: 0,
            node_drops: Arc::new(NodeCounters::default()),
        }]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !w.handle.as_ref().unwrap().is_finished() {
            assert!(
                Instant::now() < deadline,
                "the node's panic did not end the worker"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = w.barrier_sent().recv();
            let removed = w.remove_node(1).is_some();
            let _ = done_tx.send(removed);
        });
        let removed = done_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the barrier and the removal answered");
        assert!(!removed, "a gone worker hands no node back");
    }
}
