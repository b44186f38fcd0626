"""nflogd-relay: many nflogd feeds in, one feed out, every message passed on untouched.

Command line::

    nflogd-relay [-c PATH] [--check] [--log-level LEVEL]     # also: python -m nflogd.relay

``--check`` loads the config (reading the CURVE keys) and exits 0, or prints
``nflogd-relay: <error>`` and exits 2. Otherwise: 0 after SIGTERM/SIGINT, 1 for a runtime
failure (an endpoint in use), 2 for a bad config.

Topology (``docs/relay.md``)::

    router1  nflogd ─┐                                 ┌─ SUB  Subscriber, nflog-tap, ...
    router2  nflogd ─┼─ XSUB ×3   relay   own server ───┼─ SUB
    router3  nflogd ─┘                                 └─ SUB

Sockets: one XSUB per upstream, connected to its endpoint (a CURVE client when the upstream
has keys), and downstream the daemon's own ``Publisher`` (the feed's own server on every
endpoint, CURVE ones too, with the daemon's limits). Messages go upstream to downstream in C,
never decoded (a record keeps its node, epoch and sequence numbers: a message the relay drops
shows at the client as a gap in that node's ``seq``): ``feed/_upstream.c`` reads the XSUBs
through pyzmq's own libzmq and hands each message whole to the feed's peers, in a thread of
its own (``ffi.CUpstreams``), or, with a ``jetstream`` section, from the poll loop one burst at
a time (``Upstream.forward``: the stream publisher takes each message too). While messages
keep coming either reads them in batches, sleeping ``GATHER_S`` between turns. The poll loop
(``service.Program``'s, with the upstreams' reconnects on a timer) passes subscriptions
downstream to upstream (the first to a topic, the last unsubscription, to every upstream
XSUB, which sends them again after every reconnect), serves the readers and sends the
sequence marks.

Readers' filters (``docs/filters.md``): a filter's subscriptions go to every upstream on a
connection of that filter's own (``Relay._filter_subscription``), so each daemon runs it and
its filtered messages come back on the filter's topics, to the readers holding it; the relay
never runs a filter.

Sequence marks (``SequenceMarks``): the relay passes the daemons' marks on and sends its own
for each (node, group) ``MARK_IDLE_S`` after the last packets it passed on, and at exit, so
that its clients learn where each sequence ended (``docs/wire-format.md``).

Upstream state: each XSUB's ``nflogd_client.endpoints.EndpointWatch``, as a Subscriber's:
up at the handshake, down at a disconnect, each failure counted and logged once with its
likely cause, the recovery logged; after a refused handshake the relay connects again every
``AUTH_RETRY_S`` seconds. ``docs/relay.md`` has why a loop and not ``zmq.proxy``, its cost,
and the rest of the design.

SIGHUP rereads the config: upstreams added, removed or with new keys are connected or closed
(the others keep their connections), ``publish.bind`` and ``publish.hwm`` are applied as the
daemon applies them, and the CURVE authorized keys are read again. Turning CURVE on or off,
a new server key, ``ipc_filter_groups`` and ``metrics`` need a restart: such a reload is
refused as a whole, and an invalid config is logged with the running one kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections import Counter
from typing import Callable, Iterator, cast

import zmq
from nflogd_client import filters, wire
from nflogd_client.endpoints import CONNECTED, EndpointTracker, EndpointWatch
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector as _Collector
from prometheus_client.registry import CollectorRegistry

from . import config_relay, service
from .access import CurveAccess
from .episodes import Episodes
from .errors import NflogdError
from .ffi import NOTED_MAX, CUpstream, CUpstreams, load_zmq
from .metrics import MetricsServer, limit_families, version
from .publish import Publisher, check_restart_only
from .sdnotify import Notifier
from .service import Program

__all__ = ["main", "Relay", "Upstream", "RelayCollector", "DEFAULT_CONFIG"]

log = logging.getLogger("nflogd.relay")

DEFAULT_CONFIG = "/etc/nflogd-relay.yaml"

#: Messages read from one upstream before the loop looks at the others.
BURST = 64
#: Messages (kernel batches) an upstream XSUB queues before ZeroMQ stops reading its connection;
#: the daemon then queues up to its own publish.hwm for the relay and drops beyond (a seq gap).
UPSTREAM_HWM = 10_000
#: The largest frame an upstream may send (ZMQ_MAXMSGSIZE, bytes): a daemon's message is one
#: kernel batch (at most the group's receive buffer's worth of records); a peer announcing more
#: is disconnected before the frame is allocated.
UPSTREAM_MAX_MESSAGE = 1 << 30
#: ZMTP heartbeats on upstream connections: a PING this often, the connection dropped (and
#: retried) when nothing came back for HEARTBEAT_TIMEOUT_MS.
HEARTBEAT_IVL_MS = 5_000
HEARTBEAT_TIMEOUT_MS = 15_000
#: Seconds a (node, group) carries no packets before the relay sends its own sequence mark
#: (the daemon sends one after capture_loop.MARK_IDLE_S, 1 s).
MARK_IDLE_S = 2.0
_HEADER = wire.HEADER
#: Readers' filters the relay passes upstream at once, each on a connection of its own to every
#: upstream: with the relay's own link, 64 connections to each daemon, its default
#: publish.max_connections_per_source (and its 64 distinct filters, less one for a local
#: reader). A reader stating one more is refused with the reason, as a daemon refuses a
#: filter (counted).
MAX_FILTERS = 63
#: Seconds the loop lets upstream messages gather while they keep coming (``Program.watch``'s
#: ``gather``): a steady trickle is read and passed on in batches, at most this much later.
GATHER_S = 0.002
#: Seconds between looks at what the upstreams' thread passed on, for the sequence marks (it
#: also says when half the (group, node)s it can note between looks are).
NOTES_S = 1.0
#: Seconds the relay waits at exit for the stream publisher's buffered messages to be acked.
STREAM_CLOSE_S = 5.0


def read_upstreams_in_c() -> None:
    """Have ``feed/_upstream.c`` read the upstream sockets through the libzmq that pyzmq's
    sockets belong to (that of its backend module); NflogdError, in one line, if it cannot."""
    module = sys.modules.get(zmq.backend.Socket.__module__)
    path = getattr(module, "__file__", None)
    try:
        if path is None:
            raise ValueError(f"{zmq.backend.Socket.__module__} is not a loaded library")
        load_zmq(path)
    except ValueError as e:
        raise NflogdError(f"pyzmq {zmq.__version__}: {e}") from None


class Upstream:
    """One XSUB socket connected to one upstream feed, with its monitor, its reader in C
    (``ffi.CUpstream``) and its counters.

    ``topics`` are the subscriptions in force (topic -> how many downstream sockets hold it);
    they are sent before connecting, and the XSUB sends them again after every reconnect.
    ``filtered``: a filter's connection, whose messages must be on the filters' topics (a
    daemon sends a group's own for a moment once the filter is cancelled before the groups
    through it): the others are not passed. ``keep``: each message is also handed to
    ``forward()``'s ``offer`` (the stream publisher). ``reader``: the upstreams' thread
    (``ffi.CUpstreams``) reads this one, not the loop through ``forward()``; the socket is then
    the thread's, and every other use of it here holds the thread's lock.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        settings,
        topics: Counter[bytes] | None = None,
        filtered: bool = False,
        keep: bool = False,
        reader: CUpstreams | None = None,
    ):
        self.settings = settings
        self.endpoint: str = settings.endpoint
        self.socket = ctx.socket(zmq.XSUB)
        sock = self.socket
        watch: EndpointWatch | None = None
        try:
            try:
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.RCVHWM, UPSTREAM_HWM)
                sock.setsockopt(zmq.MAXMSGSIZE, UPSTREAM_MAX_MESSAGE)
                sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
                if settings.curve:
                    sock.setsockopt(zmq.CURVE_SERVERKEY, settings.server_key)
                    sock.setsockopt(zmq.CURVE_PUBLICKEY, settings.client_public_key)
                    sock.setsockopt(zmq.CURVE_SECRETKEY, settings.client_secret_key)
                watch = EndpointWatch(
                    sock, [self.endpoint], curve=bool(settings.curve), logger=log, label="upstream"
                )
                for topic in topics or {}:  # once each: the daemon hears of a topic, not of readers
                    sock.send(b"\x01" + topic)
                sock.connect(self.endpoint)
            except zmq.ZMQError as e:
                raise NflogdError(f"upstreams: {self.endpoint}: {zmq.strerror(e.errno or 0)}") from None
        except BaseException:
            if watch is not None:
                watch.close()
            sock.close(linger=0)
            raise
        #: The endpoint's monitor, probes and connects again after a refusal; ``tracker`` its state.
        self._watch = watch
        self._c = CUpstream(sock.underlying, filtered, keep)
        self._reader = reader
        self._closed = False
        if reader is not None:
            with reader:
                reader.add(self._c, cast(int, sock.getsockopt(zmq.FD)))
        #: Called after a send or a connect on the socket (the loop's ``Program.recheck``).
        self.touched: Callable[[], None] = lambda: None
        log.info("upstream %s: connecting%s", self.endpoint, " (CURVE)" if settings.curve else "")

    @property
    def tracker(self) -> EndpointTracker:
        """The endpoint's state, fed by the monitor and by probes."""
        return self._watch.tracker

    @property
    def monitor(self) -> zmq.Socket | None:
        """The monitor's socket, for the relay's poller."""
        return self._watch.monitor

    @property
    def up(self) -> bool:
        return self.tracker[self.endpoint].state == CONNECTED

    @property
    def connects(self) -> int:
        return self.tracker[self.endpoint].connects

    @property
    def handshake_failures(self) -> int:
        return self.tracker[self.endpoint].handshake_failures

    @property
    def messages_in(self) -> int:
        """Messages received and passed on (by C to the feed, or by ``forward()``)."""
        return self._c.messages

    @property
    def bytes_in(self) -> int:
        """Their bytes, every frame."""
        return self._c.bytes_in

    @property
    def retry_at(self) -> float | None:
        """When ``reconnect()`` has something to do (monotonic seconds), or None."""
        return self._watch.due_at()

    def forward(
        self,
        feed: Publisher,
        offer: Callable[[list], None] | None = None,
        notes: Callable[[bytes], None] | None = None,
    ) -> bool:
        """Pass up to BURST queued messages to ``feed``'s readers; True if it stopped at BURST
        (more may be queued). A message of four frames on a group's topic goes from C
        (``CUpstream.pass_to``) to the feed's peers; one that C hands back (a filter's, one of
        another shape, or each one for ``offer``) goes to ``Publisher.forward`` if C did not
        send it, and to ``offer`` (the stream publisher, which never blocks) if there is one.
        ``notes``: called with the header frame of each message forwarded
        (``SequenceMarks.note``).
        """
        c, cfeed = self._c, feed.cfeed
        assert cfeed is not None, "a relay's Publisher sends from C"
        start = c.messages
        while True:
            status = c.pass_to(cfeed, BURST - (c.messages - start))
            if notes is not None:
                for header in c.notes():
                    notes(header)
            if status != CUpstream.HELD:
                return status == CUpstream.MORE
            frames = c.held()
            if offer is not None:
                offer(frames)
            if not c.held_forwarded:
                feed.forward(frames)
            if c.messages - start >= BURST:
                return True

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        """The socket, for a use other than reading it: away from the upstreams' thread, which
        reads it again afterwards (the use may have taken in what its ZMQ_FD signals)."""
        reader = self._reader
        if reader is None:
            yield
            self.touched()
            return
        with reader:
            yield
            reader.recheck(self._c)

    def subscription(self, msg: bytes) -> None:
        """Pass on a downstream (un)subscription message."""
        with self._using():
            self.socket.send(msg)

    def handle_monitor(self) -> None:
        """Apply queued monitor events to the endpoint's state (which logs its changes)."""
        self._watch.handle_monitor()

    def reconnect(self) -> None:
        """Do what ``retry_at`` was for: collect or start a probe, connect again after a refusal
        (the subscriptions are sent again on connect)."""
        with self._using():
            self._watch.step()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._reader is not None:
                with self._reader:
                    self._reader.remove(self._c)
            self._c.close()  # before the socket it reads
        self._watch.close()
        if not self.socket.closed:
            self.socket.close(linger=0)


