/* The feed's own peers: each message written straight from the capture thread to the
 * sockets of the subscribers nflogd serves itself (nflogd/feed/server.py does their handshakes).
 *
 * A message is the wire format's four frames (docs/wire-format.md) in ZMTP framing, written
 * with one sendmsg per peer, non-blocking, from the reader's own buffers. What a peer's
 * socket does not take at once is queued for it: the message is copied once into a blob
 * that every peer queueing it shares, and the peer's fd is armed for EPOLLOUT on the
 * control loop's epoll, whose turn calls nflogd_peers_flush(). A peer queues at most hwm
 * messages (publish.hwm); past that its new messages are dropped and counted (it sees a gap
 * in seq), never the rest of a message it has begun to receive. A failed write marks the
 * peer dead and arms it, so that the control loop hangs up on it; only the control loop
 * closes fds, after nflogd_peers_remove().
 *
 * Every function here runs under the feed's mutex (nflogd_feed_lock). */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <sodium.h>

#include "../_nflog.h"
#include "_filter.h"
#include "_peers.h"

#define FILTER_EXACT_BYTES 8192  /* a bit per group */
#define FLUSH_IOV 64             /* queued messages one flush writes per sendmsg */
#define TRIM_BYTES (4u << 20)    /* queues that held this much give their memory back once empty */

struct blob {
    uint32_t refs;
    uint32_t len;
    uint8_t bytes[];
};

struct peer {
    int fd;                      /* -1: a free slot */
    int dead;                    /* errno of the write that failed, or 0 */
    int armed;                   /* EPOLLOUT asked for on the control loop's epoll */
    int lazy;                    /* queued by a sender that retries it (peers_flush_lazy), not armed */
    int lazy_epfd;               /* the epoll it was last armed on for that sender (-1: none) */
    int all;                     /* subscribed to "" */
    uint8_t prefix[32];          /* subscribed to a 1-byte topic: a bit per high byte of a group */
    uint8_t *exact;              /* subscribed to 2-byte topics: FILTER_EXACT_BYTES, or NULL */
    struct blob **queue;         /* a ring of qcap, qlen from qhead */
    uint32_t qcap, qhead, qlen;
    uint32_t qoff;               /* bytes of the head blob written already */
    uint64_t dropped;            /* messages not queued: hwm reached */
    int dropping;                /* the last message was dropped: the control loop was told */
    int curve;                   /* CURVE: every frame boxed into a MESSAGE with key, nonce */
    uint64_t nonce;              /* the next short nonce */
    uint8_t key[crypto_box_BEFORENMBYTES];
    int slot;                    /* its filter's slot in filters (_filter.c), -1: none */
    int tagged;                  /* its filtered messages' topic: ftopic and the group, not the group */
    uint8_t ftopic[NFLOGD_FILTERED_TOPIC];  /* "\xffNFLG" and its filter's id */
};

struct nflogd_peers {
    struct peer *peer;
    int cap;
    int epfd;                    /* the control loop's epoll (server.py), -1 for none */
    int wake_fd;                 /* eventfd in it: a peer began to drop messages */
    uint32_t hwm;
    uint64_t dropped;            /* every peer's, including peers gone */
    uint64_t queued;             /* messages queued, every peer */
    uint64_t sent_bytes;         /* bytes written to peers, every peer */
    struct nflogd_filters *filters;  /* the peers' filters, each distinct one run once a packet */
    uint64_t *match;             /* per record of a batch: the filters it passed */
    uint32_t match_cap;
    uint8_t *fbuf;               /* a filtered message's header, records and data */
    size_t fbuf_cap;
    uint64_t bytes;              /* what the blobs queued cost (blob_cost), each blob once */
    uint64_t max_bytes;          /* no new blob past this: the message is dropped for the peer */
    uint64_t full_dropped;       /* messages dropped so (counted in dropped too) */
    int trim_due;                /* bytes passed TRIM_BYTES since the last malloc_trim */
    uint8_t *boxed;              /* a CURVE peer's message, boxed: grown as messages need */
    size_t boxed_cap;
    int lazy_epfd;               /* the epoll of the sender that now retries what it queues, or -1 */
};

struct nflogd_peers *peers_new(uint64_t epoch)
{
    if (sodium_init() < 0)
        return NULL;
    struct nflogd_peers *ps = calloc(1, sizeof(*ps));
    if (ps) {
        ps->epfd = ps->wake_fd = ps->lazy_epfd = -1;
        ps->hwm = 1000;
        if (!(ps->filters = nflogd_filters_new(epoch))) {
            free(ps);
            return NULL;
        }
        ps->max_bytes = UINT64_MAX;
    }
    return ps;
}

/* What a blob of len bytes costs: the bytes, its header and the allocator's (about 16). */
static uint64_t blob_cost(uint64_t len)
{
    return sizeof(struct blob) + len + 16;
}

