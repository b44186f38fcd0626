"""Prometheus metrics: one collector that reads capture's counters at scrape time.

Use::

    registry = CollectorRegistry(auto_describe=True)      # the daemon's own, never REGISTRY
    DaemonCollector(groups=daemon.group_counters, subscribers=lambda: pub.subscribers,
                    registry=registry, limits=lambda: (pub, server))
    server = MetricsServer(cfg.metrics.host, cfg.metrics.port, registry)
    ...
    server.close()

Exposed:

=========================================  =====================================================
``nflogd_packets_total{group}``            packets captured (published on the feed)
``nflogd_bytes_total{group}``              their bytes, as counted by capture
``nflogd_kernel_dropped_packets_total``    packets the kernel logged but could not deliver
                                           (NFLOG sequence gaps), per group
``nflogd_overflows_total{group}``          receive-buffer overruns (ENOBUFS), per group
``nflogd_truncated_packets_total{group}``  packets cut by copy_range or the rule's snaplen
``nflogd_subscribers``                     peers connected to the feed
``nflogd_build_info{version}``             1
``nflogd_feed_refused_connections_total``  connections closed at once, over publish.max_connections,
                                           per endpoint
``nflogd_feed_dropped_peers_total``        peers hung up on for a topic no group has
``nflogd_feed_subscription_floods_total``  subscription flood episodes
``nflogd_feed_subscription_messages_total`` subscription messages read
``nflogd_feed_slow_dropped_messages_total`` messages a subscriber lost with publish.hwm queued
``nflogd_feed_queued_messages``            messages queued for slow subscribers now
``nflogd_feed_handshake_timeouts_total``   peers hung up on for an unfinished handshake
``nflogd_feed_sent_bytes_total``           bytes written to readers (a CURVE one's boxed)
``nflogd_feed_filters_refused_total``      filters readers stated and the daemon refused
``nflogd_feed_filter_passed_packets_total{filter,expression}``   packets a filter in use passed
``nflogd_feed_filter_dropped_packets_total{filter,expression}``  and dropped (each evaluated once)
``nflogd_feed_source_refused_connections_total`` connections closed at once, their uid (ipc) or
                                           address (tcp) over publish.max_connections_per_source,
                                           per endpoint
``nflogd_feed_idle_peers_total``           peers hung up on for subscribing to nothing for
                                           publish.idle_timeout_ms
``nflogd_feed_full_dropped_messages_total`` messages a subscriber lost because the queues held
                                           publish.max_queued_bytes
``nflogd_feed_queued_bytes``               bytes queued for slow subscribers now
``nflogd_metrics_dropped_connections_total`` metrics connections closed for the server's limits
``nflogd_ifnames_resyncs_total``           interface tables read again whole: the kernel dropped
                                           rtnetlink notifications (ENOBUFS)
=========================================  =====================================================

``collect()`` never raises: a failure to read the counters is logged and the
scrape gets what could be read.
"""

from __future__ import annotations

import importlib.metadata
import logging
import selectors
import socket
import threading
import time
from typing import Callable, Iterable, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector as _Collector
from prometheus_client.registry import CollectorRegistry

from .episodes import Episodes
from .errors import NflogdError

__all__ = ["DaemonCollector", "MetricsServer", "limit_families", "version"]

log = logging.getLogger(__name__)

#: (metric name without _total, help, attribute of GroupCounters)
COUNTERS = (
    ("nflogd_packets", "Packets captured and published, per NFLOG group.", "packets"),
    ("nflogd_bytes", "Bytes of the packets captured, per NFLOG group.", "bytes"),
    (
        "nflogd_kernel_dropped_packets",
        "Packets the kernel logged but could not deliver (NFLOG sequence gaps), per group.",
        "kernel_dropped",
    ),
    ("nflogd_overflows", "Netlink receive buffer overruns (ENOBUFS), per NFLOG group.", "overflows"),
    (
        "nflogd_truncated_packets",
        "Packets cut short by the group's copy_range or the rule's snaplen.",
        "truncated",
    ),
)

GroupsSource = Callable[[], Iterable[Tuple[int, object]]]


def version() -> str:
    """The installed nflogd version (the package's ``__version__`` in a bare checkout)."""
    try:
        return importlib.metadata.version("nflogd")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


