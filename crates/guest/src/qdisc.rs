//! What the guest's queue disciplines dropped, per interface: the frames the kernel queued for
//! sending and then discarded (a transmit queue full while the device could not keep up), which
//! no interface counter holds. Asked of the kernel over rtnetlink (`RTM_GETQDISC`, a dump).
//!
//! Owns the reading of those replies. Must not change any queue discipline.

use std::collections::HashMap;

use telvirt_netlink::{NLM_F_DUMP, NLM_F_REQUEST, NetlinkSocket, find_attr, message, u32_at};

const RTM_NEWQDISC: u16 = 36;
const RTM_GETQDISC: u16 = 38;
/// `struct tcmsg`: family, two pad bytes, ifindex, handle, parent, info.
const TCMSG_LEN: usize = 20;
/// The parent of a root queue discipline (`TC_H_ROOT`).
const TC_H_ROOT: u32 = 0xffff_ffff;
const TCA_STATS2: u16 = 7;
const TCA_STATS_QUEUE: u16 = 3;

/// What the root queue discipline of an interface holds and dropped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QdiscCounts {
    /// Frames dropped since it was made.
    pub dropped: u64,
    /// Frames queued now, waiting for the device.
    pub queued: u64,
}

/// The root queue discipline's counts of each interface (by index); empty when the kernel did
/// not answer. A root (`mq` on a multi-queue device) counts for its children.
pub fn root_counts() -> HashMap<u32, QdiscCounts> {
    let mut out = HashMap::new();
    let dump = NetlinkSocket::open(libc::NETLINK_ROUTE).and_then(|s| {
        // Every interface, every family: an empty tcmsg.
        s.dump(&message(
            RTM_GETQDISC,
            NLM_F_REQUEST | NLM_F_DUMP,
            &[0u8; TCMSG_LEN],
        ))
    });
    for (kind, payload) in dump.unwrap_or_default() {
        if kind == RTM_NEWQDISC
            && let Some((ifindex, counts)) = root_qdisc(&payload)
        {
            let e = out.entry(ifindex).or_insert_with(QdiscCounts::default);
            e.dropped += counts.dropped;
            e.queued += counts.queued;
        }
    }
    out
}

/// The interface and counts of one `RTM_NEWQDISC` payload, if it is a root discipline with
/// queue statistics.
fn root_qdisc(payload: &[u8]) -> Option<(u32, QdiscCounts)> {
    let ifindex = u32_at(payload, 4)?;
    if u32_at(payload, 12)? != TC_H_ROOT {
        return None;
    }
    let stats = find_attr(payload.get(TCMSG_LEN..)?, TCA_STATS2)?;
    // struct gnet_stats_queue: qlen, backlog, drops, requeues, overlimits (u32 each).
    let queue = find_attr(stats, TCA_STATS_QUEUE)?;
    Some((
        ifindex,
        QdiscCounts {
            dropped: u64::from(u32_at(queue, 8)?),
            queued: u64::from(u32_at(queue, 0)?),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use telvirt_netlink::attr;

    /// A qdisc payload: tcmsg for `ifindex` under `parent`, then TCA_KIND and TCA_STATS2 with
    /// a queue block of `drops`.
    fn payload(ifindex: u32, parent: u32, drops: u32) -> Vec<u8> {
        let mut p = vec![0u8; TCMSG_LEN];
        p[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        p[12..16].copy_from_slice(&parent.to_ne_bytes());
        p.extend(attr(1, b"pfifo_fast\0"));
        let queue: Vec<u8> = [4u32, 256, drops, 0, 0]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let mut nested = attr(1, &[0u8; 16]);
        nested.extend(attr(TCA_STATS_QUEUE, &queue));
        p.extend(attr(TCA_STATS2 | 0x8000, &nested));
        p
    }

    #[test]
    fn a_root_disciplines_drops_are_read_and_its_children_left_out() {
        let counts = QdiscCounts {
            dropped: 773,
            queued: 4,
        };
        assert_eq!(root_qdisc(&payload(3, TC_H_ROOT, 773)), Some((3, counts)));
        // A child of `mq` (its parent a class): counted by the root already.
        assert_eq!(root_qdisc(&payload(3, 0x0001_0001, 5)), None);
        // Too short to be a tcmsg.
        assert_eq!(root_qdisc(&[0u8; 8]), None);
    }
}
