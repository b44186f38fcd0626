"""The relay's feed into a stream engine: a bounded buffer, a bounded number of publishes in
flight, retries, counted drops; the engine itself is a driver (``nflogd/jetstream.py``).

The relay is one thread polling ZeroMQ; engine clients (nats-py) are asyncio. So the publisher
runs an asyncio loop in a thread of its own, and the relay hands messages over with
``offer()``, which never blocks and never waits for the engine::

    relay thread                         publisher thread (asyncio)
    Upstream.forward -> offer(frames) -> deque -> pump -> up to max_in_flight driver.publish()
                        (full: drop,               (a transient error: retry the same
                         count, log once)           record, same msg id, after a pause)

Memory is bounded by ``buffer_bytes``: a message counts from ``offer()`` until the engine
acked it (or refused it for good). A message that does not fit is dropped at once, counted in
``dropped_messages`` and ``dropped_packets`` (reason ``buffer``), and logged once per episode;
the episode ends when a message fits again. Frames are kept as ZeroMQ gave them (no copy on the
relay thread); the publisher thread joins them into the record's value.

A driver is the engine behind one small interface (``Driver``): ``open()`` connects and
creates or checks the stream (raising ``NflogdError`` with the reason),
``publish(record, settle)`` queues one ``nflogd_client.stream.Record`` (``Transient`` or
``Rejected`` raised when it cannot), ``flush()`` sends what was queued, and ``settle(exc,
duplicate)`` is called once per record with the outcome: its ack (``exc`` None, ``duplicate``
True if the engine had it already), ``Transient`` to retry or ``Rejected`` to drop; ``close()``
settles those still pending as ``Transient``. ``docs/jetstream.md`` says what a Kafka driver would need.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import struct
import threading
import time
from typing import Callable, Optional, Protocol, Sequence, Union

import zmq
from nflogd_client import stream
from nflogd_client.wire import WireError
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as _Collector
from prometheus_client.registry import CollectorRegistry

from .episodes import Episodes
from .errors import NflogdError

__all__ = ["Driver", "Transient", "Rejected", "StreamPublisher", "StreamCollector"]

log = logging.getLogger("nflogd.stream")

#: Seconds a JetStream stream takes no publish while it elects a new leader (measured 5.8-7.3 s
#: with the leader killed): ``buffer_bytes`` should hold that long's worth of the feed.
FAILOVER_S = 8.0
#: Seconds over which the offered rate is measured for that check.
RATE_WINDOW_S = 2.0
#: Seconds the publisher thread lets messages gather before it publishes them together (one
#: write to the server, their acks read in one go): once woken from idle, and between turns
#: while messages keep coming. A message reaches the stream up to this much later.
GATHER_S = 0.010
#: Turns of the event loop that read what came while the publisher thread held it (the socket's
#: data, nats-py's read loop, its subscription's task): the acks, or a connection lost, which
#: must be known before the next publishes are written.
READ_TURNS = 3
#: Bytes of sequence marks held beyond ``buffer_bytes`` (a mark is ~50 bytes, one per (node,
#: group) per idle spell): a full buffer still takes the marks that say where sequences ended.
MARK_SLACK_BYTES = 1 << 20
#: Seconds before the first retry of a failed publish; doubled up to RETRY_MAX_S.
RETRY_S = 0.2
RETRY_MAX_S = 2.0
_COUNT = struct.Struct("<I")  # the header's count, at offset 8 (wire.HEADER)


class Transient(Exception):
    """The engine did not take the record now (timeout, no leader, disconnected): retry it."""


class Rejected(Exception):
    """The engine refused the record for good (too large, stream limits): drop it."""


#: One feed message as received: its four frames.
Frames = Sequence[Union[bytes, zmq.Frame]]
#: How a driver reports the outcome of one publish: ``(None, duplicate)`` for an ack,
#: ``(Transient(...), False)`` to retry, ``(Rejected(...), False)`` to drop.
Settle = Callable[[Optional[BaseException], bool], None]


class Driver(Protocol):
    name: str  # the stream, for metrics and logs
    connected: bool

    async def open(self) -> None: ...

    def publish(self, rec: stream.Record, settle: Settle) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...


def _packets(frames: Frames) -> int:
    """The header's packet count, or 0 for a message too short to have one."""
    try:
        header = frames[1]
        return _COUNT.unpack_from(header.buffer if isinstance(header, zmq.Frame) else header, 8)[0]
    except (IndexError, struct.error, TypeError):
        return 0