static void blob_unref(struct nflogd_peers *ps, struct blob *b)
{
    if (--b->refs == 0) {
        ps->bytes -= blob_cost(b->len);
        free(b);
    }
}

/* Give the memory of emptied queues back to the system (glibc keeps freed blocks otherwise). */
static void maybe_trim(struct nflogd_peers *ps)
{
    if (ps->trim_due && ps->bytes == 0) {
        ps->trim_due = 0;
        malloc_trim(0);
    }
}

static void queue_clear(struct nflogd_peers *ps, struct peer *p)
{
    for (uint32_t i = 0; i < p->qlen; i++)
        blob_unref(ps, p->queue[(p->qhead + i) % p->qcap]);
    ps->queued -= p->qlen;
    p->qlen = p->qhead = p->qoff = 0;
}

static void peer_release(struct nflogd_peers *ps, struct peer *p)
{
    queue_clear(ps, p);
    sodium_memzero(p->key, sizeof(p->key));
    free(p->queue);
    free(p->exact);
    nflogd_filters_release(ps->filters, p->slot);
    memset(p, 0, sizeof(*p));
    p->fd = -1;
    p->slot = -1;
}

void peers_free(struct nflogd_peers *ps)
{
    if (!ps)
        return;
    for (int i = 0; i < ps->cap; i++)
        if (ps->peer[i].fd >= 0)
            peer_release(ps, &ps->peer[i]);
    free(ps->peer);
    free(ps->boxed);
    nflogd_filters_free(ps->filters);
    free(ps->match);
    free(ps->fbuf);
    free(ps);
}

static void arm(struct nflogd_peers *ps, struct peer *p, int on)
{
    if (p->armed == on || ps->epfd < 0)
        return;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLRDHUP | (on ? EPOLLOUT : 0), .data.fd = p->fd };
    if (epoll_ctl(ps->epfd, EPOLL_CTL_MOD, p->fd, &ev) == 0)
        p->armed = on;
}

/* p queued by a lazy sender: its socket watched for EPOLLOUT, once, on that sender's epoll. */
static void arm_lazy(struct peer *p, int epfd)
{
    struct epoll_event ev = { .events = EPOLLOUT | EPOLLONESHOT, .data.u32 = PEERS_WRITABLE };
    p->lazy = 1;
    if (p->lazy_epfd != epfd) {
        int rc = epoll_ctl(epfd, EPOLL_CTL_ADD, p->fd, &ev);
        if (rc < 0 && errno != EEXIST)
            return;  /* not watched: retried each turn all the same */
        p->lazy_epfd = epfd;
        if (rc == 0)
            return;
    }
    epoll_ctl(epfd, EPOLL_CTL_MOD, p->fd, &ev);
}

static void fail(struct nflogd_peers *ps, struct peer *p, int err)
{
    p->dead = err;
    p->lazy = 0;
    queue_clear(ps, p);
    arm(ps, p, 1);  /* the control loop's flush sees dead and hangs up */
}

static int enqueue(struct nflogd_peers *ps, struct peer *p, struct blob *b, uint32_t offset)
{
    if (p->qlen == p->qcap) {
        uint32_t cap = p->qcap ? p->qcap * 2 : 8;
        if (cap > ps->hwm + 1)
            cap = ps->hwm + 1;  /* hwm messages, and a command past them */
        if (cap <= p->qlen)
            return -ENOBUFS;
        struct blob **q = malloc(cap * sizeof(*q));
        if (!q)
            return -ENOMEM;
        for (uint32_t i = 0; i < p->qlen; i++)
            q[i] = p->queue[(p->qhead + i) % p->qcap];
        free(p->queue);
        p->queue = q;
        p->qcap = cap;
        p->qhead = 0;
    }
    if (p->qlen == 0)
        p->qoff = offset;
    p->queue[(p->qhead + p->qlen) % p->qcap] = b;
    p->qlen++;
    b->refs++;
    ps->queued++;
    if (ps->lazy_epfd >= 0 && !p->armed)
        arm_lazy(p, ps->lazy_epfd);
    else
        arm(ps, p, 1);
    return 0;
}

