//! A guest stream sealed by telvirt rather than by QEMU: QEMU streams the guest in the clear
//! into one end of a socket pair, and a relay process carries it across the network
//! connection in frames encrypted and authenticated with AES-256-GCM; the other host's relay
//! opens them into its QEMU's socket pair (ADR 066's addendum of 2026-12-06).
//!
//! Owns the frame format, the relay (its process and what runs in it) and the socket pair. It
//! must not choose the key (the agents derive one for each connection from their stream's key)
//! nor open the network connection, and it never hands the key to QEMU: QEMU only ever sees
//! the guest in the clear, on a socket only it and its relay hold.
//!
//! The relay is a process of its own ([`set_relay_program`]: the `telvirt stream-relay`
//! subcommand, or the `telvirt-stream-relay` binary), in a process group of its own, as QEMU
//! is: a stream outlives the agent that started it (an agent restarted mid-stream finds it
//! still running, as it found QEMU's own stream before), and a guest whose source QEMU counted
//! its last bytes sent is not lost with the agent. It holds nothing of the node but its stdio
//! and its two sockets, runs as its QEMU's own uid where QEMU has one, and relays under a
//! seccomp filter that kills it at any system call relaying does not make (`relay_filter`).
//!
//! Why not QEMU's own TLS (`tls-creds-psk`, which this replaced): QEMU's TLS channel sends each
//! piece of a write as a TLS record of its own and a system call of its own, and QEMU writes a
//! guest page and its 8-byte header as two pieces; here a frame carries up to 64 KiB of what
//! QEMU wrote at once. BENCHMARKS ("A guest stream sealed by the agents") has the figures.
//!
//! The wire, after the stream's opening (the agents' tagged header): frames of a 4-byte
//! little-endian length `n` (at most [`FRAME_BYTES`]), `n` bytes of ciphertext and a 16-byte
//! GCM tag; the length is the tag's associated data and the nonce is the frame's index on the
//! connection, so frames cannot be changed, dropped, reordered or moved to another stream
//! without the next one failing to open. A frame of length 0 ends the stream; a connection that
//! closes before it ended it was cut.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use ring::aead;

use crate::migrate::StreamEnd;

/// The most plaintext one frame carries; a longer frame is refused before it is read.
pub const FRAME_BYTES: usize = 256 << 10;
/// What the source's relay reads from QEMU at most for one frame.
const READ_BYTES: usize = 64 << 10;
/// What the destination's relay reads from the network at most at once (several frames).
const WIRE_READ_BYTES: usize = 512 << 10;
const LEN_BYTES: usize = 4;
const TAG_BYTES: usize = 16;
/// How long a relay waits for the network to take or give the rest of a frame before it gives
/// the stream up (QEMU's end is closed then, and its migration fails).
const STALL: Duration = Duration::from_secs(10);

/// The key a guest stream is sealed with: 32 bytes, one per connection. Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StreamSecret([u8; StreamSecret::LEN]);

impl StreamSecret {
    pub const LEN: usize = 32;

    pub fn new(bytes: [u8; Self::LEN]) -> Self {
        Self(bytes)
    }

    /// A random one (for a stream whose two ends are in this process, as a benchmark's).
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; Self::LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
            .map_err(|_| std::io::Error::other("no random bytes for a stream's key"))?;
        Ok(Self(bytes))
    }
}

impl std::fmt::Debug for StreamSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamSecret(<secret>)")
    }
}

/// A stream's key, given to one relay only: a second stream sealed with it would repeat its
/// nonces (frame indices from 0) under the same key, which GCM must never do.
#[derive(Debug)]
pub struct OneStreamKey(std::sync::Mutex<Option<StreamSecret>>);

impl OneStreamKey {
    pub fn new(secret: StreamSecret) -> Self {
        Self(std::sync::Mutex::new(Some(secret)))
    }

