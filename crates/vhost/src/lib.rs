//! vhost-user-net NICs: each NIC of a VM is a vhost-user socket its QEMU serves
//! (`-chardev socket,server=on` + `-netdev vhost-user`; this process connects, and connects
//! again after either side restarts) and a port of a node on the patch panel, so a VM joins
//! networks as a wasm VNF does. QEMU shares the guest's RAM (memfd, `share=on`); the
//! data-plane worker polling the node copies frames between the guest's virtqueues and the
//! panel's pool, and the protocol daemon's threads only answer QEMU's messages.
//!
//! Owns the connections, one protocol daemon per connection, and the rings' polling; must not
//! start QEMU nor decide which VNF port a NIC is (the vm runtime adapter does).

mod filter;

use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use telvirt_dataplane::node::{BATCH, Node, NodeIo};
use telvirt_dataplane::pool::Packet;
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::bitmap::BitmapMmapRegion;
use vhost_user_backend::{ShutdownHandle, VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::bindings::virtio_config::{VIRTIO_F_NOTIFY_ON_EMPTY, VIRTIO_F_VERSION_1};
use virtio_bindings::bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use virtio_queue::QueueT;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};

/// Guest memory as the backend maps it. Each region carries a dirty bitmap that QEMU's log
/// (`SET_LOG_BASE`, during a migration) replaces: every write through vm-memory (frames into
/// the guest's buffers, used-ring entries) marks its pages there.
type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap<BitmapMmapRegion>>;
type Vring = VringRwLock<GuestMemory>;

/// The virtio-net header in front of every frame with `VIRTIO_F_VERSION_1`.
pub const NET_HEADER: usize = 12;
/// The header of a legacy driver (no `VIRTIO_F_VERSION_1`, no mergeable buffers: no
/// `num_buffers`).
pub const LEGACY_NET_HEADER: usize = 10;
/// Most descriptors one chain may have, direct and indirect together: more than a Linux
/// guest's virtio-net puts in one frame (`MAX_SKB_FRAGS` + 2, at most 47), far fewer than an
/// indirect table may claim (65,535), so one chain costs the worker a bounded walk.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Queue 0 takes frames to the guest, queue 1 brings the guest's.
const RX: usize = 0;
const TX: usize = 1;
/// Longest virtqueue the backend accepts (QEMU's virtio-net allows up to 1024).
const MAX_QUEUE_SIZE: usize = 1024;
/// Longest a UNIX socket path may be (`sun_path`).
const MAX_SOCKET_PATH: usize = 107;

/// What can go wrong serving a NIC.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vhost-user socket {path}: {reason}")]
    Socket { path: PathBuf, reason: String },
    #[error("vhost-user daemon thread: {0}")]
    Thread(std::io::Error),
}

/// Counters of one NIC. `to_guest` / `from_guest` count frames, not headers.
#[derive(Debug, Default)]
pub struct NicStats {
    /// Frames written into the guest's receive queue.
    pub to_guest: AtomicU64,
    /// Frames the guest sent, put on the panel.
    pub from_guest: AtomicU64,
    /// Frames for the guest larger than the buffer it offered (dropped).
    pub to_guest_too_big: AtomicU64,
    /// Guest frames that were empty, larger than a pool buffer, or unreadable, and buffer
    /// chains on either queue that name a descriptor beyond the queue or have more than
    /// [`MAX_CHAIN_DESCRIPTORS`] (dropped; a frame meant for such a receive buffer too).
    pub from_guest_bad: AtomicU64,
    /// Frames dropped for want of a buffer: a guest frame when the pool had none, a frame for
    /// the guest whose posted buffer vanished between counting and taking it (frames for a
    /// guest that posted none wait on the link, where a full ring counts its drops).
    pub no_buffer: AtomicU64,
    /// Connections to QEMU so far.
    pub connections: AtomicU64,
}

