"""Scapy on the nflogd feed: ``ZMQNFLOGSocket``, a listen-only SuperSocket driving one Subscriber.

Every way scapy sniffs works::

    from scapy.all import AsyncSniffer, sniff
    from nflogd_client.scapy_socket import ZMQNFLOGSocket, install_zmq_listener

    # 1. name the socket class; sniff passes iface= and unknown keywords (endpoint=) to it
    sniff(L2socket=ZMQNFLOGSocket, iface="nflog:5,6", count=10, prn=lambda p: p.summary())
    sniff(L2socket=ZMQNFLOGSocket, endpoint="tcp://r1:5555", count=10)

    # 2. an opened socket; it stays open after sniff() and keeps its loss counters
    with ZMQNFLOGSocket("ipc:///run/nflogd/feed.sock", groups=[5, 6]) as sock:
        pkts = sniff(opened_socket=sock, timeout=5)
        print(sock.total_lost, sock.lost)         # {(node, group): packets lost}

    # 3. in the background; stop() returns at once, traffic or not
    t = AsyncSniffer(L2socket=ZMQNFLOGSocket, iface="nflog:5")
    t.start(); ...; pkts = t.stop()

    # 4. plain sniff(): conf.L2listen reads the feed (endpoint and default groups given once)
    install_zmq_listener("tcp://r1:5555", groups=5)
    sniff(count=10)                   # groups=5, as installed
    sniff(iface="nflog:6", count=10)  # group 6 of the same feed

    # 5. nothing installed: "nflog" names resolve to this socket on $NFLOGD_ENDPOINT
    #    (or ipc:///run/nflogd/feed.sock), as libpcap's "nflog" device does in tcpdump
    sniff(iface="nflog:5", count=10)

Each packet is ``IP`` (hw_protocol 0x0800), ``IPv6`` (0x86dd), ``ARP`` (0x0806) or
``conf.raw_layer``, dissected from the captured bytes, with ``.time`` the capture time
(``EDecimal`` seconds, exact to the nanosecond), ``.wirelen`` the real length (more than
``len(raw(p))`` when the copy range truncated it) and the feed's ``nflog_group``,
``nflog_node``, ``nflog_seq``, ``nflog_prefix``, ``nflog_ct`` (``wire.Conntrack``),
``nflog_vlan`` (``wire.Vlan``), ``nflog_l2hdr`` attributes; ``nflog_packet`` is the
``wire.Packet`` with every other NFLOG attribute (mark, indev, indev_name, uid, hook, ...).
A packet of a metadata-only group (no payload) is ``conf.raw_layer`` of no bytes with its
real ``.wirelen``. Why nothing arrives is said as the Subscriber says it (a warning per
failure, logger ``nflogd_client.endpoints``), and ``sock.subscriber.endpoints`` holds each
endpoint's state.

Interface names, libpcap style: ``"nflog"`` is every group (libpcap's bare ``nflog`` is
group 0), ``"nflog:5,6"`` groups 5 and 6; an explicit ``iface`` of that form overrides
``groups``. The default interface scapy passes when none is given (``conf.iface``) is
ignored; naming another interface (``"eth0"``) is an error, since this socket reads
nothing but the feed. Importing this module registers
a hidden scapy interface provider that makes every ``"nflog..."`` name resolve here. (With
``conf.use_pcap`` libpcap lists its own ``"nflog"`` device, the kernel read directly, and
scapy lets it take the name: pass ``L2socket=ZMQNFLOGSocket`` then.)

``filter="udp port 53"`` (libpcap's language, as scapy's other sockets take it) and the
metadata options (``prefix=``, ``mark=``, ``uid=``, ... as ``Subscriber``'s) run at the
daemon, before anything is sent (``docs/filters.md``); a refusal raises ``FilterRefused``
from ``recv()``. ``type``, ``promisc``, ``nofilter``, ``monitor`` and
``quiet``, which sniff may pass to any L2 listener, are accepted and ignored. ``send()``
raises: the feed is one-way.

The socket belongs to one thread at a time; stop a sniffer with ``AsyncSniffer.stop()``,
not by closing its socket from another thread.
"""

