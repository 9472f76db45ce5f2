/* telvirt VNF ABI v1 for C (see docs/vnf-abi.md).
 *
 * Built two ways from the same source:
 *  - wasm32 (clang --target=wasm32 -nostdlib): host functions are imports of module "telvirt",
 *    tv_buffer/tv_init/tv_process/tv_tick are exports;
 *  - natively (performance baseline): host functions are plain C symbols provided by the
 *    runtime crate, and the build renames the exports per VNF with -D (e.g. firewall_tv_process).
 */
#ifndef TELVIRT_VNF_H
#define TELVIRT_VNF_H

#include <stdint.h>

#define TV_MAX_BATCH 64
#define TV_DESC_SIZE 16
#define TV_DESC_AREA (TV_MAX_BATCH * TV_DESC_SIZE)
#define TV_SLOT_SIZE 2048
#define TV_HEADROOM 128
#define TV_BUFFER_SIZE (TV_DESC_AREA + TV_MAX_BATCH * TV_SLOT_SIZE)

#define TV_DROP (-1)

#define TV_OK 0
#define TV_ENOENT (-2)
#define TV_EEXIST (-3)
#define TV_E2BIG (-4)
#define TV_EINVAL (-5)
#define TV_EFAULT (-6)
#define TV_EFULL (-7)

#define TV_UPDATE_ANY 0
#define TV_UPDATE_NOEXIST 1
#define TV_UPDATE_EXIST 2

/* One packet descriptor; `off` is relative to the start of the batch buffer. The module may
 * move `off`/`len` inside the packet's slot (to push or pop headers) and sets `verdict`:
 * TV_DROP or an output port >= 0. */
struct tv_pkt {
    uint32_t off;
    uint32_t len;
    uint32_t port;
    int32_t verdict;
};

#ifdef __wasm__
#define TV_IMPORT(n) __attribute__((import_module("telvirt"), import_name(#n)))
#define TV_EXPORT(n) __attribute__((export_name(#n)))
#else
#define TV_IMPORT(n)
#define TV_EXPORT(n)
#endif

TV_IMPORT(map_lookup) int32_t tv_map_lookup(int32_t map, const void *key, void *value);
TV_IMPORT(map_update) int32_t tv_map_update(int32_t map, const void *key, const void *value, int32_t flags);
TV_IMPORT(map_delete) int32_t tv_map_delete(int32_t map, const void *key);
TV_IMPORT(clock_ns) int64_t tv_clock_ns(void);
TV_IMPORT(counter_add) void tv_counter_add(int32_t idx, int64_t delta);
TV_IMPORT(emit) int32_t tv_emit(int32_t port, const void *pkt, int32_t len);
TV_IMPORT(log) void tv_log(int32_t level, const void *msg, int32_t len);

/* Defines the batch buffer and the tv_buffer export. */
#define TV_DEFINE_BUFFER()                                                         \
    static uint8_t tv_buf_[TV_BUFFER_SIZE] __attribute__((aligned(16)));         \
    TV_EXPORT(tv_buffer) uint8_t *tv_buffer(int32_t size) {                        \
        return size <= (int32_t)sizeof(tv_buf_) ? tv_buf_ : (uint8_t *)0;         \
    }

static inline uint16_t tv_rd16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t tv_rd32(const uint8_t *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void tv_wr16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static inline void tv_wr32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)(v >> 24); p[1] = (uint8_t)(v >> 16); p[2] = (uint8_t)(v >> 8); p[3] = (uint8_t)v;
}
static inline uint32_t tv_le32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* RFC 1624 incremental checksum update for a 16-bit field change. */
static inline uint16_t tv_csum_update16(uint16_t csum, uint16_t old, uint16_t new_) {
    uint32_t s = (uint16_t)~csum + (uint16_t)~old + new_;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}
static inline uint16_t tv_csum_update32(uint16_t csum, uint32_t old, uint32_t new_) {
    csum = tv_csum_update16(csum, (uint16_t)(old >> 16), (uint16_t)(new_ >> 16));
    return tv_csum_update16(csum, (uint16_t)old, (uint16_t)new_);
}
/* Full IPv4 header checksum over `len` bytes (checksum field must be zero). */
static inline uint16_t tv_ip_csum(const uint8_t *h, uint32_t len) {
    uint32_t s = 0;
    for (uint32_t i = 0; i + 1 < len; i += 2) s += tv_rd16(h + i);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    return (uint16_t)~s;
}

/* A 5-tuple key (16 bytes, addresses and ports in network byte order). */
struct tv_tuple {
    uint8_t src[4];
    uint8_t dst[4];
    uint8_t sport[2];
    uint8_t dport[2];
    uint8_t proto;
    uint8_t pad[3];
};

#define TV_ETH_LEN 14
#define TV_ETHERTYPE_IPV4 0x0800

/* Parses Ethernet + IPv4 + TCP/UDP. Returns the IPv4 header offset or -1; fills `t` and `l4`. */
static inline int32_t tv_parse_tuple(const uint8_t *p, uint32_t len, struct tv_tuple *t, uint32_t *l4) {
    if (len < TV_ETH_LEN + 20 || tv_rd16(p + 12) != TV_ETHERTYPE_IPV4) return -1;
    const uint8_t *ip = p + TV_ETH_LEN;
    if ((ip[0] >> 4) != 4) return -1;
    uint32_t ihl = (uint32_t)(ip[0] & 15) * 4;
    if (ihl < 20 || len < TV_ETH_LEN + ihl) return -1;
    for (int i = 0; i < 4; i++) { t->src[i] = ip[12 + i]; t->dst[i] = ip[16 + i]; }
    t->proto = ip[9];
    t->pad[0] = t->pad[1] = t->pad[2] = 0;
    *l4 = TV_ETH_LEN + ihl;
    if ((t->proto == 6 || t->proto == 17) && len >= *l4 + 4) {
        t->sport[0] = p[*l4]; t->sport[1] = p[*l4 + 1];
        t->dport[0] = p[*l4 + 2]; t->dport[1] = p[*l4 + 3];
    } else {
        t->sport[0] = t->sport[1] = t->dport[0] = t->dport[1] = 0;
    }
    return TV_ETH_LEN;
}

#endif
