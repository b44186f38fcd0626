"""The feed: the endpoints every kernel batch goes out on, to every subscriber.

Use::

    ctx = zmq.Context()
    pub = Publisher(ctx, cfg.publish, node=cfg.node)      # binds every endpoint now
    for fd in [*pub.fds, pub.wake_fd]:
        poller.register(fd, zmq.POLLIN)                   # subscriptions: pub.handle_incoming()
    for mon in pub.monitors:
        poller.register(mon, zmq.POLLIN)                  # connects, disconnects: handle_monitor()
    ...
    pub.publish(batch, kernel_dropped=counters.kernel_dropped)
    pub.subscribers                                       # peers connected right now
    pub.close()

Endpoints: the NULL-mechanism ones (ipc, and tcp without CURVE) are served by nflogd itself,
``server`` (``nflogd.feed.server``: ZMTP 3.1, as an XPUB socket would), whose peers the capture
threads write straight to; with ``direct=False`` (the relay, which forwards on XPUB
sockets) an XPUB socket, ``socket``, holds them instead. With ``publish.curve`` every tcp
endpoint is on ``curve_socket`` (a CURVE server XPUB, ZAP domain ``ZAP_DOMAIN``), each
message sent there with the same frames and ``seq`` (else ``curve_socket`` is None). The ZAP
handler (``nflogd.access``) must run before ``curve_socket`` binds.
``publish.ipc_filter_gids`` filters the peers of the ipc endpoints by group.

Threads: every capture thread sends at once, in C (``cfeed``) or through ``publish()``;
``lock`` serialises that with every other use of the peers and sockets. The control thread
polls ``fds`` (the server's epoll, the XPUB sockets' ``ZMQ_FD``, never the sockets) for
``handle_incoming()``, which reads at most ``SUBSCRIPTIONS_PER_TURN`` subscriptions per
socket and from the server's peers, ``wake_fd`` (a capture thread's send found subscriptions
waiting on an XPUB) and ``monitors`` for ``handle_monitor()``; it waits at most
``next_check_ms()`` (None: for events only).

Delivery: ``publish()`` never blocks; a subscriber past ``publish.hwm`` messages queued
loses its own (a gap in ``seq``; counted in ``slow_dropped`` for the server's peers).
``seq`` counts the packets captured per group and epoch, delivered or not
(``docs/wire-format.md``). ``subscribers`` is the peers connected now, each from its
connect (the XPUB sockets' from their monitors). Why it is built so: ``docs/design.md``.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import resource
import socket
import stat
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import zmq
from nflogd_client import wire
from nflogd_client.endpoints import Monitor
from zmq.utils import z85

from .episodes import QUIET_S, Episodes
from .errors import NflogdError
from .feed.codec import MAX_FRAME
from .feed.curve import CurveKeys
from .feed.server import KEEPALIVE_CNT, KEEPALIVE_IDLE_S, KEEPALIVE_INTVL_S, ZmtpServer, peer_credentials
from .ffi import CFeed

if TYPE_CHECKING:
    from .config import PublishConfig

__all__ = [
    "Publisher", "ZAP_DOMAIN", "check_ipc_dir", "check_ipc_path", "check_restart_only",
    "ipc_path", "make_ipc_dirs",
]  # fmt: skip

log = logging.getLogger(__name__)

#: Send flags as plain ints: pyzmq's enum flags cost microseconds per ``|``.
NOBLOCK = int(zmq.NOBLOCK)
SNDMORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)

#: How long close() lets queued messages drain to connected subscribers, in ms.
LINGER_MS = 250

#: The largest message a peer may send us (ZMQ_MAXMSGSIZE, bytes, handshake commands included):
#: a subscription is 3 bytes, CURVE's INITIATE about 300; a peer sending more is disconnected
#: by libzmq before the message is allocated.
PEER_MAX_MESSAGE = 512
#: The same on an XPUB without CURVE (the relay's): no 300-byte handshake commands there, as on
#: the server. Keeps a topic libzmq stores, byte by byte in its trie, short until
#: handle_incoming() hangs up on its sender.
PEER_MAX_MESSAGE_NULL = MAX_FRAME
#: Messages (subscriptions) ZeroMQ queues from each peer before it stops reading that peer.
PEER_RCVHWM = 100
#: Subscription messages handle_incoming() reads per socket per call.
SUBSCRIPTIONS_PER_TURN = 256
#: Open files kept for everything but feed peers (groups, sockets, metrics, key files).
FD_RESERVE = 64
#: TCP keepalive on peers' connections: a peer that vanished is found in about 90 s.
TCP_KEEPALIVE = (
    (zmq.TCP_KEEPALIVE, 1),
    (zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S),
    (zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTVL_S),
    (zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_CNT),
)

#: ZAP domain of the CURVE socket; ``nflogd.access`` configures the authorized keys for it.
ZAP_DOMAIN = "nflogd"


def _peer_socket(fd: int, endpoint: str) -> socket.socket | None:
    """The connection ``fd`` as a socket object (to be detached, never closed), if it still is a
    connection accepted on ``endpoint``: its local address is the endpoint's (the fd may have
    been closed and reused since the monitor reported it)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        local = sock.getsockname()
        path = ipc_path(endpoint)
        if path is not None:
            ok = sock.family == socket.AF_UNIX and local in (path, path.encode())
        else:
            port = endpoint.rpartition(":")[2]
            ok = sock.family in (socket.AF_INET, socket.AF_INET6) and str(local[1]) == port
    except OSError:
        ok = False
    if not ok:
        sock.detach()
        return None
    return sock