def _is_mark(frames: Frames) -> bool:
    """A sequence mark: a feed message of no packets (``docs/wire-format.md``)."""
    return len(frames) == 4 and len(frames[1]) >= 40 and not len(frames[2]) and _packets(frames) == 0


class StreamPublisher:
    """Messages from the relay thread (``offer``) to the engine (a ``Driver``), see the module doc.

    ``start(timeout)`` opens the driver in the publisher's thread and raises its error;
    ``close(timeout)`` waits up to ``timeout`` seconds for what is buffered, then drops the rest
    (reason ``shutdown``). The counters are plain ints read by ``StreamCollector``.
    """

    def __init__(self, driver: Driver, *, partitions: int, max_in_flight: int, buffer_bytes: int):
        self.driver = driver
        self.partitions = partitions
        self.max_in_flight = max_in_flight
        self.buffer_bytes = buffer_bytes
        self._queue: collections.deque[tuple[Frames, int]] = collections.deque()
        self._lock = threading.Lock()
        self.held_bytes = 0  # queued + in flight
        self.held_messages = 0
        self.in_flight = 0
        self.messages = 0  # offered
        self.published = 0  # acked by the engine (duplicates included)
        self.duplicates = 0  # acked as a duplicate of one stored before (a retry that had landed)
        self.errors = 0  # failed attempts (each retried)
        self.retries = 0
        self.malformed = 0  # messages without a version-1 header: never published
        self.dropped_messages: collections.Counter[str] = collections.Counter()  # reason -> n
        self.dropped_packets: collections.Counter[str] = collections.Counter()
        self._dropping = 0  # messages dropped in this buffer-full episode
        self._dropping_packets = 0
        self._failing = False  # a publish error was logged; the next ones only counted
        self._idle = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._closed = False  # the publisher thread is ending: failures are drops, not retries
        self._waiting: dict[int, tuple] = {}  # id(record) -> (timer, record, size): retries due
        self._flushing: asyncio.Future | None = None  # the flush of retries
        self._room: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._done = threading.Event()
        self._done_logged = False
        self._rejects = Episodes(log)  # refusals: one warning per episode, then debug
        self._window_start = time.monotonic()
        self._window_bytes = 0
        #: Bytes per second offered over the last RATE_WINDOW_S.
        self.rate = 0.0
        self._short = Episodes(log, quiet_s=60.0)  # buffer_bytes short of a failover at this rate

    # -- relay thread ----------------------------------------------------------------------

    def start(self, timeout: float) -> None:
        self._thread = threading.Thread(target=self._run, name="nflogd-stream", daemon=True)
        self._thread.start()
        try:
            self._ready.result(timeout + 5)
        except concurrent.futures.TimeoutError:
            raise NflogdError(
                f"jetstream: the stream {self.driver.name} was not ready in {timeout:g} s"
            ) from None

    def offer(self, frames: Frames) -> None:
        """Take one message (its frames, as received) or drop it: never blocks."""
        size = 0
        for f in frames:
            size += len(f)
        self.messages += 1
        self._window_bytes += size
        now = time.monotonic()
        if now - self._window_start >= RATE_WINDOW_S:
            self._measure(now)
        with self._lock:
            held = self.held_bytes + size
            fits = held <= self.buffer_bytes
            # a sequence mark (no packets) still fits a full buffer, within MARK_SLACK_BYTES: it
            # is what tells readers where the sequence ended after the drops
            mark = not fits and held <= self.buffer_bytes + MARK_SLACK_BYTES and _is_mark(frames)
            if fits or mark:
                self.held_bytes = held
                self.held_messages += 1
        if not (fits or mark):
            self._drop(frames)
            return
        if self._dropping and not mark:
            log.warning(
                "jetstream %s: buffer has room again; %d messages (%d packets) were dropped",
                self.driver.name,
                self._dropping,
                self._dropping_packets,
            )
            self._dropping = self._dropping_packets = 0
        self._queue.append((frames, size))
        if self._idle and self._loop is not None:
            self._idle = False
            try:
                self._loop.call_soon_threadsafe(self._wake.set)  # type: ignore[union-attr]
            except RuntimeError:  # the publisher thread has ended: the buffer fills, then drops
                if not self._done_logged:
                    self._done_logged = True
                    log.error(
                        "jetstream %s: the publisher has stopped; messages are dropped", self.driver.name
                    )

    def _measure(self, now: float) -> None:
        """The offered rate over the window that ended; a warning (once an episode) when
        ``buffer_bytes`` would not hold a leader failover's worth of it."""
        self.rate = self._window_bytes / (now - self._window_start)
        self._window_start, self._window_bytes = now, 0
        if self.rate * FAILOVER_S > self.buffer_bytes:
            self._short.hit(
                "jetstream %s: buffer_bytes %d holds %.1f s of the feed at its rate now (%.0f bytes/s);"
                " a leader failover stalls publishing for up to %g s: messages would be dropped."
                " Give buffer_bytes at least %d (docs/jetstream.md, sizing)",
                self.driver.name,
                self.buffer_bytes,
                self.buffer_bytes / self.rate,
                self.rate,
                FAILOVER_S,
                int(self.rate * FAILOVER_S * 1.25),
            )

    def _drop(self, frames: Frames) -> None:
        n = _packets(frames)
        self.dropped_messages["buffer"] += 1
        self.dropped_packets["buffer"] += n
        if not self._dropping:
            log.warning(
                "jetstream %s: buffer full (%d bytes held, %d publishes in flight): dropping messages"
                " until the stream catches up (counted in nflogd_relay_stream_dropped_packets_total)",
                self.driver.name,
                self.held_bytes,
                self.in_flight,
            )
        self._dropping += 1
        self._dropping_packets += n

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is buffered for up to ``timeout`` s, drop the rest, stop the thread."""
        loop = self._loop
        if self._thread is None or loop is None or self._done.is_set():
            if self._thread is not None:
                self._thread.join(timeout)
            return
        self._stop_deadline = time.monotonic() + timeout
        try:
            loop.call_soon_threadsafe(self._begin_stop)
        except RuntimeError:  # the loop is gone already
            pass
        self._thread.join(timeout + 5)

    @property
    def connected(self) -> bool:
        return bool(getattr(self.driver, "connected", False))

    # -- publisher thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        finally:
            self._done.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        try:
            await self.driver.open()
        except BaseException as e:
            try:
                await self.driver.close()
            except Exception:  # pragma: no cover - closing what failed to open
                pass
            self._ready.set_exception(e if isinstance(e, NflogdError) else NflogdError(f"jetstream: {e!r}"))
            return
        self._ready.set_result(None)
        try:
            await self._pump()
        finally:
            self._closed = True
            before = self.dropped_messages["shutdown"], self.dropped_packets["shutdown"]
            while self._queue:
                frames, size = self._queue.popleft()
                self._dropped_at_stop(frames, size)
            await self.driver.close()  # fails the publishes awaiting an ack: counted as shutdown
            for handle, rec, size in list(self._waiting.values()):
                handle.cancel()
                self._count_drop("shutdown", rec.count)
                self._release(size)
            self._waiting.clear()
            await asyncio.sleep(0)  # the acks failed by close() are counted
            messages = self.dropped_messages["shutdown"] - before[0]
            if messages:
                log.warning(
                    "jetstream %s: stopped with %d packets not published (%d messages; counted in"
                    ' nflogd_relay_stream_dropped_packets_total{reason="shutdown"})',
                    self.driver.name,
                    self.dropped_packets["shutdown"] - before[1],
                    messages,
                )

    def _begin_stop(self) -> None:
        self._stopping = True
        self._wake.set()  # type: ignore[union-attr]

    async def _pump(self) -> None:
        """Queue -> driver, up to max_in_flight at once, each turn's publishes flushed together;
        acks and failures come back as callbacks (``_outcome``), retries as timers: no task or
        future per message."""
        queue = self._queue
        wake = self._wake
        assert wake is not None
        partitions = self.partitions
        record, driver = stream.record, self.driver
        steady = False  # the last turn published: more are likely on their way
        while True:
            if self._stopping:
                remaining = self._stop_deadline - time.monotonic()
                if (not queue and not self.in_flight) or remaining <= 0:
                    return
                if not queue or self.in_flight >= self.max_in_flight:
                    await self._wait_room(min(remaining, 0.05))
                    continue
            if not queue and steady:
                # Messages keep coming: hold this thread's loop for a gathering's time (the
                # acks of the last publishes wait in the socket meanwhile, and offer() does not
                # wake it), then read the acks and take the messages that came in one wake-up,
                # where an ack read, an offer's wake-up and a timer would be three
                steady = False
                await asyncio.sleep(0)  # nats-py's flusher writes the last publishes first
                time.sleep(GATHER_S)
                for _ in range(READ_TURNS):  # what came meanwhile read before anything is written
                    await asyncio.sleep(0)
                continue
            if not queue:
                self._idle = True
                if queue:  # offered between the check and the flag
                    self._idle = False
                    continue
                await wake.wait()
                wake.clear()
                # Let a few messages gather: at a steady few thousand messages/s, a wake-up,
                # a write and an ack read per message cost five times the publish itself
                await asyncio.sleep(GATHER_S)
                continue
            if self.in_flight >= self.max_in_flight:
                await self._wait_room(None)
                continue
            for _ in range(min(len(queue), self.max_in_flight - self.in_flight)):
                frames, size = queue.popleft()
                self.in_flight += 1  # _release takes it off again
                try:
                    rec = record(frames, partitions)
                except WireError as e:
                    self._release(size)
                    self.malformed += 1
                    if self.malformed == 1:
                        log.warning(
                            "jetstream %s: skipped a message that is not a feed batch: %s", driver.name, e
                        )
                    continue
                self._publish(rec, size, RETRY_S)
            await driver.flush()
            steady = not self._stopping

    async def _wait_room(self, timeout: float | None) -> None:
        room = self._room
        assert room is not None, "the publisher thread makes it first"
        room.clear()
        try:
            await asyncio.wait_for(room.wait(), timeout)
        except asyncio.TimeoutError:
            pass

    def _publish(self, rec: stream.Record, size: int, delay: float) -> None:
        """One attempt (``in_flight`` counts it already), sent at the next ``driver.flush()``;
        the outcome in ``_outcome``."""
        try:
            self.driver.publish(rec, lambda exc, dup: self._outcome(rec, size, delay, exc, dup))
        except (Transient, Rejected) as e:
            self._outcome(rec, size, delay, e, False)

    def _outcome(
        self, rec: stream.Record, size: int, delay: float, exc: BaseException | None, dup: bool
    ) -> None:
        if exc is None:
            self.published += 1
            if dup:
                self.duplicates += 1
            if self._failing:
                self._failing = False
                log.info("jetstream %s: publishing again", self.driver.name)
            self._release(size)
        elif isinstance(exc, Transient):
            self.errors += 1
            if not self._failing:
                self._failing = True
                log.warning("jetstream %s: publish failed: %s; retrying", self.driver.name, exc)
            if self._stopping and time.monotonic() >= self._stop_deadline or self._closed:
                self._count_drop("shutdown", rec.count)
                self._release(size)
                return
            self.retries += 1
            loop = self._loop
            assert loop is not None
            handle = loop.call_later(delay, self._retry, rec, size, min(delay * 2, RETRY_MAX_S))
            self._waiting[id(rec)] = (handle, rec, size)
        elif isinstance(exc, Rejected):
            self._count_drop("rejected", rec.count)
            self._rejects.hit("jetstream %s: %s refused: %s; dropped", self.driver.name, rec.msg_id, exc)
            self._release(size)
        else:  # cancelled, or a driver bug: never silent
            self._count_drop("shutdown" if self._closed else "rejected", rec.count)
            log.warning("jetstream %s: %s: %r; dropped", self.driver.name, rec.msg_id, exc)
            self._release(size)

    def _retry(self, rec: stream.Record, size: int, delay: float) -> None:
        self._waiting.pop(id(rec), None)
        if self._closed:
            self._count_drop("shutdown", rec.count)
            self._release(size)
            return
        self._publish(rec, size, delay)
        if self._flushing is None or self._flushing.done():  # one flush for the retries due together
            self._flushing = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(0)
        await self.driver.flush()

    def _release(self, size: int) -> None:
        """A message leaves the buffer (acked or dropped); ``in_flight`` counts it no more."""
        with self._lock:
            self.held_bytes -= size
            self.held_messages -= 1
        if self.in_flight:
            self.in_flight -= 1
        self._room.set()  # type: ignore[union-attr]

    def _count_drop(self, reason: str, packets: int) -> None:
        self.dropped_messages[reason] += 1
        self.dropped_packets[reason] += packets

    def _dropped_at_stop(self, frames: Frames, size: int) -> None:
        self._count_drop("shutdown", _packets(frames))
        with self._lock:
            self.held_bytes -= size
            self.held_messages -= 1


_DROP_REASONS = ("buffer", "rejected", "shutdown")


class StreamCollector(_Collector):
    """The stream publisher's metrics, label ``stream`` (the stream's name), read on each scrape.

    ==================================================  ==========================================
    ``nflogd_relay_stream_messages_total``              messages handed to the publisher
    ``nflogd_relay_stream_published_total``             acked by the engine (duplicates included)
    ``nflogd_relay_stream_duplicates_total``            acked as already stored (a retry that landed)
    ``nflogd_relay_stream_errors_total``                failed publish attempts (each retried)
    ``nflogd_relay_stream_retries_total``               retries
    ``nflogd_relay_stream_dropped_messages_total{reason}``  buffer (full), rejected, shutdown
    ``nflogd_relay_stream_dropped_packets_total{reason}``   the packets in them: readers see these as loss
    ``nflogd_relay_stream_buffered_messages``           held: queued and in flight
    ``nflogd_relay_stream_buffered_bytes``              their bytes (at most buffer_bytes)
    ``nflogd_relay_stream_in_flight``                   publishes awaiting their ack
    ``nflogd_relay_stream_connected``                   1 while connected to the engine
    ==================================================  ==========================================
    """

    _COUNTERS = (
        ("nflogd_relay_stream_messages", "Messages handed to the stream publisher.", "messages"),
        ("nflogd_relay_stream_published", "Messages the stream engine acked.", "published"),
        ("nflogd_relay_stream_duplicates", "Acks for messages already stored (retries).", "duplicates"),
        ("nflogd_relay_stream_errors", "Failed publish attempts, each retried.", "errors"),
        ("nflogd_relay_stream_retries", "Publish retries.", "retries"),
    )
    _GAUGES = (
        ("nflogd_relay_stream_buffered_messages", "Messages held: queued and in flight.", "held_messages"),
        ("nflogd_relay_stream_buffered_bytes", "Bytes of the messages held.", "held_bytes"),
        ("nflogd_relay_stream_in_flight", "Publishes awaiting their ack.", "in_flight"),
        ("nflogd_relay_stream_connected", "1 while connected to the stream engine.", "connected"),
    )

    def __init__(self, publisher: StreamPublisher, registry: CollectorRegistry | None = None) -> None:
        self._pub = publisher
        if registry is not None:
            registry.register(self)

    def _families(
        self,
    ) -> tuple[list[CounterMetricFamily], list[GaugeMetricFamily], list[CounterMetricFamily]]:
        label = ["stream"]
        counters = [CounterMetricFamily(n, d, labels=label) for n, d, _ in self._COUNTERS]
        gauges = [GaugeMetricFamily(n, d, labels=label) for n, d, _ in self._GAUGES]
        drops = [
            CounterMetricFamily(
                "nflogd_relay_stream_dropped_messages",
                "Messages dropped, by reason.",
                labels=["stream", "reason"],
            ),
            CounterMetricFamily(
                "nflogd_relay_stream_dropped_packets",
                "Packets in the messages dropped, by reason.",
                labels=["stream", "reason"],
            ),
        ]
        return counters, gauges, drops

    def describe(self) -> list[Metric]:
        counters, gauges, drops = self._families()
        return [*counters, *gauges, *drops]

    def collect(self) -> list[Metric]:
        counters, gauges, drops = self._families()
        pub = self._pub
        name = [pub.driver.name]
        try:
            for fam, (_, _, attr) in zip(counters, self._COUNTERS):
                fam.add_metric(name, getattr(pub, attr))
            for gauge, (_, _, attr) in zip(gauges, self._GAUGES):
                gauge.add_metric(name, int(getattr(pub, attr)))
            for reason in _DROP_REASONS:
                drops[0].add_metric([*name, reason], pub.dropped_messages[reason])
                drops[1].add_metric([*name, reason], pub.dropped_packets[reason])
        except Exception as e:  # a scrape must never fail
            log.debug("metrics: reading the stream publisher failed: %r", e)
        return [*counters, *gauges, *drops]
