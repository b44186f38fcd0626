"""JSON lines of the feed: one object per packet, per loss and per restart (``nflog-tap --format json``).

::

    from nflogd_client.jsonl import JsonLines

    out = JsonLines(sys.stdout, payload=False)
    out.packet(pkt)                     # {"event": "packet", "node": "r1", "group": 5, ...}\\n
    out.events(feed_events.after(batch))   # {"event": "loss", "where": "feed", ...}\\n

The schema is ``docs/json-lines.md``: every key is always there, ``null`` where the kernel
sent no such attribute or the payload has no such header (never 0). Times are UTC, RFC 3339
with nanoseconds (``time``) and integer nanoseconds since the epoch (``time_ns``).
Interface names are the router's where the feed carries them (``Packet.indev_name``);
else this host's, looked up (``if_indextoname``) for packets of the node named like this
host (the daemon's default node is its host name), or for every node with
``ifnames=True``; else ``null``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import socket
import struct
import time
from functools import lru_cache
from typing import IO, Any

from .community_id import community_id, community_id_icmp
from .events import Event
from .wire import Packet

__all__ = ["HOOKS", "JsonLines", "five_tuple", "flow_id", "packet_object", "rfc3339"]

#: enum nf_inet_hooks, include/uapi/linux/netfilter.h
HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}

_PORTS = {6, 17, 33, 132, 136}  # TCP, UDP, DCCP, SCTP, UDP-Lite: ports in the first 4 bytes
_ID_PORTS = {6, 17, 132}  # the Community ID's protocols with ports
_V6_EXT = {0, 43, 60}  # hop-by-hop, routing, destination options: skipped to the next header
_V6_FRAG = 44
_NONE: dict[str, str | int | None] = {
    "family": None,
    "src": None,
    "dst": None,
    "protocol": None,
    "sport": None,
    "dport": None,
}


def rfc3339(ts_ns: int) -> str:
    """``2026-12-01T20:08:35.670161000Z``: UTC, nanoseconds."""
    sec, ns = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns:09d}Z"


def five_tuple(hw_protocol: int, data: bytes) -> dict[str, str | int | None]:
    """family, src, dst, protocol and ports (TCP, UDP, SCTP, DCCP, UDP-Lite) from the IP header.

    Fields the captured bytes do not hold (cut by the copy range, a non-first fragment, no
    ports in the protocol) are None.
    """
    return _five_tuple(hw_protocol, data)[0]


def _five_tuple(hw_protocol: int, data: bytes) -> tuple[dict[str, str | int | None], int | None]:
    """five_tuple() and the offset of the transport header where the first fragment's is captured."""
    out = dict(_NONE)
    n = len(data)
    if hw_protocol == 0x0800 and n >= 20 and data[0] >> 4 == 4:
        ihl = (data[0] & 0x0F) * 4
        out["family"] = "ipv4"
        out["src"] = socket.inet_ntop(socket.AF_INET, data[12:16])
        out["dst"] = socket.inet_ntop(socket.AF_INET, data[16:20])
        proto = out["protocol"] = data[9]
        first_fragment = struct.unpack_from(">H", data, 6)[0] & 0x1FFF == 0
        if not first_fragment or ihl < 20:
            return out, None
        if proto in _PORTS and n >= ihl + 4:
            out["sport"], out["dport"] = struct.unpack_from(">HH", data, ihl)
        return out, ihl
    elif hw_protocol == 0x86DD and n >= 40 and data[0] >> 4 == 6:
        out["family"] = "ipv6"
        out["src"] = str(ipaddress.IPv6Address(data[8:24]))
        out["dst"] = str(ipaddress.IPv6Address(data[24:40]))
        nh: int | None = data[6]
        off = 40
        while nh in _V6_EXT or nh == _V6_FRAG:
            if n < off + 8:
                nh = None
                break
            if nh == _V6_FRAG:
                if struct.unpack_from(">H", data, off + 2)[0] & 0xFFF8:  # not the first fragment
                    out["protocol"] = data[off]
                    return out, None
                nh, off = data[off], off + 8
            else:
                nh, off = data[off], off + (data[off + 1] + 1) * 8
        out["protocol"] = nh
        if nh in _PORTS and n >= off + 4:
            out["sport"], out["dport"] = struct.unpack_from(">HH", data, off)
        return out, off if nh is not None else None
    return out, None