    /// The key, the first time only.
    pub(crate) fn take(&self) -> std::io::Result<StreamSecret> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| {
                std::io::Error::other(
                    "this sealed channel's key already sealed a stream (a channel carries one)",
                )
            })
    }
}

/// The program a relay runs as: `program` with `args`, then `source` or `destination`; it
/// finds the network connection at descriptor 3, its QEMU's socket at 4 and the key on its
/// standard input, and runs [`relay_main`].
#[derive(Debug, Clone)]
pub struct RelayProgram {
    pub program: PathBuf,
    pub args: Vec<String>,
}

static RELAY_PROGRAM: OnceLock<RelayProgram> = OnceLock::new();

/// Sets the program every relay of this process runs as (the first call wins: it is a fact
/// about the binary, set once at its start). Without one, an encrypted stream cannot start.
pub fn set_relay_program(program: RelayProgram) {
    let _ = RELAY_PROGRAM.set(program);
}

/// The descriptors a relay process finds its connection and its QEMU's socket at.
const NETWORK_FD: i32 = 3;
const QEMU_FD: i32 = 4;

/// One direction's AES-256-GCM under the stream's key, each frame under the next nonce.
struct FrameCipher {
    key: aead::LessSafeKey,
    frames: u64,
}

impl FrameCipher {
    fn new(secret: &StreamSecret) -> std::io::Result<Self> {
        let key = aead::UnboundKey::new(&aead::AES_256_GCM, &secret.0)
            .map_err(|_| std::io::Error::other("no AES-256-GCM key from a stream's secret"))?;
        Ok(Self {
            key: aead::LessSafeKey::new(key),
            frames: 0,
        })
    }

    /// The next frame's nonce: its index on the connection.
    fn next_nonce(&mut self) -> aead::Nonce {
        let mut nonce = [0u8; aead::NONCE_LEN];
        nonce[..8].copy_from_slice(&self.frames.to_le_bytes());
        self.frames += 1;
        aead::Nonce::assume_unique_for_key(nonce)
    }

    /// Encrypts the next frame's `body` in place (its length `len` authenticated with it).
    fn seal(&mut self, len: [u8; LEN_BYTES], body: &mut [u8]) -> std::io::Result<aead::Tag> {
        let nonce = self.next_nonce();
        self.key
            .seal_in_place_separate_tag(nonce, aead::Aad::from(len), body)
            .map_err(|_| std::io::Error::other("a frame too large to seal"))
    }

    /// Decrypts the next frame's `body` in place when `tag` proves it was sealed as this
    /// frame of this stream with length `len`; false (its bytes are not to be used) otherwise.
    fn open(&mut self, len: [u8; LEN_BYTES], body: &mut [u8], tag: [u8; TAG_BYTES]) -> bool {
        let nonce = self.next_nonce();
        self.key
            .open_in_place_separate_tag(
                nonce,
                aead::Aad::from(len),
                aead::Tag::from(tag),
                body,
                0..,
            )
            .is_ok()
    }
}

