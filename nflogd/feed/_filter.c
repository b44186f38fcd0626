/* Reader-stated filters at the daemon (declared in _filter.h).
 *
 * A reader compiles its capture filter with libpcap (pcap_compile on LINKTYPE_RAW: the
 * program starts at the IPv4/IPv6 header, as a record's payload does) and sends the program
 * with the metadata it wants. Here the program is checked with libpcap's bpf_validate (jumps
 * forward and inside the program, no division by a constant 0, scratch memory indices in
 * range, ends in a return) and capped at NFLOGD_FILTER_MAX_INSNS instructions: since classic
 * BPF only jumps forward, a packet costs at most that many instructions per filter. Each
 * record is then run through bpf_filter with its captured bytes (caplen) and its real length
 * (len) as the wire length, so that "greater 1000" sees a packet the copy range cut.
 *
 * Filters are shared: the same spec bytes stated by several readers are one slot, run once
 * per packet. A slot is one run of its filter: its epoch (after the daemon's and every earlier
 * run's) and, per group, the packets it passed. The run outlives its last holder by the
 * linger (publish.filter_linger_ms), still numbering every group it was asked for, so that a
 * reader that comes back within it (a reconnect, nflogd-relay reconnecting upstream) counts
 * exactly what its filter passed meanwhile; a run past its linger ends, and the next holder
 * starts a new one, with a new epoch: readers see a restart, never a silent reset.
 * Every call runs under the feed's mutex (nflogd_feed_lock). */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <pcap/bpf.h>

#include "../_nflog.h"
#include "_filter.h"

struct seq_of {
    uint16_t group;
    uint64_t next;
};

struct filter {
    uint32_t holders;       /* 0: free, or lingering (released_ns set) */
    uint64_t released_ns;   /* CLOCK_MONOTONIC when its last holder let go; 0 while held */
    uint64_t epoch;         /* this run's, in its messages' epoch field */
    uint8_t *spec;          /* the bytes stated, for identity */
    uint32_t spec_len;
    uint64_t digest;        /* FNV-1a of spec, the metrics' label */
    uint8_t what, hooks, prefix_len, text_len;
    uint32_t mark, mark_mask, uid, gid, indev, outdev;
    const uint8_t *prefix;  /* into spec */
    const uint8_t *text;    /* into spec */
    struct bpf_insn *insns; /* NULL: no program */
    uint32_t ninsns;
    uint64_t passed, dropped;
    struct seq_of *seq;     /* per group: the next sequence number of its messages */
    uint32_t nseq;
};

struct nflogd_filters {
    struct filter slot[NFLOGD_FILTER_MAX];
    uint64_t live;          /* a bit per slot in use: held or lingering */
    uint32_t lingering;     /* slots held by nobody, within their linger */
    uint64_t linger_ns;
    uint64_t last_epoch;    /* the daemon's, then the latest run's */
};

struct nflogd_filters *nflogd_filters_new(uint64_t epoch)
{
    struct nflogd_filters *fs = calloc(1, sizeof(struct nflogd_filters));
    if (fs)
        fs->last_epoch = epoch;
    return fs;
}

void nflogd_filters_set_linger(struct nflogd_filters *fs, uint32_t ms)
{
    fs->linger_ns = (uint64_t)ms * 1000000u;
}

