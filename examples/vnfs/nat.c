/* Stateful source NAT (VNF ABI v1). Port 0 = inside, port 1 = outside.
 * Outbound (from port 0): the flow's 5-tuple is looked up in map 0 `sessions`; a new flow gets a
 * public port from the allocator (map 2 `next_port`, array, entry 0) that is free in map 1
 * `reverse`; source address and port are rewritten to the public address and port with
 * incremental checksum updates, verdict port 1.
 * Inbound (from port 1): map 1 `reverse` (key: public port u16 BE, proto, pad) gives the original
 * inside address and port; destination rewritten, verdict port 0; unknown flows are dropped.
 * Config blob: public IPv4 address (4 bytes, network order). Counters: 0 new sessions,
 * 1 translated out, 2 translated in, 3 dropped (no session, table full, not IP). */
#include "telvirt_vnf.h"

TV_DEFINE_BUFFER()

#define PORT_MIN 1024u
#define PORT_SPAN (65536u - PORT_MIN)

static uint8_t public_ip[4] = {192, 0, 2, 1};

struct session { uint8_t port[2]; uint8_t pad[2]; uint32_t created_s; };
struct rev_key { uint8_t port[2]; uint8_t proto; uint8_t pad; };

TV_EXPORT(tv_init) int32_t tv_init(const uint8_t *cfg, int32_t len) {
    if (len == 0) return 0;
    if (len != 4) return TV_EINVAL;
    for (int i = 0; i < 4; i++) public_ip[i] = cfg[i];
    return 0;
}

static void rewrite_addr_port(uint8_t *p, uint32_t l4, uint8_t proto, int src, const uint8_t ip[4],
                              const uint8_t port[2]) {
    uint8_t *iph = p + TV_ETH_LEN;
    uint8_t *a = iph + (src ? 12 : 16);
    uint32_t old_ip = tv_rd32(a), new_ip = tv_rd32(ip);
    tv_wr16(iph + 10, tv_csum_update32(tv_rd16(iph + 10), old_ip, new_ip));
    uint8_t *pp = p + l4 + (src ? 0 : 2);
    uint16_t old_port = tv_rd16(pp), new_port = tv_rd16(port);
    uint8_t *ck = proto == 6 ? p + l4 + 16 : p + l4 + 6;
    uint16_t c = tv_rd16(ck);
    if (!(proto == 17 && c == 0)) {
        c = tv_csum_update32(c, old_ip, new_ip);
        c = tv_csum_update16(c, old_port, new_port);
        tv_wr16(ck, c);
    }
    tv_wr32(a, new_ip);
    tv_wr16(pp, new_port);
}

TV_EXPORT(tv_process) int32_t tv_process(uint8_t *buf, int32_t n) {
    struct tv_pkt *d = (struct tv_pkt *)buf;
    int64_t created = 0, out = 0, in = 0, dropped = 0;
    for (int32_t i = 0; i < n; i++) {
        uint8_t *p = buf + d[i].off;
        struct tv_tuple t;
        uint32_t l4;
        d[i].verdict = TV_DROP;
        if (tv_parse_tuple(p, d[i].len, &t, &l4) < 0 || (t.proto != 6 && t.proto != 17) ||
            d[i].len < l4 + (t.proto == 6 ? 18u : 8u)) {
            dropped++;
            continue;
        }
        if (d[i].port == 0) {
            struct session s;
            if (tv_map_lookup(0, &t, &s) != TV_OK) {
                uint8_t idx[4] = {0, 0, 0, 0};
                uint8_t nxt[4];
                tv_map_lookup(2, idx, nxt);
                uint32_t cursor = tv_le32(nxt);
                struct rev_key rk;
                rk.proto = t.proto;
                rk.pad = 0;
                int found = 0;
                for (uint32_t tries = 0; tries < 64 && !found; tries++) {
                    uint32_t port = PORT_MIN + (cursor % PORT_SPAN);
                    cursor++;
                    tv_wr16(rk.port, (uint16_t)port);
                    if (tv_map_update(1, &rk, &t, TV_UPDATE_NOEXIST) == TV_OK) found = 1;
                }
                for (int b = 0; b < 4; b++) nxt[b] = (uint8_t)(cursor >> (8 * b));
                tv_map_update(2, idx, nxt, TV_UPDATE_ANY);
                if (!found) { dropped++; continue; }
                s.port[0] = rk.port[0];
                s.port[1] = rk.port[1];
                s.pad[0] = s.pad[1] = 0;
                s.created_s = (uint32_t)(tv_clock_ns() / 1000000000);
                if (tv_map_update(0, &t, &s, TV_UPDATE_NOEXIST) != TV_OK) {
                    tv_map_delete(1, &rk);
                    dropped++;
                    continue;
                }
                created++;
            }
            rewrite_addr_port(p, l4, t.proto, 1, public_ip, s.port);
            d[i].verdict = 1;
            out++;
        } else {
            struct rev_key rk;
            rk.port[0] = t.dport[0];
            rk.port[1] = t.dport[1];
            rk.proto = t.proto;
            rk.pad = 0;
            struct tv_tuple orig;
            if (tv_map_lookup(1, &rk, &orig) != TV_OK) { dropped++; continue; }
            rewrite_addr_port(p, l4, t.proto, 0, orig.src, orig.sport);
            d[i].verdict = 0;
            in++;
        }
    }
    if (created) tv_counter_add(0, created);
    if (out) tv_counter_add(1, out);
    if (in) tv_counter_add(2, in);
    if (dropped) tv_counter_add(3, dropped);
    return n;
}
