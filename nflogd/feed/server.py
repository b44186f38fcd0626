"""Every endpoint of the feed (ipc, tcp, CURVE), the daemon's and the relay's, served by nflogd itself.

The capture threads write each message straight to the subscribers' sockets
(``_peers.c``); everything else a ZeroMQ XPUB socket would do for them is done here, on the
control thread: it listens, accepts within the connection budget, moves each peer's bytes
through its ``Codec`` (``codec.py``: ZMTP 3.1, 3.0 and 2.0, the NULL mechanism or CURVE
(``curve.py``), as an XPUB that binds) and acts on what the codec says: a handshake done
(the peer goes to the C sender), a subscription, a PING (a PONG after what the peer has queued), a breach (its
ERROR sent if the spec has one, the peer hung up on). It flushes what a slow peer queued
once its socket drains. Any libzmq SUB or XSUB connects to it as to an XPUB::

    server = ZmtpServer(cfeed, owner=publisher, handshake_timeout_ms=10_000)
    server.set_limits(publish_config)               # per source, idle, ipc_filter_groups
    server.bind("ipc:///run/nflogd/feed.sock")
    server.bind("tcp://*:5555", curve_keys)          # CurveZMQ, the keys nflogd.access read
    poller.register(server.fileno(), zmq.POLLIN)     # its epoll: listeners and peers
    more = server.serve(256)                        # a turn: at most 256 frames per peer
    server.next_deadline()                          # when the next handshake times out
    server.close(linger_ms=250)

Each peer reads from its own share per turn (``serve``'s ``share`` frames, one read of
``READ_BYTES``): a peer that floods subscriptions or PINGs gets its share and waits for the
next turn like every other, so it delays nobody. What a peer can make the daemon spend is
bounded (docs/security.md, "Limits"): its frames (``codec.MAX_READY``, ``codec.MAX_FRAME``),
what it sent and was not parsed yet (one read), its time to finish the handshake, its
queue at ``publish.hwm`` messages (past that its messages are dropped, counted). The
connection budget, the counting and the once-per-episode logs are the owner's
(``Publisher``), the same for NULL and CURVE peers.
"""

from __future__ import annotations

import errno
import grp
import logging
import os
import pwd
import select
import socket
import struct
import time
import weakref
from collections import Counter, deque
from typing import TYPE_CHECKING, Callable, Protocol

from nflogd_client import filters, wire

from ..addresses import split_host_port
from ..episodes import Episodes
from ..errors import NflogdError
from .codec import (
    CURVE_GREETING_REST,
    GREETING_REST,
    MAX_FILTER_FRAME,
    MAX_READY,
    PARTIAL_GREETING,
    Cancel,
    Codec,
    Handshake,
    Ping,
    Refused,
    Subscribe,
    error,
    pong,
)  # fmt: skip
from .curve import CurveHandshake, CurveKeys

if TYPE_CHECKING:
    from ..config import PublishConfig
    from ..ffi import CFeed

__all__ = ["Peer", "Topics", "ZmtpServer", "group_members", "peer_credentials"]

log = logging.getLogger("nflogd.publish")

#: Bytes read from one peer at a time (at most once per turn).
READ_BYTES = 4096
#: The least share of a turn a peer with something to say gets (frames), however many do.
MIN_SHARE = 8
#: What a peer turned away by a connection limit is told: ZAP's "temporary error"; how many
#: are being told at once (more are closed at once), and for how long at most (s).
TRY_LATER = "300"
TURNED_AWAY_MAX = 64
TURN_AWAY_S = 1.0
#: Connections accepted per listener per turn, and the listen backlog.
ACCEPTS_PER_TURN = 64
BACKLOG = 100
#: After EMFILE on accept, the listener rests this long (the connection waits in the backlog).
ACCEPT_PAUSE_S = 0.1
#: TCP keepalive on peers' connections (idle s, interval s, probes): a peer that vanished is
#: found in about 90 s.
KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT = 60, 10, 3

_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid
_IN = select.EPOLLIN | select.EPOLLRDHUP
_GONE = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def group_members(gids) -> frozenset[int]:
    """The uids of the users listed as members of the groups ``gids`` (as libzmq's
    IPC_FILTER_GID takes them: a peer's own group, or one its user is a member of)."""
    uids = set()
    for gid in gids:
        try:
            names = grp.getgrgid(gid).gr_mem
        except KeyError:
            continue
        for name in names:
            try:
                uids.add(pwd.getpwnam(name).pw_uid)
            except KeyError:
                continue
    return frozenset(uids)