def _hang_up(fd: int, endpoint: str) -> bool:
    """Shut down libzmq's connection ``fd`` (libzmq sees the end and closes it); True if done."""
    sock = _peer_socket(fd, endpoint)
    if sock is None:
        return False
    try:
        sock.shutdown(socket.SHUT_RDWR)
        return True
    except OSError:
        return False
    finally:
        sock.detach()


def _peer_matches(fd: int, endpoint: str, address: str) -> bool:
    """Whether connection ``fd`` is from the peer libzmq calls ``address`` (Peer-Address:
    the IP for tcp, ``:uid:gid:pid`` for ipc)."""
    sock = _peer_socket(fd, endpoint)
    if sock is None or not address:
        if sock is not None:
            sock.detach()
        return False
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, gid = peer_credentials(sock)
            return address == f":{uid}:{gid}:{pid}"
        return sock.getpeername()[0] == address
    except OSError:
        return False
    finally:
        sock.detach()


def ipc_path(endpoint: str) -> str | None:
    """The filesystem path of an ``ipc://`` endpoint; None for other transports and
    abstract names (``ipc://@name``), which have no file."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://") :]
    if path.startswith("@") or not path:
        return None
    return path


def check_ipc_path(endpoint: str, path: str) -> None:
    """Refuse a path another process is serving; libzmq would unlink it and take over.

    A socket file nobody accepts on (connect refused) is left behind by a
    process that died: fine, libzmq replaces it. A file that is not a socket is
    refused too, since libzmq would delete it.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise NflogdError(f"publish.bind: {endpoint}: {e.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise NflogdError(f"publish.bind: {endpoint}: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return  # stale
    except (socket.timeout, TimeoutError, BlockingIOError):
        pass  # a full accept backlog: someone is serving, just busy
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.ETIMEDOUT):
            raise NflogdError(f"publish.bind: {endpoint}: cannot probe {path}: {e.strerror or e}") from None
    finally:
        probe.close()
    raise NflogdError(f"publish.bind: {endpoint}: another process is serving this path")


def check_ipc_dir(endpoint: str, path: str) -> None:
    """Refuse a socket directory that someone other than us or root could change.

    Whoever can write the socket's directory can rename our socket away and serve a feed of
    their own at its path, which readers would take for ours. So the directory must belong to
    root or to the daemon's user and be writable by its owner only; each directory above it
    must belong to root or us too, and may be writable by others only if it is sticky (/tmp:
    then nobody else can rename what is in it).
    """
    euid = os.geteuid()
    directory = os.path.dirname(os.path.abspath(path))
    first = True
    while True:
        try:
            st = os.stat(directory)
        except OSError as e:
            raise NflogdError(f"publish.bind: {endpoint}: {directory}: {e.strerror}") from None
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        who = None
        if st.st_uid not in (0, euid):
            who = f"is owned by uid {st.st_uid}"
        elif writable and (first or not st.st_mode & stat.S_ISVTX):
            by = "others" if st.st_mode & stat.S_IWOTH else "its group"
            who = f"is writable by {by} (mode {st.st_mode & 0o7777:04o})"
        if who is not None:
            raise NflogdError(
                f"publish.bind: {endpoint}: {directory} {who}: someone other than this daemon's user "
                "or root could replace the socket; use a directory only they can write"
            )
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory, first = parent, False