/* Write what p has queued; 1 when nothing is left, 0 when its socket is full, -errno. */
static int flush(struct nflogd_peers *ps, struct peer *p)
{
    while (p->qlen) {
        struct iovec iov[FLUSH_IOV];
        size_t want = 0;
        int n = 0;
        for (uint32_t i = 0; i < p->qlen && n < FLUSH_IOV; i++, n++) {
            struct blob *b = p->queue[(p->qhead + i) % p->qcap];
            uint32_t off = i ? 0 : p->qoff;
            iov[n] = (struct iovec){ b->bytes + off, b->len - off };
            want += b->len - off;
        }
        struct msghdr mh = { .msg_iov = iov, .msg_iovlen = (size_t)n };
        ssize_t done = sendmsg(p->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (done < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return 0;
            return -errno;
        }
        ps->sent_bytes += (uint64_t)done;
        size_t left = (size_t)done;
        while (left) {
            struct blob *b = p->queue[p->qhead];
            size_t rest = b->len - p->qoff;
            if (left < rest) {
                p->qoff += (uint32_t)left;
                break;
            }
            left -= rest;
            blob_unref(ps, b);
            p->qhead = (p->qhead + 1) % p->qcap;
            p->qlen--;
            p->qoff = 0;
            ps->queued--;
        }
        if ((size_t)done < want)
            return 0;
    }
    arm(ps, p, 0);
    p->lazy = 0;
    return 1;
}

static struct blob *blob_of(struct nflogd_peers *ps, const struct iovec *iov, int n, size_t len)
{
    struct blob *b = malloc(sizeof(*b) + len);
    if (!b)
        return NULL;
    b->refs = 1;
    b->len = (uint32_t)len;
    ps->bytes += blob_cost(len);
    if (ps->bytes >= TRIM_BYTES)
        ps->trim_due = 1;
    size_t at = 0;
    for (int i = 0; i < n; i++) {
        memcpy(b->bytes + at, iov[i].iov_base, iov[i].iov_len);
        at += iov[i].iov_len;
    }
    return b;
}

static int subscribed(const struct peer *p, uint16_t group)
{
    return p->all || (p->prefix[group >> 11] & (1u << ((group >> 8) & 7)))
           || (p->exact && (p->exact[group >> 3] & (1u << (group & 7))));
}

/* One message (iov[0..n), len bytes) to p: written at once or queued (1), dropped because
 * p has hwm queued (0) or the queues hold max_bytes (2), or p failed (-1). *b is the
 * message's blob, made by the first peer that queues it (a peer queueing a blob made
 * already adds no bytes; one that has begun the message gets its rest whatever the bytes). */
static int deliver(struct nflogd_peers *ps, struct peer *p, const struct iovec *iov, int n, size_t len,
                   struct blob **b)
{
    if (p->qlen) {
        int rc = flush(ps, p);
        if (rc < 0) {
            fail(ps, p, -rc);
            return -1;
        }
    }
    size_t done = 0;
    if (p->qlen == 0) {
        struct msghdr mh = { .msg_iov = (struct iovec *)iov, .msg_iovlen = (size_t)n };
        ssize_t rc = sendmsg(p->fd, &mh, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (rc > 0)
            ps->sent_bytes += (uint64_t)rc;
        if (rc == (ssize_t)len)
            return 1;
        if (rc < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) {
            fail(ps, p, errno);
            return -1;
        }
        done = rc > 0 ? (size_t)rc : 0;
    } else if (p->qlen >= ps->hwm) {
        return 0;
    }
    if (!*b && !done && ps->bytes + blob_cost(len) > ps->max_bytes)
        return 2;
    int rc = -ENOMEM;
    if (*b || (*b = blob_of(ps, iov, n, len)))
        rc = enqueue(ps, p, *b, (uint32_t)done);
    if (rc == 0)
        return 1;
    if (done) {  /* part of the message is out: the stream cannot go on without the rest */
        fail(ps, p, -rc);
        return -1;
    }
    return 0;
}

/* ZMTP frame headers for up to 4 frames (flags: MORE but on the last, LONG past 255 bytes). */
static void frame_iov(struct iovec *iov, uint8_t heads[][9], const struct iovec *frames, int nframes,
                      size_t *total)
{
    size_t len = 0;
    for (int i = 0; i < nframes; i++) {
        uint64_t size = frames[i].iov_len;
        uint8_t more = i < nframes - 1 ? 1 : 0;
        size_t hl;
        if (size < 256) {
            heads[i][0] = more;
            heads[i][1] = (uint8_t)size;
            hl = 2;
        } else {
            heads[i][0] = more | 2;
            for (int k = 0; k < 8; k++)
                heads[i][1 + k] = (uint8_t)(size >> (56 - 8 * k));
            hl = 9;
        }
        iov[2 * i] = (struct iovec){ heads[i], hl };
        iov[2 * i + 1] = frames[i];
        len += hl + size;
    }
    *total = len;
}

/* A ZMTP frame of size bytes: its header into head (flags | LONG past 255); its length. */
static size_t frame_head(uint8_t *head, uint8_t flags, uint64_t size)
{
    if (size < 256) {
        head[0] = flags;
        head[1] = (uint8_t)size;
        return 2;
    }
    head[0] = flags | 2;
    for (int k = 0; k < 8; k++)
        head[1 + k] = (uint8_t)(size >> (56 - 8 * k));
    return 9;
}

#define CURVE_FRAME 0            /* a MESSAGE goes as a data frame, as libzmq sends and reads it */
#define MESSAGE_OVERHEAD (8 + 8 + crypto_box_MACBYTES + 1)  /* name, short nonce, MAC, flags */

/* nframes frames as the CURVE peer p gets them: each a MESSAGE command boxing its flags (MORE
 * but on the last; COMMAND with command) and body, into ps->boxed; its length, or 0 (no memory).
 * The box's plaintext is [flags || body], contiguous: a frame whose bit is set in spare has a
 * byte in front of it that is scratch (NFLOGD_HEADROOM), which takes the flags, and is boxed
 * from where it lies straight into ps->boxed; any other is first copied there, behind its
 * flags, and boxed in place. */
static size_t box_frames(struct nflogd_peers *ps, struct peer *p, const struct iovec *frames, int nframes,
                         int command, unsigned spare)
{
    size_t need = 0;
    for (int i = 0; i < nframes; i++)
        need += 9 + MESSAGE_OVERHEAD + frames[i].iov_len;
    if (need > ps->boxed_cap) {
        uint8_t *more = realloc(ps->boxed, need);
        if (!more)
            return 0;
        ps->boxed = more;
        ps->boxed_cap = need;
    }
    uint8_t *at = ps->boxed;
    for (int i = 0; i < nframes; i++) {
        size_t len = frames[i].iov_len;
        at += frame_head(at, CURVE_FRAME, MESSAGE_OVERHEAD + len);
        uint8_t nonce[crypto_box_NONCEBYTES];
        memcpy(nonce, "CurveZMQMESSAGES", 16);
        for (int k = 0; k < 8; k++)
            nonce[16 + k] = (uint8_t)(p->nonce >> (56 - 8 * k));
        p->nonce++;
        memcpy(at, "\x07MESSAGE", 8);
        memcpy(at + 8, nonce + 16, 8);
        /* the box: its MAC, then the ciphertext (detached: easy_afternm's box would put the MAC
         * in front of the ciphertext, where the command's nonce is) */
        uint8_t *mac = at + 16, *box = mac + crypto_box_MACBYTES;
        uint8_t flags = (uint8_t)((i < nframes - 1 ? 1 : 0) | (command ? 2 : 0));
        if (spare & (1u << i)) {
            uint8_t *plain = (uint8_t *)frames[i].iov_base - 1;
            plain[0] = flags;
            crypto_box_detached_afternm(box, mac, plain, 1 + len, nonce, p->key);
        } else {  /* exactly in place: libsodium encrypts it there */
            box[0] = flags;
            memcpy(box + 1, frames[i].iov_base, len);
            crypto_box_detached_afternm(box, mac, box, 1 + len, nonce, p->key);
        }
        at = box + 1 + len;
    }
    return (size_t)(at - ps->boxed);
}

/* One message (or command) to the CURVE peer p: boxed (spare as box_frames()), then as
 * deliver() (its rc). */
static int deliver_boxed_from(struct nflogd_peers *ps, struct peer *p, const struct iovec *frames, int nframes,
                              int command, unsigned spare)
{
    size_t len = box_frames(ps, p, frames, nframes, command, spare);
    if (!len)
        return 0;
    struct iovec iov = { ps->boxed, len };
    struct blob *b = NULL;
    int rc = deliver(ps, p, &iov, 1, len, &b);
    if (b)
        blob_unref(ps, b);
    return rc;
}

/* The same, every frame copied behind its flags. */
static int deliver_boxed(struct nflogd_peers *ps, struct peer *p, const struct iovec *frames, int nframes,
                         int command)
{
    return deliver_boxed_from(ps, p, frames, nframes, command, 0);
}

/* Count what deliver() said of a message to p: dropped at its hwm (0) or for the cap on
 * the bytes queued (2, counted in both). */
static void delivered(struct nflogd_peers *ps, struct peer *p, int rc)
{
    if (rc == 2) {
        ps->full_dropped++;
        rc = 0;
    }
    if (rc == 0) {
        p->dropped++;
        ps->dropped++;
        if (!p->dropping && ps->wake_fd >= 0) {
            uint64_t one = 1;
            if (write(ps->wake_fd, &one, sizeof(one)) < 0) {
                /* EAGAIN: the counter is non-zero already, the loop wakes all the same */
            }
        }
    }
    p->dropping = rc == 0;
}

static inline void put32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}

/* Where the names trailer of a batch's data begins (NFLOGD_FLAG_IFNAMES: count u16 and size
 * u16 in the last 4 bytes, the entries in the size bytes before), dlen if it has none. */
static size_t trailer_start(const uint8_t *header, const uint8_t *data, size_t dlen)
{
    if (!(header[5] & NFLOGD_FLAG_IFNAMES) || dlen < 4)
        return dlen;
    uint16_t size;
    memcpy(&size, data + dlen - 2, 2);
    return (size_t)size + 4 <= dlen ? dlen - 4 - size : dlen;
}

/* Copy len bytes at src_off of data to out + *at; the offset they have there. */
static uint32_t carry(uint8_t *out, uint32_t *at, const uint8_t *data, uint32_t src_off, uint32_t len)
{
    uint32_t off = *at;
    memcpy(out + off, data + src_off, len);
    *at += len;
    return off;
}

static int names(const struct nflogd_record *r, uint32_t index)
{
    return ((r->present & NFLOGD_F_INDEV) && r->indev == index) || ((r->present & NFLOGD_F_OUTDEV) && r->outdev == index)
        || ((r->present & NFLOGD_F_PHYSINDEV) && r->physindev == index)
        || ((r->present & NFLOGD_F_PHYSOUTDEV) && r->physoutdev == index);
}

/* The names trailer of a filtered message: the entries of the batch's trailer (tr, trlen bytes
 * with its last 4) that one of the n records of table names, then their count and size, at
 * out + *at. Returns 0 (no trailer, the flag cleared) if none. */
static int carry_names(uint8_t *out, uint32_t *at, const uint8_t *tr, size_t trlen, const struct nflogd_record *table,
                       uint32_t n)
{
    uint32_t start = *at, o = start;
    uint16_t count = 0;
    size_t end = trlen - 4;
    for (size_t e = 0; e + 5 <= end && e + 5 + tr[e + 4] <= end; e += 5 + tr[e + 4]) {
        uint32_t index;
        memcpy(&index, tr + e, 4);
        for (uint32_t k = 0; k < n; k++) {
            if (names(&table[k], index)) {
                memcpy(out + o, tr + e, 5 + tr[e + 4]);
                o += 5 + tr[e + 4];
                count++;
                break;
            }
        }
    }
    if (!count)
        return 0;
    uint16_t tail[2] = { count, (uint16_t)(o - start) };  /* little-endian, as the record */
    memcpy(out + o, tail, sizeof(tail));
    *at = o + sizeof(tail);
    return 1;
}

/* The message of filter slot's records (match bit set) of the batch in frames: the same
 * header but for count, first_seq (the filter's own numbering) and the FILTERED flag, those
 * records with their offsets rewritten to their payloads, prefixes, conntrack blocks and link
 * headers, copied, and behind them the names trailer of only the names those records use
 * (IFNAMES cleared if none). A batch of no records (a sequence mark) gives the filter's mark:
 * first_seq where the filter's numbering of group stands. out: its frames. */
static int compose(struct nflogd_peers *ps, int slot, uint16_t group, const struct iovec frames[4], uint32_t count,
                   struct iovec out[4])
{
    const struct nflogd_record *recs = frames[2].iov_base;
    const uint8_t *data = frames[3].iov_base;
    size_t full = frames[3].iov_len, dend = trailer_start(frames[1].iov_base, data, full);
    uint64_t bit = 1ull << slot;
    uint32_t n = 0;
    size_t dlen = full - dend;  /* the names trailer, at most all of it */
    for (uint32_t i = 0; i < count; i++) {
        if (ps->match[i] & bit) {
            const struct nflogd_record *r = &recs[i];
            n++;
            dlen += r->caplen + ((r->present & NFLOGD_F_PREFIX) ? r->prefix_len : 0)
                  + ((r->present & NFLOGD_F_CT) ? r->ct_len : 0) + ((r->present & NFLOGD_F_L2HDR) ? r->l2hdr_len : 0);
        }
    }
    if (!n && count)
        return 0;
    size_t hlen = frames[1].iov_len, rlen = (size_t)n * sizeof(struct nflogd_record);
    size_t need = hlen + rlen + dlen;
    if (need > ps->fbuf_cap) {
        uint8_t *more = realloc(ps->fbuf, need);
        if (!more)
            return -1;
        ps->fbuf = more;
        ps->fbuf_cap = need;
    }
    uint8_t *header = ps->fbuf;
    struct nflogd_record *table = (struct nflogd_record *)(ps->fbuf + hlen);
    uint8_t *out_data = ps->fbuf + hlen + rlen;
    memcpy(header, frames[1].iov_base, hlen);
    header[5] = (uint8_t)((header[5] & ~NFLOGD_FLAG_IFNAMES) | NFLOGD_WIRE_FILTERED);
    put32(header + 8, n);
    uint64_t epoch = nflogd_filters_epoch(ps->filters, slot);
    uint64_t first_seq = nflogd_filters_take_seq(ps->filters, slot, group, n);
    memcpy(header + 16, &epoch, 8);
    memcpy(header + 24, &first_seq, 8);
    uint32_t at = 0, k = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (!(ps->match[i] & bit))
            continue;
        struct nflogd_record r = recs[i];
        r.data_off = carry(out_data, &at, data, r.data_off, r.caplen);
        if (r.present & NFLOGD_F_PREFIX)
            r.prefix_off = carry(out_data, &at, data, r.prefix_off, r.prefix_len);
        if (r.present & NFLOGD_F_CT)
            r.ct_off = carry(out_data, &at, data, r.ct_off, r.ct_len);
        if (r.present & NFLOGD_F_L2HDR)
            r.l2hdr_off = carry(out_data, &at, data, r.l2hdr_off, r.l2hdr_len);
        table[k++] = r;
    }
    if (dend < full && carry_names(out_data, &at, data + dend, full - dend, table, n))
        header[5] |= NFLOGD_FLAG_IFNAMES;
    out[0] = frames[0];
    out[1] = (struct iovec){ header, hlen };
    out[2] = (struct iovec){ table, rlen };
    out[3] = (struct iovec){ out_data, at };
    return 1;
}

