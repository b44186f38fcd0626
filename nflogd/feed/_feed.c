/* nflogd's hot path in C: a group's batches from nflogd_read() straight onto the feed.
 *
 * nflogd_pump() runs in the group's capture thread with the GIL released: it reads a batch
 * (_nflog.c, ../_nflog.h), builds the wire format's four frames (docs/wire-format.md: topic, header +
 * node, record table, data) and, under the feed's mutex, writes them to the feed's own
 * peers (_peers.c: the subscribers of its NULL-mechanism endpoints) and sends them on the
 * feed's ZeroMQ sockets (the CURVE endpoints' XPUB), with no Python between the kernel and
 * the subscribers.
 *
 * The ZeroMQ sockets are pyzmq's: the same libzmq copy that pyzmq loaded must send on them (a
 * socket of one copy of the library must never be used by another), so this file links no
 * libzmq. nflogd_zmq_load() takes the few functions it needs from the library pyzmq mapped
 * into the process (dlopen RTLD_NOLOAD: never a second copy).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../_nflog.h"
#include "_feed.h"
#include "_peers.h"

/* zmq.h: zmq_msg_t is 64 opaque bytes, pointer-aligned; the flags of zmq_msg_send(). */
typedef struct {
    unsigned char _[64];
} __attribute__((aligned(sizeof(void *)))) zmq_msg_t;
#define ZMQ_DONTWAIT 1
#define ZMQ_SNDMORE 2
#define ZMQ_EVENTS 15
#define ZMQ_POLLIN 1

static struct {
    int (*msg_init)(zmq_msg_t *);
    int (*msg_init_size)(zmq_msg_t *, size_t);
    int (*msg_init_data)(zmq_msg_t *, void *, size_t, void (*)(void *, void *), void *);
    void *(*msg_data)(zmq_msg_t *);
    int (*msg_send)(zmq_msg_t *, void *, int);
    int (*msg_close)(zmq_msg_t *);
    int (*msg_copy)(zmq_msg_t *, zmq_msg_t *);
    int (*getsockopt)(void *, int, void *, size_t *);
    int (*zmq_errno)(void);
    void (*version)(int *, int *, int *);
} z;

int nflogd_zmq_load(const char *path, int *major, int *minor, int *patch)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (!h)
        return -ENOENT;
#define SYM(field, name)                 \
    *(void **)&z.field = dlsym(h, name); \
    if (!z.field)                        \
        return -ENOSYS;
    SYM(msg_init, "zmq_msg_init")
    SYM(msg_init_size, "zmq_msg_init_size")
    SYM(msg_init_data, "zmq_msg_init_data")
    SYM(msg_data, "zmq_msg_data")
    SYM(msg_send, "zmq_msg_send")
    SYM(msg_close, "zmq_msg_close")
    SYM(msg_copy, "zmq_msg_copy")
    SYM(getsockopt, "zmq_getsockopt")
    SYM(zmq_errno, "zmq_errno")
    SYM(version, "zmq_version")
#undef SYM
    z.version(major, minor, patch);
    return 0;
}

#define MAX_SOCKETS 2
#define MAX_NODE 255
#define HEADER_SIZE 40

struct nflogd_feed {
    pthread_mutex_t lock;
    void *sockets[MAX_SOCKETS];
    int nsockets;
    uint64_t epoch;
    uint8_t node[MAX_NODE];
    uint16_t node_len;
    struct nflogd_peers *peers;  /* the feed's own peers (_peers.c) */
    uint64_t sent;    /* messages sent (to the peers and every socket) */
    uint64_t unsent;  /* messages a socket refused (EAGAIN) */
    int wake_fd;      /* >= 0: the control loop waits for events; see send_batch() */
};

