"""A bounded reordering window: packets of several groups or daemons out in time order.

Each group's batches arrive in order, but two groups (or two daemons behind a relay) are
batched independently: group 5's batch of the last 10 ms can arrive after group 6's newer
packets. ``Reorder`` holds packets for up to ``window`` seconds and lets them out by their
timestamp::

    r = Reorder(0.2)                    # seconds; 0 passes packets through in arrival order
    r.add(batch.packets, note)          # note: anything, handed back with the batch's first packet
    for pkt, note in r.ready():         # those whose turn has come
        ...
    timeout = r.wait(1.0)               # how long a receive may block before the next is due
    for pkt, note in r.drain():         # at the end: the rest, in order

Packets leave oldest first: the oldest held one leaves once a packet ``window`` newer than it
has arrived (by the packets' own clocks), or once it has waited ``window`` seconds here (by
this host's clock), whichever is first; so the output is in time order as long as no packet
arrives more than ``window`` later than newer ones did. At most ``max_packets`` are held;
beyond that the oldest goes out.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable, Iterator
from typing import Any

from .wire import Packet

__all__ = ["Reorder"]


class Reorder:
    def __init__(self, window: float, max_packets: int = 100_000):
        if window < 0:
            raise ValueError(f"reordering window: must be >= 0 seconds, got {window}")
        self.window = window
        self._window_ns = int(window * 1e9)
        self.max_packets = max_packets
        self._heap: list[tuple[int, int, int, Packet, Any]] = []  # (ts_ns, order, arrival_ns, packet, note)
        self._order = itertools.count()
        self._newest = 0  # the newest packet timestamp seen
        self._pass: list[tuple[Packet, Any]] = []  # window 0: arrival order

    def __len__(self) -> int:
        return len(self._heap) + len(self._pass)

    def add(self, packets: Iterable[Packet], note: Any = None, now_ns: int | None = None) -> None:
        """Packets of one batch, in their order; ``note`` goes with the first of them."""
        if not self._window_ns:
            for p in packets:
                self._pass.append((p, note))
                note = None
            return
        arrival = time.monotonic_ns() if now_ns is None else now_ns
        heap, order = self._heap, self._order
        for p in packets:
            ts = p.ts_ns
            heapq.heappush(heap, (ts, next(order), arrival, p, note))
            note = None
            if ts > self._newest:
                self._newest = ts

    def ready(self, now_ns: int | None = None) -> Iterator[tuple[Packet, Any]]:
        """(packet, note) for each packet whose turn has come, oldest first."""
        if self._pass:
            out, self._pass = self._pass, []
            yield from out
            return
        heap = self._heap
        if not heap:
            return
        now = time.monotonic_ns() if now_ns is None else now_ns
        w = self._window_ns
        while heap:
            ts, _, arrival, p, note = heap[0]
            if ts + w <= self._newest or arrival + w <= now or len(heap) > self.max_packets:
                heapq.heappop(heap)
                yield p, note
            else:
                break

    def wait(self, timeout: float | None) -> float | None:
        """``timeout``, shortened to when the next held packet is due (0: one is due now)."""
        if self._pass:
            return 0.0
        if not self._heap:
            return timeout
        due = (self._heap[0][2] + self._window_ns - time.monotonic_ns()) / 1e9
        due = max(0.0, due)
        return due if timeout is None else min(timeout, due)

    def drain(self) -> Iterator[tuple[Packet, Any]]:
        """Every packet still held, oldest first."""
        yield from self._pass
        self._pass = []
        heap = self._heap
        while heap:
            _, _, _, p, note = heapq.heappop(heap)
            yield p, note