class SequenceMarks:
    """Where the sequence of each (node, group) the relay passed on stands, and the relay's own
    sequence mark for it (``docs/wire-format.md``, "Sequence marks") once it has carried no
    packets for ``idle_s`` seconds.

    A daemon marks each group itself a second after its last packets, and the relay passes that
    on like any message; the relay's own mark, a second later, is the last word when the daemon
    could not send one (killed, or its connection lost) and a second chance for a reader whose
    queue was full when the first came. One mark per (node, group) per idle spell: once marked,
    a (node, group) costs nothing until it carries packets again. State is kept for
    ``max_streams`` (node, group)s; past that the one seen longest ago is forgotten (counted in
    ``forgotten``, logged once per episode): a reader then learns its tail from the daemon's
    mark alone.

    ::

        marks = SequenceMarks()
        marks.note(header_frame)            # each message passed on
        timer.due = marks.due()             # monotonic seconds, None: nothing to mark
        marks.send_due(out, offer)          # the marks whose time has come (out: Publisher.forward)
        marks.send_due(out, offer, everything=True)    # at exit: every (node, group) not marked
    """

    def __init__(self, idle_s: float = 2.0, max_streams: int = 65536):
        self.idle_s = idle_s
        self.max_streams = max_streams
        #: Marks sent, and (node, group)s forgotten for max_streams.
        self.sent = 0
        self.forgotten = 0
        # key (the header's group bytes + node) -> [group, node, epoch, next_seq, kernel_dropped]
        self._state: dict[bytes, list] = {}
        self._unmarked: dict[bytes, float] = {}  # key -> when it last carried packets, oldest first
        self._forget_log = Episodes(log)

    def note(self, header: bytes, when: float | None = None) -> None:
        """One message passed on: its header frame (frame 1), and when (``time.monotonic()``
        seconds; None: now)."""
        if len(header) < _HEADER.size or header[:4] != b"NFLD":
            return
        _, _, _, group, count, _, node_len, epoch, first_seq, kdrop = _HEADER.unpack_from(header)
        key = header[6:8] + header[_HEADER.size :]
        state = self._state.get(key)
        if count == 0:  # a mark passed on: where it says, for the relay's own to repeat
            if state is not None and state[2] == epoch and state[3] < first_seq:
                state[3], state[4] = first_seq, kdrop
            return
        if state is None:
            if len(self._state) >= self.max_streams:
                self._forget()
            self._state[key] = [group, header[_HEADER.size :], epoch, first_seq + count, kdrop]
        else:
            state[2], state[3], state[4] = epoch, first_seq + count, kdrop
        unmarked = self._unmarked
        unmarked.pop(key, None)
        unmarked[key] = time.monotonic() if when is None else when

    def unnoted(self, n: int) -> None:
        """``n`` messages passed on that were not noted (``CUpstreams``: more (node, group)s at
        once than it notes between takes): counted as forgotten, logged once per episode."""
        self.forgotten += n
        self._forget_log.hit(
            "sequence marks: more than %d (node, group)s at once; %d messages not followed"
            " (counted in nflogd_relay_mark_streams_forgotten_total)",
            NOTED_MAX,
            n,
        )

    def _forget(self) -> None:
        key = next(iter(self._state))
        del self._state[key]
        self._unmarked.pop(key, None)
        self.forgotten += 1
        self._forget_log.hit(
            "sequence marks: more than %d (node, group)s; forgetting the oldest "
            "(counted in nflogd_relay_mark_streams_forgotten_total)",
            self.max_streams,
        )

    def due(self) -> float | None:
        """When the next mark is due (monotonic seconds), or None."""
        for when in self._unmarked.values():
            return when + self.idle_s
        return None

    def send_due(
        self,
        out: Callable[[list], None] | None,
        offer: Callable[[list], None] | None = None,
        everything: bool = False,
    ) -> None:
        """Send the marks whose time has come (``everything``: every one not sent) to ``out``
        (the feed's ``Publisher.forward``) and to ``offer``."""
        limit = time.monotonic() - self.idle_s
        unmarked = self._unmarked
        while unmarked:
            key, when = next(iter(unmarked.items()))
            if when > limit and not everything:
                break
            del unmarked[key]
            state = self._state.get(key)
            if state is None:
                continue
            group, node, epoch, next_seq, kdrop = state
            frames = wire.frames(group, node, epoch, next_seq, kdrop, 0, b"", b"")
            if out is not None:
                out(frames)
            if offer is not None:
                offer(frames)
            self.sent += 1


