//! The message filter between QEMU and a NIC's protocol daemon. QEMU's virtio-net (7.2 at
//! least) enables its queue pair with `SET_VRING_ENABLE` when the guest's driver sets its
//! features, before it sends `SET_FEATURES` to the backend, and does not enable the rings again
//! when it starts the device, nor when it reconnects to a restarted node; the backend crate
//! refuses an enable until `VHOST_USER_F_PROTOCOL_FEATURES` is acknowledged and ends the
//! connection, and keeps every ring disabled until one comes. Without protocol features QEMU
//! cannot start the device at all (EINVAL). So the filter holds early enables back and, right
//! after the first `SET_FEATURES` with protocol features, passes each ring's state: the last
//! one QEMU asked for, else enabled (a NIC of this backend has one queue pair, which QEMU
//! never leaves disabled). QEMU 10 asks for a reply to that early enable (`NEED_REPLY`, the
//! backend crate offering `REPLY_ACK`) and waits for it: the filter answers it, success, as
//! the enable is held. Every other message passes unchanged, with its file descriptors.
//! Only that answer is written to QEMU besides the daemon's replies: the frontend waits for
//! each reply before its next request, so no other reply is under way then.
//!
//! While QEMU logs dirty pages (a migration: `LOG_ALL` acknowledged, a log sent with
//! `SET_LOG_BASE`), a new memory table would come up without the log (the backend crate maps
//! the new regions with empty bitmaps, and QEMU sends the log again only when its size
//! changes), so the guest pages the node writes would not be logged and the migration would
//! carry stale ones. So the filter sends the last log to the daemon again right after each
//! such table, drops the daemon's reply to it, and holds the NIC's polling (`log_pending`)
//! from before the table until the log is in place.
//!
//! It also bounds what the backend crate would take on trust: a memory region or dirty log
//! larger than the file that comes with it (the first touch past the file's end would raise
//! SIGBUS and end the whole node) and a ring size that is not a power of two (the crate
//! ignores it and keeps the old size, walking past the guest's ring) end the connection.
//!
//! Owns the two forwarding threads of one connection; must not change any other message, and
//! must not outlive either end.

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::thread::JoinHandle;

use vhost::vhost_user::Listener;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// A vhost-user message header: request, flags, payload size (little-endian `u32` each).
const HEADER: usize = 12;
const SET_FEATURES: u32 = 2;
const RESET_OWNER: u32 = 4;
const SET_MEM_TABLE: u32 = 5;
const SET_LOG_BASE: u32 = 6;
const SET_VRING_NUM: u32 = 8;
/// Bytes of one region in `SET_MEM_TABLE`: guest address, size, QEMU's address, offset.
const MEM_REGION: usize = 32;
const SET_VRING_ENABLE: u32 = 18;
const RESET_DEVICE: u32 = 34;
/// `VHOST_USER_F_PROTOCOL_FEATURES` in `SET_FEATURES`' payload.
const PROTOCOL_FEATURES: u64 = 1 << 30;
/// `VHOST_F_LOG_ALL` in `SET_FEATURES`' payload: the frontend logs dirty pages (the bit the
/// backend offers, `lib.rs`).
const LOG_ALL: u64 = vhost::vhost_user::message::VhostUserVirtioFeatures::LOG_ALL.bits();
/// `NEED_REPLY` in the header's flags: the frontend waits for an answer (with `REPLY_ACK`).
const NEED_REPLY: u32 = 0x8;
/// The header flags of a reply: version 1, `REPLY`.
const REPLY: u32 = 0x1 | 0x4;
/// The most descriptors a message may carry and the largest payload: the backend crate's own
/// limits (it refuses more).
const MAX_FDS: usize = vhost::vhost_user::message::MAX_ATTACHED_FD_ENTRIES;
const MAX_PAYLOAD: usize = vhost::vhost_user::message::MAX_MSG_SIZE;