class _TurnedAway:
    """A connection over a limit, kept only to tell the peer why: our greeting goes at once;
    once the peer's greeting and first command (READY, or CURVE's HELLO) are read, an ERROR
    "300" (ZAP's temporary error, rfc.zeromq.org/spec/27), which libzmq reports to the reader
    as a refusal with that status, and the close. libzmq takes an ERROR only in place of the
    reply to that command; read whole, nothing is left unread to reset the connection."""

    __slots__ = ("sock", "buf", "deadline")

    def __init__(self, sock: socket.socket, lst: _Listener, deadline: float):
        self.sock = sock
        self.buf = b""
        self.deadline = deadline
        rest = GREETING_REST if lst.curve is None else CURVE_GREETING_REST
        sock.setblocking(False)
        sock.send(PARTIAL_GREETING + rest)

    def read(self) -> bool:
        """Read what came; True when done with it (told, or gone)."""
        try:
            data = self.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
        if not data:
            return True
        self.buf += data
        buf = self.buf
        if len(buf) < 66:
            return len(buf) > READ_BYTES
        size, head = (int.from_bytes(buf[65:73], "big"), 73) if buf[64] & 2 else (buf[65], 66)
        if len(buf) < head + size:
            return size > MAX_READY
        try:
            self.sock.send(error(TRY_LATER))
        except OSError:
            pass
        return True


def _waiting(entry: tuple[float, weakref.ref[Peer]]) -> Peer | None:
    """The peer of a handshake deadline, if it is still in its handshake."""
    peer = entry[1]()
    return peer if peer is not None and peer.deadline is not None else None


class Owner(Protocol):
    """What the server asks of the publisher that owns it."""

    def budget(self) -> int: ...
    def peer_refused(self, endpoint: str, connected: int) -> None: ...
    def subscription(self, msg: bytes, via: str) -> None: ...
    def foreign_topic(self, peer: str, length: int, hung: int) -> None: ...
    def key_refused(self, peer: str, endpoint: str, key: bytes | None) -> None: ...
    def peer_gone(self, topics: dict[bytes, int]) -> None: ...


class _Listener:
    __slots__ = ("endpoint", "sock", "peers", "paused_until", "curve")

    def __init__(self, endpoint: str, sock: socket.socket, curve: CurveKeys | None = None):
        self.endpoint = endpoint
        self.sock = sock
        self.curve = curve  # CURVE's keys on this endpoint, or None (NULL)
        self.peers = 0  # connected now, handshake or not
        self.paused_until: float | None = None


class Topics:
    """What one peer subscribed to: each topic with its count (subscriptions add up and are
    not idempotent, spec 23), and the filter the C sender takes, kept as topics come and go
    (never rebuilt from every topic: 65,536 of them would cost a turn each)."""

    __slots__ = ("counts", "_prefix", "_exact", "_exact_topics")

    def __init__(self) -> None:
        self.counts: dict[bytes, int] = {}
        self._prefix = bytearray(32)
        self._exact: bytearray | None = None
        self._exact_topics = 0

    def __len__(self) -> int:
        return len(self.counts)

    def __contains__(self, topic: bytes) -> bool:
        return topic in self.counts

    def subscribe(self, topic: bytes) -> bool:
        """Count a subscription; True if the topic is new (the filter changes)."""
        n = self.counts.get(topic, 0)
        self.counts[topic] = n + 1
        if n == 0:
            self._mark(topic, True)
        return n == 0

    def cancel(self, topic: bytes) -> bool:
        """Undo one subscription; True if that was the topic's last (the filter changes)."""
        n = self.counts.get(topic, 0)
        if n <= 1:
            if self.counts.pop(topic, None) is None:
                return False
            self._mark(topic, False)
            return True
        self.counts[topic] = n - 1
        return False

    def _mark(self, topic: bytes, on: bool) -> None:
        if len(topic) == 1:
            bits, at = self._prefix, topic[0]
        elif len(topic) == 2:
            self._exact_topics += 1 if on else -1
            if self._exact is None:
                self._exact = bytearray(8192)
            bits, at = self._exact, topic[0] << 8 | topic[1]
        else:
            return
        if on:
            bits[at >> 3] |= 1 << (at & 7)
        else:
            bits[at >> 3] &= ~(1 << (at & 7)) & 0xFF
        if not self._exact_topics:
            self._exact = None

    def filter(self) -> tuple[bool, bytes, bytes | None]:
        """The topics as the C sender takes them: every group, a bitmap of high bytes (1-byte
        topics), a bitmap of groups (2-byte topics; None: none)."""
        exact = bytes(self._exact) if self._exact is not None else None
        return b"" in self.counts, bytes(self._prefix), exact