class DaemonCollector(_Collector):
    """The daemon's metrics, read from live counters on every scrape.

    ``groups()`` returns (group number, counters) pairs, counters having the
    integer attributes ``packets``, ``bytes``, ``kernel_dropped``, ``overflows``
    and ``truncated`` (capture's GroupCounters); ``subscribers()`` the feed's
    peer count. Registers itself on ``registry`` when one is given.
    """

    def __init__(
        self,
        groups: GroupsSource,
        subscribers: Callable[[], int] | None = None,
        build_version: str | None = None,
        registry: CollectorRegistry | None = None,
        limits: Callable[[], tuple[object, object]] | None = None,
        ifnames_resyncs: Callable[[], int] | None = None,
    ):
        self._groups = groups
        self._resyncs = ifnames_resyncs
        self._subscribers = subscribers
        self._limits = limits
        self._version = build_version if build_version is not None else version()
        self._warned = False
        if registry is not None:
            registry.register(self)

    def _families(self):
        counters = [CounterMetricFamily(name, doc, labels=["group"]) for name, doc, _ in COUNTERS]
        subs = GaugeMetricFamily("nflogd_subscribers", "Peers connected to the feed.")
        info = GaugeMetricFamily("nflogd_build_info", "nflogd's version; always 1.", labels=["version"])
        return counters, subs, info

    @staticmethod
    def _resync_family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "nflogd_ifnames_resyncs",
            "Interface tables read again whole: the kernel dropped rtnetlink notifications (ENOBUFS).",
        )

    def describe(self):
        counters, subs, info = self._families()
        extra = limit_families("nflogd", None, None) if self._limits is not None else []
        resyncs = [self._resync_family()] if self._resyncs is not None else []
        return [*counters, subs, info, *extra, *resyncs]

    def collect(self):
        counters, subs, info = self._families()
        try:
            pairs = sorted(self._groups(), key=lambda p: p[0])
            for group, c in pairs:
                label = [str(group)]
                for fam, (_, _, attr) in zip(counters, COUNTERS):
                    fam.add_metric(label, int(getattr(c, attr, 0) or 0))
        except Exception as e:  # a scrape must never fail
            self._warn(f"reading group counters failed: {e!r}")
        if self._subscribers is not None:
            try:
                subs.add_metric([], int(self._subscribers()))
            except Exception as e:
                self._warn(f"reading the subscriber count failed: {e!r}")
        info.add_metric([self._version], 1)
        yield from counters
        if self._subscribers is not None:
            yield subs
        yield info
        if self._limits is not None:
            try:
                extra = limit_families("nflogd", *self._limits())
            except Exception as e:
                self._warn(f"reading the feed's limit counters failed: {e!r}")
                extra = limit_families("nflogd", None, None)
            yield from extra
        if self._resyncs is not None:
            resyncs = self._resync_family()
            try:
                resyncs.add_metric([], int(self._resyncs()))
            except Exception as e:
                self._warn(f"reading the interface tables' resyncs failed: {e!r}")
            yield resyncs

    def _warn(self, text: str) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "metrics: %s", text)


