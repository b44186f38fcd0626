"""A filter's spec (docs/wire-format.md, "Filters"): its vectors, the daemon's checks of it,
and the daemon's test (feed/_filter.c) agreeing with the reader's (``Filter.match``), which
runs where the daemon does not filter."""

from __future__ import annotations

import re
import struct
import time

import pytest
from nflogd._nflog_cffi import ffi, lib
from nflogd_client import filters, wire
from nflogd_client.filters import Filter
from nflogd_client.wire import Packet

pytestmark = pytest.mark.timeout(30)

DOC = (__import__("pathlib").Path(__file__).parent.parent / "docs" / "wire-format.md").read_text()


def section(title: str) -> tuple[str, bytes]:
    """(the python block, the hex block's bytes) of a section of the document."""
    text = DOC.split(title, 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    code = re.search(r"^```python\n(.*?)^```$", text, flags=re.M | re.S).group(1)
    hexblock = re.search(r"^```hex\n(.*?)^```$", text, flags=re.M | re.S).group(1)
    lines = [line.split("#")[0] for line in hexblock.splitlines() if not line.startswith("[")]
    return code, bytes.fromhex("".join(lines))


def check(spec: bytes) -> str:
    """The daemon's verdict on a spec: "" or its reason."""
    why = ffi.new("char[]", 256)
    rc = lib.nflogd_filter_check(spec, len(spec), why, 256)
    return "" if rc == 0 else ffi.string(why).decode()


def test_filter_spec_vector_1_is_the_spec_filter_makes_and_the_daemon_takes():
    code, want = section("### Filter spec vector 1:")
    ns = {"Filter": Filter}
    exec(code, ns)
    assert ns["spec"] == want
    assert check(want) == ""
    assert filters.spec_text(want) == "prefix_start='ssh' mark=0x10/0xf0 uid=1000 hook=input,forward"


def test_vector_8_is_vector_1_with_the_filtered_flag():
    v1_code, v1 = section("### Vector 1:")
    code, want = section("### Vector 8:")
    ns = {"wire": wire, "Packet": Packet}
    exec(code, ns)
    frames = ns["frames"]
    assert b"".join(frames) == want
    assert want[:7] + want[8:] == v1[:7] + v1[8:]  # all but flags, header byte 5 (after the 2-byte topic)
    assert wire.header_flags(frames) == wire.FLAG_FILTERED
    assert wire.decode(frames).packets[0].seq == 0


def spec(insns=(), **head) -> bytes:
    fields = {"version": 1, "what": 0, "hooks": 0, "prefix_len": 0, "mark": 0, "mask": 0, "uid": 0, "gid": 0,
              "indev": 0, "outdev": 0, "insns": len(insns), "text_len": 0, "reserved": 0} | head  # fmt: skip
    return filters.HEAD.pack(*fields.values()) + b"".join(struct.pack("<HBBI", *i) for i in insns)


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (b"\x01" * 10, "malformed filter: shorter than its 32-byte head"),
        (spec(version=2), "filter version 2; this daemon reads version 1"),
        (spec(reserved=1), "malformed filter: reserved byte 31 is not 0"),
        (spec(what=3), "malformed filter: an exact prefix and a leading prefix at once"),
        (spec(prefix_len=129, what=1), "log prefix of 129 bytes, more than 128"),
        (spec(what=4, mark=0x100, mask=0xFF), "mark value has bits outside its mask"),
        (spec() + b"x", "malformed filter: 33 bytes, its head says 32"),
        (spec([(0x06, 0, 0, 1)] * 513), "capture filter of 513 BPF instructions, more than 512"),
        (spec([(0x05, 0, 0, 5), (0x06, 0, 0, 1)]), "capture filter program refused by bpf_validate"),
        (
            spec([(0x34, 0, 0, 0), (0x06, 0, 0, 1)]),
            "capture filter program refused by bpf_validate",
        ),  # div by 0
        (spec([(0x00, 0, 0, 0)]), "capture filter program refused by bpf_validate"),  # no return
    ],
)
def test_the_daemon_refuses_a_bad_spec_with_its_reason(bad, why):
    assert check(bad) == why


IPV4_UDP_53 = bytes.fromhex("4500001c000100004011f9c80a0000010a000002c0010035000800f1")
IPV4_UDP_80 = bytes.fromhex("4500001c000100004011f9c80a0000010a000002c0010050000800d6")

PACKETS = [
    Packet.build(5, IPV4_UDP_53, 1, prefix="ssh-in: ", mark=0x1F, uid=1000, hook=1, indev=2),
    Packet.build(5, IPV4_UDP_80, 2, prefix="ssh", mark=0x10, uid=1000, hook=2, outdev=3),
    Packet.build(5, IPV4_UDP_53, 3, prefix="dns: ", mark=0x20, gid=7, hook=3),
    Packet.build(5, IPV4_UDP_53, 4, hook=1),  # no prefix, mark, uid
    Packet.build(5, b"", 5, len=1500, prefix="ssh", hook=1, mark=0x10),  # metadata only
]

FILTERS = [
    Filter("udp and dst port 53"),
    Filter(prefix="ssh"),
    Filter(prefix_start="ssh"),
    Filter(mark=(0x10, 0xF0)),
    Filter(mark=0x20),
    Filter(uid=1000),
    Filter(gid=7),
    Filter(indev=2),
    Filter(outdev=3),
    Filter(hook=["input", "forward"]),
    Filter("udp", prefix_start="ssh", hook="input"),
    Filter("greater 100"),
]


