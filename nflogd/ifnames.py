"""The interface names of a network namespace, kept current from rtnetlink, for the feed.

Records carry interface indexes; a reader on another host can only look them up in its own
table, which is wrong for the router. So the daemon keeps each capture namespace's
index -> name table and its capture threads put the names of each batch's interfaces at the
end of the batch (the wire format's names trailer, ``FLAG_IFNAMES``)::

    table = LinkTable(None)               # this namespace; "blue" for /run/netns/blue
    table.names                           # {1: "lo", 2: "eth0"}
    loop.watch(table.fileno(), on_link)   # readable: call table.update(), True if names changed

The socket is a NETLINK_ROUTE socket opened in the namespace (entering it needs
CAP_SYS_ADMIN, as for the groups) and subscribed to RTNLGRP_LINK: the kernel sends
RTM_NEWLINK and RTM_DELLINK for every change (rtnetlink.h, ``rtmsg_ifinfo``), so nothing is
polled. It first dumps the table (RTM_GETLINK, NLM_F_DUMP). When the kernel drops
notifications (ENOBUFS: a burst of changes outran the socket's buffer) the table is dumped
again: the overrun is counted in ``resyncs`` and logged once per episode.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct

from . import netns
from .episodes import Episodes

__all__ = ["LinkTable"]

log = logging.getLogger(__name__)

NETLINK_ROUTE = 0
RTMGRP_LINK = 1  # the RTNLGRP_LINK multicast group's bit
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
IFLA_IFNAME = 3
_NLMSG = struct.Struct("=IHHII")  # nlmsghdr
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_NLA = struct.Struct("=HH")
_RCVBUF = 1 << 20
_EPISODE_GAP = 60.0


def _parse(buf: bytes, names: dict[int, str]) -> tuple[bool, bool]:
    """Apply the RTM_NEWLINK/RTM_DELLINK messages in ``buf`` to ``names``: (changed, done)."""
    changed = done = False
    off = 0
    while off + _NLMSG.size <= len(buf):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(buf, off)
        if length < _NLMSG.size or off + length > len(buf):
            break
        if kind == NLMSG_DONE:
            done = True
        elif kind == NLMSG_ERROR:
            (err,) = struct.unpack_from("=i", buf, off + _NLMSG.size)
            if err:
                raise OSError(-err, f"rtnetlink: {os.strerror(-err)}")
            done = True
        elif kind in (RTM_NEWLINK, RTM_DELLINK) and length >= _NLMSG.size + _IFINFO.size:
            index = _IFINFO.unpack_from(buf, off + _NLMSG.size)[2]
            if kind == RTM_DELLINK:
                changed |= names.pop(index, None) is not None
            else:
                pos = off + _NLMSG.size + _IFINFO.size
                end = off + length
                while pos + _NLA.size <= end:
                    alen, atype = _NLA.unpack_from(buf, pos)
                    if alen < _NLA.size or pos + alen > end:
                        break
                    if atype & 0x3FFF == IFLA_IFNAME:
                        name = buf[pos + 4 : pos + alen].split(b"\0", 1)[0].decode("utf-8", "replace")
                        if names.get(index) != name:
                            names[index] = name
                            changed = True
                    pos += (alen + 3) & ~3
        off += (length + 3) & ~3
    return changed, done


class LinkTable:
    """One namespace's interface table (``netns`` as in the config: None, a name, a path)."""

    def __init__(self, ns: str | None) -> None:
        self.netns = ns
        self.names: dict[int, str] = {}
        self.resyncs = 0  # dumps after the kernel dropped notifications
        self._overruns = Episodes(log, _EPISODE_GAP)
        with netns.entered(ns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
            sock.bind((0, RTMGRP_LINK))
            self._sock = sock
            self._dump()
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)

    def fileno(self) -> int:
        return self._sock.fileno()

    def _dump(self) -> None:
        """The whole table, fresh (notifications arriving meanwhile are applied in order)."""
        sock = self._sock
        sock.setblocking(True)
        sock.settimeout(5.0)
        try:
            req = _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
            sock.send(
                _NLMSG.pack(_NLMSG.size + len(req), RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + req
            )
            fresh: dict[int, str] = {}
            done = False
            while not done:
                _, done = _parse(sock.recv(1 << 16), fresh)
            self.names = fresh
        finally:
            sock.setblocking(False)

    def update(self) -> bool:
        """Read what the kernel sent; True when a name came, went or changed."""
        names = dict(self.names)
        changed = False
        while True:
            try:
                buf = self._sock.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:
                    raise
                self.resyncs += 1
                self._overruns.hit(
                    "netns %s: interface notifications overran; reading the whole table again",
                    self.netns or "(own)",
                )
                self._dump()
                return True
            changed |= _parse(buf, names)[0]
        if changed:
            self.names = names
        return changed

    def close(self) -> None:
        self._sock.close()