class MetricsServer:
    """The HTTP server of one registry: one thread, bounded connections, timeouts.

    ``GET /metrics`` (or ``/``) gets the registry in the format the ``Accept`` header asks for
    (prometheus_client's encoders); anything else 404, other methods 405. One thread serves
    every connection from a selector, so idle or slow clients cost a socket each, never a
    thread: at most MAX_CONNECTIONS are kept (beyond, the one connected longest is closed), each
    for at most TIMEOUT_S, a request head of at most MAX_REQUEST bytes. Connections closed so
    are counted in ``dropped`` and logged once per episode. ``close()`` wakes the thread through
    a socketpair and joins it: stopping starts no thread (a process at its task limit can
    always stop).
    """

    MAX_CONNECTIONS = 32
    TIMEOUT_S = 5.0
    MAX_REQUEST = 8192

    def __init__(self, host: str, port: int, registry: CollectorRegistry):
        self.host = host
        self.registry = registry
        self.dropped = 0  # connections closed for the limits (too many, too slow, too big)
        self._episodes = Episodes(log)
        try:
            family, _, _, _, address = socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            self._listener = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            raise NflogdError(f"metrics: {host}:{port}: {e.strerror or e}") from None
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(64)
        except OSError as e:
            self._listener.close()
            raise NflogdError(f"metrics: {host}:{port}: {e.strerror or e}") from None
        self._listener.setblocking(False)
        self.port = self._listener.getsockname()[1]
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self.thread = threading.Thread(target=self._serve, name="metrics", daemon=True)
        try:
            self.thread.start()
        except RuntimeError as e:  # "can't start new thread": a task or memory limit
            self._close_sockets()
            raise NflogdError(f"metrics: {host}:{port}: {e}") from None
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.port)

    # -- the thread --------------------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, None)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        conns: dict[socket.socket, _Conn] = {}
        try:
            while True:
                now = time.monotonic()
                timeout = min((c.deadline for c in conns.values()), default=now + 60) - now
                for key, _ in sel.select(max(0.0, timeout)):
                    sock = key.fileobj
                    if sock is self._wake_r:
                        return
                    if sock is self._listener:
                        self._accept(sel, conns)
                    elif sock in conns:
                        self._io(sel, conns, conns[sock])
                now = time.monotonic()
                for conn in [c for c in conns.values() if c.deadline <= now]:
                    self._drop(sel, conns, conn, f"took longer than {self.TIMEOUT_S:g} s")
        except Exception as e:  # never a traceback from this thread; scrapes stop, capture goes on
            log.error("metrics: server stopped: %r", e)
        finally:
            for conn in list(conns.values()):
                self._close(sel, conns, conn)
            sel.close()

    def _accept(self, sel, conns) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE, ECONNABORTED: try again at the next event
                self._episodes.hit("metrics: accept failed: %s", e.strerror or e)
                return
            if len(conns) >= self.MAX_CONNECTIONS:
                oldest = min(conns.values(), key=lambda c: c.started)
                self._drop(sel, conns, oldest, f"more than {self.MAX_CONNECTIONS} connections")
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.TIMEOUT_S)
            conns[sock] = conn
            sel.register(sock, selectors.EVENT_READ, None)

    def _io(self, sel, conns, conn) -> None:
        try:
            if conn.out is None:
                data = conn.sock.recv(4096)
                if not data:
                    self._close(sel, conns, conn)
                    return
                conn.buf += data
                if b"\r\n\r\n" not in conn.buf and b"\n\n" not in conn.buf:
                    if len(conn.buf) > self.MAX_REQUEST:
                        self._drop(sel, conns, conn, f"a request head over {self.MAX_REQUEST} bytes")
                    return
                conn.out = memoryview(self._respond(bytes(conn.buf)))
                sel.modify(conn.sock, selectors.EVENT_WRITE, None)
            sent = conn.sock.send(conn.out)
            conn.out = conn.out[sent:]
            if not conn.out:
                self._close(sel, conns, conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._close(sel, conns, conn)

    def _respond(self, head: bytes) -> bytes:
        lines = head.split(b"\n")
        try:
            method, target, _ = lines[0].decode("latin-1").split(None, 2)
        except ValueError:
            return _response(400, "text/plain", b"bad request\n")
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        if method not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"method not allowed\n")
        path = target.split("?", 1)[0]
        if path not in ("/", "/metrics"):
            return _response(404, "text/plain", b"not found\n")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        return _response(200, content_type, b"" if method == "HEAD" else body, len(body))

    def _drop(self, sel, conns, conn, why: str) -> None:
        self.dropped += 1
        self._episodes.hit("metrics: closing a connection (%s); %d closed so far", why, self.dropped)
        self._close(sel, conns, conn)

    @staticmethod
    def _close(sel, conns, conn) -> None:
        conns.pop(conn.sock, None)
        try:
            sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # -- stopping ----------------------------------------------------------------

    def close(self, timeout: float = 1.0) -> None:
        """Stop serving and join the thread (a few ms); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self.thread.join(timeout)
        self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.close()


class _Conn:
    __slots__ = ("sock", "deadline", "started", "buf", "out")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock = sock
        self.deadline = deadline
        self.started = time.monotonic()
        self.buf = bytearray()
        self.out: memoryview | None = None


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


def _response(status: int, content_type: str, body: bytes, length: int | None = None) -> bytes:
    head = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body) if length is None else length}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


def limit_families(prefix: str, feed, server) -> list:
    """What hostile peers cost, as metric families: ``feed`` a Publisher (or None), ``server``
    a MetricsServer (or None). Names under ``prefix`` (``nflogd``, ``nflogd_relay``)."""
    refused = CounterMetricFamily(
        f"{prefix}_feed_refused_connections",
        "Connections to the feed closed at once: the endpoint had its publish.max_connections.",
        labels=["endpoint"],
    )
    dropped = CounterMetricFamily(
        f"{prefix}_feed_dropped_peers", "Feed peers hung up on for subscribing to a topic no group has."
    )
    floods = CounterMetricFamily(
        f"{prefix}_feed_subscription_floods", "Episodes of more subscriptions at once than one turn reads."
    )
    subs = CounterMetricFamily(
        f"{prefix}_feed_subscription_messages", "Subscription messages read from peers."
    )
    slow = CounterMetricFamily(
        f"{prefix}_feed_slow_dropped_messages",
        "Messages not sent to a subscriber that had publish.hwm messages queued (it sees a gap).",
    )
    queued = GaugeMetricFamily(f"{prefix}_feed_queued_messages", "Messages queued for slow subscribers now.")
    timeouts = CounterMetricFamily(
        f"{prefix}_feed_handshake_timeouts",
        "Feed peers hung up on for not finishing the handshake within publish.handshake_timeout_ms.",
    )
    sent_bytes = CounterMetricFamily(
        f"{prefix}_feed_sent_bytes", "Bytes written to readers (what a CURVE reader got, boxed)."
    )
    refused_filters = CounterMetricFamily(
        f"{prefix}_feed_filters_refused", "Filters readers stated and the daemon refused (docs/filters.md)."
    )
    passed = CounterMetricFamily(
        f"{prefix}_feed_filter_passed_packets", "Packets a filter in use passed, evaluated once per packet "
        "however many readers hold it.", labels=["filter", "expression"],
    )  # fmt: skip
    failed = CounterMetricFamily(
        f"{prefix}_feed_filter_dropped_packets", "Packets a filter in use did not pass.",
        labels=["filter", "expression"],
    )  # fmt: skip
    by_source = CounterMetricFamily(
        f"{prefix}_feed_source_refused_connections",
        "Connections to the feed closed at once: their uid (ipc) or address (tcp) had "
        "publish.max_connections_per_source.",
        labels=["endpoint"],
    )
    idle = CounterMetricFamily(
        f"{prefix}_feed_idle_peers",
        "Feed peers hung up on for subscribing to nothing for publish.idle_timeout_ms.",
    )
    full = CounterMetricFamily(
        f"{prefix}_feed_full_dropped_messages",
        "Messages not queued for a slow subscriber: the queues held publish.max_queued_bytes "
        "(counted in slow_dropped_messages too).",
    )
    queued_bytes = GaugeMetricFamily(f"{prefix}_feed_queued_bytes", "Bytes queued for slow subscribers now.")
    http = CounterMetricFamily(
        f"{prefix}_metrics_dropped_connections",
        "Metrics connections closed for the server's limits (too many, too slow, too large).",
    )
    if feed is not None:
        counts = dict.fromkeys(feed.endpoints, 0) | dict(feed.refused)  # every endpoint, from 0
        for endpoint, n in sorted(counts.items()):
            refused.add_metric([endpoint], n)
        dropped.add_metric([], feed.dropped_peers)
        floods.add_metric([], feed.subscription_floods)
        subs.add_metric([], feed.subscription_messages)
    own = feed is not None and feed.server is not None  # None before start and once closed
    if own:
        slow.add_metric([], feed.slow_dropped)
        queued.add_metric([], feed.queued)
        timeouts.add_metric([], feed.handshake_timeouts)
        refused_filters.add_metric([], feed.filters_refused)
        for digest, text, _holders, npassed, ndropped in feed.filters():
            passed.add_metric([digest, text], npassed)
            failed.add_metric([digest, text], ndropped)
        source_counts = dict.fromkeys(feed.server.endpoints, 0) | feed.source_refused
        for endpoint, n in sorted(source_counts.items()):
            by_source.add_metric([endpoint], n)
        idle.add_metric([], feed.idle_hangups)
        full.add_metric([], feed.full_dropped)
        queued_bytes.add_metric([], feed.queued_bytes)
    http.add_metric([], server.dropped if server is not None else 0)
    if feed is not None:
        sent_bytes.add_metric([], feed.sent_bytes)
    own_families = [slow, queued, timeouts, by_source, idle, full, queued_bytes] if own else []
    own_families += [refused_filters, passed, failed] if own else []
    feed_families = [sent_bytes] if feed is not None else []
    return [refused, dropped, floods, subs, *own_families, *feed_families, http]
