"""The nflogd feed's wire format, version 1: the one encoder and decoder of the code base.

The daemon and every client import this module; ``docs/wire-format.md`` is its
contract, with byte vectors that ``tests/test_wire.py`` checks.

One ZeroMQ message carries one kernel batch of one group, in four frames::

    [topic: group u16 BE] [header] [record table: count x 72 bytes] [data: payloads, prefixes]

Decode a received message::

    batch = decode(sock.recv_multipart(copy=True))
    for pkt in batch.packets:
        print(pkt.group, pkt.seq, pkt.ts, pkt.len, pkt.data[:20])

Encode one (tests, tools; the daemon hands over the record table its C parser filled)::

    frames = encode(group=5, node="r1", epoch=1, first_seq=0,
                    packets=[Packet.build(group=5, data=b"...", ts_ns=...)])
"""

from __future__ import annotations

import struct
from typing import Any, Iterable, Sequence

__all__ = [
    "VERSION",
    "MAGIC",
    "TOPIC",
    "HEADER",
    "RECORD",
    "WireError",
    "Packet",
    "Batch",
    "topic",
    "frames",
    "encode",
    "pack_records",
    "decode",
    "FLAG_FILTERED",
    "header_flags",
]

VERSION = 1
MAGIC = b"NFLD"

#: Frame 0, the subscription topic: the group, big-endian, so that prefix matching
#: at the publisher filters exact groups (group 5 never matches 50).
TOPIC = struct.Struct(">H")

#: Frame 1: magic, version, flags, group, count, record_size, node_len,
#: epoch, first_seq, kernel_dropped; the node name (UTF-8, node_len bytes) follows.
HEADER = struct.Struct("<4sBBHIHHQQQ")

#: Frame 2 holds ``count`` records of ``record_size`` bytes; version 1 defines the
#: first 72. The daemon's C parser fills ``struct nflogd_record`` (nflogd/_nflog.h)
#: in exactly this layout.
RECORD = struct.Struct("<QIIIIIIIIIIIIHHHBB8s")

# Bits of a record's ``present`` field: which optional attributes the kernel sent.
F_TS_KERNEL = 0x0001  # ts_ns is the kernel's timestamp (else: the daemon's receive time)
F_MARK = 0x0002
F_INDEV = 0x0004
F_OUTDEV = 0x0008
F_PHYSINDEV = 0x0010
F_PHYSOUTDEV = 0x0020
F_UID = 0x0040
F_GID = 0x0080
F_KSEQ = 0x0100  # kernel_seq: the NFLOG instance's own sequence number
F_PREFIX = 0x0200
F_HWADDR = 0x0400
F_PAYLOAD = 0x0800
F_LEN_FROM_HEADER = 0x1000  # the copy cut the packet: len is from the IPv4/IPv6 header (else len == caplen)

MAX_NODE = 255


class WireError(ValueError):
    """A message that is not a valid version-1 nflogd batch; the text says what is wrong."""


