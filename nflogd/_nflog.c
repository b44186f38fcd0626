/* nflogd's NFLOG reader: one netlink socket per group, one call parses a whole receive buffer.
 *
 * Built by ffi_build.py (CFFI API mode, out of line) against libnetfilter_log's libmnl-based
 * interface and libmnl. The kernel side is net/netfilter/nfnetlink_log.c: it queues packets of
 * a group into one skb (up to the instance's nlbufsiz or qthreshold packets, or until its flush
 * timer fires) and sends that skb as one multipart netlink message: one recv() is one batch.
 */
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <endian.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <linux/netlink.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <libmnl/libmnl.h>
#include <libnetfilter_log/libnetfilter_log.h>

#include "_nflog.h"

/* The kernel's batch skb is at most 128 KiB (nfulnl_set_nlbufsiz: "has to be <= 128k due to
 * slab restrictions"), or one packet's message where that is larger: copy range caps at
 * NFULNL_COPY_RANGE_MAX = 0xffff - NLA_HDRLEN, plus headers and attributes. */
#define RXBUF_SIZE (256 * 1024)
/* The smallest packet message: nlmsghdr (16) + nfgenmsg (4) + NFULA_PACKET_HDR (8). */
#define MIN_PACKET_MSG 28
/* Receive buffers one nflogd_read() takes when the kernel has queued several: the first,
 * and as many more as are already waiting, into one batch (one feed message). Each must
 * fit whatever it holds, so the batch has room for this many full receive buffers. */
#define BUFFERS_PER_READ 4

/* libnetfilter_log's copy of nfnetlink_log.h ends at NFULA_CT_INFO; the kernel's uapi
 * header (linux/netfilter/nfnetlink_log.h, since 4.9) goes on with these two. */
#define NFLOGD_NFULA_VLAN   (NFULA_CT_INFO + 1)  /* nested: NFULA_VLAN_PROTO, NFULA_VLAN_TCI */
#define NFLOGD_NFULA_L2HDR  (NFULA_CT_INFO + 2)  /* the whole link-layer header */
#define NFLOGD_NFULA_MAX    NFLOGD_NFULA_L2HDR
#define NFLOGD_VLAN_PROTO   1                    /* __be16 skb->vlan_proto */
#define NFLOGD_VLAN_TCI     2                    /* __be16 skb->vlan_tci */

/* The names trailer of a batch's data: entries (ifindex u32, name_len u8, name), then
 * count u16 and the entries' bytes u16; IFNAMSIZ bounds a name (15 bytes and a NUL). */
#define IFNAME_MAX 15
#define TRAILER_MAX (NFLOGD_IFNAMES_PER_BATCH * (5 + IFNAME_MAX) + 4)

struct ifname_entry {
    uint32_t index;
    uint8_t len;
    char name[IFNAME_MAX];
};

/* A namespace's table, swapped whole under the reader's lock. */
struct nflogd_ifnames {
    pthread_mutex_t lock;
    struct ifname_entry *entries;  /* sorted by index */
    uint32_t count;
};

#if __BYTE_ORDER != __LITTLE_ENDIAN
#error "the record table is the wire format's little-endian layout: add byte swapping first"
#endif

/* A buffer allocated with NFLOGD_HEADROOM bytes in front (nflogd_reader_new), or NULL. */
static void free_headroom(void *buf)
{
    if (buf)
        free((char *)buf - NFLOGD_HEADROOM);
}

struct nflogd_reader *nflogd_reader_new(uint16_t group)
{
    struct nflogd_reader *r = calloc(1, sizeof(*r));
    if (!r)
        return NULL;
    r->fd = -1;
    r->wake_fd = -1;
    r->group = group;
    r->rxbuf_size = RXBUF_SIZE;
    r->qthresh = 1;
    r->nlbufsiz = 131072;
    /* Room for BUFFERS_PER_READ receive buffers (a bind's ack may also follow a first batch,
     * see configure). Pages are touched only as batches grow that large. */
    r->max_records = BUFFERS_PER_READ * (RXBUF_SIZE / MIN_PACKET_MSG + 1);
    r->data_cap = BUFFERS_PER_READ * RXBUF_SIZE + TRAILER_MAX;  /* the names trailer's room */
    r->rxbuf = malloc(r->rxbuf_size);
    /* each with NFLOGD_HEADROOM bytes in front, the feed's (_nflog.h) */
    char *records = calloc(1, NFLOGD_HEADROOM + (size_t)r->max_records * sizeof(struct nflogd_record));
    char *data = malloc(NFLOGD_HEADROOM + (size_t)r->data_cap);
    r->records = records ? (struct nflogd_record *)(records + NFLOGD_HEADROOM) : NULL;
    r->data = data ? data + NFLOGD_HEADROOM : NULL;
    if (!r->rxbuf || !r->records || !r->data)
        goto fail;
    /* nflogd_wake() ends a wait in nflogd_read() from another thread. */
    r->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->wake_fd < 0)
        goto fail;

    struct mnl_socket *nl = mnl_socket_open(NETLINK_NETFILTER);
    if (!nl)
        goto fail;
    if (mnl_socket_bind(nl, 0, MNL_SOCKET_AUTOPID) < 0) {
        int err = errno;
        mnl_socket_close(nl);
        errno = err;
        goto fail;
    }
    r->nl = nl;
    r->fd = mnl_socket_get_fd(nl);
    r->portid = mnl_socket_get_portid(nl);
    r->nl_seq = (uint32_t)time(NULL);
    return r;

