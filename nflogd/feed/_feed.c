/* nflogd's hot path in C: a group's batches from nflogd_read() straight onto the feed.
 *
 * nflogd_pump() runs in the group's capture thread with the GIL released: it reads a batch
 * (_nflog.c, ../_nflog.h), builds the wire format's four frames (docs/wire-format.md: topic, header +
 * node, record table, data) and, under the feed's mutex, writes them to the feed's own
 * peers (_peers.c: the subscribers of every endpoint, NULL and CURVE), with no Python between
 * the kernel and the subscribers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../_nflog.h"
#include "_feed.h"
#include "_peers.h"

#define MAX_NODE 255
#define HEADER_SIZE 40

struct nflogd_feed {
    pthread_mutex_t lock;
    uint64_t epoch;
    uint8_t node[MAX_NODE];
    uint16_t node_len;
    struct nflogd_peers *peers;  /* the feed's own peers (_peers.c) */
    uint64_t sent;    /* messages sent to the peers */
};

struct nflogd_feed *nflogd_feed_new(uint64_t epoch)
{
    struct nflogd_feed *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    if (!(f->peers = peers_new(epoch))) {
        free(f);
        return NULL;
    }
    pthread_mutex_init(&f->lock, NULL);
    f->epoch = epoch;
    return f;
}

void nflogd_feed_free(struct nflogd_feed *f)
{
    if (!f)
        return;
    peers_free(f->peers);
    pthread_mutex_destroy(&f->lock);
    free(f);
}

struct nflogd_peers *nflogd_feed_peers(struct nflogd_feed *f)
{
    return f->peers;
}

void nflogd_feed_lock(struct nflogd_feed *f)
{
    pthread_mutex_lock(&f->lock);
}

void nflogd_feed_unlock(struct nflogd_feed *f)
{
    pthread_mutex_unlock(&f->lock);
}

/* The caller holds the lock. */
int nflogd_feed_set_node(struct nflogd_feed *f, const char *node, uint32_t len)
{
    if (len > MAX_NODE)
        return -EINVAL;
    memcpy(f->node, node, len);
    f->node_len = (uint16_t)len;
    return 0;
}

uint64_t nflogd_feed_sent(struct nflogd_feed *f)
{
    return __atomic_load_n(&f->sent, __ATOMIC_RELAXED);
}

static inline void put16(uint8_t *p, uint16_t v)
{
    memcpy(p, &v, 2);
}
static inline void put32(uint8_t *p, uint32_t v)
{
    memcpy(p, &v, 4);
}
static inline void put64(uint8_t *p, uint64_t v)
{
    memcpy(p, &v, 8);
}

/* One message of the batch in r to f's peers. The caller holds the lock. */
static void send_batch(struct nflogd_feed *f, struct nflogd_reader *r, uint32_t count)
{
    /* the topic and header each with a byte in front, as the reader's records and data have
     * NFLOGD_HEADROOM: a CURVE peer's flags byte goes there (peers_send) */
    uint8_t topic_room[1 + 2] = { 0, (uint8_t)(r->group >> 8), (uint8_t)r->group };
    uint8_t header_room[1 + HEADER_SIZE + MAX_NODE];
    uint8_t *topic = topic_room + 1, *header = header_room + 1;
    uint64_t first_seq = r->feed_seq;
    r->feed_seq += count;
    memcpy(header, "NFLD", 4);             /* wire.HEADER: <4sBBHIHHQQQ */
    header[4] = 1;                         /* version */
    header[5] = r->batch_flags;            /* flags: NFLOGD_FLAG_IFNAMES */
    put16(header + 6, r->group);
    put32(header + 8, count);
    put16(header + 12, sizeof(struct nflogd_record));
    put16(header + 14, f->node_len);
    put64(header + 16, f->epoch);
    put64(header + 24, first_seq);
    put64(header + 32, r->lost + r->dropped_base);
    memcpy(header + HEADER_SIZE, f->node, f->node_len);
    size_t records_len = (size_t)count * sizeof(struct nflogd_record);
    const struct iovec frames[4] = {
        { topic, 2 }, { header, HEADER_SIZE + f->node_len }, { r->records, records_len }, { r->data, r->data_len },
    };
    peers_send(f->peers, r->group, frames, 0xf);
    __atomic_add_fetch(&f->sent, 1, __ATOMIC_RELAXED);
}

void nflogd_feed_forward(struct nflogd_feed *f, const uint8_t *topic, const uint8_t *header, uint32_t hlen,
                         const uint8_t *records, uint32_t rlen, const uint8_t *data, uint32_t dlen,
                         int lazy_epfd)
{
    const struct iovec frames[4] = {
        { (void *)topic, 2 }, { (void *)header, hlen }, { (void *)records, rlen }, { (void *)data, dlen },
    };
    pthread_mutex_lock(&f->lock);
    peers_set_lazy(f->peers, lazy_epfd);
    peers_send(f->peers, (uint16_t)(topic[0] << 8 | topic[1]), frames, 0);  /* not ours: no byte in front */
    peers_set_lazy(f->peers, -1);
    pthread_mutex_unlock(&f->lock);
    __atomic_add_fetch(&f->sent, 1, __ATOMIC_RELAXED);
}

int nflogd_feed_flush_lazy(struct nflogd_feed *f, int give_up, uint64_t *sent_bytes)
{
    pthread_mutex_lock(&f->lock);
    int left = peers_flush_lazy(f->peers, give_up);
    *sent_bytes = nflogd_peers_sent_bytes(f->peers);
    pthread_mutex_unlock(&f->lock);
    return left;
}

/* One read of the group and, if it gave packets, their message to f's peers (f NULL: none):
 * nflogd_read's result. Both pumps' step. */
static int read_and_send(struct nflogd_reader *r, struct nflogd_feed *f, int timeout_ms)
{
    int n = nflogd_read(r, timeout_ms);
    if (n > 0 && f) {
        pthread_mutex_lock(&f->lock);
        send_batch(f, r, (uint32_t)n);
        pthread_mutex_unlock(&f->lock);
    }
    return n;
}

int nflogd_pump(struct nflogd_reader *r, struct nflogd_feed *f, int timeout_ms)
{
    uint64_t overflows = r->overflows;
    for (;;) {
        int n = read_and_send(r, f, timeout_ms);
        if (n < 0 && n != -ENOBUFS)
            return n;
        if (r->overflows != overflows)
            return 1;
        if (__atomic_exchange_n(&r->woken, 0, __ATOMIC_ACQ_REL) || n <= 0)
            return 0;
    }
}

int nflogd_pump_until_idle(struct nflogd_reader *r, struct nflogd_feed *f, int idle_ms, int sent)
{
    uint64_t overflows = r->overflows;
    for (;;) {
        int n = read_and_send(r, f, sent ? idle_ms : -1);
        if (n < 0 && n != -ENOBUFS)
            return n;
        if (n > 0)
            sent = 1;
        if (r->overflows != overflows)
            return 1;
        if (__atomic_exchange_n(&r->woken, 0, __ATOMIC_ACQ_REL))
            return 0;
        if (n <= 0 && sent)
            return 2;
    }
}
