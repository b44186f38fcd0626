/* The feed in C (_feed.c): a group's batches read by the capture (_nflog.h) straight onto
 * the feed's own peers (_peers.h). It reads from the capture and
 * writes to the peers; neither calls it.
 *
 * Also part of the CFFI cdef (ffi_build.py reads it): fixed-width types, no includes but the
 * guarded ones it drops.
 */
#ifndef NFLOGD_FEED_H
#define NFLOGD_FEED_H

#include <stdint.h>

struct nflogd_reader;
struct nflogd_peers;

/* The feed: its own peers, shared by the capture threads
 * (nflogd_pump) and the control thread, which holds nflogd_feed_lock() for every use of
 * them (_feed.c, _peers.c). */
struct nflogd_feed;

struct nflogd_feed *nflogd_feed_new(uint64_t epoch);
void nflogd_feed_free(struct nflogd_feed *f);
void nflogd_feed_lock(struct nflogd_feed *f);
void nflogd_feed_unlock(struct nflogd_feed *f);
/* Under the lock: the node name. */
int nflogd_feed_set_node(struct nflogd_feed *f, const char *node, uint32_t len);
/* Messages sent to the peers: the pumps' and nflogd_feed_forward's. */
uint64_t nflogd_feed_sent(struct nflogd_feed *f);
/* The feed's own peers (_peers.h). */
struct nflogd_peers *nflogd_feed_peers(struct nflogd_feed *f);
/* One message as a relay received it, its four frames (the topic 2 bytes, the group's), to
 * every peer subscribed to the group: the lock taken and given back around it (the caller
 * does not hold it). lazy_epfd >= 0: what a peer's socket does not take is queued for the
 * caller to retry with nflogd_feed_flush_lazy() when epoll lazy_epfd says it is writable, not
 * armed for the control loop (_peers.h); -1: armed for it. */
void nflogd_feed_forward(struct nflogd_feed *f, const uint8_t *topic, const uint8_t *header, uint32_t hlen,
                         const uint8_t *records, uint32_t rlen, const uint8_t *data, uint32_t dlen,
                         int lazy_epfd);
/* Retry what lazy forwards queued (peers_flush_lazy, the lock taken): how many peers still
 * have some; give_up: those are armed for the control loop instead. *sent_bytes: the bytes
 * written to every peer so far, after it (the caller's measure of progress). */
int nflogd_feed_flush_lazy(struct nflogd_feed *f, int give_up, uint64_t *sent_bytes);

/* Read r and send each batch on f (NULL: read and count only) as one wire-format message,
 * first_seq from r->feed_seq, until a read gets nothing within timeout_ms (-1: no end) or nflogd_wake()
 * was called (0), an overrun was counted (1: the caller warns and calls again), or an
 * error (-errno). Runs without the GIL. */
int nflogd_pump(struct nflogd_reader *r, struct nflogd_feed *f, int timeout_ms);

/* As nflogd_pump, but the wait for a batch has no end until one is sent (or sent is non-zero:
 * one was, before this call), and then a read that gets nothing within idle_ms returns 2: the
 * group went idle after traffic (time for its sequence mark). 0 when woken, 1 after an overrun,
 * -errno for an error. */
int nflogd_pump_until_idle(struct nflogd_reader *r, struct nflogd_feed *f, int idle_ms, int sent);

#endif