impl NicStats {
    /// The counters as they are now (each read on its own, relaxed).
    pub fn snapshot(&self) -> NicCounters {
        let read = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NicCounters {
            to_guest: read(&self.to_guest),
            from_guest: read(&self.from_guest),
            to_guest_too_big: read(&self.to_guest_too_big),
            from_guest_bad: read(&self.from_guest_bad),
            no_buffer: read(&self.no_buffer),
            connections: read(&self.connections),
        }
    }
}

/// [`NicStats`] read at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NicCounters {
    pub to_guest: u64,
    pub from_guest: u64,
    pub to_guest_too_big: u64,
    pub from_guest_bad: u64,
    pub no_buffer: u64,
    pub connections: u64,
}

/// What a connection shares between its protocol daemon and the polling node.
struct Connection {
    mem: GuestMemory,
    /// The daemon's virtqueues, once its event thread handed them over.
    vrings: Option<Vec<Vring>>,
}

struct Shared {
    name: String,
    connection: Mutex<Option<Connection>>,
    shutdown: Mutex<Option<Hangup>>,
    stop: AtomicBool,
    stats: NicStats,
    /// The virtio-net header's length the driver's features give ([`NET_HEADER`], or
    /// [`LEGACY_NET_HEADER`] without `VIRTIO_F_VERSION_1`).
    header_len: AtomicUsize,
    /// This connection's guest was told about a queue whose avail index ran beyond its size.
    told_broken_ring: AtomicBool,
    /// A new memory table waits for its dirty log (set by the [`filter`]): the node writes
    /// nothing into the guest, whose pages the migration would then miss.
    log_pending: Arc<AtomicBool>,
}

impl Shared {
    fn connection(&self) -> MutexGuard<'_, Option<Connection>> {
        self.connection.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Says once per connection that the guest's `queue` offers more chains than it has slots
    /// (a broken or hostile driver): nothing is taken from it while it does.
    fn ring_broken(&self, queue: &str) {
        if !self.told_broken_ring.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                nic = %self.name,
                "the guest's {queue} queue offers more buffers than it has slots (its avail index ran past the queue's size): the queue is not served while it does"
            );
        }
    }
}

/// What ends a connection from outside: the daemon's socket and both of the filter's.
struct Hangup {
    daemon: Option<ShutdownHandle>,
    filter: Option<filter::Ends>,
}

impl Hangup {
    fn hang_up(&self) {
        if let Some(d) = &self.daemon {
            d.shutdown();
        }
        if let Some(f) = &self.filter {
            f.hang_up();
        }
    }
}

/// The backend of one connection: answers feature questions and hands the virtqueues to the
/// polling node; it moves no packet itself.
struct NetBackend {
    shared: Arc<Shared>,
}

impl VhostUserBackend for NetBackend {
    type Bitmap = BitmapMmapRegion;
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        2
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    /// `VHOST_USER_F_PROTOCOL_FEATURES` is required: QEMU's virtio-net start enables the rings
    /// with `SET_VRING_ENABLE`, which fails without it (EINVAL, the NIC falls back to a path
    /// with no backend). Its early enable, before `SET_FEATURES`, is held back by the
    /// [`filter`] until the features are acknowledged.
    /// `LOG_ALL` with the `LOG_SHMFD` protocol feature: QEMU migrates a VM with these NICs only
    /// when the backend logs the guest pages it writes.
    fn features(&self) -> u64 {
        VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            | VhostUserVirtioFeatures::LOG_ALL.bits()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_F_NOTIFY_ON_EMPTY
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::LOG_SHMFD
    }

    fn set_event_idx(&self, _enabled: bool) {}

    /// The header's length follows the driver: a legacy one (no `VIRTIO_F_VERSION_1`) has no
    /// `num_buffers`.
    fn acked_features(&self, features: u64) {
        let len = if features & (1 << VIRTIO_F_VERSION_1) != 0 {
            NET_HEADER
        } else {
            LEGACY_NET_HEADER
        };
        self.shared.header_len.store(len, Ordering::Relaxed);
    }

