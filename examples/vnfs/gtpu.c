/* GTP-U bearer forwarder, the user plane of a virtual EPC (VNF ABI v1).
 * Port 0 = access side (S1-U/N3, GTP-U tunnels), port 1 = data network side.
 * Uplink (from port 0): IPv4/UDP port 2152 G-PDU; TEID looked up in map 0 `uplink` (key: TEID,
 * 4 bytes network order; value: u32 LE output port); the outer IP/UDP/GTP-U headers are removed
 * and the inner IP packet is forwarded with the original Ethernet header.
 * Downlink (from port 1): the inner IPv4 destination (the UE address) is looked up in map 1
 * `downlink` (value: TEID, peer address, local address, all network order); IPv4 + UDP + GTP-U
 * headers (36 bytes) are pushed into the headroom and the packet goes out on port 0.
 * Counters: 0 uplink, 1 downlink, 2 unknown bearer, 3 malformed. */
#include "telvirt_vnf.h"

TV_DEFINE_BUFFER()

#define GTPU_PORT 2152
#define ENCAP_LEN 36 /* IPv4 20 + UDP 8 + GTP-U 8 */

TV_EXPORT(tv_init) int32_t tv_init(const uint8_t *cfg, int32_t len) {
    (void)cfg;
    return len == 0 ? 0 : TV_EINVAL;
}

static void move_eth(uint8_t *from, uint8_t *to) {
    uint8_t eth[TV_ETH_LEN];
    for (int i = 0; i < TV_ETH_LEN; i++) eth[i] = from[i];
    for (int i = 0; i < TV_ETH_LEN; i++) to[i] = eth[i];
}

/* Returns the offset of the inner IP packet or 0 when the packet is not a well-formed G-PDU. */
static uint32_t gtpu_inner(const uint8_t *p, uint32_t len, uint8_t teid[4]) {
    if (len < TV_ETH_LEN + 20 || tv_rd16(p + 12) != TV_ETHERTYPE_IPV4) return 0;
    const uint8_t *ip = p + TV_ETH_LEN;
    uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
    if ((ip[0] >> 4) != 4 || ihl < 20 || ip[9] != 17) return 0;
    uint32_t udp = TV_ETH_LEN + ihl;
    if (len < udp + 8 + 8 || tv_rd16(p + udp + 2) != GTPU_PORT) return 0;
    const uint8_t *g = p + udp + 8;
    if ((g[0] >> 5) != 1 || g[1] != 0xff) return 0;
    for (int i = 0; i < 4; i++) teid[i] = g[4 + i];
    uint32_t off = udp + 8 + 8;
    if (g[0] & 0x07) {
        if (len < off + 4) return 0;
        uint8_t next = p[off + 3];
        off += 4;
        while ((g[0] & 0x04) && next != 0) {
            if (len < off + 1 || p[off] == 0) return 0;
            uint32_t ext = (uint32_t)p[off] * 4;
            if (len < off + ext) return 0;
            next = p[off + ext - 1];
            off += ext;
        }
    }
    return off < len ? off : 0;
}

TV_EXPORT(tv_process) int32_t tv_process(uint8_t *buf, int32_t n) {
    struct tv_pkt *d = (struct tv_pkt *)buf;
    int64_t up = 0, down = 0, unknown = 0, bad = 0;
    for (int32_t i = 0; i < n; i++) {
        uint8_t *p = buf + d[i].off;
        uint32_t len = d[i].len;
        d[i].verdict = TV_DROP;
        if (d[i].port == 0) {
            uint8_t teid[4];
            uint32_t inner = gtpu_inner(p, len, teid);
            if (inner == 0) { bad++; continue; }
            uint8_t v[4];
            if (tv_map_lookup(0, teid, v) != TV_OK) { unknown++; continue; }
            uint32_t strip = inner - TV_ETH_LEN;
            move_eth(p, p + strip);
            d[i].off += strip;
            d[i].len -= strip;
            d[i].verdict = (int32_t)tv_le32(v);
            up++;
        } else {
            if (len < TV_ETH_LEN + 20 || tv_rd16(p + 12) != TV_ETHERTYPE_IPV4 || d[i].off < ENCAP_LEN) {
                bad++;
                continue;
            }
            uint8_t v[12];
            if (tv_map_lookup(1, p + TV_ETH_LEN + 16, v) != TV_OK) { unknown++; continue; }
            uint8_t *np = p - ENCAP_LEN;
            move_eth(p, np);
            uint32_t inner_len = len - TV_ETH_LEN;
            uint8_t *ip = np + TV_ETH_LEN;
            ip[0] = 0x45; ip[1] = 0;
            tv_wr16(ip + 2, (uint16_t)(inner_len + ENCAP_LEN));
            tv_wr16(ip + 4, 0);
            tv_wr16(ip + 6, 0x4000);
            ip[8] = 64; ip[9] = 17;
            tv_wr16(ip + 10, 0);
            for (int b = 0; b < 4; b++) { ip[12 + b] = v[8 + b]; ip[16 + b] = v[4 + b]; }
            tv_wr16(ip + 10, tv_ip_csum(ip, 20));
            uint8_t *udp = ip + 20;
            tv_wr16(udp, GTPU_PORT);
            tv_wr16(udp + 2, GTPU_PORT);
            tv_wr16(udp + 4, (uint16_t)(inner_len + 16));
            tv_wr16(udp + 6, 0);
            uint8_t *g = udp + 8;
            g[0] = 0x30; g[1] = 0xff;
            tv_wr16(g + 2, (uint16_t)inner_len);
            for (int b = 0; b < 4; b++) g[4 + b] = v[b];
            d[i].off -= ENCAP_LEN;
            d[i].len += ENCAP_LEN;
            d[i].verdict = 0;
            down++;
        }
    }
    if (up) tv_counter_add(0, up);
    if (down) tv_counter_add(1, down);
    if (unknown) tv_counter_add(2, unknown);
    if (bad) tv_counter_add(3, bad);
    return n;
}
