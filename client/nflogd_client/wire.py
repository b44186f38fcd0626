"""The nflogd feed's wire format, version 1: the one encoder and decoder of the code base.

The daemon and every client import this module; ``docs/wire-format.md`` is its
contract, with byte vectors that ``tests/test_wire.py`` checks.

One ZeroMQ message carries one kernel batch of one group, in four frames::

    [topic: group u16 BE] [header] [record table: count x 72 or 88 bytes] [data: payloads, prefixes, ...]

Decode a received message::

    batch = decode(sock.recv_multipart(copy=True))
    for pkt in batch.packets:
        print(pkt.group, pkt.seq, pkt.ts, pkt.len, pkt.data[:20])

Encode one (tests, tools; the daemon hands over the record table its C parser filled)::

    frames = encode(group=5, node="r1", epoch=1, first_seq=0,
                    packets=[Packet.build(group=5, data=b"...", ts_ns=...)])
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any, Iterable, NamedTuple, Sequence

__all__ = [
    "VERSION",
    "MAGIC",
    "TOPIC",
    "HEADER",
    "RECORD",
    "RECORD_X",
    "CT",
    "WireError",
    "Packet",
    "Conntrack",
    "CtTuple",
    "Vlan",
    "Batch",
    "topic",
    "frames",
    "names_trailer",
    "FLAG_IFNAMES",
    "encode",
    "pack_records",
    "decode",
    "FLAG_FILTERED",
    "FILTERED_TOPIC",
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

#: The record with the version-1 extension (record_size 88): RECORD's fields, then ct_off,
#: ct_len, l2hdr_len, l2hdr_off, vlan_tci, vlan_proto. Readers of 72-byte records never see it.
RECORD_X = struct.Struct(RECORD.format + "IHHIHH")

#: The conntrack block in frame 3 (``struct nflogd_ct``, 128 bytes) at a record's ct_off:
#: present, family, proto, info, id, mark, status, timeout, zone, (2 reserved), labels_len,
#: (3 reserved), then the original and the reply tuple (src, dst, sport, dport, icmp_id,
#: icmp_type, icmp_code) and 16 bytes of labels.
_TUPLE = "16s16sHHHBB"
CT = struct.Struct("<HBBIIIIIH2xB3x" + _TUPLE + _TUPLE + "16s")
_NFIELDS = 19  # RECORD's fields

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
F_CT = 0x2000  # a conntrack block in frame 3 (extension: ct_off, ct_len)
F_VLAN = 0x4000  # extension: vlan_tci, vlan_proto
F_L2HDR = 0x8000  # the link-layer header in frame 3 (extension: l2hdr_off, l2hdr_len)
F_EXT = F_CT | F_VLAN | F_L2HDR  # the bits only an extended record (record_size >= 88) has

# Bits of the conntrack block's ``present``.
CT_INFO = 0x0001
CT_ID = 0x0002
CT_MARK = 0x0004
CT_STATUS = 0x0008
CT_ZONE = 0x0010
CT_ORIG = 0x0020
CT_REPLY = 0x0040
CT_LABELS = 0x0080
CT_TIMEOUT = 0x0100

#: enum ip_conntrack_info: the packet's relation to its connection, and its direction.
CT_STATES = {
    0: ("established", False),
    1: ("related", False),
    2: ("new", False),
    3: ("established", True),
    4: ("related", True),
    7: ("untracked", False),
}

MAX_NODE = 255

#: Header flag: frame 3 ends with the names of the batch's interfaces (``names_trailer``).
FLAG_IFNAMES = 0x01
#: Header flag: the message went through a reader's filter at the daemon; it holds only the
#: packets that filter passed, and ``first_seq`` numbers them (docs/wire-format.md, "Filters").
FLAG_FILTERED = 0x02
#: A filtered message's topic when its reader subscribed in this form (docs/wire-format.md,
#: "Filters"): these 5 bytes, the filter's 8-byte id, the group's 2.
FILTERED_TOPIC = b"\xffNFLG"
_TRAILER_END = struct.Struct("<HH")  # entries, their bytes
_NAME_ENTRY = struct.Struct("<IB")  # ifindex, name bytes (the name follows)


class WireError(ValueError):
    """A message that is not a valid version-1 nflogd batch; the text says what is wrong."""


class CtTuple(NamedTuple):
    """One direction of a connection: addresses as text, ports (TCP, UDP, SCTP, DCCP) or
    ICMP id/type/code, None where the protocol has none."""

    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None
    icmp_id: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None


class Conntrack(NamedTuple):
    """The packet's connection (``conntrack: true`` groups): ``orig`` is the tuple as the
    first packet had it (before NAT), ``reply`` the one replies carry (after NAT). ``state``
    is ``new``, ``established``, ``related`` or ``untracked``; ``reply_dir`` True for a
    packet of the reply direction. Attributes the kernel did not send are None."""

    state: str | None
    reply_dir: bool | None
    info: int | None
    id: int | None
    mark: int | None
    status: int | None
    timeout: int | None
    zone: int | None
    proto: int
    orig: CtTuple | None
    reply: CtTuple | None
    labels: bytes | None

    def as_dict(self) -> dict[str, Any]:
        """Plain types, for JSON: tuples as mappings, labels as hex."""
        d = self._asdict()
        for k in ("orig", "reply"):
            if d[k] is not None:
                d[k] = {n: v for n, v in d[k]._asdict().items() if v is not None}
        if d["labels"] is not None:
            d["labels"] = d["labels"].hex()
        return d

    @classmethod
    def unpack(cls, raw: bytes) -> Conntrack:
        """From a conntrack block (``CT``)."""
        v = CT.unpack_from(raw)
        present, family, proto, info = v[0], v[1], v[2], v[3]
        alen = 16 if family == 10 else 4
        icmp = proto in (1, 58)
        ports = proto in (6, 17, 33, 132, 136)

        def tup(i: int) -> CtTuple:
            src, dst, sport, dport, icmp_id, icmp_type, icmp_code = v[i : i + 7]
            return CtTuple(
                str(ipaddress.ip_address(src[:alen])),
                str(ipaddress.ip_address(dst[:alen])),
                sport if ports else None,
                dport if ports else None,
                icmp_id if icmp else None,
                icmp_type if icmp else None,
                icmp_code if icmp else None,
            )

        state, reply_dir = CT_STATES.get(info, (None, None)) if present & CT_INFO else (None, None)

        def opt(value: Any, bit: int) -> Any:
            return value if present & bit else None

        return cls(
            state,
            reply_dir,
            opt(info, CT_INFO),
            opt(v[4], CT_ID),
            opt(v[5], CT_MARK),
            opt(v[6], CT_STATUS),
            opt(v[7], CT_TIMEOUT),
            opt(v[8], CT_ZONE),
            proto,
            tup(10) if present & CT_ORIG else None,
            tup(17) if present & CT_REPLY else None,
            v[24][: v[9]] if present & CT_LABELS else None,
        )

    def pack(self) -> bytes:
        """The conntrack block (``CT``); the inverse of ``unpack``."""
        present = 0
        family = 2
        for t in (self.orig, self.reply):
            if t is not None and ipaddress.ip_address(t.src).version == 6:
                family = 10
        vals: list[Any] = []
        for value, bit in (
            (self.info, CT_INFO), (self.id, CT_ID), (self.mark, CT_MARK), (self.status, CT_STATUS),
            (self.timeout, CT_TIMEOUT), (self.zone, CT_ZONE),
        ):  # fmt: skip
            if value is not None:
                present |= bit
            vals.append(value or 0)
        tuples: list[Any] = []
        for t, bit in ((self.orig, CT_ORIG), (self.reply, CT_REPLY)):
            if t is None:
                tuples += [b"", b"", 0, 0, 0, 0, 0]
                continue
            present |= bit
            tuples += [
                ipaddress.ip_address(t.src).packed,
                ipaddress.ip_address(t.dst).packed,
                *(x or 0 for x in t[2:]),
            ]
        labels = self.labels or b""
        if self.labels is not None:
            present |= CT_LABELS
        info, cid, mark, status, timeout, zone = vals
        return CT.pack(
            present, family, self.proto, info, cid, mark, status, timeout, zone,
            builtins_len(labels), *tuples, labels,
        )  # fmt: skip


class Vlan(NamedTuple):
    """The 802.1Q tag the packet carried (NFULA_VLAN): ``tci`` whole, ``proto`` 0x8100 or 0x88a8."""

    tci: int
    proto: int

    @property
    def id(self) -> int:
        """The VLAN id, 0..4095."""
        return self.tci & 0x0FFF

    @property
    def pcp(self) -> int:
        """The priority code point, 0..7."""
        return self.tci >> 13


class Packet:
    """One captured packet.

    ``ts`` is seconds since the epoch (float), ``ts_ns`` the same in integer
    nanoseconds; ``ts_kernel`` is False where the kernel sent no timestamp (packets
    logged at OUTPUT or POSTROUTING) and the daemon's receive time stands in.
    ``len`` is the packet's real length, ``caplen == len(data)`` what was copied.
    ``seq`` is the feed's per-(node, group) sequence number. Attributes the kernel
    did not send are ``None``: ``prefix``, ``mark``, ``indev``, ``outdev``,
    ``physindev``, ``physoutdev``, ``uid``, ``gid``, ``hwaddr``, ``kernel_seq``, and those
    of the record's extension: ``ct`` (a ``Conntrack``), ``vlan`` (a ``Vlan``), ``l2hdr``
    (the link-layer header's bytes). ``indev_name`` and the other ``*_name``s are the
    router's names of the interfaces, where the feed told them (``ifnames``), else None.
    """

    __slots__ = ("_r", "data", "group", "node", "seq", "prefix", "_x", "ifnames")

    def __init__(
        self,
        raw: tuple[Any, ...],
        data: bytes,
        group: int,
        node: str,
        seq: int,
        prefix: str | None,
        ext: tuple[bytes | None, bytes | None] | None = None,
    ):
        self._r = raw
        self.data = data
        self.group = group
        self.node = node
        self.seq = seq
        self.prefix = prefix
        self._x = ext  # (conntrack block, l2hdr) of an extended record
        self.ifnames: dict[int, str] | None = None

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
        ct: Conntrack | None = None,
        vlan: Vlan | tuple[int, int] | None = None,
        l2hdr: bytes | None = None,
    ) -> Packet:
        """A packet from its fields (for tests and tools); absent attributes stay ``None``.
        ``ct``, ``vlan`` or ``l2hdr`` make it an extended record (``RECORD_X``)."""
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
        if ct is None and vlan is None and l2hdr is None:
            return cls(raw, bytes(data), group, node, seq, prefix)
        if l2hdr is not None and builtins_len(l2hdr) > 0xFFFF:
            raise ValueError(f"l2hdr is {builtins_len(l2hdr)} bytes, at most 65535")
        present |= F_CT if ct is not None else 0
        present |= F_VLAN if vlan is not None else 0
        present |= F_L2HDR if l2hdr is not None else 0
        tci, vproto = vlan if vlan is not None else (0, 0)
        raw = (*raw[:15], present, *raw[16:], 0, 0, 0, 0, tci, vproto)
        return cls(raw, bytes(data), group, node, seq, prefix, (ct.pack() if ct else None, l2hdr))

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

    # The extension's fields: 19 ct_off, 20 ct_len, 21 l2hdr_len, 22 l2hdr_off, 23 vlan_tci,
    # 24 vlan_proto; its data in _x.

    @property
    def extended(self) -> bool:
        """True for a record with the extension (record_size 88 and more)."""
        return self._x is not None

    @property
    def ct(self) -> Conntrack | None:
        """The packet's connection, from a ``conntrack: true`` group; None otherwise."""
        x = self._x
        return Conntrack.unpack(x[0]) if x is not None and x[0] is not None else None

    @property
    def vlan(self) -> Vlan | None:
        """The 802.1Q tag (bridge and netdev families only, as the kernel sends it)."""
        r = self._r
        return Vlan(r[23], r[24]) if self._x is not None and r[15] & F_VLAN else None

    @property
    def l2hdr(self) -> bytes | None:
        """The link-layer header (bridge and netdev families only, as the kernel sends it)."""
        x = self._x
        return x[1] if x is not None else None

    def _name(self, index: int | None) -> str | None:
        names = self.ifnames
        return names.get(index) if names is not None and index is not None else None

    indev_name = property(lambda self: self._name(self.indev), doc="the router's name of indev")
    outdev_name = property(lambda self: self._name(self.outdev), doc="the router's name of outdev")
    physindev_name = property(lambda self: self._name(self.physindev))
    physoutdev_name = property(lambda self: self._name(self.physoutdev))

    def fields(self) -> dict[str, Any]:
        """Every field by name, for printing and comparing; ``ct``, ``vlan`` and ``l2hdr``
        too where one of them is present."""
        names = FIELDS + EXT_FIELDS if self._r[15] & F_EXT and self._x is not None else FIELDS
        return {name: getattr(self, name) for name in names}

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
EXT_FIELDS = ("ct", "vlan", "l2hdr")


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
    *,
    flags: int = 0,
) -> list[bytes]:
    """The four frames of one message around an already packed record table (records of
    72 bytes, or 88 with the extension: the table's length says which); ``flags``
    ``FLAG_IFNAMES`` when ``data`` ends with a names trailer."""
    node_b = node.encode() if isinstance(node, str) else node
    rsize = builtins_len(table) // count if count else RECORD.size
    if rsize * count != builtins_len(table) or (count and rsize < RECORD.size):
        raise ValueError(f"record table of {builtins_len(table)} bytes does not hold {count} records")
    if builtins_len(node_b) > MAX_NODE:
        raise ValueError(f"node name is {builtins_len(node_b)} bytes in UTF-8, at most {MAX_NODE}")
    header = HEADER.pack(
        MAGIC, VERSION, flags, group, count, rsize, builtins_len(node_b),
        epoch, first_seq, kernel_dropped,
    ) + node_b  # fmt: skip
    return [TOPIC.pack(group), header, table, data]


