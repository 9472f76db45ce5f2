//! A guest (or its QEMU) that breaks the virtio and vhost-user rules: what it posts is bounded
//! before the node walks it, and nothing it does floods the host's log or takes the node's
//! worker for more than a batch. The NIC is polled by hand here, one round at a time.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicU64, Ordering};

use common::{BUFFERS, GuestRam, MEM, QUEUE, connect, wait_for};
use telvirt_dataplane::node::{BATCH, Node, NodeIo, PortIo};
use telvirt_dataplane::pool::{Pool, PoolCache};
use telvirt_vhost::{MAX_CHAIN_DESCRIPTORS, NET_HEADER, NicSocket, VhostUserNode};
use vhost::vhost_user::VhostUserFrontend;
use vhost::{VhostBackend, VhostUserDirtyLogRegion};

const VIRTQ_DESC_F_NEXT: u16 = 1;
const VIRTQ_DESC_F_INDIRECT: u16 = 4;
/// The features a modern driver acknowledges here: VERSION_1, protocol features, indirect
/// descriptors.
const ACKED: u64 = 1 << 32 | 1 << 30 | 1 << 28;

/// Counts the errors the virtqueue crate logs (the host's log, which a guest must not flood).
struct QueueErrors(AtomicU64);

impl log::Log for QueueErrors {
    fn enabled(&self, m: &log::Metadata<'_>) -> bool {
        m.target().starts_with("virtio_queue")
    }
    fn log(&self, r: &log::Record<'_>) {
        if self.enabled(r.metadata()) && r.level() <= log::Level::Warn {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
    fn flush(&self) {}
}

static QUEUE_ERRORS: QueueErrors = QueueErrors(AtomicU64::new(0));

/// The virtqueue crate's errors and warnings logged so far in this process.
fn queue_errors() -> u64 {
    // Set once per process; later calls find it set.
    if log::set_logger(&QUEUE_ERRORS).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
    QUEUE_ERRORS.0.load(Ordering::Relaxed)
}

/// A NIC connected to a frontend whose queues have `queue` slots, its queues handed over, and
/// the node to poll by hand.
struct Rig {
    _dir: tempfile::TempDir,
    nic: NicSocket,
    ram: GuestRam,
    _qemu: common::QemuEnd,
    node: VhostUserNode,
    pool: Pool,
    cache: PoolCache,
}

impl Rig {
    fn new(queue: u16) -> Rig {
        queue_errors();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nic.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let nic = NicSocket::open(&path, "vm1.eth0").unwrap();
        let ram = GuestRam::new(queue);
        let qemu = connect(&listener, &ram, ACKED);
        qemu.kicks[0].write(1).unwrap();
        wait_for("the NIC to take the virtqueues", || nic.is_running());
        let node = VhostUserNode::new(vec![nic.port()]);
        Rig {
            _dir: dir,
            nic,
            ram,
            _qemu: qemu,
            node,
            pool: Pool::new("vhost-hostile", 1024, 2048).unwrap(),
            cache: PoolCache::new(),
        }
    }

    /// One round of the node (no link on its port: what it sends is counted and freed).
    fn poll(&mut self) -> usize {
        let mut ports = [PortIo::default()];
        let moved = self
            .node
            .poll(&mut NodeIo::new(&self.pool, &mut self.cache, &mut ports));
        self.cache.flush(&self.pool);
        moved
    }

    fn counter(&self, f: impl Fn(&telvirt_vhost::NicStats) -> &AtomicU64) -> u64 {
        f(self.nic.stats()).load(Ordering::Relaxed)
    }
}

/// A guest that fills its transmit queue with frames the node drops (a header and nothing
/// behind it) costs one round one batch of chains, not the whole queue: the worker goes back
/// to its other nodes, and the rest waits for the next rounds.
#[test]
fn a_round_takes_at_most_a_batch_of_the_guests_dropped_frames() {
    let queue = 256u16;
    let mut rig = Rig::new(queue);
    let header_only = BUFFERS;
    for i in 0..queue {
        rig.ram.descriptor(1, i, header_only, NET_HEADER as u32, 0);
    }
    let heads: Vec<u16> = (0..queue).collect();
    rig.ram.offer(1, 0, &heads);
    rig.poll();
    assert_eq!(
        usize::from(rig.ram.used_idx(1)),
        BATCH,
        "one batch of chains"
    );
    assert_eq!(rig.counter(|s| &s.from_guest_bad), BATCH as u64);
    let rounds = usize::from(queue) / BATCH;
    for _ in 1..rounds {
        rig.poll();
    }
    assert_eq!(rig.ram.used_idx(1), queue, "every chain given back");
    assert_eq!(rig.counter(|s| &s.from_guest), 0);
}

/// A guest whose avail index runs more than the queue's size ahead is not served while it
/// does, and its rounds log nothing (before, the virtqueue crate logged an error for every
/// chain asked of it, every round); put right, it is served again.
#[test]
fn an_avail_index_beyond_the_queue_is_not_served_and_floods_no_log() {
    let mut rig = Rig::new(QUEUE);
    let before = queue_errors();
    rig.ram.set_avail_idx(1, QUEUE + 1);
    rig.ram.set_avail_idx(0, QUEUE + 1);
    for _ in 0..100 {
        rig.poll();
    }
    assert_eq!(rig.ram.used_idx(1), 0, "nothing taken");
    assert_eq!(queue_errors() - before, 0, "no error logged");
    // Put right: one frame offered from where the backend is.
    let frame = BUFFERS + 0x1000;
    rig.ram.write(frame, &[0u8; NET_HEADER + 60]);
    rig.ram.descriptor(1, 0, frame, (NET_HEADER + 60) as u32, 0);
    rig.ram.offer(1, 0, &[0]);
    rig.poll();
    assert_eq!(rig.counter(|s| &s.from_guest), 1);
    assert_eq!(rig.ram.used_idx(1), 1);
}

/// An indirect table with more descriptors than [`MAX_CHAIN_DESCRIPTORS`] is dropped before
/// its bytes are walked, and its chain given back; one at the limit carries its frame.
#[test]
fn a_chain_with_too_many_descriptors_is_dropped_and_one_at_the_limit_carries() {
    let mut rig = Rig::new(QUEUE);
    let before = queue_errors();
    // Head 0: an indirect table of LIMIT + 1 descriptors; head 1: one of LIMIT. Each table: a
    // header buffer, then one byte per descriptor.
    let payload = BUFFERS + 0x8000;
    rig.ram.write(payload, &[7u8; 4096]);
    for (head, count) in [
        (0u16, MAX_CHAIN_DESCRIPTORS + 1),
        (1, MAX_CHAIN_DESCRIPTORS),
    ] {
        let table = BUFFERS + 0x2000 * (u64::from(head) + 1);
        for k in 0..count {
            let last = k + 1 == count;
            let (addr, len) = if k == 0 {
                (payload, NET_HEADER as u32)
            } else {
                (payload + 64 + k as u64, 1)
            };
            let flags = if last { 0 } else { VIRTQ_DESC_F_NEXT };
            rig.ram
                .descriptor_at(table + 16 * k as u64, addr, len, flags, k as u16 + 1);
        }
        rig.ram
            .descriptor(1, head, table, (16 * count) as u32, VIRTQ_DESC_F_INDIRECT);
    }
    rig.ram.offer(1, 0, &[0, 1]);
    rig.poll();
    assert_eq!(
        rig.counter(|s| &s.from_guest_bad),
        1,
        "the longer chain dropped"
    );
    assert_eq!(
        rig.counter(|s| &s.from_guest),
        1,
        "the chain at the limit carried"
    );
    assert_eq!(rig.ram.used_idx(1), 2, "both given back");
    assert_eq!(queue_errors() - before, 0);
}

/// A head that names no slot of the queue is dropped without a completion the crate would
/// refuse (and log).
#[test]
fn a_head_beyond_the_queue_is_dropped_without_a_log() {
    let mut rig = Rig::new(QUEUE);
    let before = queue_errors();
    rig.ram.offer(1, 0, &[200]);
    rig.poll();
    assert_eq!(rig.counter(|s| &s.from_guest_bad), 1);
    assert_eq!(rig.ram.used_idx(1), 0, "no slot to give back");
    assert_eq!(queue_errors() - before, 0);
}

/// QEMU's end after the handshake up to the features, on a NIC of its own.
fn handshake_to_features(dir: &tempfile::TempDir) -> (NicSocket, vhost::vhost_user::Frontend) {
    let path = dir.path().join("nic.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let nic = NicSocket::open(&path, "vm1.eth0").unwrap();
    let (stream, _) = listener.accept().unwrap();
    let mut fe = vhost::vhost_user::Frontend::from_stream(stream, 2);
    fe.set_owner().unwrap();
    fe.get_features().unwrap();
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol).unwrap();
    fe.set_features(ACKED).unwrap();
    (nic, fe)
}

/// A ring size that is not a power of two ends the connection (the crate would keep the old
/// size and walk past the guest's ring); a power of two is taken.
#[test]
fn a_ring_size_not_a_power_of_two_ends_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (_nic, fe) = handshake_to_features(&dir);
    fe.set_vring_num(0, 16).unwrap();
    assert!(fe.get_features().is_ok(), "16 taken");
    fe.set_vring_num(0, 12).unwrap();
    assert!(
        fe.get_features().is_err(),
        "12 refused: the connection ended"
    );
}

/// A memory region or dirty log larger than the file sent with it ends the connection before
/// the backend maps it (a touch past the file's end would end the node with SIGBUS).
#[test]
fn memory_or_a_dirty_log_beyond_its_file_ends_the_connection() {
    let ram = GuestRam::new(QUEUE);
    let region = |size: u64| ram.region(size);
    let dir = tempfile::tempdir().unwrap();
    let (_nic, fe) = handshake_to_features(&dir);
    fe.set_mem_table(&[region(MEM as u64)]).unwrap();
    assert!(fe.get_features().is_ok(), "the file's own size taken");
    fe.set_mem_table(&[region(2 * MEM as u64)]).unwrap();
    assert!(fe.get_features().is_err(), "twice the file refused");

    let dir = tempfile::tempdir().unwrap();
    let (_nic, fe) = handshake_to_features(&dir);
    fe.set_mem_table(&[region(MEM as u64)]).unwrap();
    let log = GuestRam::new(QUEUE);
    let log_base = |size: u64| VhostUserDirtyLogRegion {
        mmap_size: size,
        mmap_offset: 0,
        mmap_handle: log.fd.as_raw_fd(),
    };
    // SET_LOG_BASE waits for the backend's answer.
    assert!(
        fe.set_log_base(0, Some(log_base(MEM as u64))).is_ok(),
        "the file's own size taken"
    );
    assert!(
        fe.set_log_base(0, Some(log_base(MEM as u64 + 1))).is_err(),
        "a log past its file refused: the connection ended"
    );
}

/// A memfd of `MEM` bytes that can always shrink (no seals allowed).
fn unsealed_memfd() -> std::os::fd::OwnedFd {
    // SAFETY: a valid NUL-terminated name; no seals allowed, so it can always shrink.
    let fd = unsafe { libc::memfd_create(c"tv-unsealed".as_ptr(), 0) };
    assert!(fd >= 0);
    // SAFETY: just returned by memfd_create, owned here alone.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: a valid fd; MEM bytes.
    assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), MEM as i64) }, 0);
    fd
}