/// Starts the relay of the `end` of VM `vm`'s guest stream over the connected, blocking
/// `network` socket, sealed with `secret`, as the uid `run_as` when given (its QEMU's own: the
/// relay then holds no privilege of this process, and no other VM's process shares its uid);
/// answers the socket to hand QEMU in its place. The
/// relay ([`relay_main`], in a process of its own) ends with the stream: at the source when
/// QEMU closes its end (the end frame then goes), at the destination at the end frame or when
/// QEMU closes its end; either way at the first error, which closes both sockets, so the
/// other side fails at once.
pub(crate) fn relay(
    network: &OwnedFd,
    secret: &StreamSecret,
    end: StreamEnd,
    vm: &str,
    run_as: Option<u32>,
) -> std::io::Result<OwnedFd> {
    let program = RELAY_PROGRAM.get().ok_or_else(|| {
        std::io::Error::other("no stream relay program is set (stream_seal::set_relay_program)")
    })?;
    let (qemu, mut child) = start_relay(program, network, secret, end, run_as)?;
    // Reaped when it ends (should this process end first, it runs on and init reaps it).
    let pid = child.id();
    let vm = vm.to_owned();
    let waiting = std::thread::Builder::new()
        .name("tv-relay-wait".into())
        .spawn(move || match child.wait() {
            Ok(status) if status.success() => tracing::debug!(vm, ?end, "guest stream relayed"),
            Ok(status) => tracing::info!(vm, ?end, "guest stream relay ended: {status}"),
            Err(e) => tracing::warn!(vm, ?end, "waiting for the guest stream relay: {e}"),
        });
    if let Err(e) = waiting {
        // No thread to reap it: end it now (its stream cannot start without the pair's end).
        let pid = libc::pid_t::try_from(pid).unwrap_or(0);
        if pid > 0 {
            // SAFETY: plain system calls on the child this function started and still owns.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        return Err(e);
    }
    Ok(qemu)
}

/// Starts `program` as the relay of the `end` of a guest stream over `network` sealed with
/// `secret`, as [`relay`] does (the connection at descriptor 3, QEMU's end of a new socket
/// pair at 4, the key on its standard input, `run_as` as its uid when given; its own process
/// group; nothing else of this process); answers the socket to hand QEMU and the process,
/// which the caller waits for.
pub fn start_relay(
    program: &RelayProgram,
    network: &OwnedFd,
    secret: &StreamSecret,
    end: StreamEnd,
    run_as: Option<u32>,
) -> std::io::Result<(OwnedFd, std::process::Child)> {
    let (qemu, own) = UnixStream::pair()?;
    // With nothing of this process's but stdio and the two descriptors placed below (the node
    // holds guests' RAM without close-on-exec: `confine::child_command`).
    let mut command = crate::confine::child_command(&program.program);
    command
        .args(&program.args)
        .arg(end_name(end))
        // It changes to that uid itself, first thing (its program need not be one the uid
        // may execute or reach).
        .args(run_as.map(|uid| uid.to_string()))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        // A backtrace would open files, which its seccomp filter kills it for: a panic's
        // message is said without one.
        .env("RUST_BACKTRACE", "0")
        .process_group(0);
    let (network_fd, own_fd) = (network.as_raw_fd(), own.as_raw_fd());
    // SAFETY: between fork and exec only async-signal-safe calls (fcntl, dup2) on descriptors
    // this process holds open across the spawn. Each is first copied above the two targets so
    // that placing one cannot close the other. This runs after `child_command`'s own hook,
    // which marked every descriptor from 3 close-on-exec; dup2 clears the mark on 3 and 4.
    unsafe {
        command.pre_exec(move || {
            let high = |fd: i32| {
                let copy = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if copy < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(copy)
                }
            };
            let (n, o) = (high(network_fd)?, high(own_fd)?);
            if libc::dup2(n, NETWORK_FD) < 0 || libc::dup2(o, QEMU_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("start the stream relay {}: {e}", program.program.display()),
        )
    })?;
    let keyed = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("the relay has no standard input"))
        .and_then(|mut stdin| stdin.write_all(&secret.0));
    if let Err(e) = keyed {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok((qemu.into(), child))
}

fn end_name(end: StreamEnd) -> &'static str {
    match end {
        StreamEnd::Source => "source",
        StreamEnd::Destination => "destination",
    }
}

/// The `end` named as [`relay`] names it to its process.
pub fn parse_end(name: &str) -> Option<StreamEnd> {
    [StreamEnd::Source, StreamEnd::Destination]
        .into_iter()
        .find(|e| end_name(*e) == name)
}

