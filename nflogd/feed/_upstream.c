/* The relay's upstream reader in C: the messages of an upstream's libzmq socket straight onto
 * the feed, no Python per message.
 *
 * nflogd-relay keeps libzmq for its upstream connections (pyzmq makes the sockets, connects,
 * subscribes and watches them); per message, all the relay does is read its frames and send
 * them to the readers of its group. nflogd_upstream_pass() does that in one call for a burst
 * of messages: zmq_msg_recv() into messages of its own, then the feed's peers_send() under the
 * feed's lock (_feed.c), with nothing copied in between. What needs Python comes back one
 * message at a time (a filter's messages, a copy for the stream publisher, a message that
 * matches no group) and, per pass, the header of each message forwarded (the sequence marks).
 *
 * libzmq is not linked: its functions are taken from the library pyzmq loaded (nflogd_zmq_load),
 * since a socket must be used through the library that made it, and pyzmq's wheels bring a
 * libzmq of their own.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

#include "_feed.h"
#include "_peers.h"
#include "_upstream.h"

/* zmq.h's, stable across libzmq 4: a message is 64 opaque bytes, pointer-aligned. */
typedef struct {
    unsigned char _[64];
} __attribute__((aligned(sizeof(void *)))) zmq_msg;
#define ZMQ_DONTWAIT 1

static struct {
    int (*msg_init)(zmq_msg *);
    int (*msg_recv)(zmq_msg *, void *, int);
    int (*msg_close)(zmq_msg *);
    void *(*msg_data)(zmq_msg *);
    size_t (*msg_size)(const zmq_msg *);
    int (*msg_more)(const zmq_msg *);
    int (*errno_)(void);
} zmq;

#define FILTERS_PREFIX "\xffNFL"
#define MAX_FRAMES 4
#define NOTE_BYTES (NFLOGD_NOTE_SIZE - 2)

struct nflogd_upstream {
    void *sock;
    int slot;     /* its place in a set of upstreams (-1: none) */
    int fd;       /* there, its socket's ZMQ_FD */
    int lazy_epfd; /* there, the set's epoll, on which readers' full sockets are watched */
    int pending;  /* the set's thread reads it on its next turn */
    int broken;   /* a read failed: the set's thread leaves it alone */
    int filtered, keep;
    zmq_msg frames[MAX_FRAMES + 1]; /* the message being read (a fifth: one frame too many) */
    uint32_t held;                  /* frames of the message held for the caller (0: none) */
    int held_forwarded;
    uint32_t notes;
    uint64_t messages, bytes, unsent;
    uint8_t note[NFLOGD_NOTES_MAX][NFLOGD_NOTE_SIZE];
};

int nflogd_zmq_load(const char *path, char *why, uint32_t whylen)
{
    void *h = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (!h) {
        snprintf(why, whylen, "%s is not loaded (%s)", path, dlerror());
        return -1;
    }
    static const char *names[] = { "zmq_msg_init", "zmq_msg_recv", "zmq_msg_close", "zmq_msg_data",
                                   "zmq_msg_size", "zmq_msg_more", "zmq_errno", "zmq_version" };
    void *fn[sizeof(names) / sizeof(names[0])];
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        if (!(fn[i] = dlsym(h, names[i]))) {
            snprintf(why, whylen, "%s: no %s in it or the libraries it uses", path, names[i]);
            dlclose(h);
            return -1;
        }
    }
    int major = 0, minor = 0, patch = 0;
    ((void (*)(int *, int *, int *))fn[7])(&major, &minor, &patch);
    if (major != 4) {
        snprintf(why, whylen, "%s uses libzmq %d.%d.%d; nflogd-relay needs libzmq 4", path, major, minor, patch);
        dlclose(h);
        return -1;
    }
    /* the handle stays open: the functions are used until exit */
    zmq.msg_init = (int (*)(zmq_msg *))fn[0];
    zmq.msg_recv = (int (*)(zmq_msg *, void *, int))fn[1];
    zmq.msg_close = (int (*)(zmq_msg *))fn[2];
    zmq.msg_data = (void *(*)(zmq_msg *))fn[3];
    zmq.msg_size = (size_t(*)(const zmq_msg *))fn[4];
    zmq.msg_more = (int (*)(const zmq_msg *))fn[5];
    zmq.errno_ = (int (*)(void))fn[6];
    return 0;
}

