"""The classic local API of scapy-nflog-capture, on Python 3: ``NFLOG().generator()``.

::

    from nflogd import NFLOG
    nflog = NFLOG().generator(0, extra_attrs=['len', 'ts'], nlbufsiz=2*2**20)
    fd = next(nflog)                      # netlink fd, for select/poll
    pkt, pkt_len, pkt_ts = next(nflog)    # payload, real length, timestamp
    for pkt, pkt_len, pkt_ts in nflog: ...

The generator drives ``capture.GroupSet``: one socket per group, a whole kernel batch per
read. Overruns are counted (``NFLOG.overflows``, exact loss in ``NFLOG.lost``) and never
end the generator. Closing the generator (``gen.close()``, or its collection) unbinds its
groups. Any number of ``NFLOG`` instances and generators may live in one process.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Iterable

from nflogd_client.wire import Packet

from .capture import GroupCounters, GroupSet
from .config import GroupConfig

__all__ = ["NFLOG", "NFWouldBlock", "EXTRA_ATTRS", "group_settings"]


class NFWouldBlock:
    """Yielded instead of a packet when the caller ``send(True)``s and nothing is ready."""


def _opt_attr(name):
    return lambda p: getattr(p, name)


#: What ``extra_attrs`` can ask for, each yielded after the payload in the order asked.
EXTRA_ATTRS = {
    "len": lambda p: p.len,  # real length in bytes (from the IP header; the copy range may cut data)
    "caplen": lambda p: p.caplen,  # bytes captured
    "ts": lambda p: p.ts,  # float seconds; the receive time where the kernel sent none
    "ts_kernel": lambda p: p.ts_kernel,  # whether ts came from the kernel
    "group": lambda p: p.group,
    "prefix": _opt_attr("prefix"),  # str, or None
    "mark": _opt_attr("mark"),
    "indev": _opt_attr("indev"),  # ifindex, or None
    "outdev": _opt_attr("outdev"),
    "physindev": _opt_attr("physindev"),
    "physoutdev": _opt_attr("physoutdev"),
    "hwproto": lambda p: p.hw_protocol,  # ethertype: 0x0800 IPv4, 0x86dd IPv6
    "hwaddr": _opt_attr("hwaddr"),
    "hook": lambda p: p.hook,
    "uid": _opt_attr("uid"),
    "gid": _opt_attr("gid"),
    "seq": _opt_attr("kernel_seq"),  # the NFLOG instance's sequence number
}


def group_settings(
    qids: int | Iterable[int],
    *,
    copy_range: int = 0xFFFF,
    qthresh: int | None = None,
    timeout: float | None = None,
    nlbufsiz: int | None = None,
) -> list[GroupConfig]:
    """GroupConfig per group from the classic keywords; None keeps the daemon's default."""
    groups = [qids] if isinstance(qids, int) else list(qids)
    defaults = GroupConfig(group=0)
    return [
        GroupConfig(
            group=g,
            copy_range=copy_range,
            queue_threshold=qthresh or defaults.queue_threshold,
            flush_ms=math.ceil(timeout * 1000) if timeout else defaults.flush_ms,
            rcvbuf=nlbufsiz or defaults.rcvbuf,
        )
        for g in groups
    ]


class NFLOG:
    """Factory of capture generators; keeps their counters.

    ``overflows`` (ENOBUFS events) and ``lost`` (packets missing from the NFLOG sequence)
    add up every group this instance's generators have read; ``counters`` has them per
    group.
    """

    def __init__(self) -> None:
        self._sets: list[GroupSet] = []
        self._retired = GroupCounters()  # totals of closed generators

    def generator(
        self,
        qids,
        pf=None,
        qthresh: int | None = None,
        timeout: float | None = None,
        nlbufsiz: int | None = None,
        buff_size: int | None = None,
        extra_attrs=None,
        handle_overflows: bool = True,
        copy_range: int = 0xFFFF,
    ):
        """A generator that yields the netlink fd first, then every packet.

        qids: an NFLOG group or a list of them.
        Keywords:
            extra_attrs: names from ``EXTRA_ATTRS`` ('len', 'ts', 'prefix', ...); with them
                each packet is a tuple ``(payload, *attrs)``, without them the payload bytes.
            qthresh (packets): the kernel sends a batch once this many are queued (default 256).
            timeout (seconds): the kernel sends a batch at least this often (default 0.01).
            nlbufsiz (bytes): the netlink socket's receive buffer (default 8 MiB).
            copy_range (bytes): bytes of each packet to copy, 0..65535.
            handle_overflows: True logs a warning on overruns, False keeps quiet; they are
                counted either way and never raise.
            pf, buff_size: accepted for compatibility, not used (no kernel since 2.6.29
                needs protocol families bound; batches are read whole).
        ``send(True)`` instead of ``next()`` never blocks: it yields ``NFWouldBlock`` when
        no packet is ready.
        """
        if isinstance(extra_attrs, str):
            extra_attrs = [extra_attrs]
        getters = []
        for name in extra_attrs or ():
            if name not in EXTRA_ATTRS:
                raise ValueError(f"unknown extra_attrs name {name!r}; known: {', '.join(EXTRA_ATTRS)}")
            getters.append(EXTRA_ATTRS[name])
        settings = group_settings(
            qids, copy_range=copy_range, qthresh=qthresh, timeout=timeout, nlbufsiz=nlbufsiz
        )
        # Bind now, so that errors come from generator(), not from the first next().
        gset = GroupSet(settings, warn_overflow=handle_overflows)
        self._sets.append(gset)
        return self._run(gset, getters)

    def _run(self, gset: GroupSet, getters):
        pending: collections.deque[Packet] = collections.deque()
        try:
            peek = yield gset.fileno()
            while True:
                if not pending:
                    for batch in gset.read(0 if peek else None):
                        pending.extend(batch.packets())
                    if not pending:
                        if peek:
                            peek = yield NFWouldBlock
                        continue
                p = pending.popleft()
                if getters:
                    peek = yield (p.data, *[get(p) for get in getters])
                else:
                    peek = yield p.data
        finally:
            gset.close()
            self._sets.remove(gset)
            self._retired.add(gset.totals())

    @property
    def counters(self) -> dict[int, GroupCounters]:
        """Per group counters of the generators still open."""
        return {r.group: r.counters for s in self._sets for r in s.readers}

    def _sum(self, name: str) -> int:
        return getattr(self._retired, name) + sum(getattr(c, name) for c in self.counters.values())

    @property
    def overflows(self) -> int:
        """ENOBUFS events over every generator of this instance."""
        return self._sum("overflows")

    @property
    def lost(self) -> int:
        """Packets the kernel dropped, over every generator of this instance."""
        return self._sum("kernel_dropped")

    @property
    def packets(self) -> int:
        return self._sum("packets")
