"""Reading the feed from a NATS JetStream stream that ``nflogd-relay`` fills (``docs/jetstream.md``).

The Subscriber's API and accounting, from a stream instead of a live socket::

    from nflogd_client.jetstream import JetStreamSubscriber

    # live, like Subscriber: what is published from now on
    with JetStreamSubscriber("nats://127.0.0.1:4222/NFLOG", groups=[5]) as sub:
        pkt = sub.recv(timeout=1.0)           # nflogd_client.Packet, or None
        sub.lost, sub.total_lost, sub.restarts, sub.kernel_dropped

    # replay: start="all", a stream sequence (int), or a time (datetime, or float seconds)
    JetStreamSubscriber("nats://127.0.0.1:4222/NFLOG", start="all")

    # a consumer group: worker i of N; together they see every packet once, each resumes where
    # the group left off after a restart (durable consumers in the server)
    JetStreamSubscriber("nats://h1:4222,h2:4222/NFLOG", durable="ids", workers=2, worker=0)

The same as one endpoint string (``nflog-tap -e``, ``ZMQNFLOGSocket(endpoint=...)``)::

    nats://HOST:PORT[,HOST:PORT...]/STREAM?durable=NAME&workers=N&worker=I&start=all|new|SEQ|TIME

where TIME is ISO 8601 (``2026-12-01T20:00:00Z``) and SEQ a stream sequence number.

Consumer groups: the relay spreads (node, group)s over the stream's partitions (subjects
``<prefix>.<partition>.>``); worker ``i`` of ``N`` reads partitions ``k`` with ``k % N == i``,
each through the durable consumer ``<durable>-<k>``. A (node, group) is thus read by one worker
only, in stream order, and each worker's loss accounting is exact: no false loss from the split.
The partitions' consumers outlive the workers, so ``N`` may change between runs.

Accounting: as ``Subscriber`` (gaps in a (node, group)'s ``seq``, restarts, ``kernel_dropped``,
sequence marks), in packets, whatever order the stream holds the messages in: a message that
comes after a later one of its (node, group) (a relay retry that landed late, a message given
back by a reader that closed) is delivered, and fills the gap it left, or lies before where
this reader began; only packets delivered before (a redelivery) are skipped, counted in
``duplicates`` (packets) and ``duplicate_messages``. A message is acked once
``recv()``/``recv_batch()`` hands its first packet over; messages fetched but not yet handed
over are given back (nak) at ``close()``, the fetch under way included, so the next reader of
the consumer gets them at once.

nats-py is an optional dependency: ``pip install 'nflogd-client[jetstream]'``. The client runs
nats-py's asyncio loop in a thread of its own; the Subscriber API stays synchronous.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import datetime as _dt
import logging
import queue
import re
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeGuard, Union
from urllib.parse import parse_qs

from . import stream, wire
from .subscriber import _BatchCursor, _topics
from .wire import Batch, Packet, WireError

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js import JetStreamContext
    from nats.js.api import DeliverPolicy

__all__ = ["JetStreamSubscriber", "is_jetstream_endpoint", "parse_endpoint", "nats_connect", "DEFAULT_STREAM"]

#: Where a new consumer begins: "all", "new", a stream sequence, a time (datetime or epoch seconds).
Start = Union[str, int, float, _dt.datetime]

log = logging.getLogger(__name__)

DEFAULT_STREAM = "NFLOG"
#: Messages fetched per request to one consumer, and how long one request waits for them.
FETCH_BATCH = 64
FETCH_TIMEOUT_S = 0.5
#: Seconds close() waits after the last fetch for a message the server sent it late.
LATE_S = 0.1
#: Gaps remembered per run of a (node, group) so that a late message can fill one; runs
#: (daemon epochs) remembered per (node, group).
MAX_GAPS = 256
_EPOCHS_KEPT = 4
_PARTITION_SUBJECT = re.compile(r"(.+)\.(\d+)\.>\Z")


def is_jetstream_endpoint(endpoint: object) -> TypeGuard[str]:
    """True for a ``nats://`` (or ``tls://``) endpoint string."""
    return isinstance(endpoint, str) and endpoint.startswith(("nats://", "tls://"))


