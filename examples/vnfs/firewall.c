/* 5-tuple ACL firewall (VNF ABI v1).
 * Map 0 `rules` (hash, key: struct tv_tuple, value: u32 action): action 0 = drop, k+1 = forward
 * to port k, FW_CROSS (0xffffffff) = forward to the other port of the pair the packet came in on
 * (0 <-> 1, 2 <-> 3, ...: a bump in the wire). Lookup order: exact 5-tuple, then the service rule
 * (source address and port zero), then the default action. ARP frames take the default action
 * (neighbours must resolve through a bump in the wire); every other frame that is not a
 * well-formed untagged IPv4 packet (IPv6, VLAN-tagged, truncated) is dropped, so nothing passes
 * around the rules. Config blob: u32 LE default action, then N rules of 20 bytes (16-byte key,
 * u32 LE action). Counters: 0 allowed, 1 denied (IPv4 only), 2 non-ip (ARP and dropped). */
#include "telvirt_vnf.h"

TV_DEFINE_BUFFER()

#define FW_CROSS 0xffffffffu

static uint32_t default_action;

/* The verdict of `action` for a packet that arrived on `port`. */
static inline int32_t fw_verdict(uint32_t action, uint32_t port) {
    if (action == 0) return TV_DROP;
    if (action == FW_CROSS) return (int32_t)(port ^ 1u);
    return (int32_t)(action - 1);
}

TV_EXPORT(tv_init) int32_t tv_init(const uint8_t *cfg, int32_t len) {
    if (len < 4 || (len - 4) % 20 != 0) return len == 0 ? 0 : TV_EINVAL;
    default_action = tv_le32(cfg);
    for (int32_t off = 4; off < len; off += 20) {
        uint8_t value[4];
        for (int i = 0; i < 4; i++) value[i] = cfg[off + 16 + i];
        int32_t rc = tv_map_update(0, cfg + off, value, TV_UPDATE_ANY);
        if (rc != TV_OK) return rc;
    }
    return 0;
}

TV_EXPORT(tv_process) int32_t tv_process(uint8_t *buf, int32_t n) {
    struct tv_pkt *d = (struct tv_pkt *)buf;
    int64_t allowed = 0, denied = 0, other = 0;
    for (int32_t i = 0; i < n; i++) {
        const uint8_t *p = buf + d[i].off;
        struct tv_tuple t;
        uint32_t l4;
        uint32_t action;
        if (tv_parse_tuple(p, d[i].len, &t, &l4) < 0) {
            int arp = d[i].len >= TV_ETH_LEN && tv_rd16(p + 12) == 0x0806;
            d[i].verdict = arp ? fw_verdict(default_action, d[i].port) : TV_DROP;
            other++;
            continue;
        }
        uint8_t v[4];
        if (tv_map_lookup(0, &t, v) == TV_OK) {
            action = tv_le32(v);
        } else {
            t.src[0] = t.src[1] = t.src[2] = t.src[3] = 0;
            t.sport[0] = t.sport[1] = 0;
            action = tv_map_lookup(0, &t, v) == TV_OK ? tv_le32(v) : default_action;
        }
        d[i].verdict = fw_verdict(action, d[i].port);
        if (action == 0) denied++;
        else allowed++;
    }
    if (allowed) tv_counter_add(0, allowed);
    if (denied) tv_counter_add(1, denied);
    if (other) tv_counter_add(2, other);
    return n;
}
