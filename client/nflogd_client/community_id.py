"""Community ID v1: one string per flow, the same from both directions and on every tool
that implements it (Zeek, Suricata, Wireshark, Elastic...).

::

    from nflogd_client.community_id import community_id

    community_id("128.232.110.120", "66.35.250.204", 6, 34855, 80)
    # '1:LQU9qZlK+B5F3KDmev6m5PMibrg='

The hash (the specification, github.com/corelight/community-id-spec): SHA-1 over the seed
(2 bytes), the two addresses, the protocol (1 byte), a zero byte and the two ports (2 bytes
each), all big-endian, the endpoints ordered so that the smaller (address, port) comes first;
base64 of the digest after ``1:``. ICMP and ICMPv6 put the type and its counterpart type
(echo request and reply, ...) in place of the ports, or type and code for a message that
has no counterpart (then the endpoints stay in packet order); protocols without ports hash
the addresses and the protocol alone.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import struct

__all__ = ["community_id", "community_id_icmp"]

_ICMP = 1
_ICMPV6 = 58
_PORTS = {6, 17, 132}  # TCP, UDP, SCTP: the specification's protocols with ports

# A type and the type that answers it; a type not here is a one-way message.
_ICMP_COUNTERPART = {8: 0, 0: 8, 13: 14, 14: 13, 15: 16, 16: 15, 10: 9, 17: 18, 18: 17}
_ICMPV6_COUNTERPART = {
    128: 129, 129: 128,  # echo request, reply
    133: 134, 134: 133,  # router solicitation, advertisement
    135: 136, 136: 135,  # neighbour solicitation, advertisement
    130: 131, 131: 130,  # multicast listener query, report
    139: 140, 140: 139,  # node information query, reply
    144: 145, 145: 144,  # home agent address discovery request, reply
}  # fmt: skip


def _packed(addr: str) -> bytes:
    return ipaddress.ip_address(addr).packed


def _hash(seed: int, a: bytes, b: bytes, proto: int, ports: bytes) -> str:
    digest = hashlib.sha1(struct.pack(">H", seed) + a + b + struct.pack("BB", proto, 0) + ports).digest()
    return "1:" + base64.b64encode(digest).decode("ascii")


def community_id(
    src: str, dst: str, proto: int, sport: int | None = None, dport: int | None = None, *, seed: int = 0
) -> str:
    """The Community ID of a flow; ``sport``/``dport`` are ignored for protocols without
    ports (give ICMP to ``community_id_icmp``). Addresses as text, IPv4 or IPv6."""
    a, b = _packed(src), _packed(dst)
    if proto in _PORTS and sport is not None and dport is not None:
        if (b, dport) < (a, sport):
            a, b, sport, dport = b, a, dport, sport
        return _hash(seed, a, b, proto, struct.pack(">HH", sport, dport))
    if b < a:
        a, b = b, a
    return _hash(seed, a, b, proto, b"")


def community_id_icmp(
    src: str, dst: str, proto: int, icmp_type: int, icmp_code: int, *, seed: int = 0
) -> str:
    """The Community ID of an ICMP (``proto`` 1) or ICMPv6 (58) message."""
    counterpart = (_ICMPV6_COUNTERPART if proto == _ICMPV6 else _ICMP_COUNTERPART).get(icmp_type)
    a, b = _packed(src), _packed(dst)
    if counterpart is None:  # one way: type and code, in packet order
        return _hash(seed, a, b, proto, struct.pack(">HH", icmp_type, icmp_code))
    sport, dport = icmp_type, counterpart
    if (b, dport) < (a, sport):
        a, b, sport, dport = b, a, dport, sport
    return _hash(seed, a, b, proto, struct.pack(">HH", sport, dport))