/// Guest memory in a memfd that may still shrink ends the connection: cut short after the
/// check, a touch past its end would end the node (QEMU seals its memory backends).
#[test]
fn guest_memory_in_a_memfd_that_may_shrink_ends_the_connection() {
    let fd = unsealed_memfd();
    let sealed = GuestRam::new(QUEUE);
    let mut region = sealed.region(MEM as u64);
    region.mmap_handle = fd.as_raw_fd();
    let dir = tempfile::tempdir().unwrap();
    let (_nic, fe) = handshake_to_features(&dir);
    fe.set_mem_table(&[region]).unwrap();
    assert!(fe.get_features().is_err(), "an unsealed memfd refused");
}

/// So does a dirty log in such a memfd (QEMU seals its vhost log against shrinking too).
#[test]
fn a_dirty_log_in_a_memfd_that_may_shrink_ends_the_connection() {
    let ram = GuestRam::new(QUEUE);
    let dir = tempfile::tempdir().unwrap();
    let (_nic, fe) = handshake_to_features(&dir);
    fe.set_mem_table(&[ram.region(MEM as u64)]).unwrap();
    let fd = unsealed_memfd();
    let log = VhostUserDirtyLogRegion {
        mmap_size: MEM as u64,
        mmap_offset: 0,
        mmap_handle: fd.as_raw_fd(),
    };
    assert!(
        fe.set_log_base(0, Some(log)).is_err(),
        "an unsealed log refused: the connection ended"
    );
}

/// A memory region whose addresses run past 2^64 with its size ends the connection (the
/// vhost crate's own check of each region); the same region at a sane address is taken.
#[test]
fn a_memory_region_whose_addresses_wrap_ends_the_connection() {
    let ram = GuestRam::new(QUEUE);
    for wraps in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let (_nic, fe) = handshake_to_features(&dir);
        let mut region = ram.region(MEM as u64);
        if wraps {
            region.userspace_addr = u64::MAX - 0xfff;
        }
        fe.set_mem_table(&[region]).unwrap();
        assert_eq!(fe.get_features().is_err(), wraps, "wraps: {wraps}");
    }
}