#: (metric name without _total, help, Upstream attribute): one sample per upstream, label ``upstream``
UPSTREAM_COUNTERS = (
    ("nflogd_relay_messages", "Messages received from each upstream and passed on.", "messages_in"),
    ("nflogd_relay_bytes", "Bytes of those messages, all frames.", "bytes_in"),
    ("nflogd_relay_upstream_connects", "Handshakes completed with each upstream.", "connects"),
    (
        "nflogd_relay_upstream_handshake_failures",
        "Failed handshakes with each upstream (CURVE keys, protocol).",
        "handshake_failures",
    ),
)


class RelayCollector(_Collector):
    """The relay's metrics, read from the live Relay on every scrape.

    ==============================================  ===========================================
    ``nflogd_relay_messages_total{upstream}``       messages received and passed on
    ``nflogd_relay_bytes_total{upstream}``          their bytes, all frames
    ``nflogd_relay_upstream_up{upstream}``          1 while connected (handshake done), else 0
    ``nflogd_relay_upstream_connects_total``        handshakes completed, per upstream
    ``nflogd_relay_upstream_handshake_failures_total``  refused or failed handshakes, per upstream
    ``nflogd_relay_subscribers``                    peers connected to the relay's feed
    ``nflogd_relay_subscribed_topics``              topics subscribed upstream ('' counts as one)
    ``nflogd_relay_filters``                        readers' filters passed upstream (distinct)
    ``nflogd_relay_filters_refused_total``          readers' filters refused: MAX_FILTERS in use
    ``nflogd_relay_build_info{version}``            1
    ``nflogd_relay_marks_total``                    sequence marks sent of the relay's own
    ``nflogd_relay_mark_streams_forgotten_total``   (node, group)s no longer followed for marks
    ==============================================  ===========================================
    """

    def __init__(self, relay: Relay, registry: CollectorRegistry | None = None):
        self._relay = relay
        self._version = version()
        if registry is not None:
            registry.register(self)

    def _families(self):
        label = ["upstream"]
        counters = [CounterMetricFamily(name, doc, labels=label) for name, doc, _ in UPSTREAM_COUNTERS]
        up = GaugeMetricFamily("nflogd_relay_upstream_up", "1 while the upstream is connected.", labels=label)
        subs = GaugeMetricFamily("nflogd_relay_subscribers", "Peers connected to the relay's feed.")
        topics = GaugeMetricFamily("nflogd_relay_subscribed_topics", "Topics subscribed to upstream.")
        nfilters = GaugeMetricFamily(
            "nflogd_relay_filters", "Readers' filters passed upstream, each distinct one (docs/filters.md)."
        )
        refused = CounterMetricFamily(
            "nflogd_relay_filters_refused",
            "Readers' filters refused (their readers told why): 63 in use already.",
        )
        info = GaugeMetricFamily("nflogd_relay_build_info", "nflogd's version; always 1.", labels=["version"])
        marks = CounterMetricFamily(
            "nflogd_relay_marks", "Sequence marks the relay sent of its own (docs/wire-format.md)."
        )
        forgotten = CounterMetricFamily(
            "nflogd_relay_mark_streams_forgotten",
            "(node, group)s whose sequence the relay stopped following, and messages it could not"
            " note for its marks (too many (node, group)s).",
        )
        return counters, up, subs, topics, nfilters, refused, info, marks, forgotten

    def describe(self):
        counters, *gauges = self._families()
        return [*counters, *gauges, *limit_families("nflogd_relay", None, None)]

    def collect(self):
        counters, up, subs, topics, nfilters, refused, info, marks, forgotten = self._families()
        relay = self._relay
        try:
            through = [u for ups in list(relay.filter_upstreams.values()) for u in list(ups.values())]
            for u in list(relay.upstreams.values()):
                label = [u.endpoint]
                for fam, (_, _, attr) in zip(counters, UPSTREAM_COUNTERS):
                    value = getattr(u, attr)
                    if attr in ("messages_in", "bytes_in"):  # with what the filters' connections carried
                        value += sum(getattr(f, attr) for f in through if f.endpoint == u.endpoint)
                    fam.add_metric(label, value)
                up.add_metric(label, 1 if u.up else 0)
            nfilters.add_metric([], len(relay.filter_upstreams))
            refused.add_metric([], relay.filters_refused)
            publisher = relay.publisher
            subs.add_metric([], publisher.subscribers if publisher is not None else 0)
            topics.add_metric([], len(relay.topics))
            marks.add_metric([], relay.marks.sent)
            forgotten.add_metric([], relay.marks.forgotten)
        except Exception as e:  # a scrape must never fail
            log.debug("metrics: reading the relay's state failed: %r", e)
        info.add_metric([self._version], 1)
        limits = limit_families("nflogd_relay", relay.publisher, relay.metrics_server)
        return [*counters, up, subs, topics, nfilters, refused, info, marks, forgotten, *limits]


