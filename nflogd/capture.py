"""Capture: NFLOG groups read in kernel batches, with every loss counted.

A ``GroupReader`` owns one netlink socket bound to one group, so a busy group's overflow
never costs another group packets. Each ``read()`` returns one kernel batch as a
``KernelBatch``: a record table already in the wire format's layout plus the payload bytes, so
the daemon publishes it without touching single packets::

    with GroupReader(GroupConfig(group=5)) as reader:
        batch = reader.read(timeout=1.0)           # None when nothing came
        if batch:
            for pkt in batch.packets():             # nflogd_client.wire.Packet
                print(pkt.ts, pkt.len, pkt.data[:20])
        print(reader.counters.packets, reader.counters.kernel_dropped)

Loss is counted exactly from the NFLOG sequence numbers (a gap shows once the next packet
after it arrives); ENOBUFS overruns are counted as events and warned about once per
episode. Neither ever escapes ``read()``.
"""

from __future__ import annotations

import logging
import math
import select
from typing import TYPE_CHECKING

from nflogd_client import wire

from . import netns
from .episodes import Episodes
from .errors import BufferOverflow
from .ffi import CFeed, NflogSocket

if TYPE_CHECKING:
    from .config import GroupConfig

__all__ = ["GroupCounters", "KernelBatch", "GroupReader", "GroupSet", "OVERFLOW_EPISODE_GAP"]

log = logging.getLogger("nflogd.capture")

#: Seconds without an overrun that end an overflow episode; the next overrun warns again.
OVERFLOW_EPISODE_GAP = 10.0


class GroupCounters:
    """A group's totals since its bind; plain integers, read by the metrics collector."""

    __slots__ = ("packets", "bytes", "truncated", "kernel_dropped", "overflows")

    def __init__(self):
        self.packets = 0  # packets read
        self.bytes = 0  # sum of their real lengths
        self.truncated = 0  # packets the copy range cut
        self.kernel_dropped = 0  # packets missing from the NFLOG sequence
        self.overflows = 0  # ENOBUFS events

    def add(self, other: GroupCounters) -> GroupCounters:
        """Add ``other``'s counts to these; returns self."""
        for name in self.__slots__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}

    def __repr__(self) -> str:
        return f"GroupCounters({self.as_dict()})"


class KernelBatch:
    """One kernel batch of one group: ``count`` wire records in ``table``, payloads in ``data``."""

    __slots__ = ("group", "count", "table", "data", "bytes", "truncated", "flags")

    def __init__(
        self,
        group: int,
        count: int,
        table: bytes | memoryview,
        data: bytes | memoryview,
        nbytes: int,
        truncated: int,
        flags: int = 0,
    ) -> None:
        self.group = group
        self.count = count
        self.table = table
        self.data = data
        self.bytes = nbytes
        self.truncated = truncated
        self.flags = flags  # the wire header's: IFNAMES when data ends with interface names

    def packets(self, node: str = "", first_seq: int = 0) -> list[wire.Packet]:
        """The batch's packets, decoded by the feed's own decoder."""
        table, data = bytes(self.table), bytes(self.data)  # the same objects unless views
        msg = wire.frames(self.group, node, 0, first_seq, 0, self.count, table, data, flags=self.flags)
        return wire.decode(msg).packets

    def __repr__(self) -> str:
        return f"<KernelBatch group={self.group} count={self.count} bytes={self.bytes}>"


