"""Local capture for scapy: ``NFLOGListenSocket`` and ``install_nflog_listener()``.

::

    from scapy.all import sniff
    from nflogd import NFLOGListenSocket, install_nflog_listener

    sniff(L2socket=NFLOGListenSocket, queues=[0, 1], count=10)   # groups 0 and 1
    with NFLOGListenSocket(queues=5) as sock:
        sniff(opened_socket=sock, timeout=5)
    install_nflog_listener(queues=5)     # conf.L2listen: plain sniff() reads group 5

Packets come back as ``IP``, ``IPv6`` or ``ARP`` by hardware protocol (the raw layer
otherwise; ``nflogd_client.layers``, as on the feed), ``.time`` the capture time,
``.wirelen`` the real length. Packets of a batch that were read but not yet returned
count as ready in ``select()``, so none waits unseen. Needs
CAP_NET_ADMIN, as the groups are bound in this process; unprivileged readers use
``nflogd_client.ZMQNFLOGSocket`` on the daemon's feed instead.
"""

from __future__ import annotations

import collections
import functools
import select

from nflogd_client.layers import LAYERS
from nflogd_client.wire import Packet
from scapy.config import conf
from scapy.error import Scapy_Exception
from scapy.supersocket import SuperSocket

from .capture import GroupSet
from .classic import group_settings

__all__ = ["NFLOGListenSocket", "install_nflog_listener"]


class NFLOGListenSocket(SuperSocket):
    """A listen-only scapy socket reading NFLOG groups in this process.

    Groups come from the ``queues`` keyword (int or list) or a subclass's ``queues``
    attribute. ``copy_range``, ``qthresh`` (packets), ``timeout`` (seconds) and
    ``nlbufsiz`` (receive buffer bytes) tune the groups as ``NFLOG().generator()`` does.
    The keywords scapy passes to every L2 listener (iface, type, filter, promisc,
    nofilter) are accepted and not used.
    """

    desc = "read packets from NFLOG groups"
    queues = 0
    nonblocking_socket = False

    def __init__(
        self,
        iface=None,
        type=None,  # noqa: A002 - scapy's keyword
        promisc=None,
        filter=None,  # noqa: A002 - scapy's keyword
        nofilter=None,
        monitor=None,
        queues=None,
        copy_range: int = 0xFFFF,
        qthresh: int | None = None,
        timeout: float | None = None,
        nlbufsiz: int | None = None,
        **kwargs,
    ):
        if queues is None:
            queues = self.queues
        settings = group_settings(
            queues, copy_range=copy_range, qthresh=qthresh, timeout=timeout, nlbufsiz=nlbufsiz
        )
        self.iface = iface or "nflog:" + ",".join(str(s.group) for s in settings)
        self._pending: collections.deque[Packet] = collections.deque()
        self.closed = True  # until the groups are bound: close() and __del__ have nothing to do
        self.ins = self.outs = None  # type: ignore[assignment]  # no OS socket of its own
        self._groups = GroupSet(settings)  # GroupBusy, NoPermission, ... go to the caller
        self.closed = False

    def fileno(self) -> int:
        return self._groups.fileno()

    @property
    def counters(self):
        """Totals over the groups: packets, bytes, kernel_dropped, overflows, truncated."""
        return self._groups.totals()

    def pending(self) -> int:
        """Packets already read from the kernel and not yet returned."""
        return len(self._pending)

    def _fill(self, timeout: float | None) -> None:
        for batch in self._groups.read(timeout):
            self._pending.extend(batch.packets())

    def recv(self, x: int = 0, **kwargs):
        """The next packet, waiting for one; None if a wait ended with nothing."""
        if not self._pending:
            self._fill(None)
            if not self._pending:
                return None
        p = self._pending.popleft()
        cls = LAYERS.get(p.hw_protocol, conf.raw_layer)
        try:
            pkt = cls(p.data)
        except Exception:  # scapy dissectors can fail on odd bytes: keep the bytes
            pkt = conf.raw_layer(p.data)
        pkt.time = p.ts
        pkt.wirelen = p.len
        return pkt

    def recv_raw(self, x: int = 0):
        """(layer class, payload bytes, timestamp) of the next packet, for scapy's plumbing."""
        if not self._pending:
            self._fill(None)
        if not self._pending:
            return None, None, None
        p = self._pending.popleft()
        return LAYERS.get(p.hw_protocol, conf.raw_layer), p.data, p.ts

    def send(self, x):
        raise Scapy_Exception("NFLOGListenSocket only listens: NFLOG is a capture interface")

    @staticmethod
    def select(sockets, remain=None):
        """Sockets holding read packets are ready at once; the rest wait in select()."""
        ready = [s for s in sockets if isinstance(s, NFLOGListenSocket) and s._pending]
        if ready:
            return ready
        try:
            inp, _, _ = select.select(sockets, [], [], remain)
        except InterruptedError:
            return []
        return inp

    def close(self) -> None:
        """Unbind the groups; idempotent."""
        if not self.closed:
            self.closed = True
            self._groups.close()


def install_nflog_listener(queues=0, **kwargs) -> type[NFLOGListenSocket]:
    """Make ``conf.L2listen`` read NFLOG ``queues``, so that plain ``sniff()`` uses them.

    Keywords are those of ``NFLOGListenSocket``. Returns the listener class installed:
    without arguments (group 0), as scapy-nflog-capture did, ``NFLOGListenSocket`` itself
    (``conf.L2listen = NFLOGListenSocket``); otherwise a subclass with those defaults.
    """
    if queues == NFLOGListenSocket.queues and not kwargs:
        conf.L2listen = NFLOGListenSocket
        return NFLOGListenSocket
    listener = type(
        "NFLOGListenSocket",
        (NFLOGListenSocket,),
        {"queues": queues, "__init__": functools.partialmethod(NFLOGListenSocket.__init__, **kwargs)},
    )
    conf.L2listen = listener
    return listener