from __future__ import annotations

import errno
import inspect
import math
import time
from typing import Any, Iterable

import zmq
from scapy.config import conf
from scapy.data import MTU
from scapy.interfaces import InterfaceProvider, NetworkInterface
from scapy.packet import Packet
from scapy.supersocket import SuperSocket
from scapy.utils import EDecimal

from . import jetstream as _jetstream
from .filters import Filter
from .layers import LAYERS
from .subscriber import Subscriber
from .wire import Packet as WirePacket

__all__ = ["LAYERS", "ZMQNFLOGSocket", "install_zmq_listener"]

_IFACE = "nflog"

# Keywords sniff() may hand any L2 listener (scapy's L2ListenSocket, L2pcapListenSocket,
# L2ListenTcpdump): meaningless for the feed, so accepted and dropped.
_IGNORED_KWARGS = frozenset({"type", "promisc", "nofilter", "monitor", "quiet", "prog"})
# Keywords passed on to the Subscriber: whatever it takes besides endpoints and groups.
_SUBSCRIBER_KWARGS = frozenset(
    name for name, p in inspect.signature(Subscriber).parameters.items() if p.kind != p.VAR_KEYWORD
) - {"endpoints", "groups"} | frozenset(inspect.signature(Filter).parameters) - {"expression"}

_NS = 1_000_000_000


def _parse_iface(name: str) -> tuple[int, ...] | None:
    """``"nflog"`` -> None (every group); ``"nflog:5,6"`` -> (5, 6); ValueError otherwise."""
    if name == _IFACE:
        return None
    if not name.startswith(_IFACE + ":"):
        raise ValueError(
            f"ZMQNFLOGSocket: iface {name!r} is not an NFLOG name; the socket reads the nflogd"
            " feed only: use 'nflog' (every group) or 'nflog:5,6' (groups 5 and 6)"
        )
    groups: list[int] = []
    for part in name[len(_IFACE) + 1 :].split(","):
        part = part.strip()
        if not part.isdigit() or int(part) > 0xFFFF:
            raise ValueError(f"ZMQNFLOGSocket: iface {name!r}: group {part!r} is not an integer 0..65535")
        if int(part) not in groups:
            groups.append(int(part))
    return tuple(groups)


def _iface_name(groups: int | Iterable[int] | None) -> str:
    if groups is None:
        return _IFACE
    if isinstance(groups, int):
        groups = [groups]
    return _IFACE + ":" + ",".join(str(g) for g in groups)


def _unsupported(what: str) -> OSError:
    return OSError(errno.EOPNOTSUPP, f"ZMQNFLOGSocket only listens to the nflogd feed; it cannot {what}")


