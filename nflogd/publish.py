"""The feed: the endpoints every kernel batch goes out on, to every subscriber.

Use::

    pub = Publisher(cfg.publish, node=cfg.node)           # binds every endpoint now
    for fd in pub.fds:
        poller.register(fd, zmq.POLLIN)                   # the peers: pub.handle_incoming()
    ...
    pub.publish(batch, kernel_dropped=counters.kernel_dropped)
    pub.forward(frames)                                   # a message received whole (the relay)
    pub.subscribers                                       # peers connected right now
    pub.close()

Endpoints: every one (ipc, tcp, and with ``publish.curve`` every tcp one as CurveZMQ, admitting
the keys of ``curve_keys``) is served by nflogd itself, ``server`` (``nflogd.feed.server``: ZMTP
3.1 as an XPUB socket would, ``nflogd.feed.curve`` for CURVE), whose peers the capture threads
write straight to (``cfeed``, the C sender). ``Publisher`` keeps what is common to every peer:
the sequence per group and the epoch, the fan-out, the counters and the once-per-episode logs
the server reports to. ``publish.ipc_filter_gids`` filters the peers of the ipc endpoints by
group.

Threads: every capture thread sends at once, in C (``cfeed``) or through ``publish()``;
``lock`` serialises that with every other use of the peers. The control thread polls ``fds``
(the server's epoll) for ``handle_incoming()``, which reads at most ``SUBSCRIPTIONS_PER_TURN``
subscriptions from the server's peers; it waits at most ``next_check_ms()`` (None: for events
only).

Delivery: ``publish()`` never blocks; a subscriber past ``publish.hwm`` messages queued, or
finding ``publish.max_queued_bytes`` held by all, loses its own (a gap in ``seq``; counted in
``slow_dropped`` and ``full_dropped``). ``seq`` counts the packets captured per group and
epoch, delivered or not (``docs/wire-format.md``). ``subscribers`` is the peers connected now,
each from its connect. Why it is built so: ``docs/design.md``.
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
from typing import TYPE_CHECKING, Callable, Iterable

import zmq
from nflogd_client import wire
from zmq.utils import z85

from .episodes import QUIET_S, Episodes
from .errors import NflogdError
from .feed.curve import CurveKeys
from .feed.server import ZmtpServer
from .ffi import CFeed

if TYPE_CHECKING:
    from .config_publish import PublishConfig

__all__ = [
    "Publisher", "check_ipc_dir", "check_ipc_path", "check_restart_only",
    "ipc_path", "make_ipc_dirs",
]  # fmt: skip

log = logging.getLogger(__name__)

#: How long close() lets queued messages drain to connected subscribers, in ms.
LINGER_MS = 250

#: Subscription messages handle_incoming() reads from the server's peers per call.
SUBSCRIPTIONS_PER_TURN = 256
#: Open files kept for everything but feed peers (groups, sockets, metrics, key files).
FD_RESERVE = 64


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
    """The feed's own server bound to every endpoint of ``publish`` (a PublishConfig), CURVE
    ones with ``curve_keys``.

    Binding errors raise :class:`NflogdError` naming the endpoint; nothing is
    left bound then.
    """

    def __init__(
        self,
        publish: PublishConfig,
        node: str = "",
        epoch: int | None = None,
        curve_keys: CurveKeys | None = None,
        filter_topics: bool = False,
    ) -> None:
        self.epoch = time.time_ns() if epoch is None else epoch
        #: The C side: the server's peers, the sender, and the lock.
        self._c = CFeed(self.epoch)
        self._c.set_hwm(publish.hwm)
        self._c.set_max_queued_bytes(publish.max_queued_bytes)
        self._c.set_filter_linger(publish.filter_linger_ms)
        self._node = node
        self.hwm = publish.hwm
        self.endpoints: list[str] = []
        self._sent = 0  # messages publish() and forward() sent
        self._unsent = 0  # messages forward() could not match to a group
        self._seq: dict[int, int] = {}
        #: Sequence marks sent (``mark()``).
        self.marks = 0
        self.max_connections = publish.max_connections
        self.handshake_timeout_ms = publish.handshake_timeout_ms
        #: What hostile peers cost, for the metrics: connections closed over budget per endpoint,
        #: peers hung up on for a foreign topic, flood episodes, subscription messages read.
        self.refused: dict[str, int] = {}
        self.dropped_peers = 0
        self.subscription_floods = 0
        self.subscription_messages = 0
        self._flooding = False
        self._flood_seen = 0.0
        self._flood_log = Episodes(log)
        self._topic_log = Episodes(log)
        self._budget_log = Episodes(log)
        self._on_subscription: Callable[[bytes], None] | None = None  # handle_incoming()'s
        #: The relay's (``filter_topics``): takes readers' filter subscriptions (docs/filters.md),
        #: which the server then passes as they are, never running a filter; it returns None,
        #: or why the subscription is refused. Its readers get the messages on those topics
        #: from ``forward()``.
        self.on_filter: Callable[[bytes], str | None] | None = None
        self._files: dict[str, tuple[str, int, int]] = {}  # endpoint -> (path, st_dev, st_ino)
        #: Held for every use of the peers: capture threads send while the control thread
        #: serves the peers, binds and sets limits.
        self.lock = self._c
        #: The C sender every capture thread hands its batches to, and the relay's upstream
        #: reader its messages (None: each batch goes through ``publish()``, the same bytes
        #: from Python, which the tests compare it with; never for the relay).
        self.cfeed: CFeed | None = self._c
        #: The CURVE endpoints' keys (``nflogd.access``'s): every tcp endpoint with publish.curve.
        self.curve_keys = curve_keys if publish.curve is not None else None
        if publish.curve is not None and curve_keys is None:
            raise ValueError("publish.curve needs curve_keys for the feed's own server")
        self.keys_refused = 0
        self._key_log = Episodes(log)
        self.server: ZmtpServer | None = ZmtpServer(
            self._c, owner=self, handshake_timeout_ms=publish.handshake_timeout_ms
        )
        if filter_topics:
            self.server.pass_filters = self.filter_subscription
        try:
            self.server.set_limits(publish)
            for endpoint in publish.bind:
                self.bind(endpoint)
        except BaseException:
            self.close(linger=0)
            raise
        #: What the control loop polls: the server's epoll.
        self.fds: list[int] = [self.server.fileno()]
        with self.lock:
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
        """Messages sent to the peers (each once, however many peers took it)."""
        return self._sent + self._c.sent

    @property
    def unsent(self) -> int:
        """Messages forward() could not match to a group (not sent)."""
        return self._unsent

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
        """The server's peers hung up on for not finishing the handshake in time (CURVE's too)."""
        return self.server.handshake_timeouts if self.server is not None else 0

    @property
    def sent_bytes(self) -> int:
        """Bytes written to readers (what a CURVE one got, boxed)."""
        with self.lock:
            return self._c.sent_bytes()

    @property
    def filters_refused(self) -> int:
        """Filters the server's peers stated and it refused."""
        return self.server.filters_refused if self.server is not None else 0

    def filters(self) -> list[tuple[str, str, int, int, int]]:
        """The filters in use: (digest, text, holders, packets passed, packets dropped)."""
        with self.lock:
            return self._c.filters()

    @property
    def idle_hangups(self) -> int:
        """The server's peers hung up on for subscribing to nothing for publish.idle_timeout_ms."""
        return self.server.idle_hangups if self.server is not None else 0

    @property
    def source_refused(self) -> dict[str, int]:
        """Connections the server closed at once, per endpoint: their uid or address had
        publish.max_connections_per_source."""
        return dict(self.server.source_refused) if self.server is not None else {}

    def _curve_for(self, endpoint: str) -> bool:
        """Whether ``endpoint`` speaks CURVE (every tcp one with publish.curve)."""
        return self.curve_keys is not None and endpoint.startswith("tcp://")

    # -- endpoints -------------------------------------------------------------

    def bind(self, endpoint: str) -> None:
        """Bind one more endpoint; ipc files get mode 0660 in a 0750 directory."""
        server = self.server
        assert server is not None, "bind() after close()"
        path = ipc_path(endpoint)
        if path is not None:
            _make_parent(endpoint, path)
            check_ipc_dir(endpoint, path)
            check_ipc_path(endpoint, path)
            old = os.umask(0o117)  # the socket file: rw for owner and group, nothing else
        try:  # the control thread's alone: no lock
            server.bind(endpoint, self.curve_keys if self._curve_for(endpoint) else None)
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
        log.info("publishing on %s%s", endpoint, " (CURVE)" if self._curve_for(endpoint) else "")

    def unbind(self, endpoint: str) -> None:
        """Stop listening on an endpoint (removing its ipc file); peers connected through it stay."""
        if endpoint in self.endpoints:
            if self.server is not None:
                try:
                    self.server.unbind(endpoint)
                except zmq.ZMQError as e:
                    log.warning("publish.bind: %s: unbind failed: %s", endpoint, zmq.strerror(e.errno or 0))
            self.endpoints.remove(endpoint)
        self._remove_file(endpoint)

    def _remove_file(self, endpoint: str) -> None:
        """Unlink our ipc socket file, unless another process replaced it."""
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
        """The server's limits again (a reload): per source, idle, the bytes queued, the filters'
        linger; the members of ``ipc_filter_groups`` looked up again."""
        with self.lock:
            self._c.set_max_queued_bytes(publish.max_queued_bytes)
            self._c.set_filter_linger(publish.filter_linger_ms)
        if self.server is not None:
            self.server.set_limits(publish)

    def set_hwm(self, hwm: int) -> None:
        """Change the hwm, at once for every peer, CURVE ones too."""
        with self.lock:
            self._c.set_hwm(hwm)
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
        """Send one capture KernelBatch to the server's peers (as the C sender does); False
        for an empty batch. Never blocks.

        Thread-safe: each group's capture thread calls it. ``batch.table`` and ``batch.data``
        may be views of the reader's buffers: they are written or copied before this returns.
        """
        count = batch.count
        if not count:
            return False
        group = batch.group
        with self.lock:
            first_seq = self._seq.get(group, 0)
            self._seq[group] = first_seq + count
            msg = wire.frames(
                group, self.node, self.epoch, first_seq, kernel_dropped, count, batch.table, batch.data,
                flags=getattr(batch, "flags", 0),
            )  # fmt: skip
            self._c.send_to_peers(group, msg)
            self._sent += 1
        return True

    def forward(self, frames: list) -> None:
        """A message received whole from an upstream feed (the relay), its frames as they came,
        to every peer subscribed to its group; one on a topic of readers' filters (a daemon's
        reply to a filter, a filter's messages) to the peers that passed that topic on
        (``filter_topics``). Any other message cannot be matched: counted in ``unsent``,
        dropped."""
        if len(frames[0]) != wire.TOPIC.size and 1 <= len(frames) <= 4:
            server = self.server
            if server is None or not server.passing:
                self._unsent += 1
                return
            bufs = [f.buffer if hasattr(f, "buffer") else f for f in frames]
            with self.lock:
                server.deliver_passed(bufs)
                self._sent += 1
            return
        if len(frames) != 4 or len(frames[0]) != wire.TOPIC.size:
            self._unsent += 1
            return
        self._c.forward(frames)  # under the feed's lock, taken in C; counted there in sent

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
        self.marks += 1

    def next_check_ms(self) -> int | None:
        """How long the control loop may wait for events before its next ``handle_incoming()``.

        None (no end) but during a subscription flood (until it may be over) or while a peer of
        the server has a handshake to finish (until it times out; a CURVE one's too).
        """
        due = [self._flood_seen + QUIET_S] if self._flooding else []
        if self.server is not None:
            deadline = self.server.next_deadline()
            if deadline is not None:
                due.append(deadline)
        if not due:
            return None
        return max(0, math.ceil((min(due) - time.monotonic()) * 1000) + 1)

    def handle_incoming(self, on_subscription: Callable[[bytes], None] | None = None) -> bool:
        """Serve the server's peers: accept, handshake, read their subscriptions (at most
        SUBSCRIPTIONS_PER_TURN), write what they have queued; True if more is waiting.

        A peer that floods subscriptions thus never holds the loop: what is left is read at
        the next turn, after the groups, signals and the watchdog had theirs. A full turn
        starts a flood episode (counted, logged once) until QUIET_S without one. A topic
        longer than a group's (2 bytes) can never match a message of the feed: its sender is
        hung up on (``foreign_topic``). Valid (un)subscriptions go to ``on_subscription``.
        """
        more = False
        self._on_subscription = on_subscription
        if self.server is not None and self.server.serve(SUBSCRIPTIONS_PER_TURN):
            more = True
            self._flood("the feed")
        self._end_flood()
        return more

    def subscription(self, msg: bytes, via: str) -> None:
        """A valid (un)subscription from a peer of the server (``via``: " (CURVE)" or ""):
        counted, logged at debug level, handed to handle_incoming()'s ``on_subscription``."""
        self.subscription_messages += 1
        if log.isEnabledFor(logging.DEBUG):
            what = "subscribe" if msg[:1] == b"\x01" else "unsubscribe"
            log.debug("%s %r%s", what, msg[1:].hex() or "(all)", via)
        if self._on_subscription is not None:
            self._on_subscription(msg)

    def filter_subscription(self, msg: bytes) -> str | None:
        """A reader's filter (un)subscription the server passes on (``filter_topics``): counted,
        logged at debug level, handed to ``on_filter``; None, or why it was refused."""
        why = "this feed passes no filters" if self.on_filter is None else self.on_filter(msg)
        if why is not None:
            return why
        self.subscription_messages += 1
        log.debug("%s a filter's %r", "subscribe" if msg[:1] == b"\x01" else "unsubscribe", msg[1:6])
        return None

    def _flood(self, where: str) -> None:
        self._flood_seen = time.monotonic()
        if self._flooding:
            return
        self._flooding = True
        self.subscription_floods += 1
        self._flood_log.hit(
            "feed: subscription flood (more than %d messages at once on %s); reading %d per turn",
            SUBSCRIPTIONS_PER_TURN, where, SUBSCRIPTIONS_PER_TURN,
        )  # fmt: skip

    def _end_flood(self) -> None:
        if self._flooding and time.monotonic() - self._flood_seen > QUIET_S:
            self._flooding = False
            log.info("feed: subscription flood over")

    def foreign_topic(self, peer: str, length: int, hung: int) -> None:
        """A peer subscribed to a topic longer than a group's (a subscription message read, of
        a peer of the server): ``hung`` of its connections closed."""
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
        """Peers connected now, from their connect (before the handshake)."""
        return self.server.subscribers if self.server is not None else 0

    # -- end -------------------------------------------------------------------

    def close(self, linger: int | None = None) -> None:
        """Close the server (queued messages get ``linger`` ms, default LINGER_MS)."""
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
        for endpoint in list(self._files):
            self._remove_file(endpoint)


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
