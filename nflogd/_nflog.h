/* nflogd's capture in C (_nflog.c): one NFLOG group per netlink socket, a whole receive
 * buffer parsed per call. It calls nothing of the feed's (feed/_feed.h, feed/_peers.h),
 * which reads from it: data flows one way.
 *
 * This file is both the C header and part of the CFFI cdef (ffi_build.py reads it), so it
 * holds only declarations CFFI can parse: fixed-width types, integer #defines, no includes.
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
#define NFLOGD_F_CT               0x2000  /* NFULA_CT: a conntrack block in the data (ct_off) */
#define NFLOGD_F_VLAN             0x4000  /* NFULA_VLAN: vlan_tci, vlan_proto */
#define NFLOGD_F_L2HDR            0x8000  /* NFULA_L2HDR: the link-layer header in the data */

/* Bits of nflogd_ct.present: which conntrack attributes the kernel sent. */
#define NFLOGD_CT_INFO            0x0001  /* NFULA_CT_INFO */
#define NFLOGD_CT_ID              0x0002  /* CTA_ID */
#define NFLOGD_CT_MARK            0x0004  /* CTA_MARK */
#define NFLOGD_CT_STATUS          0x0008  /* CTA_STATUS */
#define NFLOGD_CT_ZONE            0x0010  /* CTA_ZONE */
#define NFLOGD_CT_ORIG            0x0020  /* CTA_TUPLE_ORIG */
#define NFLOGD_CT_REPLY           0x0040  /* CTA_TUPLE_REPLY */
#define NFLOGD_CT_LABELS          0x0080  /* CTA_LABELS */
#define NFLOGD_CT_TIMEOUT         0x0100  /* CTA_TIMEOUT */

/* One direction of a connection (CTA_TUPLE_ORIG / CTA_TUPLE_REPLY), 40 bytes. */
struct nflogd_ct_tuple {
    uint8_t  src[16];      /* CTA_IP_V4_SRC (first 4 bytes) or CTA_IP_V6_SRC, network order */
    uint8_t  dst[16];
    uint16_t sport;        /* CTA_PROTO_SRC_PORT, host order */
    uint16_t dport;        /* CTA_PROTO_DST_PORT */
    uint16_t icmp_id;      /* CTA_PROTO_ICMP_ID / ICMPV6_ID */
    uint8_t  icmp_type;    /* CTA_PROTO_ICMP_TYPE / ICMPV6_TYPE */
    uint8_t  icmp_code;    /* CTA_PROTO_ICMP_CODE / ICMPV6_CODE */
};

/* The packet's connection (NFULA_CT, NFULA_CT_INFO), 128 bytes in the data frame at the
 * record's ct_off: the wire format's conntrack block (wire.CT). */
struct nflogd_ct {
    uint16_t present;      /* NFLOGD_CT_* */
    uint8_t  family;       /* the tuples' address family: 2 AF_INET, 10 AF_INET6 */
    uint8_t  proto;        /* the original tuple's CTA_PROTO_NUM */
    uint32_t info;         /* NFULA_CT_INFO: enum ip_conntrack_info */
    uint32_t id;           /* CTA_ID */
    uint32_t mark;         /* CTA_MARK */
    uint32_t status;       /* CTA_STATUS: IPS_* bits */
    uint32_t timeout;      /* CTA_TIMEOUT, seconds */
    uint16_t zone;         /* CTA_ZONE */
    uint16_t reserved;
    uint8_t  labels_len;   /* bytes of labels used, 0..16 */
    uint8_t  reserved2[3];
    struct nflogd_ct_tuple orig;
    struct nflogd_ct_tuple reply;
    uint8_t  labels[16];   /* CTA_LABELS, a bit field */
};

/* One packet, exactly the wire format's little-endian record: the 72 bytes of version 1
 * (wire.RECORD) and the 16 of its extension (wire.RECORD_EXT), 88 bytes. */
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
    /* The extension (record_size 88). */
    uint32_t ct_off;       /* the conntrack block's offset in the batch data */
    uint16_t ct_len;       /* its bytes: sizeof(struct nflogd_ct) */
    uint16_t l2hdr_len;    /* bytes of NFULA_L2HDR */
    uint32_t l2hdr_off;    /* its offset in the batch data */
    uint16_t vlan_tci;     /* NFULA_VLAN_TCI, host order */
    uint16_t vlan_proto;   /* NFULA_VLAN_PROTO: 0x8100, 0x88a8 */
};

/* A reader of one group. Buffers are owned by the C side (nflogd_reader_new/free). */

/* The bytes in front of a reader's records and data that are not theirs: the feed's scratch
 * (_peers.c puts a CURVE frame's flags byte there and boxes [flags || frame] from where the frame
 * lies, with no copy). Keeps the buffers' alignment. */
#define NFLOGD_HEADROOM 16

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

    /* The interface names of the reader's namespace (nflogd_set_ifnames) and what the last
     * batch carries: batch_flags is the wire header's flags (NFLOGD_FLAG_IFNAMES: the
     * data ends with the names of the batch's interfaces). */
    struct nflogd_ifnames *ifnames;
    uint8_t batch_flags;
};

/* Header flags (wire.HEADER's flags). */
#define NFLOGD_FLAG_IFNAMES 0x01
/* Interfaces whose names one batch carries, at most. */
#define NFLOGD_IFNAMES_PER_BATCH 256

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
 * conntrack 1 asks for each packet's connection (NFULNL_CFG_F_CONNTRACK): -EOPNOTSUPP
 * where the kernel has no conntrack netlink, -EAGAIN when it just loaded it (try again).
 * Returns 0 or -errno (EPERM: group busy or no CAP_NET_ADMIN). */
int nflogd_configure(struct nflogd_reader *r, int bind, uint32_t copy_range, uint32_t qthresh,
                     uint32_t timeout_cs, uint32_t nlbufsiz, int conntrack);

/* Unbind the group (NFULNL_CFG_CMD_UNBIND); 0 or -errno. */
int nflogd_unbind(struct nflogd_reader *r);

/* Wait up to timeout_ms (0: don't wait, -1: forever) for a kernel batch, receive it and any
 * the kernel queued behind it (up to 4 receive buffers), and parse every message into
 * records. Returns the record count (0: nothing arrived, a buffer without packets, or
 * nflogd_wake()), -ENOBUFS after an overrun before anything was read (counted; one later in
 * the call is counted and the records go out), or another -errno. The GIL is released. */
int nflogd_read(struct nflogd_reader *r, int timeout_ms);

/* Parse one receive buffer of kernel messages (what recv() on the group's socket gives)
 * into the batch, as nflogd_read() does, without reading: the record count, or -EMSGSIZE
 * for more than a receive buffer. For tests and fuzzing of the parser with kernel bytes. */
int nflogd_parse(struct nflogd_reader *r, const char *buf, uint32_t len);

/* The interface names of the reader's namespace, for the names trailer of its batches:
 * count entries of (ifindex u32 little-endian, name_len u8, name) in blob, sorted by
 * ifindex; replaces the table (thread-safe against a capture thread's nflogd_read()).
 * count 0 turns the trailer off. 0 or -errno. */
int nflogd_set_ifnames(struct nflogd_reader *r, const uint8_t *blob, uint32_t len, uint32_t count);

/* End the wait of an nflogd_read() in another thread (it returns 0); 0 or -errno. */
int nflogd_wake(struct nflogd_reader *r);
