"""The version-1 codec: byte vectors (docs/wire-format.md and tests/vectors/), round trips,
every malformed input, and fuzzing."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nflogd_client import wire
from nflogd_client.wire import HEADER, RECORD, Batch, Packet, WireError

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "wire-format.md"
VECTOR_DIR = Path(__file__).resolve().parent / "vectors"
VECTOR_FILES = sorted(VECTOR_DIR.glob("v1-*.json"))
BYTES_FIELDS = ("data", "hwaddr", "l2hdr")


# -- the vectors ----------------------------------------------------------------------------


def parse_doc_vectors(text: str) -> dict[str, tuple[str, list[bytes]]]:
    """``{name: (python source, frames)}`` from the doc's "### Vector N: `name`" sections."""
    vectors = {}
    sections = re.split(r"^### Vector \d+: ", text, flags=re.M)[1:]
    for section in sections:
        name = re.match(r"`([^`]+)`", section).group(1)
        code = re.search(r"^```python\n(.*?)^```$", section, flags=re.M | re.S).group(1)
        hexblock = re.search(r"^```hex\n(.*?)^```$", section, flags=re.M | re.S).group(1)
        frames: list[bytearray] = []
        for line in hexblock.splitlines():
            m = re.match(r"\[frame (\d+)", line)
            if m:
                assert int(m.group(1)) == len(frames), f"{name}: frames out of order at {line!r}"
                frames.append(bytearray())
                continue
            hexpart = line.split("#", 1)[0].strip()
            if hexpart:
                frames[-1] += bytes.fromhex(hexpart)
        vectors[name] = (code, [bytes(f) for f in frames])
    return vectors


def load_vector(path: Path) -> dict:
    return json.loads(path.read_text())


def unhex(d: dict) -> dict:
    """A packet's fields from JSON: bytes from hex, the conntrack block and the VLAN tag as
    the decoder gives them."""
    out = {k: bytes.fromhex(v) if k in BYTES_FIELDS and v is not None else v for k, v in d.items()}
    if out.get("ct") is not None:
        ct = dict(out["ct"])
        for k in ("orig", "reply"):
            ct[k] = wire.CtTuple(**ct[k]) if ct[k] is not None else None
        ct["labels"] = bytes.fromhex(ct["labels"]) if ct["labels"] is not None else None
        out["ct"] = wire.Conntrack(**ct)
    if out.get("vlan") is not None:
        out["vlan"] = wire.Vlan(*out["vlan"])
    return out


def encode_from_file(vec: dict) -> list[bytes]:
    enc = vec["encode"]
    packets = [Packet.build(**unhex(p)) for p in enc["packets"]]
    names = {int(k): v for k, v in enc["ifnames"].items()} if "ifnames" in enc else None
    frames = wire.encode(
        enc["group"], enc["node"], enc["epoch"], enc["first_seq"], packets, enc["kernel_dropped"], names
    )
    return with_flags(frames, enc.get("flags", 0))


def with_flags(frames: list[bytes], flags: int) -> list[bytes]:
    """A message with these header flags added to what ``wire.encode`` sets (``FILTERED``:
    the daemon's composition for a filtered reader, which the encoder does not make)."""
    header = bytearray(frames[1])
    header[5] |= flags
    return [frames[0], bytes(header), *frames[2:]]


DOC_VECTORS = parse_doc_vectors(DOC.read_text())


def test_the_doc_and_the_files_hold_the_same_vectors():
    assert len(DOC_VECTORS) >= 3
    assert sorted(DOC_VECTORS) == sorted(load_vector(p)["name"] for p in VECTOR_FILES)
    for path in VECTOR_FILES:
        assert path.stem == load_vector(path)["name"]