struct nflogd_feed *nflogd_feed_new(uint64_t epoch)
{
    struct nflogd_feed *f = calloc(1, sizeof(*f));
    if (!f)
        return NULL;
    if (!(f->peers = peers_new())) {
        free(f);
        return NULL;
    }
    pthread_mutex_init(&f->lock, NULL);
    f->epoch = epoch;
    f->wake_fd = -1;
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
int nflogd_feed_set_sockets(struct nflogd_feed *f, void *first, void *second)
{
    f->nsockets = 0;
    if (first)
        f->sockets[f->nsockets++] = first;
    if (second)
        f->sockets[f->nsockets++] = second;
    return f->nsockets;
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

/* The caller holds the lock. */
void nflogd_feed_wake_on_incoming(struct nflogd_feed *f, int fd)
{
    f->wake_fd = fd;
}

uint64_t nflogd_feed_sent(struct nflogd_feed *f)
{
    return __atomic_load_n(&f->sent, __ATOMIC_RELAXED);
}

uint64_t nflogd_feed_unsent(struct nflogd_feed *f)
{
    return __atomic_load_n(&f->unsent, __ATOMIC_RELAXED);
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

/* The data frame without a copy: a large batch's data buffer goes to ZeroMQ as the frame
 * (zmq_msg_init_data) and the reader goes on with another buffer of its pool. ZeroMQ gives
 * each back when it has written it (pool_give_back, in its I/O thread). A pool lends at most
 * POOL_BUFFERS at once; beyond that (a subscriber slow enough for ZeroMQ to queue more),
 * or for a small frame, the data is copied, so memory stays bounded. The pool outlives its
 * reader as long as ZeroMQ holds one of its buffers. */
#define POOL_BUFFERS 4
#define ZERO_COPY_MIN 8192

struct nflogd_pool {
    pthread_mutex_t lock;
    size_t size;                /* bytes per buffer: the reader's data_cap */
    char *spare[POOL_BUFFERS];  /* buffers back from ZeroMQ, ready to use */
    int nspare;
    int lent;                   /* buffers ZeroMQ holds */
    int released;               /* the reader is gone: free buffers as they come back */
};

static void pool_free(struct nflogd_pool *p)
{
    for (int i = 0; i < p->nspare; i++)
        free(p->spare[i]);
    pthread_mutex_destroy(&p->lock);
    free(p);
}

static void pool_give_back(void *data, void *hint)
{
    struct nflogd_pool *p = hint;
    pthread_mutex_lock(&p->lock);
    p->lent--;
    if (!p->released && p->nspare < POOL_BUFFERS) {
        p->spare[p->nspare++] = data;
        data = NULL;
    }
    int done = p->released && p->lent == 0;
    pthread_mutex_unlock(&p->lock);
    free(data);
    if (done)
        pool_free(p);
}

void nflogd_pool_release(struct nflogd_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->lock);
    p->released = 1;
    int done = p->lent == 0;
    pthread_mutex_unlock(&p->lock);
    if (done)
        pool_free(p);
}

/* Lend r's data buffer to ZeroMQ as m, and give r another; 0, or -1 to copy instead. */
static int lend_data(zmq_msg_t *m, struct nflogd_reader *r)
{
    struct nflogd_pool *p = r->pool;
    if (!p) {
        p = r->pool = calloc(1, sizeof(*p));
        if (!p)
            return -1;
        pthread_mutex_init(&p->lock, NULL);
        p->size = r->data_cap;
    }
    int slot = 0;
    char *next = NULL;
    pthread_mutex_lock(&p->lock);
    if (p->lent < POOL_BUFFERS) {
        slot = 1;
        p->lent++;  /* counted before ZeroMQ may give the buffer back */
        if (p->nspare)
            next = p->spare[--p->nspare];
    }
    pthread_mutex_unlock(&p->lock);
    if (!slot)
        return -1;
    if (!next)
        next = malloc(p->size);
    if (!next || z.msg_init_data(m, r->data, r->data_len, pool_give_back, p) != 0) {
        pthread_mutex_lock(&p->lock);
        p->lent--;
        if (next && p->nspare < POOL_BUFFERS) {
            p->spare[p->nspare++] = next;
            next = NULL;
        }
        pthread_mutex_unlock(&p->lock);
        free(next);
        return -1;
    }
    r->data = next;
    return 0;
}

static int frame(zmq_msg_t *m, const void *src, size_t len)
{
    if (z.msg_init_size(m, len) != 0)
        return -1;
    if (len)
        memcpy(z.msg_data(m), src, len);
    return 0;
}

/* A send runs the socket's pending ZeroMQ commands, and so takes the ZMQ_FD wake-up the
 * control loop waits on when a peer's subscriptions arrive. While the loop waits (wake_fd
 * set), look at what the send took: if a socket has incoming messages, write wake_fd, once.
 * The caller holds the lock. */
static void pass_on_incoming(struct nflogd_feed *f)
{
    for (int s = 0; s < f->nsockets; s++) {
        int events = 0;
        size_t len = sizeof(events);
        if (z.getsockopt(f->sockets[s], ZMQ_EVENTS, &events, &len) == 0 && !(events & ZMQ_POLLIN))
            continue;
        uint64_t one = 1;
        if (write(f->wake_fd, &one, sizeof(one)) < 0) {
            /* EAGAIN: the counter is already non-zero, so the loop wakes all the same */
        }
        f->wake_fd = -1;
        return;
    }
}

/* One message of the batch in r to f's peers and on every socket of f. The caller holds the
 * lock. Returns 1 if every socket took it, 0 if one refused it (EAGAIN: only with
 * XPUB_NODROP, never set), -errno for anything else. */
static int send_batch(struct nflogd_feed *f, struct nflogd_reader *r, uint32_t count)
{
    uint8_t topic[2] = { (uint8_t)(r->group >> 8), (uint8_t)r->group };
    uint8_t header[HEADER_SIZE + MAX_NODE];
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
    peers_send(f->peers, r->group, frames);
    if (f->nsockets == 0) {
        __atomic_add_fetch(&f->sent, 1, __ATOMIC_RELAXED);
        return 1;
    }

    zmq_msg_t m[4], copy[4];
    if (frame(&m[0], topic, 2) || frame(&m[1], header, HEADER_SIZE + f->node_len)
        || frame(&m[2], r->records, records_len)
        || ((r->data_len < ZERO_COPY_MIN || lend_data(&m[3], r) != 0)
            && frame(&m[3], r->data, r->data_len)))
        return -ENOMEM;  /* zmq_msg_init_size fails only for want of memory */
    int rc = 1;
    for (int s = 0; s < f->nsockets; s++) {
        int last = s == f->nsockets - 1;
        zmq_msg_t *out = m;
        if (!last) {  /* the next socket gets the same bytes: reference-counted copies */
            for (int i = 0; i < 4; i++) {
                z.msg_init(&copy[i]);
                z.msg_copy(&copy[i], &m[i]);
            }
            out = copy;
        }
        int i = 0;
        for (; i < 4; i++) {
            if (z.msg_send(&out[i], f->sockets[s], ZMQ_DONTWAIT | (i < 3 ? ZMQ_SNDMORE : 0)) < 0)
                break;
        }
        if (i < 4) {
            int err = z.zmq_errno();
            rc = err == EAGAIN ? (rc > 0 ? 0 : rc) : -err;
        }
        for (; i < 4; i++)  /* what was not sent is still ours */
            z.msg_close(&out[i]);
    }
    if (rc > 0)
        __atomic_add_fetch(&f->sent, 1, __ATOMIC_RELAXED);
    else if (rc == 0)
        __atomic_add_fetch(&f->unsent, 1, __ATOMIC_RELAXED);
    if (f->wake_fd >= 0)
        pass_on_incoming(f);
    return rc;
}

int nflogd_pump(struct nflogd_reader *r, struct nflogd_feed *f, int timeout_ms)
{
    uint64_t overflows = r->overflows;
    for (;;) {
        int n = nflogd_read(r, timeout_ms);
        if (n < 0 && n != -ENOBUFS)
            return n;
        if (n > 0 && f) {
            pthread_mutex_lock(&f->lock);
            int rc = send_batch(f, r, (uint32_t)n);
            pthread_mutex_unlock(&f->lock);
            if (rc < 0)
                return rc;
        }
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
        int n = nflogd_read(r, sent ? idle_ms : -1);
        if (n < 0 && n != -ENOBUFS)
            return n;
        if (n > 0 && f) {
            pthread_mutex_lock(&f->lock);
            int rc = send_batch(f, r, (uint32_t)n);
            pthread_mutex_unlock(&f->lock);
            if (rc < 0)
                return rc;
        }
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