struct nflogd_upstream *nflogd_upstream_new(uintptr_t sock, int filtered, int keep)
{
    if (!zmq.msg_recv)
        return NULL;
    struct nflogd_upstream *u = calloc(1, sizeof(*u));
    if (!u)
        return NULL;
    u->sock = (void *)sock;
    u->slot = -1;
    u->lazy_epfd = -1;
    u->filtered = filtered;
    u->keep = keep;
    for (int i = 0; i <= MAX_FRAMES; i++)
        zmq.msg_init(&u->frames[i]);
    return u;
}

void nflogd_upstream_clear(struct nflogd_upstream *u)
{
    for (int i = 0; i <= MAX_FRAMES; i++) {
        zmq.msg_close(&u->frames[i]);
        zmq.msg_init(&u->frames[i]);
    }
    u->held = 0;
}

void nflogd_upstream_free(struct nflogd_upstream *u)
{
    if (!u)
        return;
    for (int i = 0; i <= MAX_FRAMES; i++)
        zmq.msg_close(&u->frames[i]);
    free(u);
}

/* The rest of a message of more than MAX_FRAMES frames, read and let go. */
static int drain(struct nflogd_upstream *u, zmq_msg *m, uint64_t *size)
{
    while (zmq.msg_more(m)) {
        if (zmq.msg_recv(m, u->sock, ZMQ_DONTWAIT) < 0)
            return -zmq.errno_(); /* a message comes whole: only a closed socket fails here */
        *size += zmq.msg_size(m);
    }
    return 0;
}

/* One message's frames into u->frames: how many (MAX_FRAMES + 1: more than MAX_FRAMES, the
 * rest read and let go), 0 if none is there, -errno. *size: its bytes. */
static int read_message(struct nflogd_upstream *u, uint64_t *size)
{
    *size = 0;
    for (int n = 0; n <= MAX_FRAMES; n++) {
        zmq_msg *m = &u->frames[n];
        if (zmq.msg_recv(m, u->sock, ZMQ_DONTWAIT) < 0) {
            int e = zmq.errno_();
            return n == 0 && e == EAGAIN ? 0 : -e;
        }
        *size += zmq.msg_size(m);
        if (!zmq.msg_more(m))
            return n + 1;
    }
    int rc = drain(u, &u->frames[MAX_FRAMES], size);
    return rc < 0 ? rc : MAX_FRAMES + 1;
}

static const uint8_t *data(struct nflogd_upstream *u, int i)
{
    return (const uint8_t *)zmq.msg_data(&u->frames[i]);
}

static uint32_t size(struct nflogd_upstream *u, int i)
{
    return (uint32_t)zmq.msg_size(&u->frames[i]);
}

static void note(struct nflogd_upstream *u)
{
    uint32_t len = size(u, 1);
    if (len > NOTE_BYTES || u->notes == NFLOGD_NOTES_MAX)
        return; /* longer than any daemon's header: nothing to mark */
    uint8_t *n = u->note[u->notes++];
    n[0] = (uint8_t)(len >> 8);
    n[1] = (uint8_t)len;
    memcpy(n + 2, data(u, 1), len);
}

int nflogd_upstream_pass(struct nflogd_upstream *u, struct nflogd_feed *f, uint32_t burst)
{
    u->held = 0;
    u->notes = 0;
    if (burst > NFLOGD_NOTES_MAX)
        burst = NFLOGD_NOTES_MAX;
    for (uint32_t read = 0; read < burst; read++) {
        uint64_t bytes;
        int n = read_message(u, &bytes);
        if (n <= 0)
            return n;
        if (u->filtered) {
            if (n > MAX_FRAMES || size(u, 0) < 4 || memcmp(data(u, 0), FILTERS_PREFIX, 4))
                continue; /* a group's own, for a moment after its filter was cancelled */
        }
        /* read by the metrics, in other threads */
        __atomic_add_fetch(&u->messages, 1, __ATOMIC_RELAXED);
        __atomic_add_fetch(&u->bytes, bytes, __ATOMIC_RELAXED);
        if (n > MAX_FRAMES) {
            __atomic_add_fetch(&u->unsent, 1, __ATOMIC_RELAXED);
            continue;
        }
        int forward = !u->filtered && n == 4 && size(u, 0) == 2;
        if (forward) {
            nflogd_feed_forward(f, data(u, 0), data(u, 1), size(u, 1), data(u, 2), size(u, 2), data(u, 3),
                                size(u, 3), u->lazy_epfd);
            note(u);
        }
        if (!forward || u->keep) {
            u->held = (uint32_t)n;
            u->held_forwarded = forward;
            return 2;
        }
    }
    return 1;
}