static uint64_t clock_ns(clockid_t id)
{
    struct timespec ts;
    clock_gettime(id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void filter_clear(struct filter *f)
{
    free(f->spec);
    free(f->insns);
    free(f->seq);
    memset(f, 0, sizeof(*f));
}

void nflogd_filters_free(struct nflogd_filters *fs)
{
    if (!fs)
        return;
    for (int i = 0; i < NFLOGD_FILTER_MAX; i++)
        filter_clear(&fs->slot[i]);
    free(fs);
}

/* The run in slot i ends: its slot free for another filter. */
static void run_end(struct nflogd_filters *fs, int i)
{
    if (fs->slot[i].released_ns)
        fs->lingering--;
    filter_clear(&fs->slot[i]);
    fs->live &= ~(1ull << i);
}

/* End the runs nobody held for their linger. */
static void reap(struct nflogd_filters *fs)
{
    if (!fs->lingering)
        return;
    uint64_t now_ns = clock_ns(CLOCK_MONOTONIC);
    for (int i = 0; i < NFLOGD_FILTER_MAX; i++) {
        struct filter *f = &fs->slot[i];
        if (f->released_ns && now_ns - f->released_ns >= fs->linger_ns)
            run_end(fs, i);
    }
}

static uint32_t le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint16_t le16(const uint8_t *p)
{
    return (uint16_t)(p[0] | p[1] << 8);
}

static int refuse(char *why, uint32_t whylen, const char *text)
{
    if (why && whylen)
        snprintf(why, whylen, "%s", text);
    return -1;
}

/* Parse and check spec into f (f->spec not set); 0 or -1 with why. */
static int parse(struct filter *f, const uint8_t *spec, uint32_t len, char *why, uint32_t whylen)
{
    char msg[160];
    memset(f, 0, sizeof(*f));
    if (len < NFLOGD_FILTER_HEAD)
        return refuse(why, whylen, "malformed filter: shorter than its 32-byte head");
    if (spec[0] != NFLOGD_FILTER_VERSION) {
        snprintf(msg, sizeof(msg), "filter version %u; this daemon reads version %u", spec[0], NFLOGD_FILTER_VERSION);
        return refuse(why, whylen, msg);
    }
    f->what = spec[1];
    f->hooks = spec[2];
    f->prefix_len = spec[3];
    f->mark = le32(spec + 4);
    f->mark_mask = le32(spec + 8);
    f->uid = le32(spec + 12);
    f->gid = le32(spec + 16);
    f->indev = le32(spec + 20);
    f->outdev = le32(spec + 24);
    uint32_t ninsns = le16(spec + 28);
    f->text_len = spec[30];
    if (spec[31] != 0)
        return refuse(why, whylen, "malformed filter: reserved byte 31 is not 0");
    if ((f->what & NFLOGD_FM_PREFIX) && (f->what & NFLOGD_FM_PREFIX_START))
        return refuse(why, whylen, "malformed filter: an exact prefix and a leading prefix at once");
    if (f->prefix_len > NFLOGD_FILTER_MAX_PREFIX) {
        snprintf(msg, sizeof(msg), "log prefix of %u bytes, more than %u", f->prefix_len, NFLOGD_FILTER_MAX_PREFIX);
        return refuse(why, whylen, msg);
    }
    if (f->prefix_len && !(f->what & (NFLOGD_FM_PREFIX | NFLOGD_FM_PREFIX_START)))
        return refuse(why, whylen, "malformed filter: prefix bytes without a prefix match bit");
    if ((f->what & NFLOGD_FM_MARK) && (f->mark & ~f->mark_mask))
        return refuse(why, whylen, "mark value has bits outside its mask");
    if (ninsns > NFLOGD_FILTER_MAX_INSNS) {
        snprintf(msg, sizeof(msg), "capture filter of %u BPF instructions, more than %u", ninsns,
                 NFLOGD_FILTER_MAX_INSNS);
        return refuse(why, whylen, msg);
    }
    uint32_t want = NFLOGD_FILTER_HEAD + f->prefix_len + f->text_len + 8 * ninsns;
    if (len != want) {
        snprintf(msg, sizeof(msg), "malformed filter: %u bytes, its head says %u", len, want);
        return refuse(why, whylen, msg);
    }
    f->prefix = spec + NFLOGD_FILTER_HEAD;
    f->text = f->prefix + f->prefix_len;
    if (ninsns) {
        const uint8_t *p = f->text + f->text_len;
        f->insns = malloc(ninsns * sizeof(struct bpf_insn));
        if (!f->insns)
            return refuse(why, whylen, "out of memory");
        for (uint32_t i = 0; i < ninsns; i++, p += 8) {
            f->insns[i].code = le16(p);
            f->insns[i].jt = p[2];
            f->insns[i].jf = p[3];
            f->insns[i].k = le32(p + 4);
        }
        f->ninsns = ninsns;
        if (!bpf_validate(f->insns, (int)ninsns)) {
            free(f->insns);
            f->insns = NULL;
            return refuse(why, whylen, "capture filter program refused by bpf_validate");
        }
    }
    return 0;
}

int nflogd_filter_check(const uint8_t *spec, uint32_t len, char *why, uint32_t whylen)
{
    struct filter f;
    int rc = parse(&f, spec, len, why, whylen);
    free(f.insns);
    return rc;
}

static uint64_t fnv1a(const uint8_t *p, uint32_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ull;
    return h;
}

int nflogd_filters_hold(struct nflogd_filters *fs, const uint8_t *spec, uint32_t len, char *why, uint32_t whylen)
{
    reap(fs);
    int free_slot = -1, oldest = -1;
    for (int i = 0; i < NFLOGD_FILTER_MAX; i++) {
        struct filter *f = &fs->slot[i];
        if (!(fs->live & (1ull << i))) {
            if (free_slot < 0)
                free_slot = i;
        } else if (f->spec_len == len && memcmp(f->spec, spec, len) == 0) {
            if (f->released_ns) {  /* its run lingered: it goes on, numbering and epoch */
                f->released_ns = 0;
                fs->lingering--;
            }
            f->holders++;
            return i;
        } else if (f->released_ns && (oldest < 0 || f->released_ns < fs->slot[oldest].released_ns)) {
            oldest = i;
        }
    }
    struct filter f;
    if (parse(&f, spec, len, why, whylen) < 0)
        return -1;
    if (free_slot < 0 && oldest >= 0) {  /* every slot in use: the run let go longest ago ends */
        run_end(fs, oldest);
        free_slot = oldest;
    }
    if (free_slot < 0) {
        free(f.insns);
        char msg[96];
        snprintf(msg, sizeof(msg), "the daemon runs %d distinct filters already, its limit", NFLOGD_FILTER_MAX);
        return refuse(why, whylen, msg);
    }
    f.spec = malloc(len);
    if (!f.spec) {
        free(f.insns);
        return refuse(why, whylen, "out of memory");
    }
    memcpy(f.spec, spec, len);
    f.spec_len = len;
    f.prefix = f.spec + NFLOGD_FILTER_HEAD;
    f.text = f.prefix + f.prefix_len;
    f.digest = fnv1a(spec, len);
    f.holders = 1;
    /* a new run: an epoch after the daemon's and every earlier run's, the time if the clock allows */
    uint64_t now = clock_ns(CLOCK_REALTIME);
    f.epoch = fs->last_epoch = now > fs->last_epoch ? now : fs->last_epoch + 1;
    fs->slot[free_slot] = f;
    fs->live |= 1ull << free_slot;
    return free_slot;
}

void nflogd_filters_release(struct nflogd_filters *fs, int slot)
{
    if (slot < 0 || slot >= NFLOGD_FILTER_MAX)
        return;
    struct filter *f = &fs->slot[slot];
    if (!f->holders || --f->holders)
        return;
    if (!fs->linger_ns) {
        run_end(fs, slot);
        return;
    }
    uint64_t now = clock_ns(CLOCK_MONOTONIC);
    f->released_ns = now ? now : 1;
    fs->lingering++;
}

uint64_t nflogd_filters_numbering(struct nflogd_filters *fs, uint16_t group)
{
    if (!fs->live)
        return 0;
    reap(fs);
    uint64_t bits = 0;
    for (int s = 0; s < NFLOGD_FILTER_MAX; s++) {
        if (!(fs->live & (1ull << s)))
            continue;
        const struct filter *f = &fs->slot[s];
        for (uint32_t i = 0; i < f->nseq; i++)
            if (f->seq[i].group == group) {
                bits |= 1ull << s;
                break;
            }
    }
    return bits;
}

uint64_t nflogd_filters_epoch(struct nflogd_filters *fs, int slot)
{
    return fs->slot[slot].epoch;
}

/* The metadata predicates of f on one record (absent attributes never match). */
static int meta_match(const struct filter *f, const struct nflogd_record *r, const uint8_t *data, uint32_t data_len)
{
    uint8_t what = f->what;
    if (what & (NFLOGD_FM_PREFIX | NFLOGD_FM_PREFIX_START)) {
        if (!(r->present & NFLOGD_F_PREFIX) || (uint64_t)r->prefix_off + r->prefix_len > data_len)
            return 0;
        if ((what & NFLOGD_FM_PREFIX) ? r->prefix_len != f->prefix_len : r->prefix_len < f->prefix_len)
            return 0;
        if (memcmp(data + r->prefix_off, f->prefix, f->prefix_len) != 0)
            return 0;
    }
    if ((what & NFLOGD_FM_MARK) && (!(r->present & NFLOGD_F_MARK) || (r->mark & f->mark_mask) != f->mark))
        return 0;
    if ((what & NFLOGD_FM_UID) && (!(r->present & NFLOGD_F_UID) || r->uid != f->uid))
        return 0;
    if ((what & NFLOGD_FM_GID) && (!(r->present & NFLOGD_F_GID) || r->gid != f->gid))
        return 0;
    if ((what & NFLOGD_FM_INDEV) && (!(r->present & NFLOGD_F_INDEV) || r->indev != f->indev))
        return 0;
    if ((what & NFLOGD_FM_OUTDEV) && (!(r->present & NFLOGD_F_OUTDEV) || r->outdev != f->outdev))
        return 0;
    if ((what & NFLOGD_FM_HOOK) && (r->hook >= 8 || !(f->hooks & (1u << r->hook))))
        return 0;
    return 1;
}

void nflogd_filters_run(struct nflogd_filters *fs, uint64_t want, const struct nflogd_record *records,
                        uint32_t count, const uint8_t *data, uint32_t data_len, uint64_t *match)
{
    memset(match, 0, count * sizeof(*match));
    for (int s = 0; s < NFLOGD_FILTER_MAX; s++) {
        if (!(want & (1ull << s)))
            continue;
        struct filter *f = &fs->slot[s];
        if (!f->spec)
            continue;
        uint64_t bit = 1ull << s, passed = 0;
        for (uint32_t i = 0; i < count; i++) {
            const struct nflogd_record *r = &records[i];
            if (f->what && !meta_match(f, r, data, data_len))
                continue;
            if (f->insns) {
                uint32_t caplen = r->caplen;
                if ((uint64_t)r->data_off + caplen > data_len)
                    continue;
                uint32_t wirelen = r->len > caplen ? r->len : caplen;
                if (bpf_filter(f->insns, data + r->data_off, wirelen, caplen) == 0)
                    continue;
            }
            match[i] |= bit;
            passed++;
        }
        f->passed += passed;
        f->dropped += count - passed;
    }
}

uint64_t nflogd_filters_take_seq(struct nflogd_filters *fs, int slot, uint16_t group, uint32_t n)
{
    struct filter *f = &fs->slot[slot];
    for (uint32_t i = 0; i < f->nseq; i++) {
        if (f->seq[i].group == group) {
            uint64_t first = f->seq[i].next;
            f->seq[i].next += n;
            return first;
        }
    }
    struct seq_of *more = realloc(f->seq, (f->nseq + 1) * sizeof(*more));
    if (!more)
        return 0;  /* numbered from 0 again: the reader sees a reset, not a loss */
    f->seq = more;
    f->seq[f->nseq++] = (struct seq_of){ group, n };
    return 0;
}

static struct filter *slot_at(struct nflogd_filters *fs, int slot)
{
    return slot >= 0 && slot < NFLOGD_FILTER_MAX ? &fs->slot[slot] : NULL;
}

uint32_t nflogd_filters_holders(struct nflogd_filters *fs, int slot)
{
    struct filter *f = slot_at(fs, slot);
    return f ? f->holders : 0;
}

uint64_t nflogd_filters_passed(struct nflogd_filters *fs, int slot)
{
    struct filter *f = slot_at(fs, slot);
    return f ? f->passed : 0;
}

uint64_t nflogd_filters_dropped(struct nflogd_filters *fs, int slot)
{
    struct filter *f = slot_at(fs, slot);
    return f ? f->dropped : 0;
}

uint64_t nflogd_filters_digest(struct nflogd_filters *fs, int slot)
{
    struct filter *f = slot_at(fs, slot);
    return f ? f->digest : 0;
}

uint32_t nflogd_filters_text(struct nflogd_filters *fs, int slot, char *out, uint32_t cap)
{
    struct filter *f = slot_at(fs, slot);
    if (!f || !f->holders || !cap)
        return 0;
    uint32_t n = f->text_len < cap ? f->text_len : cap;
    memcpy(out, f->text, n);
    return n;
}
