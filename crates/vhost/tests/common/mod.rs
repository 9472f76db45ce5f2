//! A vhost-user frontend as QEMU is one, for the NIC's tests: guest memory in a shared memfd,
//! split virtqueues laid out by hand, kicks on eventfds, and the handshake in QEMU 7.2's order.

#![allow(clippy::unwrap_used, dead_code)]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const MEM: usize = 1 << 20;
pub const QUEUE: u16 = 16;
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// Per queue: descriptors, then the avail ring a page later, the used ring a page after that.
pub const QUEUE_BASE: [u64; 2] = [0x0000, 0x4000];
pub const BUFFERS: u64 = 0x10000;
pub const BUF: u64 = 2048;

/// Guest memory: a memfd mapped into this process, with two split virtqueues of `queue` slots
/// at [`QUEUE_BASE`] (room for 256 each).
pub struct GuestRam {
    pub fd: std::os::fd::OwnedFd,
    base: *mut u8,
    /// Slots of each queue.
    pub queue: u16,
}

impl GuestRam {
    pub fn new(queue: u16) -> GuestRam {
        // SAFETY: a valid NUL-terminated name; sealable, as QEMU's memory backends are.
        let fd = unsafe { libc::memfd_create(c"tv-guest".as_ptr(), libc::MFD_ALLOW_SEALING) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just returned by memfd_create and is owned here alone.
        let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // SAFETY: a valid fd; MEM bytes.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), MEM as i64) }, 0);
        // Its size fixed, as QEMU seals its memfds (the NIC refuses one that may shrink).
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW;
        // SAFETY: a valid fd created with MFD_ALLOW_SEALING.
        assert_eq!(
            unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) },
            0
        );
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
            queue,
        }
    }

    pub fn va(&self, gpa: u64) -> u64 {
        self.base as u64 + gpa
    }

    pub fn write(&self, gpa: u64, bytes: &[u8]) {
        assert!(gpa as usize + bytes.len() <= MEM);
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(gpa as usize), bytes.len())
        };
    }

    pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
        assert!(gpa as usize + len <= MEM);
        let mut out = vec![0u8; len];
        // SAFETY: in bounds of the mapping (checked above).
        unsafe {
            std::ptr::copy_nonoverlapping(self.base.add(gpa as usize), out.as_mut_ptr(), len)
        };
        out
    }

    pub fn u16_at(&self, gpa: u64) -> u16 {
        let b = self.read(gpa, 2);
        u16::from_le_bytes([b[0], b[1]])
    }

    /// This memory as one region of `size` bytes from guest address 0 (`MEM`: all of it), as
    /// `SET_MEM_TABLE` names it.
    pub fn region(&self, size: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: self.va(0),
            mmap_offset: 0,
            mmap_handle: self.fd.as_raw_fd(),
        }
    }

    /// Descriptor `i` of queue `q`: a buffer at `addr` of `len` bytes.
    pub fn descriptor(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16) {
        self.descriptor_at(QUEUE_BASE[q] + u64::from(i) * 16, addr, len, flags, 0);
    }

    /// A descriptor at `gpa` (in a queue's table or an indirect one), chained to `next`.
    pub fn descriptor_at(&self, gpa: u64, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = Vec::with_capacity(16);
        d.extend_from_slice(&addr.to_le_bytes());
        d.extend_from_slice(&len.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&next.to_le_bytes());
        self.write(gpa, &d);
    }

    /// Offer descriptor heads `heads` on queue `q`'s avail ring (from slot `from`).
    pub fn offer(&self, q: usize, from: u16, heads: &[u16]) {
        let avail = QUEUE_BASE[q] + 0x1000;
        for (k, h) in heads.iter().enumerate() {
            let slot = (from + k as u16) % self.queue;
            self.write(avail + 4 + u64::from(slot) * 2, &h.to_le_bytes());
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.set_avail_idx(q, from + heads.len() as u16);
    }

    /// Queue `q`'s avail index, as a driver publishes it.
    pub fn set_avail_idx(&self, q: usize, idx: u16) {
        self.write(QUEUE_BASE[q] + 0x1000 + 2, &idx.to_le_bytes());
    }

    pub fn used_idx(&self, q: usize) -> u16 {
        self.u16_at(QUEUE_BASE[q] + 0x2000 + 2)
    }

    /// (id, len) of used slot `slot` of queue `q`.
    pub fn used(&self, q: usize, slot: u16) -> (u32, u32) {
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

pub fn wait_for(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// QEMU's end of one NIC connection, set up: both queues of `ram.queue` slots in `ram`.
pub struct QemuEnd {
    pub fe: Frontend,
    pub stream: UnixStream,
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    /// What the backend offered.
    pub features: u64,
    pub protocol: VhostUserProtocolFeatures,
}

/// Accepts the NIC's connection on `qemu` and sets it up as QEMU 7.2 does: protocol
/// features when the device is realized, the queue pair enabled when the guest's driver sets
/// its features (before any `SET_FEATURES` reaches the backend), then the device started at
/// `DRIVER_OK` with the driver's `acked` features, `ram` as the guest's memory.
pub fn connect(qemu: &UnixListener, ram: &GuestRam, acked: u64) -> QemuEnd {
    let (stream, _) = qemu.accept().unwrap();
    let mut fe = Frontend::from_stream(stream.try_clone().unwrap(), 2);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
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
    fe.set_features(acked).unwrap();
    fe.set_mem_table(&[ram.region(MEM as u64)]).unwrap();
    let kicks: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    let calls: Vec<EventFd> = (0..2).map(|_| EventFd::new(0).unwrap()).collect();
    for q in 0..2 {
        fe.set_vring_num(q, ram.queue).unwrap();
        fe.set_vring_addr(
            q,
            &VringConfigData {
                queue_max_size: ram.queue,
                queue_size: ram.queue,
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
    // The backend answers in order: once this is answered, every message above was handled
    // (both rings have their kick and are ready), whichever ring's kick handed them over.
    fe.get_features().unwrap();
    QemuEnd {
        fe,
        stream,
        kicks,
        calls,
        features,
        protocol,
    }
}