    fn update_memory(&self, _mem: GuestMemory) -> std::io::Result<()> {
        // The connection's `GuestMemoryAtomic` was swapped already; the node reads it anew
        // every round.
        Ok(())
    }

    /// Hands the virtqueues to the polling node. Turning notifications off only matters
    /// without `EVENT_IDX`; with it the guest kicks rarely because the node never advances
    /// `avail_event`.
    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if let Some(c) = self.shared.connection().as_mut()
            && c.vrings.is_none()
        {
            c.vrings = Some(vrings.to_vec());
        }
        // The node polls: the guest need not kick again.
        if let Some(v) = vrings.get(usize::from(device_event)) {
            let _ = v.disable_notification();
        }
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }
}

/// One NIC's connection to the socket its QEMU serves (`-chardev socket,server=on`), and the
/// thread that connects to it, serves each connection with a new protocol daemon, and connects
/// again when one ends: a node that restarts finds its VMs' NICs again, as a restarted switch
/// does with QEMU in server mode. Dropping it ends the connection and the thread; the socket
/// file is QEMU's.
pub struct NicSocket {
    path: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// How long the connecting thread waits between two tries while QEMU does not listen, and
/// after a connection that ended before its QEMU handed the virtqueues over (doubling up to
/// [`CONNECT_RETRY_MAX`] while that repeats: a QEMU that accepts and hangs up at once does not
/// make the node spin).
const CONNECT_RETRY: Duration = Duration::from_millis(50);
const CONNECT_RETRY_MAX: Duration = Duration::from_secs(1);

impl NicSocket {
    /// Connects (and keeps connecting) to the socket at `path` that NIC `name`'s QEMU serves.
    pub fn open(path: &Path, name: &str) -> Result<Self, Error> {
        if path.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(Error::Socket {
                path: path.to_path_buf(),
                reason: format!(
                    "the path is {} bytes; a UNIX socket path has at most {MAX_SOCKET_PATH}",
                    path.as_os_str().len()
                ),
            });
        }
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            connection: Mutex::new(None),
            shutdown: Mutex::new(None),
            stop: AtomicBool::new(false),
            stats: NicStats::default(),
            header_len: AtomicUsize::new(NET_HEADER),
            told_broken_ring: AtomicBool::new(false),
            log_pending: Arc::new(AtomicBool::new(false)),
        });
        let for_thread = Arc::clone(&shared);
        let at = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-{name}"))
            .spawn(move || connect_loop(&at, &for_thread))
            .map_err(Error::Thread)?;
        Ok(NicSocket {
            path: path.to_path_buf(),
            shared,
            thread: Some(thread),
        })
    }

    /// The socket's path (QEMU's `-chardev socket,path=`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether QEMU is connected and its virtqueues are known.
    pub fn is_running(&self) -> bool {
        self.shared
            .connection()
            .as_ref()
            .is_some_and(|c| c.vrings.is_some())
    }

    /// The NIC's counters.
    pub fn stats(&self) -> &NicStats {
        &self.shared.stats
    }

    /// The name it was opened with.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The NIC as one port of a panel node ([`VhostUserNode`]).
    pub fn port(&self) -> NicPort {
        NicPort {
            descriptors: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS + 1),
            shared: Arc::clone(&self.shared),
            buf: Vec::with_capacity(BATCH),
        }
    }
}

