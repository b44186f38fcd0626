"""The pcapng writer of nflog-tap (``--format pcapng``) and nflogd-extcap: one section, one
interface per (node, group) or a single one, packets with their direction and comments.

::

    w = PcapngWriter(out, linktype=101, if_name="nflogd", if_description="tcp://r1:5555")
    w.packet(data, ts_ns, orig_len, comment="3 packets lost on the feed before this one")

    feed = FeedPcapng(out, "tcp://r1:5555")       # an interface per (node, group): "r1:5"
    feed.packet(pkt)                              # a wire.Packet, its attributes in the comment
    out.flush()

Only what the feed needs (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html):
a Section Header Block naming the writer, Interface Description Blocks with nanosecond
timestamps (``if_tsresol`` 9), and Enhanced Packet Blocks with ``epb_flags`` (the direction)
and ``opt_comment``. Blocks are in this host's byte order, as pcapng allows (the byte-order
magic tells readers).
"""

from __future__ import annotations

import struct
from typing import IO

from .wire import Conntrack, CtTuple, Packet

__all__ = ["PcapngWriter", "FeedPcapng", "LINKTYPE_RAW", "direction", "describe_packet"]

SHB, IDB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble
_OPT_END, _OPT_COMMENT = 0, 1
_EPB_FLAGS = 2
_INBOUND, _OUTBOUND = 1, 2  # epb_flags bits 0-1: the direction
_HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9