def names_trailer(names: dict[int, str]) -> bytes:
    """The trailer that ends frame 3 under ``FLAG_IFNAMES``: per interface its index (u32),
    the name's length (u8) and UTF-8 bytes, then the entry count and their bytes (u16 each)."""
    out = bytearray()
    for index, name in names.items():
        raw = name.encode()
        if builtins_len(raw) > 255:
            raise ValueError(f"interface name of {builtins_len(raw)} bytes, at most 255")
        out += _NAME_ENTRY.pack(index, builtins_len(raw)) + raw
    if builtins_len(out) > 0xFFFF:
        raise ValueError("the names trailer exceeds 65535 bytes")
    return bytes(out) + _TRAILER_END.pack(builtins_len(names), builtins_len(out))


def _read_trailer(data: bytes) -> tuple[dict[int, str], int]:
    """The names of a ``FLAG_IFNAMES`` message and where its trailer begins in ``data``."""
    dlen = builtins_len(data)
    if dlen < _TRAILER_END.size:
        raise WireError(f"IFNAMES flag set but frame 3 has {dlen} bytes, too few for the names trailer")
    count, size = _TRAILER_END.unpack_from(data, dlen - _TRAILER_END.size)
    start = dlen - _TRAILER_END.size - size
    if start < 0:
        raise WireError(f"names trailer of {size} bytes beyond frame 3 ({dlen} bytes)")
    names: dict[int, str] = {}
    pos, end = start, start + size
    for _ in range(count):
        if pos + _NAME_ENTRY.size > end:
            raise WireError("names trailer: an entry beyond its end")
        index, n = _NAME_ENTRY.unpack_from(data, pos)
        pos += _NAME_ENTRY.size
        if pos + n > end:
            raise WireError("names trailer: a name beyond its end")
        names[index] = data[pos : pos + n].decode("utf-8", "replace")
        pos += n
    if pos != end:
        raise WireError(f"names trailer: {end - pos} bytes after its {count} entries")
    return names, start