/// The forwarding threads of one connection. They end when either end hangs up; [`join`]
/// waits for both.
///
/// [`join`]: Filter::join
pub(crate) struct Filter {
    threads: Vec<JoinHandle<()>>,
    ends: Ends,
}

/// Both sockets of a filter, to hang up on from outside (a NIC going away while QEMU does not
/// read).
pub(crate) struct Ends(UnixStream, UnixStream);

impl Ends {
    pub(crate) fn hang_up(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
        let _ = self.1.shutdown(Shutdown::Both);
    }
}

impl Filter {
    /// Forwards between `qemu` (the accepted connection) and `daemon` (the daemon's peer),
    /// setting `log_pending` while a new memory table waits for its dirty log. On error both
    /// are shut down and no thread is left.
    pub(crate) fn spawn(
        qemu: UnixStream,
        daemon: UnixStream,
        name: &str,
        log_pending: Arc<AtomicBool>,
    ) -> io::Result<Filter> {
        let ends = Ends(qemu.try_clone()?, daemon.try_clone()?);
        let spawned = Filter::spawn_threads(qemu, daemon, name, log_pending);
        match spawned {
            Ok(threads) => Ok(Filter { threads, ends }),
            Err(e) => {
                ends.hang_up();
                Err(e)
            }
        }
    }

    /// Another handle on both sockets.
    pub(crate) fn ends(&self) -> io::Result<Ends> {
        Ok(Ends(self.ends.0.try_clone()?, self.ends.1.try_clone()?))
    }

    fn spawn_threads(
        qemu: UnixStream,
        daemon: UnixStream,
        name: &str,
        log_pending: Arc<AtomicBool>,
    ) -> io::Result<Vec<JoinHandle<()>>> {
        let (qemu_in, daemon_out) = (qemu.try_clone()?, daemon.try_clone()?);
        let log = LogReplay {
            pending: log_pending,
            replies_to_drop: Arc::new(AtomicU32::new(0)),
        };
        let log_out = log.clone();
        let to_daemon = std::thread::Builder::new()
            .name(format!("vhost-{name}-in"))
            .spawn(move || {
                if let Err(e) = forward_requests(&qemu_in, &daemon_out, &log) {
                    tracing::debug!("vhost-user filter: {e}");
                }
                // The daemon reads the end of its requests and closes; the reply side follows.
                let _ = daemon_out.shutdown(Shutdown::Write);
                let _ = qemu_in.shutdown(Shutdown::Read);
            })?;
        let to_qemu = std::thread::Builder::new()
            .name(format!("vhost-{name}-out"))
            .spawn(move || {
                if let Err(e) = forward_replies(&daemon, &qemu, &log_out) {
                    tracing::debug!("vhost-user filter: {e}");
                }
                let _ = qemu.shutdown(Shutdown::Both);
                let _ = daemon.shutdown(Shutdown::Both);
            })?;
        Ok(vec![to_daemon, to_qemu])
    }

    /// Waits for both threads (after either end hung up).
    pub(crate) fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// A listener with one connection already queued, and that connection's other end: the
/// daemon accepts it as if QEMU had connected. The socket lives in a fresh directory only
/// this process's user may enter, removed before this returns, so nobody else can connect.
pub(crate) fn private_pair() -> io::Result<(Listener, UnixStream)> {
    let dir = private_dir()?;
    let path = dir.path().join("s");
    let listener = UnixListener::bind(&path)?;
    let ours = UnixStream::connect(&path)?;
    drop(dir);
    Ok((Listener::from(listener), ours))
}

/// A fresh directory only this process's user may enter (0700 whatever the umask).
fn private_dir() -> io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("telvirt-vhost")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
}

/// Whether a frontend's message passes now: everything but a ring enable (8 bytes: ring,
/// state) before the features.
fn passes(request: u32, size: usize, features_seen: bool) -> bool {
    features_seen || request != SET_VRING_ENABLE || size != 8
}

/// The answer to a held message that asked for one (`NEED_REPLY`): `request` succeeded.
fn success_reply(request: u32) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + 8);
    for w in [request, REPLY, 8] {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m.extend_from_slice(&0u64.to_le_bytes());
    m
}

