//! What a network device says of its XDP support, asked of the kernel's `netdev` generic
//! netlink family (Linux 6.3+): whether the driver runs XDP natively and has zero-copy
//! AF_XDP, known before any program is loaded or UMEM mapped.
//!
//! Owns one short-lived netlink socket per question. Must not change the device nor decide
//! which socket a host port uses (`afpacket::HostPort` does, in its automatic mode only); a
//! kernel without the family answers `None` and the caller finds out by trying.

use telvirt_netlink::{NLM_F_REQUEST, NLMSG_ERROR, NetlinkSocket, attr, find_attr, message};

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

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NETDEV_CMD_DEV_GET: u8 = 1;
const NETDEV_A_DEV_IFINDEX: u16 = 1;
const NETDEV_A_DEV_XDP_FEATURES: u16 = 3;
/// Bytes of `struct genlmsghdr` before a reply's attributes.
const GENL_HEADER: usize = 4;

/// The XDP features (`XDP_ACT_*` bits) of the device with index `ifindex` in the calling
/// thread's network namespace; `None` when the kernel has no `netdev` family or does not
/// answer (older kernels), or the device is unknown.
pub fn xdp_features(ifindex: u32) -> Option<u64> {
    let sock = NetlinkSocket::open(libc::NETLINK_GENERIC)?;
    let family = request(
        &sock,
        GENL_ID_CTRL,
        CTRL_CMD_GETFAMILY,
        &attr(CTRL_ATTR_FAMILY_NAME, b"netdev\0"),
    )?;
    let id = find_attr(&family, CTRL_ATTR_FAMILY_ID)
        .and_then(|v| <[u8; 2]>::try_from(v.get(..2)?).ok())
        .map(u16::from_ne_bytes)?;
    let dev = request(
        &sock,
        id,
        NETDEV_CMD_DEV_GET,
        &attr(NETDEV_A_DEV_IFINDEX, &ifindex.to_ne_bytes()),
    )?;
    find_attr(&dev, NETDEV_A_DEV_XDP_FEATURES)
        .and_then(|v| <[u8; 8]>::try_from(v.get(..8)?).ok())
        .map(u64::from_ne_bytes)
}

/// One generic netlink request (`cmd` of `family`, version 1, with `attrs`); the attributes of
/// its reply, `None` for an error or no reply.
fn request(sock: &NetlinkSocket, family: u16, cmd: u8, attrs: &[u8]) -> Option<Vec<u8>> {
    let mut body = vec![cmd, 1, 0, 0]; // genlmsghdr: command, version, reserved
    body.extend_from_slice(attrs);
    let reply = sock.request(&message(family, NLM_F_REQUEST, &body))?;
    let (kind, payload) = reply.into_iter().next()?;
    if kind == NLMSG_ERROR || kind != family {
        return None;
    }
    payload.get(GENL_HEADER..).map(<[u8]>::to_vec)
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

#[cfg(test)]
mod tests {
    use super::*;

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
