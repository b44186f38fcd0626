"""The feed's NULL-mechanism endpoints (ipc, and tcp without CURVE), served by nflogd itself.

The capture threads write each message straight to the subscribers' sockets
(``_peers.c``); everything else a ZeroMQ XPUB socket would do for them is done here, on the
control thread, speaking ZMTP 3.0 (rfc.zeromq.org/spec/23) with the NULL mechanism: it
listens, accepts within the connection budget, sends its greeting and READY (Socket-Type
XPUB), checks the peer's (a SUB or XSUB, NULL), reads its subscriptions and answers its
PINGs, and flushes what a slow peer queued once its socket drains. Any libzmq SUB or XSUB
connects to it as to an XPUB::

    server = ZmtpServer(cfeed, owner=publisher, handshake_timeout_ms=10_000)
    server.bind("ipc:///run/nflogd/feed.sock")
    poller.register(server.fileno(), zmq.POLLIN)     # its epoll: listeners and peers
    flood = server.serve(256)                       # a turn: at most 256 subscriptions read
    server.next_deadline()                          # when the next handshake times out
    server.close(linger_ms=250)

What a peer can make the daemon spend is bounded (docs/security.md, "Limits"): its frames at
``MAX_FRAME`` bytes (a larger one is a hang-up), what it sent and was not parsed yet at one
read, its time to finish the handshake, its queue at ``publish.hwm`` messages (past that
its messages are dropped, counted), the subscriptions read per turn. The connection budget,
the counting and the once-per-episode logs are the owner's (``Publisher``), which the
CURVE socket's peers share.
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
from collections import deque
from typing import TYPE_CHECKING, Protocol

from nflogd_client import wire

from .addresses import split_host_port
from .episodes import Episodes
from .errors import NflogdError

if TYPE_CHECKING:
    from .ffi import CFeed

__all__ = ["MAX_FRAME", "ZmtpServer", "greeting", "peer_credentials"]

log = logging.getLogger("nflogd.publish")

#: The largest frame a peer may send (bytes): a NULL READY is about 30, a subscription 3, a PING
#: at most 21. As libzmq's MAXMSGSIZE did on the XPUB: keeps what a peer sends us short.
MAX_FRAME = 64
#: Bytes read from one peer at a time.
READ_BYTES = 4096
#: Connections accepted per listener per turn, and the listen backlog.
ACCEPTS_PER_TURN = 64
BACKLOG = 100
#: After EMFILE on accept, the listener rests this long (the connection waits in the backlog).
ACCEPT_PAUSE_S = 0.1
#: TCP keepalive on peers' connections (idle s, interval s, probes): a peer that vanished is
#: found in about 90 s. The XPUB sockets get the same (publish.TCP_KEEPALIVE).
KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, KEEPALIVE_CNT = 60, 10, 3

_MORE, _LONG, _COMMAND = 1, 2, 4
_UCRED = struct.Struct("=iII")  # struct ucred: pid, uid, gid


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid, gid


def greeting() -> bytes:
    """ZMTP 3.0's greeting with the NULL mechanism: 64 bytes."""
    return b"\xff" + bytes(8) + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)


def command(name: bytes, body: bytes) -> bytes:
    """A ZMTP command frame (short: the caller keeps it under 256 bytes)."""
    data = bytes([len(name)]) + name + body
    return bytes([_COMMAND, len(data)]) + data


