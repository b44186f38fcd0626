/* The feed's own peers (_peers.c): sockets nflogd writes itself once the server
 * (nflogd/feed/server.py) has done their handshake. Every call under the feed's lock
 * (nflogd_feed_lock, _feed.h); id is a peer's slot.
 *
 * The part above "C only" is also part of the CFFI cdef (ffi_build.py reads it): fixed-width
 * types, no includes but the guarded ones it drops.
 */
#ifndef NFLOGD_PEERS_H
#define NFLOGD_PEERS_H

#include <stdint.h>
#include <sys/uio.h>

struct nflogd_peers;
/* The epoll on which a peer with queued messages is armed for EPOLLOUT (the peer's fd must
 * be in it, for EPOLLIN | EPOLLRDHUP, with data.fd the fd), and an eventfd written when a peer begins to
 * drop messages (-1: none); what a peer may queue: hwm messages. */
void nflogd_peers_set_poll(struct nflogd_peers *ps, int epfd, int wake_fd);
void nflogd_peers_set_hwm(struct nflogd_peers *ps, uint32_t hwm);
/* The bytes every peer's queue may hold together (a message queued for several peers counts
 * once); past them a new message is dropped for a peer that would queue it. */
void nflogd_peers_set_max_bytes(struct nflogd_peers *ps, uint64_t max_bytes);
/* Bytes queued now, every peer; messages dropped because of max_bytes since the start. */
uint64_t nflogd_peers_queued_bytes(struct nflogd_peers *ps);
uint64_t nflogd_peers_full_dropped(struct nflogd_peers *ps);
/* A peer whose handshake is done (nothing else may write fd from now on): its id, or -errno. */
int nflogd_peers_add(struct nflogd_peers *ps, int fd);
/* The peer speaks CURVE (spec 26): every frame it gets from now on is a MESSAGE boxed with key
 * (crypto_box_beforenm of its short-term key and ours, 32 bytes), nonce the next short nonce
 * (it grows by one per frame). 0 or -errno. */
int nflogd_peers_set_curve(struct nflogd_peers *ps, int id, const uint8_t *key, uint64_t nonce);
/* The next short nonce of a CURVE peer (0: not CURVE), for tests. */
uint64_t nflogd_peers_nonce(struct nflogd_peers *ps, int id);
/* Forget the peer and its queue (then the caller closes fd). */
void nflogd_peers_remove(struct nflogd_peers *ps, int id);
/* What the peer gets: every group (all), the groups whose high byte has its bit in the
 * 32 bytes of prefix (1-byte topics), the groups whose bit is set in the 8192 bytes of
 * exact (2-byte topics; NULL: none). 0 or -errno. */
int nflogd_peers_filter(struct nflogd_peers *ps, int id, int all, const uint8_t *prefix, const uint8_t *exact);
/* Write what the peer has queued: 1 all written, 0 its socket is full, -errno it failed
 * (a failed peer is armed for EPOLLOUT so that its next flush says so). */
int nflogd_peers_flush(struct nflogd_peers *ps, int id);
/* A ZMTP command frame (a PONG) to the peer, after what it has queued: 1 written or
 * queued, 0 dropped (hwm queued), -errno. */
int nflogd_peers_command(struct nflogd_peers *ps, int id, const uint8_t *frame, uint32_t len);
/* A message of nframes (1..4) frames to one peer, as the feed's messages go (boxed for a CURVE
 * peer; dropped and counted at its hwm or the cap): a filter's reply, or what the relay passes
 * on for a topic only its readers know. 1 written or queued, 0 or 2 dropped, -errno. */
int nflogd_peers_message(struct nflogd_peers *ps, int id, const uint8_t *f0, uint32_t l0, const uint8_t *f1,
                         uint32_t l1, const uint8_t *f2, uint32_t l2, const uint8_t *f3, uint32_t l3, int nframes);
/* The peer's filter (spec: a filter of _filter.h, len bytes; NULL: none), in place of the
 * one it had: from now on each of its messages holds only the records the filter passed,
 * numbered by that filter. The filter's slot, or -EINVAL with a one-line reason in why (the
 * peer keeps its old filter), or -ENOENT. */
int nflogd_peers_set_filter(struct nflogd_peers *ps, int id, const uint8_t *spec, uint32_t len, char *why,
                            uint32_t whylen);
/* The topic of the peer's filtered messages: topic (NFLOGD_FILTERED_TOPIC bytes, "\xffNFLG" and
 * its filter's 8-byte id) followed by the group's 2, for a peer that subscribed to its groups
 * in that form; NULL: the group's topic alone. -ENOENT for no such peer. */
int nflogd_peers_set_filter_topic(struct nflogd_peers *ps, int id, const uint8_t *topic);
int nflogd_peers_filter_slot(struct nflogd_peers *ps, int id);
/* The filters the peers hold (_filter.h), for the metrics. */
struct nflogd_filters;
struct nflogd_filters *nflogd_peers_filters(struct nflogd_peers *ps);
/* How long a filter's run goes on once no peer holds it (publish.filter_linger_ms). */
void nflogd_peers_set_filter_linger(struct nflogd_peers *ps, uint32_t ms);
/* Bytes written to the peers so far. */
uint64_t nflogd_peers_sent_bytes(struct nflogd_peers *ps);
/* Messages dropped (hwm reached) and queued now, of peer id, or of every peer (id -1). */
uint64_t nflogd_peers_dropped(struct nflogd_peers *ps, int id);
uint64_t nflogd_peers_queued(struct nflogd_peers *ps, int id);
/* The packets in the messages every peer has queued (a message partly written counts whole). */
uint64_t nflogd_peers_queued_packets(struct nflogd_peers *ps);
/* One message, its four frames, to every peer subscribed to group (publish() from Python). */
void nflogd_peers_send(struct nflogd_peers *ps, uint16_t group, const uint8_t *topic, uint32_t tlen,
                       const uint8_t *header, uint32_t hlen, const uint8_t *records, uint32_t rlen,
                       const uint8_t *data, uint32_t dlen);

/* -- C only (not in the CFFI cdef): the feed's side (_feed.c), under its mutex -- */

struct nflogd_peers *peers_new(uint64_t epoch);
void peers_free(struct nflogd_peers *ps);
/* One message, the wire format's four frames, to every peer subscribed to group. spare: a bit
 * per frame (1 << i) whose byte in front of iov_base is the feed's to write (NFLOGD_HEADROOM,
 * _nflog.h): a CURVE peer's box is made from the frame where it lies, with no copy. */
void peers_send(struct nflogd_peers *ps, uint16_t group, const struct iovec frames[4], unsigned spare);
/* epfd >= 0: what the sends from now on queue is not armed for EPOLLOUT on the control loop's
 * epoll but, once (EPOLLONESHOT, data.u32 PEERS_WRITABLE), on epfd: its sender, which sends
 * again soon, retries it with peers_flush_lazy() (the relay's upstreams' thread: a wake-up of
 * the control loop per burst cost more than passing the burst on); -1: as before. */
#define PEERS_WRITABLE 0xfffffffe
void peers_set_lazy(struct nflogd_peers *ps, int epfd);
/* Write what the lazy sends queued; a peer whose socket is still full is armed on the lazy
 * sender's epoll again, or on the control loop's if give_up. How many are left to retry. */
int peers_flush_lazy(struct nflogd_peers *ps, int give_up);

#endif
