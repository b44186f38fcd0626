/* Reader-stated filters, run at the daemon (_filter.c): a classic BPF program compiled by the
 * reader with libpcap on LINKTYPE_RAW, checked with libpcap's bpf_validate and run with its
 * bpf_filter on each record's captured bytes, and NFLOG metadata BPF cannot see (log prefix,
 * mark under a mask, uid, gid, input and output interface, hook). docs/filters.md has the
 * languages and limits, docs/wire-format.md ("Filters") the spec's bytes.
 *
 * Also part of the CFFI cdef (ffi_build.py reads it after _nflog.h, whose struct
 * nflogd_record it uses): fixed-width types, no includes but the guarded ones it drops. */
#ifndef NFLOGD_FILTER_H
#define NFLOGD_FILTER_H

#include <stdint.h>


/* The wire header's flags bit of a message that went through a reader's filter: it holds
 * only the records that filter passed, and first_seq numbers them (docs/wire-format.md). */
#define NFLOGD_WIRE_FILTERED 0x02
/* The topic of a filtered message to a reader that subscribed to its groups through its
 * filter: "\xffNFLG" and the filter's 8-byte id (wire.FILTERED_TOPIC), then the group's 2. */
#define NFLOGD_FILTERED_TOPIC 13

/* A spec: a fixed head of NFLOGD_FILTER_HEAD bytes, then prefix_len bytes of log prefix,
 * text_len bytes of text (the reader's expression, for metrics and logs), insns x 8 bytes of
 * BPF (code u16, jt u8, jf u8, k u32), all little-endian. */
#define NFLOGD_FILTER_VERSION 1
#define NFLOGD_FILTER_HEAD 32
#define NFLOGD_FILTER_MAX_INSNS 512
#define NFLOGD_FILTER_MAX_PREFIX 128
#define NFLOGD_FILTER_MAX_TEXT 255
/* Distinct filters the daemon runs at once (a bit each in a record's match mask). */
#define NFLOGD_FILTER_MAX 64

/* The head's match bits: which metadata predicates apply (all of them must hold). */
#define NFLOGD_FM_PREFIX        0x01  /* log prefix equal to the prefix */
#define NFLOGD_FM_PREFIX_START  0x02  /* log prefix beginning with the prefix */
#define NFLOGD_FM_MARK          0x04  /* (mark & mark_mask) == mark_value */
#define NFLOGD_FM_UID           0x08
#define NFLOGD_FM_GID           0x10
#define NFLOGD_FM_INDEV         0x20
#define NFLOGD_FM_OUTDEV        0x40
#define NFLOGD_FM_HOOK          0x80  /* the hook's bit set in hooks */

/* The distinct filters in use, each with its holders counted, shared by every peer that
 * states the same spec: a packet is tested once per distinct filter, whoever holds it. Each
 * is one run of its filter, with an epoch of its own after epoch (the daemon's) and every
 * earlier run's, which outlives its last holder by the linger (below). */
struct nflogd_filters;
struct nflogd_filters *nflogd_filters_new(uint64_t epoch);
void nflogd_filters_free(struct nflogd_filters *fs);
/* How long a run goes on, numbering the groups it was asked for, once nobody holds it
 * (publish.filter_linger_ms; 0: it ends with its last holder). */
void nflogd_filters_set_linger(struct nflogd_filters *fs, uint32_t ms);

/* Check a spec without keeping it: 0, or -1 with a one-line reason in why. */
int nflogd_filter_check(const uint8_t *spec, uint32_t len, char *why, uint32_t whylen);

/* Hold the filter of spec: its slot (0..NFLOGD_FILTER_MAX-1), the slot already running it if
 * another holder stated the same bytes or its run lingers (the run goes on); else a new run,
 * in a free slot or the one whose run was let go longest ago; -1 with a one-line reason in
 * why (a malformed spec, a program bpf_validate refuses or longer than
 * NFLOGD_FILTER_MAX_INSNS, every slot held). */
int nflogd_filters_hold(struct nflogd_filters *fs, const uint8_t *spec, uint32_t len, char *why, uint32_t whylen);
/* Let go of a slot; after its last holder the run lingers, then ends. */
void nflogd_filters_release(struct nflogd_filters *fs, int slot);
/* The slots whose runs number group (it was asked for since they began), held or lingering:
 * each batch of group goes through them, whoever is subscribed. */
uint64_t nflogd_filters_numbering(struct nflogd_filters *fs, uint16_t group);
/* The epoch of the slot's run: its messages carry it in place of the daemon's. */
uint64_t nflogd_filters_epoch(struct nflogd_filters *fs, int slot);

/* Run the filters whose slot bits are in want on records[0..count) (their payloads and
 * prefixes in data[0..data_len)): match[i] gets the bits of the filters record i passes.
 * Each filter's passed and dropped counters move on. */
void nflogd_filters_run(struct nflogd_filters *fs, uint64_t want, const struct nflogd_record *records,
                        uint32_t count, const uint8_t *data, uint32_t data_len, uint64_t *match);

/* A filter's next sequence number for group (its messages number the packets it passed),
 * moved on by n. */
uint64_t nflogd_filters_take_seq(struct nflogd_filters *fs, int slot, uint16_t group, uint32_t n);

/* What the metrics read of a slot: holders (0: free), packets passed and dropped, its text. */
uint32_t nflogd_filters_holders(struct nflogd_filters *fs, int slot);
uint64_t nflogd_filters_passed(struct nflogd_filters *fs, int slot);
uint64_t nflogd_filters_dropped(struct nflogd_filters *fs, int slot);
uint32_t nflogd_filters_text(struct nflogd_filters *fs, int slot, char *out, uint32_t cap);
uint64_t nflogd_filters_digest(struct nflogd_filters *fs, int slot);

#endif
