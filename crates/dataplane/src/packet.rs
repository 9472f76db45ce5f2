//! Frame helpers: build the generator's Ethernet/IPv4/UDP test frames and read the 5-tuple and
//! the embedded sequence number and timestamp back. Byte-level only; must not own buffers.

use std::net::Ipv4Addr;

/// Ethernet + IPv4 (no options) + UDP header bytes.
pub const HEADERS: usize = 14 + 20 + 8;
/// Marker at the start of the generator's payload.
pub const MAGIC: u32 = 0x5456_4731; // "TVG1"
/// Smallest frame the generator builds: headers + magic + seq + timestamp.
pub const MIN_FRAME: usize = HEADERS + 4 + 8 + 8;

/// IP protocol numbers used by rules.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// The classic 5-tuple of an IPv4 packet (ports are 0 for protocols without ports).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// IP protocol.
    pub proto: u8,
    /// Source port (TCP/UDP).
    pub src_port: u16,
    /// Destination port (TCP/UDP).
    pub dst_port: u16,
}

/// Read the 5-tuple of an Ethernet frame carrying IPv4 (one optional 802.1Q tag allowed).
/// `None` for anything else (ARP, IPv6, truncated frames).
pub fn five_tuple(frame: &[u8]) -> Option<FiveTuple> {
    let mut off = 12;
    let mut ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    if ethertype == 0x8100 {
        off += 4;
        ethertype = u16::from_be_bytes([*frame.get(off)?, *frame.get(off + 1)?]);
    }
    if ethertype != 0x0800 {
        return None;
    }
    let ip = frame.get(off + 2..)?;
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let proto = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    let (src_port, dst_port) = match proto {
        proto::TCP | proto::UDP if frag_offset == 0 => {
            let l4 = ip.get(ihl..ihl + 4)?;
            (
                u16::from_be_bytes([l4[0], l4[1]]),
                u16::from_be_bytes([l4[2], l4[3]]),
            )
        }
        _ => (0, 0),
    };
    Some(FiveTuple {
        src,
        dst,
        proto,
        src_port,
        dst_port,
    })
}

/// Write a generator frame of `len` bytes (>= [`MIN_FRAME`], <= `buf.len()`) for `flow`
/// into `buf`: UDP from 10.0.0.1:(1024+flow) to 10.0.1.1:9, payload magic, `seq`, `ts_ns`.
/// Returns the frame length. The frame belongs to stream 0; see [`write_stream_frame`].
pub fn write_test_frame(buf: &mut [u8], len: usize, flow: u32, seq: u64, ts_ns: u64) -> usize {
    write_stream_frame(buf, len, flow, seq, ts_ns, 0)
}

/// [`write_test_frame`] for generator stream `stream`, carried in the IPv4 identification field
/// (which no rule matches on and forwarding keeps), so a sink can tell two generators that share
/// a chain apart without making the 64-byte frame any longer.
pub fn write_stream_frame(
    buf: &mut [u8],
    len: usize,
    flow: u32,
    seq: u64,
    ts_ns: u64,
    stream: u16,
) -> usize {
    let len = len.clamp(MIN_FRAME, buf.len());
    let f = &mut buf[..len];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = u16::try_from(len - 14).unwrap_or(u16::MAX);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[1] = 0;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[4..6].copy_from_slice(&stream.to_be_bytes());
    ip[6..8].copy_from_slice(&[0x40, 0]);
    ip[8] = 64;
    ip[9] = proto::UDP;
    ip[10..12].copy_from_slice(&[0, 0]);
    ip[12..16].copy_from_slice(&[10, 0, 0, 1]);
    ip[16..20].copy_from_slice(&[10, 0, 1, 1]);
    let csum = ipv4_checksum(ip);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let sport = 1024u16.wrapping_add((flow % 60000) as u16);
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&sport.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&(ip_len - 20).to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    f[42..46].copy_from_slice(&MAGIC.to_be_bytes());
    f[46..54].copy_from_slice(&seq.to_le_bytes());
    f[54..62].copy_from_slice(&ts_ns.to_le_bytes());
    len
}

/// The (seq, timestamp) of a generator frame, if `frame` is one.
pub fn read_test_frame(frame: &[u8]) -> Option<(u64, u64)> {
    let p = frame.get(42..62)?;
    if u32::from_be_bytes([p[0], p[1], p[2], p[3]]) != MAGIC {
        return None;
    }
    let seq = u64::from_le_bytes(p[4..12].try_into().ok()?);
    let ts = u64::from_le_bytes(p[12..20].try_into().ok()?);
    Some((seq, ts))
}

/// The generator stream of a test frame (see [`write_stream_frame`]), if `frame` is one.
pub fn test_frame_stream(frame: &[u8]) -> Option<u16> {
    read_test_frame(frame)?;
    let id = frame.get(18..20)?;
    Some(u16::from_be_bytes([id[0], id[1]]))
}

/// The one's-complement IPv4 header checksum over `header`.
pub fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum = 0u32;
    for c in header.chunks(2) {
        let w = u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]);
        sum += u32::from(w);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Nanoseconds on CLOCK_MONOTONIC (the same clock in every thread and process of the host).
pub fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_frame_round_trips_and_has_valid_checksum() {
        let mut buf = [0u8; 128];
        let n = write_test_frame(&mut buf, 64, 3, 77, 123_456);
        assert_eq!(n, 64);
        assert_eq!(read_test_frame(&buf[..n]), Some((77, 123_456)));
        assert_eq!(
            ipv4_checksum(&buf[14..34]),
            0,
            "checksum over header incl. csum is 0"
        );
        let t = five_tuple(&buf[..n]).unwrap();
        assert_eq!(t.proto, proto::UDP);
        assert_eq!((t.src_port, t.dst_port), (1027, 9));
        assert_eq!(t.dst, Ipv4Addr::new(10, 0, 1, 1));
        assert_eq!(write_test_frame(&mut buf, 10, 0, 0, 0), MIN_FRAME);
    }

    #[test]
    fn a_stream_frame_keeps_its_stream_and_checksum() {
        let mut buf = [0u8; 128];
        let n = write_stream_frame(&mut buf, 64, 0, 5, 9, 0x7e57);
        assert_eq!(test_frame_stream(&buf[..n]), Some(0x7e57));
        assert_eq!(read_test_frame(&buf[..n]), Some((5, 9)));
        assert_eq!(ipv4_checksum(&buf[14..34]), 0);
        write_test_frame(&mut buf, 64, 0, 5, 9);
        assert_eq!(test_frame_stream(&buf[..64]), Some(0));
        assert_eq!(test_frame_stream(&[0u8; 64]), None);
    }

    #[test]
    fn non_ipv4_has_no_tuple() {
        let mut arp = [0u8; 60];
        arp[12] = 0x08;
        arp[13] = 0x06;
        assert_eq!(five_tuple(&arp), None);
        assert_eq!(five_tuple(&arp[..10]), None);
        assert_eq!(read_test_frame(&arp), None);
    }
}