/// A relay process's work ([`relay`] starts it): first the uid `run_as` when given (all of
/// its ids, no supplementary group), then the key from standard input, the connection at
/// descriptor 3 and its QEMU's socket at 4, then its seccomp filter (`relay_filter`: from
/// there on only the system calls of relaying), then the stream; the bytes relayed, or why it
/// ended.
pub fn relay_main(end: StreamEnd, run_as: Option<u32>) -> std::io::Result<u64> {
    if let Some(uid) = run_as {
        // SAFETY: plain system calls; nothing else runs in this process yet.
        let changed = unsafe {
            libc::setgroups(0, std::ptr::null()) == 0
                && libc::setresgid(uid, uid, uid) == 0
                && libc::setresuid(uid, uid, uid) == 0
        };
        if !changed {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(
                e.kind(),
                format!("cannot run as uid {uid}: {e}"),
            ));
        }
    }
    let secret = read_key_undumpable(&mut std::io::stdin())?;
    for fd in [NETWORK_FD, QEMU_FD] {
        // SAFETY: fstat writes into the zeroed stat it is given.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(fd, &mut st) } < 0 || st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(std::io::Error::other(format!(
                "descriptor {fd} is not a socket: a relay runs only as its agent starts it"
            )));
        }
    }
    // SAFETY: the two descriptors were placed for this process alone (checked sockets above);
    // nothing else in it owns them.
    let (network, plain) = unsafe {
        (
            TcpStream::from_raw_fd(NETWORK_FD),
            UnixStream::from_raw_fd(QEMU_FD),
        )
    };
    let cipher = FrameCipher::new(&secret)?;
    let relayed = run(
        end,
        &network,
        &plain,
        cipher,
        crate::relay_filter::confine_relay,
    );
    let _ = network.shutdown(Shutdown::Both);
    let _ = plain.shutdown(Shutdown::Both);
    relayed
}

/// The stream's key, read from `from` once this process is no longer dumpable: no core dump
/// carries the key, and no process of its uid but root's can trace it or read its memory
/// through `/proc` (a relay that keeps its agent's uid shares it with a QEMU that has no uid
/// of its own; a uid change alone leaves the flag to the host's `fs.suid_dumpable`). The
/// only way [`relay_main`] gets its key.
fn read_key_undumpable(from: &mut impl Read) -> std::io::Result<StreamSecret> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("cannot keep the stream key out of core dumps and tracers: {e}"),
        ));
    }
    let mut key = [0u8; StreamSecret::LEN];
    from.read_exact(&mut key)?;
    Ok(StreamSecret(key))
}

/// One end's relay between `network` and its QEMU's `plain` socket: the network's timeout
/// ([`STALL`]) set, then `confine` (the relay process's seccomp filter: after it, the relay
/// makes only the system calls of relaying), then the relaying.
fn run(
    end: StreamEnd,
    network: &TcpStream,
    plain: &UnixStream,
    cipher: FrameCipher,
    confine: fn() -> std::io::Result<()>,
) -> std::io::Result<u64> {
    match end {
        StreamEnd::Source => network.set_write_timeout(Some(STALL))?,
        StreamEnd::Destination => network.set_read_timeout(Some(STALL))?,
    }
    confine()?;
    match end {
        StreamEnd::Source => seal_into(plain, network, cipher),
        StreamEnd::Destination => open_into(network, plain, cipher),
    }
}

/// The source's relay: what QEMU writes into `plain`, sealed onto `network`, until QEMU closes
/// its end (then the end frame). The bytes relayed.
fn seal_into(
    mut plain: &UnixStream,
    mut network: &TcpStream,
    mut cipher: FrameCipher,
) -> std::io::Result<u64> {
    let mut frame = vec![0u8; LEN_BYTES + READ_BYTES + TAG_BYTES];
    let mut relayed = 0u64;
    loop {
        let n = match plain.read(&mut frame[LEN_BYTES..LEN_BYTES + READ_BYTES]) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let len = u32::try_from(n)
            .map_err(|_| std::io::Error::other("a frame above 4 GiB"))?
            .to_le_bytes();
        frame[..LEN_BYTES].copy_from_slice(&len);
        let tag = cipher.seal(len, &mut frame[LEN_BYTES..LEN_BYTES + n])?;
        let whole = LEN_BYTES + n + TAG_BYTES;
        frame[LEN_BYTES + n..whole].copy_from_slice(tag.as_ref());
        if n == 0 {
            // The end frame: a destination whose QEMU already read all it wanted may have
            // closed the connection first, which ends the stream as well.
            let _ = network.write_all(&frame[..whole]);
            return Ok(relayed);
        }
        network
            .write_all(&frame[..whole])
            .map_err(|e| stalled(e, "the destination took none of a frame"))?;
        relayed += n as u64;
    }
}

