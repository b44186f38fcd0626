/* The relay's upstream reader in C (_upstream.c): the messages an upstream's libzmq socket has
 * received, straight onto the feed (_feed.h), no Python per message.
 *
 * Also part of the CFFI cdef (ffi_build.py reads it): fixed-width types, no includes but the
 * guarded ones it drops.
 */
#ifndef NFLOGD_UPSTREAM_H
#define NFLOGD_UPSTREAM_H

#include <stdint.h>

struct nflogd_feed;

/* Headers of forwarded messages one nflogd_upstream_pass() keeps for the caller (the relay's
 * sequence marks): at most this many, each NFLOGD_NOTE_SIZE bytes (2 of length, then the
 * header frame, a wire header and a node name of up to 255 bytes; a longer one is not kept). */
#define NFLOGD_NOTES_MAX 64
#define NFLOGD_NOTE_SIZE 298

/* Take libzmq's functions from the already loaded object at path (pyzmq's extension module:
 * dlsym on its handle finds the libzmq it uses, bundled, the system's, or linked in), so that
 * the sockets pyzmq made are read through the library that made them. 0, or -1 with the
 * reason in why (NUL-terminated). Before nflogd_upstream_new(); a failed call changes nothing. */
int nflogd_zmq_load(const char *path, char *why, uint32_t whylen);

/* One upstream: the libzmq socket at sock (pyzmq's Socket.underlying; the caller keeps it
 * open until nflogd_upstream_clear() or nflogd_upstream_free()). filtered: a filter's connection, whose messages on a
 * topic beginning "\xffNFL" are handed back and all others dropped, uncounted. keep: every
 * message forwarded is handed back too (the relay's stream publisher takes a copy). */
struct nflogd_upstream;
struct nflogd_upstream *nflogd_upstream_new(uintptr_t sock, int filtered, int keep);
void nflogd_upstream_free(struct nflogd_upstream *u);
/* The message it holds let go (its counters stay): before its socket closes. */
void nflogd_upstream_clear(struct nflogd_upstream *u);

/* Read up to burst messages without waiting and pass each with four frames and a 2-byte topic
 * (a group's) to f's peers, as nflogd_feed_forward() does. Returns 0 when the socket has
 * nothing more, 1 when burst messages were read (more may be there), 2 when one is held for
 * the caller (nflogd_upstream_held: a message nflogd_upstream_held_forwarded() says was
 * forwarded, handed back for keep, or one of one to four frames that C does not forward: a
 * filter's, or one the caller counts unmatched), -errno if libzmq failed. A message of more
 * than four frames goes nowhere (counted in nflogd_upstream_unsent). The held message is
 * released by the next call. */
int nflogd_upstream_pass(struct nflogd_upstream *u, struct nflogd_feed *f, uint32_t burst);

/* The held message: its frames (1 to 4), frame i's bytes and length. */
uint32_t nflogd_upstream_held(struct nflogd_upstream *u);
const uint8_t *nflogd_upstream_frame(struct nflogd_upstream *u, uint32_t i, uint32_t *len);
int nflogd_upstream_held_forwarded(struct nflogd_upstream *u);

/* The last pass's notes: how many, and where (NFLOGD_NOTE_SIZE bytes each). */
uint32_t nflogd_upstream_notes(struct nflogd_upstream *u, const uint8_t **notes);

/* Messages read and passed on or handed back, their bytes (every frame), and messages of more
 * than four frames dropped. */
uint64_t nflogd_upstream_messages(struct nflogd_upstream *u);
uint64_t nflogd_upstream_bytes(struct nflogd_upstream *u);
uint64_t nflogd_upstream_unsent(struct nflogd_upstream *u);

/* Upstreams read by a thread of their own: nflogd_upstreams_run() waits on their sockets'
 * ZMQ_FDs and passes each one's messages (nflogd_upstream_pass, with a burst of
 * NFLOGD_NOTES_MAX) to the feed, without the GIL; after a turn that read messages and emptied
 * the queues it sleeps gather_us, so that a steady trickle is read in batches. Its members
 * never hand a message back: they are neither filtered nor kept. The headers of the messages
 * forwarded are kept, with the time they were read, for the caller to take
 * (nflogd_upstreams_take_notes): the last of each (group, node) with packets and its last
 * mark, for at most NFLOGD_NOTED_MAX (group, node)s between takes; the notes fd is readable
 * once half of them are. What a reader's socket does not take is queued and watched for
 * EPOLLOUT on the thread's own epoll, and written by the thread; after 250 tries in a row
 * (some half a second) in which no reader took anything, it is armed for the control loop
 * (_peers.h, peers_set_lazy).
 *
 * A member's socket is the thread's: any other use of it (a send, a connect, monitoring on
 * or off) holds nflogd_upstreams_lock() and is followed by nflogd_upstreams_recheck(), still
 * holding it, since the use may have taken in what its ZMQ_FD would have signalled. */
#define NFLOGD_NOTED_MAX 1024
#define NFLOGD_TAKEN_NOTE_SIZE 314 /* 16 + NFLOGD_NOTE_SIZE */
struct nflogd_upstreams;
struct nflogd_upstreams *nflogd_upstreams_new(uint32_t gather_us);
void nflogd_upstreams_free(struct nflogd_upstreams *s);
void nflogd_upstreams_lock(struct nflogd_upstreams *s);
void nflogd_upstreams_unlock(struct nflogd_upstreams *s);
/* Under the lock: u (not filtered, not kept) joins, its socket's ZMQ_FD zmq_fd; 0 or -errno. */
int nflogd_upstreams_add(struct nflogd_upstreams *s, struct nflogd_upstream *u, int zmq_fd);
/* Under the lock: u leaves; the thread does not touch it again. */
void nflogd_upstreams_remove(struct nflogd_upstreams *s, struct nflogd_upstream *u);
/* Under the lock: u is read on the thread's next turn. */
void nflogd_upstreams_recheck(struct nflogd_upstreams *s, struct nflogd_upstream *u);
/* The thread: 0 after nflogd_upstreams_stop(), -errno if its epoll failed. A member whose read
 * fails (libzmq) is left alone from then on, counted in nflogd_upstreams_errors(). */
int nflogd_upstreams_run(struct nflogd_upstreams *s, struct nflogd_feed *f);
void nflogd_upstreams_stop(struct nflogd_upstreams *s);
int nflogd_upstreams_notes_fd(struct nflogd_upstreams *s);
/* Every note kept into out, which has room for 2 * NFLOGD_NOTED_MAX (less: none is taken),
 * NFLOGD_TAKEN_NOTE_SIZE bytes each: the CLOCK_MONOTONIC nanoseconds it was read at and its
 * place in the order they were read in (8 bytes each, native byte order), then the note; how
 * many. A (group, node) past NFLOGD_NOTED_MAX was not noted: nflogd_upstreams_notes_dropped(). */
uint32_t nflogd_upstreams_take_notes(struct nflogd_upstreams *s, uint8_t *out, uint32_t max);
uint64_t nflogd_upstreams_notes_dropped(struct nflogd_upstreams *s);
/* Errors of libzmq while reading members (a member whose read failed is not read again). */
uint64_t nflogd_upstreams_errors(struct nflogd_upstreams *s);

#endif
