"""The raw-record client of the nflogd feed: one ZeroMQ SUB socket, packets out, loss counted.

Use::

    from nflogd_client import Subscriber

    with Subscriber("ipc:///run/nflogd/feed.sock", groups=[5, 6]) as sub:
        for pkt in sub:                       # waits forever; recv(timeout=...) to wait less
            print(pkt.node, pkt.group, pkt.seq, pkt.ts, pkt.len, pkt.prefix, pkt.data[:20])

    sub = Subscriber(["tcp://r1:5555", "tcp://r2:5555"])  # several daemons, all groups, merged
    batch = sub.recv_batch(timeout=1.0)      # seconds; one whole message, or None
    sub.lost, sub.total_lost                  # {(node, group): packets the feed lost}
    sub.kernel_dropped                        # {(node, group): the kernel's own loss, latest}
    sub.restarts, sub.malformed               # daemon (or filter run) restarts, messages skipped
    sub.close()

``endpoints`` defaults to ``$NFLOGD_ENDPOINT`` (one endpoint, or several separated by
commas or whitespace), else ``ipc:///run/nflogd/feed.sock``. ``groups`` subscribes at the
publisher, so other groups never reach this process. ZeroMQ connects in the background and
reconnects by itself when a daemon restarts; nothing here fails while a daemon is away.
(libzmq resends the subscriptions of a reconnected socket when the socket is next used, so
a restarted daemon's first batches reach a client that is waiting in ``recv()``; what the
new run sent before that is counted as lost.)

Loss: every message carries the feed sequence number of its first packet, per (node,
group) and epoch (one run of the daemon). A gap is counted in ``lost``; a new epoch counts
one restart per node and, as lost, the packets the new run sent before this client saw it.
A group gone idle sends its sequence mark (a message of no packets: where its sequence
ended), so the end of a burst this client missed is counted within a couple of seconds;
``recv()`` skips marks, ``recv_batch()`` returns them as batches without packets.
Messages that are not version-1 batches are skipped and counted in ``malformed`` (the
first one is logged as a warning), never raised. Two daemons with the same node name (clones
of one image default to one host name) show as epochs that alternate: that node goes into
``duplicate_nodes`` (one warning), and each run's messages are accounted apart instead of as
restarts and loss. State is kept for ``max_nodes`` nodes (``evicted`` counts those
forgotten). ``docs/wire-format.md`` has the details.

CURVE: a daemon's tcp endpoints are encrypted and admit only the clients whose public key
it holds (``docs/security.md``). Pass the daemon's public key and this client's secret key
file, which ``nflogd-keygen DIR NAME`` writes::

    Subscriber("tcp://r1:5555", server_public_key="/etc/nflogd/curve/r1.key",  # or its Z85 text
               client_secret_key_file="/home/alice/.curve/alice.key_secret")

Every endpoint of the Subscriber then uses CURVE (a daemon's ipc endpoints stay without it).
To merge several daemons, each with its own key, map each endpoint to its daemon's key::

    Subscriber(["tcp://r1:5555", "tcp://r2:5555"],
               server_public_key={"tcp://r1:5555": "/etc/nflogd/curve/r1.key",
                                  "tcp://r2:5555": "/etc/nflogd/curve/r2.key"},
               client_secret_key_file="/home/alice/.curve/alice.key_secret")

A client whose key the daemon does not hold is refused at the handshake and receives
nothing. libzmq gives up on a connection the daemon refused, so the Subscriber counts
``refused`` and connects again every ``AUTH_RETRY_S`` seconds while ``recv()`` waits: once
the operator adds the key and reloads the daemon, the client gets in by itself.

Endpoint state: ``sub.endpoints`` maps each endpoint to an ``EndpointStatus`` (``state``:
``"connecting"``, ``"connected"`` or ``"refused"``; ``error``: why not connected, such as
``"no such socket /run/nflogd/feed.sock (is nflogd running?)"``, ``"permission denied on
/run/nflogd: join group nflog"``, ``"nothing listening on r1:5555 (connection refused)"`` or
``"CURVE handshake failed: wrong server key?"``)::

    for endpoint, st in sub.endpoints.items():
        print(endpoint, st.state, st.error or "")

Each failure is logged once as a warning (logger ``nflogd_client.endpoints``) naming the
endpoint and the cause, within a second of ``recv()`` or ``endpoints`` seeing it; the retries
after it are quiet, and the recovery is logged at info level (``nflogd_client.endpoints``
has the details). A malformed endpoint (``router1:5555``) raises ``ValueError`` at once,
naming it and the accepted forms.

Filters: ``Subscriber(endpoint, groups=[5], filter="udp port 53")`` (libpcap's language) and
NFLOG metadata (``prefix=``, ``prefix_start=``, ``mark=``, ``uid=``, ``gid=``, ``indev=``,
``outdev=``, ``hook=``; or ``filter=Filter(...)``) are run at the daemon, before anything is
sent (``docs/filters.md``): ``filter_state`` is ``"pending"``, then ``"accepted"``; a refusal
raises ``FilterRefused`` from ``recv()``. Through nflogd-relay the filter runs at its
upstream daemons, and on a CURVE endpoint as on any other. With ``filter_at="reader"``, or when no answer came
``FILTER_REPLY_S`` after connecting (a daemon without filters hangs up on it), this process
runs the same filter on what it receives (``filter_state`` ``"reader"``, a warning says why).

To wait on several sockets, register ``sub.socket`` with a ``zmq.Poller``, but call
``recv()`` while ``sub.pending()`` is non-zero first: packets already received do not make
the socket readable. A Subscriber belongs to one thread, like its socket.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, cast

import zmq

from . import curve, wire
from .endpoints import AUTH_RETRY_S, EndpointStatus, EndpointWatch, check_endpoint
from .filters import Filter, FilterRefused, filter_reply, is_reply, make_filter
from .wire import Batch, Packet, WireError

__all__ = ["AUTH_RETRY_S", "DEFAULT_ENDPOINT", "FILTER_REPLY_S", "EndpointStatus", "Subscriber"]

_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # ints: an int & an enum makes an enum, slowly
log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "ipc:///run/nflogd/feed.sock"

#: Seconds from the first connection to wait for the daemon's answer to a filter before
#: running it in this process instead.
FILTER_REPLY_S = 3.0

#: Epochs kept per node: enough to tell a second publisher of the same name from a restart.
_EPOCHS_KEPT = 4


def _endpoints(endpoints: str | Iterable[str] | None) -> list[str]:
    if endpoints is None:
        env = os.environ.get("NFLOGD_ENDPOINT", "").strip()
        result = re.split(r"[\s,]+", env) if env else [DEFAULT_ENDPOINT]
    elif isinstance(endpoints, str):
        result = [endpoints]
    else:
        result = list(endpoints)
    if not result:
        raise ValueError("endpoints: empty list; give at least one, or None for the default")
    for e in result:
        check_endpoint(e)
    return list(dict.fromkeys(result))


def _topics(groups: int | Iterable[int] | None) -> list[bytes]:
    if groups is None:
        return [b""]
    if isinstance(groups, int):
        groups = [groups]
    elif isinstance(groups, (str, bytes)) or not isinstance(groups, Iterable):
        raise TypeError(f"groups: expected an int, an iterable of ints or None, got {groups!r}")
    topics = []
    for g in groups:
        if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g <= 0xFFFF:
            raise ValueError(f"groups: NFLOG groups are integers 0..65535, got {g!r}")
        t = wire.topic(g)
        if t not in topics:
            topics.append(t)
    if not topics:
        raise ValueError("groups: empty; give at least one group, or None for all")
    return topics


def _curve_keys(
    endpoints: list[str],
    server_public_key: curve.PathLike | bytes | Mapping[str, str | bytes] | None,
    client_secret_key_file: curve.PathLike | None,
) -> tuple[dict[str, bytes], bytes, bytes] | None:
    """({endpoint: its daemon's public key}, client public, client secret) in Z85, or None."""
    if server_public_key is None and client_secret_key_file is None:
        return None
    if server_public_key is None:
        raise ValueError("client_secret_key_file: needs server_public_key, the daemon's public key")
    if client_secret_key_file is None:
        raise ValueError(
            "server_public_key: needs client_secret_key_file, this client's NAME.key_secret "
            "(the daemon admits only the clients whose public key it holds)"
        )
    if not zmq.has("curve"):
        raise ValueError("server_public_key: this libzmq was built without CURVE support")
    if isinstance(server_public_key, Mapping):
        missing = [e for e in endpoints if e not in server_public_key]
        if missing:
            raise ValueError(f"server_public_key: no key for {', '.join(missing)}")
        extra = [e for e in server_public_key if e not in endpoints]
        if extra:
            raise ValueError(f"server_public_key: {', '.join(map(repr, extra))}: not one of the endpoints")
        servers = {e: _server_key(f"server_public_key[{e!r}]", server_public_key[e]) for e in endpoints}
    else:
        servers = dict.fromkeys(endpoints, _server_key("server_public_key", server_public_key))
    try:
        public, secret = curve.keypair(client_secret_key_file)
    except curve.KeyFileError as e:
        raise curve.KeyFileError(f"client_secret_key_file: {e}") from None
    return servers, public, secret


def _server_key(what: str, value: curve.PathLike | bytes) -> bytes:
    try:
        return curve.public_key(value)
    except curve.KeyFileError as e:
        raise curve.KeyFileError(f"{what}: {e}") from None


class _BatchCursor:
    """``recv()``, ``recv_batch()`` and ``pending()`` over whole messages, for every reader of
    the feed: a subclass gives ``_next_message(deadline)``, the next decoded and accounted
    message or ``None`` once ``deadline`` (a ``time.monotonic()`` value, ``None``: never)
    has passed, and sets ``_batch = None`` and ``_index = 0`` in its constructor."""

    _batch: Batch | None  # the batch recv() is serving
    _index: int  # its next packet

    def _next_message(self, deadline: float | None) -> Batch | None:
        raise NotImplementedError

    def recv(self, timeout: float | None = None) -> Packet | None:
        """The next packet, or ``None`` after ``timeout`` seconds (``None``: wait forever).

        Packets of a batch already received are returned first, without touching the socket.
        """
        batch = self._batch
        if batch is not None:
            packets = batch.packets
            i = self._index
            if i < len(packets):
                self._index = i + 1
                return packets[i]
            self._batch = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = self._next_message(deadline)
            if batch is None:
                return None
            if batch.packets:
                self._batch = batch
                self._index = 1
                return batch.packets[0]

    def recv_batch(self, timeout: float | None = None) -> Batch | None:
        """One whole message as a ``Batch``, or ``None`` after ``timeout`` seconds.

        If ``recv()`` left part of a batch, that part comes first, as a ``Batch`` whose
        ``first_seq`` is its first packet's. A message may carry no packets.
        """
        batch = self._batch
        if batch is not None:
            self._batch = None
            i = self._index
            if i < len(batch.packets):
                rest = batch.packets[i:]
                return Batch(batch.group, batch.node, batch.epoch, rest[0].seq, batch.kernel_dropped, rest)
        deadline = None if timeout is None else time.monotonic() + timeout
        return self._next_message(deadline)

    def pending(self) -> int:
        """Packets received but not yet returned by ``recv()``."""
        batch = self._batch
        return 0 if batch is None else len(batch.packets) - self._index


class Subscriber(_BatchCursor):
    """Packets from one or more nflogd feeds, with per-(node, group) loss accounting.

    ``endpoints``: a ZeroMQ endpoint or a list of them (``ipc://...``, ``tcp://host:port``);
    ``None`` means ``$NFLOGD_ENDPOINT`` or ``DEFAULT_ENDPOINT``. ``groups``: an NFLOG group,
    several, or ``None`` for all. ``context``: a ``zmq.Context`` (default: the process-wide
    instance). ``rcvhwm``: messages (kernel batches) queued in this process before ZeroMQ
    drops more; the daemon also queues up to its own high-water mark for each subscriber.
    ``server_public_key``: the daemon's public key, a ``.key`` file or its 40 Z85 characters,
    or a mapping from each endpoint to its daemon's key; ``client_secret_key_file``: this
    client's ``NAME.key_secret`` file. Both or neither; with them every connection uses CURVE.
    A key that cannot be read raises ``curve.KeyFileError`` (a ``ValueError``) naming the file.
    ``max_nodes``: nodes whose state is kept (a rogue publisher could invent any number);
    past it, the node heard from longest ago is forgotten and counted in ``evicted``.
    """

    def __init__(
        self,
        endpoints: str | Iterable[str] | None = None,
        groups: int | Iterable[int] | None = None,
        *,
        context: zmq.Context[Any] | None = None,
        rcvhwm: int = 100_000,
        max_nodes: int = 4096,
        server_public_key: str | bytes | os.PathLike[str] | Mapping[str, str | bytes] | None = None,
        client_secret_key_file: str | os.PathLike[str] | None = None,
        filter: str | Filter | None = None,  # noqa: A002 - the name tcpdump users expect
        filter_at: str = "daemon",
        **match: Any,
    ):
        self._endpoints = _endpoints(endpoints)
        topics = _topics(groups)
        keys = _curve_keys(self._endpoints, server_public_key, client_secret_key_file)
        if filter_at not in ("daemon", "reader"):
            raise ValueError(f"filter_at: 'daemon' or 'reader', got {filter_at!r}")
        #: The filter (None: every packet), and where it runs: "pending" (sent to the daemon,
        #: not answered yet), "accepted" (by the daemon), "refused", "reader" (here); "none".
        self.filter = make_filter(filter, match)
        self.filter_state = "reader" if filter_at == "reader" else "pending"
        if self.filter is None:
            self.filter_state = "none"
        self._plain_topics = topics  # the groups' topics: what a reader filtering itself takes
        self._filter_topics: list[bytes] = []
        if self.filter is not None and self.filter_state == "pending":
            # the filter (tagged: a topic of this reader's own, which a relay passes on and
            # answers), then the groups through it: their filtered messages come on these
            f = self.filter
            self._filter_topics = [f.topic(f.new_tag()), *(f.group_topic(t) for t in topics)]
            topics = self._filter_topics
        self._filter_due: float | None = None  # when the answer is late (from the first connection)
        ctx = context if context is not None else zmq.Context.instance()
        #: The SUB socket, for a ``zmq.Poller``.
        self.socket: zmq.Socket[bytes] = ctx.socket(zmq.SUB)
        watch: EndpointWatch | None = None
        self._poller = zmq.Poller()
        self._server_keys: dict[str, bytes] = {}  # endpoint -> its daemon's key (CURVE)
        try:
            self.socket.setsockopt(zmq.RCVHWM, rcvhwm)
            if keys is not None:
                self._server_keys, public, secret = keys
                self.socket.setsockopt(zmq.CURVE_PUBLICKEY, public)
                self.socket.setsockopt(zmq.CURVE_SECRETKEY, secret)
            watch = EndpointWatch(self.socket, self._endpoints, curve=keys is not None, connect=self._connect)
            self._poller.register(self.socket, zmq.POLLIN)
            self._poller.register(watch.monitor, zmq.POLLIN)
            for t in topics:
                self.socket.setsockopt(zmq.SUBSCRIBE, t)
            for e in self._endpoints:
                self._connect(e)
        except BaseException:
            if watch is not None:
                watch.close()
            self.socket.close(linger=0)
            raise
        #: Connection state per endpoint, from libzmq's socket monitor (polled alongside) and probes.
        self._watch = watch
        #: Packets the feed lost, per (node, group), from sequence gaps and restarts.
        self.lost: dict[tuple[str, int], int] = {}
        #: The latest ``kernel_dropped`` header value per (node, group).
        self.kernel_dropped: dict[tuple[str, int], int] = {}
        #: Epoch changes seen, counted once per node (one daemon restart).
        self.restarts = 0
        #: Messages skipped as not decodable.
        self.malformed = 0
        #: Packets decoded: returned, or buffered for ``recv()``.
        self.received = 0
        #: Nodes kept at most; past it the node heard from longest ago is forgotten.
        self.max_nodes = max_nodes
        #: Nodes forgotten for ``max_nodes`` (their loss stays in ``total_lost``).
        self.evicted = 0
        #: Node names two publishers were seen to share (their epochs alternate).
        self.duplicate_nodes: set[str] = set()
        self._evicted_lost = 0
        self._streams: dict[tuple[str, int], dict[int, int]] = {}  # key -> {epoch: next_seq}
        #: node -> its recent epochs (at most _EPOCHS_KEPT, the last one heard last); ordered by
        #: when each node was last heard from, the longest ago first.
        self._epochs: dict[str, list[int]] = {}
        self._groups_of: dict[str, set[int]] = {}  # node -> groups with state
        self._last_restart: dict[str, list[tuple[tuple[str, int], int]]] = {}  # node -> its loss
        self._batch: Batch | None = None  # the batch recv() is serving
        self._index = 0  # its next packet

    # -- receiving ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Packet]:
        """Every packet, forever (``recv(None)``)."""
        while True:
            yield self.recv(None)  # type: ignore[misc]  # never None without a timeout

    def _next_message(self, deadline: float | None) -> Batch | None:
        """Receive until a decodable message arrives (accounted) or the deadline passes."""
        sock = self.socket
        recv, events = sock.recv_multipart, sock.getsockopt
        while True:
            if cast(int, events(_EVENTS)) & _POLLIN:  # while messages flow, no poll and no monitor
                msg = recv(zmq.NOBLOCK)
            else:  # asked without a zmq.Again, which costs three times as much
                waited = self._wait(deadline)
                if waited is None:
                    return None
                msg = waited
            batch = self._take(msg)
            if batch is not None:
                return batch

    def _take(self, msg: list[bytes]) -> Batch | None:
        """Decode and account one message; None if it is malformed (counted). Both drivers'."""
        if self.filter is not None and not self._through_filter(msg):
            return None
        try:
            batch = wire.decode(msg)
        except WireError as e:
            self._malformed(msg, e)
            return None
        self._account(batch)
        if self.filter is not None and self.filter_state == "reader":
            batch.packets = [p for p in batch.packets if self.filter.match(p)]
        return batch

    def _through_filter(self, msg: list[bytes]) -> bool:
        """False for the daemon's reply to the filter (FilterRefused if it refused) and, while
        the daemon filters, for a message sent before it had the filter."""
        if is_reply(msg):
            accepted, why = filter_reply(msg)
            if not accepted:
                self.filter_state = "refused"
                raise FilterRefused(why)
            self.filter_state = "accepted"
            return False
        return self.filter_state == "reader" or bool(wire.header_flags(msg) & wire.FLAG_FILTERED)

    def _wait(self, deadline: float | None) -> list[bytes] | None:
        """One message, keeping the endpoint states meanwhile: the monitor's events as they
        come (it is polled too), probes and reconnects when due; None once the deadline
        passes. A wake-up for a message costs the poll and the read alone."""
        sock, monitor = self.socket, self._watch.monitor
        while True:
            ready = dict(self._poller.poll(self._poll_ms(deadline)))
            if monitor in ready or self._update_due():
                self._update()
            if sock in ready:
                try:
                    return sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:  # pragma: no cover - poll said readable
                    pass
            if deadline is not None and time.monotonic() >= deadline:
                self._update()
                return None

    def _poll_ms(self, deadline: float | None) -> int | None:
        """Milliseconds to wait: until the deadline, an endpoint's next due reconnect or state
        change, or a probe's result, whichever is first; None: no limit. Both drivers'."""
        now = time.monotonic()
        waits = [] if deadline is None else [deadline - now]
        if self._filter_due is not None and self.filter_state == "pending":
            waits.append(self._filter_due - now)
        due = self._watch.due_at()
        if due is not None:
            waits.append(due - now)
        return None if not waits else max(0, int(min(waits) * 1000 + 0.999))

    def _update_due(self) -> bool:
        """A probe, reconnect or saying of the endpoints, or the filter's late answer, is due."""
        now = time.monotonic()
        if self.filter_state == "pending" and (self._filter_due is None or self._filter_due <= now):
            return True  # unset: _filter_late() sets it once the first connection is up
        due = self._watch.due_at()
        return due is not None and due <= now

    def _update(self) -> None:
        """Apply the monitor's events, run the probes and reconnects that are due."""
        self._watch.handle_monitor()
        self._watch.step()
        if self.filter_state == "pending" and self.filter is not None:
            self._filter_late()

    def _filter_late(self) -> None:
        """No answer to the filter ``FILTER_REPLY_S`` after the first connection: run it here."""
        now = time.monotonic()
        if self._filter_due is None:
            if any(st.connects for st in self._watch.tracker.status().values()):
                self._filter_due = now + FILTER_REPLY_S
        elif now >= self._filter_due:
            assert self.filter is not None
            for t in reversed(self._filter_topics):  # the groups through the filter first
                self.socket.setsockopt(zmq.UNSUBSCRIBE, t)
            for t in self._plain_topics:
                self.socket.setsockopt(zmq.SUBSCRIBE, t)
            self.filter_state = "reader"
            log.warning(
                "nflogd feed: no answer to the filter within %g s (a daemon without filters?); "
                "filtering in this process",
                FILTER_REPLY_S,
            )

    @property
    def endpoints(self) -> dict[str, EndpointStatus]:
        """Each endpoint's ``EndpointStatus`` (``state``, ``error``, ``connects``, ...), up to date.

        A copy, in the order the endpoints were given; iterating it gives the endpoints."""
        if not self.socket.closed:
            self._update()
        return self._watch.tracker.status()

    @property
    def refused(self) -> int:
        """Handshakes the daemons refused or that failed (a CURVE key they do not hold, ...)."""
        return sum(st.handshake_failures for st in self._watch.tracker.status().values())

    def _connect(self, endpoint: str) -> None:
        """Connect, with CURVE the endpoint's server key set first: libzmq takes the socket's
        options at connect(), for that connection and its reconnects."""
        key = self._server_keys.get(endpoint)
        if key is not None:
            self.socket.setsockopt(zmq.CURVE_SERVERKEY, key)
        self.socket.connect(endpoint)

    def _malformed(self, msg: list[bytes], err: WireError) -> None:
        self.malformed += 1
        if self.malformed == 1:
            log.warning(
                "nflogd feed: skipped a message that is not a version-%d batch (%d frames: %s);"
                " further ones are only counted in Subscriber.malformed",
                wire.VERSION,
                len(msg),
                err,
            )

    def _account(self, batch: Batch) -> None:
        node = batch.node
        key = (node, batch.group)
        epoch = batch.epoch
        epochs = self._epochs.get(node)
        if epochs is None:
            epochs = self._new_node(node, epoch)
        elif epoch != epochs[-1]:
            epochs = self._other_epoch(node, epochs, epoch)
        groups = self._streams.get(key)
        if groups is None:  # first message of this (node, group): the baseline
            groups = self._streams[key] = {}
            self.lost.setdefault(key, 0)
            self._groups_of[node].add(batch.group)
        expected = groups.get(epoch)
        if expected is None:
            if groups and epoch == max(epochs) and node not in self.duplicate_nodes:
                # a restart: what the new run sent before this message is lost
                self.lost[key] += batch.first_seq
                self._last_restart.setdefault(node, []).append((key, batch.first_seq))
            for old in [e for e in groups if e not in epochs]:
                del groups[old]
        elif batch.first_seq > expected:
            self.lost[key] += batch.first_seq - expected
        # first_seq < expected in the same epoch: the sequence was reset; a new baseline
        groups[epoch] = batch.next_seq
        self.kernel_dropped[key] = batch.kernel_dropped
        self.received += len(batch.packets)

    def _new_node(self, node: str, epoch: int) -> list[int]:
        """State for a node not seen yet; the node seen longest ago goes if there are max_nodes."""
        if len(self._epochs) >= self.max_nodes:
            oldest = next(iter(self._epochs))
            self._evict(oldest)
        epochs = self._epochs[node] = [epoch]
        self._groups_of[node] = set()
        return epochs

    def _evict(self, node: str) -> None:
        del self._epochs[node]
        for group in self._groups_of.pop(node, ()):
            key = (node, group)
            self._streams.pop(key, None)
            self.kernel_dropped.pop(key, None)
            self._evicted_lost += self.lost.pop(key, 0)
        self.duplicate_nodes.discard(node)
        self._last_restart.pop(node, None)
        self.evicted += 1
        if self.evicted == 1:
            log.warning(
                "nflogd feed: more than %d nodes; forgetting the one heard from longest ago "
                "(its loss stays in total_lost); further ones are only counted in Subscriber.evicted",
                self.max_nodes,
            )

    def _other_epoch(self, node: str, epochs: list[int], epoch: int) -> list[int]:
        """A message of ``node`` in another epoch than its last one: a restart (a newer epoch
        not seen before), or a second daemon with the same node name (an epoch seen before
        coming back, or one older than the newest)."""
        del self._epochs[node]
        self._epochs[node] = epochs  # most recently heard from last, for eviction
        if epoch in epochs:
            epochs.remove(epoch)
            self._duplicate(node)
        elif epoch < max(epochs):
            self._duplicate(node)
        elif node not in self.duplicate_nodes:
            self.restarts += 1
            self._last_restart[node] = []  # its loss, taken back if it was a second publisher
        epochs.append(epoch)
        if len(epochs) > _EPOCHS_KEPT:
            del epochs[0]
        return epochs

    def _duplicate(self, node: str) -> None:
        if node in self.duplicate_nodes:
            return
        self.duplicate_nodes.add(node)
        undo = self._last_restart.pop(node, None)
        if undo is not None:  # the "restart" that showed the second publisher was none
            self.restarts -= 1
            for key, amount in undo:
                self.lost[key] -= amount
        log.warning(
            "nflogd feed: two publishers use the node name %r (their epochs alternate): their "
            "messages are counted apart, not as restarts; give each daemon its own 'node:'",
            node,
        )

    # -- accounting and lifetime --------------------------------------------------------------

    @property
    def total_lost(self) -> int:
        """Packets the feed lost, over every (node, group)."""
        return sum(self.lost.values()) + self._evicted_lost

    @property
    def closed(self) -> bool:
        return self.socket.closed

    def close(self, linger: int = 0) -> None:
        """Close the socket (``linger`` ms for nothing: a SUB socket sends only subscriptions)."""
        self._watch.close()
        if not self.socket.closed:
            self.socket.close(linger=linger)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.socket.closed else "open"
        return (
            f"<Subscriber {state} {' '.join(self._endpoints)} received={self.received}"
            f" lost={self.total_lost} malformed={self.malformed} restarts={self.restarts}>"
        )