/// The destination's relay: frames from `network` opened into `plain` for QEMU, until the end
/// frame, or until QEMU closes its end (it read what it wanted, or gave up). The bytes relayed.
fn open_into(
    network: &TcpStream,
    mut plain: &UnixStream,
    mut cipher: FrameCipher,
) -> std::io::Result<u64> {
    let mut body = vec![0u8; FRAME_BYTES + TAG_BYTES];
    let mut relayed = 0u64;
    // Frames are read out of what the network delivered in large reads, not one or two
    // system calls each.
    let mut wire = std::io::BufReader::with_capacity(WIRE_READ_BYTES, network);
    loop {
        if wire.buffer().is_empty() && !network_first(network, plain)? {
            return Ok(relayed);
        }
        let mut len = [0u8; LEN_BYTES];
        wire.read_exact(&mut len)
            .map_err(|e| stalled(e, "the stream was cut before its end frame"))?;
        let n = u32::from_le_bytes(len) as usize;
        if n > FRAME_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a frame of {n} bytes (at most {FRAME_BYTES})"),
            ));
        }
        wire.read_exact(&mut body[..n + TAG_BYTES])
            .map_err(|e| stalled(e, "the stream was cut inside a frame"))?;
        let mut tag = [0u8; TAG_BYTES];
        tag.copy_from_slice(&body[n..n + TAG_BYTES]);
        if !cipher.open(len, &mut body[..n], tag) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "frame {} does not open under the stream's key (changed, moved or not sealed by its source)",
                    cipher.frames - 1
                ),
            ));
        }
        if n == 0 {
            return Ok(relayed);
        }
        plain.write_all(&body[..n])?;
        relayed += n as u64;
    }
}

/// Waits until the network has something to read (true) or QEMU closed its end of `plain`
/// (false: nothing more is wanted).
fn network_first(network: &TcpStream, plain: &UnixStream) -> std::io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: network.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: plain.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd for the call's duration.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if ready >= 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    let hung_up = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
    Ok(fds[1].revents & hung_up == 0)
}