@pytest.mark.parametrize("name", sorted(DOC_VECTORS))
def test_doc_vector_code_produces_its_hex(name):
    code, frames = DOC_VECTORS[name]
    ns = {"wire": wire, "Packet": Packet}
    exec(code, ns)
    assert ns["frames"] == frames, f"docs/wire-format.md, vector {name}: the code and the hex differ"
    assert [f.hex() for f in frames] == load_vector(VECTOR_DIR / f"{name}.json")["frames"]


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_file_vector_encodes_to_its_frames(path):
    vec = load_vector(path)
    assert vec["version"] == wire.VERSION
    assert [f.hex() for f in encode_from_file(vec)] == vec["frames"]


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_file_vector_decodes_to_its_fields(path):
    vec = load_vector(path)
    batch = wire.decode([bytes.fromhex(f) for f in vec["frames"]])
    want = vec["decoded"]
    got = {k: getattr(batch, k) for k in ("group", "node", "epoch", "first_seq", "kernel_dropped")}
    assert got == {k: v for k, v in want.items() if k not in ("packets", "ifnames")}
    names = {int(k): v for k, v in want.get("ifnames", {}).items()} or None
    assert all(p.ifnames == names for p in batch.packets)
    assert [p.fields() for p in batch.packets] == [unhex(p) for p in want["packets"]]
    assert batch.next_seq == batch.first_seq + len(want["packets"])


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_file_vector_round_trips(path):
    frames = [bytes.fromhex(f) for f in load_vector(path)["frames"]]
    b = wire.decode(frames)
    names = b.packets[0].ifnames if b.packets else None
    again = wire.encode(b.group, b.node, b.epoch, b.first_seq, b.packets, b.kernel_dropped, names)
    assert with_flags(again, wire.header_flags(frames) & wire.FLAG_FILTERED) == frames