class Peer:
    """One connection of the server: its socket, its ZMTP conversation (``codec``), what it
    asked for (``topics``), and what the server's limits count of it."""

    __slots__ = (
        "sock", "fd", "listener", "label", "source", "codec", "deadline", "id", "topics", "dropped",
        "slow_log", "spec", "tags", "tagged", "passed", "__weakref__",
    )  # fmt: skip

    def __init__(
        self,
        sock: socket.socket,
        listener: _Listener,
        label: str,
        source: tuple[str, object],
        deadline: float,
    ):
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.label = label  # tcp: the address; ipc: ":uid:gid:pid", as libzmq's Peer-Address
        self.source = source  # what max_connections_per_source counts: ("uid", n) or ("address", a)
        self.codec = Codec(CurveHandshake(listener.curve) if listener.curve is not None else None)
        self.deadline: float | None = deadline  # its handshake's end; None once done or gone
        self.id = -1  # the C peer, once its handshake is done
        self.topics = Topics()
        self.dropped = 0  # messages dropped for it at hwm, as last logged
        self.spec: bytes | None = None  # the filter it holds (docs/filters.md)
        self.tags: set[bytes] = set()  # the subscriptions that state it, by their tags
        self.tagged = False  # subscribed to its groups through its filter (wire.FILTERED_TOPIC)
        #: The relay's: its filter topics passed on as they are (topic -> subscriptions).
        self.passed: Counter[bytes] = Counter()
        self.slow_log = Episodes(log)


def filter_topic(topic: bytes) -> bool:
    """A topic of a reader's filter or of a group through it (docs/filters.md), within their
    bounds: what the relay passes on as it is."""
    if topic.startswith(filters.FILTER_TOPIC):
        return len(topic) <= len(filters.FILTER_TOPIC) + MAX_FILTER_FRAME
    return (
        topic.startswith(wire.FILTERED_TOPIC) and len(topic) <= len(wire.FILTERED_TOPIC) + 8 + wire.TOPIC.size
    )


def message(parts: list[bytes]) -> bytes:
    """A ZMTP message of several frames (MORE on all but the last, LONG past 255 bytes)."""
    out = bytearray()
    for i, part in enumerate(parts):
        more = 1 if i < len(parts) - 1 else 0
        if len(part) > 255:
            out += bytes([more | 2]) + struct.pack(">Q", len(part))
        else:
            out += bytes([more, len(part)])
        out += part
    return bytes(out)


