"""Bad and extreme input: garbage on a real feed socket, config files of any bytes, and
records at the edges of what the kernel sends, through the real daemon.

test_wire.py already fuzzes ``wire.decode`` on frames and test_config.py ``config.parse``
on text and YAML trees; this file adds what they do not reach: a Subscriber reading
arbitrary multipart messages through ZeroMQ, ``config.load`` on arbitrary bytes, YAML's
own syntax (anchors, tags, merges, directives), the encoder on what the decoder accepts,
and the kernel's boundary records. The coverage-guided fuzzer is ``make fuzz``
(fuzz/fuzz_wire.py).
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time

import pytest
import zmq
from daemonutil import NflogdProcess, nflogd_command
from fuzzutil import fuzzer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nflogd_client import Subscriber, wire
from nflogd_client.wire import Packet, WireError

from nflogd import config
from nflogd.config import Config
from nflogd.errors import ConfigError

pytestmark = pytest.mark.timeout(120)

# -- a Subscriber fed garbage through a real socket -------------------------------------------


class Feed:
    """An in-process XPUB and a Subscriber of every group on an ipc endpoint, shared by the
    examples of one hypothesis test (made once: hypothesis reruns the test body)."""

    def __init__(self, path: str):
        self.ctx = zmq.Context()
        self.endpoint = f"ipc://{path}"
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.bind(self.endpoint)
        self.sub = Subscriber(self.endpoint, context=self.ctx)
        assert self.pub.poll(5000), "no subscription"
        assert self.pub.recv() == b"\x01"
        self.sentinels = 0

    def sentinel(self) -> list[bytes]:
        self.sentinels += 1
        pkt = Packet.build(0xFFFF, b"sentinel %d" % self.sentinels, 1)
        return wire.encode(0xFFFF, "sentinel", 1, self.sentinels, [pkt])

    def recv_until_sentinel(self) -> list:
        """Batches received up to and including the latest sentinel."""
        want = b"sentinel %d" % self.sentinels
        batches = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            batch = self.sub.recv_batch(timeout=1.0)
            if batch is None:
                continue
            batches.append(batch)
            if batch.node == "sentinel" and batch.packets and batch.packets[-1].data == want:
                return batches
        raise AssertionError("the sentinel never came")

    def close(self) -> None:
        self.sub.close()
        self.pub.close(linger=0)
        self.ctx.term()


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    f = Feed(str(tmp_path_factory.mktemp("feed") / "garbage.sock"))
    yield f
    f.close()


def decodes(frames: list[bytes]) -> bool:
    try:
        wire.decode(frames)
    except WireError:
        return False
    return True


def valid_message(draw_seq: int = 0) -> list[bytes]:
    pkts = [
        Packet.build(5, b"\x45" + bytes(27), 10**18, prefix="in: ", mark=0, indev=2, hwaddr=b"\x01" * 6),
        Packet.build(5, b"", 10**18 + 1, ts_kernel=False, outdev=3, uid=0, gid=0, kernel_seq=9),
    ]
    return wire.encode(5, "r1", 7, draw_seq, pkts, 3)


@st.composite
def garbage_messages(draw):
    """Arbitrary frames, or a valid message with bytes changed, cut or frames added/dropped."""
    if draw(st.booleans()):
        return draw(st.lists(st.binary(max_size=120), min_size=1, max_size=6))
    frames = [bytearray(f) for f in valid_message(draw(st.integers(0, 2**64 - 1)))]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, 3))
        if frames[i] and draw(st.booleans()):
            frames[i][draw(st.integers(0, len(frames[i]) - 1))] = draw(st.integers(0, 255))
        else:
            frames[i] = frames[i][: draw(st.integers(0, len(frames[i])))]
    out = [bytes(f) for f in frames]
    if draw(st.booleans()):
        out.insert(draw(st.integers(1, 4)), draw(st.binary(max_size=16)))
    return out


@given(st.lists(garbage_messages(), min_size=1, max_size=5))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_subscriber_counts_garbage_from_the_socket_and_never_raises(feed, messages):
    before = feed.sub.malformed
    for frames in messages:
        feed.pub.send_multipart(frames)
    feed.pub.send_multipart(feed.sentinel())
    batches = feed.recv_until_sentinel()
    good = sum(decodes(m) for m in messages)
    assert feed.sub.malformed - before == len(messages) - good
    assert len(batches) == good + 1


# -- config files of any bytes, and YAML's own syntax ------------------------------------------


def load_or_config_error(tmp_path, data: bytes) -> None:
    path = tmp_path / "nflogd.yaml"
    path.write_bytes(data)
    try:
        cfg = config.load(path)
    except ConfigError as e:
        text = str(e)
        assert text and "\n" not in text and ": " in text
    else:
        assert isinstance(cfg, Config) and cfg.groups


@given(st.binary(max_size=300))
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_config_file_of_any_bytes_is_config_or_config_error(tmp_path, data):
    load_or_config_error(tmp_path, data)


@given(st.binary(max_size=64))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_valid_config_with_bytes_appended_is_config_or_config_error(tmp_path, tail):
    load_or_config_error(tmp_path, b"groups: [1, {group: 2}]\nnode: r1\n" + tail)


# Pieces of YAML syntax that random text rarely spells: anchors and aliases, tags (the
# unsafe python/* ones too), merge keys, flow and block collections, directives, documents.
YAML_TOKENS = [
    "groups", "group", "node", "publish", "bind", "hwm", "metrics", "listen", "user",
    "copy_range", "queue_threshold", "flush_ms", "rcvbuf", ":", ": ", "- ", "? ", ",",
    "[", "]", "{", "}", "\n", "  ", "    ", "&a ", "*a", "&b ", "*b", "<<: ", "<<: *a",
    "!!str ", "!!int ", "!!float ", "!!binary ", "!!set ", "!!omap ", "!!null ", "!!bool ",
    "!!timestamp ", "!!python/object:os.system ", "!!python/name:os.system ", "!custom ",
    "%YAML 1.1\n", "%TAG ! tag:x,2000:\n", "---\n", "...\n", "'", '"', "|\n", ">\n", "#",
    "1", "0", "-1", "65535", "65536", "0x10", "0o17", "1e3", ".inf", ".nan", "~", "null",
    "yes", "no", "true", "2001-12-14", "ipc:///run/x.sock", "tcp://127.0.0.1:5555",
    "127.0.0.1:9477", "[::1]:1", "\t", "\\", "\x85", "\ufeff", "é", "\u2028",
]  # fmt: skip


@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=40))
@settings(max_examples=400, deadline=None)
def test_yaml_syntax_soup_is_config_or_config_error(tokens):
    text = "".join(tokens)
    try:
        cfg = config.parse(text)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert isinstance(cfg, Config)


def test_alias_bomb_is_a_config_error_at_once():
    """A billion laughs (9**9 leaves) under groups: aliases are shared, never expanded, and
    the shape is refused by name."""
    levels = ['&l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, 10)]
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"groups\[0\]: must be a group number .* got a list"):
        config.parse("groups: [" + ", ".join(levels) + "]")
    assert time.monotonic() - t0 < 2


# PyYAML's constructors raise IndexError, KeyError and AttributeError on these.
BAD_TAGGED = {
    'groups: [!!int ""]': "line 1 column 10: !!int cannot read ''",
    "groups: [1]\nnode: !!bool maybe": "line 2 column 7: !!bool cannot read 'maybe'",
    "groups: [1]\nuser: !!timestamp 2001-12-14x": "line 2 column 7: !!timestamp cannot read '2001-12-14x'",
    'groups: [!!int "-"]': "line 1 column 10: !!int cannot read '-'",
}


@pytest.mark.parametrize("text", list(BAD_TAGGED))
def test_tagged_value_its_tag_cannot_read_is_a_config_error(text):
    with pytest.raises(ConfigError) as info:
        config.parse(text)
    assert str(info.value) == f"<config>: invalid YAML at {BAD_TAGGED[text]}"


@pytest.mark.kernel
def test_check_and_sighup_with_a_bad_tagged_value(netns, tmp_path):
    """``--check`` says so on one line (exit 2); a SIGHUP keeps the running config."""
    text = 'groups: [!!int ""]'
    bad = tmp_path / "bad.yaml"
    bad.write_text(text + "\n")
    res = subprocess.run(
        [*nflogd_command(), "--check", "-c", str(bad)], capture_output=True, text=True, timeout=30
    )
    assert (res.returncode, res.stderr.splitlines()) == (
        2,
        [f"nflogd: {bad}: invalid YAML at {BAD_TAGGED[text]}"],
    )
    with NflogdProcess(netns, tmp_path / "d", groups=[1]) as d:
        d.write_config(text + "\n")
        ready = d.reload()
        assert "last reload failed" in ready["STATUS"] and "!!int cannot read" in ready["STATUS"]
        assert d.alive() and bound_groups(netns) == {1}
    assert d.returncode == 0 and "Traceback" not in d.stderr


# -- the encoder on what the decoder accepts -------------------------------------------------------


def test_reencoding_a_long_latin1_prefix_is_a_value_error_naming_it():
    """The decoder reads a non-UTF-8 prefix as Latin-1; 40,000 such bytes are 80,000 in
    UTF-8, more than prefix_len (u16) holds. The encoder must refuse that by name, as it
    does an oversized node or hwaddr, not fail inside struct."""
    frames = wire.encode(1, "n", 1, 0, [Packet.build(1, b"x", prefix="a" * 40_000)])
    frames[3] = frames[3][:1] + b"\xe9" * 40_000
    batch = wire.decode(frames)
    assert batch.packets[0].prefix == "\xe9" * 40_000
    with pytest.raises(ValueError, match="prefix is 80000 bytes in UTF-8, at most 65535"):
        wire.encode(batch.group, batch.node, batch.epoch, batch.first_seq, batch.packets)
    with pytest.raises(ValueError, match="prefix is 65536 bytes"):
        wire.encode(1, "n", 1, 0, [Packet.build(1, b"", prefix="p" * 65536)])
    long = wire.encode(1, "n", 1, 0, [Packet.build(1, b"", prefix="p" * 65535)])
    assert wire.decode(long).packets[0].prefix == "p" * 65535


# -- the kernel's boundary records, through the daemon and a Subscriber ------------------------

# NFULNL_COPY_RANGE_MAX (nfnetlink_log.c): 0xFFFF - NLA_HDRLEN; nfulnl_set_mode() caps
# copy_range at it, so 65535 copies at most 65531 bytes.
KERNEL_COPY_MAX = 0xFFFF - 4
IPV4_MAX_UDP = 65535 - 20 - 8  # 65507
IPV6_MAX_UDP = 65535 - 8  # payload_len counts the UDP header, not the 40-byte IPv6 header


def bound_groups(netns) -> set[int]:
    out = netns.run("cat", "/proc/net/netfilter/nfnetlink_log").stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.strip()}


def recv_n(sub: Subscriber, n: int, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        pkt = sub.recv(timeout=0.2)
        if pkt is not None:
            got.append(pkt)
    assert len(got) == n, f"got {len(got)} packets of {n}"
    assert sub.recv(timeout=0.3) is None, "more packets than sent"
    return got


@pytest.mark.kernel
def test_boundary_records_pass_through_intact(netns, tmp_path):
    """Group 1 copies metadata only (copy_range 0) and logs at OUTPUT and INPUT, so that
    every optional attribute is absent in one record or the other; group 2 copies the most
    the kernel will (copy_range 65535, capped at 65531) of the largest UDP datagrams."""
    netns.log_rule(1, hook="output", match="udp dport 9001")
    netns.log_rule(1, hook="input", match="udp dport 9001")
    netns.log_rule(2, match="udp dport 9002")
    groups = [{"group": 1, "copy_range": 0}, {"group": 2, "copy_range": 65535}]
    with NflogdProcess(netns, tmp_path, groups=groups) as d:
        sub = Subscriber(d.endpoint)
        try:
            deadline = time.monotonic() + 5
            while d.stderr.count("DEBUG: subscribe") < 1:
                assert time.monotonic() < deadline, "no subscription"
                time.sleep(0.01)

            # metadata only, one 0-byte and one 3-byte datagram, each seen at OUTPUT then INPUT
            netns.send_udp([b"", b"abc"], port=9001)
            meta = recv_n(sub, 4)
            # no prefix (nft's empty one is none); the real length from the IP header
            out = wire.F_OUTDEV | wire.F_UID | wire.F_GID | wire.F_KSEQ | wire.F_LEN_FROM_HEADER
            inp = wire.F_TS_KERNEL | wire.F_INDEV | wire.F_KSEQ | wire.F_HWADDR | wire.F_LEN_FROM_HEADER
            assert [p.present for p in meta] == [out, inp, out, inp]
            assert [p.len for p in meta] == [28, 28, 31, 31]
            for p in meta:
                assert (p.group, p.data, p.caplen, p.truncated) == (1, b"", 0, True)
                assert p.mark is None and p.physindev is None and p.physoutdev is None
                assert p.prefix is None
                assert p.hw_protocol == 0x0800
            for p in meta[0::2]:  # OUTPUT: no kernel timestamp, no input side
                assert p.hook == 3 and not p.ts_kernel and p.indev is None and p.hwaddr is None
                assert p.outdev == 1 and p.uid == os.getuid() and p.gid == os.getgid()
            for p in meta[1::2]:  # INPUT: no socket owner, no output device
                assert p.hook == 1 and p.ts_kernel and p.outdev is None
                assert p.uid is None and p.gid is None and p.indev == 1 and p.hwaddr == bytes(6)
            assert [p.kernel_seq for p in meta] == [0, 1, 2, 3]
            assert abs(meta[1].ts - time.time()) < 30

            # the largest copy range: a datagram that fits it exactly, one byte more, the
            # largest IPv4 datagram, a 0-byte one, and the largest IPv6 datagram
            v4_sizes = [KERNEL_COPY_MAX - 28, KERNEL_COPY_MAX - 28 + 1, IPV4_MAX_UDP, 0]
            payloads = [os.urandom(n) for n in v4_sizes]
            netns.send_udp(payloads, port=9002)
            v6_payload = os.urandom(IPV6_MAX_UDP)
            netns.send_udp([v6_payload], addr="::1", port=9002)
            big = recv_n(sub, 5)
        finally:
            sub.close()
        for p, payload in zip(big[:4], payloads):
            length = 28 + len(payload)
            assert (p.group, p.len, p.caplen) == (2, length, min(length, KERNEL_COPY_MAX))
            assert p.truncated is (length > KERNEL_COPY_MAX)
            assert struct.unpack_from(">H", p.data, 2)[0] == length  # IPv4 total length
            assert struct.unpack_from(">HH", p.data, 22) == (9002, 8 + len(payload))
            assert p.data[28:] == payload[: KERNEL_COPY_MAX - 28]
        v6 = big[4]
        assert (v6.len, v6.caplen, v6.truncated, v6.hw_protocol) == (
            40 + 8 + IPV6_MAX_UDP,
            KERNEL_COPY_MAX,
            True,
            0x86DD,
        )
        assert v6.data[8:24] == v6.data[24:40] == socket.inet_pton(socket.AF_INET6, "::1")
        assert v6.data[48:] == v6_payload[: KERNEL_COPY_MAX - 48]
        assert d.metric("nflogd_truncated_packets_total", group="2") == 3
        assert d.metric("nflogd_bytes_total", group="2") == sum(p.len for p in big)
        assert d.metric("nflogd_kernel_dropped_packets_total", group="2") == 0
    assert d.returncode == 0


# -- the fuzzer's corpus, replayed on every run ------------------------------------------------


@pytest.mark.parametrize("target, at_least", [("wire", 8), ("zmtp", 30), ("curve", 30)])
def test_fuzz_corpus_replays_and_holds_every_seed(target, at_least):
    """Each file of fuzz/corpus/<target> (the seeds, and inputs the fuzzer once failed on)
    passes the target's property; every seed is there (wire's follow the vectors): the feed
    decoder's round trip, the ZMTP and CURVE codecs' same events and bytes whole, a byte at a
    time and in pieces."""
    harness = fuzzer(target)
    files = sorted(harness.CORPUS.iterdir())
    for path in files:
        harness.check(path.read_bytes())
    have = {p.read_bytes() for p in files}
    seeds = harness.seeds()
    if target == "wire":
        seeds = [harness.join_frames(f) for f in seeds]
        assert harness.split_frames(harness.join_frames([b"", b"ab", b""])) == [b"", b"ab", b""]
    assert len(seeds) >= at_least and all(s in have for s in seeds)


def test_fuzz_property_fails_where_it_should(monkeypatch):
    """A round trip that changes a field fails the property; a foreign exception escapes
    (the fuzzer reports it as a crash)."""
    harness = fuzzer("wire")
    vector = harness.join_frames(harness.seeds()[0])
    harness.check(vector)
    real = wire.decode
    calls = []

    def second_decode_shifts_ts(frames):
        batch = real(frames)
        calls.append(batch)
        if len(calls) == 2:
            r = batch.packets[0]._r
            batch.packets[0]._r = (r[0] + 1, *r[1:])
        return batch

    monkeypatch.setattr(wire, "decode", second_decode_shifts_ts)
    with pytest.raises(AssertionError, match="packet changed"):
        harness.check(vector)

    def foreign(frames):
        raise IndexError("not a WireError")

    monkeypatch.setattr(wire, "decode", foreign)
    with pytest.raises(IndexError):
        harness.check(vector)


def test_zmtp_fuzz_property_fails_where_it_should(monkeypatch):
    """A codec whose events depend on how the bytes came, or that sends what it must not,
    fails the property; a foreign exception escapes (the fuzzer reports it as a crash)."""
    from nflogd.feed import codec

    harness = fuzzer("zmtp")
    seed = harness.seeds()[0]
    harness.check(seed)
    real = codec.Codec.receive

    def drops_a_lone_byte(self, data):
        if len(data) > 1:
            real(self, data)

    monkeypatch.setattr(codec.Codec, "receive", drops_a_lone_byte)
    with pytest.raises(AssertionError, match="at a time"):
        harness.check(seed)
    monkeypatch.setattr(codec.Codec, "receive", real)
    monkeypatch.setattr(codec, "GREETING_REST", b"\x00" + codec.GREETING_REST[1:])
    with pytest.raises(AssertionError, match="sent"):
        harness.check(seed)
    monkeypatch.undo()

    def foreign(self):
        raise IndexError("not an event")

    monkeypatch.setattr(codec.Codec, "next_event", foreign)
    with pytest.raises(IndexError):
        harness.check(seed)


def test_curve_fuzz_property_fails_where_it_should(monkeypatch):
    """A CURVE codec whose events depend on how the bytes came fails the property."""
    from nflogd.feed import codec

    harness = fuzzer("curve")
    seed = next(s for s in harness.seeds() if s[1] == 2)
    harness.check(seed)
    real = codec.Codec.receive

    def drops_a_lone_byte(self, data):
        if len(data) > 1:
            real(self, data)

    monkeypatch.setattr(codec.Codec, "receive", drops_a_lone_byte)
    with pytest.raises(AssertionError, match="at a time"):
        harness.check(seed)