impl Drop for NicSocket {
    fn drop(&mut self) {
        // `stop` is set under the same lock the loop stores a connection's hang-up under:
        // either the hang-up is here to end the connection, or the loop sees `stop` before it
        // serves one.
        let handle = {
            let mut slot = self
                .shared
                .shutdown
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            self.shared.stop.store(true, Ordering::Release);
            slot.take()
        };
        if let Some(h) = handle {
            h.hang_up();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn connect_loop(path: &Path, shared: &Arc<Shared>) {
    let mut after_empty = CONNECT_RETRY;
    while !shared.stop.load(Ordering::Acquire) {
        let qemu = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(_) => {
                // QEMU not started yet, gone, or restarting: try again shortly.
                pause(shared, CONNECT_RETRY);
                continue;
            }
        };
        let mem = GuestMemory::new(GuestMemoryMmap::new());
        let backend = Arc::new(NetBackend {
            shared: Arc::clone(shared),
        });
        let mut daemon =
            match VhostUserDaemon::new(format!("vhost-{}-conn", shared.name), backend, mem.clone())
            {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(nic = %shared.name, "vhost-user daemon: {e}");
                    pause(shared, Duration::from_millis(500));
                    continue;
                }
            };
        // The daemon takes its connection from a private listener; the filter stands between.
        let (mut inner, ours) = match filter::private_pair() {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(nic = %shared.name, "vhost-user connection refused: {e}");
                pause(shared, Duration::from_millis(500));
                continue;
            }
        };
        // Known before QEMU's first message: a kick that comes early hands the queues over.
        *shared.connection() = Some(Connection { mem, vrings: None });
        shared.told_broken_ring.store(false, Ordering::Relaxed);
        shared.log_pending.store(false, Ordering::Release);
        shared.header_len.store(NET_HEADER, Ordering::Relaxed);
        let started = daemon.start(&mut inner);
        drop(inner);
        let filter = match filter::Filter::spawn(
            qemu,
            ours,
            &shared.name,
            Arc::clone(&shared.log_pending),
        ) {
            Ok(f) => Some(f),
            Err(e) => {
                tracing::warn!(nic = %shared.name, "vhost-user filter: {e}");
                daemon.request_shutdown();
                None
            }
        };
        let stopping = {
            let mut slot = shared.shutdown.lock().unwrap_or_else(|p| p.into_inner());
            let stopping = shared.stop.load(Ordering::Acquire);
            if !stopping && started.is_ok() {
                *slot = Some(Hangup {
                    daemon: daemon.shutdown_handle(),
                    filter: filter.as_ref().and_then(|f| f.ends().ok()),
                });
            }
            stopping
        };
        if stopping {
            daemon.request_shutdown();
            let _ = daemon.wait();
            if let Some(f) = filter {
                if let Ok(ends) = f.ends() {
                    ends.hang_up();
                }
                f.join();
            }
            *shared.connection() = None;
            break;
        }
        if let Err(e) = started {
            *shared.connection() = None;
            tracing::warn!(nic = %shared.name, "vhost-user connection refused: {e}");
            if let Some(f) = filter {
                f.join();
            }
            continue;
        }
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = daemon.wait() {
            tracing::info!(nic = %shared.name, "vhost-user connection ended: {e}");
        }
        if let Some(f) = filter {
            f.join();
        }
        let served = shared
            .connection()
            .take()
            .is_some_and(|c| c.vrings.is_some());
        *shared.shutdown.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // A QEMU that hung up after running (it exits, or resets the device) is connected to
        // again at once if it still listens; one that hangs up before, ever later.
        after_empty = if served {
            CONNECT_RETRY
        } else {
            pause(shared, after_empty);
            (after_empty * 2).min(CONNECT_RETRY_MAX)
        };
    }
}

/// Sleeps `d`, or less when the NIC is being dropped.
fn pause(shared: &Shared, d: Duration) {
    let until = std::time::Instant::now() + d;
    while !shared.stop.load(Ordering::Acquire) {
        let left = until.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(CONNECT_RETRY));
    }
}

/// One NIC as a port of a [`VhostUserNode`]: what the panel sends to the port goes into the
/// guest's receive queue, what the guest transmits leaves through the port.
pub struct NicPort {
    shared: Arc<Shared>,
    buf: Vec<Packet>,
    /// The descriptors of the chain being served, as read from the guest once.
    descriptors: Vec<Descriptor>,
}

