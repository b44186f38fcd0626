"""A stand-in publisher for client tests: an XPUB socket on an ipc path, synchronised on
the subscriptions it sees rather than on sleeps.

::

    feed = FakeFeed(tmp_path / "feed.sock")
    feed.publish_when_subscribed({wire.topic(5)}, frames)   # from a thread: sniff() blocks
    ...
    feed.close()                                            # re-raises the thread's error
"""

from __future__ import annotations

import threading
import time
from typing import Callable

import zmq
from nflogd_client import filters, wire

WAIT = 30.0  # seconds: the bound on anything the feed waits for
TS = 1_700_000_000_123_456_789  # ns: the capture time of the packets rec() makes


def topics(*groups: int) -> set[bytes]:
    """The subscription topics of these groups; no group: the empty topic (every group)."""
    return {wire.topic(g) for g in groups} if groups else {b""}


def rec(group: int, data: bytes, ts_ns: int = TS, **kw) -> wire.Packet:
    """A packet of ``group`` carrying ``data`` (IPv6 if it starts like IPv6, else IPv4)."""
    hw = 0x86DD if data[:1] == b"\x60" else 0x0800
    return wire.Packet.build(group, data, ts_ns, **{"hw_protocol": hw, **kw})


def msg(group: int, *packets: wire.Packet, first_seq: int = 0, node: str = "r1") -> list[bytes]:
    """One feed message of ``packets``."""
    return wire.encode(group, node, 1, first_seq, list(packets))


class FakeFeed:
    """An XPUB publisher bound on ``ipc://<path>``."""

    def __init__(self, path):
        self.endpoint = f"ipc://{path}"
        self.ctx = zmq.Context()
        self.pub = self.ctx.socket(zmq.XPUB)
        self.pub.bind(self.endpoint)
        self._seen: set[bytes] = set()
        self._thread: threading.Thread | None = None
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def wait_subscribed(self, want: set[bytes], timeout: float = WAIT) -> None:
        """Return once every topic in ``want`` has been subscribed to."""
        self._wait(lambda: want <= self._seen, lambda: f"{want - self._seen}", timeout)

    def _wait(self, done: Callable[[], bool], what: Callable[[], str], timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.pub.poll(int(remaining * 1000) + 1):
                raise TimeoutError(f"no subscription to {what()} within {timeout}s")
            m = self.pub.recv()
            if m[:1] == b"\x01":
                self._seen.add(m[1:])

    def reply_to_filter(self, filter_topic: bytes, accepted: bool, reason: str = "") -> None:
        """From a thread: once a reader states this filter (its topic, the reader's tag after
        it), the publisher's reply on that reader's own topic."""

        def stated() -> bytes | None:
            return next((t for t in self._seen if t.startswith(filter_topic)), None)

        def body():
            self._wait(lambda: stated() is not None, lambda: f"{filter_topic!r}...")
            self.publish(filters.reply(stated(), accepted, reason))

        self._start(body)

    def publish(self, *messages: list[bytes]) -> None:
        for m in messages:
            self.pub.send_multipart(m)

    def _start(self, body: Callable[[], None]) -> None:
        def run():
            try:
                body()
            except BaseException as e:  # reported by join()
                self.error = e

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def publish_when_subscribed(self, want: set[bytes], *messages: list[bytes]) -> None:
        """From a thread: for a subscriber created inside a blocking call (sniff, a tool)."""

        def body():
            self.wait_subscribed(want)
            self.publish(*messages)

        self._start(body)

    def stream_when_subscribed(self, want: set[bytes], make: Callable[[int], list[bytes]], step: int) -> None:
        """From a thread, until ``stop`` is set: ``make(first_seq)`` messages of ``step`` packets."""

        def body():
            self.wait_subscribed(want)
            seq = 0
            while not self.stop.is_set():
                self.pub.send_multipart(make(seq))
                seq += step
                time.sleep(0.001)

        self._start(body)

    def join(self) -> None:
        """Stop the thread and re-raise what failed in it."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(WAIT)
            assert not self._thread.is_alive(), "publisher thread stuck"
            self._thread = None
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        try:
            self.join()
        finally:
            self.pub.close(linger=0)
            self.ctx.term()


def collect(sub, until, timeout: float = 15.0, *, batches: bool = False) -> list:
    """Packets (or, with ``batches``, whole Batches) from a Subscriber until ``until(got)``
    holds or ``timeout`` seconds pass."""
    got: list = []
    deadline = time.monotonic() + timeout
    while not until(got) and time.monotonic() < deadline:
        batch = sub.recv_batch(timeout=0.05)
        if batch is not None:
            if batches:
                got.append(batch)
            else:
                got.extend(batch.packets)
    return got
