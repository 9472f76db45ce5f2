//! Deterministic workloads for the example VNFs (configuration, provisioned map entries and a
//! packet trace of 64-byte packets), shared by the tests and the benchmark. Builds bytes only.

use crate::vnfs::{self, ExampleVnf, FirewallRule, firewall_config, fw_action};

/// A VNF, how to set it up, and the packets to feed it.
pub struct Workload {
    pub vnf: ExampleVnf,
    /// Blob for `tv_init`.
    pub config: Vec<u8>,
    /// Entries the control plane provisions before traffic: (map, key, value).
    pub provision: Vec<(&'static str, Vec<u8>, Vec<u8>)>,
    /// (input port, packet bytes).
    pub packets: Vec<(u32, Vec<u8>)>,
    pub ports: u32,
}

/// Simple deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn csum(h: &[u8]) -> u16 {
    let mut s: u32 = h
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Ethernet + IPv4 + UDP/TCP packet of `total` bytes (at least 64 with headers).
pub fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    proto: u8,
    total: usize,
) -> Vec<u8> {
    let l4 = if proto == 6 { 20 } else { 8 };
    let total = total.max(14 + 20 + l4);
    let mut p = vec![0u8; total];
    p[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    p[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (total - 14) as u16;
    {
        let ip = &mut p[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src);
        ip[16..20].copy_from_slice(&dst);
        let c = csum(ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
    }
    p[34..36].copy_from_slice(&sport.to_be_bytes());
    p[36..38].copy_from_slice(&dport.to_be_bytes());
    if proto == 17 {
        p[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    } else {
        p[46] = 0x50;
    }
    p
}

fn host(i: u32, net: u8) -> [u8; 4] {
    [net, (i >> 16) as u8, (i >> 8) as u8, i as u8 | 1]
}

/// Firewall: `rules` exact 5-tuple rules (half allow to port 1, half deny) plus one service
/// rule; the trace mixes matching flows, service hits and default-denied flows.
pub fn firewall(rules: u32, packets: usize) -> Workload {
    let mut list: Vec<FirewallRule> = (0..rules)
        .map(|i| FirewallRule {
            src: host(i, 10),
            dst: host(i, 172),
            sport: 1024 + (i % 60000) as u16,
            dport: 443,
            proto: 6,
            action: if i % 2 == 0 {
                fw_action::forward(1)
            } else {
                fw_action::DROP
            },
        })
        .collect();
    list.push(FirewallRule {
        src: [0; 4],
        dst: [198, 51, 100, 10],
        sport: 0,
        dport: 53,
        proto: 17,
        action: fw_action::forward(1),
    });
    let config = firewall_config(fw_action::DROP, &list);
    let mut rng = Rng(0x0f12_e3a1);
    let pk = (0..packets)
        .map(|_| {
            let r = rng.next();
            let i = (r % u64::from(rules.max(1))) as u32;
            let p = match (r >> 32) % 8 {
                0 => ipv4_packet(
                    host(i, 10),
                    [198, 51, 100, 10],
                    3000 + (i % 1000) as u16,
                    53,
                    17,
                    64,
                ),
                1 => ipv4_packet(host(i, 11), host(i, 172), 5555, 80, 6, 64),
                _ => ipv4_packet(
                    host(i, 10),
                    host(i, 172),
                    1024 + (i % 60000) as u16,
                    443,
                    6,
                    64,
                ),
            };
            (0, p)
        })
        .collect();
    Workload {
        vnf: vnfs::firewall(),
        config,
        provision: Vec::new(),
        packets: pk,
        ports: 2,
    }
}

/// NAT: `flows` inside flows sending outbound; once a flow has been seen, replies come back
/// in on the public port the allocator gave it (ports are allocated in first-seen order from
/// 1024, so the trace knows them).
pub fn nat(flows: u32, packets: usize) -> Workload {
    let mut rng = Rng(0x4a7_1234);
    let mut seen: Vec<Option<u16>> = vec![None; flows as usize];
    let mut next = 1024u16;
    let public = [192, 0, 2, 1];
    let pk = (0..packets)
        .map(|_| {
            let r = rng.next();
            let i = (r % u64::from(flows.max(1))) as usize;
            let proto = if i.is_multiple_of(3) { 6 } else { 17 };
            let remote = host(i as u32, 203);
            match seen[i] {
                Some(port) if (r >> 40).is_multiple_of(4) => {
                    (1, ipv4_packet(remote, public, 443, port, proto, 64))
                }
                _ => {
                    if seen[i].is_none() {
                        seen[i] = Some(next);
                        next = next.wrapping_add(1);
                    }
                    (
                        0,
                        ipv4_packet(
                            host(i as u32, 10),
                            remote,
                            20000 + (i % 40000) as u16,
                            443,
                            proto,
                            64,
                        ),
                    )
                }
            }
        })
        .collect();
    Workload {
        vnf: vnfs::nat(),
        config: public.to_vec(),
        provision: Vec::new(),
        packets: pk,
        ports: 2,
    }
}

/// GTP-U: `bearers` provisioned bearers; uplink G-PDUs (inner 64-byte packet plus 36 bytes of
/// tunnel headers) and 64-byte downlink packets, half each, plus a few unknown TEIDs.
pub fn gtpu(bearers: u32, packets: usize) -> Workload {
    let mut provision = Vec::with_capacity(2 * bearers as usize);
    let peer = [10, 255, 0, 1];
    let local = [10, 255, 0, 2];
    for b in 0..bearers {
        let teid = (0x1000 + b).to_be_bytes();
        provision.push(("uplink", teid.to_vec(), 1u32.to_le_bytes().to_vec()));
        let mut v = teid.to_vec();
        v.extend_from_slice(&peer);
        v.extend_from_slice(&local);
        provision.push(("downlink", host(b, 100).to_vec(), v));
    }
    let mut rng = Rng(0x9e3_77b9);
    let pk = (0..packets)
        .map(|_| {
            let r = rng.next();
            let b = (r % u64::from(bearers.max(1))) as u32;
            let inner = ipv4_packet(host(b, 100), [8, 8, 4, 4], 40000, 443, 17, 64);
            if (r >> 32).is_multiple_of(2) {
                (
                    1,
                    ipv4_packet([8, 8, 4, 4], host(b, 100), 443, 40000, 17, 64),
                )
            } else {
                let teid = if (r >> 40).is_multiple_of(64) {
                    0xdead_0000
                } else {
                    0x1000 + b
                };
                let mut p = ipv4_packet(
                    peer,
                    local,
                    2152,
                    2152,
                    17,
                    14 + 20 + 8 + 8 + inner.len() - 14,
                );
                let g = 42;
                p[g] = 0x30;
                p[g + 1] = 0xff;
                p[g + 2..g + 4].copy_from_slice(&((inner.len() - 14) as u16).to_be_bytes());
                p[g + 4..g + 8].copy_from_slice(&teid.to_be_bytes());
                p[g + 8..].copy_from_slice(&inner[14..]);
                (0, p)
            }
        })
        .collect();
    Workload {
        vnf: vnfs::gtpu(),
        config: Vec::new(),
        provision,
        packets: pk,
        ports: 2,
    }
}