class Relay(Program):
    """One run of the relay over one config: ``install_signals()``, ``start()``, ``run()``, ``close()``."""

    load = staticmethod(config_relay.load_relay)

    def __init__(self, cfg, path: str, notifier: Notifier | None = None):
        super().__init__(cfg, path, notifier)
        #: endpoint -> Upstream; replaced, never mutated (the metrics thread reads it).
        self.upstreams: dict[str, Upstream] = {}
        #: Subscriptions in force upstream: topic -> downstream sockets that hold it.
        self.topics: Counter[bytes] = Counter()
        #: Readers' filters: filter id -> its subscriptions in force (the filter's, tagged, and
        #: the groups' through it) -> downstream sockets that hold each.
        self.filter_topics: dict[bytes, Counter[bytes]] = {}
        #: filter id -> endpoint -> the connection to that upstream that holds the filter (a
        #: daemon holds one filter per connection); replaced, never mutated (metrics thread).
        self.filter_upstreams: dict[bytes, dict[str, Upstream]] = {}
        #: Readers' filters refused for MAX_FILTERS, logged once per episode.
        self.filters_refused = 0
        self._filters_log = Episodes(log)
        self.registry: CollectorRegistry | None = None
        self._retries: dict[int, Upstream] = {}  # id() -> an upstream connection with a retry_at
        self._retry = self.timer(self._reconnect)  # due at the first retry_at
        #: The jetstream section's publisher (nflogd/streampub.py), or None.
        self.stream = None
        #: The sequence marks of the (node, group)s passed on, sent by ``_mark_timer``.
        self.marks = SequenceMarks(MARK_IDLE_S)
        self._mark_timer = self.timer(self._send_marks)
        #: The upstreams' thread, when no stream publisher needs each message: it reads the
        #: upstreams (not the filters' connections) and passes their messages to the feed.
        self.reader: CUpstreams | None = None
        self._reader_thread: threading.Thread | None = None
        self._reader_seen = (0, 0)  # its notes dropped and errors, as last taken
        self._reader_errors = Episodes(log)
        self.gather_s = GATHER_S

    # -- start -----------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        os.umask(0o007)
        service.probe_threads()  # a one-line error now rather than a libzmq abort later
        read_upstreams_in_c()
        self.ctx = zmq.Context()
        if cfg.publish.curve is not None:
            self.access = CurveAccess(cfg.publish.curve)
        self.publisher = self._make_publisher(cfg.publish)
        self.registry = CollectorRegistry()
        RelayCollector(self, registry=self.registry)
        if cfg.metrics is not None:
            self.metrics_server = MetricsServer(cfg.metrics.host, cfg.metrics.port, self.registry)
        if cfg.jetstream is not None:
            self.stream = _open_stream(cfg.jetstream, self.registry)
            self.topics[b""] += 1  # the stream takes every group of every upstream
        else:
            self.reader = reader = CUpstreams(int(GATHER_S * 1e6))
            self._reader_thread = threading.Thread(
                target=self._read_upstreams, args=(reader,), name="nflogd-relay upstreams", daemon=True
            )
            self._reader_thread.start()
            self.watch(reader.notes_fd, self._take_notes)
            self.timer(self._take_notes, NOTES_S)
        # The readers are served when the server's epoll says one has something (to say, to be
        # written, to be accepted) and when a handshake times out, not at every turn: a turn
        # comes with every upstream message, and serving the readers each time cost as much
        # as passing the message on (bench/run.py relay).
        self._feed_check = self.timer(self._handle_subscriptions)
        for fd in self.publisher.fds:
            self.watch(fd, self._handle_subscriptions)
        self.upstreams = {u.endpoint: self._open_upstream(u) for u in cfg.upstreams}
        log.info("%s", self.status())
        self.notifier.ready(self.status())

    def _make_publisher(self, publish) -> Publisher:
        """The daemon's Publisher, the feed's own server for every endpoint, CURVE ones too.

        It reports every (un)subscription, and a reader's hang-up as the unsubscriptions of
        what it held; ``_subscription`` counts them and passes upstream a topic's first
        subscription and its last unsubscription, as an XPUB that is not verbose did.
        """
        keys = self.access.keys if self.access is not None else None
        # readers' filters pass on to the upstreams as they are (filter_topics)
        pub = Publisher(publish, curve_keys=keys, filter_topics=True)
        pub.on_filter = self._filter_subscription
        return pub

    def _open_upstream(self, settings, filter_topics: Counter[bytes] | None = None) -> Upstream:
        """A connection to an upstream, subscribed to ``topics``, or to a filter's topics
        (``filter_topics``: its messages go to the feed alone, not to the stream nor the
        sequence marks, which follow the unfiltered sequences)."""
        filtered = filter_topics is not None
        topics = self.topics if filter_topics is None else filter_topics
        keep = self.stream is not None and not filtered
        reader = self.reader if not (filtered or keep) else None
        up = Upstream(self._context(), settings, topics, filtered, keep, reader)
        if filtered:
            self.watch(up.socket, lambda: up.forward(self._feed()))
        elif reader is None:
            offer = self.stream.offer if self.stream is not None else None
            marks, timer = self.marks, self._mark_timer

            def forward() -> bool:
                more = up.forward(self._feed(), offer, marks.note)
                if timer.due is None:
                    timer.due = marks.due()
                return more

            self.watch(up.socket, forward, gather=True)
        if reader is None:
            up.touched = lambda: self.recheck(up.socket)
        monitor = up.monitor
        if monitor is not None:  # an Upstream has its monitor until close()
            self.watch(monitor, lambda: self._handle_monitor(up))
        return up

    def _handle_monitor(self, up: Upstream) -> None:
        up.handle_monitor()
        if up.retry_at is None:
            self._retries.pop(id(up), None)
        else:
            self._retries[id(up)] = up
        self._schedule_retry()

    def _close_upstream(self, up: Upstream) -> None:
        self._retries.pop(id(up), None)
        self._schedule_retry()
        for sock in (up.socket, up.monitor):
            if sock is not None:
                self.unwatch(sock)
        up.close()

    # -- loop ------------------------------------------------------------------

    def _schedule_retry(self) -> None:
        """The retry timer set to the first upstream's ``retry_at`` (idle if none has one)."""
        due = [u.retry_at for u in self._retries.values() if u.retry_at is not None]
        self._retry.due = min(due) if due else None

    def _reconnect(self) -> None:
        """Probe or connect again each upstream whose ``retry_at`` has come."""
        now = time.monotonic()
        retries = self._retries
        for key, up in list(retries.items()):
            at = up.retry_at
            if at is None:
                del retries[key]
            elif at <= now:
                up.reconnect()
                if up.retry_at is None:
                    del retries[key]
        self._schedule_retry()

    def _take_notes(self) -> None:
        """The upstreams' thread's notes (the messages it passed on) to the sequence marks;
        the mark timer set if it was not. Its errors logged, once per episode."""
        reader = self.reader
        if reader is None:
            return
        note = self.marks.note
        for when, header in reader.take_notes():
            note(header, when)
        if self._mark_timer.due is None:
            self._mark_timer.due = self.marks.due()
        dropped, errors = reader.notes_dropped, reader.errors
        if dropped > self._reader_seen[0]:
            self.marks.unnoted(dropped - self._reader_seen[0])
        if errors > self._reader_seen[1]:
            self._reader_errors.hit("upstreams: %d could not be read (libzmq) and are read no more", errors,
                                    level=logging.ERROR)  # fmt: skip
        self._reader_seen = (dropped, errors)

    def _read_upstreams(self, reader: CUpstreams) -> None:
        """The upstreams' thread (``CUpstreams.run``)."""
        cfeed = self._feed().cfeed
        assert cfeed is not None, "a relay's Publisher sends from C"
        try:
            reader.run(cfeed)
        except OSError as e:
            log.error("upstreams: their thread stopped: %s", e.strerror or e)

    def _send_marks(self, everything: bool = False) -> None:
        """The sequence marks that are due (``everything``: all not sent yet, at exit); the
        timer set to the next one."""
        self._take_notes()
        offer = self.stream.offer if self.stream is not None else None
        self.marks.send_due(self._feed().forward, offer, everything)
        self._mark_timer.due = self.marks.due()

    def _handle_subscriptions(self) -> None:
        """Serve the readers (the server's epoll readable, a deadline) and pass their (un)subscriptions on
        (``Publisher.handle_incoming`` reads a bounded number per turn and drops peers sending
        topics no group can match); then set when to look again (handshake deadlines)."""
        feed = self._feed()
        if feed.handle_incoming(self._subscription):
            self._feed_check.hurry()
            return
        ms = feed.next_check_ms()
        self._feed_check.due = None if ms is None else time.monotonic() + ms / 1000

    def _subscription(self, msg: bytes) -> None:
        """One downstream (un)subscription: ``topics`` kept up to date; a topic's first
        subscription and its last unsubscription passed to every upstream."""
        kind, topic = msg[:1], msg[1:]
        if kind == b"\x01":
            self.topics[topic] += 1
            if self.topics[topic] > 1:
                return
        elif self.topics[topic] > 0:
            self.topics[topic] -= 1
            if self.topics[topic]:
                return
            del self.topics[topic]
        else:
            return  # an unsubscription of nothing
        for up in self.upstreams.values():
            up.subscription(msg)

    def _filter_subscription(self, msg: bytes) -> str | None:
        """A reader's filter (``"\\xffNFLF"``, its spec and tag) or a group through it
        (``"\\xffNFLG"``, its id, the group's topic), (un)subscribed: passed to every upstream
        on a connection of that filter's own (a daemon holds one filter per connection), opened
        with its first subscription and closed with its last. The daemons' replies and filtered
        messages come back on these topics and go to exactly the readers subscribed to them:
        the relay never runs a filter. None, or why not (the reader is told, and counted): a
        malformed filter subscription, a filter past MAX_FILTERS, a group through a filter not
        held (that reader is hung up on)."""
        kind, topic = msg[:1], msg[1:]
        if topic.startswith(filters.FILTER_TOPIC):
            spec = topic[len(filters.FILTER_TOPIC) :]
            n = filters.spec_length(spec)
            if not filters.HEAD.size <= n <= len(spec) <= n + filters.MAX_TAG:
                return "malformed filter subscription: its spec and tag do not add up"
            fid = filters.spec_id(spec[:n])
        else:
            at = len(wire.FILTERED_TOPIC)
            fid = topic[at : at + 8]
        held = self.filter_topics.get(fid)
        if kind == b"\x01":
            if held is None:
                if not topic.startswith(filters.FILTER_TOPIC):
                    return "a group through a filter nobody holds"  # its filter first
                if len(self.filter_topics) >= MAX_FILTERS:
                    self.filters_refused += 1
                    self._filters_log.hit(
                        "filter refused: %d filters in use, its limit; its reader told so; %d refused so far",
                        MAX_FILTERS, self.filters_refused,
                    )  # fmt: skip
                    return f"nflogd-relay passes {MAX_FILTERS} distinct filters already, its limit"
                held = self.filter_topics[fid] = Counter()
            held[topic] += 1
        elif held is not None and held[topic] > 0:
            held[topic] -= 1
            if not held[topic]:
                del held[topic]
        else:
            return None  # an unsubscription of nothing
        # upstream go a topic's first subscription and its last cancel, as for groups
        edge = held[topic] == 1 if kind == b"\x01" else topic not in held
        ups = self.filter_upstreams.get(fid)
        if not any(t.startswith(filters.FILTER_TOPIC) for t in held):
            # no reader holds the filter any more (a group's subscription through it may be
            # left for a moment): its connections closed
            del self.filter_topics[fid]
            if ups is not None:
                self.filter_upstreams = {k: v for k, v in self.filter_upstreams.items() if k != fid}
                for up in ups.values():
                    self._close_upstream(up)
                log.debug("filter %s: its last reader gone, its upstream connections closed", fid.hex())
            return None
        if ups is None:
            self._sync_filter_upstreams()  # connects with every topic held, this one too
            return None
        if edge:
            for up in ups.values():
                up.subscription(msg)
        return None

    def _sync_filter_upstreams(self) -> None:
        """Each filter in use connected to each upstream (with the upstream's settings), and
        no connection left to an upstream no longer configured."""
        current = self.filter_upstreams
        wanted = {endpoint: up.settings for endpoint, up in self.upstreams.items()}
        result: dict[bytes, dict[str, Upstream]] = {}
        for fid, held in self.filter_topics.items():
            have = current.get(fid, {})
            ups: dict[str, Upstream] = {}
            for endpoint, settings in wanted.items():
                up = have.get(endpoint)
                if up is None or up.settings != settings:
                    if up is not None:
                        self._close_upstream(up)
                    up = self._open_upstream(settings, held)
                ups[endpoint] = up
            for endpoint, up in have.items():
                if endpoint not in wanted:
                    self._close_upstream(up)
            result[fid] = ups
        self.filter_upstreams = result

    # -- reload ----------------------------------------------------------------

    def apply(self, new) -> None:
        """Put the reread config in force (module docstring); NflogdError with nothing changed."""
        old = self.cfg
        publisher = self._feed()
        check_restart_only(old.publish, new.publish, unit="nflogd-relay")
        if new.metrics != old.metrics:
            raise NflogdError("metrics: a change needs a restart")
        if new.jetstream != old.jetstream:
            raise NflogdError("jetstream: a change needs a restart (systemctl restart nflogd-relay)")
        wanted = {u.endpoint: u for u in new.upstreams}
        current = self.upstreams
        # 1. what can fail, undone if a later step fails
        added: dict[str, Upstream] = {}
        try:
            for endpoint, settings in wanted.items():
                if endpoint not in current or current[endpoint].settings != settings:
                    added[endpoint] = self._open_upstream(settings)
            publisher.rebind(new.publish.bind)
        except NflogdError:
            for up in added.values():
                self._close_upstream(up)
            raise
        # 2. what cannot fail
        self._apply_publish(new.publish)
        upstreams = {}
        for endpoint in wanted:
            upstreams[endpoint] = added.get(endpoint) or current[endpoint]
        for endpoint, up in current.items():
            if upstreams.get(endpoint) is not up:
                self._close_upstream(up)
                log.info("upstream %s: closed", endpoint)
        self.upstreams = upstreams
        self._sync_filter_upstreams()

    # -- state -----------------------------------------------------------------

    def _upstreams_text(self) -> str:
        n = len(self.upstreams)
        return f"{n} upstream{'' if n == 1 else 's'}"

    def status(self) -> str:
        return f"relaying {self._upstreams_text()}"

    # -- stop ------------------------------------------------------------------

    def close(self) -> None:
        """Release everything; safe after a failed start."""
        self.notifier.stopping()
        reader, thread = self.reader, self._reader_thread
        if reader is not None and thread is not None:
            reader.stop()
            thread.join()
            self._reader_thread = None
        if self.publisher is not None:  # last words: where every sequence passed on ended
            self._send_marks(everything=True)
        upstreams, self.upstreams = self.upstreams, {}
        for up in upstreams.values():
            up.close()
        through, self.filter_upstreams = self.filter_upstreams, {}
        for ups in through.values():
            for up in ups.values():
                up.close()
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close(STREAM_CLOSE_S)
        self._release()


def _open_stream(js, registry):
    """The jetstream section's publisher, started (docs/jetstream.md); nats-py is imported only here."""
    try:
        from .jetstream import JetStreamDriver
    except ImportError as e:
        if e.name is None:  # nats-py is there, but not one the relay can use
            raise NflogdError(f"jetstream: {e}") from None
        raise NflogdError(
            f"jetstream: needs the nats-py package (pip install 'nflogd-client[jetstream]'): {e}"
        ) from None
    from .streampub import StreamCollector, StreamPublisher

    pub = StreamPublisher(
        JetStreamDriver(js),
        partitions=js.partitions,
        max_in_flight=js.max_in_flight,
        buffer_bytes=js.buffer_bytes,
    )
    pub.start(js.connect_timeout_ms / 1000)
    StreamCollector(pub, registry)
    return pub


def main(argv: list[str] | None = None) -> int:
    return service.main(
        argv,
        prog="nflogd-relay",
        description="Subscribe to many nflogd feeds and publish them as one, messages untouched.",
        default_config=DEFAULT_CONFIG,
        load=config_relay.load_relay,
        make=Relay,
    )


if __name__ == "__main__":
    sys.exit(main())