def pack_records(packets: Iterable[Packet]) -> tuple[int, bytes, bytes]:
    """Pack packets into (count, record table, data), offsets pointing into data."""
    table = bytearray()
    data = bytearray()
    packets = list(packets)
    # Extended records (88 bytes) for all when one needs the extension; else version 1's 72.
    extended = any(p._x is not None for p in packets)
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
        if not extended:
            table += RECORD.pack(*r)
            continue
        if builtins_len(r) == _NFIELDS:  # a 72-byte record among extended ones
            r[15] &= ~(F_CT | F_VLAN | F_L2HDR)
            r += [0, 0, 0, 0, 0, 0]
        ct, l2hdr = p._x if p._x is not None else (None, None)
        r[19] = r[20] = r[21] = r[22] = 0
        if ct is not None:  # the order of the daemon's parser: payload, prefix, ct, l2hdr
            r[19], r[20] = builtins_len(data), builtins_len(ct)
            data += ct
        if l2hdr is not None:
            r[22], r[21] = builtins_len(data), builtins_len(l2hdr)
            data += l2hdr
        table += RECORD_X.pack(*r)
    return builtins_len(packets), bytes(table), bytes(data)


def encode(
    group: int,
    node: str,
    epoch: int,
    first_seq: int,
    packets: Sequence[Packet],
    kernel_dropped: int = 0,
    ifnames: dict[int, str] | None = None,
) -> list[bytes]:
    """One message from packet objects; ``ifnames`` (index -> name) adds the names trailer."""
    count, table, data = pack_records(packets)
    if ifnames is None:
        return frames(group, node, epoch, first_seq, kernel_dropped, count, table, data)
    data += names_trailer(ifnames)
    return frames(group, node, epoch, first_seq, kernel_dropped, count, table, data, flags=FLAG_IFNAMES)