fail:;
    int err = errno ? errno : ENOMEM;
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    free(r->rxbuf);
    free_headroom(r->records);
    free_headroom(r->data);
    free(r);
    errno = err;
    return NULL;
}

void nflogd_reader_free(struct nflogd_reader *r)
{
    if (!r)
        return;
    if (r->ifnames) {
        pthread_mutex_destroy(&r->ifnames->lock);
        free(r->ifnames->entries);
        free(r->ifnames);
    }
    if (r->nl)
        mnl_socket_close(r->nl);
    if (r->wake_fd >= 0)
        close(r->wake_fd);
    free(r->rxbuf);
    free_headroom(r->records);
    free_headroom(r->data);
    free(r);
}

int nflogd_set_rcvbuf(struct nflogd_reader *r, int bytes)
{
    /* SO_RCVBUFFORCE passes net.core.rmem_max (needs CAP_NET_ADMIN, which binding needs too). */
    if (setsockopt(r->fd, SOL_SOCKET, SO_RCVBUFFORCE, &bytes, sizeof(bytes)) == 0)
        return 0;
    if (setsockopt(r->fd, SOL_SOCKET, SO_RCVBUF, &bytes, sizeof(bytes)) == 0)
        return 0;
    return -errno;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The real length from the captured IP header: NFLOG has no original-length attribute.
 * NFLOGD_F_LEN_FROM_HEADER is set only when the header says more than was copied (the copy
 * range or the rule's snaplen cut the packet); a whole packet has len == caplen, no flag. */
static uint32_t real_length(const uint8_t *p, uint32_t caplen, uint16_t proto, uint16_t *present)
{
    uint32_t real = 0;
    if (proto == 0x0800 && caplen >= 4 && (p[0] >> 4) == 4)
        real = ((uint32_t)p[2] << 8) | p[3];           /* iphdr.tot_len; 0 for some GSO packets */
    else if (proto == 0x86dd && caplen >= 6 && (p[0] >> 4) == 6) {
        uint32_t plen = ((uint32_t)p[4] << 8) | p[5];  /* ipv6hdr.payload_len; 0: jumbogram */
        if (plen)
            real = plen + 40;
    }
    if (real > caplen) {
        *present |= NFLOGD_F_LEN_FROM_HEADER;
        return real;
    }
    return caplen;
}

static inline uint32_t attr_be32(const struct nlattr *a)
{
    uint32_t v;
    memcpy(&v, (const char *)a + NLA_HDRLEN, sizeof(v));
    return ntohl(v);
}

static inline const void *attr_data(const struct nlattr *a)
{
    return (const char *)a + NLA_HDRLEN;
}

static inline uint32_t attr_len(const struct nlattr *a)
{
    return a->nla_len - NLA_HDRLEN;
}

/* The least payload each attribute we read must have (nfnetlink_log.h's types); 0: any. */
static const uint8_t attr_min[NFLOGD_NFULA_MAX + 1] = {
    [NFULA_PACKET_HDR] = sizeof(struct nfulnl_msg_packet_hdr),
    [NFULA_MARK] = 4,
    [NFULA_TIMESTAMP] = sizeof(struct nfulnl_msg_packet_timestamp),
    [NFULA_IFINDEX_INDEV] = 4,
    [NFULA_IFINDEX_OUTDEV] = 4,
    [NFULA_IFINDEX_PHYSINDEV] = 4,
    [NFULA_IFINDEX_PHYSOUTDEV] = 4,
    [NFULA_HWADDR] = sizeof(struct nfulnl_msg_packet_hw),
    [NFULA_UID] = 4,
    [NFULA_SEQ] = 4,
    [NFULA_GID] = 4,
    [NFULA_CT_INFO] = 4,
};

/* A nested attribute set into tb[0..max] (each attribute's type masked of its flags; the
 * last of a type wins). Attributes that overrun the nest end the walk. */
static void parse_nested(const struct nlattr *nest, const struct nlattr **tb, unsigned max)
{
    memset(tb, 0, (max + 1) * sizeof(*tb));
    const char *pos = attr_data(nest);
    const char *end = (const char *)nest + nest->nla_len;
    while (end - pos >= NLA_HDRLEN) {
        const struct nlattr *a = (const struct nlattr *)pos;
        if (a->nla_len < NLA_HDRLEN || a->nla_len > end - pos)
            break;
        uint16_t type = a->nla_type & NLA_TYPE_MASK;
        if (type <= max)
            tb[type] = a;
        pos += NLA_ALIGN(a->nla_len);
    }
}

static inline uint16_t attr_be16(const struct nlattr *a)
{
    uint16_t v;
    memcpy(&v, attr_data(a), sizeof(v));
    return ntohs(v);
}

/* CTA_TUPLE_ORIG / CTA_TUPLE_REPLY (ctnetlink_dump_tuples: CTA_TUPLE_IP with the addresses,
 * CTA_TUPLE_PROTO with the protocol and its ports or ICMP id/type/code). Returns 1 when
 * the tuple had its addresses. */
static int parse_tuple(const struct nlattr *nest, struct nflogd_ct_tuple *t, struct nflogd_ct *ct)
{
    const struct nlattr *tb[CTA_TUPLE_MAX + 1], *ip[CTA_IP_MAX + 1], *pr[CTA_PROTO_MAX + 1];
    int ok = 0;
    parse_nested(nest, tb, CTA_TUPLE_MAX);
    if (tb[CTA_TUPLE_IP]) {
        parse_nested(tb[CTA_TUPLE_IP], ip, CTA_IP_MAX);
        if (ip[CTA_IP_V4_SRC] && ip[CTA_IP_V4_DST] && attr_len(ip[CTA_IP_V4_SRC]) >= 4
            && attr_len(ip[CTA_IP_V4_DST]) >= 4) {
            memcpy(t->src, attr_data(ip[CTA_IP_V4_SRC]), 4);
            memcpy(t->dst, attr_data(ip[CTA_IP_V4_DST]), 4);
            ct->family = AF_INET;
            ok = 1;
        } else if (ip[CTA_IP_V6_SRC] && ip[CTA_IP_V6_DST] && attr_len(ip[CTA_IP_V6_SRC]) >= 16
                   && attr_len(ip[CTA_IP_V6_DST]) >= 16) {
            memcpy(t->src, attr_data(ip[CTA_IP_V6_SRC]), 16);
            memcpy(t->dst, attr_data(ip[CTA_IP_V6_DST]), 16);
            ct->family = AF_INET6;
            ok = 1;
        }
    }
    if (tb[CTA_TUPLE_PROTO]) {
        parse_nested(tb[CTA_TUPLE_PROTO], pr, CTA_PROTO_MAX);
        if (pr[CTA_PROTO_NUM] && attr_len(pr[CTA_PROTO_NUM]) >= 1 && t == &ct->orig)
            ct->proto = *(const uint8_t *)attr_data(pr[CTA_PROTO_NUM]);
#define U16(A, F) if (pr[A] && attr_len(pr[A]) >= 2) t->F = attr_be16(pr[A]);
#define U8(A, F) if (pr[A] && attr_len(pr[A]) >= 1) t->F = *(const uint8_t *)attr_data(pr[A]);
        U16(CTA_PROTO_SRC_PORT, sport)
        U16(CTA_PROTO_DST_PORT, dport)
        U16(CTA_PROTO_ICMP_ID, icmp_id)
        U8(CTA_PROTO_ICMP_TYPE, icmp_type)
        U8(CTA_PROTO_ICMP_CODE, icmp_code)
        U16(CTA_PROTO_ICMPV6_ID, icmp_id)
        U8(CTA_PROTO_ICMPV6_TYPE, icmp_type)
        U8(CTA_PROTO_ICMPV6_CODE, icmp_code)
#undef U16
#undef U8
    }
    return ok;
}

/* NFULA_CT, the connection as ctnetlink_glue_build() nests it (the CTA_* attributes of
 * nfnetlink_conntrack.h), and NFULA_CT_INFO into the conntrack block. */
static void parse_ct(const struct nlattr *nest, const struct nlattr *info, struct nflogd_ct *ct)
{
    const struct nlattr *tb[CTA_MAX + 1];
    memset(ct, 0, sizeof(*ct));
    parse_nested(nest, tb, CTA_MAX);
    uint16_t present = 0;
    if (info) {
        ct->info = attr_be32(info);
        present |= NFLOGD_CT_INFO;
    }
#define CT32(A, F, BIT) if (tb[A] && attr_len(tb[A]) >= 4) { ct->F = attr_be32(tb[A]); present |= BIT; }
    CT32(CTA_ID, id, NFLOGD_CT_ID)
    CT32(CTA_MARK, mark, NFLOGD_CT_MARK)
    CT32(CTA_STATUS, status, NFLOGD_CT_STATUS)
    CT32(CTA_TIMEOUT, timeout, NFLOGD_CT_TIMEOUT)
#undef CT32
    if (tb[CTA_ZONE] && attr_len(tb[CTA_ZONE]) >= 2) {
        ct->zone = attr_be16(tb[CTA_ZONE]);
        present |= NFLOGD_CT_ZONE;
    }
    if (tb[CTA_TUPLE_ORIG] && parse_tuple(tb[CTA_TUPLE_ORIG], &ct->orig, ct))
        present |= NFLOGD_CT_ORIG;
    if (tb[CTA_TUPLE_REPLY] && parse_tuple(tb[CTA_TUPLE_REPLY], &ct->reply, ct))
        present |= NFLOGD_CT_REPLY;
    if (tb[CTA_LABELS]) {
        uint32_t n = attr_len(tb[CTA_LABELS]);
        if (n > sizeof(ct->labels))
            n = sizeof(ct->labels);
        memcpy(ct->labels, attr_data(tb[CTA_LABELS]), n);
        ct->labels_len = (uint8_t)n;
        present |= NFLOGD_CT_LABELS;
    }
    ct->present = present;
}

/* One NFULNL_MSG_PACKET message into the next record. See __build_packet_message().
 * The attributes are walked inline (NLA_ALIGN steps, as mnl_attr_for_each_payload does),
 * each checked against its least size; one that overruns the message ends the walk. */
static void parse_packet(struct nflogd_reader *r, const struct nlmsghdr *nlh, uint64_t rx_ns)
{
    const struct nlattr *attr[NFLOGD_NFULA_MAX + 1] = { 0 };
    const char *pos = (const char *)nlh + NLMSG_HDRLEN + NLMSG_ALIGN(sizeof(struct nfgenmsg));
    const char *end = (const char *)nlh + nlh->nlmsg_len;
    if (pos > end)
        return;
    while (end - pos >= NLA_HDRLEN) {
        const struct nlattr *a = (const struct nlattr *)pos;
        if (a->nla_len < NLA_HDRLEN || a->nla_len > end - pos)
            break;
        uint16_t type = a->nla_type & NLA_TYPE_MASK;
        if (type <= NFLOGD_NFULA_MAX && a->nla_len - NLA_HDRLEN >= attr_min[type])
            attr[type] = a;
        pos += NLA_ALIGN(a->nla_len);
    }
    uint32_t need = (attr[NFULA_PAYLOAD] ? attr_len(attr[NFULA_PAYLOAD]) : 0)
                  + (attr[NFULA_PREFIX] ? attr_len(attr[NFULA_PREFIX]) : 0)
                  + (attr[NFULA_CT] ? sizeof(struct nflogd_ct) : 0)
                  + (attr[NFLOGD_NFULA_L2HDR] ? attr_len(attr[NFLOGD_NFULA_L2HDR]) : 0);
    if (r->count >= r->max_records || r->data_len + need + TRAILER_MAX > r->data_cap) {
        /* Only while a bind waits for its ack behind several batches: count, don't keep. */
        r->lost++;
        if (attr[NFULA_SEQ])
            r->next_seq = attr_be32(attr[NFULA_SEQ]) + 1;
        return;
    }

    const struct nfgenmsg *nfg = mnl_nlmsg_get_payload(nlh);
    struct nflogd_record *rec = &r->records[r->count];
    memset(rec, 0, sizeof(*rec));
    uint16_t present = 0;

    if (attr[NFULA_PACKET_HDR]) {
        const struct nfulnl_msg_packet_hdr *ph = attr_data(attr[NFULA_PACKET_HDR]);
        rec->hw_protocol = ntohs(ph->hw_protocol);
        rec->hook = ph->hook;
    }
    if (!rec->hw_protocol) {  /* nfgen_family is the packet's family (NFPROTO_*) */
        if (nfg->nfgen_family == AF_INET)
            rec->hw_protocol = 0x0800;
        else if (nfg->nfgen_family == AF_INET6)
            rec->hw_protocol = 0x86dd;
    }
    if (attr[NFULA_TIMESTAMP]) {
        /* Copied out: netlink attributes are 4-byte aligned, the struct's two be64 ask for 8. */
        struct nfulnl_msg_packet_timestamp ts;
        memcpy(&ts, attr_data(attr[NFULA_TIMESTAMP]), sizeof(ts));
        rec->ts_ns = be64toh(ts.sec) * 1000000000ull + be64toh(ts.usec) * 1000ull;
        present |= NFLOGD_F_TS_KERNEL;
    } else {
        rec->ts_ns = rx_ns;  /* none at OUTPUT and POSTROUTING: skb->tstamp is not set yet */
    }
#define OPT32(ATTR, FIELD, BIT)                     \
    if (attr[ATTR]) {                               \
        rec->FIELD = attr_be32(attr[ATTR]);         \
        present |= BIT;                             \
    }
    OPT32(NFULA_MARK, mark, NFLOGD_F_MARK)
    OPT32(NFULA_IFINDEX_INDEV, indev, NFLOGD_F_INDEV)
    OPT32(NFULA_IFINDEX_OUTDEV, outdev, NFLOGD_F_OUTDEV)
    OPT32(NFULA_IFINDEX_PHYSINDEV, physindev, NFLOGD_F_PHYSINDEV)
    OPT32(NFULA_IFINDEX_PHYSOUTDEV, physoutdev, NFLOGD_F_PHYSOUTDEV)
    OPT32(NFULA_UID, uid, NFLOGD_F_UID)
    OPT32(NFULA_GID, gid, NFLOGD_F_GID)
    OPT32(NFULA_SEQ, kernel_seq, NFLOGD_F_KSEQ)
#undef OPT32
    if (attr[NFULA_HWADDR]) {
        const struct nfulnl_msg_packet_hw *hw = attr_data(attr[NFULA_HWADDR]);
        uint16_t n = ntohs(hw->hw_addrlen);
        if (n > sizeof(rec->hwaddr))
            n = sizeof(rec->hwaddr);
        memcpy(rec->hwaddr, hw->hw_addr, n);
        rec->hwaddr_len = (uint8_t)n;
        present |= NFLOGD_F_HWADDR;
    }

    rec->data_off = r->data_len;
    if (attr[NFULA_PAYLOAD] && r->meta_only) {  /* the length from the header, no payload */
        uint16_t flag = 0;
        uint32_t n = attr_len(attr[NFULA_PAYLOAD]);
        uint32_t real = real_length(attr_data(attr[NFULA_PAYLOAD]), n, rec->hw_protocol, &flag);
        if (flag) {  /* else not IP, or too short to tell (len stays 0: unknown) */
            rec->len = real;
            present |= NFLOGD_F_LEN_FROM_HEADER;
        }
    } else if (attr[NFULA_PAYLOAD]) {
        uint32_t n = attr_len(attr[NFULA_PAYLOAD]);
        const uint8_t *p = attr_data(attr[NFULA_PAYLOAD]);
        memcpy(r->data + r->data_len, p, n);
        r->data_len += n;
        rec->caplen = n;
        rec->len = real_length(p, n, rec->hw_protocol, &present);
        present |= NFLOGD_F_PAYLOAD;
    }
    if (attr[NFULA_PREFIX]) {  /* NUL-terminated (nla_put with strlen + 1) */
        const char *s = attr_data(attr[NFULA_PREFIX]);
        uint32_t n = strnlen(s, attr_len(attr[NFULA_PREFIX]));
        /* A rule without a prefix still sends NFULA_PREFIX, empty (nft's log always has one):
         * an empty prefix is no prefix, the PREFIX bit stays clear and decoders see None. */
        if (n) {
            memcpy(r->data + r->data_len, s, n);
            rec->prefix_off = r->data_len;
            rec->prefix_len = (uint16_t)n;
            r->data_len += n;
            present |= NFLOGD_F_PREFIX;
        }
    }
    /* Conntrack (NFULNL_CFG_F_CONNTRACK), VLAN and link header (bridge and netdev families,
     * nfulnl_put_bridge) follow the prefix in the data, in this order. */
    if (attr[NFULA_CT]) {
        struct nflogd_ct ct;
        parse_ct(attr[NFULA_CT], attr[NFULA_CT_INFO], &ct);
        memcpy(r->data + r->data_len, &ct, sizeof(ct));
        rec->ct_off = r->data_len;
        rec->ct_len = sizeof(ct);
        r->data_len += sizeof(ct);
        present |= NFLOGD_F_CT;
    }
    if (attr[NFLOGD_NFULA_VLAN]) {
        const struct nlattr *vt[NFLOGD_VLAN_TCI + 1];
        parse_nested(attr[NFLOGD_NFULA_VLAN], vt, NFLOGD_VLAN_TCI);
        if (vt[NFLOGD_VLAN_TCI] && attr_len(vt[NFLOGD_VLAN_TCI]) >= 2) {
            rec->vlan_tci = attr_be16(vt[NFLOGD_VLAN_TCI]);
            if (vt[NFLOGD_VLAN_PROTO] && attr_len(vt[NFLOGD_VLAN_PROTO]) >= 2)
                rec->vlan_proto = attr_be16(vt[NFLOGD_VLAN_PROTO]);
            present |= NFLOGD_F_VLAN;
        }
    }
    if (attr[NFLOGD_NFULA_L2HDR]) {
        uint32_t n = attr_len(attr[NFLOGD_NFULA_L2HDR]);
        if (n > 0xffff)
            n = 0xffff;
        memcpy(r->data + r->data_len, attr_data(attr[NFLOGD_NFULA_L2HDR]), n);
        rec->l2hdr_off = r->data_len;
        rec->l2hdr_len = (uint16_t)n;
        r->data_len += n;
        present |= NFLOGD_F_L2HDR;
    }
    rec->present = present;

    /* Loss from NFULA_SEQ: the instance numbers every packet it queues, from 0 at bind, so a
     * batch the socket could not take shows as a gap. Unsigned subtraction handles the wrap. */
    if (present & NFLOGD_F_KSEQ) {
        r->lost += (uint32_t)(rec->kernel_seq - r->next_seq);
        r->next_seq = rec->kernel_seq + 1;
    }
    r->batch_bytes += rec->len;
    if (rec->caplen < rec->len)
        r->batch_truncated++;
    r->count++;
}

/* Walk every netlink message in buf. Returns 1 when the ack for seq was seen (its errno, if
 * any, in *ack_err), else 0. Packet messages are appended to the batch. */
static int parse_buffer(struct nflogd_reader *r, const char *buf, int len, uint32_t seq, int *ack_err)
{
    const struct nlmsghdr *nlh = (const struct nlmsghdr *)buf;
    uint64_t rx_ns = now_ns();
    int acked = 0;
    while (mnl_nlmsg_ok(nlh, len)) {
        if (nlh->nlmsg_type == ((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)) {
            parse_packet(r, nlh, rx_ns);
        } else if (nlh->nlmsg_type == NLMSG_ERROR) {
            const struct nlmsgerr *e = mnl_nlmsg_get_payload(nlh);
            if (seq && nlh->nlmsg_seq == seq) {
                acked = 1;
                *ack_err = -e->error;
            } else if (e->error) {
                r->last_error = -e->error;  /* a reconfigure sent without ack that failed */
            }
        }
        /* NLMSG_DONE closes a multipart batch; NLMSG_NOOP: nothing to do. */
        nlh = mnl_nlmsg_next(nlh, &len);
    }
    return acked;
}

static void put_ifnames(struct nflogd_reader *r);

static void reset_batch(struct nflogd_reader *r)
{
    r->count = 0;
    r->data_len = 0;
    r->batch_bytes = 0;
    r->batch_truncated = 0;
}

int nflogd_parse(struct nflogd_reader *r, const char *buf, uint32_t len)
{
    int err = 0;
    if (len > r->rxbuf_size)
        return -EMSGSIZE;
    reset_batch(r);
    parse_buffer(r, buf, (int)len, 0, &err);
    put_ifnames(r);
    return (int)r->count;
}

int nflogd_configure(struct nflogd_reader *r, int bind, uint32_t copy_range, uint32_t qthresh,
                     uint32_t timeout_cs, uint32_t nlbufsiz, int conntrack)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    struct nlmsghdr *nlh = nflog_nlmsg_put_header(buf, NFULNL_MSG_CONFIG, AF_UNSPEC, r->group);
    uint32_t seq = ++r->nl_seq;
    nlh->nlmsg_seq = seq;
    if (bind)
        nlh->nlmsg_flags |= NLM_F_ACK;

    /* nfulnl_recv_config() runs the command first, then applies every other attribute to the
     * (new) instance, so a bind and its settings travel in one message. No PF_BIND: the
     * kernel has not needed it since 2.6.29 and it changes the namespace's nf_log for all. */
    if (bind)
        nflog_attr_put_cfg_cmd(nlh, NFULNL_CFG_CMD_BIND);
    /* Metadata only still copies the first bytes: NFLOG sends no original length, the IP
     * header has it (parse_packet publishes none of these bytes). */
    nflog_attr_put_cfg_mode(nlh, NFULNL_COPY_PACKET, copy_range ? copy_range : NFLOGD_META_BYTES);
    r->meta_only = copy_range == 0;
    mnl_attr_put_u32(nlh, NFULA_CFG_QTHRESH, htonl(qthresh));
    r->qthresh = qthresh ? qthresh : 1;
    if (nlbufsiz)
        r->nlbufsiz = nlbufsiz;
    mnl_attr_put_u32(nlh, NFULA_CFG_TIMEOUT, htonl(timeout_cs));   /* 1/100 s */
    if (nlbufsiz)
        mnl_attr_put_u32(nlh, NFULA_CFG_NLBUFSIZ, htonl(nlbufsiz));
    mnl_attr_put_u16(nlh, NFULA_CFG_FLAGS,
                     htons(NFULNL_CFG_F_SEQ | (conntrack ? NFULNL_CFG_F_CONNTRACK : 0)));

    if (mnl_socket_sendto(r->nl, nlh, nlh->nlmsg_len) < 0)
        return -errno;
    /* A bound group's socket may hold megabytes of batches ahead of an ack: a reconfigure
     * is not acked, and an error the kernel sends for it lands in last_error. */
    if (!bind)
        return 0;

    /* Wait for the ack. A packet batch may come first once the group is bound: keep its
     * records for the next nflogd_read() instead of dropping them. */
    if (!r->pending)
        reset_batch(r);
    for (;;) {
        struct pollfd pfd = { .fd = r->fd, .events = POLLIN };
        int rc = poll(&pfd, 1, 5000);
        if (rc == 0)
            return -ETIMEDOUT;
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        ssize_t n = recv(r->fd, r->rxbuf, r->rxbuf_size, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            if (errno == ENOBUFS) {
                r->overflows++;
                continue;
            }
            return -errno;
        }
        int err = 0;
        int acked = parse_buffer(r, r->rxbuf, (int)n, seq, &err);
        if (r->count)
            r->pending = 1;
        if (acked)
            return -err;
    }
}

int nflogd_unbind(struct nflogd_reader *r)
{
    char buf[MNL_SOCKET_BUFFER_SIZE];
    struct nlmsghdr *nlh = nflog_nlmsg_put_header(buf, NFULNL_MSG_CONFIG, AF_UNSPEC, r->group);
    nlh->nlmsg_seq = ++r->nl_seq;
    nflog_attr_put_cfg_cmd(nlh, NFULNL_CFG_CMD_UNBIND);
    if (mnl_socket_sendto(r->nl, nlh, nlh->nlmsg_len) < 0)
        return -errno;
    return 0;
}

/* What receive_one() got: nothing waiting, a buffer the kernel sent before it was full (its
 * flush timer: likely nothing behind it), or a full one (qthreshold packets, or half of
 * nlbufsiz and more: likely more behind it). */
enum { GOT_NOTHING = 0, GOT_PARTIAL = 1, GOT_FULL = 2 };

/* One receive buffer into the batch: GOT_*, or -errno (ENOBUFS counted). */
static int receive_one(struct nflogd_reader *r)
{
    ssize_t n = recv(r->fd, r->rxbuf, r->rxbuf_size, MSG_DONTWAIT | MSG_TRUNC);
    if (n < 0) {
        if (errno == EAGAIN || errno == EINTR)
            return GOT_NOTHING;
        if (errno == ENOBUFS)
            r->overflows++;
        return -errno;
    }
    if ((size_t)n > r->rxbuf_size) {  /* cannot happen with the kernel's 128 KiB cap */
        r->truncated_msgs++;
        n = r->rxbuf_size;
    }
    int err = 0;
    uint32_t before = r->count;
    parse_buffer(r, r->rxbuf, (int)n, 0, &err);
    r->buffers++;
    return r->count - before >= r->qthresh || (uint32_t)n >= r->nlbufsiz / 2 ? GOT_FULL : GOT_PARTIAL;
}

int nflogd_set_ifnames(struct nflogd_reader *r, const uint8_t *blob, uint32_t len, uint32_t count)
{
    struct ifname_entry *entries = count ? calloc(count, sizeof(*entries)) : NULL;
    if (count && !entries)
        return -ENOMEM;
    uint32_t pos = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (pos + 5 > len) {
            free(entries);
            return -EINVAL;
        }
        memcpy(&entries[i].index, blob + pos, 4);
        uint8_t n = blob[pos + 4];
        if (n > IFNAME_MAX || pos + 5 + n > len || (i && entries[i].index <= entries[i - 1].index)) {
            free(entries);
            return -EINVAL;
        }
        entries[i].len = n;
        memcpy(entries[i].name, blob + pos + 5, n);
        pos += 5 + n;
    }
    if (!r->ifnames) {
        struct nflogd_ifnames *t = calloc(1, sizeof(*t));
        if (!t) {
            free(entries);
            return -ENOMEM;
        }
        pthread_mutex_init(&t->lock, NULL);
        r->ifnames = t;  /* set once, before any capture thread reads it */
    }
    pthread_mutex_lock(&r->ifnames->lock);
    struct ifname_entry *old = r->ifnames->entries;
    r->ifnames->entries = entries;
    r->ifnames->count = count;
    pthread_mutex_unlock(&r->ifnames->lock);
    free(old);
    return 0;
}

static const struct ifname_entry *find_ifname(const struct nflogd_ifnames *t, uint32_t index)
{
    uint32_t lo = 0, hi = t->count;
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (t->entries[mid].index < index)
            lo = mid + 1;
        else if (t->entries[mid].index > index)
            hi = mid;
        else
            return &t->entries[mid];
    }
    return NULL;
}