class Packet:
    """One captured packet.

    ``ts`` is seconds since the epoch (float), ``ts_ns`` the same in integer
    nanoseconds; ``ts_kernel`` is False where the kernel sent no timestamp (packets
    logged at OUTPUT or POSTROUTING) and the daemon's receive time stands in.
    ``len`` is the packet's real length, ``caplen == len(data)`` what was copied.
    ``seq`` is the feed's per-(node, group) sequence number. Attributes the kernel
    did not send are ``None``: ``prefix``, ``mark``, ``indev``, ``outdev``,
    ``physindev``, ``physoutdev``, ``uid``, ``gid``, ``hwaddr``, ``kernel_seq``.
    """

    __slots__ = ("_r", "data", "group", "node", "seq", "prefix")

    def __init__(
        self, raw: tuple[Any, ...], data: bytes, group: int, node: str, seq: int, prefix: str | None
    ):
        self._r = raw
        self.data = data
        self.group = group
        self.node = node
        self.seq = seq
        self.prefix = prefix

    @classmethod
    def build(
        cls,
        group: int,
        data: bytes = b"",
        ts_ns: int = 0,
        *,
        ts_kernel: bool = True,
        len: int | None = None,  # noqa: A002 - the record's field name
        node: str = "",
        seq: int = 0,
        prefix: str | None = None,
        mark: int | None = None,
        indev: int | None = None,
        outdev: int | None = None,
        physindev: int | None = None,
        physoutdev: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        hw_protocol: int = 0,
        hook: int = 0,
        hwaddr: bytes | None = None,
        kernel_seq: int | None = None,
    ) -> Packet:
        """A packet from its fields (for tests and tools); absent attributes stay ``None``."""
        present = F_PAYLOAD if data else 0
        if ts_kernel:
            present |= F_TS_KERNEL
        if len is not None and len != builtins_len(data):
            present |= F_LEN_FROM_HEADER
        opt = (mark, indev, outdev, physindev, physoutdev, uid, gid, kernel_seq)
        bits = (F_MARK, F_INDEV, F_OUTDEV, F_PHYSINDEV, F_PHYSOUTDEV, F_UID, F_GID, F_KSEQ)
        for value, bit in zip(opt, bits):
            if value is not None:
                present |= bit
        if prefix is not None:
            present |= F_PREFIX
        if hwaddr is not None:
            if builtins_len(hwaddr) > 8:
                raise ValueError(f"hwaddr is {builtins_len(hwaddr)} bytes, at most 8 fit the record")
            present |= F_HWADDR
        hw = hwaddr or b""
        raw = (
            ts_ns,
            0,
            builtins_len(data),
            builtins_len(data) if len is None else len,
            *(v or 0 for v in opt[:7]),
            kernel_seq or 0,
            0,
            0,
            hw_protocol,
            present,
            builtins_len(hw),
            hook,
            hw.ljust(8, b"\0"),
        )
        return cls(raw, bytes(data), group, node, seq, prefix)

    # The record tuple is RECORD's field order:
    # 0 ts_ns, 1 data_off, 2 caplen, 3 len, 4 mark, 5 indev, 6 outdev, 7 physindev,
    # 8 physoutdev, 9 uid, 10 gid, 11 kernel_seq, 12 prefix_off, 13 prefix_len,
    # 14 hw_protocol, 15 present, 16 hwaddr_len, 17 hook, 18 hwaddr.

    def _opt(self, index: int, bit: int) -> int | None:
        r = self._r
        return r[index] if r[15] & bit else None

    ts_ns = property(lambda self: self._r[0], doc="timestamp, integer ns since the epoch")
    ts = property(lambda self: self._r[0] / 1e9, doc="timestamp, float seconds")
    ts_kernel = property(lambda self: bool(self._r[15] & F_TS_KERNEL))
    caplen = property(lambda self: self._r[2], doc="bytes captured (== len(data))")
    len = property(lambda self: self._r[3], doc="the packet's real length in bytes")
    hw_protocol = property(lambda self: self._r[14], doc="ethertype: 0x0800 IPv4, 0x86dd IPv6")
    hook = property(lambda self: self._r[17], doc="netfilter hook: 0 PREROUTING .. 4 POSTROUTING")
    present = property(lambda self: self._r[15], doc="F_* bits of the attributes sent")
    mark = property(lambda self: self._opt(4, F_MARK))
    indev = property(lambda self: self._opt(5, F_INDEV), doc="input ifindex")
    outdev = property(lambda self: self._opt(6, F_OUTDEV), doc="output ifindex")
    physindev = property(lambda self: self._opt(7, F_PHYSINDEV))
    physoutdev = property(lambda self: self._opt(8, F_PHYSOUTDEV))
    uid = property(lambda self: self._opt(9, F_UID), doc="uid of the local socket")
    gid = property(lambda self: self._opt(10, F_GID), doc="gid of the local socket")
    kernel_seq = property(lambda self: self._opt(11, F_KSEQ))

    @property
    def truncated(self) -> bool:
        """True where the copy range cut the packet (``caplen < len``)."""
        return bool(self._r[2] < self._r[3])

    @property
    def hwaddr(self) -> bytes | None:
        r = self._r
        return r[18][: r[16]] if r[15] & F_HWADDR else None

    def fields(self) -> dict[str, Any]:
        """Every field by name, for printing and comparing."""
        return {name: getattr(self, name) for name in FIELDS}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Packet) and self.fields() == other.fields()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"<Packet node={self.node!r} group={self.group} seq={self.seq} ts={self.ts:.6f}"
            f" len={self.len} caplen={self.caplen}>"
        )