def decode(msg: Sequence[bytes]) -> Batch:
    """Decode one message (its frames as bytes or zmq Frames); raise WireError if it is not one."""
    if builtins_len(msg) != 4:
        raise WireError(f"expected 4 frames, got {builtins_len(msg)}")
    topic_b, header, table, data = (bytes(f) if not isinstance(f, bytes) else f for f in msg)
    if builtins_len(header) < HEADER.size:
        raise WireError(f"header is {builtins_len(header)} bytes, expected at least {HEADER.size}")
    (magic, version, flags, group, count, rsize, node_len, epoch, first_seq, kdrop) = HEADER.unpack_from(
        header
    )
    if magic != MAGIC:
        raise WireError(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise WireError(f"unsupported version {version}, this decoder reads {VERSION}")
    if topic_b != TOPIC.pack(group) and not (
        flags & FLAG_FILTERED
        and builtins_len(topic_b) == 15
        and topic_b[:5] == FILTERED_TOPIC
        and topic_b[13:] == TOPIC.pack(group)
    ):
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
    rec = RECORD_X if rsize >= RECORD_X.size else RECORD
    if rsize != rec.size:  # a later minor version appended fields: read the ones known here
        table = b"".join(table[i : i + rec.size] for i in range(0, builtins_len(table), rsize))
    names: dict[int, str] | None = None
    if flags & FLAG_IFNAMES:  # the trailer lies beyond every offset: records must end before it
        names, end_of_data = _read_trailer(data)
        data = data[:end_of_data]
    dlen = builtins_len(data)
    packets: list[Packet] = []
    append = packets.append
    seq = first_seq
    new = Packet.__new__
    extended = rec is RECORD_X
    for r in rec.iter_unpack(table):
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
        p._x = _extension(r, data, seq - first_seq) if extended else None
        p.ifnames = names
        append(p)
        seq += 1
    return Batch(group, node, epoch, first_seq, kdrop, packets)


def _extension(r: tuple[Any, ...], data: bytes, index: int) -> tuple[bytes | None, bytes | None]:
    """An extended record's conntrack block and link-layer header, checked against frame 3."""
    dlen = builtins_len(data)
    ct = l2hdr = None
    if r[15] & F_CT:
        end = r[19] + r[20]
        if end > dlen:
            raise WireError(f"record {index}: conntrack block {r[19]}+{r[20]} beyond data ({dlen} bytes)")
        if r[20] < CT.size:
            raise WireError(f"record {index}: conntrack block of {r[20]} bytes, below {CT.size}")
        ct = data[r[19] : end]
    if r[15] & F_L2HDR:
        end = r[22] + r[21]
        if end > dlen:
            raise WireError(f"record {index}: l2hdr {r[22]}+{r[21]} beyond data ({dlen} bytes)")
        l2hdr = data[r[22] : end]
    return ct, l2hdr


def header_flags(msg: Sequence[bytes]) -> int:
    """The header's ``flags`` byte of a message (0 if it has no header to read)."""
    if builtins_len(msg) < 2 or builtins_len(msg[1]) < HEADER.size:
        return 0
    return bytes(msg[1][5:6])[0]