/// The rings' enable states held back until the features are acknowledged: the last state
/// asked for each ring, in the order rings were first named, starting from the queue pair's
/// two rings enabled. At most [`MAX_HELD`] rings.
#[derive(Debug)]
struct HeldEnables(Vec<[u8; 8]>);

impl Default for HeldEnables {
    fn default() -> Self {
        HeldEnables(vec![[0, 0, 0, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 0, 0, 0]])
    }
}

/// More rings than a NIC of this backend has; an enable of a ring beyond them is dropped.
const MAX_HELD: usize = 64;

impl HeldEnables {
    fn hold(&mut self, payload: &[u8]) {
        let Ok(state) = <[u8; 8]>::try_from(payload) else {
            return;
        };
        if let Some(s) = self.0.iter_mut().find(|s| s[..4] == state[..4]) {
            *s = state;
        } else if self.0.len() < MAX_HELD {
            self.0.push(state);
        }
    }

    /// The held enables as messages, emptied.
    fn messages(&mut self) -> Vec<Vec<u8>> {
        self.0
            .drain(..)
            .map(|state| message(SET_VRING_ENABLE, &state))
            .collect()
    }
}

/// A frontend message: `request`, version 1 (no reply wanted), `payload`.
fn message(request: u32, payload: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HEADER + payload.len());
    for w in [request, 1, payload.len() as u32] {
        m.extend_from_slice(&w.to_le_bytes());
    }
    m.extend_from_slice(payload);
    m
}

/// What the two forwarding threads share about the dirty log sent again after a memory table.
#[derive(Clone)]
struct LogReplay {
    /// Set from before such a table reaches the daemon until its log is in place: the NIC's
    /// polling writes nothing into the guest meanwhile.
    pending: Arc<AtomicBool>,
    /// Replies to `SET_LOG_BASE` that answer the filter, not QEMU (dropped).
    replies_to_drop: Arc<AtomicU32>,
}

/// Sends one message (`bytes`: header and payload) to `to` with `fds`.
fn send_message(to: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
    let sent = loop {
        match to.send_with_fds(&[bytes], fds) {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => break r.map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
        }
    };
    // A stream may take part of a message; the descriptors went with its first byte.
    if let Some(rest) = bytes.get(sent..) {
        let mut writer = to;
        writer.write_all(rest)?;
    }
    Ok(())
}