/* Each filter whose run numbers group (run), once on the batch; the message of each one the
 * peers of group hold (want) to them, the others' numbering moved on by what they passed. */
static void send_filtered(struct nflogd_peers *ps, uint16_t group, const struct iovec frames[4], uint64_t want,
                          uint64_t run)
{
    size_t rs = sizeof(struct nflogd_record);
    uint32_t count = (uint32_t)(frames[2].iov_len / rs);
    if (frames[2].iov_len != count * rs)
        return;
    if (count > ps->match_cap) {
        uint64_t *more = realloc(ps->match, count * sizeof(*more));
        if (!more)
            return;
        ps->match = more;
        ps->match_cap = count;
    }
    nflogd_filters_run(ps->filters, run, frames[2].iov_base, count, frames[3].iov_base,
                       (uint32_t)frames[3].iov_len, ps->match);
    for (int s = 0; s < NFLOGD_FILTER_MAX; s++) {
        uint64_t bit = 1ull << s;
        if (!(run & bit))
            continue;
        if (!(want & bit)) {  /* nobody to send to: its numbering goes on */
            uint32_t n = 0;
            for (uint32_t i = 0; i < count; i++)
                n += (ps->match[i] & bit) != 0;
            nflogd_filters_take_seq(ps->filters, s, group, n);
            continue;
        }
        struct iovec out[4], iov[2][8];
        uint8_t heads[2][4][9], topic[NFLOGD_FILTERED_TOPIC + 2];
        size_t len[2] = { 0, 0 };
        int framed[2] = { 0, 0 };
        if (compose(ps, s, group, frames, count, out) <= 0)
            continue;
        struct blob *b[2] = { NULL, NULL };
        for (int i = 0; i < ps->cap; i++) {
            struct peer *p = &ps->peer[i];
            if (p->fd < 0 || p->dead || p->slot != s || !subscribed(p, group))
                continue;
            int t = p->tagged;  /* the topic it subscribed with: the group's, or the filter's */
            struct iovec f[4] = { out[0], out[1], out[2], out[3] };
            if (t) {  /* every tagged peer of the slot has the same: its filter's id */
                memcpy(topic, p->ftopic, NFLOGD_FILTERED_TOPIC);
                memcpy(topic + NFLOGD_FILTERED_TOPIC, out[0].iov_base, 2);
                f[0] = (struct iovec){ topic, sizeof(topic) };
            }
            if (p->curve) {  /* its own copy, boxed for it */
                delivered(ps, p, deliver_boxed(ps, p, f, 4, 0));
                continue;
            }
            if (!framed[t]) {
                frame_iov(iov[t], heads[t], f, 4, &len[t]);
                framed[t] = 1;
            }
            delivered(ps, p, deliver(ps, p, iov[t], 8, len[t], &b[t]));
        }
        for (int t = 0; t < 2; t++)
            if (b[t])
                blob_unref(ps, b[t]);
    }
}

