/* Between _feed.c and _peers.c: the capture threads' side of the feed's own peers (the
 * control loop's side is in _nflog.h). Under the feed's mutex. */
#ifndef NFLOGD_PEERS_H
#define NFLOGD_PEERS_H

#include <stdint.h>
#include <sys/uio.h>

struct nflogd_peers;
struct nflogd_peers *peers_new(void);
void peers_free(struct nflogd_peers *ps);
/* One message, the wire format's four frames, to every peer subscribed to group. */
void peers_send(struct nflogd_peers *ps, uint16_t group, const struct iovec frames[4]);

#endif
