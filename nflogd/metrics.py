"""Prometheus metrics: one collector that reads capture's counters at scrape time.

Use::

    registry = CollectorRegistry(auto_describe=True)      # the daemon's own, never REGISTRY
    Collector(groups=lambda: daemon.counters(), subscribers=lambda: pub.subscribers,
              registry=registry)
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
``nflogd_truncated_packets_total{group}``  packets cut by the group's copy_range
``nflogd_subscribers``                     peers connected to the feed
``nflogd_build_info{version}``             1
=========================================  =====================================================

``collect()`` never raises: a failure to read the counters is logged and the
scrape gets what could be read.
"""

from __future__ import annotations

import importlib.metadata
import logging
import socket
import threading
import time
from typing import Callable, Iterable, Tuple
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
from prometheus_client.registry import Collector as _Collector
from prometheus_client.registry import CollectorRegistry

from .errors import NflogdError

__all__ = ["Collector", "MetricsServer", "version"]

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
    ("nflogd_truncated_packets", "Packets cut short by the group's copy_range.", "truncated"),
)

GroupsSource = Callable[[], Iterable[Tuple[int, object]]]


def version() -> str:
    """The installed nflogd version (the package's ``__version__`` in a bare checkout)."""
    try:
        return importlib.metadata.version("nflogd")
    except importlib.metadata.PackageNotFoundError:
        from . import __version__

        return __version__


class Collector(_Collector):
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
    ):
        self._groups = groups
        self._subscribers = subscribers
        self._version = build_version if build_version is not None else version()
        self._warned = False
        if registry is not None:
            registry.register(self)

    def _families(self):
        counters = [CounterMetricFamily(name, doc, labels=["group"]) for name, doc, _ in COUNTERS]
        subs = GaugeMetricFamily("nflogd_subscribers", "Peers connected to the feed.")
        info = GaugeMetricFamily("nflogd_build_info", "nflogd's version; always 1.", labels=["version"])
        return counters, subs, info

    def describe(self):
        counters, subs, info = self._families()
        return [*counters, subs, info]

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

    def _warn(self, text: str) -> None:
        level = logging.DEBUG if self._warned else logging.WARNING
        self._warned = True
        log.log(level, "metrics: %s", text)


class MetricsServer:
    """prometheus_client's HTTP server for one registry; ``close()`` stops it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry):
        self.host = host
        self.port = port
        try:
            self.server, self.thread = _serve(host, port, registry)
        except OSError as e:
            raise NflogdError(f"metrics: {host}:{port}: {e.strerror or e}") from None
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)

    def close(self, timeout: float = 1.0) -> None:
        """Stop serving and join the thread, in a few ms rather than serve_forever's 0.5 s poll."""
        server, self.server = self.server, None
        if server is None:
            return
        stopper = threading.Thread(target=server.shutdown, name="metrics-shutdown", daemon=True)
        stopper.start()
        deadline = time.monotonic() + timeout
        while stopper.is_alive() and time.monotonic() < deadline:
            _poke(server.server_address)  # wakes serve_forever's select() to see the request
            stopper.join(0.02)
        server.server_close()
        self.thread.join(max(0.0, deadline - time.monotonic()))


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):  # no line per scrape
        pass


def _serve(host: str, port: int, registry: CollectorRegistry):
    """What start_http_server does, returning (server, thread) on every prometheus-client
    version: 0.16 (Debian 12's) returns None from start_http_server."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    server_class = type("MetricsHTTPServer", (ThreadingWSGIServer,), {"address_family": family})
    server = server_class(sockaddr[:2], _QuietHandler)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    return server, thread


def _poke(address) -> None:
    """Connect to the server and hang up at once."""
    host, port = address[0], address[1]
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        socket.create_connection((host, port), timeout=0.1).close()
    except OSError:
        pass