impl NicPort {
    /// One round on port `port`: the guest's frames out, then frames for the guest in (as many
    /// as it offered buffers for; the rest wait on the link). Returns the frames moved.
    fn poll(&mut self, io: &mut NodeIo<'_>, port: usize) -> usize {
        let connection = self.shared.connection();
        let Some(Connection {
            mem,
            vrings: Some(vrings),
        }) = connection.as_ref()
        else {
            return 0;
        };
        let (Some(rx), Some(tx)) = (vrings.get(RX), vrings.get(TX)) else {
            return 0;
        };
        // Read anew every round: a new memory table swaps it. Every write of the round, the
        // completions too, goes through this one table, and only a table whose dirty log is in
        // place: the filter says one is waiting before it passes the table on, so a table
        // loaded here after the swap is seen waiting below (a table loaded before it logs into
        // the same log, which QEMU sends again with the new table).
        let guard = mem.memory();
        if self.shared.log_pending.load(Ordering::Acquire) {
            return 0;
        }
        let stats = &self.shared.stats;
        let pool = io.pool();
        let mut moved = 0;

        // Guest → panel.
        let room = if io.is_linked(port) {
            io.tx_space(port).min(BATCH)
        } else {
            BATCH
        };
        self.buf.clear();
        let header_len = self.shared.header_len.load(Ordering::Relaxed);
        {
            let mut st = tx.get_mut();
            if st.get_queue().ready() && st.is_enabled() && room > 0 {
                // At most a batch of chains a round, whatever becomes of them (dropped chains
                // too): a guest that keeps offering bad frames costs the worker one batch.
                let chains = match pending_chains(st.get_queue(), &*guard) {
                    Some(pending) => usize::from(pending).min(room),
                    None => {
                        self.shared.ring_broken("transmit");
                        0
                    }
                };
                let size = st.get_queue().size();
                let mut used = false;
                for _ in 0..chains {
                    let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&*guard) else {
                        break;
                    };
                    // Before the round's first completion only: an idle round reads nothing.
                    if !used {
                        resync_used(st.get_queue_mut(), &*guard, &self.shared.name);
                    }
                    let head = chain.head_index();
                    let descriptors = &mut self.descriptors;
                    let frame = read_once(chain, size, descriptors)
                        .then(|| {
                            let readable: usize = readable(descriptors).map(byte_len).sum();
                            readable.checked_sub(header_len)
                        })
                        .flatten()
                        .filter(|len| *len > 0 && *len <= pool.buf_size());
                    match frame {
                        None => {
                            stats.from_guest_bad.fetch_add(1, Ordering::Relaxed);
                            io.count_refused(1);
                        }
                        Some(len) => match io.alloc() {
                            None => {
                                stats.no_buffer.fetch_add(1, Ordering::Relaxed);
                                io.count_refused(1);
                            }
                            Some(mut pkt) => {
                                let mut ok = true;
                                pool.fill(&mut pkt, |b| {
                                    ok = pieces(readable(descriptors), header_len, len, |at, r| {
                                        guard.read_slice(&mut b[r], at).is_ok()
                                    });
                                    len
                                });
                                if ok {
                                    self.buf.push(pkt);
                                } else {
                                    io.refuse(pkt);
                                    stats.from_guest_bad.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        },
                    }
                    // Transmit buffers are read-only: nothing written back. A head beyond the
                    // queue names no buffer to give back.
                    if head < size {
                        let _ = st.get_queue_mut().add_used(&*guard, head, 0);
                        used = true;
                    }
                }
                if used && st.needs_notification().unwrap_or(true) {
                    let _ = st.signal_used_queue();
                }
            }
        }
        if !self.buf.is_empty() {
            moved += self.buf.len();
            stats
                .from_guest
                .fetch_add(self.buf.len() as u64, Ordering::Relaxed);
            io.send(port, &mut self.buf);
        }

        // Panel → guest: take only as many frames as the guest offered buffers for.
        let mut st = rx.get_mut();
        if !(st.get_queue().ready() && st.is_enabled()) {
            return moved;
        }
        let Some(offered) = pending_chains(st.get_queue(), &*guard) else {
            // Frames for the guest wait on the link meanwhile (a full ring counts its drops).
            self.shared.ring_broken("receive");
            return moved;
        };
        let want = usize::from(offered).min(BATCH);
        if want == 0 || io.recv(port, &mut self.buf, want) == 0 {
            return moved;
        }
        resync_used(st.get_queue_mut(), &*guard, &self.shared.name);
        let size = st.get_queue().size();
        let mut header = [0u8; NET_HEADER];
        // num_buffers (a modern driver's): each frame fits one buffer.
        header[10] = 1;
        let header = &header[..header_len];
        for pkt in self.buf.drain(..) {
            let Some(chain) = st.get_queue_mut().pop_descriptor_chain(&*guard) else {
                stats.no_buffer.fetch_add(1, Ordering::Relaxed);
                io.refuse(pkt);
                continue;
            };
            let head = chain.head_index();
            let descriptors = &mut self.descriptors;
            if !read_once(chain, size, descriptors) {
                stats.from_guest_bad.fetch_add(1, Ordering::Relaxed);
                io.refuse(pkt);
                if head < size {
                    let _ = st.get_queue_mut().add_used(&*guard, head, 0);
                }
                continue;
            }
            let frame = pool.data(&pkt);
            let room: usize = writable(descriptors).map(byte_len).sum();
            let write = |from: &[u8], skip: usize| {
                pieces(writable(descriptors), skip, from.len(), |at, r| {
                    guard.write_slice(&from[r], at).is_ok()
                })
            };
            let written =
                (room >= header_len + frame.len() && write(header, 0) && write(frame, header_len))
                    .then_some(header_len + frame.len());
            match written {
                Some(n) => {
                    stats.to_guest.fetch_add(1, Ordering::Relaxed);
                    let _ =
                        st.get_queue_mut()
                            .add_used(&*guard, head, u32::try_from(n).unwrap_or(0));
                    moved += 1;
                    io.free(pkt);
                }
                None => {
                    stats.to_guest_too_big.fetch_add(1, Ordering::Relaxed);
                    let _ = st.get_queue_mut().add_used(&*guard, head, 0);
                    io.refuse(pkt);
                }
            }
        }
        if st.needs_notification().unwrap_or(true) {
            let _ = st.signal_used_queue();
        }
        moved
    }
}

/// Chains the guest offered on `queue` that the backend has not taken; `None` when its avail
/// index is more than the queue's size ahead (a broken or hostile driver: the queue's crate
/// would refuse, and log, every chain asked of it).
fn pending_chains<M: vm_memory::GuestMemory>(queue: &virtio_queue::Queue, mem: &M) -> Option<u16> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    let pending = (avail - Wrapping(queue.next_avail())).0;
    (pending <= queue.size()).then_some(pending)
}