/// Reads QEMU's messages one at a time and passes them on until QEMU hangs up.
fn forward_requests(qemu: &UnixStream, daemon: &UnixStream, log: &LogReplay) -> io::Result<()> {
    let mut features_seen = false;
    let mut held = HeldEnables::default();
    // Whether the frontend logs dirty pages, and the last log it sent (payload, file).
    let mut logging = false;
    let mut last_log: Option<(Vec<u8>, File)> = None;
    let mut payload = Vec::with_capacity(MAX_PAYLOAD);
    loop {
        let Some((header, mut files)) = recv_header(qemu)? else {
            return Ok(());
        };
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (request, flags, size) = (word(0), word(4), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("request {request} has a payload of {size} bytes; at most {MAX_PAYLOAD}"),
            ));
        }
        payload.resize(size, 0);
        let mut reader = qemu;
        reader.read_exact(&mut payload)?;
        tracing::trace!(
            request,
            flags,
            size,
            features_seen,
            "vhost-user filter: a request"
        );
        check_request(request, &payload, &files)?;
        if !passes(request, size, features_seen) {
            tracing::debug!(
                ?payload,
                flags,
                "vhost-user filter: a ring enable before SET_FEATURES held"
            );
            held.hold(&payload);
            if flags & NEED_REPLY != 0 {
                let mut writer = qemu;
                writer.write_all(&success_reply(request))?;
            }
            continue;
        }
        let replay = request == SET_MEM_TABLE && logging && last_log.is_some();
        if replay {
            log.pending.store(true, Ordering::Release);
        }
        let fds: Vec<RawFd> = files.iter().map(AsRawFd::as_raw_fd).collect();
        send_message(daemon, &[&header[..], &payload[..]].concat(), &fds)?;
        match request {
            SET_FEATURES => {
                logging = features(&payload) & LOG_ALL != 0;
                if !logging {
                    last_log = None;
                }
            }
            SET_LOG_BASE => {
                // Kept, not duplicated: the daemon has its own copy of the descriptor.
                if let Some(file) = std::mem::take(&mut files).into_iter().next() {
                    last_log = Some((payload.clone(), file));
                }
            }
            RESET_OWNER | RESET_DEVICE => (logging, last_log) = (false, None),
            _ => {}
        }
        if replay && let Some((log_payload, file)) = &last_log {
            log.replies_to_drop.fetch_add(1, Ordering::AcqRel);
            send_message(
                daemon,
                &message(SET_LOG_BASE, log_payload),
                &[file.as_raw_fd()],
            )?;
        }
        drop(files);
        let mut writer = daemon;
        match request {
            SET_FEATURES if !features_seen => {
                features_seen = true;
                // Without protocol features the backend enables every ring itself and
                // refuses an enable: what was held is dropped.
                let enables = held.messages();
                if features(&payload) & PROTOCOL_FEATURES != 0 {
                    for m in enables {
                        writer.write_all(&m)?;
                    }
                }
            }
            // The backend forgets the acknowledged features: enables wait again.
            RESET_OWNER | RESET_DEVICE => {
                features_seen = false;
                held = HeldEnables::default();
            }
            _ => {}
        }
    }
}

/// Passes the daemon's replies to QEMU until either hangs up, but for those that answer the
/// filter's own `SET_LOG_BASE`. Any reply to one means the log covers the memory the daemon
/// has: the NIC may write into the guest again. Replies carry no descriptors for the protocol
/// features this backend offers.
fn forward_replies(daemon: &UnixStream, qemu: &UnixStream, log: &LogReplay) -> io::Result<()> {
    let mut header = [0u8; HEADER];
    let mut payload = Vec::with_capacity(MAX_PAYLOAD);
    let (mut from, mut to) = (daemon, qemu);
    loop {
        match from.read(&mut header[..1])? {
            0 => return Ok(()),
            _ => from.read_exact(&mut header[1..])?,
        }
        let word =
            |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let (request, size) = (word(0), word(8) as usize);
        if size > MAX_PAYLOAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a reply to request {request} of {size} bytes; at most {MAX_PAYLOAD}"),
            ));
        }
        payload.resize(size, 0);
        from.read_exact(&mut payload)?;
        if request == SET_LOG_BASE {
            log.pending.store(false, Ordering::Release);
            let ours = log
                .replies_to_drop
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
                .is_ok();
            if ours {
                continue;
            }
        }
        to.write_all(&[&header[..], &payload[..]].concat())?;
    }
}