def parse_endpoint(endpoint: str) -> dict[str, Any]:
    """``nats://h1:4222,h2:4222/STREAM?durable=..`` -> keyword arguments of JetStreamSubscriber.

    Raises ValueError naming the endpoint and the part that is wrong.
    """
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("nats", "tls"):
        raise ValueError(f"{endpoint!r}: not a nats:// endpoint")
    where, _, query = rest.partition("?")
    hosts, _, name = where.partition("/")
    if not hosts:
        raise ValueError(f"{endpoint!r}: no HOST:PORT")
    servers = [f"{scheme}://{h}" for h in hosts.split(",") if h]
    out: dict[str, Any] = {"servers": servers, "stream": name or DEFAULT_STREAM}
    for key, values in parse_qs(query, keep_blank_values=True, strict_parsing=False).items():
        value = values[-1]
        if key == "durable":
            out["durable"] = value
        elif key in ("workers", "worker"):
            if not value.isdigit():
                raise ValueError(f"{endpoint!r}: {key} must be an integer, got {value!r}")
            out[key] = int(value)
        elif key == "start":
            out["start"] = _parse_start(value, endpoint)
        else:
            raise ValueError(
                f"{endpoint!r}: unknown option {key!r}; expected durable, workers, worker, start"
            )
    return out


def _parse_start(value: str, where: str) -> Start:
    if value in ("all", "new"):
        return value
    if value.isdigit():
        return int(value)
    try:
        return _dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{where!r}: start must be all, new, a stream sequence or an ISO 8601 time, got {value!r}"
        ) from None


def _deliver(start: Start) -> tuple[DeliverPolicy, int | None, _dt.datetime | None]:
    """(deliver_policy, opt_start_seq, opt_start_time) for ``start``."""
    from nats.js.api import DeliverPolicy

    if start == "all":
        return DeliverPolicy.ALL, None, None
    if start == "new":
        return DeliverPolicy.NEW, None, None
    if isinstance(start, bool):
        raise TypeError(f"start: expected all, new, a stream sequence, a time; got {start!r}")
    if isinstance(start, int):
        if start < 1:
            raise ValueError(f"start: stream sequences start at 1, got {start}")
        return DeliverPolicy.BY_START_SEQUENCE, start, None
    if isinstance(start, float):
        start = _dt.datetime.fromtimestamp(start, _dt.timezone.utc)
    if isinstance(start, _dt.datetime):
        if start.tzinfo is None:
            start = start.astimezone()
        return DeliverPolicy.BY_START_TIME, None, start.astimezone(_dt.timezone.utc)
    raise TypeError(f"start: expected all, new, a stream sequence, a time; got {start!r}")