class ZMQNFLOGSocket(SuperSocket):
    """A scapy listen socket on the nflogd feed (see the module docstring for every use).

    ``endpoint``: a ZeroMQ endpoint or a list of them, default ``$NFLOGD_ENDPOINT`` or
    ``ipc:///run/nflogd/feed.sock``. ``groups``: an NFLOG group, several, or ``None`` for
    all; ``iface="nflog:5,6"`` says the same and wins. Every other keyword the
    ``Subscriber`` takes (``context``, ``rcvhwm``, its CURVE keys, ...) goes to it
    (``self.subscriber``), whose loss counters ``lost`` and ``total_lost`` are also readable
    here.
    """

    desc = "read IP packets from the nflogd feed (ZeroMQ), listen only"
    nonblocking_socket = False

    #: Defaults for ``endpoint``, ``groups`` and Subscriber keywords; install_zmq_listener()
    #: sets them on a subclass.
    default_endpoint: str | list[str] | None = None
    default_groups: int | tuple[int, ...] | None = None
    default_options: dict[str, Any] = {}

    def __init__(
        self,
        endpoint: str | Iterable[str] | None = None,
        groups: int | Iterable[int] | None = None,
        iface: Any = None,
        *,
        filter: str | None = None,  # noqa: A002 - scapy's name for it
        **kwargs: Any,
    ) -> None:
        self.closed = True  # until the Subscriber exists: close() and __del__ have nothing to do
        self.ins = self.outs = None  # type: ignore[assignment]  # no OS socket of its own
        options = {**self.default_options}
        options.update((k, kwargs.pop(k)) for k in list(kwargs) if k in _SUBSCRIBER_KWARGS)
        unknown = sorted(set(kwargs) - _IGNORED_KWARGS)
        if unknown:
            raise TypeError(f"ZMQNFLOGSocket() got unexpected keyword argument(s): {', '.join(unknown)}")
        if filter:
            options["filter"] = filter
        if isinstance(iface, str):
            groups = _parse_iface(iface)
        elif isinstance(iface, NetworkInterface) and iface.name == _IFACE:
            groups = _parse_iface(iface.network_name)
        else:  # None, or the conf.iface default that sniff() passes when given no iface
            if groups is None:
                groups = self.default_groups
        if endpoint is None:
            endpoint = self.default_endpoint
        self.subscriber: Subscriber | _jetstream.JetStreamSubscriber
        if _jetstream.is_jetstream_endpoint(endpoint):  # a stream (docs/jetstream.md)
            self.subscriber = _jetstream.JetStreamSubscriber(endpoint, groups, **options)
        else:
            self.subscriber = Subscriber(endpoint, groups, **options)
        self.closed = False
        self.iface = _iface_name(groups)
        self._ready = False  # select() saw the socket readable: recv() must not block

    # -- receiving: the per-packet path, kept short ------------------------------------------

    def recv(self, x: int = MTU, timeout: float | None = None, **kwargs: Any) -> Packet | None:
        """The next packet as a scapy packet, or ``None`` after ``timeout`` seconds.

        ``timeout=None`` waits for one, except right after ``select()`` reported this socket
        (as in sniff()), where a message that holds no packet returns ``None`` at once.
        ``x`` is ignored (the feed delivers whole captures). A closed socket raises EOFError.
        """
        if self._ready:
            self._ready = False
            timeout = 0
        if self.closed:
            raise EOFError("ZMQNFLOGSocket is closed")
        p = self.subscriber.recv(timeout)
        if p is None:
            return None
        data = p.data
        try:  # no bytes (a metadata-only group): raw, not an IP layer of scapy's default fields
            pkt = (LAYERS.get(p.hw_protocol, conf.raw_layer) if data else conf.raw_layer)(data, **kwargs)
        except KeyboardInterrupt:
            raise
        except Exception:
            if conf.debug_dissector:
                raise
            pkt = conf.raw_layer(data)
        pkt.time = EDecimal(p.ts_ns) / _NS
        pkt.wirelen = p.len
        d = pkt.__dict__  # plain attributes: Packet.__setattr__ would look for fields first
        d["nflog_group"] = p.group
        d["nflog_node"] = p.node
        d["nflog_seq"] = p.seq
        d["nflog_prefix"] = p.prefix
        d["nflog_ct"] = p.ct
        d["nflog_vlan"] = p.vlan
        d["nflog_l2hdr"] = p.l2hdr
        d["nflog_packet"] = p
        return pkt

    def recv_raw(self, x: int = MTU) -> tuple[type[Packet] | None, bytes | None, float | None]:
        """``(layer class, captured bytes, timestamp)``, or ``(None, None, None)`` if nothing came."""
        p: WirePacket | None = self.subscriber.recv(0 if self._ready else None)
        self._ready = False
        if p is None:
            return None, None, None
        return (LAYERS.get(p.hw_protocol, conf.raw_layer) if p.data else conf.raw_layer), p.data, p.ts

    @staticmethod
    def select(sockets: list[Any], remain: float | None = None) -> list[Any]:
        """The sockets with something to read, waiting at most ``remain`` seconds (None: no limit).

        Sockets already holding received packets are returned at once. Otherwise one
        ``zmq.Poller`` waits on the SUB sockets (their ZMQ_FD is edge-triggered, so
        ``select.select`` on it can stall with messages queued) and on any other object with
        a ``fileno()`` in the list, such as the ObjectPipe sniff() stops itself with.
        """
        ready = [s for s in sockets if isinstance(s, ZMQNFLOGSocket) and s.subscriber.pending()]
        if ready:
            return ready
        streams = [s for s in sockets if isinstance(s, ZMQNFLOGSocket) and s.subscriber.socket is None]
        if streams:  # JetStream readers have no ZeroMQ socket: wait on their queues
            return _select_streams(sockets, streams, remain)
        poller = zmq.Poller()
        owners: dict[Any, Any] = {}  # zmq socket -> its ZMQNFLOGSocket
        others: dict[int, Any] = {}  # fd -> any other object with a fileno()
        subs: list[Subscriber] = []  # whose endpoint states the wait keeps up (why nothing comes)
        for s in sockets:
            if isinstance(s, ZMQNFLOGSocket):
                if s.closed:  # recv() raises EOFError, and sniff() drops the socket
                    return [s]
                sub = s.subscriber
                assert isinstance(sub, Subscriber)
                owners[sub.socket] = s
                poller.register(sub.socket, zmq.POLLIN)
                if sub._watch.monitor is not None:  # its events wake the wait, handled below
                    poller.register(sub._watch.monitor, zmq.POLLIN)
                subs.append(sub)
            else:  # the poller reports a plain fd back as the int
                try:
                    fd = s.fileno()
                except (OSError, ValueError):  # closed
                    continue
                if fd >= 0:
                    others[fd] = s
                    poller.register(fd, zmq.POLLIN)
        deadline = None if remain is None else time.monotonic() + remain
        while True:
            for sub in subs:  # as recv() does while it waits: a failure is said within a second
                sub._update()
            ready_others = []
            for obj, _ in poller.poll(_wait_ms(subs, deadline)):
                owner = owners.get(obj)
                if owner is not None:
                    owner._ready = True
                    ready.append(owner)
                elif obj in others:
                    ready_others.append(others[obj])
            if ready or ready_others or (deadline is not None and time.monotonic() >= deadline):
                return ready_others + ready  # sniff()'s stop pipe first: stop() acts before more reading

    def fileno(self) -> int:
        """The SUB socket's ZMQ_FD: edge-triggered; wait with ``select()`` or a zmq.Poller instead."""
        sock = self.subscriber.socket
        if sock is None:
            raise _unsupported("give a file descriptor for a JetStream reader (select() waits on its queue)")
        return int(sock.getsockopt(zmq.FD))

    # -- the rest of SuperSocket ---------------------------------------------------------------

    def send(self, x: Any) -> int:
        raise _unsupported("send packets")

    @property
    def lost(self) -> dict[tuple[str, int], int]:
        """Packets the feed lost, per (node, group)."""
        return self.subscriber.lost

    @property
    def total_lost(self) -> int:
        """Packets the feed lost, in all."""
        return self.subscriber.total_lost

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.subscriber.close(linger=0)

    def __repr__(self) -> str:
        if not hasattr(self, "subscriber"):
            return f"<{type(self).__name__} (not connected)>"
        state = "closed" if self.closed else "open"
        return f"<{type(self).__name__} {state} {self.iface} {' '.join(self.subscriber.endpoints)}>"