void peers_send(struct nflogd_peers *ps, uint16_t group, const struct iovec frames[4], unsigned spare)
{
    struct iovec iov[8];
    uint8_t heads[4][9];
    size_t len = 0;
    int framed = 0;
    struct blob *b = NULL;
    uint64_t want = 0;  /* the filters some subscriber of group holds */
    for (int i = 0; i < ps->cap; i++) {
        struct peer *p = &ps->peer[i];
        if (p->fd < 0 || p->dead || !subscribed(p, group))
            continue;
        if (p->slot >= 0) {
            want |= 1ull << p->slot;
            continue;
        }
        if (p->curve) {
            delivered(ps, p, deliver_boxed_from(ps, p, frames, 4, 0, spare));
            continue;
        }
        if (!framed) {
            frame_iov(iov, heads, frames, 4, &len);
            framed = 1;
        }
        delivered(ps, p, deliver(ps, p, iov, 8, len, &b));
    }
    if (b)
        blob_unref(ps, b);
    uint64_t run = want | nflogd_filters_numbering(ps->filters, group);
    if (run)
        send_filtered(ps, group, frames, want, run);
}

/* -- the control loop's side ------------------------------------------------------------ */

void nflogd_peers_set_poll(struct nflogd_peers *ps, int epfd, int wake_fd)
{
    ps->epfd = epfd;
    ps->wake_fd = wake_fd;
}