uint32_t nflogd_upstream_held(struct nflogd_upstream *u)
{
    return u->held;
}

const uint8_t *nflogd_upstream_frame(struct nflogd_upstream *u, uint32_t i, uint32_t *len)
{
    if (i >= u->held) {
        *len = 0;
        return NULL;
    }
    *len = size(u, (int)i);
    return data(u, (int)i);
}

int nflogd_upstream_held_forwarded(struct nflogd_upstream *u)
{
    return u->held_forwarded;
}

uint32_t nflogd_upstream_notes(struct nflogd_upstream *u, const uint8_t **notes)
{
    *notes = u->note[0];
    return u->notes;
}

uint64_t nflogd_upstream_messages(struct nflogd_upstream *u)
{
    return __atomic_load_n(&u->messages, __ATOMIC_RELAXED);
}

uint64_t nflogd_upstream_bytes(struct nflogd_upstream *u)
{
    return __atomic_load_n(&u->bytes, __ATOMIC_RELAXED);
}

uint64_t nflogd_upstream_unsent(struct nflogd_upstream *u)
{
    return __atomic_load_n(&u->unsent, __ATOMIC_RELAXED);
}


/* -- upstreams read by a thread of their own ------------------------------------------------ */

#define SLOTS_MAX 4096 /* epoll's data: a slot, never a pointer that a remove() frees */
/* Readers' sockets that are full: written when the set's epoll says they can take more, and
 * tried at least every LAZY_WAIT_MS; after LAZY_TRIES tries in a row in which nothing was
 * written to any reader (one stopped reading: some half a second), armed for the control
 * loop, which writes them when they can. */
#define LAZY_TRIES 250
#define LAZY_WAIT_MS 2

struct nflogd_upstreams {
    pthread_mutex_t lock;
    int epfd, wake_fd, notes_fd, stop;
    uint32_t gather_us;
    struct nflogd_upstream **slot;
    uint32_t nslots;
    uint64_t errors;
    /* the notes since the last take, one per (group, node) and kind (data, mark): a hash
     * table of NOTE_SLOTS, at most NFLOGD_NOTED_MAX in use */
    struct slot_notes *notes;
    uint32_t used;
    uint64_t seq; /* the order the notes were taken in */
    int signalled; /* notes_fd written since the last take */
    uint64_t notes_dropped;
};

#define NOTE_SLOTS (2 * NFLOGD_NOTED_MAX)
#define HEADER_SIZE 40

/* One (group, node)'s notes: the last message with packets, and the last mark (no packets). */
struct slot_notes {
    uint8_t used;
    struct {
        uint64_t when, seq; /* seq 0: none */
        uint8_t note[NFLOGD_NOTE_SIZE];
    } kind[2];
};

struct nflogd_upstreams *nflogd_upstreams_new(uint32_t gather_us)
{
    struct nflogd_upstreams *s = calloc(1, sizeof(*s));
    if (!s)
        return NULL;
    s->epfd = epoll_create1(EPOLL_CLOEXEC);
    s->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->notes_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    s->notes = calloc(NOTE_SLOTS, sizeof(*s->notes));
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = UINT32_MAX };
    if (s->epfd < 0 || s->wake_fd < 0 || s->notes_fd < 0 || !s->notes
        || epoll_ctl(s->epfd, EPOLL_CTL_ADD, s->wake_fd, &ev) < 0) {
        nflogd_upstreams_free(s);
        return NULL;
    }
    pthread_mutex_init(&s->lock, NULL);
    s->gather_us = gather_us;
    return s;
}

void nflogd_upstreams_free(struct nflogd_upstreams *s)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < s->nslots; i++)
        if (s->slot[i])
            s->slot[i]->slot = -1;
    if (s->epfd >= 0)
        close(s->epfd);
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    if (s->notes_fd >= 0)
        close(s->notes_fd);
    free(s->slot);
    free(s->notes);
    free(s);
}

void nflogd_upstreams_lock(struct nflogd_upstreams *s)
{
    pthread_mutex_lock(&s->lock);
}

void nflogd_upstreams_unlock(struct nflogd_upstreams *s)
{
    pthread_mutex_unlock(&s->lock);
}

static void wake(int fd)
{
    uint64_t one = 1;
    ssize_t rc = write(fd, &one, sizeof(one));
    (void)rc; /* EAGAIN: the counter is full, so it is readable already */
}