class GroupReader:
    """One NFLOG group, bound at construction.

    ``settings`` is a ``nflogd.config.GroupConfig`` (group, copy_range, queue_threshold,
    flush_ms, rcvbuf, netns). Raises ``GroupBusy`` when another socket holds the group,
    ``NoPermission`` without CAP_NET_ADMIN, ``NamespaceError`` when ``netns`` cannot be
    entered, ``NFLogError`` otherwise. ``warn_overflow=False`` logs overruns at debug level
    only (they are counted either way).

    With ``settings.netns`` set, the socket is opened and bound inside that namespace and
    stays there; the calling thread is back in its own before the constructor returns.
    ``netns_id`` is the namespace's ``netns.identity()`` then (None for the thread's own).
    """

    def __init__(self, settings: GroupConfig, *, warn_overflow: bool = True) -> None:
        self.settings = settings
        self.group: int = settings.group
        self._counters = GroupCounters()
        self._overflows_seen = 0
        self.warn_overflow = warn_overflow
        self._overruns = Episodes(log, OVERFLOW_EPISODE_GAP)
        self._sock: NflogSocket | None = None
        # Bind inside too, so that a GroupBusy names the holder from that namespace's /proc.
        with netns.entered(settings.netns) as self.netns_id:
            sock = NflogSocket(self.group)
            self._sock = sock
            self._portid = sock.portid
            try:
                sock.set_rcvbuf(settings.rcvbuf)
                self._configure(settings, bind=True)
            except BaseException:
                sock.close()
                self._sock = None
                raise

    def _open(self) -> NflogSocket:
        """The socket, until ``close()``."""
        sock = self._sock
        if sock is None:
            raise ValueError(f"group {self.group}: the reader is closed")
        return sock

    def _configure(self, s: GroupConfig, bind: bool) -> None:
        self._open().configure(
            copy_range=s.copy_range,
            queue_threshold=s.queue_threshold,
            flush_ms=s.flush_ms,
            bind=bind,
            conntrack=s.conntrack,
        )

    def fileno(self) -> int:
        return self._open().fileno()

    def set_ifnames(self, names: dict[int, str]) -> None:
        """The interface names of the group's namespace: each batch ends with the names of
        its interfaces (``nflogd.ifnames``, the wire format's names trailer)."""
        self._open().set_ifnames(names)

    @property
    def portid(self) -> int:
        """The socket's netlink port id, as /proc/net/netfilter/nfnetlink_log lists it."""
        return self._portid

    @property
    def closed(self) -> bool:
        return self._sock is None

    def read(self, timeout: float | None = 0, *, copy: bool = True) -> KernelBatch | None:
        """One batch, or None when none arrived within ``timeout`` seconds (or ``wake()``).

        A batch is what the kernel sent, with whatever it queued behind it while this call
        ran (one receive buffer at light load). ``timeout`` 0 does not wait, None waits
        until a batch comes. The wait and the parsing happen in C with the GIL released.
        ``copy=False`` gives a batch whose ``table`` and ``data`` are views of the reader's
        buffers, valid only until the next read: the capture loop sends them at once.
        """
        ms = -1 if timeout is None else math.ceil(timeout * 1000)
        sock = self._open()
        try:
            n = sock.read(ms)
        except BufferOverflow:
            n = 0
        if sock.overflows != self._overflows_seen:
            self._overflowed()
        if not n:
            return None
        table, data = sock.views(n) if not copy else (sock.table(n), sock.data())
        return KernelBatch(
            self.group, n, table, data, sock.batch_bytes, sock.batch_truncated, sock.batch_flags
        )

    def pump(self, feed: CFeed | None, timeout: float | None) -> None:
        """Read and send every batch on ``feed`` (a ``ffi.CFeed``; None only counts) in C,
        until a read gets nothing within ``timeout`` seconds (None: no end) or ``wake()`` is
        called. The feed's ``first_seq`` continues from ``feed_seq``; overruns are warned
        about here."""
        if self._open().pump(feed, -1 if timeout is None else math.ceil(timeout * 1000)):
            self._overflowed()

    def pump_until_idle(self, feed: CFeed | None, idle: float, sent: bool) -> bool:
        """As ``pump()``, with no end to the wait until a batch is sent (``sent``: one was since
        the group's last sequence mark), then until a read gets nothing within ``idle`` seconds:
        True then (the mark is due), False if ``wake()`` was called or after an overrun."""
        rc = self._open().pump_until_idle(feed, math.ceil(idle * 1000), sent)
        if rc == 1:
            self._overflowed()
        return rc == 2

    @property
    def feed_seq(self) -> int:
        """The next message's ``first_seq`` for ``pump()``."""
        return self._open().feed_seq

    @feed_seq.setter
    def feed_seq(self, value: int) -> None:
        self._open().feed_seq = value

    def set_dropped_base(self, dropped: int) -> None:
        """Kernel drops of earlier readers of this group, which the feed's count includes."""
        self._open().dropped_base = dropped

    @property
    def counters(self) -> GroupCounters:
        """The group's totals since the bind, read from the C reader (kept after close())."""
        c, sock = self._counters, self._sock
        if sock is not None:
            c.packets, c.bytes, c.truncated = sock.packets, sock.bytes, sock.truncated
            c.kernel_dropped, c.overflows = sock.lost, sock.overflows
        return c

    def wake(self) -> None:
        """End a ``read()`` another thread waits in; it returns None."""
        self._open().wake()

    def _overflowed(self) -> None:
        self._overflows_seen = self._open().overflows
        self._overruns.hit(
            "group %d: netlink receive buffer overrun (rcvbuf %d bytes): the kernel is dropping "
            "packets; counting them exactly, warning again after %.0f s without overruns",
            self.group, self.settings.rcvbuf, OVERFLOW_EPISODE_GAP,
            level=logging.WARNING if self.warn_overflow else logging.DEBUG,
        )  # fmt: skip

    def reconfigure(self, settings: GroupConfig) -> None:
        """Apply new settings to the bound group without rebinding: no packet is lost.

        The socket stays in the namespace it was opened in; ``settings.netns`` is not looked at.
        """
        if settings.group != self.group:
            raise ValueError(f"reader of group {self.group} cannot take settings of group {settings.group}")
        if settings.rcvbuf != self.settings.rcvbuf:
            self._open().set_rcvbuf(settings.rcvbuf)
        self._configure(settings, bind=False)
        self.settings = settings

    def close(self) -> None:
        """Unbind the group and close the socket; idempotent. The counters stay readable."""
        if self._sock is not None:
            self._counters = GroupCounters().add(self.counters)  # their last values
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GroupReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self.fileno()}"
        return f"<GroupReader group={self.group} {state}>"


