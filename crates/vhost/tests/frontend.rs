//! The vhost-user-net NIC driven by a real vhost-user frontend over its socket, as QEMU drives
//! it: guest memory in a shared memfd, split virtqueues laid out by hand, kicks on eventfds.
//! Frames the "guest" puts on its transmit queue reach the panel; frames the panel sends reach
//! the buffers the guest posted on its receive queue, behind a virtio-net header.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use telvirt_dataplane::graph::LinkSpec;
use telvirt_dataplane::node::{Node, NodeIo};
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::{Packet, Pool};
use telvirt_dataplane::traffic::{GenConfig, Generator};
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores};
use telvirt_vhost::{NET_HEADER, NicSocket, VhostUserNode};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserDirtyLogRegion, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 1 << 20;
const QUEUE: u16 = 16;
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Per queue: descriptors, then the avail ring a page later, the used ring a page after that.
const QUEUE_BASE: [u64; 2] = [0x0000, 0x4000];
const BUFFERS: u64 = 0x10000;
const BUF: u64 = 2048;

/// Guest memory: a memfd mapped into this process.
struct GuestRam {
    fd: std::os::fd::OwnedFd,
    base: *mut u8,
}

impl GuestRam {
    fn new() -> GuestRam {
        // SAFETY: a valid NUL-terminated name; no flags.
        let fd = unsafe { libc::memfd_create(c"tv-guest".as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by memfd_create and is owned here alone.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: a valid fd; MEM bytes.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), MEM as i64) }, 0);
        // SAFETY: a shared mapping of the whole memfd.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED);
        GuestRam {
            fd,
            base: base.cast(),
        }
    }

    fn va(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }

    fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len())
        };
    }

    fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), out.as_mut_ptr(), len)
        };
        out
    }

    fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// Descriptor `i` of queue `q`: a buffer at `addr` of `len` bytes.
    fn descriptor(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&0u16.to_le_bytes());
        self.write(QUEUE_BASE[q] + u64::from(i) * 16, &d);
    }

    /// Offer descriptor heads `heads` on queue `q`'s avail ring (from slot `from`).
    fn offer(&self, q: usize, from: u16, heads: &[u16]) {
        let avail = QUEUE_BASE[q] + 0x1000;
        for (k, h) in heads.iter().enumerate() {
            let slot = (from + k as u16) % QUEUE;
            self.write(avail + 4 + u64::from(slot) * 2, &h.to_le_bytes());
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.write(avail + 2, &(from + heads.len() as u16).to_le_bytes());
    }

    fn used_idx(&self, q: usize) -> u16 {
        self.u16_at(QUEUE_BASE[q] + 0x2000 + 2)
    }

    /// (id, len) of used slot `slot` of queue `q`.
    fn used(&self, q: usize, slot: u16) -> (u32, u32) {
        let b = self.read(QUEUE_BASE[q] + 0x2000 + 4 + u64::from(slot) * 8, 8);
        (
            u32::from_le_bytes(b[0..4].try_into().unwrap()),
            u32::from_le_bytes(b[4..8].try_into().unwrap()),
        )
    }
}

impl Drop for GuestRam {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), MEM) };
    }
}

/// Keeps every frame it receives.
struct Collect(Arc<Mutex<Vec<Vec<u8>>>>);

impl Node for Collect {
    fn poll(&mut self, io: &mut NodeIo<'_>) -> usize {
        let mut v: Vec<Packet> = Vec::new();
        let n = io.recv(0, &mut v, 32);
        for p in v.drain(..) {
            self.0.lock().unwrap().push(io.pool().data(&p).to_vec());
            io.free(p);
        }
        n
    }
}

fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A generator `name` that sends `count` frames to the guest's NIC (in place of the previous).
fn send_to_guest(panel: &mut PatchPanel, pool: &Pool, name: &str, count: u64) {
    let generator = Generator::new(
        GenConfig {
            count: Some(count),
            ..GenConfig::default()
        },
        pool.buf_size(),
    )
    .unwrap();
    panel
        .add_node(name, &["out"], 0, Box::new(generator))
        .unwrap();
    panel
        .apply(&[
            LinkSpec::parse("vm1.eth0 -> sink.in").unwrap(),
            LinkSpec::parse(&format!("{name}.out -> vm1.eth0")).unwrap(),
        ])
        .unwrap();
}

#[test]
fn frames_cross_between_a_frontends_virtqueues_and_the_panel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nic.sock");
    // QEMU serves the socket; the NIC connects to it.
    let qemu = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let nic = NicSocket::open(&path, "vm1.eth0").unwrap();
    let pool = Arc::new(Pool::new("vhost-test", 1024, 2048).unwrap());
    let core = allowed_cores().unwrap()[0];
    let mut panel = PatchPanel::new(
        Arc::clone(&pool),
        vec![WorkerConfig::new("w", Some(core))],
        256,
    )
    .unwrap();
    panel
        .add_node(
            "vm1",
            &["eth0"],
            0,
            Box::new(VhostUserNode::new(vec![nic.port()])),
        )
        .unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    panel
        .add_node("sink", &["in"], 0, Box::new(Collect(Arc::clone(&got))))
        .unwrap();

    // The frontend's side of the handshake in QEMU 7.2's order: protocol features when the
    // device is realized, the queue pair enabled when the guest's driver sets its features
    // (before any SET_FEATURES reaches the backend), then the device started at DRIVER_OK.
    let ram = GuestRam::new();
    let (stream, _) = qemu.accept().unwrap();
    let mut fe = Frontend::from_stream(stream.try_clone().unwrap(), 2);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
    assert_ne!(
        features & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES offered"
    );
    let protocol = fe.get_protocol_features().unwrap();
    fe.set_protocol_features(protocol).unwrap();
    for q in 0..2u32 {
        // SET_VRING_ENABLE (18), version 1, 8 bytes: the ring, 1.
        let mut early = Vec::new();
        for w in [18u32, 1, 8, q, 1] {
            early.extend_from_slice(&w.to_le_bytes());
        }
        (&stream).write_all(&early).unwrap();
    }
    fe.set_features(1 << 32 | 1 << 30).unwrap();
    fe.set_mem_table(&[VhostUserMemoryRegionInfo {
        guest_phys_addr: 0,
        memory_size: MEM as u64,
        userspace_addr: ram.va(0),
        mmap_offset: 0,
        mmap_handle: ram.fd.as_raw_fd(),
    }])
    .unwrap();
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let calls: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    for q in 0..2 {
        fe.set_vring_num(q, QUEUE).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: QUEUE,
                queue_size: QUEUE,
                flags: 0,
                desc_table_addr: ram.va(QUEUE_BASE[q]),
                used_ring_addr: ram.va(QUEUE_BASE[q] + 0x2000),
                avail_ring_addr: ram.va(QUEUE_BASE[q] + 0x1000),
                log_addr: None,
            },
        )
        .unwrap();
        fe.set_vring_base(q, 0).unwrap();
        fe.set_vring_call(q, &calls[q]).unwrap();
        fe.set_vring_kick(q, &kicks[q]).unwrap();
        // QEMU 7.2 sends no enable here: the rings run on the enables held since the driver's.
    }

    // The guest posts four receive buffers and kicks: the NIC starts polling its queues.
    for i in 0..4u16 {
        ram.descriptor(
            0,
            i,
            BUFFERS + u64::from(i) * BUF,
            BUF as u32,
            VIRTQ_DESC_F_WRITE,
        );
    }
    ram.offer(0, 0, &[0, 1, 2, 3]);
    kicks[0].write(1).unwrap();
    wait_for("the NIC to take the virtqueues", || nic.is_running());

    // Guest → panel: one frame of 60 bytes behind its header.
    panel
        .apply(&[LinkSpec::parse("vm1.eth0 -> sink.in").unwrap()])
        .unwrap();
    let frame: Vec<u8> = (0..60u8).collect();
    let tx_buf = BUFFERS + 8 * BUF;
    let mut bytes = vec![0u8; NET_HEADER];
    bytes.extend_from_slice(&frame);
    ram.write(tx_buf, &bytes);
    ram.descriptor(1, 0, tx_buf, bytes.len() as u32, 0);
    ram.offer(1, 0, &[0]);
    kicks[1].write(1).unwrap();
    wait_for("the guest's frame on the panel", || {
        got.lock().unwrap().len() == 1
    });
    assert_eq!(got.lock().unwrap()[0], frame);
    wait_for("the transmit buffer returned", || ram.used_idx(1) == 1);
    assert_eq!(ram.used(1, 0), (0, 0));

    // Panel → guest: three generated frames land in three of the four buffers.
    send_to_guest(&mut panel, &pool, "gen", 3);
    wait_for("three frames in the guest", || ram.used_idx(0) == 3);
    for slot in 0..3u16 {
        let (id, len) = ram.used(0, slot);
        assert_eq!(id, u32::from(slot));
        assert_eq!(len as usize, NET_HEADER + 64, "header and a 64-byte frame");
        let header = ram.read(BUFFERS + u64::from(slot) * BUF, NET_HEADER);
        assert_eq!(header[10], 1, "num_buffers 1: {header:?}");
    }
    let stats = nic.stats();
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!((load(&stats.to_guest), load(&stats.from_guest)), (3, 1));
    assert!(calls[0].read().unwrap() > 0, "the guest was interrupted");

    // A migration starts: the frontend asks for the dirty log (LOG_ALL, a shared log). A frame
    // written into the guest afterwards marks its buffer's page and the used ring's page.
    assert_ne!(features & (1 << 26), 0, "VHOST_F_LOG_ALL offered");
    assert!(
        protocol.contains(VhostUserProtocolFeatures::LOG_SHMFD),
        "LOG_SHMFD offered: {protocol:?}"
    );
    fe.set_features(1 << 32 | 1 << 30 | 1 << 26).unwrap();
    let log = GuestRam::new();
    fe.set_log_base(
        0,
        Some(VhostUserDirtyLogRegion {
            mmap_size: (MEM / 4096 / 8) as u64,
            mmap_offset: 0,
            mmap_handle: log.fd.as_raw_fd(),
        }),
    )
    .unwrap();
    let page_dirty = |gpa: u64| {
        let page = gpa / 4096;
        log.read(page / 8, 1)[0] & (1 << (page % 8)) != 0
    };
    let (slot, used_ring) = (3u64, QUEUE_BASE[0] + 0x2000);
    assert!(
        !page_dirty(BUFFERS + slot * BUF) && !page_dirty(used_ring),
        "a fresh log"
    );
    send_to_guest(&mut panel, &pool, "gen2", 1);
    wait_for("a fourth frame in the guest", || ram.used_idx(0) == 4);
    assert!(
        page_dirty(BUFFERS + slot * BUF),
        "the frame's page is logged"
    );
    assert!(page_dirty(used_ring), "the used ring's page is logged");
    assert!(
        !page_dirty(BUFFERS + 16 * BUF),
        "a page nobody wrote is clean"
    );

    // A buffer too small for the next frame: the frame is dropped where it vanishes, counted
    // as the node's own drop (`net show`) and by the NIC, and the buffer goes back empty.
    assert_eq!(panel.node_drops("vm1").map(|d| d.refused), Some(0));
    ram.descriptor(0, 4, BUFFERS + 4 * BUF, 40, VIRTQ_DESC_F_WRITE);
    ram.offer(0, 4, &[4]);
    send_to_guest(&mut panel, &pool, "gen3", 1);
    wait_for("the small buffer returned", || ram.used_idx(0) == 5);
    assert_eq!(ram.used(0, 4), (4, 0));
    assert_eq!(load(&stats.to_guest_too_big), 1);
    assert_eq!(panel.node_drops("vm1").map(|d| d.refused), Some(1));
    panel.shutdown();
}
