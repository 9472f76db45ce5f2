//! The vhost-user-net NIC driven by a real vhost-user frontend over its socket, as QEMU drives
//! it: guest memory in a shared memfd, split virtqueues laid out by hand, kicks on eventfds.
//! Frames the "guest" puts on its transmit queue reach the panel; frames the panel sends reach
//! the buffers the guest posted on its receive queue, behind a virtio-net header.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use common::{
    BUF, BUFFERS, GuestRam, MEM, QUEUE, QUEUE_BASE, VIRTQ_DESC_F_WRITE, connect, wait_for,
};

use telvirt_dataplane::graph::LinkSpec;
use telvirt_dataplane::node::{Node, NodeIo};
use telvirt_dataplane::panel::PatchPanel;
use telvirt_dataplane::pool::{Packet, Pool};
use telvirt_dataplane::traffic::{GenConfig, Generator};
use telvirt_dataplane::worker::{WorkerConfig, allowed_cores};
use telvirt_vhost::{NET_HEADER, NicSocket, VhostUserNode};
use vhost::VhostBackend;
use vhost::VhostUserDirtyLogRegion;
use vhost::vhost_user::message::VhostUserProtocolFeatures;

/// The frames a [`Collect`] received.
type Frames = Arc<Mutex<Vec<Vec<u8>>>>;

/// Keeps every frame it receives.
struct Collect(Frames);

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

/// A NIC `vm1.eth0` connecting to `path` (QEMU serves the socket), node `vm1` on a panel of
/// one worker, and node `sink` keeping what it receives.
fn nic_on_a_panel(path: &std::path::Path) -> (NicSocket, Arc<Pool>, PatchPanel, Frames) {
    let nic = NicSocket::open(path, "vm1.eth0").unwrap();
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
    (nic, pool, panel, got)
}

#[test]
fn frames_cross_between_a_frontends_virtqueues_and_the_panel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nic.sock");
    // QEMU serves the socket; the NIC connects to it.
    let qemu = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (nic, pool, mut panel, got) = nic_on_a_panel(&path);

    // QEMU's side of the handshake, in QEMU 7.2's order.
    let ram = GuestRam::new(QUEUE);
    let qe = connect(&qemu, &ram, 1 << 32 | 1 << 30);
    let (fe, kicks, calls, features, protocol) =
        (&qe.fe, &qe.kicks, &qe.calls, qe.features, qe.protocol);
    assert_ne!(features & (1 << 32), 0, "VIRTIO_F_VERSION_1 offered");
    assert_ne!(
        features & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES offered"
    );

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
    let log = GuestRam::new(QUEUE);
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
    // The round that gave the buffer back counts its drop after: it has ended past this.
    panel.barrier();
    assert_eq!(ram.used(0, 4), (4, 0));
    assert_eq!(load(&stats.to_guest_too_big), 1);
    assert_eq!(panel.node_drops("vm1").map(|d| d.refused), Some(1));

    // A new memory table while the log runs (QEMU sends one when the guest's memory map
    // changes, and the log again only when its size does): what the NIC writes afterwards is
    // logged still, so the migration carries it.
    fe.set_mem_table(&[ram.region(MEM as u64)]).unwrap();
    let far = BUFFERS + 24 * BUF;
    assert!(!page_dirty(far), "a page nobody wrote yet");
    ram.descriptor(0, 5, far, BUF as u32, VIRTQ_DESC_F_WRITE);
    ram.offer(0, 5, &[5]);
    send_to_guest(&mut panel, &pool, "gen4", 1);
    wait_for("a frame in the guest after the new table", || {
        ram.used_idx(0) == 6
    });
    assert!(
        page_dirty(far),
        "the frame's page is logged after the new table"
    );
    panel.shutdown();
}

/// A legacy driver (no `VIRTIO_F_VERSION_1`) puts a 10-byte header before each frame and
/// reads one before each frame it receives: no byte of a frame is taken for a header, and
/// none of a header is taken for the frame.
#[test]
fn a_legacy_drivers_frames_keep_every_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nic.sock");
    let qemu = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (nic, pool, mut panel, got) = nic_on_a_panel(&path);
    let ram = GuestRam::new(QUEUE);
    let qe = connect(&qemu, &ram, 1 << 30);
    ram.descriptor(0, 0, BUFFERS, BUF as u32, VIRTQ_DESC_F_WRITE);
    ram.offer(0, 0, &[0]);
    qe.kicks[0].write(1).unwrap();
    wait_for("the NIC to take the virtqueues", || nic.is_running());
    panel
        .apply(&[LinkSpec::parse("vm1.eth0 -> sink.in").unwrap()])
        .unwrap();

    let frame: Vec<u8> = (100..160u8).collect();
    let tx_buf = BUFFERS + 8 * BUF;
    let mut bytes = vec![0u8; telvirt_vhost::LEGACY_NET_HEADER];
    bytes.extend_from_slice(&frame);
    ram.write(tx_buf, &bytes);
    ram.descriptor(1, 0, tx_buf, bytes.len() as u32, 0);
    ram.offer(1, 0, &[0]);
    qe.kicks[1].write(1).unwrap();
    wait_for("the guest's frame on the panel", || {
        got.lock().unwrap().len() == 1
    });
    assert_eq!(got.lock().unwrap()[0], frame);

    send_to_guest(&mut panel, &pool, "gen", 1);
    wait_for("a frame in the guest", || ram.used_idx(0) == 1);
    assert_eq!(
        ram.used(0, 0),
        (0, (telvirt_vhost::LEGACY_NET_HEADER + 64) as u32),
        "a 10-byte header and the 64-byte frame"
    );
    panel.shutdown();
}