class GroupSet:
    """Several groups behind one pollable fd: a reader per group, an epoll set over them.

    The local drivers (``NFLOG().generator()``, ``NFLOGListenSocket``) read through it::

        with GroupSet([GroupConfig(group=0), GroupConfig(group=1)]) as groups:
            fd = groups.fileno()                    # readable when any group has a batch
            for batch in groups.read(timeout=1.0):  # every batch ready now, [] on timeout
                ...
    """

    def __init__(self, settings, *, warn_overflow: bool = True):
        self.readers: list[GroupReader] = []
        self._epoll = select.epoll()
        try:
            for s in settings:
                reader = GroupReader(s, warn_overflow=warn_overflow)
                self.readers.append(reader)
                self._epoll.register(reader.fileno(), select.EPOLLIN)
        except BaseException:
            self.close()
            raise
        self._by_fd = {r.fileno(): r for r in self.readers}
        # One group needs no epoll in between: its own socket is the fd to poll.
        self._fd = self.readers[0].fileno() if len(self.readers) == 1 else self._epoll.fileno()

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._epoll.closed

    def read(self, timeout: float | None = 0) -> list[KernelBatch]:
        """Every batch ready, at most one per group, waiting up to ``timeout`` seconds for one."""
        if len(self.readers) == 1:
            batch = self.readers[0].read(timeout)
            return [batch] if batch else []
        ready = self._epoll.poll(-1 if timeout is None else timeout)
        batches = []
        for fd, _ in ready:
            batch = self._by_fd[fd].read(0)
            if batch:
                batches.append(batch)
        return batches

    def totals(self) -> GroupCounters:
        """The counters of every group added up."""
        total = GroupCounters()
        for r in self.readers:
            total.add(r.counters)
        return total

    def close(self) -> None:
        """Unbind every group; idempotent."""
        for r in self.readers:
            r.close()
        self._epoll.close()

    def __enter__(self) -> GroupSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