int nflogd_upstreams_add(struct nflogd_upstreams *s, struct nflogd_upstream *u, int zmq_fd)
{
    if (u->slot >= 0 || u->filtered || u->keep)
        return -EINVAL;
    uint32_t i = 0;
    while (i < s->nslots && s->slot[i])
        i++;
    if (i == s->nslots) {
        if (s->nslots == SLOTS_MAX)
            return -ENOSPC;
        uint32_t n = s->nslots ? s->nslots * 2 : 16;
        struct nflogd_upstream **slot = realloc(s->slot, n * sizeof(*slot));
        if (!slot)
            return -ENOMEM;
        memset(slot + s->nslots, 0, (n - s->nslots) * sizeof(*slot));
        s->slot = slot;
        s->nslots = n;
    }
    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = i };
    if (epoll_ctl(s->epfd, EPOLL_CTL_ADD, zmq_fd, &ev) < 0)
        return -errno;
    s->slot[i] = u;
    u->slot = (int)i;
    u->fd = zmq_fd;
    u->lazy_epfd = s->epfd;
    nflogd_upstreams_recheck(s, u); /* whatever came before it joined */
    return 0;
}

void nflogd_upstreams_remove(struct nflogd_upstreams *s, struct nflogd_upstream *u)
{
    if (u->slot < 0)
        return;
    epoll_ctl(s->epfd, EPOLL_CTL_DEL, u->fd, NULL);
    s->slot[u->slot] = NULL;
    u->slot = -1;
    u->lazy_epfd = -1;
    u->pending = 0;
}

void nflogd_upstreams_recheck(struct nflogd_upstreams *s, struct nflogd_upstream *u)
{
    if (u->slot < 0)
        return;
    u->pending = 1;
    wake(s->wake_fd);
}

void nflogd_upstreams_stop(struct nflogd_upstreams *s)
{
    pthread_mutex_lock(&s->lock);
    s->stop = 1;
    pthread_mutex_unlock(&s->lock);
    wake(s->wake_fd);
}

int nflogd_upstreams_notes_fd(struct nflogd_upstreams *s)
{
    return s->notes_fd;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

/* The (group, node) of a note: the header's group field and the node after the header. */
static uint32_t key_hash(const uint8_t *note, uint32_t len)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (uint32_t i = 0; i < len; i++)
        if (i == 6 + 2 || i == 7 + 2 || i >= HEADER_SIZE + 2)
            h = (h ^ note[i]) * 16777619u;
    return h;
}

static int same_key(const uint8_t *a, const uint8_t *b)
{
    uint16_t la = get16(a), lb = get16(b);
    return la == lb && !memcmp(a + 2 + 6, b + 2 + 6, 2)
           && !memcmp(a + 2 + HEADER_SIZE, b + 2 + HEADER_SIZE, la - HEADER_SIZE);
}

/* The notes of u's last pass into the table, in place of the earlier ones of their (group,
 * node) and kind; the caller holds the lock. Not a daemon's header: not noted. */
static void keep_notes(struct nflogd_upstreams *s, struct nflogd_upstream *u, uint64_t when)
{
    for (uint32_t i = 0; i < u->notes; i++) {
        const uint8_t *n = u->note[i];
        uint32_t len = get16(n);
        if (len < HEADER_SIZE || memcmp(n + 2, "NFLD", 4))
            continue;
        uint32_t count;
        memcpy(&count, n + 2 + 8, 4); /* little-endian on the wire, as on every host nflogd runs */
        int kind = count == 0;
        uint32_t at = key_hash(n, len + 2) % NOTE_SLOTS;
        struct slot_notes *e = &s->notes[at];
        while (e->used) {
            const uint8_t *old = e->kind[0].seq ? e->kind[0].note : e->kind[1].note;
            if (same_key(old, n))
                break;
            at = (at + 1) % NOTE_SLOTS;
            e = &s->notes[at];
        }
        if (!e->used) {
            if (s->used == NFLOGD_NOTED_MAX) {
                s->notes_dropped++;
                continue;
            }
            e->used = 1;
            s->used++;
        }
        e->kind[kind].when = when;
        e->kind[kind].seq = ++s->seq;
        memcpy(e->kind[kind].note, n, NFLOGD_NOTE_SIZE);
    }
    if (s->used >= NFLOGD_NOTED_MAX / 2 && !s->signalled) {
        s->signalled = 1;
        wake(s->notes_fd);
    }
}