def install_zmq_listener(
    endpoint: str | Iterable[str] | None = None,
    groups: int | Iterable[int] | None = None,
    **options: Any,
) -> type[ZMQNFLOGSocket]:
    """Make plain ``sniff()`` read the nflogd feed: set ``conf.L2listen``; return the class set.

    ``endpoint``, ``groups`` and ``options`` (Subscriber keywords: ``rcvhwm``, CURVE keys)
    become the defaults of every socket sniff() opens; ``sniff(iface="nflog:6")`` still
    picks other groups. Undo with ``conf.L2listen = previous`` (save it first).
    """
    bad = sorted(set(options) - _SUBSCRIBER_KWARGS)
    if bad:
        raise TypeError(f"install_zmq_listener() got unexpected keyword argument(s): {', '.join(bad)}")
    if isinstance(endpoint, str) or endpoint is None:
        ep: str | list[str] | None = endpoint
    else:
        ep = list(endpoint)
    gr = groups if groups is None or isinstance(groups, int) else tuple(groups)
    cls = type(
        "ZMQNFLOGSocket",
        (ZMQNFLOGSocket,),
        {
            "default_endpoint": ep,
            "default_groups": gr,
            "default_options": options,
            "__doc__": ZMQNFLOGSocket.__doc__,
        },
    )
    conf.L2listen = cls
    return cls