def flow_id(t: dict[str, Any], data: bytes, l4: int | None) -> str | None:
    """The Community ID (v1) of the packet's flow, from ``_five_tuple``: TCP, UDP and SCTP
    need their ports, ICMP and ICMPv6 their type and code, other IP protocols only the
    addresses; None where the captured bytes lack what the protocol needs."""
    proto = t["protocol"]
    if proto is None or t["src"] is None:
        return None
    src, dst = str(t["src"]), str(t["dst"])
    if proto in _ID_PORTS:
        if t["sport"] is None:
            return None
        return community_id(src, dst, int(proto), int(t["sport"]), int(t["dport"] or 0))
    if proto in (1, 58):
        if l4 is None or len(data) < l4 + 2:
            return None
        return community_id_icmp(src, dst, int(proto), data[l4], data[l4 + 1])
    if proto in _PORTS or l4 is None:  # DCCP, UDP-Lite: not in version 1; a later fragment
        return None
    return community_id(src, dst, int(proto))


@lru_cache(maxsize=1024)
def _ifname(index: int) -> str | None:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return None


def packet_object(p: Packet, *, payload: bool = False, ifnames: bool = False) -> dict[str, Any]:
    """The JSON object of one ``wire.Packet`` (docs/json-lines.md)."""
    names = ifnames

    def dev(index: int | None, router: str | None) -> str | None:
        if router is not None or index is None:
            return router  # the router's own name, from the feed
        return _ifname(index) if names else None

    hw = p.hwaddr
    t, l4 = _five_tuple(p.hw_protocol, p.data)
    ct = p.ct
    vlan = p.vlan
    l2 = p.l2hdr
    obj = {
        "event": "packet",
        "node": p.node,
        "group": p.group,
        "seq": p.seq,
        "time": rfc3339(p.ts_ns),
        "time_ns": p.ts_ns,
        "ts_kernel": p.ts_kernel,
        "len": p.len,
        "caplen": p.caplen,
        "truncated": p.truncated,
        "prefix": p.prefix,
        "mark": p.mark,
        "indev": p.indev,
        "indev_name": dev(p.indev, p.indev_name),
        "outdev": p.outdev,
        "outdev_name": dev(p.outdev, p.outdev_name),
        "physindev": p.physindev,
        "physindev_name": dev(p.physindev, p.physindev_name),
        "physoutdev": p.physoutdev,
        "physoutdev_name": dev(p.physoutdev, p.physoutdev_name),
        "uid": p.uid,
        "gid": p.gid,
        "hook": p.hook,
        "hook_name": HOOKS.get(p.hook),
        "hw_protocol": p.hw_protocol,
        "hwaddr": None if hw is None else hw.hex(":"),
        "kernel_seq": p.kernel_seq,
        **t,
        "community_id": flow_id(t, p.data, l4),
        "ct": None if ct is None else ct.as_dict(),
        "vlan": None
        if vlan is None
        else {"id": vlan.id, "pcp": vlan.pcp, "tci": vlan.tci, "proto": vlan.proto},
        "l2hdr": None if l2 is None else l2.hex(),
    }
    if payload:
        obj["payload"] = base64.b64encode(p.data).decode("ascii")
    return obj


class JsonLines:
    """Writes objects to a text stream, one per line; the caller flushes (per batch)."""

    def __init__(self, out: IO[str], *, payload: bool = False, ifnames: bool = False) -> None:
        self.out = out
        self.payload = payload
        self.ifnames = ifnames
        self._host = socket.gethostname()
        self._dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

    def packet(self, p: Packet) -> None:
        names = self.ifnames or p.node == self._host
        self.out.write(self._dumps(packet_object(p, payload=self.payload, ifnames=names)) + "\n")

    def events(self, events: list[Event]) -> None:
        """Loss and restart objects (``events.FeedEvents``), each with the time it was seen."""
        for e in events:
            now = time.time_ns()
            self.out.write(self._dumps({**e, "time": rfc3339(now), "time_ns": now}) + "\n")