/* The names of the batch's interfaces after its data (NFLOGD_FLAG_IFNAMES), each once. */
static void put_ifnames(struct nflogd_reader *r)
{
    r->batch_flags = 0;
    struct nflogd_ifnames *t = r->ifnames;
    if (!t || !r->count)
        return;
    uint32_t seen[NFLOGD_IFNAMES_PER_BATCH];
    uint32_t nseen = 0, start = r->data_len;
    char *out = r->data + r->data_len;
    pthread_mutex_lock(&t->lock);
    if (!t->count) {
        pthread_mutex_unlock(&t->lock);
        return;
    }
    uint32_t last[4] = { 0, 0, 0, 0 };  /* the previous record's: usually the same */
    for (uint32_t i = 0; i < r->count; i++) {
        const struct nflogd_record *rec = &r->records[i];
        uint32_t dev[4] = {
            rec->present & NFLOGD_F_INDEV ? rec->indev : 0,
            rec->present & NFLOGD_F_OUTDEV ? rec->outdev : 0,
            rec->present & NFLOGD_F_PHYSINDEV ? rec->physindev : 0,
            rec->present & NFLOGD_F_PHYSOUTDEV ? rec->physoutdev : 0,
        };
        if (!memcmp(dev, last, sizeof(dev)))
            continue;
        memcpy(last, dev, sizeof(dev));
        for (int d = 0; d < 4; d++) {
            uint32_t index = dev[d], k;
            if (!index)
                continue;
            for (k = 0; k < nseen && seen[k] != index; k++)
                ;
            if (k < nseen || nseen == NFLOGD_IFNAMES_PER_BATCH)
                continue;
            seen[nseen++] = index;
            const struct ifname_entry *e = find_ifname(t, index);
            if (!e)
                continue;  /* not known (yet): no name, never a guess */
            memcpy(out, &e->index, 4);
            out[4] = (char)e->len;
            memcpy(out + 5, e->name, e->len);
            out += 5 + e->len;
        }
    }
    pthread_mutex_unlock(&t->lock);
    uint32_t entries_len = (uint32_t)(out - (r->data + start));
    uint16_t count = 0;
    for (const char *p = r->data + start; p < out; p += 5 + (uint8_t)p[4])
        count++;
    uint16_t tail[2] = { count, (uint16_t)entries_len };  /* little-endian (checked above) */
    memcpy(out, tail, sizeof(tail));
    r->data_len = start + entries_len + sizeof(tail);
    r->batch_flags = NFLOGD_FLAG_IFNAMES;
}

