//! Netlink plumbing: the message header and attribute layout, and a socket to the kernel that
//! lives for one question (one request and its reply, or a dump).
//!
//! Owns the byte layout and the socket. Must not know what any family's messages mean (its
//! callers do: `telvirt-dataplane`'s `netdev` asks a driver's XDP features, `telvirt-guest`'s
//! `qdisc` a guest's queue-discipline drops) nor change anything in the kernel.

// Tests may unwrap: a failed unwrap is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Bytes of `struct nlmsghdr`.
pub const NLMSG_HDRLEN: usize = 16;
/// A message that reports an error (or, with error 0, an acknowledgement).
pub const NLMSG_ERROR: u16 = 2;
/// The end of a dump.
pub const NLMSG_DONE: u16 = 3;
/// A request (every message to the kernel is one).
pub const NLM_F_REQUEST: u16 = 1;
/// Every object of the kind asked for, in as many messages as it takes.
pub const NLM_F_DUMP: u16 = 0x300;
/// Attribute type bits that are flags (nested, byte order), not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
/// Reads of one dump at most (a dump that does not end is cut short).
const DUMP_READS: usize = 64;

/// One message: the header (length, `kind`, `flags`, sequence 1, the sender's port left to the
/// kernel) and `body`.
pub fn message(kind: u16, flags: u16, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// One attribute: length, type, `value`, padded to 4 bytes.
pub fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut a = Vec::with_capacity(len.next_multiple_of(4));
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(len.next_multiple_of(4), 0);
    a
}

/// The value of the first attribute of type `kind` in `attrs`; `None` when there is none or
/// a length runs past the end.
pub fn find_attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    let mut at = 0;
    while at + 4 <= attrs.len() {
        let len = u16::from_ne_bytes([attrs[at], attrs[at + 1]]) as usize;
        let k = u16::from_ne_bytes([attrs[at + 2], attrs[at + 3]]) & NLA_TYPE_MASK;
        if len < 4 || at + len > attrs.len() {
            return None;
        }
        if k == kind {
            return Some(&attrs[at + 4..at + len]);
        }
        at += len.next_multiple_of(4);
    }
    None
}

/// The native-endian `u32` at `at` of `b`, if `b` holds one there.
pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The messages in one read: each one's type and payload (after its header); stops at a
/// truncated one.
pub fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = 0;
    while at + NLMSG_HDRLEN <= buf.len() {
        let Some(len) = u32_at(buf, at).map(|l| l as usize) else {
            break;
        };
        let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            break;
        }
        out.push((kind, &buf[at + NLMSG_HDRLEN..at + len]));
        at += len.next_multiple_of(4);
    }
    out
}

/// A netlink socket of one protocol, closed when dropped; each read waits one second at most.
pub struct NetlinkSocket(OwnedFd);

impl NetlinkSocket {
    /// A socket of `protocol` (`NETLINK_GENERIC`, `NETLINK_ROUTE`); `None` when the kernel
    /// refuses one.
    pub fn open(protocol: libc::c_int) -> Option<NetlinkSocket> {
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is fresh and owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: valid fd; `tv` is a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Some(NetlinkSocket(fd))
    }

    /// Sends `msg` to the kernel and answers the messages of the single read that replies.
    pub fn request(&self, msg: &[u8]) -> Option<Vec<(u16, Vec<u8>)>> {
        self.send(msg)?;
        let mut buf = vec![0u8; 16 * 1024];
        let got = self.recv(&mut buf)?;
        Some(owned(messages(&buf[..got])))
    }

    /// Sends `msg` (a dump request) and answers every message until the dump's end, without
    /// the end itself; `None` when the kernel reports an error or stops answering.
    pub fn dump(&self, msg: &[u8]) -> Option<Vec<(u16, Vec<u8>)>> {
        self.send(msg)?;
        let mut buf = vec![0u8; 32 * 1024];
        let mut out = Vec::new();
        for _ in 0..DUMP_READS {
            let got = self.recv(&mut buf)?;
            for (kind, payload) in messages(&buf[..got]) {
                match kind {
                    NLMSG_DONE => return Some(out),
                    NLMSG_ERROR => return None,
                    _ => out.push((kind, payload.to_vec())),
                }
            }
        }
        None
    }

    fn send(&self, msg: &[u8]) -> Option<()> {
        // SAFETY: valid fd; `msg` is readable for its length (the peer is the kernel: an
        // unconnected netlink socket sends to it).
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        (sent >= 0).then_some(())
    }

    fn recv(&self, buf: &mut [u8]) -> Option<usize> {
        // SAFETY: valid fd; `buf` is writable for its length.
        let got = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        usize::try_from(got).ok()
    }
}

fn owned(messages: Vec<(u16, &[u8])>) -> Vec<(u16, Vec<u8>)> {
    messages.into_iter().map(|(k, p)| (k, p.to_vec())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_found_again() {
        let a = attr(2, b"netdev\0");
        assert_eq!(a.len(), 12, "4 + 7 bytes, padded to 12");
        let mut both = attr(1, &7u32.to_ne_bytes());
        both.extend_from_slice(&a);
        assert_eq!(find_attr(&both, 1), Some(&7u32.to_ne_bytes()[..]));
        assert_eq!(find_attr(&both, 2), Some(&b"netdev\0"[..]));
        assert_eq!(find_attr(&both, 9), None);
        // A nested flag in the type is not part of it.
        assert_eq!(
            find_attr(&attr(7 | 0x8000, &[1, 2, 3, 4]), 7),
            Some(&[1u8, 2, 3, 4][..])
        );
        // A length past the end is not read.
        let mut bad = attr(1, &[0; 4]);
        bad[0] = 40;
        assert_eq!(find_attr(&bad, 1), None);
    }

    #[test]
    fn messages_are_split_and_a_truncated_one_ends_the_list() {
        let mut buf = message(36, 0, &[1, 2, 3, 4]);
        buf.extend(message(NLMSG_DONE, 0, &[0; 4]));
        let got = messages(&buf);
        assert_eq!(
            got,
            [(36, &[1u8, 2, 3, 4][..]), (NLMSG_DONE, &[0u8; 4][..])]
        );
        buf.truncate(buf.len() - 2);
        assert_eq!(messages(&buf).len(), 1);
    }

    #[test]
    fn the_kernel_answers_a_route_dump() {
        // RTM_GETLINK (18) with an empty ifinfomsg (16 bytes): every interface, loopback too,
        // as RTM_NEWLINK (16).
        let s = NetlinkSocket::open(libc::NETLINK_ROUTE).expect("a route socket");
        let links = s
            .dump(&message(18, NLM_F_REQUEST | NLM_F_DUMP, &[0u8; 16]))
            .expect("the dump ends");
        assert!(
            links.iter().any(|(kind, _)| *kind == 16),
            "{} messages",
            links.len()
        );
    }
}