/// Reads `chain`'s descriptors from guest memory once, into `out`; whether the backend serves
/// the chain: its head is a slot of the queue (`size`) and it has 1 to
/// [`MAX_CHAIN_DESCRIPTORS`] descriptors (the walk stops past that). The frame is then read or
/// written through these copies alone: a guest rewriting its descriptors meanwhile (an
/// indirect table's length, a `NEXT` flag) cannot make the backend walk more than it counted.
fn read_once<M>(
    chain: virtio_queue::DescriptorChain<M>,
    size: u16,
    out: &mut Vec<Descriptor>,
) -> bool
where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    out.clear();
    if chain.head_index() >= size {
        return false;
    }
    out.extend(chain.take(MAX_CHAIN_DESCRIPTORS + 1));
    (1..=MAX_CHAIN_DESCRIPTORS).contains(&out.len())
}

/// The descriptors of a chain the device reads (the frame a guest transmits).
fn readable(descriptors: &[Descriptor]) -> impl Iterator<Item = &Descriptor> + Clone {
    descriptors.iter().filter(|d| !d.is_write_only())
}

/// The descriptors of a chain the device writes (a receive buffer).
fn writable(descriptors: &[Descriptor]) -> impl Iterator<Item = &Descriptor> + Clone {
    descriptors.iter().filter(|d| d.is_write_only())
}

