"""A minimal pcapng writer: one section, one interface, packets with optional comments.

::

    w = PcapngWriter(out, linktype=239, if_name="nflogd", if_description="tcp://r1:5555")
    w.packet(record, ts_ns, orig_len, comment="3 packets lost on the feed before this one")
    out.flush()

Only what the feed needs (https://www.ietf.org/archive/id/draft-ietf-opsawg-pcapng-02.html):
a Section Header Block naming the writer, an Interface Description Block with nanosecond
timestamps (``if_tsresol`` 9), and Enhanced Packet Blocks with ``opt_comment``. Blocks are in this host's
byte order, as pcapng allows (the byte-order magic tells readers).
"""

from __future__ import annotations

import struct
from typing import BinaryIO

__all__ = ["PcapngWriter"]

SHB, IDB, EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_OPT_END, _OPT_COMMENT = 0, 1
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
    """Writes the section and interface blocks at once, then a block per ``packet``."""

    def __init__(
        self,
        out: BinaryIO,
        linktype: int,
        snaplen: int = 262144,
        *,
        if_name: str | None = None,
        if_description: str | None = None,
        application: str = "nflogd",
    ):
        self.out = out
        shb = struct.pack("=IHHq", 0x1A2B3C4D, 1, 0, -1) + _options(
            [_opt(_SHB_USERAPPL, application.encode())]
        )
        opts = [_opt(_IF_TSRESOL, b"\x09")]
        if if_name:
            opts.insert(0, _opt(_IF_NAME, if_name.encode()))
        if if_description:
            opts.insert(1, _opt(_IF_DESCRIPTION, if_description.encode()))
        idb = struct.pack("=HHI", linktype, 0, snaplen) + _options(opts)
        out.write(_block(SHB, shb) + _block(IDB, idb))

    def packet(self, data: bytes, ts_ns: int, orig_len: int, comment: str | None = None) -> None:
        """One Enhanced Packet Block: ``data`` as captured, ``orig_len`` the packet's real length."""
        n = len(data)
        body = struct.pack("=IIIII", 0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, n, max(orig_len, n))
        body += data + b"\0" * (-n % 4)
        if comment:
            body += _options([_opt(_OPT_COMMENT, comment.encode())])
        self.out.write(_block(EPB, body))