uint32_t nflogd_upstreams_take_notes(struct nflogd_upstreams *s, uint8_t *out, uint32_t max)
{
    if (max < 2 * NFLOGD_NOTED_MAX)
        return 0;
    pthread_mutex_lock(&s->lock);
    uint32_t n = 0;
    for (uint32_t at = 0; at < NOTE_SLOTS && s->used; at++) {
        struct slot_notes *e = &s->notes[at];
        if (!e->used)
            continue;
        for (int k = 0; k < 2; k++) {
            if (!e->kind[k].seq)
                continue;
            uint8_t *o = out + (size_t)n++ * NFLOGD_TAKEN_NOTE_SIZE;
            memcpy(o, &e->kind[k].when, 8);
            memcpy(o + 8, &e->kind[k].seq, 8);
            memcpy(o + 16, e->kind[k].note, NFLOGD_NOTE_SIZE);
        }
        memset(e, 0, sizeof(*e));
        s->used--;
    }
    if (s->signalled && s->used < NFLOGD_NOTED_MAX / 2) {
        uint64_t v;
        ssize_t rc = read(s->notes_fd, &v, sizeof(v));
        (void)rc;
        s->signalled = 0;
    }
    pthread_mutex_unlock(&s->lock);
    return n;
}

uint64_t nflogd_upstreams_notes_dropped(struct nflogd_upstreams *s)
{
    return __atomic_load_n(&s->notes_dropped, __ATOMIC_RELAXED);
}

uint64_t nflogd_upstreams_errors(struct nflogd_upstreams *s)
{
    return __atomic_load_n(&s->errors, __ATOMIC_RELAXED);
}

/* One turn over the members that are pending: 1 if it read a message, with *backlog set if
 * one stopped at its burst. The caller holds the lock. */
static int turn(struct nflogd_upstreams *s, struct nflogd_feed *f, int *backlog)
{
    int read = 0;
    uint64_t when = 0;
    for (uint32_t i = 0; i < s->nslots; i++) {
        struct nflogd_upstream *u = s->slot[i];
        if (!u || !u->pending || u->broken)
            continue;
        uint64_t before = u->messages;
        int rc = nflogd_upstream_pass(u, f, NFLOGD_NOTES_MAX);
        if (u->notes) {
            if (!when)
                when = now_ns();
            keep_notes(s, u, when);
        }
        read |= u->messages != before;
        u->pending = rc == 1;
        *backlog |= rc == 1;
        if (rc < 0) {
            u->broken = 1;
            __atomic_add_fetch(&s->errors, 1, __ATOMIC_RELAXED);
        }
    }
    return read;
}

int nflogd_upstreams_run(struct nflogd_upstreams *s, struct nflogd_feed *f)
{
    int steady = 0, backlog = 0, lazy = 0, tries = 0;
    uint64_t sent = 0; /* the bytes written to the readers, as the last retry saw them */
    pthread_setname_np(pthread_self(), "nflogd-upstream"); /* for top, perf and the profile */
    for (;;) {
        if (steady && !lazy) { /* more are likely on their way: let them gather, then take all at once */
            struct timespec ts = { s->gather_us / 1000000, (long)(s->gather_us % 1000000) * 1000 };
            nanosleep(&ts, NULL);
        }
        /* a reader's full socket: until it is writable again, or a while to count it stalled */
        struct epoll_event evs[64];
        int n = epoll_wait(s->epfd, evs, 64, steady || backlog ? 0 : lazy ? LAZY_WAIT_MS : -1);
        if (n < 0 && errno != EINTR)
            return -errno;
        pthread_mutex_lock(&s->lock);
        if (s->stop) {
            pthread_mutex_unlock(&s->lock);
            nflogd_feed_flush_lazy(f, 1, &sent); /* what is left is the control loop's */
            return 0;
        }
        for (int j = 0; j < n; j++) {
            uint32_t i = evs[j].data.u32;
            if (i == UINT32_MAX) {
                uint64_t v;
                ssize_t rc = read(s->wake_fd, &v, sizeof(v));
                (void)rc;
            } else if (i < s->nslots && s->slot[i]) {
                s->slot[i]->pending = 1;
            } /* else PEERS_WRITABLE: flushed below */
        }
        backlog = 0;
        int read = turn(s, f, &backlog);
        pthread_mutex_unlock(&s->lock);
        if (read || lazy) { /* what the readers' sockets did not take: retried a while, then the loop's */
            uint64_t before = sent; /* progress: this turn's sends and this retry's, every reader's */
            lazy = nflogd_feed_flush_lazy(f, tries >= LAZY_TRIES, &sent);
            tries = lazy && sent == before ? tries + 1 : 0;
        }
        steady = read && !backlog && s->gather_us;
    }
}