# -- "nflog" interface names in scapy ----------------------------------------------------------
#
# sniff(iface=X) without L2socket= resolves X with scapy.interfaces.resolve_iface(), which
# matches X against the name of every interface its providers listed, then opens the
# provider's L2listen class with iface=X (the name as given). libpcap lists a single "nflog"
# device and accepts "nflog:<groups>" when opening it; here the one listed interface's name
# compares equal to "nflog" and to every "nflog:..." name, so resolve_iface() finds it for
# any group list and the socket parses the groups from X.


class _NFLOGName(str):
    """The listed interface name: equal to "nflog" and to every "nflog:<groups>"."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and (str.__eq__(other, _IFACE) or other.startswith(_IFACE + ":"))

    def __ne__(self, other: object) -> bool:
        return not self.__eq__(other)

    __hash__ = str.__hash__


class _FeedProvider(InterfaceProvider):
    name = "nflogd"
    headers = ("Name", "Description")

    def load(self) -> dict[str, NetworkInterface]:
        data = {
            "name": _NFLOGName(_IFACE),
            "description": "nflogd feed (nflog = every group, nflog:5,6 = groups 5 and 6)",
            "network_name": _IFACE,
            "index": -1,
            "flags": 0,
        }
        return {_IFACE: NetworkInterface(self, data)}

    def _listener(self) -> type[SuperSocket]:
        cls = conf.L2listen
        if isinstance(cls, type) and issubclass(cls, ZMQNFLOGSocket):
            return cls  # install_zmq_listener()'s endpoint
        return ZMQNFLOGSocket

    def _l2listen(self, dev: NetworkInterface) -> type[SuperSocket]:
        return self._listener()

    def _l2socket(self, dev: NetworkInterface) -> type[SuperSocket]:
        return self._listener()  # whose send() says why nothing can be sent here

    def _l3socket(self, dev: NetworkInterface, ipv6: bool) -> type[SuperSocket]:
        return self._listener()

    def _is_valid(self, dev: NetworkInterface) -> bool:
        return False  # never picked as conf.iface; shown by conf.ifaces.show(hidden=True)

    def _format(self, dev: NetworkInterface, **kwargs: Any) -> tuple[str, ...]:
        return (_IFACE, dev.description)


conf.ifaces.register_provider(_FeedProvider)


def _wait_ms(subs: list[Subscriber], deadline: float | None) -> int | None:
    """Milliseconds select() may wait: until ``deadline`` or the first endpoint's due probe or
    reconnect, whichever is first; None: no limit."""
    now = time.monotonic()
    waits = [] if deadline is None else [deadline - now]
    waits += [due - now for due in (sub._watch.due_at() for sub in subs) if due is not None]
    return None if not waits else max(0, math.ceil(min(waits) * 1000))


def _queued(sub: Subscriber | _jetstream.JetStreamSubscriber) -> int:
    return sub.queued() if isinstance(sub, _jetstream.JetStreamSubscriber) else sub.pending()


def _select_streams(sockets: list[Any], streams: list[ZMQNFLOGSocket], remain: float | None) -> list[Any]:
    """select() when JetStream readers are among the sockets: their queues, in 20 ms steps."""
    deadline = None if remain is None else time.monotonic() + remain
    others = [s for s in sockets if s not in streams]
    while True:
        ready = [s for s in streams if s.closed or _queued(s.subscriber)]
        if others:
            ready = ZMQNFLOGSocket.select(others, 0) + ready
        if ready or (deadline is not None and time.monotonic() >= deadline):
            for s in ready:
                if s in streams:
                    s._ready = True  # recv() takes what the queue holds without waiting
            return ready
        time.sleep(0.02)