def _opt(code: int, value: bytes) -> bytes:
    return struct.pack("=HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _options(opts: list[bytes]) -> bytes:
    return b"".join(opts) + struct.pack("=HH", _OPT_END, 0) if opts else b""


def _block(kind: int, body: bytes) -> bytes:
    n = 12 + len(body)
    return struct.pack("=II", kind, n) + body + struct.pack("=I", n)


class PcapngWriter:
    """Writes the section block at once, and the first interface when ``if_name`` or
    ``if_description`` is given (interface 0); ``interface()`` adds more, at any point
    before their first packet."""

    def __init__(
        self,
        out: IO[bytes],
        linktype: int,
        snaplen: int = 262144,
        *,
        if_name: str | None = None,
        if_description: str | None = None,
        application: str = "nflogd",
    ):
        self.out = out
        self.linktype = linktype
        self.snaplen = snaplen
        self.interfaces = 0
        shb = struct.pack("=IHHq", 0x1A2B3C4D, 1, 0, -1) + _options(
            [_opt(_SHB_USERAPPL, application.encode())]
        )
        out.write(_block(SHB, shb))
        if if_name is not None or if_description is not None:
            self.interface(if_name, if_description)

    def interface(self, name: str | None, description: str | None = None) -> int:
        """Write an Interface Description Block; its id for ``packet(interface=...)``."""
        opts = []
        if name:
            opts.append(_opt(_IF_NAME, name.encode()))
        if description:
            opts.append(_opt(_IF_DESCRIPTION, description.encode()))
        opts.append(_opt(_IF_TSRESOL, b"\x09"))
        self.out.write(_block(IDB, struct.pack("=HHI", self.linktype, 0, self.snaplen) + _options(opts)))
        self.interfaces += 1
        return self.interfaces - 1

    def packet(
        self,
        data: bytes,
        ts_ns: int,
        orig_len: int,
        comment: str | None = None,
        *,
        interface: int = 0,
        flags: int | None = None,
        comments: tuple[str, ...] = (),
    ) -> None:
        """One Enhanced Packet Block: ``data`` as captured (cut to the snaplen), ``orig_len``
        the packet's real length; ``flags`` its ``epb_flags`` (``direction()``)."""
        data = data[: self.snaplen]
        n = len(data)
        body = struct.pack(
            "=IIIII", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, n, min(max(orig_len, n), 0xFFFFFFFF)
        )
        body += data + b"\0" * (-n % 4)
        opts = [_opt(_OPT_COMMENT, c.encode()) for c in (comment, *comments) if c]
        if flags:
            opts.append(_opt(_EPB_FLAGS, struct.pack("=I", flags)))
        body += _options(opts)
        self.out.write(_block(EPB, body))


def direction(p: Packet) -> int:
    """``epb_flags`` of the packet's hook: inbound before routing and at input, outbound at
    output and after routing, 0 (not known) when forwarded."""
    if p.hook in (0, 1):
        return _INBOUND
    if p.hook in (3, 4):
        return _OUTBOUND
    return 0


def _endpoint(addr: str, port: int | None) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _tuple(t: CtTuple) -> str:
    if t.icmp_type is not None:
        return f"{t.src} > {t.dst} type {t.icmp_type} code {t.icmp_code} id {t.icmp_id}"
    return f"{_endpoint(t.src, t.sport)} > {_endpoint(t.dst, t.dport)}"


def _ct(ct: Conntrack) -> str:
    parts = [f"ct {ct.state or '?'}{' reply' if ct.reply_dir else ''}"]
    if ct.id is not None:
        parts.append(f"id {ct.id}")
    parts.append(f"proto {ct.proto}")
    if ct.orig is not None:
        parts.append(f"orig {_tuple(ct.orig)}")
    if ct.reply is not None:
        parts.append(f"reply {_tuple(ct.reply)}")
    for name in ("zone", "mark"):
        value = getattr(ct, name)
        if value is not None:
            parts.append(f"{name} {value}")
    if ct.status is not None:
        parts.append(f"status 0x{ct.status:x}")
    if ct.labels:
        parts.append(f"labels {ct.labels.hex()}")
    return " ".join(parts)


def _dev(index: int | None, name: str | None) -> str | None:
    if index is None:
        return None
    return f"{name}({index})" if name is not None else str(index)


def describe_packet(p: Packet) -> str:
    """The packet's NFLOG attributes as one line, for its comment: hook, prefix, mark,
    uid/gid, interfaces (the router's names where the feed told them), VLAN, conntrack."""
    parts = [f"hook {_HOOKS.get(p.hook, p.hook)}"]
    if p.prefix is not None:
        parts.append(f"prefix {p.prefix!r}")
    for name in ("mark", "uid", "gid"):
        value = getattr(p, name)
        if value is not None:
            parts.append(f"{name} {value}")
    for label, index, name in (
        ("in", p.indev, p.indev_name),
        ("out", p.outdev, p.outdev_name),
        ("physin", p.physindev, p.physindev_name),
        ("physout", p.physoutdev, p.physoutdev_name),
    ):
        dev = _dev(index, name)
        if dev is not None:
            parts.append(f"{label} {dev}")
    vlan = p.vlan
    if vlan is not None:
        parts.append(f"vlan {vlan.id} pcp {vlan.pcp}")
    if not p.caplen and p.len:
        parts.append("metadata only")
    ct = p.ct
    if ct is not None:
        parts.append(_ct(ct))
    return ", ".join(parts)


class FeedPcapng:
    """Packets of the feed as pcapng, LINKTYPE_RAW: an interface per (node, group), named
    ``node:group`` (``group`` for a daemon without a node name), described by ``endpoint``;
    each packet with its real length (a metadata-only one: 0 bytes captured), its direction
    and its attributes in a comment. ``packet(p, comment)`` adds a comment (loss, restarts)."""

    def __init__(
        self, out: IO[bytes], endpoint: str, *, snaplen: int = 262144, application: str = "nflogd"
    ) -> None:
        self.writer = PcapngWriter(out, LINKTYPE_RAW, snaplen, application=application)
        self.endpoint = endpoint
        self._ids: dict[tuple[str, int], int] = {}

    def packet(self, p: Packet, comment: str | None = None) -> None:
        key = (p.node, p.group)
        iface = self._ids.get(key)
        if iface is None:
            name = f"{p.node}:{p.group}" if p.node else str(p.group)
            iface = self._ids[key] = self.writer.interface(name, self.endpoint)
        data = p.data if p.hw_protocol in (0x0800, 0x86DD) else b""  # RAW holds IP only
        self.writer.packet(
            data, p.ts_ns, max(p.len, p.caplen), describe_packet(p), interface=iface, flags=direction(p),
            comments=(comment,) if comment else (),
        )  # fmt: skip