async def nats_connect(servers: list[str], name: str, timeout: float, **callbacks: Any) -> Any:
    """A NATS connection as the reader and the relay keep one: reconnecting forever, every
    0.5 s; the first connection within ``timeout`` s (``asyncio.TimeoutError`` if not).
    ``callbacks``: nats-py's (``error_cb``, ``disconnected_cb``, ...)."""
    import nats

    return await asyncio.wait_for(
        nats.connect(
            servers=servers,
            name=name,
            connect_timeout=max(1, int(timeout)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            **callbacks,
        ),
        timeout,
    )


class _Range:
    """What a reader holds of one run (epoch) of one (node, group): the packets received as
    sorted, merged ``spans`` [a, b); ``floor``, where its loss accounting begins (the first
    message's ``first_seq``, or 0 for a run that followed one seen: a restart); ``end``, the
    highest sequence number known to be sent (a message's end, or a sequence mark); and
    ``covered``, the packets received in [floor, end). Its loss is ``end - floor - covered``."""

    __slots__ = ("floor", "end", "covered", "spans")

    def __init__(self, floor: int):
        self.floor = floor
        self.end = floor
        self.covered = 0
        self.spans: list[list[int]] = []

    @property
    def lost(self) -> int:
        return self.end - self.floor - self.covered

    def add(self, first: int, nxt: int) -> bool:
        """Packets [first, nxt) received (none: a sequence mark); False if every one of them
        was received before (a redelivery), and then nothing changes."""
        spans = self.spans
        if nxt > first:
            seen = 0
            for a, b in spans:
                if a < nxt and first < b:
                    seen += min(b, nxt) - max(a, first)
            if seen == nxt - first:
                return False
            lo, hi = max(first, self.floor), max(nxt, self.floor)
            above = 0  # received before within [lo, hi)
            for a, b in spans:
                if a < hi and lo < b:
                    above += min(b, hi) - max(a, lo)
            self.covered += hi - lo - above
            # merge [first, nxt) into the spans
            i = bisect.bisect_left(spans, [first])
            if i and spans[i - 1][1] >= first:
                i -= 1
            j = i
            a, b = first, nxt
            while j < len(spans) and spans[j][0] <= b:
                a, b = min(a, spans[j][0]), max(b, spans[j][1])
                j += 1
            spans[i:j] = [[a, b]]
            if len(spans) > MAX_GAPS:  # the oldest gap forgotten: its loss stays counted
                spans[0:2] = [[spans[0][0], spans[1][1]]]
        if nxt > self.end:
            self.end = nxt
        return True


class _Account:
    """Loss, restarts and duplicates per (node, group), in packets, whatever order the stream
    holds the messages in (module doc)."""

    def __init__(self, max_nodes: int = 4096):
        self.lost: dict[tuple[str, int], int] = {}
        self.kernel_dropped: dict[tuple[str, int], int] = {}
        self.restarts = 0
        self.duplicates = 0  # packets
        self.duplicate_messages = 0
        self.received = 0
        self.max_nodes = max_nodes
        self.evicted = 0  # nodes forgotten for max_nodes; their loss stays in evicted_lost
        self.evicted_lost = 0
        self._runs: dict[tuple[str, int], dict[int, _Range]] = {}  # key -> {epoch: its range}
        #: node -> latest epoch, ordered by when each node was last heard from (oldest first)
        self._epochs: dict[str, int] = {}
        self._groups_of: dict[str, set[int]] = {}

    def take(self, batch: Batch) -> bool:
        """Account one batch; False for a duplicate, to be skipped."""
        node, epoch = batch.node, batch.epoch
        key = (node, batch.group)
        if node not in self._epochs and len(self._epochs) >= self.max_nodes:
            self._evict(next(iter(self._epochs)))
        runs = self._runs.get(key)
        if runs is None:
            self._groups_of.setdefault(node, set()).add(batch.group)
            self.lost.setdefault(key, 0)
            runs = self._runs[key] = {}
        run = runs.get(epoch)
        if run is None:
            # a run after one seen of this (node, group) (a restart) is accounted from 0; the
            # first, or one older than a run seen (its late messages), from this message on
            restart = bool(runs) and epoch > max(runs)
            run = runs[epoch] = _Range(0 if restart else batch.first_seq)
            if len(runs) > _EPOCHS_KEPT:
                del runs[min(runs)]  # its loss stays counted
        before = run.lost
        if not run.add(batch.first_seq, batch.next_seq):
            self.duplicates += len(batch.packets)
            self.duplicate_messages += 1
            return False
        self.lost[key] += run.lost - before
        latest = self._epochs.pop(node, epoch)  # re-inserted: now the node heard from last
        if latest < epoch:
            self.restarts += 1
        self._epochs[node] = max(epoch, latest)
        if epoch >= max(runs):
            self.kernel_dropped[key] = batch.kernel_dropped
        self.received += len(batch.packets)
        return True

    def _evict(self, node: str) -> None:
        """Forget the node heard from longest ago (a rogue publisher could invent any number)."""
        del self._epochs[node]
        self.evicted += 1
        for group in self._groups_of.pop(node, ()):
            key = (node, group)
            self._runs.pop(key, None)
            self.kernel_dropped.pop(key, None)
            self.evicted_lost += self.lost.pop(key, 0)


async def _undelivered(sub: Any) -> list[Msg]:
    """The messages a pull subscription holds that no fetch returned (the server filled a pull
    request after the fetch had given up on it): nats-py keeps them for the next fetch."""
    inner = getattr(sub, "_sub", None)  # nats-py's Subscription behind the PullSubscription
    out: list[Msg] = []
    if inner is None:  # pragma: no cover - another nats-py: they come back after ack_wait
        return out
    while True:
        try:
            m = await inner.next_msg(timeout=0.001)
        except Exception:  # none left (a timeout), or the subscription is gone
            return out
        if not (m.headers and m.headers.get("Status")) and m.reply:  # not a status message
            out.append(m)


class JetStreamSubscriber(_BatchCursor):
    """Packets from a JetStream stream of the feed, with ``Subscriber``'s accounting (module doc).

    ``servers``: a ``nats://`` endpoint as the module docstring writes it, or a list of
    ``nats://HOST:PORT`` servers (then ``stream`` names the stream). ``groups``: as Subscriber's
    (filtered here: the stream holds every group). ``durable``: the consumer group's name, or None
    for an ephemeral reader; ``workers``/``worker``: this reader's share of the group. ``start``:
    where a new consumer begins (a durable consumer that exists resumes where it stopped).
    ``prefetch``: messages fetched ahead of ``recv()``. ``ack_wait_s``: seconds before the server
    delivers an unacked message again. ``timeout``: seconds to connect and set up the consumers.
    ``max_nodes``: nodes whose accounting is kept; past it the node heard from longest ago is
    forgotten (counted in ``evicted``, its loss kept in ``total_lost``).
    Errors in the arguments raise ValueError or TypeError; an unreachable server or a missing
    stream raises ``ConnectionError`` naming it.
    """

    def __init__(
        self,
        servers: str | Iterable[str],
        groups: int | Iterable[int] | None = None,
        *,
        stream: str | None = None,
        durable: str | None = None,
        workers: int | None = None,
        worker: int | None = None,
        start: Start | None = None,
        prefetch: int = 1024,
        ack_wait_s: float = 30.0,
        max_nodes: int = 4096,
        timeout: float = 10.0,
    ) -> None:
        try:
            import nats  # noqa: F401  (used in the reader's own thread)
        except ImportError as e:
            need = "JetStreamSubscriber needs nats-py: pip install 'nflogd-client[jetstream]'"
            raise ImportError(need) from e
        opts: dict[str, Any] = {}
        if isinstance(servers, str):
            opts = parse_endpoint(servers) if is_jetstream_endpoint(servers) else {"servers": [servers]}
        else:
            opts = {"servers": list(servers)}
        given = {"stream": stream, "durable": durable, "workers": workers, "worker": worker, "start": start}
        opts.update({k: v for k, v in given.items() if v is not None})
        self.servers: list[str] = opts["servers"]
        self.endpoints: list[str] = self.servers
        self.stream: str = opts.get("stream", DEFAULT_STREAM)
        self.durable: str | None = opts.get("durable") or None
        self.workers: int = opts.get("workers", 1)
        self.worker: int = opts.get("worker", 0)
        self.start: Start = opts.get("start", "new")
        if not 1 <= self.workers or not 0 <= self.worker < self.workers:
            raise ValueError(f"worker: must be 0..workers-1 (workers={self.workers}), got {self.worker}")
        if self.workers > 1 and self.durable is None:
            raise ValueError("workers: a consumer group needs durable=NAME")
        if self.durable is not None and not re.fullmatch(r"[A-Za-z0-9_-]{1,200}", self.durable):
            raise ValueError(f"durable: must be 1..200 of A-Z a-z 0-9 _ -, got {self.durable!r}")
        _deliver(self.start)  # check it before connecting
        self._topics = None if groups is None else {wire.TOPIC.unpack(t)[0] for t in _topics(groups)}
        self._prefetch = prefetch
        self._ack_wait = ack_wait_s
        self._acct = _Account(max_nodes)
        #: Messages skipped as not decodable.
        self.malformed = 0
        #: The stream sequence of the last message handed over (resume or replay from here).
        self.last_stream_seq: int | None = None
        #: The partitions this reader consumes (``None`` for an ephemeral reader: all).
        self.partitions: list[int] | None = None
        self._q: queue.Queue[Msg | None] = queue.Queue()
        self._batch: Batch | None = None
        self._index = 0
        self._acks: collections.deque[Msg] = collections.deque()  # appended here, drained by the loop
        self._ack_scheduled = False
        self._closed = False
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        ready: queue.Queue[BaseException | None] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(ready, timeout), name="nflogd-jetstream", daemon=True
        )
        self._thread.start()
        try:
            err = ready.get(timeout=timeout + 5)
        except queue.Empty:
            err = ConnectionError(f"{self._where()}: not ready within {timeout:g} s")
        if err is not None:
            self._closed = True
            self._thread.join(5)
            raise err

    # -- accounting, as Subscriber's ----------------------------------------------------------

    @property
    def lost(self) -> dict[tuple[str, int], int]:
        """{(node, group): packets lost}"""
        return self._acct.lost

    @property
    def kernel_dropped(self) -> dict[tuple[str, int], int]:
        return self._acct.kernel_dropped

    @property
    def restarts(self) -> int:
        return self._acct.restarts

    @property
    def received(self) -> int:
        return self._acct.received

    @property
    def duplicates(self) -> int:
        """Packets delivered before (a redelivery, a retried publish stored twice), skipped."""
        return self._acct.duplicates

    @property
    def duplicate_messages(self) -> int:
        """The messages that held them."""
        return self._acct.duplicate_messages

    @property
    def total_lost(self) -> int:
        """Packets lost, over every (node, group), forgotten nodes' included."""
        return sum(self._acct.lost.values()) + self._acct.evicted_lost

    @property
    def evicted(self) -> int:
        """nodes forgotten for max_nodes"""
        return self._acct.evicted

    def _where(self) -> str:
        return f"{','.join(self.servers)}/{self.stream}"

    # -- receiving ---------------------------------------------------------------------------

    def queued(self) -> int:
        """Messages fetched and waiting for ``recv()`` (for select loops: there is no socket)."""
        return self._q.qsize()

    #: No ZeroMQ socket to poll (``ZMQNFLOGSocket.select`` waits on ``queued()`` instead).
    socket = None

    def __iter__(self) -> Iterator[Packet]:
        while True:
            yield self.recv(None)  # type: ignore[misc]

    def _next_message(self, deadline: float | None) -> Batch | None:
        while True:
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            if self._closed:
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                if wait is None:
                    msg = self._q.get()
                elif wait <= 0:
                    msg = self._q.get_nowait()
                else:
                    msg = self._q.get(timeout=wait)
            except queue.Empty:
                return None
            if msg is None:  # close() woke us
                return None
            self._ack(msg)
            try:
                batch = wire.decode(stream.frames_of(msg.data))
            except WireError as e:
                self.malformed += 1
                if self.malformed == 1:
                    log.warning("%s: skipped a message that is not a version-1 batch: %s", self._where(), e)
                continue
            try:
                self.last_stream_seq = msg.metadata.sequence.stream
            except Exception:  # pragma: no cover - every JetStream message has metadata
                pass
            if self._topics is not None and batch.group not in self._topics:
                continue
            if not self._acct.take(batch):
                continue
            return batch

    # -- the asyncio side ---------------------------------------------------------------------

    def _ack(self, msg: Msg) -> None:
        if self.durable is None:
            return  # ephemeral readers use AckPolicy none
        self._acks.append(msg)
        if not self._ack_scheduled and self._loop is not None:
            self._ack_scheduled = True
            try:
                self._loop.call_soon_threadsafe(self._flush_acks)
            except RuntimeError:  # the loop has stopped
                pass

    def _flush_acks(self) -> None:
        self._ack_scheduled = False
        acks = self._acks
        bg = self._bg
        batch: list[Msg] = []
        while acks:  # the flag is down first: an ack appended after this loop schedules another
            batch.append(acks.popleft())
        if batch:
            t = asyncio.ensure_future(self._ack_all(batch))
            bg.add(t)
            t.add_done_callback(bg.discard)

    def _begin_close(self, left: list[Msg]) -> None:
        """In the loop: what close() took off the queue is to be given back; the fetches end."""
        if self.durable is not None:
            self._give_back += left
        assert self._stopping is not None
        self._stopping.set()

    def _nak(self, msgs: list[Msg]) -> None:
        for m in msgs:
            self._bg.add(asyncio.ensure_future(self._nak_one(m)))

    async def _nak_one(self, msg: Msg) -> None:
        try:
            await msg.nak()
        except Exception as e:  # delivered again after ack_wait instead
            log.debug("nak failed: %r", e)

    async def _ack_all(self, msgs: list[Msg]) -> None:
        for msg in msgs:
            try:
                await msg.ack()
            except Exception as e:  # redelivered later, then skipped as a duplicate
                log.debug("ack failed: %r", e)

    def _run(self, ready: queue.Queue[BaseException | None], timeout: float) -> None:
        try:
            asyncio.run(self._main(ready, timeout))
        except BaseException as e:  # pragma: no cover - reported to recv()
            self._error = e
            ready.put(ConnectionError(f"{self._where()}: {e!r}"))

    async def _main(self, ready: queue.Queue[BaseException | None], timeout: float) -> None:
        import nats
        import nats.errors
        import nats.js.errors

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._bg: set[asyncio.Future[None]] = set()
        self._give_back: list[Msg] = []
        nc = None
        try:
            try:
                nc = await nats_connect(self.servers, "nflogd-client", timeout, error_cb=self._nats_error)
                js = nc.jetstream(timeout=timeout)
                subs = await self._subscribe(js)
            except (ConnectionError, ValueError) as e:  # ours: they name the stream already
                ready.put(e)
                return
            except (asyncio.TimeoutError, nats.errors.Error, OSError) as e:
                why = getattr(e, "description", None) or str(e) or type(e).__name__
                ready.put(ConnectionError(f"{self._where()}: {why}"))
                return
            ready.put(None)
            tasks = [asyncio.ensure_future(self._fetch(s)) for s in subs]
            await self._stopping.wait()
            # No fetch is cut short: each ends its pull request (FETCH_TIMEOUT_S at most), and
            # what it got after close() began is given back with the rest.
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.durable is not None:
                while True:  # what a fetch queued while close() emptied the queue
                    try:
                        m = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if m is not None:
                        self._give_back.append(m)
                # what the server sent as a pull request expired, after the fetch gave up on it
                await asyncio.sleep(LATE_S)
                for s in subs:
                    self._give_back += await _undelivered(s)
                self._nak(self._give_back)
            for s in subs:
                try:
                    await s.unsubscribe()
                except Exception:
                    pass
            self._flush_acks()
            if self._bg:  # the acks and naks still to send
                await asyncio.wait(list(self._bg), timeout=5)
            try:
                await asyncio.wait_for(nc.flush(), 2)
            except Exception:
                pass
        finally:
            if nc is not None:
                try:
                    await asyncio.wait_for(nc.close(), 5)
                except Exception:
                    pass

    async def _nats_error(self, e: Exception) -> None:
        log.debug("%s: %r", self._where(), e)

    async def _subscribe(self, js: JetStreamContext) -> list[JetStreamContext.PullSubscription]:
        import nats.js.errors
        from nats.js.api import AckPolicy, ConsumerConfig

        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            raise ConnectionError(f"{self._where()}: no such stream") from None
        parts = {}
        for subj in info.config.subjects or []:
            m = _PARTITION_SUBJECT.fullmatch(subj)
            if m:
                parts[int(m.group(2))] = m.group(1)
        if not parts:
            raise ConnectionError(f"{self._where()}: not an nflogd stream (subjects {info.config.subjects})")
        prefix = next(iter(parts.values()))
        policy, seq, when = _deliver(self.start)
        common: dict[str, Any] = dict(deliver_policy=policy, opt_start_seq=seq, opt_start_time=when)
        if self.durable is None:
            cfg = ConsumerConfig(ack_policy=AckPolicy.NONE, inactive_threshold=60.0, **common)
            return [await js.pull_subscribe(f"{prefix}.>", stream=self.stream, config=cfg)]
        n = len(parts)
        if self.workers > n:
            raise ValueError(f"workers: the stream {self.stream} has {n} partitions, so at most {n} workers")
        self.partitions = [k for k in sorted(parts) if k % self.workers == self.worker]
        subs = []
        for k in self.partitions:
            cfg = ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait,
                max_ack_pending=max(self._prefetch * 2, 1000),
                **common,
            )
            subs.append(
                await js.pull_subscribe(
                    f"{prefix}.{k}.>", durable=f"{self.durable}-{k}", stream=self.stream, config=cfg
                )
            )
        return subs

    async def _fetch(self, sub: JetStreamContext.PullSubscription) -> None:
        import nats.errors

        q = self._q
        stopping = self._stopping
        assert stopping is not None
        while not stopping.is_set():
            if q.qsize() >= self._prefetch:
                await asyncio.sleep(0.005)
                continue
            try:
                msgs = await sub.fetch(FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a server gone: nats-py reconnects, we try again
                log.debug("%s: fetch: %r", self._where(), e)
                await asyncio.sleep(0.5)
                continue
            if stopping.is_set():  # close() has begun: these go back with the rest
                self._give_back += msgs
                return
            for m in msgs:
                q.put(m)

    # -- lifetime ------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, linger: int = 0) -> None:
        """Ack what was handed over, stop fetching, disconnect (``linger``: as Subscriber's, unused)."""
        if self._closed:
            return
        self._closed = True
        left = []  # fetched, never handed over: back to the server for the next reader, now
        while True:
            try:
                m = self._q.get_nowait()
            except queue.Empty:
                break
            if m is not None:
                left.append(m)
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None:
            try:
                loop.call_soon_threadsafe(self._begin_close, left)
            except RuntimeError:
                pass
        self._q.put(None)
        self._thread.join(10)

    def __enter__(self) -> JetStreamSubscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<JetStreamSubscriber {state} {self._where()} received={self.received}"
            f" lost={self.total_lost} duplicates={self.duplicates} restarts={self.restarts}>"
        )
