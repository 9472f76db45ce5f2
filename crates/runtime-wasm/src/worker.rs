//! A VNF instance on its own worker thread, optionally pinned to one CPU core. Commands run
//! between batches, so lock/unlock, upgrade and snapshots never interleave with a batch.
//! Owns the thread and pinning; the instance logic stays in `instance`.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::batch::PacketBatch;
use crate::error::{Error, Result};
use crate::instance::VnfInstance;

type Job = Box<dyn FnOnce(&mut VnfInstance) + Send>;

enum Cmd {
    Process(Box<PacketBatch>),
    Run(Job),
}

/// Pins the calling thread to `core`.
pub fn pin_current_thread(core: usize) -> Result<()> {
    let n = std::thread::available_parallelism().map_or(1, |n| n.get());
    if core >= libc::CPU_SETSIZE as usize {
        return Err(Error::config(
            "core",
            format!("{core} is beyond the CPU set size ({} cores here)", n),
        ));
    }
    // SAFETY: `cpu_set_t` is plain data; zeroed is the empty set, then one bit is set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `core` < CPU_SETSIZE was checked above.
    unsafe { libc::CPU_SET(core, &mut set) };
    // SAFETY: pid 0 is the calling thread; `set` is a valid cpu_set_t of the size passed.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::config(
            "core",
            format!(
                "cannot pin to core {core}: {} ({n} cores available)",
                std::io::Error::last_os_error()
            ),
        ));
    }
    Ok(())
}

/// Cores the calling thread may run on.
pub fn current_affinity() -> Vec<usize> {
    // SAFETY: zeroed cpu_set_t is valid; sched_getaffinity fills it for the calling thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `c` < CPU_SETSIZE.
        .filter(|c| unsafe { libc::CPU_ISSET(*c, &set) })
        .collect()
}

/// Restores an affinity mask returned by `current_affinity`.
pub fn set_affinity(cores: &[usize]) -> Result<()> {
    // SAFETY: zeroed cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cores.iter().filter(|c| **c < libc::CPU_SETSIZE as usize) {
        // SAFETY: bounds checked by the filter.
        unsafe { libc::CPU_SET(*c, &mut set) };
    }
    // SAFETY: valid set of the size passed, for the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(Error::config(
            "core",
            std::io::Error::last_os_error().to_string(),
        ));
    }
    Ok(())
}

/// A worker thread owning one VNF instance.
pub struct Worker {
    tx: Option<mpsc::Sender<Cmd>>,
    done: mpsc::Receiver<(Box<PacketBatch>, Result<()>)>,
    handle: Option<JoinHandle<VnfInstance>>,
}

impl Worker {
    /// Moves the instance onto a new thread, pinned to `core` when given. Pinning errors are
    /// returned before the thread accepts work.
    pub fn spawn(mut inst: VnfInstance, core: Option<usize>) -> Result<Self> {
        let (tx, rx) = mpsc::channel::<Cmd>();
        let (done_tx, done) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let handle = std::thread::Builder::new()
            .name(format!("vnf-{}", inst.module().manifest.name))
            .spawn(move || {
                let pinned = core.map_or(Ok(()), pin_current_thread);
                let ok = pinned.is_ok();
                let _ = ready_tx.send(pinned);
                if ok {
                    while let Ok(cmd) = rx.recv() {
                        match cmd {
                            Cmd::Process(mut b) => {
                                let r = inst.process_batch(&mut b);
                                if done_tx.send((b, r)).is_err() {
                                    break;
                                }
                            }
                            Cmd::Run(job) => job(&mut inst),
                        }
                    }
                }
                inst
            })
            .map_err(|e| Error::Worker(format!("cannot spawn: {e}")))?;
        let ready = ready_rx
            .recv()
            .map_err(|_| Error::Worker("worker exited before starting".into()))?;
        let mut w = Self {
            tx: Some(tx),
            done,
            handle: Some(handle),
        };
        if let Err(e) = ready {
            let _ = w.stop();
            return Err(e);
        }
        Ok(w)
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.tx
            .as_ref()
            .ok_or_else(|| Error::Worker("worker stopped".into()))?
            .send(cmd)
            .map_err(|_| Error::Worker("worker thread is gone".into()))
    }

    /// Processes a batch on the worker and hands it back with the result.
    pub fn process(&self, batch: Box<PacketBatch>) -> Result<(Box<PacketBatch>, Result<()>)> {
        self.send(Cmd::Process(batch))?;
        self.done
            .recv()
            .map_err(|_| Error::Worker("worker thread is gone".into()))
    }

    /// Runs `f` on the instance between batches (lock, unlock, snapshot, stats, ...).
    pub fn with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VnfInstance) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = mpsc::channel();
        self.send(Cmd::Run(Box::new(move |inst| {
            let _ = tx.send(f(inst));
        })))?;
        rx.recv()
            .map_err(|_| Error::Worker("worker thread is gone".into()))
    }

    /// Stops the thread and returns the instance.
    pub fn stop(&mut self) -> Result<VnfInstance> {
        self.tx = None;
        self.handle
            .take()
            .ok_or_else(|| Error::Worker("worker already stopped".into()))?
            .join()
            .map_err(|_| Error::Worker("worker thread panicked".into()))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