builtins_len = len

FIELDS = (
    "group", "node", "seq", "ts_ns", "ts_kernel", "len", "caplen", "data", "prefix",
    "mark", "indev", "outdev", "physindev", "physoutdev", "uid", "gid", "hw_protocol",
    "hook", "hwaddr", "kernel_seq",
)  # fmt: skip


class Batch:
    """One decoded message: the header's fields and the list of packets.

    ``first_seq`` is the feed sequence number of ``packets[0]``; the next batch
    of the same (node, group) starts at ``next_seq``. ``epoch`` changes when the
    daemon restarts. ``kernel_dropped`` is the group's kernel loss so far in this epoch.
    """

    __slots__ = ("group", "node", "epoch", "first_seq", "kernel_dropped", "packets")

    def __init__(
        self, group: int, node: str, epoch: int, first_seq: int, kernel_dropped: int, packets: list[Packet]
    ) -> None:
        self.group = group
        self.node = node
        self.epoch = epoch
        self.first_seq = first_seq
        self.kernel_dropped = kernel_dropped
        self.packets = packets

    @property
    def next_seq(self) -> int:
        return self.first_seq + builtins_len(self.packets)

    def __repr__(self) -> str:
        return (
            f"<Batch node={self.node!r} group={self.group} epoch={self.epoch}"
            f" seq={self.first_seq}+{builtins_len(self.packets)}>"
        )


def topic(group: int) -> bytes:
    """The subscription prefix for one group."""
    return TOPIC.pack(group)


def frames(
    group: int,
    node: str | bytes,
    epoch: int,
    first_seq: int,
    kernel_dropped: int,
    count: int,
    table: bytes,
    data: bytes,
) -> list[bytes]:
    """The four frames of one message around an already packed record table."""
    node_b = node.encode() if isinstance(node, str) else node
    if builtins_len(node_b) > MAX_NODE:
        raise ValueError(f"node name is {builtins_len(node_b)} bytes in UTF-8, at most {MAX_NODE}")
    header = HEADER.pack(
        MAGIC, VERSION, 0, group, count, RECORD.size, builtins_len(node_b),
        epoch, first_seq, kernel_dropped,
    ) + node_b  # fmt: skip
    return [TOPIC.pack(group), header, table, data]


def pack_records(packets: Iterable[Packet]) -> tuple[int, bytes, bytes]:
    """Pack packets into (count, record table, data), offsets pointing into data."""
    table = bytearray()
    data = bytearray()
    count = 0
    for p in packets:
        r = list(p._r)
        r[1] = builtins_len(data)
        data += p.data
        if p.prefix is not None:
            prefix = p.prefix.encode()
            if builtins_len(prefix) > 0xFFFF:  # prefix_len is a u16
                raise ValueError(f"prefix is {builtins_len(prefix)} bytes in UTF-8, at most 65535")
            r[12], r[13] = builtins_len(data), builtins_len(prefix)
            data += prefix
        else:
            r[12] = r[13] = 0
        table += RECORD.pack(*r)
        count += 1
    return count, bytes(table), bytes(data)