def test_the_daemon_and_the_reader_agree_on_every_packet():
    """Each filter run once in C over the batch (nflogd_filters_run) passes exactly the
    packets Filter.match passes in Python."""
    count, table, data = wire.pack_records(PACKETS)
    rs = wire.RECORD.size  # the daemon's records carry the extension (88 bytes), zero here
    table = b"".join(table[i : i + rs] + bytes(wire.RECORD_X.size - rs) for i in range(0, len(table), rs))
    assert len(table) == count * ffi.sizeof("struct nflogd_record")
    fs = lib.nflogd_filters_new(1)
    why = ffi.new("char[]", 256)
    try:
        slots = [lib.nflogd_filters_hold(fs, f.spec(), len(f.spec()), why, 256) for f in FILTERS]
        assert slots == list(range(len(FILTERS)))
        match = ffi.new("uint64_t[]", count)
        records = ffi.cast("struct nflogd_record *", ffi.from_buffer(table))
        lib.nflogd_filters_run(
            fs, (1 << len(FILTERS)) - 1, records, count, ffi.from_buffer(data), len(data), match
        )
        for slot, f in enumerate(FILTERS):
            c_says = [bool(match[i] >> slot & 1) for i in range(count)]
            assert c_says == [f.match(p) for p in PACKETS], str(f)
            assert lib.nflogd_filters_passed(fs, slot) == sum(c_says)
            assert lib.nflogd_filters_dropped(fs, slot) == count - sum(c_says)
        # the same spec again is the same slot, held twice; gone with its last holder (no linger)
        assert lib.nflogd_filters_hold(fs, FILTERS[0].spec(), len(FILTERS[0].spec()), why, 256) == 0
        assert lib.nflogd_filters_holders(fs, 0) == 2
        lib.nflogd_filters_release(fs, 0)
        lib.nflogd_filters_release(fs, 0)
        assert lib.nflogd_filters_holders(fs, 0) == 0
        assert lib.nflogd_filters_numbering(fs, 5) == 0
    finally:
        lib.nflogd_filters_free(fs)


def hold(fs, f: Filter) -> int:
    why = ffi.new("char[]", 256)
    spec = f.spec()
    slot = lib.nflogd_filters_hold(fs, spec, len(spec), why, 256)
    return slot if slot >= 0 else ffi.string(why).decode()


def test_a_filter_run_outlives_its_last_holder_by_the_linger():
    """A run's numbering and epoch go on when a holder comes back within the linger; past it
    the next holder starts a new run: from 0, with a later epoch, never the same one."""
    daemon_epoch = time.time_ns() + 10**18  # a clock behind the daemon's epoch: runs still follow it
    fs = lib.nflogd_filters_new(daemon_epoch)
    try:
        lib.nflogd_filters_set_linger(fs, 60_000)
        f = Filter(uid=7)
        assert hold(fs, f) == 0
        first = lib.nflogd_filters_epoch(fs, 0)
        assert first == daemon_epoch + 1
        assert lib.nflogd_filters_take_seq(fs, 0, 5, 3) == 0
        lib.nflogd_filters_release(fs, 0)
        assert lib.nflogd_filters_holders(fs, 0) == 0
        assert lib.nflogd_filters_numbering(fs, 5) == 1  # nobody holds it: group 5 still numbered
        assert lib.nflogd_filters_numbering(fs, 6) == 0  # never asked for
        assert lib.nflogd_filters_take_seq(fs, 0, 5, 2) == 3
        assert hold(fs, f) == 0  # back within the linger: the same run
        assert (lib.nflogd_filters_epoch(fs, 0), lib.nflogd_filters_take_seq(fs, 0, 5, 0)) == (first, 5)
        lib.nflogd_filters_set_linger(fs, 1)
        lib.nflogd_filters_release(fs, 0)
        time.sleep(0.01)
        assert lib.nflogd_filters_numbering(fs, 5) == 0  # its run ended
        assert hold(fs, f) == 0
        assert lib.nflogd_filters_epoch(fs, 0) == first + 1
        assert lib.nflogd_filters_take_seq(fs, 0, 5, 0) == 0
    finally:
        lib.nflogd_filters_free(fs)


def test_the_daemon_runs_at_most_64_distinct_filters():
    """64 held: the next is refused; a slot whose run lingers goes to a new filter, the one
    let go longest ago first."""
    fs = lib.nflogd_filters_new(1)
    try:
        lib.nflogd_filters_set_linger(fs, 60_000)
        for uid in range(64):
            assert hold(fs, Filter(uid=uid)) == uid
        assert hold(fs, Filter(uid=64)) == "the daemon runs 64 distinct filters already, its limit"
        lib.nflogd_filters_release(fs, 9)
        time.sleep(0.002)
        lib.nflogd_filters_release(fs, 3)
        assert hold(fs, Filter(uid=64)) == 9
        assert hold(fs, Filter(uid=65)) == 3
        assert hold(fs, Filter(uid=66)) == "the daemon runs 64 distinct filters already, its limit"
    finally:
        lib.nflogd_filters_free(fs)