def _make_parent(endpoint: str, path: str, owner: tuple[int, int] | None = None) -> None:
    """Create a missing parent directory, mode 0750 (clients in our group may enter),
    owned by ``owner`` (uid, gid) if given."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(parent):
        return
    try:
        os.makedirs(parent, mode=0o750)
        os.chmod(parent, 0o750)
        if owner is not None:
            os.chown(parent, *owner)
    except FileExistsError:
        pass
    except OSError as e:
        raise NflogdError(f"publish.bind: {endpoint}: cannot create {parent}: {e.strerror}") from None


def make_ipc_dirs(endpoints: Iterable[str], owner: tuple[int, int]) -> None:
    """Create the missing parent directories of ipc endpoints for ``owner`` (uid, gid).

    The daemon calls this as root before it drops privileges, so that the user it
    becomes can create its sockets under /run even without systemd's RuntimeDirectory.
    """
    for endpoint in endpoints:
        path = ipc_path(endpoint)
        if path is not None:
            _make_parent(endpoint, path, owner)


class Publisher:
    """The XPUB socket(s) bound to every endpoint of ``publish`` (a PublishConfig).

    Binding errors raise :class:`NflogdError` naming the endpoint; nothing is
    left bound then.
    """

    def __init__(
        self,
        ctx: zmq.Context[Any],
        publish: PublishConfig,
        node: str = "",
        epoch: int | None = None,
        direct: bool = True,
        curve_keys: CurveKeys | None = None,
    ) -> None:
        self.epoch = time.time_ns() if epoch is None else epoch
        #: The C side: the server's peers, the sockets as the C sender sees them, and the lock.
        self._c = CFeed(self.epoch)
        self._c.set_hwm(publish.hwm)
        self._c.set_max_queued_bytes(publish.max_queued_bytes)
        self._node = node
        self.hwm = publish.hwm
        self.endpoints: list[str] = []
        self._sent = 0  # messages publish() sent
        self._unsent = 0  # messages ZeroMQ refused (never expected with XPUB_NODROP off)
        #: Readable when a send found incoming messages after next_check_ms() (see there).
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._wake_on_incoming = False  # publish() looks (the C sender has its own flag)
        self._seq: dict[int, int] = {}
        #: Sequence marks sent (``mark()``).
        self.marks = 0
        self._monitors: dict[zmq.Socket, Monitor] = {}  # feed socket -> its monitor
        self._peers: dict[zmq.Socket, dict[int, str]] = {}  # feed socket -> {fd: endpoint accepted on}
        self._conns: dict[str, set[int]] = {}  # endpoint (as the monitor names it) -> fds
        self.max_connections = publish.max_connections
        self.handshake_timeout_ms = publish.handshake_timeout_ms
        #: What hostile peers cost, for the metrics: connections closed over budget per endpoint,
        #: peers hung up on for a foreign topic, flood episodes, subscription messages read.
        self.refused: dict[str, int] = {}
        self.dropped_peers = 0
        self.subscription_floods = 0
        self.subscription_messages = 0
        self._verbose = True  # XPUB_VERBOSE wanted; the relay turns it off (set_verbose)
        self._flooding = False
        self._flood_seen = 0.0
        self._flood_log = Episodes(log)
        self._topic_log = Episodes(log)
        self._budget_log = Episodes(log)
        self._on_subscription: Callable[[bytes], None] | None = None  # handle_incoming()'s
        self._files: dict[str, tuple[str, int, int]] = {}  # endpoint -> (path, st_dev, st_ino)
        self._bound: dict[str, Any] = {}  # endpoint -> the socket or server bound to it
        #: Held for every use of the peers and sockets: capture threads send while the control
        #: thread reads subscriptions, binds and sets options.
        self.lock = self._c
        curve = publish.curve
        #: Every XPUB socket, the NULL one (if any) first; and their monitors, in the same order.
        self.sockets: list[zmq.Socket] = []
        self.monitors: list[zmq.Socket] = []
        self.monitor = None
        self.socket: zmq.Socket | None = None
        self.server: ZmtpServer | None = None
        self.curve_socket = None
        self.curve_monitor = None
        #: The CURVE endpoints' keys, when the own server serves them (``nflogd.access``'s).
        self.curve_keys = curve_keys if direct and curve is not None else None
        if direct and curve is not None and curve_keys is None:
            raise ValueError("publish.curve needs curve_keys for the feed's own server")
        self.keys_refused = 0
        self._key_log = Episodes(log)
        try:
            if direct:
                self.server = ZmtpServer(
                    self._c, owner=self, handshake_timeout_ms=publish.handshake_timeout_ms
                )
                self.server.set_limits(publish)
            else:
                self.socket = ctx.socket(zmq.XPUB)
                self.monitor = self._setup(self.socket, publish.hwm)
                self.socket.setsockopt(zmq.MAXMSGSIZE, PEER_MAX_MESSAGE_NULL)
                for gid in publish.ipc_filter_gids:
                    try:
                        self.socket.setsockopt(zmq.IPC_FILTER_GID, gid)
                    except (zmq.ZMQError, AttributeError):  # libzmq without SO_PEERCRED filters
                        raise NflogdError(
                            "publish.ipc_filter_groups: this libzmq does not support IPC_FILTER_GID"
                        ) from None
            if curve is not None and not direct:
                self.curve_socket = ctx.socket(zmq.XPUB)
                self.curve_monitor = self._setup(self.curve_socket, publish.hwm)
                self.curve_socket.setsockopt(zmq.CURVE_SERVER, 1)
                self.curve_socket.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
                self.curve_socket.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
                self.curve_socket.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
            for endpoint in publish.bind:
                self.bind(endpoint)
        except BaseException:
            self.close(linger=0)
            raise
        #: What the control loop polls: the server's epoll, the sockets' ZMQ_FD (readable when
        #: a socket may have something for handle_incoming()).
        self.fds: list[int] = [int(sock.get(zmq.FD)) for sock in self.sockets]
        if self.server is not None:
            self.fds.insert(0, self.server.fileno())
        #: The C sender, when it can send everything (None: publish() must, as when pyzmq's
        #: libzmq cannot be shared and there are XPUB sockets).
        self.cfeed: CFeed | None = self._c if self._c.zmq or not self.sockets else None
        with self.lock:
            if self._c.zmq:
                self._c.set_sockets(self.sockets)
            self._c.set_node(node.encode())

    @property
    def node(self) -> str:
        """The node name on every message; set it to change the next message's."""
        return self._node

    @node.setter
    def node(self, node: str) -> None:
        with self.lock:
            self._c.set_node(node.encode())
        self._node = node

    @property
    def sent(self) -> int:
        """Messages sent (to the server's peers and on every socket)."""
        return self._sent + self._c.sent

    @property
    def unsent(self) -> int:
        """Messages a socket refused (never expected with XPUB_NODROP off)."""
        return self._unsent + self._c.unsent

    @property
    def slow_dropped(self) -> int:
        """Messages the server's peers lost at their hwm (gone peers' too)."""
        with self.lock:
            return self._c.peer_dropped()

    @property
    def queued(self) -> int:
        """Messages the server's peers have queued now."""
        with self.lock:
            return self._c.peer_queued()

    @property
    def queued_bytes(self) -> int:
        """Bytes the server's peers have queued now (a message queued for several, once)."""
        with self.lock:
            return self._c.queued_bytes

    @property
    def full_dropped(self) -> int:
        """Messages the server's peers lost because the queues held publish.max_queued_bytes."""
        with self.lock:
            return self._c.full_dropped

    @property
    def handshake_timeouts(self) -> int:
        """The server's peers hung up on for not finishing the handshake in time."""
        return self.server.handshake_timeouts if self.server is not None else 0

    @property
    def idle_hangups(self) -> int:
        """The server's peers hung up on for subscribing to nothing for publish.idle_timeout_ms."""
        return self.server.idle_hangups if self.server is not None else 0

    @property
    def source_refused(self) -> dict[str, int]:
        """Connections the server closed at once, per endpoint: their uid or address had
        publish.max_connections_per_source."""
        return dict(self.server.source_refused) if self.server is not None else {}

    def _setup(self, sock: zmq.Socket, hwm: int) -> zmq.Socket:
        """Options common to both sockets; returns the socket's monitor."""
        self.sockets.append(sock)
        sock.setsockopt(zmq.LINGER, LINGER_MS)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.XPUB_NODROP, 0)
        # every subscribe reaches handle_incoming(), not only a topic's first: debug logs show all
        # (turned off during a subscription flood: see handle_incoming)
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        # What a peer can make us hold (docs/security.md, "Limits"): its messages, its queue
        # of subscriptions, the time it may take for the handshake; dead peers found by TCP.
        sock.setsockopt(zmq.MAXMSGSIZE, PEER_MAX_MESSAGE)
        sock.setsockopt(zmq.RCVHWM, PEER_RCVHWM)
        sock.setsockopt(zmq.HANDSHAKE_IVL, self.handshake_timeout_ms)
        for option, value in TCP_KEEPALIVE:
            sock.setsockopt(option, value)
        # No limit on the monitor's queue (get_monitor_socket()'s drops past 1,000): a burst of
        # connections must not lose ACCEPTED/DISCONNECTED events (the budget counts them).
        monitor = Monitor(sock, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED, hwm=0)
        self._monitors[sock] = monitor
        self._peers[sock] = {}
        mon = monitor.socket
        assert mon is not None  # a Monitor has its socket until close()
        self.monitors.append(mon)
        return mon

    def set_verbose(self, verbose: bool) -> None:
        """XPUB_VERBOSE on every socket (the relay wants it off)."""
        self._verbose = verbose
        for sock in self.sockets:
            sock.setsockopt(zmq.XPUB_VERBOSE, 1 if verbose else 0)

    def _socket_for(self, endpoint: str) -> Any:
        """tcp endpoints go to the CURVE socket when there is one; everything else to the
        server (or ``socket``)."""
        if self.curve_socket is not None and endpoint.startswith("tcp://"):
            return self.curve_socket
        return self.server if self.server is not None else self.socket

    def _curve_for(self, endpoint: str) -> bool:
        """Whether ``endpoint`` speaks CURVE (every tcp one with publish.curve)."""
        curve = self.curve_keys is not None or self.curve_socket is not None
        return curve and endpoint.startswith("tcp://")

    # -- endpoints -------------------------------------------------------------

    def bind(self, endpoint: str) -> None:
        """Bind one more endpoint; ipc files get mode 0660 in a 0750 directory."""
        path = ipc_path(endpoint)
        if path is not None:
            _make_parent(endpoint, path)
            check_ipc_dir(endpoint, path)
            check_ipc_path(endpoint, path)
            old = os.umask(0o117)  # the socket file: rw for owner and group, nothing else
        sock = self._socket_for(endpoint)
        try:
            if isinstance(sock, ZmtpServer):  # the control thread's alone: no lock
                sock.bind(endpoint, self.curve_keys if self._curve_for(endpoint) else None)
            else:
                with self.lock:
                    sock.bind(endpoint)
        except zmq.ZMQError as e:
            raise NflogdError(f"publish.bind: {endpoint}: {zmq.strerror(e.errno or 0)}") from None
        finally:
            if path is not None:
                os.umask(old)
        if path is not None:
            try:
                st = os.stat(path)
                self._files[endpoint] = (path, st.st_dev, st.st_ino)
            except OSError:
                pass
        self.endpoints.append(endpoint)
        self._bound[endpoint] = sock
        log.info("publishing on %s%s", endpoint, " (CURVE)" if self._curve_for(endpoint) else "")

    def unbind(self, endpoint: str) -> None:
        """Stop listening on an endpoint (removing its ipc file); peers connected through it stay."""
        target = self._bound.pop(endpoint, None)
        try:
            if isinstance(target, ZmtpServer):
                target.unbind(endpoint)
            elif target is not None:
                with self.lock:
                    target.unbind(endpoint)
        except zmq.ZMQError as e:
            log.warning("publish.bind: %s: unbind failed: %s", endpoint, zmq.strerror(e.errno or 0))
        if endpoint in self.endpoints:
            self.endpoints.remove(endpoint)
        self._remove_file(endpoint)

    def _remove_file(self, endpoint: str) -> None:
        """Unlink our ipc socket file (libzmq leaves it), unless another process replaced it."""
        entry = self._files.pop(endpoint, None)
        if entry is None:
            return
        path, dev, ino = entry
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.unlink(path)
        except OSError:
            pass

    def rebind(self, endpoints: Iterable[str]) -> None:
        """Bind the endpoints not bound yet, then unbind those no longer wanted.

        If a new one fails, the ones bound by this call are unbound again and the
        error is raised: the old set stays in force.
        """
        wanted = list(endpoints)
        added: list[str] = []
        try:
            for ep in wanted:
                if ep not in self.endpoints:
                    self.bind(ep)
                    added.append(ep)
        except NflogdError:
            for ep in added:
                self.unbind(ep)
            raise
        for ep in list(self.endpoints):
            if ep not in wanted:
                self.unbind(ep)
                log.info("no longer publishing on %s", ep)

    def set_limits(self, publish: PublishConfig) -> None:
        """The own server's limits again (a reload): per source, idle, the bytes queued; the
        members of ``ipc_filter_groups`` looked up again."""
        with self.lock:
            self._c.set_max_queued_bytes(publish.max_queued_bytes)
        if self.server is not None:
            self.server.set_limits(publish)

    def set_hwm(self, hwm: int) -> None:
        """Change the hwm: at once for the server's peers; libzmq applies SNDHWM to the
        XPUB sockets' subscribers that connect afterwards."""
        with self.lock:
            self._c.set_hwm(hwm)
            for sock in self.sockets:
                sock.setsockopt(zmq.SNDHWM, hwm)
        self.hwm = hwm

    # -- messages --------------------------------------------------------------

    def next_seq(self, group: int) -> int:
        """The ``first_seq`` the group's next message will carry (the capture loop of a
        C sender hands it over through ``set_next_seq``)."""
        return self._seq.get(group, 0)

    def set_next_seq(self, group: int, seq: int) -> None:
        """Where the group's sequence stands after a C sender's reader stopped."""
        self._seq[group] = seq

    def publish(self, batch, kernel_dropped: int = 0) -> bool:
        """Send one capture KernelBatch to the server's peers and on every socket; True if
        every socket took it. Never blocks.

        Thread-safe: each group's capture thread calls it. ``batch.table`` and ``batch.data``
        may be views of the reader's buffers: they are written or copied before this returns.
        """
        count = batch.count
        if not count:
            return False
        group = batch.group
        taken = True
        with self.lock:
            first_seq = self._seq.get(group, 0)
            self._seq[group] = first_seq + count
            msg = wire.frames(
                group, self.node, self.epoch, first_seq, kernel_dropped, count, batch.table, batch.data,
                flags=getattr(batch, "flags", 0),
            )  # fmt: skip
            self._c.send_to_peers(group, msg)
            head, last = msg[:-1], msg[-1]
            for sock in self.sockets:
                # Frame by frame with int flags: send_multipart's enum arithmetic cost more per
                # message than the rest of publishing. Only the first frame can be refused.
                send = sock.send
                try:
                    for frame in head:
                        send(frame, SNDMORE_NOBLOCK)
                    send(last, NOBLOCK)
                except zmq.Again:
                    taken = False
            if self._wake_on_incoming and any(map(_has_incoming, self.sockets)):
                self._wake_on_incoming = False
                os.eventfd_write(self.wake_fd, 1)
            if not taken:
                self._unsent += 1
                return False
            self._sent += 1
        return True

    def forward(self, frames: list) -> None:
        """A message received whole from an upstream feed (the relay), its frames as they came,
        to every peer subscribed to its group. A message that is not four frames with a
        group's topic first cannot be matched: counted in ``unsent``, dropped."""
        if len(frames) != 4 or len(frames[0]) != wire.TOPIC.size:
            self._unsent += 1
            return
        (group,) = wire.TOPIC.unpack(frames[0].buffer if hasattr(frames[0], "buffer") else frames[0])
        with self.lock:
            self._c.send_to_peers(group, [f.buffer if hasattr(f, "buffer") else f for f in frames])
            self._sent += 1

    def peer_gone(self, topics: dict[bytes, int]) -> None:
        """A peer that held ``topics`` (topic -> its subscriptions) hung up: each of them
        undone for handle_incoming()'s ``on_subscription``, as an XPUB reports a hang-up."""
        if self._on_subscription is None:
            return
        for topic, n in topics.items():
            for _ in range(n):
                self._on_subscription(b"\x00" + topic)

    def mark(self, group: int, first_seq: int | None = None, kernel_dropped: int = 0) -> None:
        """Send the group's sequence mark: a message of no packets whose ``first_seq`` is the
        next message's (``docs/wire-format.md``, "Sequence marks"), so that a reader learns the
        tail of the group's sequence once it goes idle. ``first_seq``: where a C sender's
        sequence stands (``GroupReader.feed_seq``); None: this Publisher's own. Never blocks.
        """
        with self.lock:
            if first_seq is None:
                first_seq = self._seq.get(group, 0)
            msg = wire.frames(group, self.node, self.epoch, first_seq, kernel_dropped, 0, b"", b"")
            self._c.send_to_peers(group, msg)
            head, last = msg[:-1], msg[-1]
            for sock in self.sockets:
                try:
                    for frame in head:
                        sock.send(frame, SNDMORE_NOBLOCK)
                    sock.send(last, NOBLOCK)
                except zmq.Again:  # pragma: no cover - XPUB drops per subscriber, never refuses
                    pass
        self.marks += 1

    def next_check_ms(self) -> int | None:
        """How long the control loop may wait for events before its next ``handle_incoming()``.

        None (no end) but during a subscription flood (until it may be over) or while a peer of
        the server has a handshake to finish (until it times out), or 0 when a socket has
        incoming messages already. A capture thread's send takes the ZeroMQ
        events that make a socket's ``ZMQ_FD`` readable, so from this call on, a send that
        finds incoming messages makes ``wake_fd`` readable instead: the loop waits for
        events only, and an idle feed costs no wake-ups.
        """
        with self.lock:
            if any(map(_has_incoming, self.sockets)):
                return 0
            if self.cfeed is not None:
                self.cfeed.wake_on_incoming(self.wake_fd)
            else:
                self._wake_on_incoming = True
            due = [self._flood_seen + QUIET_S] if self._flooding else []
        if self.server is not None:
            deadline = self.server.next_deadline()
            if deadline is not None:
                due.append(deadline)
        if not due:
            return None
        return max(0, math.ceil((min(due) - time.monotonic()) * 1000) + 1)

    def take_wake(self) -> None:
        """Clear ``wake_fd`` (the control loop saw it readable)."""
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def handle_incoming(self, on_subscription: Callable[[bytes], None] | None = None) -> bool:
        """Read queued subscription messages, at most SUBSCRIPTIONS_PER_TURN per socket.

        A peer that floods subscriptions thus never holds the loop: what is left is read at
        the next turn, after the groups, signals and the watchdog had theirs. A full turn
        starts a flood episode (counted, logged once): the socket stops being verbose, so
        repeated subscriptions no longer reach us at all, until QUIET_S without one. A topic
        longer than a group's (2 bytes) can never match a message of the feed: its sender
        (found by the message's Peer-Address) is hung up on, so that no peer makes libzmq
        keep topics it cannot use. Valid (un)subscriptions go to ``on_subscription``.
        """
        more = False
        self._on_subscription = on_subscription
        for sock in self.sockets:
            with self.lock:  # the capture threads send on these sockets
                if self._read_subscriptions(sock):
                    more = True
                    self._flood("the CURVE socket" if sock is self.curve_socket else "the feed")
        if self.server is not None:
            if self.server.serve(SUBSCRIPTIONS_PER_TURN):
                more = True
                self._flood("the feed")
        with self.lock:
            self._end_flood()
        return more

    def _read_subscriptions(self, sock: zmq.Socket) -> bool:
        """Up to SUBSCRIPTIONS_PER_TURN messages of one socket (under the lock); True if all."""
        recv = sock.recv
        n = 0
        for n in range(1, SUBSCRIPTIONS_PER_TURN + 1):
            if not _has_incoming(sock):
                n -= 1
                break
            try:
                frame = recv(NOBLOCK, copy=False)
            except zmq.Again:
                n -= 1
                break
            msg = frame.bytes
            if msg[:1] not in (b"\x00", b"\x01"):
                continue  # not a subscription: nothing else reaches an XPUB from a SUB
            if len(msg) - 1 > wire.TOPIC.size:
                self._foreign_topic(sock, frame)
                continue
            self.subscription(msg, " (CURVE)" if sock is self.curve_socket else "")
        return n >= SUBSCRIPTIONS_PER_TURN

    def subscription(self, msg: bytes, via: str) -> None:
        """A valid (un)subscription from a peer (of the server, or of an XPUB ``via``): counted,
        logged at debug level, handed to handle_incoming()'s ``on_subscription``."""
        self.subscription_messages += 1
        if log.isEnabledFor(logging.DEBUG):
            what = "subscribe" if msg[:1] == b"\x01" else "unsubscribe"
            log.debug("%s %r%s", what, msg[1:].hex() or "(all)", via)
        if self._on_subscription is not None:
            self._on_subscription(msg)

    def _flood(self, where: str) -> None:
        self._flood_seen = time.monotonic()
        if self._flooding:
            return
        self._flooding = True
        self.subscription_floods += 1
        if self._verbose:
            for s in self.sockets:
                s.setsockopt(zmq.XPUB_VERBOSE, 0)
        self._flood_log.hit(
            "feed: subscription flood (more than %d messages at once on %s); reading %d per turn, "
            "repeated subscriptions no longer reported until %g s without one",
            SUBSCRIPTIONS_PER_TURN, where, SUBSCRIPTIONS_PER_TURN, QUIET_S,
        )  # fmt: skip

    def _end_flood(self) -> None:
        if self._flooding and time.monotonic() - self._flood_seen > QUIET_S:
            self._flooding = False
            if self._verbose:
                for s in self.sockets:
                    s.setsockopt(zmq.XPUB_VERBOSE, 1)
            log.info("feed: subscription flood over")

    def _foreign_topic(self, sock: zmq.Socket, frame) -> None:
        """Hang up on every connection of the peer that sent a topic no message can match."""
        try:
            address = frame.get("Peer-Address")
        except (zmq.ZMQError, KeyError, UnicodeDecodeError):
            address = ""
        hung = 0
        for fd, endpoint in list(self._peers.get(sock, {}).items()):
            if _peer_matches(fd, endpoint, address) and _hang_up(fd, endpoint):
                hung += 1
        self.foreign_topic(address or "address unknown", len(frame) - 1, hung)

    def foreign_topic(self, peer: str, length: int, hung: int) -> None:
        """A peer subscribed to a topic longer than a group's (a subscription message read, of
        the server's peers or an XPUB's): ``hung`` of its connections closed."""
        self.subscription_messages += 1
        self.dropped_peers += hung
        self._topic_log.hit(
            "feed: a peer (%s) subscribed to a %d-byte topic, longer than any group's (%d): "
            "%d connection%s from it closed",
            peer, length, wire.TOPIC.size, hung, "" if hung == 1 else "s",
        )  # fmt: skip

    def key_refused(self, peer: str, endpoint: str, key: bytes | None) -> None:
        """A CURVE peer whose key is not in authorized_keys_dir: told so (ERROR 400), hung up on."""
        self.keys_refused += 1
        self._key_log.hit(
            "feed: %s on %s: its CURVE key %s is not in publish.curve.authorized_keys_dir: refused; "
            "%d so far",
            peer, endpoint, z85.encode(key).decode() if key else "?", self.keys_refused,
        )  # fmt: skip

    # -- connections -----------------------------------------------------------

    def budget(self) -> int:
        """Peers allowed at once per endpoint: ``max_connections``, lowered if the open-files
        limit could not hold that many on every endpoint (FD_RESERVE kept for the rest)."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self.max_connections
        share = (soft - FD_RESERVE) // max(1, len(self.endpoints))
        return max(1, min(self.max_connections, share))

    def handle_monitor(self) -> None:
        """Apply queued monitor events to the subscriber gauge; enforce the connection budget.

        A peer accepted beyond ``budget()`` on its endpoint is hung up on at once (its socket
        shut down; libzmq then closes it): counted per endpoint in ``refused``, logged once
        per episode.
        """
        budget = None
        for sock, mon in self._monitors.items():
            peers = self._peers[sock]
            for ev in mon.events():
                event, fd = ev["event"], int(ev["value"])
                if event == zmq.EVENT_ACCEPTED:
                    endpoint = ev["endpoint"].decode(errors="replace")
                    conns = self._conns.setdefault(endpoint, set())
                    if budget is None:
                        budget = self.budget()
                    if len(conns) >= budget and _hang_up(fd, endpoint):
                        self.peer_refused(endpoint, len(conns))
                        continue
                    peers[fd] = endpoint
                    conns.add(fd)
                elif event == zmq.EVENT_DISCONNECTED:
                    endpoint = peers.pop(fd, None)
                    if endpoint is not None:
                        self._conns.get(endpoint, set()).discard(fd)
        with self.lock:
            self._end_flood()

    def peer_refused(self, endpoint: str, connected: int) -> None:
        """A connection to ``endpoint`` closed at once: it has its budget (``connected``)."""
        self.refused[endpoint] = self.refused.get(endpoint, 0) + 1
        self._budget_log.hit(
            "feed: %s has %d peers, its limit (publish.max_connections, open files): "
            "closing new connections; %d refused so far",
            endpoint, connected, self.refused[endpoint],
        )  # fmt: skip

    @property
    def subscribers(self) -> int:
        """Peers connected now: the server's, and the XPUB sockets' as of the last
        handle_monitor().

        A peer counts from its connect, before the handshake: a CURVE peer the ZAP handler
        refuses counts until libzmq drops the connection.
        """
        own = self.server.subscribers if self.server is not None else 0
        return own + sum(len(peers) for peers in self._peers.values())

    # -- end -------------------------------------------------------------------

    def close(self, linger: int | None = None) -> None:
        """Close the server and the sockets (queued messages get ``linger`` ms, default
        LINGER_MS)."""
        if self.server is not None:
            messages, packets = self.server.close(LINGER_MS if linger is None else linger)
            self.server = None
            if messages:
                log.warning(
                    "feed: stopped with %d packets not sent to subscribers that were behind"
                    " (%d messages queued for them)",
                    packets,
                    messages,
                )
        with self.lock:
            if self._c.zmq:
                self._c.set_sockets([])
            self._c.wake_on_incoming(-1)  # wake_fd is closed below
            self._wake_on_incoming = False
            for mon in self._monitors.values():
                mon.close()
            self.monitor = self.curve_monitor = None
            self._monitors = {}
            self._peers = {}
            for sock in [*([self.socket] if self.socket is not None else []), *self.sockets]:
                if not sock.closed:
                    sock.close(linger=LINGER_MS if linger is None else linger)
        for endpoint in list(self._files):
            self._remove_file(endpoint)
        if self.wake_fd >= 0:
            os.close(self.wake_fd)
            self.wake_fd = -1


def _has_incoming(sock: zmq.Socket) -> bool:
    """Whether a socket has a message to read (its pending ZeroMQ commands are run first)."""
    return bool(int(sock.get(zmq.EVENTS)) & zmq.POLLIN)


def check_restart_only(old: PublishConfig, new: PublishConfig, unit: str = "nflogd") -> None:
    """Refuse a reload that changes what the feed's sockets took at start (PublishConfig)."""
    if (old.curve is None) != (new.curve is None):
        what = "turning CURVE on" if new.curve is not None else "turning CURVE off"
        raise NflogdError(f"publish.curve: {what} needs a restart (systemctl restart {unit})")
    if (
        old.curve is not None
        and new.curve is not None  # both or neither, from here
        and (old.curve.public_key, old.curve.secret_key) != (new.curve.public_key, new.curve.secret_key)
    ):
        raise NflogdError("publish.curve.secret_key_file: a new server key needs a restart")
    if old.ipc_filter_gids != new.ipc_filter_gids:
        raise NflogdError("publish.ipc_filter_groups: a change needs a restart")
