/* nflogd's C side: one NFLOG group per netlink socket, a whole receive buffer parsed per call.
 *
 * This file is both the C header and the CFFI cdef (ffi_build.py reads it), so it holds
 * only declarations CFFI can parse: fixed-width types, integer #defines, no includes.
 */

/* Bits of nflogd_record.present; the wire format's F_* (docs/wire-format.md). */
#define NFLOGD_F_TS_KERNEL        0x0001
#define NFLOGD_F_MARK             0x0002
#define NFLOGD_F_INDEV            0x0004
#define NFLOGD_F_OUTDEV           0x0008
#define NFLOGD_F_PHYSINDEV        0x0010
#define NFLOGD_F_PHYSOUTDEV       0x0020
#define NFLOGD_F_UID              0x0040
#define NFLOGD_F_GID              0x0080
#define NFLOGD_F_KSEQ             0x0100
#define NFLOGD_F_PREFIX           0x0200
#define NFLOGD_F_HWADDR           0x0400
#define NFLOGD_F_PAYLOAD          0x0800
#define NFLOGD_F_LEN_FROM_HEADER  0x1000

/* One packet, exactly the wire format's 72-byte little-endian record (wire.RECORD). */
struct nflogd_record {
    uint64_t ts_ns;        /* NFULA_TIMESTAMP, else the receive time */
    uint32_t data_off;     /* payload's offset in the batch data */
    uint32_t caplen;       /* bytes of NFULA_PAYLOAD */
    uint32_t len;          /* real length, from the IPv4/IPv6 header where captured */
    uint32_t mark;         /* NFULA_MARK */
    uint32_t indev;        /* NFULA_IFINDEX_INDEV */
    uint32_t outdev;       /* NFULA_IFINDEX_OUTDEV */
    uint32_t physindev;    /* NFULA_IFINDEX_PHYSINDEV */
    uint32_t physoutdev;   /* NFULA_IFINDEX_PHYSOUTDEV */
    uint32_t uid;          /* NFULA_UID */
    uint32_t gid;          /* NFULA_GID */
    uint32_t kernel_seq;   /* NFULA_SEQ */
    uint32_t prefix_off;   /* NFULA_PREFIX's offset in the batch data, without its NUL */
    uint16_t prefix_len;
    uint16_t hw_protocol;  /* nfulnl_msg_packet_hdr.hw_protocol, host order; from the family if 0 */
    uint16_t present;      /* NFLOGD_F_* */
    uint8_t  hwaddr_len;
    uint8_t  hook;         /* nfulnl_msg_packet_hdr.hook */
    uint8_t  hwaddr[8];    /* nfulnl_msg_packet_hw.hw_addr */
};

/* A reader of one group. Buffers are owned by the C side (nflogd_reader_new/free). */
struct nflogd_reader {
    int fd;
    int wake_fd;                /* eventfd: nflogd_wake() ends nflogd_read()'s wait */
    uint16_t group;
    uint32_t portid;

    /* The last batch: records[0..count) and data[0..data_len). Valid until the next read. */
    struct nflogd_record *records;
    uint32_t count;
    char *data;
    uint32_t data_len;
    uint64_t batch_bytes;       /* sum of the real lengths */
    uint32_t batch_truncated;   /* records with caplen < len */

    /* Totals since the bind. */
    uint64_t packets;           /* records read */
    uint64_t bytes;             /* their real lengths */
    uint64_t truncated;         /* records with caplen < len */
    uint64_t lost;              /* packets missing from NFULA_SEQ gaps */
    uint64_t overflows;         /* ENOBUFS events */
    uint64_t truncated_msgs;    /* receive buffers the kernel sent larger than ours (MSG_TRUNC) */
    uint64_t buffers;           /* receive buffers (kernel batches) read */
    int last_error;             /* errno of the last NLMSG_ERROR the kernel sent us, 0 if none */

    /* The feed (nflogd_pump): the next message's first_seq, and kernel drops of earlier
     * readers of this group that the feed's cumulative kernel_dropped includes. */
    uint64_t feed_seq;
    uint64_t dropped_base;
    int woken;                  /* set by nflogd_wake(): nflogd_pump() returns */
    struct nflogd_pool *pool;   /* data buffers lent to ZeroMQ with a message (_feed.c) */

    /* Sequence tracking and internals. */
    uint32_t qthresh;           /* as configured: a buffer this full likely has more behind it */
    uint32_t nlbufsiz;
    int idle;                   /* the last read found the queue empty, or a timer's batch */
    uint32_t next_seq;
    int pending;                /* records parsed while waiting for an ack, not yet handed out */
    uint32_t nl_seq;
    char *rxbuf;
    uint32_t rxbuf_size;
    uint32_t max_records;
    uint32_t data_cap;
    void *nl;                   /* struct mnl_socket * */
    int meta_only;              /* copy_range 0: the kernel copies NFLOGD_META_BYTES, we publish none */
};

/* A metadata-only group (copy_range 0) asks the kernel for this many bytes of each packet:
 * enough for the length field of an IPv4 (tot_len, bytes 2-3) or IPv6 header (payload_len,
 * bytes 4-5). The records get the real length from it and no payload (caplen 0). */
#define NFLOGD_META_BYTES 8