void nflogd_peers_set_hwm(struct nflogd_peers *ps, uint32_t hwm)
{
    ps->hwm = hwm ? hwm : 1;
}

void nflogd_peers_set_max_bytes(struct nflogd_peers *ps, uint64_t max_bytes)
{
    ps->max_bytes = max_bytes;
}

uint64_t nflogd_peers_queued_bytes(struct nflogd_peers *ps)
{
    return ps->bytes;
}

uint64_t nflogd_peers_full_dropped(struct nflogd_peers *ps)
{
    return ps->full_dropped;
}

int nflogd_peers_add(struct nflogd_peers *ps, int fd)
{
    int id = 0;
    while (id < ps->cap && ps->peer[id].fd >= 0)
        id++;
    if (id == ps->cap) {
        int cap = ps->cap ? ps->cap * 2 : 16;
        struct peer *more = realloc(ps->peer, (size_t)cap * sizeof(*more));
        if (!more)
            return -ENOMEM;
        for (int i = ps->cap; i < cap; i++) {
            memset(&more[i], 0, sizeof(more[i]));
            more[i].fd = -1;
            more[i].slot = -1;
        }
        ps->peer = more;
        ps->cap = cap;
    }
    ps->peer[id].fd = fd;
    ps->peer[id].lazy_epfd = -1;
    return id;
}

