//! What a network device says of its XDP support, asked of the kernel's `netdev` generic
//! netlink family (Linux 6.3+): whether the driver runs XDP natively and has zero-copy
//! AF_XDP, known before any program is loaded or UMEM mapped.
//!
//! Owns one short-lived netlink socket per question. Must not change the device nor decide
//! which socket a host port uses (`afpacket::HostPort` does, in its automatic mode only); a
//! kernel without the family answers `None` and the caller finds out by trying.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The driver runs XDP programs (`XDP_ABORTED`, `XDP_DROP`, `XDP_PASS`, `XDP_TX`).
pub const XDP_ACT_BASIC: u64 = 1;
/// The driver redirects (what an XSKMAP program does).
pub const XDP_ACT_REDIRECT: u64 = 2;
/// The driver transmits frames other devices redirect to it.
pub const XDP_ACT_NDO_XMIT: u64 = 4;
/// The driver has zero-copy AF_XDP.
pub const XDP_ACT_XSK_ZEROCOPY: u64 = 8;
/// The program runs on the NIC.
pub const XDP_ACT_HW_OFFLOAD: u64 = 16;
/// Frames larger than a page arrive in fragments.
pub const XDP_ACT_RX_SG: u64 = 32;
/// Redirected fragmented frames are transmitted.
pub const XDP_ACT_NDO_XMIT_SG: u64 = 64;

const NETLINK_GENERIC: libc::c_int = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// Attribute type bits that are flags, not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// The XDP features (`XDP_ACT_*` bits) of the device with index `ifindex` in the calling
/// thread's network namespace; `None` when the kernel has no `netdev` family or does not
/// answer (older kernels), or the device is unknown.
pub fn xdp_features(ifindex: u32) -> Option<u64> {
    let sock = Netlink::open()?;
    let family = sock.request(
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        &attr_str(CTRL_ATTR_FAMILY_NAME, "netdev"),
    )?;
    let id = find_attr(&family, CTRL_ATTR_FAMILY_ID)
        .and_then(|v| <[u8; 2]>::try_from(v.get(..2)?).ok())
        .map(u16::from_ne_bytes)?;
    let dev = sock.request(
        id,
        NETDEV_CMD_DEV_GET,
        &attr_u32(NETDEV_A_DEV_IFINDEX, ifindex),
    )?;
    find_attr(&dev, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| <[u8; 8]>::try_from(v.get(..8)?).ok())
        .map(u64::from_ne_bytes)
}

/// The names of the bits set in `features`, for messages.
pub fn xdp_feature_names(features: u64) -> String {
    let names = [
        (XDP_ACT_BASIC, "basic"),
        (XDP_ACT_REDIRECT, "redirect"),
        (XDP_ACT_NDO_XMIT, "ndo-xmit"),
        (XDP_ACT_XSK_ZEROCOPY, "xsk-zerocopy"),
        (XDP_ACT_HW_OFFLOAD, "hw-offload"),
        (XDP_ACT_RX_SG, "rx-sg"),
        (XDP_ACT_NDO_XMIT_SG, "ndo-xmit-sg"),
    ];
    let set: Vec<&str> = names
        .iter()
        .filter(|(bit, _)| features & bit != 0)
        .map(|(_, n)| *n)
        .collect();
    if set.is_empty() {
        "none".to_owned()
    } else {
        set.join(", ")
    }
}

struct Netlink(OwnedFd);

impl Netlink {
    fn open() -> Option<Netlink> {
        // SAFETY: plain socket(2) call with constant arguments.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` is fresh and owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // A kernel that never answers must not hold the caller: one second at most.
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
        Some(Netlink(fd))
    }

    /// Sends one request (`cmd` of family `family` with `attrs`) and answers the attributes
    /// of its reply; `None` for an error reply or no reply.
    fn request(&self, family: u16, cmd: u8, attrs: &[u8]) -> Option<Vec<u8>> {
        let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
        let mut msg = Vec::with_capacity(len);
        msg.extend_from_slice(&(len as u32).to_ne_bytes());
        msg.extend_from_slice(&family.to_ne_bytes());
        msg.extend_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
        msg.extend_from_slice(&0u32.to_ne_bytes()); // sender's port: 0, the kernel fills it
        msg.extend_from_slice(&[cmd, 1, 0, 0]); // genlmsghdr: command, version 1
        msg.extend_from_slice(attrs);
        // SAFETY: valid fd; `msg` is readable for its length (the kernel is the peer:
        // address none, the socket is unbound and the kernel takes it as port 0).
        let sent = unsafe { libc::send(self.0.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return None;
        }
        let mut buf = vec![0u8; 8192];
        // SAFETY: valid fd; `buf` is writable for its length.
        let got = unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let got = usize::try_from(got).ok()?;
        let reply = buf.get(..got)?;
        let reply_len = u32::from_ne_bytes(reply.get(..4)?.try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(reply.get(4..6)?.try_into().ok()?);
        if kind == NLMSG_ERROR || kind != family || reply_len > got {
            return None;
        }
        Some(reply.get(NLMSG_HDRLEN + GENL_HDRLEN..reply_len)?.to_vec())
    }
}

/// A netlink attribute: length, type, value, padded to 4 bytes.
fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
    let len = 4 + value.len();
    let mut a = Vec::with_capacity(len.next_multiple_of(4));
    a.extend_from_slice(&(len as u16).to_ne_bytes());
    a.extend_from_slice(&kind.to_ne_bytes());
    a.extend_from_slice(value);
    a.resize(len.next_multiple_of(4), 0);
    a
}

fn attr_u32(kind: u16, v: u32) -> Vec<u8> {
    attr(kind, &v.to_ne_bytes())
}

fn attr_str(kind: u16, s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    attr(kind, &v)
}

/// The value of the first attribute of type `kind` in `attrs`.
fn find_attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_found_again() {
        let a = attr_str(CTRL_ATTR_FAMILY_NAME, "netdev");
        assert_eq!(a.len(), 12, "4 + 7 bytes, padded to 12");
        let mut both = attr_u32(NETDEV_A_DEV_IFINDEX, 7);
        both.extend_from_slice(&a);
        assert_eq!(
            find_attr(&both, NETDEV_A_DEV_IFINDEX),
            Some(&7u32.to_ne_bytes()[..])
        );
        assert_eq!(
            find_attr(&both, CTRL_ATTR_FAMILY_NAME),
            Some(&b"netdev\0"[..])
        );
        assert_eq!(find_attr(&both, 9), None);
        // A length past the end is not read.
        let mut bad = attr_u32(1, 1);
        bad[0] = 40;
        assert_eq!(find_attr(&bad, 1), None);
    }

    #[test]
    fn loopback_has_no_zero_copy_and_names_read_back() {
        // Needs the netdev family (kernel 6.3+, as on the machines this runs on): loopback
        // (index 1) answers.
        let f = xdp_features(1).expect("the netdev family answers for loopback");
        assert_eq!(f & XDP_ACT_XSK_ZEROCOPY, 0, "{}", xdp_feature_names(f));
        assert_eq!(xdp_features(u32::MAX), None, "no such device");
        assert_eq!(xdp_feature_names(0), "none");
        assert_eq!(
            xdp_feature_names(XDP_ACT_BASIC | XDP_ACT_XSK_ZEROCOPY),
            "basic, xsk-zerocopy"
        );
    }
}