/* Allocate a reader and open its netlink socket; NULL with errno set on failure. */
struct nflogd_reader *nflogd_reader_new(uint16_t group);
void nflogd_reader_free(struct nflogd_reader *r);

/* Set SO_RCVBUFFORCE (falling back to SO_RCVBUF); 0 or -errno. */
int nflogd_set_rcvbuf(struct nflogd_reader *r, int bytes);

/* Bind the group and configure it in one NFULNL_MSG_CONFIG message, waiting for the ack;
 * bind=0 only reconfigures an already bound group, without waiting (a kernel error for it
 * shows in last_error). copy_range 0 publishes metadata only (caplen 0) with each packet's
 * real length, read from its first NFLOGD_META_BYTES bytes. timeout_cs is in 1/100 s.
 * Returns 0 or -errno (EPERM: group busy or no CAP_NET_ADMIN). */
int nflogd_configure(struct nflogd_reader *r, int bind, uint32_t copy_range, uint32_t qthresh,
                     uint32_t timeout_cs, uint32_t nlbufsiz);

/* Unbind the group (NFULNL_CFG_CMD_UNBIND); 0 or -errno. */
int nflogd_unbind(struct nflogd_reader *r);

/* Wait up to timeout_ms (0: don't wait, -1: forever) for a kernel batch, receive it and any
 * the kernel queued behind it (up to 4 receive buffers), and parse every message into
 * records. Returns the record count (0: nothing arrived, a buffer without packets, or
 * nflogd_wake()), -ENOBUFS after an overrun before anything was read (counted; one later in
 * the call is counted and the records go out), or another -errno. The GIL is released. */
int nflogd_read(struct nflogd_reader *r, int timeout_ms);

/* End the wait of an nflogd_read() in another thread (it returns 0); 0 or -errno. */
int nflogd_wake(struct nflogd_reader *r);

/* Let go of r's pool of data buffers (at the reader's end): buffers ZeroMQ still holds
 * are freed when it is done with them. */
struct nflogd_pool;
void nflogd_pool_release(struct nflogd_pool *pool);

/* The feed: its own peers and pyzmq's XPUB sockets, shared by the capture threads
 * (nflogd_pump) and the control thread, which holds nflogd_feed_lock() for every use of
 * them (_feed.c, _peers.c). */
struct nflogd_feed;

/* Take the libzmq functions the feed needs from the library at path, which pyzmq must
 * have loaded already (never a second copy); its version in *major.*minor.*patch.
 * 0, -ENOENT (not loaded) or -ENOSYS (a function missing). */
int nflogd_zmq_load(const char *path, int *major, int *minor, int *patch);

struct nflogd_feed *nflogd_feed_new(uint64_t epoch);
void nflogd_feed_free(struct nflogd_feed *f);
void nflogd_feed_lock(struct nflogd_feed *f);
void nflogd_feed_unlock(struct nflogd_feed *f);
/* Both under the lock: the sockets (libzmq's void *; NULL for none), the node name. */
int nflogd_feed_set_sockets(struct nflogd_feed *f, void *first, void *second);
int nflogd_feed_set_node(struct nflogd_feed *f, const char *node, uint32_t len);
uint64_t nflogd_feed_sent(struct nflogd_feed *f);
uint64_t nflogd_feed_unsent(struct nflogd_feed *f);
/* Under the lock: the control loop is about to wait for events. A send that finds a
 * socket with incoming messages afterwards writes 1 to the eventfd fd (once): the send took
 * the ZMQ_FD wake-up the loop would have had. */
void nflogd_feed_wake_on_incoming(struct nflogd_feed *f, int fd);

/* The feed's own peers: sockets nflogd writes itself once nflogd/zmtp.py has done their
 * handshake (_peers.c). Every call under the feed's lock; id is a peer's slot. */
struct nflogd_peers;
struct nflogd_peers *nflogd_feed_peers(struct nflogd_feed *f);
/* The epoll on which a peer with queued messages is armed for EPOLLOUT (the peer's fd must
 * be in it, for EPOLLIN, with data.fd the fd), and an eventfd written when a peer begins to
 * drop messages (-1: none); what a peer may queue: hwm messages. */
void nflogd_peers_set_poll(struct nflogd_peers *ps, int epfd, int wake_fd);
void nflogd_peers_set_hwm(struct nflogd_peers *ps, uint32_t hwm);
/* A peer whose handshake is done (nothing else may write fd from now on): its id, or -errno. */
int nflogd_peers_add(struct nflogd_peers *ps, int fd);
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
/* Messages dropped (hwm reached) and queued now, of peer id, or of every peer (id -1). */
uint64_t nflogd_peers_dropped(struct nflogd_peers *ps, int id);
uint64_t nflogd_peers_queued(struct nflogd_peers *ps, int id);
/* The packets in the messages every peer has queued (a message partly written counts whole). */
uint64_t nflogd_peers_queued_packets(struct nflogd_peers *ps);
/* One message, its four frames, to every peer subscribed to group (publish() from Python). */
void nflogd_peers_send(struct nflogd_peers *ps, uint16_t group, const uint8_t *topic, uint32_t tlen,
                       const uint8_t *header, uint32_t hlen, const uint8_t *records, uint32_t rlen,
                       const uint8_t *data, uint32_t dlen);

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