static struct peer *peer_at(struct nflogd_peers *ps, int id)
{
    return id >= 0 && id < ps->cap && ps->peer[id].fd >= 0 ? &ps->peer[id] : NULL;
}

void nflogd_peers_remove(struct nflogd_peers *ps, int id)
{
    struct peer *p = peer_at(ps, id);
    if (p)
        peer_release(ps, p);
    maybe_trim(ps);
}

int nflogd_peers_filter(struct nflogd_peers *ps, int id, int all, const uint8_t *prefix, const uint8_t *exact)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    if (exact && !p->exact && !(p->exact = malloc(FILTER_EXACT_BYTES)))
        return -ENOMEM;
    if (exact)
        memcpy(p->exact, exact, FILTER_EXACT_BYTES);
    else {
        free(p->exact);
        p->exact = NULL;
    }
    p->all = all;
    memcpy(p->prefix, prefix, sizeof(p->prefix));
    return 0;
}

int nflogd_peers_set_filter(struct nflogd_peers *ps, int id, const uint8_t *spec, uint32_t len, char *why,
                            uint32_t whylen)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    int slot = -1;
    if (spec) {
        slot = nflogd_filters_hold(ps->filters, spec, len, why, whylen);
        if (slot < 0)
            return -EINVAL;
    }
    nflogd_filters_release(ps->filters, p->slot);
    p->slot = slot;
    return slot;
}

int nflogd_peers_set_filter_topic(struct nflogd_peers *ps, int id, const uint8_t *topic)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    p->tagged = topic != NULL;
    if (topic)
        memcpy(p->ftopic, topic, NFLOGD_FILTERED_TOPIC);
    return 0;
}

int nflogd_peers_filter_slot(struct nflogd_peers *ps, int id)
{
    struct peer *p = peer_at(ps, id);
    return p ? p->slot : -1;
}

struct nflogd_filters *nflogd_peers_filters(struct nflogd_peers *ps)
{
    return ps->filters;
}

void nflogd_peers_set_filter_linger(struct nflogd_peers *ps, uint32_t ms)
{
    nflogd_filters_set_linger(ps->filters, ms);
}

void peers_set_lazy(struct nflogd_peers *ps, int epfd)
{
    ps->lazy_epfd = epfd;
}

int peers_flush_lazy(struct nflogd_peers *ps, int give_up)
{
    int left = 0;
    for (int i = 0; i < ps->cap && ps->queued; i++) {
        struct peer *p = &ps->peer[i];
        if (p->fd < 0 || !p->lazy)
            continue;
        int rc = flush(ps, p);
        if (rc < 0) {
            fail(ps, p, -rc);
        } else if (rc == 0 && give_up) {
            p->lazy = 0;
            arm(ps, p, 1);
        } else if (rc == 0) {
            left++;
            if (p->lazy_epfd >= 0)
                arm_lazy(p, p->lazy_epfd);  /* watched again */
        }
    }
    maybe_trim(ps);
    return left;
}

uint64_t nflogd_peers_sent_bytes(struct nflogd_peers *ps)
{
    return ps->sent_bytes;
}