/// Refuses a message whose sizes the backend crate would trust: a ring size that is not a
/// power of two; a memory region (`SET_MEM_TABLE`) or dirty log (`SET_LOG_BASE`) that reaches
/// past the end of the file sent with it. Anything malformed otherwise is the crate's to refuse.
fn check_request(request: u32, payload: &[u8], files: &[File]) -> io::Result<()> {
    let u32_at = |i: usize| {
        payload
            .get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |i: usize| {
        payload
            .get(i..i + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::InvalidData, why));
    match request {
        SET_VRING_NUM => match u32_at(4) {
            Some(num) if !num.is_power_of_two() => refuse(format!(
                "SET_VRING_NUM {num}: a ring's size is a power of two"
            )),
            _ => Ok(()),
        },
        SET_MEM_TABLE => {
            let regions = u32_at(0).unwrap_or(0) as usize;
            for (i, file) in files.iter().enumerate().take(regions) {
                let at = 8 + i * MEM_REGION;
                let (Some(size), Some(offset)) = (u64_at(at + 8), u64_at(at + 24)) else {
                    break;
                };
                fits_file(file, offset, size, format_args!("SET_MEM_TABLE region {i}"))?;
            }
            Ok(())
        }
        SET_LOG_BASE => match (u64_at(0), u64_at(8), files.first()) {
            (Some(size), Some(offset), Some(file)) => {
                fits_file(file, offset, size, format_args!("SET_LOG_BASE"))
            }
            _ => Ok(()),
        },
        _ => Ok(()),
    }
}

/// `size` bytes from `offset` lie within `file` as it is now.
/// Guest memory or a dirty log in a memfd must also be sealed against shrinking
/// (QEMU seals its memory backends and its vhost log so: grow, shrink and seal, seen from
/// 7.2 and 10.0), or it could be
/// cut short after this check; a file on hugetlbfs cannot be sealed and is taken on its size
/// alone.
fn fits_file(file: &File, offset: u64, size: u64, what: std::fmt::Arguments<'_>) -> io::Result<()> {
    let refuse = |why: String| Err(io::Error::new(io::ErrorKind::InvalidData, why));
    let len = file.metadata()?.len();
    if offset.checked_add(size).is_none_or(|end| end > len) {
        return refuse(format!(
            "{what}: {size} bytes from offset {offset} reach past the end of its file ({len} bytes)"
        ));
    }
    // SAFETY: F_GET_SEALS reads the seals of an open descriptor; a file that is not a memfd
    // answers EINVAL.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK == 0 {
        return refuse(format!(
            "{what}: its memfd may still be shrunk (no F_SEAL_SHRINK), and a touch past a shrunk end would end the node"
        ));
    }
    Ok(())
}

/// The features of a `SET_FEATURES` payload (a little-endian `u64`; 0 when malformed).
fn features(payload: &[u8]) -> u64 {
    <[u8; 8]>::try_from(payload).map_or(0, u64::from_le_bytes)
}