fn byte_len(d: &Descriptor) -> usize {
    d.len() as usize
}

/// Calls `copy(address, range)` for each piece of the guest buffers `descriptors`, laid end to
/// end, that holds their bytes `skip..skip + len` (`range` indexes those `len` bytes); whether
/// every piece was copied (false when `copy` fails or the buffers end first).
fn pieces<'a>(
    descriptors: impl Iterator<Item = &'a Descriptor>,
    mut skip: usize,
    len: usize,
    mut copy: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> bool {
    let mut done = 0;
    for d in descriptors {
        if done == len {
            break;
        }
        let size = byte_len(d);
        if skip >= size {
            skip -= size;
            continue;
        }
        let n = (size - skip).min(len - done);
        let Some(at) = d.addr().checked_add(skip as u64) else {
            return false;
        };
        if !copy(at, done..done + n) {
            return false;
        }
        done += n;
        skip = 0;
    }
    done == len
}

/// Brings `queue`'s next used index to the one in the guest's used ring, where it lags: the
/// guest sees only the ring's. This backend completes every chain in the round that takes it,
/// so the two are equal between rounds, except when QEMU sends `SET_VRING_ADDR` while the
/// ring runs (it does so for every ring when a migration starts logging): the backend crate
/// reads the ring's index and sets the queue's in two steps, and a round of the worker in
/// between leaves the queue behind the ring, so its next entries would overwrite completions
/// the guest already has and move the ring's index back (the guest then reads stale entries:
/// `id N is not a head`). Called under the ring's lock before a round's first completion.
/// Returns whether it moved the index.
fn resync_used<M: vm_memory::GuestMemory>(
    queue: &mut virtio_queue::Queue,
    mem: &M,
    nic: &str,
) -> bool {
    let Ok(ring) = queue.used_idx(mem, Ordering::Acquire) else {
        return false;
    };
    if ring.0 == queue.next_used() {
        return false;
    }
    tracing::debug!(
        nic,
        queue = queue.next_used(),
        ring = ring.0,
        "the used index was set behind the guest's ring while it ran: taken from the ring"
    );
    queue.set_next_used(ring.0);
    true
}

/// A VM's NICs as one panel node, port `i` being NIC `i`.
pub struct VhostUserNode {
    ports: Vec<NicPort>,
}

impl VhostUserNode {
    /// The node of `ports`, in port order.
    pub fn new(ports: Vec<NicPort>) -> Self {
        VhostUserNode { ports }
    }
}