def _property(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


#: What the server says at once to every peer it accepts: its greeting and READY.
HELLO = greeting() + command(b"READY", _property(b"Socket-Type", b"XPUB"))


def _properties(data: bytes) -> dict[bytes, bytes] | None:
    """A READY's metadata, or None if malformed."""
    props, at = {}, 0
    while at < len(data):
        n = data[at]
        name = data[at + 1 : at + 1 + n]
        if len(name) < n or at + 1 + n + 4 > len(data):
            return None
        (size,) = struct.unpack_from(">I", data, at + 1 + n)
        start = at + 1 + n + 4
        if start + size > len(data):
            return None
        props[name.lower()] = data[start : start + size]
        at = start + size
    return props


class Owner(Protocol):
    """What the server asks of the publisher that owns it."""

    def budget(self) -> int: ...
    def peer_refused(self, endpoint: str, connected: int) -> None: ...
    def subscription(self, msg: bytes, via: str) -> None: ...
    def foreign_topic(self, peer: str, length: int, hung: int) -> None: ...


class _Listener:
    __slots__ = ("endpoint", "sock", "peers", "paused_until")

    def __init__(self, endpoint: str, sock: socket.socket):
        self.endpoint = endpoint
        self.sock = sock
        self.peers = 0  # connected now, handshake or not
        self.paused_until: float | None = None


class _Peer:
    __slots__ = (
        "sock", "fd", "listener", "label", "state", "buf", "deadline", "id", "topics", "skip", "dropped",
        "slow_log",
    )  # fmt: skip

    GREETING, READY, OPEN = 0, 1, 2

    def __init__(self, sock: socket.socket, listener: _Listener, label: str, deadline: float):
        self.sock = sock
        self.fd = sock.fileno()
        self.listener = listener
        self.label = label  # tcp: the address; ipc: ":uid:gid:pid", as libzmq's Peer-Address
        self.state = _Peer.GREETING
        self.buf = bytearray()
        self.deadline: float | None = deadline
        self.id = -1  # the C peer, once OPEN
        self.topics: set[bytes] = set()
        self.skip = False  # inside a multipart message (not a subscription): its frames ignored
        self.dropped = 0  # messages dropped for it at hwm, as last logged
        self.slow_log = Episodes(log)


class ZmtpServer:
    """Listeners and peers of the feed's NULL endpoints, on one epoll (``fileno()``).

    ``cfeed`` is the C side: its lock is held for everything the capture threads share
    (registering a peer, its filter, flushing, hanging up). ``owner`` counts and logs for the
    feed as a whole (``Owner``).
    """

    def __init__(
        self, cfeed: CFeed, *, owner: Owner, handshake_timeout_ms: int, ipc_gids: tuple[int, ...] = ()
    ) -> None:
        self._c = cfeed
        self._owner = owner
        self.handshake_timeout_s = handshake_timeout_ms / 1000
        self._gids = set(ipc_gids)
        self._ep = select.epoll()
        #: Written by the C side when a peer begins to drop messages (its queue at hwm).
        self._slow_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep.register(self._slow_fd, select.EPOLLIN)
        with cfeed:
            cfeed.set_peer_poll(self._ep.fileno(), self._slow_fd)
        self._listeners: dict[int, _Listener] = {}  # listening fd ->
        self._peers: dict[int, _Peer] = {}  # peer fd ->
        self._backlog: set[_Peer] = set()  # peers with frames left unparsed at a turn's end
        #: Peers in their handshake, in the order of their deadlines (one timeout for all).
        self._handshakes: deque[_Peer] = deque()
        self._dirty: set[_Peer] = set()  # peers whose subscriptions changed this turn
        self._emfile_log = Episodes(log)
        self._timeout_log = Episodes(log)
        #: Peers dropped for not finishing the handshake in time (a metric).
        self.handshake_timeouts = 0

    def fileno(self) -> int:
        return self._ep.fileno()

    @property
    def subscribers(self) -> int:
        """Peers connected now, from their accept (handshake done or not)."""
        return len(self._peers)

    @property
    def endpoints(self) -> list[str]:
        return [lst.endpoint for lst in self._listeners.values()]

    # -- listeners -------------------------------------------------------------

    def bind(self, endpoint: str) -> None:
        """Listen on ``tcp://HOST:PORT`` or ``ipc:///path`` (a stale socket file there is
        replaced: the publisher has refused a live one); NflogdError names the endpoint."""
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
        lst = _Listener(endpoint, sock)
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

    def serve(self, limit: int) -> bool:
        """Accept, handshake, read subscriptions (at most ``limit``), flush slow peers; True
        if the limit was reached (what is left is read at the next turn)."""
        now = time.monotonic()
        self._expire(now)
        left = limit
        for waiting in list(self._backlog):
            left = self._parse(waiting, left)
        for fd, events in self._ep.poll(0, 1024):
            if fd == self._slow_fd:
                self._slow_peers()
                continue
            lst = self._listeners.get(fd)
            if lst is not None:
                self._accept(lst, now)
                continue
            peer = self._peers.get(fd)
            if peer is None:
                continue
            if events & select.EPOLLOUT and not self._flush(peer):
                continue
            if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
                if peer in self._backlog:
                    continue  # parse what it sent before reading more
                left = self._read(peer, left)
        self._push_filters()
        return left <= 0

    def _flush(self, peer: _Peer) -> bool:
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
        while waiting and waiting[0].deadline is None:  # done, or gone, since
            waiting.popleft()
        due = [lst.paused_until for lst in self._listeners.values() if lst.paused_until is not None]
        first = waiting[0].deadline if waiting else None
        if first is not None:
            due.append(first)
        return min(due) if due else None

    def _expire(self, now: float) -> None:
        waiting = self._handshakes
        while waiting and (waiting[0].deadline is None or waiting[0].deadline <= now):
            peer = waiting.popleft()
            if peer.deadline is None:
                continue
            self.handshake_timeouts += 1
            self._timeout_log.hit(
                "feed: %s on %s did not finish the handshake within %g s: hung up on; %d so far",
                peer.label, peer.listener.endpoint, self.handshake_timeout_s, self.handshake_timeouts,
            )  # fmt: skip
            self._hang_up(peer)
        for fd, lst in self._listeners.items():
            if lst.paused_until is not None and lst.paused_until <= now:
                lst.paused_until = None
                self._ep.register(fd, select.EPOLLIN)

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
                sock.close()
                self._owner.peer_refused(lst.endpoint, lst.peers)
                continue
            label = self._admit(sock, address)
            if label is None:
                sock.close()
                continue
            try:
                sent = sock.send(HELLO)
            except OSError:
                sent = 0
            if sent != len(HELLO):
                sock.close()
                continue
            peer = _Peer(sock, lst, label, now + self.handshake_timeout_s)
            lst.peers += 1
            self._peers[peer.fd] = peer
            self._handshakes.append(peer)
            self._ep.register(peer.fd, select.EPOLLIN)

    def _admit(self, sock: socket.socket, address) -> str | None:
        """Set up an accepted socket; its label, or None if ``ipc_filter_groups`` refuses it."""
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = peer_credentials(sock)
            if self._gids and not self._gid_allowed(uid, gid):
                log.debug("feed: ipc peer uid %d gid %d refused (publish.ipc_filter_groups)", uid, gid)
                return None
            return f":{uid}:{gid}:{pid}"
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for option, value in (
            (socket.TCP_KEEPIDLE, KEEPALIVE_IDLE_S), (socket.TCP_KEEPINTVL, KEEPALIVE_INTVL_S),
            (socket.TCP_KEEPCNT, KEEPALIVE_CNT),
        ):  # fmt: skip
            sock.setsockopt(socket.IPPROTO_TCP, option, value)
        return str(address[0])

    def _gid_allowed(self, uid: int, gid: int) -> bool:
        """As libzmq's IPC_FILTER_GID: the peer's group, or a group its user is a member of."""
        if gid in self._gids:
            return True
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            return False
        for g in self._gids:
            try:
                if name in grp.getgrgid(g).gr_mem:
                    return True
            except KeyError:
                continue
        return False

    def _slow_peers(self) -> None:
        """Log (once per episode) each peer that lost messages at its hwm since the last look."""
        try:
            os.eventfd_read(self._slow_fd)
        except BlockingIOError:
            pass
        with self._c:
            counts = [(p, self._c.peer_dropped(p.id)) for p in self._peers.values() if p.id >= 0]
        for peer, dropped in counts:
            if dropped > peer.dropped:
                peer.dropped = dropped
                peer.slow_log.hit(
                    "feed: subscriber %s on %s is too slow: it had publish.hwm messages queued; "
                    "%d of its messages dropped so far",
                    peer.label, peer.listener.endpoint, dropped,
                )  # fmt: skip

    # -- a peer's input --------------------------------------------------------

    def _read(self, peer: _Peer, left: int) -> int:
        try:
            data = peer.sock.recv(READ_BYTES)
        except (BlockingIOError, InterruptedError):
            return left
        except OSError as e:
            log.debug("feed: %s: %s", peer.label, e.strerror)
            self._hang_up(peer)
            return left
        if not data:
            self._hang_up(peer)
            return left
        peer.buf += data
        return self._parse(peer, left)

    def _parse(self, peer: _Peer, left: int) -> int:
        """Handle what ``peer`` sent, up to ``left`` subscriptions; what remains of ``left``."""
        self._backlog.discard(peer)
        buf = peer.buf
        at = 0
        if peer.state == _Peer.GREETING:
            if buf[:1] not in (b"", b"\xff") or (len(buf) >= 10 and not buf[9] & 1):
                return self._refuse(peer, "not a ZMTP 3 peer", left)
            if len(buf) < 64:
                return left
            if buf[10] < 3:
                return self._refuse(peer, f"ZMTP version {buf[10]}", left)
            mechanism = bytes(buf[12:32]).rstrip(b"\0")
            if mechanism != b"NULL":
                return self._refuse(peer, f"mechanism {mechanism.decode(errors='replace')!r}", left)
            at = 64
            peer.state = _Peer.READY
        while True:
            if len(buf) - at < 2:
                break
            flags = buf[at]
            if flags & ~(_MORE | _LONG | _COMMAND):
                return self._refuse(peer, "a malformed frame", left)
            if flags & _LONG:
                if len(buf) - at < 9:
                    break
                (size,) = struct.unpack_from(">Q", buf, at + 1)
                start = at + 9
            else:
                size = buf[at + 1]
                start = at + 2
            if size > MAX_FRAME:
                return self._refuse(peer, f"a {size}-byte frame (at most {MAX_FRAME})", left)
            if len(buf) - start < size:
                break
            if left <= 0 and peer.state == _Peer.OPEN:
                self._backlog.add(peer)  # the turn's share is read: the rest next turn
                break
            body = bytes(buf[start : start + size])
            at = start + size
            if flags & _COMMAND:
                if peer.state == _Peer.OPEN:
                    left -= 1  # a PING costs a turn's share too
                if not self._command(peer, body):
                    return left
            elif peer.state != _Peer.OPEN:
                return self._refuse(peer, "a message before READY", left)
            elif peer.skip or flags & _MORE:
                peer.skip = bool(flags & _MORE)  # not a subscription (nothing else reaches an XPUB)
            elif body[:1] in (b"\x00", b"\x01"):
                left -= 1
                if not self._subscription(peer, body):
                    return left
        del buf[:at]
        return left

    def _command(self, peer: _Peer, body: bytes) -> bool:
        """One command frame; False if the peer was hung up on."""
        n = body[0] if body else 0
        name, data = body[1 : 1 + n], body[1 + n :]
        if peer.state == _Peer.READY:
            if name != b"READY":
                self._refuse(peer, f"{name!r} before READY", 0)
                return False
            props = _properties(data)
            kind = props.get(b"socket-type") if props is not None else None
            if kind not in (b"SUB", b"XSUB"):
                self._refuse(peer, f"socket type {kind!r}, not SUB or XSUB", 0)
                return False
            with self._c:
                peer.id = self._c.add_peer(peer.fd)
            if peer.id < 0:
                self._refuse(peer, os.strerror(-peer.id), 0)
                return False
            peer.state, peer.deadline = _Peer.OPEN, None
            log.debug("feed: %s: subscriber connected on %s", peer.label, peer.listener.endpoint)
        elif name == b"PING" and len(data) >= 2:
            with self._c:
                rc = self._c.peer_command(peer.id, command(b"PONG", data[2:18]))
            if rc < 0:
                self._hang_up(peer)
                return False
        elif name in (b"SUBSCRIBE", b"CANCEL"):  # ZMTP 3.1's form of a (un)subscription
            return self._subscription(peer, (b"\x01" if name == b"SUBSCRIBE" else b"\x00") + data)
        return True  # ERROR, PONG and anything newer: nothing to do

    def _subscription(self, peer: _Peer, msg: bytes) -> bool:
        """A (un)subscription; False if its topic was foreign and the peer hung up on."""
        topic = msg[1:]
        if len(topic) > wire.TOPIC.size:  # no message can match it: the peer is hung up on
            self._hang_up(peer)
            self._owner.foreign_topic(peer.label, len(topic), 1)
            return False
        self._owner.subscription(msg, "")
        if msg[:1] == b"\x01":
            if topic not in peer.topics:
                peer.topics.add(topic)
                self._dirty.add(peer)
        elif topic in peer.topics:
            peer.topics.discard(topic)
            self._dirty.add(peer)
        return True

    def _push_filters(self) -> None:
        """Hand each changed peer's subscriptions to the C side, as bitmaps of groups."""
        if not self._dirty:
            return
        with self._c:
            for peer in self._dirty:
                if peer.id < 0:
                    continue
                prefix, exact = bytearray(32), None
                for t in peer.topics:
                    if len(t) == 1:
                        prefix[t[0] >> 3] |= 1 << (t[0] & 7)
                    elif len(t) == 2:
                        exact = exact if exact is not None else bytearray(8192)
                        group = t[0] << 8 | t[1]
                        exact[group >> 3] |= 1 << (group & 7)
                self._c.peer_filter(peer.id, b"" in peer.topics, bytes(prefix), exact)
        self._dirty.clear()

    def _refuse(self, peer: _Peer, why: str, left: int) -> int:
        log.debug("feed: %s: %s: hanging up", peer.label, why)
        self._hang_up(peer)
        return left

    def _hang_up(self, peer: _Peer) -> None:
        if self._peers.pop(peer.fd, None) is None:
            return
        peer.deadline = None  # out of _handshakes at its turn
        self._backlog.discard(peer)
        self._dirty.discard(peer)
        if peer.id >= 0:
            with self._c:
                self._c.remove_peer(peer.id)
            peer.id = -1
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