def test_vector_details():
    """What the vectors are there to show, said outright."""
    two = wire.decode([bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-two-packets.json")["frames"]])
    syn, udp = two.packets
    assert (syn.seq, udp.seq) == (1000, 1001)
    assert syn.prefix == "ssh-in: " and syn.mark == 42 and syn.indev == 2 and syn.outdev is None
    assert syn.hwaddr == bytes.fromhex("525400123456") and syn.kernel_seq == 7 and syn.uid is None
    assert not syn.truncated and syn.ts_kernel
    assert udp.truncated and (udp.len, udp.caplen) == (1280, 48) and not udp.ts_kernel
    assert (udp.uid, udp.gid, udp.outdev, udp.indev, udp.hwaddr) == (1000, 1000, 2, None, None)
    empty = wire.decode(
        [bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-empty-node-no-payload.json")["frames"]]
    )
    (pkt,) = empty.packets
    assert empty.node == "" and pkt.data == b"" and pkt.mark == 0 and pkt.prefix is None


def test_decode_accepts_zmq_frames_and_memoryviews():
    frames = encode_from_file(load_vector(VECTOR_FILES[0]))
    assert wire.decode([memoryview(f) for f in frames]).packets == wire.decode(frames).packets
    zmq = pytest.importorskip("zmq")
    assert wire.decode([zmq.Frame(f) for f in frames]).packets == wire.decode(frames).packets


# -- round trips -----------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
opt32 = st.none() | u32


@st.composite
def conntracks(draw):
    v6 = draw(st.booleans())
    addr = st.ip_addresses(v=6 if v6 else 4).map(str)
    proto = draw(st.sampled_from([6, 17, 1, 58, 47]))
    u16 = st.integers(0, 0xFFFF)
    u8 = st.integers(0, 255)

    def tup():
        ports = proto in (6, 17)
        icmp = proto in (1, 58)
        return wire.CtTuple(
            draw(addr),
            draw(addr),
            draw(u16) if ports else None,
            draw(u16) if ports else None,
            draw(u16) if icmp else None,
            draw(u8) if icmp else None,
            draw(u8) if icmp else None,
        )

    info = draw(st.none() | st.sampled_from(sorted(wire.CT_STATES)))
    state, reply_dir = wire.CT_STATES[info] if info is not None else (None, None)
    return wire.Conntrack(
        state=state,
        reply_dir=reply_dir,
        info=info,
        id=draw(opt32),
        mark=draw(opt32),
        status=draw(opt32),
        timeout=draw(opt32),
        zone=draw(st.none() | u16),
        proto=proto,
        orig=tup() if draw(st.booleans()) else None,
        reply=tup() if draw(st.booleans()) else None,
        labels=draw(st.none() | st.binary(max_size=16)),
    )


@st.composite
def packets(draw, group):
    data = draw(st.binary(max_size=300))
    length = draw(st.none() | st.integers(len(data), 2**32 - 1))
    return Packet.build(
        group,
        data,
        draw(st.integers(0, 2**64 - 1)),
        ts_kernel=draw(st.booleans()),
        len=length,
        prefix=draw(st.none() | st.text(max_size=64)),
        mark=draw(opt32),
        indev=draw(opt32),
        outdev=draw(opt32),
        physindev=draw(opt32),
        physoutdev=draw(opt32),
        uid=draw(opt32),
        gid=draw(opt32),
        hw_protocol=draw(st.sampled_from([0, 0x0800, 0x86DD]) | st.integers(0, 0xFFFF)),
        hook=draw(st.integers(0, 255)),
        hwaddr=draw(st.none() | st.binary(max_size=8)),
        kernel_seq=draw(opt32),
        ct=draw(st.none() | conntracks()),
        vlan=draw(
            st.none() | st.tuples(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)).map(lambda t: wire.Vlan(*t))
        ),
        l2hdr=draw(st.none() | st.binary(max_size=64)),
    )


@st.composite
def batches(draw):
    group = draw(st.integers(0, 0xFFFF))
    return dict(
        group=group,
        node=draw(st.text(max_size=20)),
        epoch=draw(st.integers(0, 2**64 - 1)),
        first_seq=draw(st.integers(0, 2**63)),
        packets=draw(st.lists(packets(group), max_size=8)),
        kernel_dropped=draw(st.integers(0, 2**64 - 1)),
    )


@given(batches())
@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
def test_encode_decode_encode_is_byte_exact(args):
    frames = wire.encode(**args)
    b = wire.decode(frames)
    assert (b.group, b.node, b.epoch, b.first_seq, b.kernel_dropped) == (
        args["group"],
        args["node"],
        args["epoch"],
        args["first_seq"],
        args["kernel_dropped"],
    )
    for i, (got, sent) in enumerate(zip(b.packets, args["packets"])):
        want = sent.fields()
        want.update(node=args["node"], seq=args["first_seq"] + i)
        assert got.fields() == want
    assert len(b.packets) == len(args["packets"])
    assert wire.encode(b.group, b.node, b.epoch, b.first_seq, b.packets, b.kernel_dropped) == frames


def widen(frames: list[bytes], record_size: int, filler: bytes = b"\xa5") -> list[bytes]:
    """The same message as a later minor version would send it, records padded to record_size."""
    topic, header, table, data = frames
    header = bytearray(header)
    (size,) = struct.unpack_from("<H", header, 12)
    struct.pack_into("<H", header, 12, record_size)
    pad = filler * (record_size - size)
    table = b"".join(table[i : i + size] + pad for i in range(0, len(table), size))
    return [topic, bytes(header), table, data]


@pytest.mark.parametrize("record_size", [73, 80, 128, 0xFFFF])
@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.stem)
def test_larger_record_size_is_read_as_its_first_72_bytes(path, record_size):
    frames = [bytes.fromhex(f) for f in load_vector(path)["frames"]]
    if record_size < HEADER.unpack_from(frames[1])[5]:
        pytest.skip("the vector's records are larger")
    want = wire.decode(frames)
    got = wire.decode(widen(frames, record_size))
    assert got.packets == want.packets
    assert (got.group, got.node, got.first_seq, got.epoch) == (
        want.group,
        want.node,
        want.first_seq,
        want.epoch,
    )


def test_a_reader_of_72_byte_records_reads_extended_ones():
    """What a version-1 reader that knows only the first 72 bytes gets from v1-extended: every
    field it knows, and the extension's presence bits, which it ignores."""
    frames = [bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-extended.json")["frames"]]
    full = wire.decode(frames)
    topic, header, table, data = frames
    old = [topic, header[:12] + struct.pack("<H", RECORD.size) + header[14:]]
    old += [b"".join(table[i : i + RECORD.size] for i in range(0, len(table), wire.RECORD_X.size)), data]
    narrow = wire.decode(old)
    for a, b in zip(full.packets, narrow.packets):
        assert {k: v for k, v in a.fields().items() if k not in wire.EXT_FIELDS} == b.fields()
        assert b.ct is None and b.vlan is None and b.l2hdr is None
    one, two = full.packets
    assert one.ct.orig.dst == "203.0.113.9" and one.ct.reply.src == "198.51.100.7"
    assert two.vlan.id == 5 and two.l2hdr[12:] == b"\x08\x00"


def test_names_trailer_and_readers_that_ignore_it():
    frames = [bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-ifnames.json")["frames"]]
    (pkt,) = wire.decode(frames).packets
    assert (pkt.indev_name, pkt.outdev_name, pkt.physindev_name) == ("eth0", "wan", None)
    # A reader that ignores flags reads the same record and payload: the trailer is behind them.
    header = bytearray(frames[1])
    header[5] = 0
    (plain,) = wire.decode([frames[0], bytes(header), frames[2], frames[3]]).packets
    assert plain.fields() == pkt.fields() and plain.indev_name is None


@pytest.mark.parametrize(
    "data, error",
    [
        (b"\x01", "too few for the names trailer"),
        (struct.pack("<HH", 1, 40), "names trailer of 40 bytes beyond frame 3"),
        (struct.pack("<IB", 2, 9) + b"eth0" + struct.pack("<HH", 1, 9), "a name beyond its end"),
        (struct.pack("<IB", 2, 1) + b"e" + b"xx" + struct.pack("<HH", 1, 8), "2 bytes after its 1 entries"),
    ],
)
def test_bad_names_trailers(data, error):
    frames = wire.encode(5, "r1", 1, 0, [Packet.build(5, ts_ns=1)])
    header = bytearray(frames[1])
    header[5] = wire.FLAG_IFNAMES
    with pytest.raises(WireError, match=error):
        wire.decode([frames[0], bytes(header), frames[2], data])


def test_payload_reaching_into_the_names_trailer_is_rejected():
    frames = [bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-ifnames.json")["frames"]]
    table = bytearray(frames[2])
    struct.pack_into("<I", table, 12, 30)  # caplen 30: 2 bytes into the trailer at 28
    with pytest.raises(WireError, match="payload 0\\+30 beyond data \\(28 bytes\\)"):
        wire.decode(frames[:2] + [bytes(table), frames[3]])


def test_extension_parts_must_lie_in_the_data_frame():
    frames = [bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-extended.json")["frames"]]
    table = bytearray(frames[2])
    struct.pack_into("<I", table, 72, 200)  # record 0's ct_off: 200 + 128 > 207
    with pytest.raises(WireError, match="record 0: conntrack block 200\\+128 beyond data"):
        wire.decode(frames[:2] + [bytes(table), frames[3]])
    table = bytearray(frames[2])
    struct.pack_into("<H", table, 76, 64)
    with pytest.raises(WireError, match="conntrack block of 64 bytes"):
        wire.decode(frames[:2] + [bytes(table), frames[3]])
    table = bytearray(frames[2])
    struct.pack_into("<H", table, 88 + 78, 15)  # record 1's l2hdr_len: 193 + 15 > 207
    with pytest.raises(WireError, match="record 1: l2hdr 193\\+15 beyond data"):
        wire.decode(frames[:2] + [bytes(table), frames[3]])


# -- malformed input -----------------------------------------------------------------------------


def base() -> list[bytes]:
    return [bytes.fromhex(f) for f in load_vector(VECTOR_DIR / "v1-two-packets.json")["frames"]]


def with_header(**fields) -> list[bytes]:
    """The base message with header fields replaced (the frame keeps its node bytes)."""
    frames = base()
    names = ("magic", "version", "flags", "group", "count", "record_size", "node_len", "epoch", "first_seq")
    values = dict(zip(names + ("kernel_dropped",), HEADER.unpack_from(frames[1])))
    values.update(fields)
    frames[1] = HEADER.pack(*values.values()) + frames[1][HEADER.size :]
    return frames


def with_record(index: int, **fields) -> list[bytes]:
    frames = base()
    names = (
        "ts_ns data_off caplen len mark indev outdev physindev physoutdev uid gid kernel_seq"
        " prefix_off prefix_len hw_protocol present hwaddr_len hook hwaddr"
    ).split()
    table = bytearray(frames[2])
    values = dict(zip(names, RECORD.unpack_from(table, index * RECORD.size)))
    values.update(fields)
    RECORD.pack_into(table, index * RECORD.size, *values.values())
    frames[2] = bytes(table)
    return frames


def replace(i: int, frame: bytes) -> list[bytes]:
    frames = base()
    frames[i] = frame
    return frames


MALFORMED = {
    "no frames": ([], r"expected 4 frames, got 0"),
    "three frames": (base()[:3], r"expected 4 frames, got 3"),
    "five frames": (base() + [b""], r"expected 4 frames, got 5"),
    "empty header": (replace(1, b""), r"header is 0 bytes, expected at least 40"),
    "short header": (replace(1, base()[1][:39]), r"header is 39 bytes, expected at least 40"),
    "bad magic": (with_header(magic=b"NFLX"), r"bad magic b'NFLX', expected b'NFLD'"),
    "version 0": (with_header(version=0), r"unsupported version 0, this decoder reads 1"),
    "version 2": (with_header(version=2), r"unsupported version 2, this decoder reads 1"),
    "topic of another group": (replace(0, wire.topic(259)), r"topic 0103 does not match header group 258"),
    "topic little-endian": (replace(0, b"\x02\x01"), r"topic 0201 does not match header group 258"),
    "topic too long": (replace(0, base()[0] + b"\0"), r"topic 010200 does not match header group 258"),
    "empty topic": (replace(0, b""), r"topic  does not match header group 258"),
    "node_len above 255": (with_header(node_len=256), r"node_len 256 exceeds 255"),
    "node_len too long": (with_header(node_len=5), r"header is 44 bytes, node_len says 45"),
    "node_len too short": (with_header(node_len=3), r"header is 44 bytes, node_len says 43"),
    "node not UTF-8": (replace(1, base()[1][:40] + b"gw\xff1"), r"node name is not UTF-8"),
    "record_size 0": (with_header(record_size=0), r"record_size 0 is below version 1's 72"),
    "record_size 71": (with_header(record_size=71), r"record_size 71 is below version 1's 72"),
    "count too high": (with_header(count=3), r"record table is 144 bytes, 3 records need 216"),
    "count too low": (with_header(count=1), r"record table is 144 bytes, 1 records need 72"),
    "huge count": (with_header(count=2**32 - 1), r"record table is 144 bytes, 4294967295 records need"),
    "record table cut": (replace(2, base()[2][:-1]), r"record table is 143 bytes, 2 records need 144"),
    "record_size larger than sent": (
        with_header(record_size=80),
        r"record table is 144 bytes, 2 records need 160",
    ),
    "payload beyond data": (with_record(1, caplen=54), r"record 1: payload 48\+54 beyond data \(101 bytes\)"),
    "data_off beyond data": (
        with_record(0, data_off=200),
        r"record 0: payload 200\+40 beyond data \(101 bytes\)",
    ),
    "data frame cut": (replace(3, base()[3][:50]), r"record 1: payload 48\+48 beyond data \(50 bytes\)"),
    "prefix beyond data": (with_record(1, prefix_len=6), r"record 1: prefix 96\+6 beyond data \(101 bytes\)"),
    "prefix_off beyond data": (
        with_record(0, prefix_off=0xFFFFFFFF),
        r"record 0: prefix 4294967295\+8 beyond data \(101 bytes\)",
    ),
    "hwaddr_len above 8": (with_record(0, hwaddr_len=9), r"record 0: hwaddr_len 9 exceeds the 8-byte hwaddr"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_is_a_wire_error_naming_the_fault(name):
    frames, message = MALFORMED[name]
    with pytest.raises(WireError, match=message):
        wire.decode(frames)


def test_wire_error_is_a_value_error():
    assert issubclass(WireError, ValueError)


def test_bits_that_do_not_change_reading_are_ignored():
    """Unassigned flags, the extension's present bits in a 72-byte record, bytes of absent
    fields: read past, not rejected."""
    want = wire.decode(base())
    assert wire.decode(with_header(flags=0xFF & ~wire.FLAG_IFNAMES)).packets == want.packets
    got = wire.decode(with_record(1, present=0x1BC8 | 0xE000, mark=77, indev=9, hwaddr=b"junkjunk"))
    assert got.packets[1].mark is None and got.packets[1].indev is None and got.packets[1].hwaddr is None
    # a prefix_off/len out of range is no fault while the PREFIX bit is clear
    assert (
        wire.decode(with_record(1, present=0x1BC8 & ~wire.F_PREFIX, prefix_off=10**9)).packets[1].prefix
        is None
    )


def test_non_utf8_prefix_falls_back_to_latin1():
    frames = base()
    data = bytearray(frames[3])
    data[40:48] = b"caf\xe9 in:"
    frames[3] = bytes(data)
    assert wire.decode(frames).packets[0].prefix == "caf\xe9 in:"


def test_encoder_refuses_what_the_format_cannot_carry():
    with pytest.raises(ValueError, match="node name is 256 bytes in UTF-8, at most 255"):
        wire.encode(1, "n" * 256, 1, 0, [])
    with pytest.raises(ValueError, match="hwaddr is 9 bytes, at most 8"):
        Packet.build(1, b"x", hwaddr=b"123456789")
    assert wire.decode(wire.encode(1, "é" * 127, 1, 0, [])).node == "é" * 127


# -- fuzzing -------------------------------------------------------------------------------------


def decode_or_error(frames):
    try:
        result = wire.decode(frames)
    except WireError as e:
        assert str(e), "a WireError must say what is wrong"
        return e
    assert isinstance(result, Batch)
    return result


@given(st.lists(st.binary(max_size=200), max_size=6))
@settings(max_examples=500)
def test_arbitrary_frames_give_a_batch_or_a_wire_error(frames):
    decode_or_error(frames)


@st.composite
def plausible_messages(draw):
    """Valid headers around arbitrary records and data, so fuzzing gets past the header checks."""
    group = draw(st.integers(0, 0xFFFF))
    node = draw(st.binary(max_size=12))
    count = draw(st.integers(0, 4))
    record_size = draw(st.sampled_from([72, 72, 80, draw(st.integers(0, 200))]))
    header = HEADER.pack(wire.MAGIC, 1, 0, group, count, record_size, len(node), 1, 0, 0) + node
    table = draw(st.binary(min_size=count * record_size, max_size=count * record_size))
    data = draw(st.binary(max_size=64))
    return [wire.topic(group), header, table, data]


@given(plausible_messages())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.large_base_example])
def test_plausible_messages_give_a_batch_or_a_wire_error(frames):
    decode_or_error(frames)


@given(st.data())
@settings(max_examples=300)
def test_mutated_vectors_give_a_batch_or_a_wire_error(data):
    frames = base()
    i = data.draw(st.integers(0, 3))
    frame = bytearray(frames[i])
    if frame:
        pos = data.draw(st.integers(0, len(frame) - 1))
        frame[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(frame)))
    frames[i] = bytes(frame[:cut]) if data.draw(st.booleans()) else bytes(frame)
    decode_or_error(frames)