impl Node for VhostUserNode {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let mut moved = 0;
        for (i, p) in self.ports.iter_mut().enumerate() {
            moved += p.poll(io, i);
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::time::Instant;

    /// Bytes `skip..skip + len` of buffers laid end to end are found piece by piece across
    /// their boundaries; buffers that end first, or a copy that fails, say so.
    #[test]
    fn pieces_cross_buffer_boundaries_and_fail_short() {
        let bufs = [
            Descriptor::new(0x1000, 4, 0, 0),
            Descriptor::new(0x2000, 6, 0, 0),
            Descriptor::new(0x3000, 10, 0, 0),
        ];
        let mut seen = Vec::new();
        let all = pieces(bufs.iter(), 2, 12, |at, r| {
            seen.push((at.0, r));
            true
        });
        assert!(all);
        assert_eq!(seen, [(0x1002, 0..2), (0x2000, 2..8), (0x3000, 8..12)]);
        seen.clear();
        assert!(pieces(bufs.iter(), 10, 10, |at, r| {
            seen.push((at.0, r));
            true
        }));
        assert_eq!(seen, [(0x3000, 0..10)], "the first two skipped whole");
        assert!(
            !pieces(bufs.iter(), 2, 19, |_, _| true),
            "the buffers hold 18 from 2"
        );
        assert!(!pieces(bufs.iter(), 0, 5, |at, _| at.0 != 0x2000));
        assert!(pieces(bufs.iter(), 0, 0, |_, _| false), "nothing to copy");
        let wraps = [Descriptor::new(u64::MAX - 1, 8, 0, 0)];
        assert!(
            !pieces(wraps.iter(), 4, 2, |_, _| true),
            "an address past 2^64"
        );
    }

    /// A queue whose next used index was set behind its ring (the crate's two-step
    /// `SET_VRING_ADDR` racing a round) takes the ring's; its next completion goes after the
    /// guest's last one instead of over it.
    #[test]
    fn a_used_index_set_behind_the_guests_ring_is_taken_from_the_ring() {
        let mem: vm_memory::GuestMemoryMmap =
            vm_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let mut q = virtio_queue::Queue::new(16).unwrap();
        q.set_desc_table_address(Some(0x0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        // Two chains offered (heads 0 and 1, one descriptor each), both completed.
        for head in 0u16..2 {
            let desc = u64::from(head) * 16;
            mem.write_obj(0x4000u64 + u64::from(head) * 0x100, GuestAddress(desc))
                .unwrap();
            mem.write_obj(0x100u32, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(desc + 12)).unwrap(); // VIRTQ_DESC_F_WRITE
            mem.write_obj(head, GuestAddress(0x1004 + u64::from(head) * 2))
                .unwrap();
        }
        mem.write_obj(2u16, GuestAddress(0x1002)).unwrap();
        for _ in 0..2 {
            let chain = q.pop_descriptor_chain(&mem).unwrap();
            q.add_used(&mem, chain.head_index(), 0x10).unwrap();
        }
        assert_eq!(q.used_idx(&mem, Ordering::Acquire).unwrap().0, 2);
        assert!(!resync_used(&mut q, &mem, "t"), "in step: nothing to do");
        // The crate read the ring at 1 before the second completion, then set it.
        q.set_next_used(1);
        assert!(resync_used(&mut q, &mem, "t"));
        assert_eq!(q.next_used(), 2);
        assert_eq!(q.used_idx(&mem, Ordering::Acquire).unwrap().0, 2);
    }

    fn wait_for(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_nic_connects_to_its_qemu_again_after_each_hang_up_until_it_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nic0.sock");
        // Opened before QEMU listens: it keeps trying.
        let nic = NicSocket::open(&path, "vm1.n3").unwrap();
        std::thread::sleep(CONNECT_RETRY * 2);
        let qemu = std::os::unix::net::UnixListener::bind(&path).unwrap();
        assert!(!nic.is_running(), "no QEMU yet");
        // Two connections QEMU ends at once: each is counted, and the NIC connects again
        // (possibly before the count is read: at least n).
        for n in 1..=2 {
            let (conn, _) = qemu.accept().unwrap();
            drop(conn);
            wait_for("the connection counted", || {
                nic.stats().connections.load(Ordering::Relaxed) >= n
            });
        }
        let (third, _) = qemu.accept().unwrap();
        assert!(
            !nic.is_running(),
            "a peer that sent nothing gives no virtqueues"
        );
        // Dropping the NIC hangs up on QEMU and connects no more.
        drop(nic);
        let mut buf = [0u8; 1];
        assert_eq!((&third).read(&mut buf).unwrap(), 0, "hung up");
        qemu.set_nonblocking(true).unwrap();
        std::thread::sleep(CONNECT_RETRY * 3);
        assert!(qemu.accept().is_err(), "no connection after the drop");
    }

    #[test]
    fn a_socket_path_longer_than_a_unix_socket_takes_is_refused_with_the_path() {
        let long = PathBuf::from(format!("/tmp/{}.sock", "x".repeat(120)));
        let e = NicSocket::open(&long, "n").err().unwrap().to_string();
        assert!(e.contains("at most 107") && e.contains("xxxx"), "{e}");
    }
}