/// One message header and the descriptors that came with it; `None` when QEMU hung up.
fn recv_header(qemu: &UnixStream) -> io::Result<Option<([u8; HEADER], Vec<File>)>> {
    let mut header = [0u8; HEADER];
    let mut fds = [-1 as RawFd; MAX_FDS];
    let mut iov = [libc::iovec {
        iov_base: header.as_mut_ptr().cast(),
        iov_len: HEADER,
    }];
    let (bytes, nfds) = loop {
        // SAFETY: the iovec points at `header`, which lives and is writable for the whole call.
        match unsafe { qemu.recv_with_fds(&mut iov, &mut fds) } {
            Err(e) if e.errno() == libc::EINTR => continue,
            r => break r.map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
        }
    };
    let files: Vec<File> = fds[..nfds.min(MAX_FDS)]
        .iter()
        // SAFETY: the kernel just installed these descriptors for this process; each is owned
        // once, here.
        .map(|&fd| unsafe { File::from_raw_fd(fd) })
        .collect();
    if bytes == 0 {
        return Ok(None);
    }
    if bytes < HEADER {
        let mut reader = qemu;
        reader.read_exact(&mut header[bytes..])?;
    }
    Ok(Some((header, files)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_enable_before_the_features_is_held() {
        assert!(!passes(SET_VRING_ENABLE, 8, false));
        assert!(passes(SET_VRING_ENABLE, 8, true));
        assert!(
            passes(SET_VRING_ENABLE, 4, false),
            "malformed: the daemon answers it"
        );
        assert!(passes(SET_FEATURES, 8, false));
        assert!(passes(1, 0, false));
    }

    #[test]
    fn without_an_early_enable_both_rings_of_the_pair_are_enabled() {
        let m = HeldEnables::default().messages();
        assert_eq!(m.len(), 2);
        assert_eq!(
            m[0],
            message(SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0])[..]
        );
        assert_eq!(
            m[1],
            message(SET_VRING_ENABLE, &[1, 0, 0, 0, 1, 0, 0, 0])[..]
        );
    }

    #[test]
    fn held_enables_keep_the_last_state_of_each_ring() {
        let mut held = HeldEnables(Vec::new());
        held.hold(&[0, 0, 0, 0, 1, 0, 0, 0]);
        held.hold(&[1, 0, 0, 0, 1, 0, 0, 0]);
        held.hold(&[0, 0, 0, 0, 0, 0, 0, 0]);
        held.hold(&[9]);
        for i in 0..100u8 {
            held.hold(&[i, 1, 0, 0, 1, 0, 0, 0]);
        }
        let m = held.messages();
        assert_eq!(m.len(), MAX_HELD);
        assert_eq!(
            m[0],
            message(SET_VRING_ENABLE, &[0, 0, 0, 0, 0, 0, 0, 0])[..]
        );
        assert_eq!(
            m[1],
            message(SET_VRING_ENABLE, &[1, 0, 0, 0, 1, 0, 0, 0])[..]
        );
        assert!(held.messages().is_empty(), "passed once");
    }

    #[test]
    fn an_early_enable_waits_for_the_features_and_other_messages_pass_with_their_files() {
        let (qemu, qemu_peer) = UnixStream::pair().unwrap();
        let (daemon, daemon_peer) = UnixStream::pair().unwrap();
        let filter = Filter::spawn(qemu_peer, daemon_peer, "t", Default::default()).unwrap();
        // Ring 0 disabled early; ring 1 never named before the features (enabled then).
        let early = message(SET_VRING_ENABLE, &[0, 0, 0, 0, 0, 0, 0, 0]);
        let features = message(SET_FEATURES, &[0, 0, 0, 0x40, 1, 0, 0, 0]);
        let ring1 = message(SET_VRING_ENABLE, &[1, 0, 0, 0, 1, 0, 0, 0]);
        let late = message(SET_VRING_ENABLE, &[1, 0, 0, 0, 0, 0, 0, 0]);
        let file = tempfile::tempfile().unwrap();
        qemu.send_with_fds(&[&early[..]], &[]).unwrap();
        qemu.send_with_fds(&[&features[..]], &[file.as_raw_fd()])
            .unwrap();
        qemu.send_with_fds(&[&late[..]], &[]).unwrap();
        let mut got = vec![0u8; features.len()];
        let mut fds = [-1 as RawFd; 4];
        let mut iov = [libc::iovec {
            iov_base: got.as_mut_ptr().cast(),
            iov_len: got.len(),
        }];
        // SAFETY: the iovec points at `got` for the whole call.
        let (n, nfds) = unsafe { daemon.recv_with_fds(&mut iov, &mut fds) }.unwrap();
        assert_eq!(
            (n, nfds),
            (features.len(), 1),
            "the features first, with their file"
        );
        // SAFETY: the descriptor was just received and is owned here once.
        drop(unsafe { File::from_raw_fd(fds[0]) });
        assert_eq!(got, features);
        let mut rest = vec![0u8; early.len() + ring1.len() + late.len()];
        (&daemon).read_exact(&mut rest).unwrap();
        assert_eq!(
            rest,
            [early, ring1, late].concat(),
            "the held states follow the features, then an enable after them passes"
        );
        // A reply goes back; QEMU hanging up ends both threads.
        let answer = success_reply(SET_FEATURES);
        (&daemon).write_all(&answer).unwrap();
        let mut reply = vec![0u8; answer.len()];
        (&qemu).read_exact(&mut reply).unwrap();
        assert_eq!(reply, answer);
        drop(qemu);
        let mut end = Vec::new();
        (&daemon).read_to_end(&mut end).unwrap();
        assert!(end.is_empty());
        drop(daemon);
        filter.join();
    }

    /// QEMU 10 asks for a reply to its early enable and waits: the filter answers it (success)
    /// and holds the enable until the features, as one that asked for nothing.
    #[test]
    fn an_early_enable_that_asks_for_a_reply_is_answered_and_held() {
        let (qemu, qemu_peer) = UnixStream::pair().unwrap();
        let (daemon, daemon_peer) = UnixStream::pair().unwrap();
        let filter = Filter::spawn(qemu_peer, daemon_peer, "t", Default::default()).unwrap();
        // Ring 1 disabled, a reply asked for.
        let mut early = message(SET_VRING_ENABLE, &[1, 0, 0, 0, 0, 0, 0, 0]);
        early[4..8].copy_from_slice(&(1 | NEED_REPLY).to_le_bytes());
        (&qemu).write_all(&early).unwrap();
        let mut reply = vec![0u8; HEADER + 8];
        (&qemu).read_exact(&mut reply).unwrap();
        // SET_VRING_ENABLE (18), version 1 with REPLY (5), 8 bytes: 0, success.
        assert_eq!(
            reply,
            [18, 0, 0, 0, 5, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        let features = message(SET_FEATURES, &[0, 0, 0, 0x40, 1, 0, 0, 0]);
        (&qemu).write_all(&features).unwrap();
        drop(qemu);
        let mut got = Vec::new();
        (&daemon).read_to_end(&mut got).unwrap();
        let ring0 = message(SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let ring1_off = message(SET_VRING_ENABLE, &[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            got,
            [features, ring0, ring1_off].concat(),
            "the daemon saw no early enable, then each ring's state after the features (ring 1 \
             as asked, without the reply flag)"
        );
        drop(daemon);
        filter.join();
    }

    #[test]
    fn the_private_directory_is_for_this_user_alone_whatever_the_umask() {
        // SAFETY: umask has no preconditions; restored below.
        let old = unsafe { libc::umask(0) };
        let dir = private_dir();
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        let mode = std::fs::metadata(dir.unwrap().path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn held_enables_are_dropped_without_protocol_features_and_wait_again_after_a_reset() {
        let (qemu, qemu_peer) = UnixStream::pair().unwrap();
        let (daemon, daemon_peer) = UnixStream::pair().unwrap();
        let filter = Filter::spawn(qemu_peer, daemon_peer, "t", Default::default()).unwrap();
        let early = message(SET_VRING_ENABLE, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let plain = message(SET_FEATURES, &[0, 0, 0, 0, 1, 0, 0, 0]);
        let reset = message(RESET_OWNER, &[]);
        let with_protocol = message(SET_FEATURES, &[0, 0, 0, 0x40, 1, 0, 0, 0]);
        for m in [&early, &plain, &reset, &early, &with_protocol] {
            (&qemu).write_all(m).unwrap();
        }
        drop(qemu);
        let mut got = Vec::new();
        (&daemon).read_to_end(&mut got).unwrap();
        let ring1 = message(SET_VRING_ENABLE, &[1, 0, 0, 0, 1, 0, 0, 0]);
        let want = [plain.clone(), reset, with_protocol, early, ring1].concat();
        assert_eq!(
            got, want,
            "the first enable dropped, the second held until the features"
        );
        drop(daemon);
        filter.join();
    }

    /// While the frontend logs, a memory table is followed by the last log to the daemon (with
    /// its file), the NIC holds from before the table until the daemon answers that log, and
    /// that answer does not reach QEMU; QEMU's own log's answer does.
    #[test]
    fn a_memory_table_while_logging_is_followed_by_the_last_log_whose_answer_is_dropped() {
        let (qemu, qemu_peer) = UnixStream::pair().unwrap();
        let (daemon, daemon_peer) = UnixStream::pair().unwrap();
        let pending = Arc::new(AtomicBool::new(false));
        let filter = Filter::spawn(qemu_peer, daemon_peer, "t", Arc::clone(&pending)).unwrap();
        let recv = |len: usize| {
            let mut got = vec![0u8; len];
            let mut fds = [-1 as RawFd; 4];
            let mut iov = [libc::iovec {
                iov_base: got.as_mut_ptr().cast(),
                iov_len: got.len(),
            }];
            // SAFETY: the iovec points at `got` for the whole call.
            let (n, nfds) = unsafe { daemon.recv_with_fds(&mut iov, &mut fds) }.unwrap();
            for fd in &fds[..nfds] {
                // SAFETY: received just now, owned here once.
                drop(unsafe { File::from_raw_fd(*fd) });
            }
            (got[..n].to_vec(), nfds)
        };
        let log_file = tempfile::tempfile().unwrap();
        log_file.set_len(4096).unwrap();
        let features = message(SET_FEATURES, &(LOG_ALL | PROTOCOL_FEATURES).to_le_bytes());
        let log_payload = [4096u64.to_le_bytes(), 0u64.to_le_bytes()].concat();
        let log = message(SET_LOG_BASE, &log_payload);
        qemu.send_with_fds(&[&features[..]], &[]).unwrap();
        assert_eq!(recv(features.len()), (features.clone(), 0));
        // The queue pair's held enables follow the first features.
        let mut enables = vec![0u8; 2 * (HEADER + 8)];
        (&daemon).read_exact(&mut enables).unwrap();
        qemu.send_with_fds(&[&log[..]], &[log_file.as_raw_fd()])
            .unwrap();
        assert_eq!(recv(log.len()), (log.clone(), 1));
        // QEMU's own log is answered to QEMU.
        let answer = [
            SET_LOG_BASE.to_le_bytes(),
            REPLY.to_le_bytes(),
            16u32.to_le_bytes(),
        ]
        .concat();
        let answer = [answer, log_payload.clone()].concat();
        (&daemon).write_all(&answer).unwrap();
        let mut got = vec![0u8; answer.len()];
        (&qemu).read_exact(&mut got).unwrap();
        assert_eq!(got, answer);
        // A new table: passed, then the last log with its file; the NIC holds meanwhile.
        let memory = tempfile::tempfile().unwrap();
        memory.set_len(1 << 20).unwrap();
        let region = [0u64, 1 << 20, 0x7000_0000, 0];
        let mut table = 1u64.to_le_bytes().to_vec();
        for w in region {
            table.extend_from_slice(&w.to_le_bytes());
        }
        let table = message(SET_MEM_TABLE, &table);
        qemu.send_with_fds(&[&table[..]], &[memory.as_raw_fd()])
            .unwrap();
        assert_eq!(recv(table.len()), (table.clone(), 1));
        assert_eq!(recv(log.len()), (log.clone(), 1), "the log again");
        assert!(
            pending.load(Ordering::Acquire),
            "held until the log is in place"
        );
        // The daemon answers the table's ack and the filter's log: only the ack reaches QEMU.
        let ack = success_reply(SET_MEM_TABLE);
        (&daemon)
            .write_all(&[ack.clone(), answer.clone()].concat())
            .unwrap();
        let mut got = vec![0u8; ack.len()];
        (&qemu).read_exact(&mut got).unwrap();
        assert_eq!(got, ack);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pending.load(Ordering::Acquire) {
            assert!(std::time::Instant::now() < deadline, "still held");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        // The next answer QEMU reads is the next one the daemon sends, not the log's.
        let next = success_reply(SET_FEATURES);
        (&daemon).write_all(&next).unwrap();
        let mut got = vec![0u8; next.len()];
        (&qemu).read_exact(&mut got).unwrap();
        assert_eq!(got, next);
        drop(qemu);
        drop(daemon);
        filter.join();
    }

    #[test]
    fn an_oversized_payload_ends_the_connection() {
        let (qemu, qemu_peer) = UnixStream::pair().unwrap();
        let (daemon, daemon_peer) = UnixStream::pair().unwrap();
        let filter = Filter::spawn(qemu_peer, daemon_peer, "t", Default::default()).unwrap();
        let mut m = message(SET_FEATURES, &[]);
        m[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
        (&qemu).write_all(&m).unwrap();
        let mut end = Vec::new();
        (&daemon).read_to_end(&mut end).unwrap();
        assert!(end.is_empty(), "nothing passed");
        drop(daemon);
        filter.join();
    }
}