int nflogd_peers_flush(struct nflogd_peers *ps, int id)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    if (p->dead)
        return -p->dead;
    int rc = flush(ps, p);
    if (rc < 0)
        fail(ps, p, -rc);
    maybe_trim(ps);
    return rc < 0 ? -p->dead : rc;
}

int nflogd_peers_message(struct nflogd_peers *ps, int id, const uint8_t *f0, uint32_t l0, const uint8_t *f1,
                         uint32_t l1, const uint8_t *f2, uint32_t l2, const uint8_t *f3, uint32_t l3, int nframes)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    if (p->dead)
        return -p->dead;
    if (nframes < 1 || nframes > 4)
        return -EINVAL;
    const struct iovec frames[4] = {
        { (void *)f0, l0 }, { (void *)f1, l1 }, { (void *)f2, l2 }, { (void *)f3, l3 },
    };
    int rc;
    if (p->curve) {
        rc = deliver_boxed(ps, p, frames, nframes, 0);
    } else {
        struct iovec iov[8];
        uint8_t heads[4][9];
        size_t len = 0;
        struct blob *b = NULL;
        frame_iov(iov, heads, frames, nframes, &len);
        rc = deliver(ps, p, iov, 2 * nframes, len, &b);
        if (b)
            blob_unref(ps, b);
    }
    if (rc >= 0)
        delivered(ps, p, rc);
    maybe_trim(ps);
    return rc < 0 ? -p->dead : rc;
}

int nflogd_peers_command(struct nflogd_peers *ps, int id, const uint8_t *frame, uint32_t len)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    if (p->dead)
        return -p->dead;
    struct iovec iov = { (void *)frame, len };
    struct blob *b = NULL;
    int rc;
    if (p->curve) {  /* the command's body, out of its frame, boxed */
        size_t hl = len && frame[0] & 2 ? 9 : 2;
        if (len < hl)
            return -EINVAL;
        struct iovec body = { (void *)(frame + hl), len - hl };
        rc = deliver_boxed(ps, p, &body, 1, 1);
    } else {
        rc = deliver(ps, p, &iov, 1, len, &b);  /* dropped (0, 2): not a message of the feed */
    }
    if (b)
        blob_unref(ps, b);
    return rc < 0 ? -p->dead : rc == 1;
}

int nflogd_peers_set_curve(struct nflogd_peers *ps, int id, const uint8_t *key, uint64_t nonce)
{
    struct peer *p = peer_at(ps, id);
    if (!p)
        return -ENOENT;
    memcpy(p->key, key, sizeof(p->key));
    p->nonce = nonce;
    p->curve = 1;
    return 0;
}

uint64_t nflogd_peers_nonce(struct nflogd_peers *ps, int id)
{
    struct peer *p = peer_at(ps, id);
    return p && p->curve ? p->nonce : 0;
}

uint64_t nflogd_peers_dropped(struct nflogd_peers *ps, int id)
{
    if (id < 0)
        return ps->dropped;
    struct peer *p = peer_at(ps, id);
    return p ? p->dropped : 0;
}

uint64_t nflogd_peers_queued(struct nflogd_peers *ps, int id)
{
    if (id < 0)
        return ps->queued;
    struct peer *p = peer_at(ps, id);
    return p ? p->qlen : 0;
}

/* The packets in a queued message: its header's count (frame 1, offset 8), 0 for a command. */
static uint64_t blob_packets(const struct blob *b)
{
    const uint8_t *m = b->bytes;
    if (b->len < 6 || m[0] != 1 || m[1] != 2)  /* not a message: its topic frame is 2 bytes */
        return 0;
    size_t at = 4 + ((m[4] & 2) ? 9 : 2) + 8;  /* frame 1's head, then the header's count */
    if (b->len < at + 4)
        return 0;
    return (uint64_t)m[at] | (uint64_t)m[at + 1] << 8 | (uint64_t)m[at + 2] << 16 | (uint64_t)m[at + 3] << 24;
}

uint64_t nflogd_peers_queued_packets(struct nflogd_peers *ps)
{
    uint64_t n = 0;
    for (int i = 0; i < ps->cap; i++) {
        struct peer *p = &ps->peer[i];
        if (p->fd < 0)
            continue;
        for (uint32_t k = 0; k < p->qlen; k++)
            n += blob_packets(p->queue[(p->qhead + k) % p->qcap]);
    }
    return n;
}

void nflogd_peers_send(struct nflogd_peers *ps, uint16_t group, const uint8_t *topic, uint32_t tlen,
                       const uint8_t *header, uint32_t hlen, const uint8_t *records, uint32_t rlen,
                       const uint8_t *data, uint32_t dlen)
{
    const struct iovec frames[4] = {
        { (void *)topic, tlen }, { (void *)header, hlen }, { (void *)records, rlen }, { (void *)data, dlen },
    };
    peers_send(ps, group, frames, 0);  /* Python's bytes: no byte in front is ours */
}