def encode(
    group: int,
    node: str,
    epoch: int,
    first_seq: int,
    packets: Sequence[Packet],
    kernel_dropped: int = 0,
) -> list[bytes]:
    """One message from packet objects."""
    count, table, data = pack_records(packets)
    return frames(group, node, epoch, first_seq, kernel_dropped, count, table, data)


def decode(msg: Sequence[bytes]) -> Batch:
    """Decode one message (its frames as bytes or zmq Frames); raise WireError if it is not one."""
    if builtins_len(msg) != 4:
        raise WireError(f"expected 4 frames, got {builtins_len(msg)}")
    topic_b, header, table, data = (bytes(f) if not isinstance(f, bytes) else f for f in msg)
    if builtins_len(header) < HEADER.size:
        raise WireError(f"header is {builtins_len(header)} bytes, expected at least {HEADER.size}")
    (magic, version, _flags, group, count, rsize, node_len, epoch, first_seq, kdrop) = HEADER.unpack_from(
        header
    )
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(f"unsupported version {version}, this decoder reads {VERSION}")
    if topic_b != TOPIC.pack(group):
        raise WireError(f"topic {topic_b.hex()} does not match header group {group}")
    if node_len > MAX_NODE:
        raise WireError(f"node_len {node_len} exceeds {MAX_NODE}")
    if builtins_len(header) != HEADER.size + node_len:
        raise WireError(f"header is {builtins_len(header)} bytes, node_len says {HEADER.size + node_len}")
    try:
        node = header[HEADER.size :].decode()
    except UnicodeDecodeError as e:
        raise WireError(f"node name is not UTF-8: {e}") from None
    if rsize < RECORD.size:
        raise WireError(f"record_size {rsize} is below version 1's {RECORD.size}")
    if builtins_len(table) != count * rsize:
        raise WireError(f"record table is {builtins_len(table)} bytes, {count} records need {count * rsize}")
    if rsize != RECORD.size:  # a later minor version appended fields: read the first 72 bytes
        table = b"".join(table[i : i + RECORD.size] for i in range(0, builtins_len(table), rsize))
    dlen = builtins_len(data)
    packets: list[Packet] = []
    append = packets.append
    seq = first_seq
    new = Packet.__new__
    for r in RECORD.iter_unpack(table):
        off = r[1]
        end = off + r[2]
        if end > dlen or r[16] > 8:
            if end > dlen:
                raise WireError(f"record {seq - first_seq}: payload {off}+{r[2]} beyond data ({dlen} bytes)")
            raise WireError(f"record {seq - first_seq}: hwaddr_len {r[16]} exceeds the 8-byte hwaddr field")
        if r[15] & F_PREFIX:
            pend = r[12] + r[13]
            if pend > dlen:
                raise WireError(
                    f"record {seq - first_seq}: prefix {r[12]}+{r[13]} beyond data ({dlen} bytes)"
                )
            try:
                prefix = data[r[12] : pend].decode()
            except UnicodeDecodeError:
                prefix = data[r[12] : pend].decode("latin-1")
        else:
            prefix = None
        p = new(Packet)
        p._r = r
        p.data = data[off:end]
        p.group = group
        p.node = node
        p.seq = seq
        p.prefix = prefix
        append(p)
        seq += 1
    return Batch(group, node, epoch, first_seq, kdrop, packets)


#: Header flag: the message went through a reader's filter at the daemon; it holds only the
#: packets that filter passed, and ``first_seq`` numbers them (docs/wire-format.md, "Filters").
FLAG_FILTERED = 0x01


def header_flags(msg: Sequence[bytes]) -> int:
    """The header's ``flags`` byte of a message (0 if it has no header to read)."""
    if builtins_len(msg) < 2 or builtins_len(msg[1]) < HEADER.size:
        return 0
    return bytes(msg[1][5:6])[0]