class ZmtpServer:
    """Listeners and peers of the feed's NULL endpoints, on one epoll (``fileno()``).

    ``cfeed`` is the C side: its lock is held for everything the capture threads share
    (registering a peer, its filter, flushing, hanging up). ``owner`` counts and logs for the
    feed as a whole (``Owner``).
    """

    def __init__(self, cfeed: CFeed, *, owner: Owner, handshake_timeout_ms: int) -> None:
        self._c = cfeed
        self._owner = owner
        self.handshake_timeout_s = handshake_timeout_ms / 1000
        # The limits set_limits() sets (PublishConfig's): none until then.
        self._gids: set[int] = set()
        self._members: frozenset[int] = frozenset()
        self.per_source = 1 << 30
        self.idle_timeout_s: float | None = None
        self._sources: dict[tuple[str, object], int] = {}  # Peer.source -> peers connected now
        #: Peers with a handshake done and no topic -> since when, in that order (a peer
        #: leaves it when it subscribes or goes, and comes back at the end).
        self._idle: dict[Peer, float] = {}
        self._ep = select.epoll()
        #: Written by the C side when a peer begins to drop messages (its queue at hwm).
        self._slow_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._slow_fd, select.EPOLLIN)
        with cfeed:
            cfeed.set_peer_poll(self._ep.fileno(), self._slow_fd)
        self._listeners: dict[int, _Listener] = {}  # listening fd ->
        self._turned_away: dict[int, _TurnedAway] = {}  # fd -> a connection over a limit
        self._peers: dict[int, Peer] = {}  # peer fd ->
        self._backlog: set[Peer] = set()  # peers with their share used up at a turn's end
        #: Peers in their handshake, in the order of their deadlines (one timeout for all).
        #: Weak: a peer gone or done leaves no memory held here until its deadline.
        self._handshakes: deque[tuple[float, weakref.ref[Peer]]] = deque()
        self._dirty: set[Peer] = set()  # peers whose subscriptions changed this turn
        self._emfile_log = Episodes(log)
        self._timeout_log = Episodes(log)
        self._source_log = Episodes(log)
        self._idle_log = Episodes(log)
        self._full_log = Episodes(log)
        self._full_dropped = 0  # as last logged
        #: Peers dropped for not finishing the handshake in time (a metric).
        self.handshake_timeouts = 0
        #: Filters refused (a metric), and their log.
        self.filters_refused = 0
        self._filter_log = Episodes(log)
        #: Peers dropped for subscribing to nothing for idle_timeout_s (a metric).
        self.idle_hangups = 0
        #: The relay's: readers' filter subscriptions are not run here but passed on as they
        #: are, each to this (None: passed on; else why not: a filter's subscription is
        #: answered with that refusal, a group's through a filter hung up on); the peers
        #: holding such topics, for ``deliver_passed``.
        self.pass_filters: Callable[[bytes], str | None] | None = None
        self.passing: dict[Peer, Counter[bytes]] = {}
        #: Connections closed at once per endpoint: their source had per_source (a metric).
        self.source_refused: dict[str, int] = {}

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def subscribers(self) -> int:
        """Peers connected now, from their accept (handshake done or not)."""
        return len(self._peers)

    @property
    def endpoints(self) -> list[str]:
        return [lst.endpoint for lst in self._listeners.values()]

    def set_limits(self, publish: PublishConfig) -> None:
        """The limits of ``publish`` (at the start, and again at a reload): connections per
        source (at most ``max_connections``), the idle timeout, ``ipc_filter_groups`` with
        their members looked up now, never at an accept (NSS may block, and this thread
        serves every peer)."""
        self.per_source = min(publish.max_connections_per_source, publish.max_connections)
        self.idle_timeout_s = publish.idle_timeout_ms / 1000 if publish.idle_timeout_ms else None
        self._gids = set(publish.ipc_filter_gids)
        self._members = group_members(publish.ipc_filter_gids)

    # -- listeners -------------------------------------------------------------

    def bind(self, endpoint: str, curve: CurveKeys | None = None) -> None:
        """Listen on ``tcp://HOST:PORT`` or ``ipc:///path`` (a stale socket file there is
        replaced: the publisher has refused a live one), with the CURVE mechanism if
        ``curve`` (its keys) else NULL; NflogdError names the endpoint."""
        transport, _, address = endpoint.partition("://")
        try:
            if transport == "ipc":
                sock = self._bind_ipc(address)
            elif transport == "tcp":
                sock = self._bind_tcp(address)
            else:
                raise NflogdError(f"publish.bind: {endpoint}: unsupported transport {transport!r}")
        except OSError as e:
            raise NflogdError(f"publish.bind: {endpoint}: {e.strerror or e}") from None
        sock.setblocking(False)
        lst = _Listener(endpoint, sock, curve)
        self._listeners[sock.fileno()] = lst
        self._ep.register(sock.fileno(), select.EPOLLIN)

    @staticmethod
    def _bind_ipc(path: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            try:
                sock.bind(path)
            except OSError as e:
                if e.errno != errno.EADDRINUSE:
                    raise
                os.unlink(path)  # a stale socket file (check_ipc_path refused a live one)
                sock.bind(path)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    @staticmethod
    def _bind_tcp(address: str) -> socket.socket:
        host, port = split_host_port("publish.bind", address, address, allow_wildcard=True)
        if host == "*":
            host = "0.0.0.0"
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror as e:
            raise OSError(errno.EADDRNOTAVAIL, f"cannot resolve {host}: {e.strerror}") from None
        sock = socket.socket(family, kind | socket.SOCK_CLOEXEC, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
        except BaseException:
            sock.close()
            raise
        return sock

    def unbind(self, endpoint: str) -> None:
        """Stop listening on ``endpoint``; peers connected through it stay."""
        for fd, lst in list(self._listeners.items()):
            if lst.endpoint == endpoint:
                if lst.paused_until is None:
                    self._ep.unregister(fd)
                del self._listeners[fd]
                lst.sock.close()

    # -- the turn --------------------------------------------------------------

    def serve(self, frames: int) -> bool:
        """A turn: accept, flush slow peers, and let each peer with something to say have an
        equal share of ``frames`` (at least MIN_SHARE) and one read; True if some peer had
        more (its rest waits for the next turn, which should come at once). A turn thus
        costs about ``frames`` however many peers flood, and each of them, a new one too,
        gets its share of every turn."""
        now = time.monotonic()
        self._expire(now)
        turn = dict.fromkeys(self._backlog)  # in order, each once
        self._backlog.clear()
        for fd, events in self._ep.poll(0, 1024):
            if fd == self._slow_fd:
                self._slow_peers()
                continue
            lst = self._listeners.get(fd)
            if lst is not None:
                self._accept(lst, now)
                continue
            if fd in self._turned_away:
                if self._turned_away[fd].read() or events & _GONE:
                    self._done_turning_away(fd)
                continue
            peer = self._peers.get(fd)
            if peer is None:
                continue
            if events & _GONE:  # closed (its writing side at least): what it sent matters no more
                self._hang_up(peer)
                continue
            if events & select.EPOLLOUT and not self._flush(peer):
                continue
            if events & select.EPOLLIN:
                turn[peer] = None
        share = max(MIN_SHARE, frames // max(1, len(turn)))
        for peer in turn:
            if peer.fd in self._peers:
                self._serve_peer(peer, share)
        self._push_filters()
        return bool(self._backlog)

    def _serve_peer(self, peer: Peer, share: int) -> None:
        """Up to ``share`` of the peer's frames, reading it at most once."""
        codec = peer.codec
        read = False
        while share > 0:
            event = codec.next_event()
            if event is None:
                if read:
                    break
                read = True
                if not self._read(peer):
                    return
                continue
            share -= 1
            if not self._handle(peer, event):
                return
        else:
            self._backlog.add(peer)
        if peer.id < 0:
            self._send_handshake(peer)

    def _read(self, peer: Peer) -> bool:
        """One read of the peer into its codec; False if it was hung up on (gone, or failed)."""
        try:
            data = peer.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError as e:
            log.debug("feed: %s: %s", peer.label, e.strerror)
            self._hang_up(peer)
            return False
        if not data:
            self._hang_up(peer)
            return False
        peer.codec.receive(data)
        return True

    def _send_handshake(self, peer: Peer) -> None:
        """What the codec has for the peer during its handshake (a few dozen bytes: the
        socket's buffer takes them; one that does not is hung up on)."""
        out = peer.codec.output()
        if not out:
            return
        try:
            sent = peer.sock.send(out)
        except OSError:
            sent = 0
        if sent != len(out):
            self._hang_up(peer)

    def _handle(self, peer: Peer, event) -> bool:
        """One codec event; False if the peer was hung up on."""
        if isinstance(event, Subscribe):
            return self._subscription(peer, b"\x01", event.topic)
        if isinstance(event, Cancel):
            return self._subscription(peer, b"\x00", event.topic)
        if isinstance(event, Ping):
            with self._c:
                rc = self._c.peer_command(peer.id, pong(event.context))
            if rc < 0:
                self._hang_up(peer)
                return False
            return True
        if isinstance(event, Handshake):
            return self._open(peer)
        if isinstance(event, Refused):
            if event.reason.startswith("its key is not"):  # the one refusal an operator acts on
                key = peer.codec.curve.refused_key if peer.codec.curve is not None else None
                self._owner.key_refused(peer.label, peer.listener.endpoint, key)
            else:
                log.debug("feed: %s: %s: hanging up", peer.label, event.reason)
            if peer.id < 0:
                # what the codec had before its end (our greeting, so that a libzmq peer with
                # another mechanism reads ours and says so, as libzmq's own server lets it)
                self._send_handshake(peer)
                if event.error:
                    try:
                        peer.sock.send(event.error)
                    except OSError:
                        pass
            self._hang_up(peer)
            return False
        return True  # Skipped

    def _open(self, peer: Peer) -> bool:
        """The peer's handshake is done: our last handshake bytes (READY), then it is the C
        sender's."""
        self._send_handshake(peer)
        if peer.fd not in self._peers:
            return False
        curve = peer.codec.curve
        with self._c:
            peer.id = self._c.add_peer(peer.fd)
            if peer.id >= 0 and curve is not None:
                self._c.set_peer_curve(peer.id, curve.session_key, curve.next_nonce)
        if peer.id < 0:
            log.debug("feed: %s: %s: hanging up", peer.label, os.strerror(-peer.id))
            self._hang_up(peer)
            return False
        peer.deadline = None
        if not peer.topics:
            self._became_idle(peer, time.monotonic())
        log.debug(
            "feed: %s: subscriber connected on %s (ZMTP %d.%d%s)",
            peer.label, peer.listener.endpoint, *(peer.codec.version or (0, 0)),
            "" if curve is None else ", CURVE",
        )  # fmt: skip
        return True

    def _flush(self, peer: Peer) -> bool:
        """Write what the peer has queued (its socket polled writable); False if the write
        failed and the peer was hung up on."""
        if peer.id < 0:
            return True
        with self._c:
            rc = self._c.flush_peer(peer.id)
        if rc < 0:
            log.debug("feed: %s: write failed: %s", peer.label, os.strerror(-rc))
            self._hang_up(peer)
        return rc >= 0

    def next_deadline(self) -> float | None:
        """When the next handshake times out or a paused listener resumes (monotonic s)."""
        waiting = self._handshakes
        while waiting and _waiting(waiting[0]) is None:  # done, or gone, since
            waiting.popleft()
        due = [lst.paused_until for lst in self._listeners.values() if lst.paused_until is not None]
        if waiting:
            due.append(waiting[0][0])
        due.extend(away.deadline for away in self._turned_away.values())
        if self._idle and self.idle_timeout_s is not None:
            due.append(next(iter(self._idle.values())) + self.idle_timeout_s)
        return min(due) if due else None

    def _expire(self, now: float) -> None:
        waiting = self._handshakes
        while waiting and (waiting[0][0] <= now or _waiting(waiting[0]) is None):
            peer = _waiting(waiting.popleft())
            if peer is None:
                continue
            self.handshake_timeouts += 1
            self._timeout_log.hit(
                "feed: %s on %s did not finish the handshake within %g s: hung up on; %d so far",
                peer.label, peer.listener.endpoint, self.handshake_timeout_s, self.handshake_timeouts,
            )  # fmt: skip
            self._hang_up(peer)
        self._expire_idle(now)
        for fd in [fd for fd, away in self._turned_away.items() if away.deadline <= now]:
            self._done_turning_away(fd)
        for fd, lst in self._listeners.items():
            if lst.paused_until is not None and lst.paused_until <= now:
                lst.paused_until = None
                self._ep.register(fd, select.EPOLLIN)

    def _became_idle(self, peer: Peer, now: float) -> None:
        self._idle.pop(peer, None)
        self._idle[peer] = now  # at the end: the dict stays in the order of the times

    def _expire_idle(self, now: float) -> None:
        """Hang up on the peers that have subscribed to nothing for idle_timeout_s."""
        timeout, idle = self.idle_timeout_s, self._idle
        if timeout is None:
            return
        while idle:
            peer, since = next(iter(idle.items()))
            if since + timeout > now:
                return
            self.idle_hangups += 1
            self._idle_log.hit(
                "feed: %s on %s subscribed to nothing for %g s (publish.idle_timeout_ms): hung up on; "
                "%d so far",
                peer.label, peer.listener.endpoint, timeout, self.idle_hangups,
            )  # fmt: skip
            self._hang_up(peer)

    def _accept(self, lst: _Listener, now: float) -> None:
        budget = None
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = lst.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._emfile_log.hit("feed: %s: cannot accept: %s; pausing %g s", lst.endpoint,
                                         e.strerror, ACCEPT_PAUSE_S)  # fmt: skip
                    self._ep.unregister(lst.sock.fileno())
                    lst.paused_until = now + ACCEPT_PAUSE_S
                    return
                continue  # ECONNABORTED and the like: that connection only
            if budget is None:
                budget = self._owner.budget()
            if lst.peers >= budget:
                self._turn_away(sock, lst, now)
                self._owner.peer_refused(lst.endpoint, lst.peers)
                continue
            admitted = self._admit(sock, address)
            if admitted is None:
                sock.close()
                continue
            label, source = admitted
            from_source = self._sources.get(source, 0)
            if from_source >= min(self.per_source, budget):
                self._turn_away(sock, lst, now)
                self._source_refused(lst, source, from_source)
                continue
            deadline = now + self.handshake_timeout_s
            peer = Peer(sock, lst, label, source, deadline)
            lst.peers += 1
            self._sources[source] = from_source + 1
            self._peers[peer.fd] = peer
            self._handshakes.append((deadline, weakref.ref(peer)))
            self._ep.register(peer.fd, _IN)
            self._send_handshake(peer)  # the greeting's first 11 bytes

    def _turn_away(self, sock: socket.socket, lst: _Listener, now: float) -> None:
        """Close a connection over a limit, telling the peer why if TURNED_AWAY_MAX others are
        not being told already (then at once)."""
        if len(self._turned_away) >= TURNED_AWAY_MAX:
            sock.close()
            return
        try:
            away = _TurnedAway(sock, lst, now + min(TURN_AWAY_S, self.handshake_timeout_s))
            self._ep.register(sock.fileno(), _IN)
        except OSError:
            sock.close()
            return
        self._turned_away[sock.fileno()] = away

    def _done_turning_away(self, fd: int) -> None:
        away = self._turned_away.pop(fd)
        try:
            self._ep.unregister(fd)
        except OSError:
            pass
        away.sock.close()

    def _source_refused(self, lst: _Listener, source: tuple[str, object], connected: int) -> None:
        n = self.source_refused[lst.endpoint] = self.source_refused.get(lst.endpoint, 0) + 1
        self._source_log.hit(
            "feed: %s: %s %s has %d connections, its limit (publish.max_connections_per_source): "
            "closing new ones from it; %d refused so far",
            lst.endpoint, *source, connected, n,
        )  # fmt: skip

    def _admit(self, sock: socket.socket, address) -> tuple[str, tuple[str, object]] | None:
        """Set up an accepted socket; its label and source, or None if ``ipc_filter_groups``
        refuses it."""
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = peer_credentials(sock)
            if self._gids and gid not in self._gids and uid not in self._members:
                log.debug("feed: ipc peer uid %d gid %d refused (publish.ipc_filter_groups)", uid, gid)
                return None
            return f":{uid}:{gid}:{pid}", ("uid", uid)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            (socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S), (socket.TCP_KEEPINTVL, KEEPALIVE_INTVL_S),
            (socket.TCP_KEEPCNT, KEEPALIVE_CNT),
        ):  # fmt: skip
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        return str(address[0]), ("address", address[0])

    def _slow_peers(self) -> None:
        """Log (once per episode) each peer that lost messages at its hwm since the last look."""
        try:
            os.eventfd_read(self._slow_fd)
        except BlockingIOError:
            pass
        with self._c:
            counts = [(p, self._c.peer_dropped(p.id)) for p in self._peers.values() if p.id >= 0]
            full, queued = self._c.full_dropped, self._c.queued_bytes
        if full > self._full_dropped:
            self._full_dropped = full
            self._full_log.hit(
                "feed: the slow subscribers' queues hold %d bytes, publish.max_queued_bytes: messages "
                "dropped for them; %d so far",
                queued, full,
            )  # fmt: skip
        for peer, dropped in counts:
            if dropped > peer.dropped:
                peer.dropped = dropped
                peer.slow_log.hit(
                    "feed: subscriber %s on %s is too slow: it had publish.hwm messages queued; "
                    "%d of its messages dropped so far",
                    peer.label, peer.listener.endpoint, dropped,
                )  # fmt: skip

    # -- subscriptions ---------------------------------------------------------

    def _subscription(self, peer: Peer, kind: bytes, topic: bytes) -> bool:
        """A (un)subscription; False if its topic was foreign and the peer hung up on."""
        if self.pass_filters is not None and filter_topic(topic):
            return self._pass_filter(peer, kind, topic)
        if topic.startswith(filters.FILTER_TOPIC):
            return self._filter(peer, kind, topic[len(filters.FILTER_TOPIC) :])
        if topic.startswith(wire.FILTERED_TOPIC) and self._through_filter(peer, topic):
            topic = topic[len(wire.FILTERED_TOPIC) + 8 :]  # the group's, as its filter's
        if len(topic) > wire.TOPIC.size:  # no message can match it: the peer is hung up on
            self._hang_up(peer)
            self._owner.foreign_topic(peer.label, len(topic), 1)
            return False
        self._owner.subscription(kind + topic, " (CURVE)" if peer.codec.curve is not None else "")
        if peer.topics.subscribe(topic) if kind == b"\x01" else peer.topics.cancel(topic):
            self._dirty.add(peer)
            if not peer.topics:
                self._became_idle(peer, time.monotonic())
            else:
                self._idle.pop(peer, None)
        return True

    def _pass_filter(self, peer: Peer, kind: bytes, topic: bytes) -> bool:
        """The relay: a reader's filter topic, (un)subscribed, passed on as it is and kept for
        ``deliver_passed``. A filter refused is answered as a daemon answers it (the reason,
        the connection kept); False: a group through a filter refused, the peer hung up on."""
        assert self.pass_filters is not None
        held = peer.passed
        if kind == b"\x01":
            why = self.pass_filters(kind + topic)
            if why is not None and topic.startswith(filters.FILTER_TOPIC):
                with self._c:  # the reply a daemon gives, to this reader alone
                    rc = self._c.peer_message(peer.id, filters.reply(topic, False, why))
                if rc < 0:
                    self._hang_up(peer)
                    return False
                return True
            if why is not None:
                self._hang_up(peer)
                self._owner.foreign_topic(peer.label, len(topic), 1)
                return False
            held[topic] += 1
            self.passing[peer] = held
            self._idle.pop(peer, None)
        elif held[topic] > 0:
            held[topic] -= 1
            if not held[topic]:
                del held[topic]
            self.pass_filters(kind + topic)
            if not held:
                self.passing.pop(peer, None)
                if not peer.topics:
                    self._became_idle(peer, time.monotonic())
        return True

    def deliver_passed(self, frames: list) -> None:
        """A message on a readers' filter topic (the relay's upstream: a filter's reply or
        messages) to each peer that passed a prefix of it on; the caller holds the lock."""
        topic = bytes(frames[0])
        for peer, held in self.passing.items():
            if peer.id >= 0 and any(topic.startswith(t) for t in held):
                self._c.peer_message(peer.id, frames)

    def _through_filter(self, peer: Peer, topic: bytes) -> bool:
        """A subscription to a group through the peer's filter (``wire.FILTERED_TOPIC``, the
        filter's id, the group's topic or none): from now on its filtered messages carry that
        topic. False (a foreign topic) for another filter's id or no filter."""
        at = len(wire.FILTERED_TOPIC)
        if peer.spec is None or len(topic) > at + 8 + wire.TOPIC.size:
            return False
        if topic[at : at + 8] != filters.spec_id(peer.spec):
            return False
        if not peer.tagged:
            with self._c:
                self._c.set_peer_filter_topic(peer.id, topic[: at + 8])
            peer.tagged = True
        return True

    def _filter(self, peer: Peer, kind: bytes, spec: bytes) -> bool:
        """A filter's (un)subscription: the peer's filter set or cleared in C at once, and the
        reply (the subscription's topic, then accepted or refused with the reason); False if
        the peer was hung up on. Several subscriptions of one filter (their tags differ: the
        readers behind an nflogd-relay) hold it together; a different one is refused."""
        self._owner.subscription(kind + filters.FILTER_TOPIC, " (a filter)")
        topic = filters.FILTER_TOPIC + spec
        n = filters.spec_length(spec)
        if filters.HEAD.size <= n <= len(spec):
            spec, tag = spec[:n], spec[n:]
        else:
            tag = b""  # a malformed spec: the C check says why
        if kind == b"\x00":
            if peer.spec == spec and tag in peer.tags:
                peer.tags.discard(tag)
                if not peer.tags:
                    with self._c:
                        self._c.set_peer_filter(peer.id, None)
                        self._c.set_peer_filter_topic(peer.id, None)  # the next filter's id sets it
                    peer.spec = None
                    peer.tagged = False
            return True
        if len(tag) > filters.MAX_TAG:
            slot, why = -1, f"malformed filter: {len(tag)} bytes after the spec, more than {filters.MAX_TAG}"
        elif peer.spec is not None and peer.spec != spec:
            slot, why = -1, "one filter per connection, and this one holds another"
        elif peer.spec == spec:
            slot, why = 0, ""  # held already: one more subscription of it
        else:
            with self._c:
                slot, why = self._c.set_peer_filter(peer.id, spec)
        if slot >= 0:
            peer.spec = spec
            peer.tags.add(tag)
            log.debug("feed: %s: filter %r in force", peer.label, filters.spec_text(spec))
        else:
            self.filters_refused += 1
            self._filter_log.hit(
                "feed: %s on %s: filter refused: %s; %d refused so far",
                peer.label, peer.listener.endpoint, why, self.filters_refused,
            )  # fmt: skip
        with self._c:  # a message of two frames, boxed for a CURVE peer
            rc = self._c.peer_message(peer.id, filters.reply(topic, slot >= 0, why))
        if rc < 0:
            self._hang_up(peer)
            return False
        return True

    def _push_filters(self) -> None:
        """Hand each changed peer's subscriptions to the C side, as bitmaps of groups."""
        if not self._dirty:
            return
        with self._c:
            for peer in self._dirty:
                if peer.id >= 0:
                    self._c.peer_filter(peer.id, *peer.topics.filter())
        self._dirty.clear()

    def _hang_up(self, peer: Peer) -> None:
        if self._peers.pop(peer.fd, None) is None:
            return
        n = self._sources.pop(peer.source, 1) - 1
        if n:
            self._sources[peer.source] = n
        peer.deadline = None  # out of _handshakes at its turn
        self._idle.pop(peer, None)
        self._backlog.discard(peer)
        self._dirty.discard(peer)
        if peer.id >= 0:
            with self._c:
                self._c.remove_peer(peer.id)
            peer.id = -1
        if peer.topics:
            self._owner.peer_gone(peer.topics.counts)
        if self.passing.pop(peer, None) is not None and self.pass_filters is not None:
            for topic, n in peer.passed.items():  # undone as its cancels would have
                for _ in range(n):
                    self.pass_filters(b"\x00" + topic)
            peer.passed.clear()
        try:
            self._ep.unregister(peer.fd)
        except OSError:
            pass
        peer.sock.close()
        peer.listener.peers -= 1

    # -- end -------------------------------------------------------------------

    def close(self, linger_ms: int = 0) -> tuple[int, int]:
        """Give peers up to ``linger_ms`` to take what they have queued, then close everything;
        (messages, packets) still queued then, never sent."""
        end = time.monotonic() + linger_ms / 1000
        while self._queued() and time.monotonic() < end:
            for fd, events in self._ep.poll(max(0.0, end - time.monotonic()), 1024):
                peer = self._peers.get(fd)
                if peer is None:
                    continue
                if events & select.EPOLLOUT:
                    self._flush(peer)
                elif events & (select.EPOLLHUP | select.EPOLLERR | select.EPOLLIN):
                    self._hang_up(peer)  # gone, or talking: no more time for it
        with self._c:
            left = self._c.peer_queued(), self._c.peer_queued_packets()
        for peer in list(self._peers.values()):
            self._hang_up(peer)
        for fd in list(self._turned_away):
            self._done_turning_away(fd)
        for lst in self._listeners.values():
            lst.sock.close()
        self._listeners.clear()
        with self._c:
            self._c.set_peer_poll(-1, -1)
        self._ep.close()
        os.close(self._slow_fd)
        return left

    def _queued(self) -> int:
        """Messages every peer has queued."""
        with self._c:
            return self._c.peer_queued()