/// `e`, said as `what` when it is the socket's timeout ([`STALL`]) or an early end.
fn stalled(e: std::io::Error, what: &str) -> std::io::Error {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{what} within {STALL:?}"),
        ),
        std::io::ErrorKind::UnexpectedEof => {
            std::io::Error::new(std::io::ErrorKind::UnexpectedEof, what.to_owned())
        }
        _ => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the child process `the_key_is_read_only_once_the_relay_is_undumpable` starts.
    const CHILD_READS_KEY: &str = "TELVIRT_RELAY_READS_KEY";

    #[test]
    fn the_key_is_read_only_once_the_relay_is_undumpable() {
        if std::env::var_os(CHILD_READS_KEY).is_some() {
            // In the child: dumpable, as every process starts, until the key is read.
            // SAFETY: prctl with integer arguments only.
            let before = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            // A key cut short is an error, not a key.
            assert!(read_key_undumpable(&mut &[9u8; 5][..]).is_err());
            let secret = read_key_undumpable(&mut &[9u8; StreamSecret::LEN][..]).unwrap();
            // SAFETY: as above.
            let after = unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) };
            assert!(secret == StreamSecret::new([9u8; StreamSecret::LEN]));
            println!("dumpable {before} then {after}");
            return;
        }
        // In a process of its own: the flag stays with the process that set it.
        let out = crate::test_child::rerun_alone(
            "stream_seal::tests::the_key_is_read_only_once_the_relay_is_undumpable",
            CHILD_READS_KEY,
            "1",
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{said}");
        assert!(said.contains("dumpable 1 then 0"), "{said}");
    }

    /// A loopback TCP connection's two ends, blocking.
    fn connection() -> (TcpStream, TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (into, _) = listener.accept().unwrap();
        (out, into)
    }

    /// The socket a QEMU at `end` would be handed, relayed over `network` by a thread (as
    /// [`relay_main`] relays in its process).
    fn relayed(network: TcpStream, secret: &StreamSecret, end: StreamEnd) -> UnixStream {
        let (qemu, own) = UnixStream::pair().unwrap();
        let cipher = FrameCipher::new(secret).unwrap();
        std::thread::spawn(move || {
            let r = run(end, &network, &own, cipher, || Ok(()));
            let _ = network.shutdown(Shutdown::Both);
            let _ = own.shutdown(Shutdown::Both);
            r
        });
        qemu
    }

    /// Everything a reader of `stream` gets until the stream ends.
    fn read_all(mut stream: UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        stream.read_to_end(&mut got).unwrap();
        got
    }

    /// Bytes that tell where they were in a stream.
    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn a_stream_crosses_sealed_and_arrives_whole() {
        let secret = StreamSecret::random().unwrap();
        let (out, into) = connection();
        let source = relayed(out, &secret, StreamEnd::Source);
        let destination = relayed(into, &secret, StreamEnd::Destination);
        // More than a frame, in writes of odd sizes, as QEMU's flushes are.
        let sent = pattern(3 * READ_BYTES + 12_345);
        let writer = {
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut source = source;
                for piece in sent.chunks(40_000) {
                    source.write_all(piece).unwrap();
                }
                // QEMU closes its end: the end frame goes.
            })
        };
        assert_eq!(read_all(destination), sent);
        writer.join().unwrap();
    }

    #[test]
    fn the_network_sees_no_plaintext() {
        let secret = StreamSecret::random().unwrap();
        let (out, mut into) = connection();
        let mut source = relayed(out, &secret, StreamEnd::Source);
        let sent = b"a guest page that must not cross in the clear".repeat(100);
        source.write_all(&sent).unwrap();
        drop(source);
        let mut wire = Vec::new();
        into.read_to_end(&mut wire).unwrap();
        // The frame, its tag, the end frame: longer than what was sent, and none of it visible.
        assert_eq!(wire.len(), sent.len() + 2 * (LEN_BYTES + TAG_BYTES));
        assert!(!wire.windows(16).any(|w| w == &sent[..16]));
    }

    /// What a destination's QEMU reads when the wire carries `wire` under `secret`, and how
    /// its relay ended.
    fn opened(wire: &[u8], secret: &StreamSecret) -> (Vec<u8>, std::io::Result<u64>) {
        let (mut out, into) = connection();
        out.write_all(wire).unwrap();
        out.shutdown(Shutdown::Write).unwrap();
        let (qemu, own) = UnixStream::pair().unwrap();
        let cipher = FrameCipher::new(secret).unwrap();
        let ended = std::thread::spawn(move || {
            let r = open_into(&into, &own, cipher);
            drop(own);
            r
        });
        let got = read_all(qemu);
        (got, ended.join().unwrap())
    }

    /// The wire a source's relay makes of `frames` under `secret` (an empty frame ends it).
    fn sealed(frames: &[&[u8]], secret: &StreamSecret) -> Vec<u8> {
        let mut cipher = FrameCipher::new(secret).unwrap();
        let mut wire = Vec::new();
        for frame in frames {
            let len = u32::try_from(frame.len()).unwrap().to_le_bytes();
            let mut body = frame.to_vec();
            let tag = cipher.seal(len, &mut body).unwrap();
            wire.extend_from_slice(&len);
            wire.extend_from_slice(&body);
            wire.extend_from_slice(tag.as_ref());
        }
        wire
    }

    #[test]
    fn a_changed_dropped_or_foreign_frame_is_never_delivered() {
        let secret = StreamSecret::random().unwrap();
        let (first, second) = (pattern(1000), b"second frame".to_vec());
        let wire = sealed(&[&first, &second, &[]], &secret);
        let (got, ended) = opened(&wire, &secret);
        assert_eq!(got, [first.clone(), second.clone()].concat());
        assert_eq!(ended.unwrap(), 1012);

        // One bit of the second frame changed: the first arrives, the second never.
        let mut changed = wire.clone();
        let at = LEN_BYTES + first.len() + TAG_BYTES + LEN_BYTES + 3;
        changed[at] ^= 1;
        let (got, ended) = opened(&changed, &secret);
        assert_eq!(got, first);
        assert!(
            ended
                .unwrap_err()
                .to_string()
                .contains("frame 1 does not open"),
            "must name the frame"
        );

        // The first frame dropped: the second, sealed as frame 1, does not open as frame 0.
        let (got, ended) = opened(&wire[LEN_BYTES + first.len() + TAG_BYTES..], &secret);
        assert!(got.is_empty());
        assert!(ended.is_err());

        // Sealed under another connection's key: nothing.
        let other = StreamSecret::random().unwrap();
        let (got, ended) = opened(&wire, &other);
        assert!(got.is_empty());
        assert!(
            ended
                .unwrap_err()
                .to_string()
                .contains("frame 0 does not open")
        );
    }

    #[test]
    fn a_cut_stream_or_an_oversized_frame_ends_it_with_the_reason() {
        let secret = StreamSecret::random().unwrap();
        let first = pattern(500);
        // No end frame: delivered, then the cut is an error (QEMU's stream fails to load).
        let wire = sealed(&[&first], &secret);
        let (got, ended) = opened(&wire, &secret);
        assert_eq!(got, first);
        assert!(
            ended
                .unwrap_err()
                .to_string()
                .contains("cut before its end frame")
        );
        // Cut inside a frame.
        let (got, ended) = opened(&wire[..wire.len() - 1], &secret);
        assert!(got.is_empty());
        assert!(
            ended
                .unwrap_err()
                .to_string()
                .contains("cut inside a frame")
        );
        // A length above the bound is refused before any of it is read.
        let mut huge = u32::try_from(FRAME_BYTES + 1)
            .unwrap()
            .to_le_bytes()
            .to_vec();
        huge.extend_from_slice(&[0u8; 64]);
        let (got, ended) = opened(&huge, &secret);
        assert!(got.is_empty());
        let why = ended.unwrap_err().to_string();
        assert!(
            why.contains(&format!("a frame of {} bytes", FRAME_BYTES + 1)),
            "{why}"
        );
    }

    #[test]
    fn a_destination_whose_qemu_closed_its_end_stops_relaying() {
        let secret = StreamSecret::random().unwrap();
        let (out, into) = connection();
        let (qemu, own) = UnixStream::pair().unwrap();
        let cipher = FrameCipher::new(&secret).unwrap();
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || done.send(open_into(&into, &own, cipher).ok()));
        // QEMU gave up while the network is silent: the relay ends, not waits on the network.
        drop(qemu);
        let relayed = ended.recv_timeout(Duration::from_secs(10));
        assert_eq!(relayed, Ok(Some(0)), "the relay must end at once");
        drop(out);
    }

    #[test]
    fn an_end_is_named_as_its_process_is_told() {
        for end in [StreamEnd::Source, StreamEnd::Destination] {
            assert_eq!(parse_end(end_name(end)), Some(end));
        }
        assert_eq!(parse_end("sideways"), None);
    }

    #[test]
    fn a_secret_is_never_printed() {
        let secret = StreamSecret::new([0xab; StreamSecret::LEN]);
        assert_eq!(format!("{secret:?}"), "StreamSecret(<secret>)");
    }
}