static int read_batch(struct nflogd_reader *r, int timeout_ms);

int nflogd_read(struct nflogd_reader *r, int timeout_ms)
{
    int n;
    if (r->pending) {  /* records that arrived while configure() waited for its ack */
        r->pending = 0;
        n = (int)r->count;
    } else {
        n = read_batch(r, timeout_ms);
    }
    put_ifnames(r);
    if (n > 0) {
        r->packets += (uint32_t)n;
        r->bytes += r->batch_bytes;
        r->truncated += r->batch_truncated;
    }
    return n;
}

static int read_batch(struct nflogd_reader *r, int timeout_ms)
{
    reset_batch(r);
    /* Under load a batch is usually waiting: try it first. After a batch the flush timer
     * sent (light load), poll first: the queue is most likely empty. */
    int rc = r->idle && timeout_ms != 0 ? GOT_NOTHING : receive_one(r);
    if (rc == GOT_NOTHING && timeout_ms != 0) {
        struct pollfd pfd[2] = { { .fd = r->fd, .events = POLLIN }, { .fd = r->wake_fd, .events = POLLIN } };
        int ready = poll(pfd, 2, timeout_ms);
        if (ready < 0)
            return errno == EINTR ? 0 : -errno;
        if (pfd[1].revents) {
            uint64_t v;
            if (read(r->wake_fd, &v, sizeof(v)) < 0 && errno != EAGAIN)
                return -errno;
        }
        if (!pfd[0].revents)
            return 0;
        rc = receive_one(r);
    }
    if (rc < 0)
        return rc;
    /* What the kernel queued behind a full buffer joins this batch while it surely fits: one
     * wakeup and one feed message for all of it. An overrun here is counted; the batch goes
     * out first. */
    for (int k = 1; rc == GOT_FULL && k < BUFFERS_PER_READ; k++) {
        if (r->count + r->rxbuf_size / MIN_PACKET_MSG + 1 > r->max_records
            || r->data_len + r->rxbuf_size + TRAILER_MAX > r->data_cap)
            break;
        rc = receive_one(r);
    }
    r->idle = rc != GOT_FULL;
    return rc < 0 && !r->count ? rc : (int)r->count;
}

int nflogd_wake(struct nflogd_reader *r)
{
    uint64_t one = 1;
    __atomic_store_n(&r->woken, 1, __ATOMIC_RELEASE);
    return write(r->wake_fd, &one, sizeof(one)) < 0 && errno != EAGAIN ? -errno : 0;
}
