"""The scapy layer a captured packet starts with, by NFLOG's hardware protocol: ``LAYERS``.

::

    from scapy.config import conf
    from nflogd_client.layers import LAYERS

    pkt = LAYERS.get(p.hw_protocol, conf.raw_layer)(p.data)   # p: a wire.Packet

The one table of every scapy reader: the feed's socket (``scapy_socket``), ``nflog-tap``'s
summaries and the classic in-process listener (``nflogd.scapy_listen``). Importing it
imports scapy's IP, IPv6 and ARP layers, nothing else.
"""

from __future__ import annotations

from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP

__all__ = ["LAYERS"]

#: hw_protocol (the ethertype in NFULA_PACKET_HDR) -> the layer the captured bytes start with.
LAYERS = {0x0800: IP, 0x86DD: IPv6, 0x0806: ARP}
