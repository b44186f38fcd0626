"""What each batch a Subscriber accounted changed: feed loss, kernel drops, daemon restarts.

The Subscriber sums loss per (node, group); an output that shows loss where it happened
(a JSON line, a pcapng comment) needs it per batch. ``FeedEvents`` compares the
Subscriber's counters before and after each batch::

    events = FeedEvents(sub)
    batch = sub.recv_batch(1.0)
    for e in events.after(batch):     # in this order: restart, feed loss, kernel loss
        print(e)    # {"event": "loss", "where": "feed", "node": "r1", "group": 5, "lost": 3}

State is kept for the (node, group)s the Subscriber keeps (its ``max_nodes``). Events are
dicts with the keys of ``docs/json-lines.md``: ``event`` ("restart" or "loss"),
``node``, ``group`` (of the batch that showed it), ``where`` ("feed" or "kernel"; None for
a restart) and ``lost`` (packets; None for a restart). Kernel drops
are the daemon's ``kernel_dropped`` header field, counted from the second batch of a
(node, group) on (the first sets the baseline), per daemon run.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol

from .wire import Batch

__all__ = ["FeedEvents", "describe"]

#: An event: the keys of ``docs/json-lines.md``.
Event = dict[str, Any]


class Accounting(Protocol):
    """What FeedEvents reads of a subscriber (``Subscriber``, ``JetStreamSubscriber``)."""

    @property
    def restarts(self) -> int: ...
    @property
    def lost(self) -> Mapping[tuple[str, int], int]: ...
    @property
    def evicted(self) -> int: ...


class FeedEvents:
    def __init__(self, sub: Accounting) -> None:
        self._sub = sub
        self._restarts = sub.restarts
        self._lost: dict[tuple[str, int], int] = dict(sub.lost)
        self._kernel: dict[tuple[str, int], int] = {}
        #: Kernel drops seen over every (node, group), from the events so far.
        self.kernel_lost = 0
        self._evicted = sub.evicted

    def after(self, batch: Batch) -> list[Event]:
        """The events of ``batch``, which the Subscriber has just returned (and accounted)."""
        sub = self._sub
        evicted = sub.evicted
        if evicted != self._evicted:  # the Subscriber forgot nodes (max_nodes): so do we
            self._evicted = evicted
            for key in [k for k in self._kernel if k not in sub.lost]:
                self._kernel.pop(key)
                self._lost.pop(key, None)
        node, group = batch.node, batch.group
        key = (node, group)
        events: list[Event] = []
        if sub.restarts != self._restarts:
            self._restarts = sub.restarts
            events.append({"event": "restart", "node": node, "group": group, "where": None, "lost": None})
        lost = sub.lost.get(key, 0)
        gap = lost - self._lost.get(key, 0)
        self._lost[key] = lost
        if gap > 0:
            events.append({"event": "loss", "where": "feed", "node": node, "group": group, "lost": gap})
        k, prev = batch.kernel_dropped, self._kernel.get(key)
        self._kernel[key] = k
        if prev is not None:
            delta = k - prev if k >= prev else k  # smaller: a new daemon run counts from 0
            if delta > 0:
                self.kernel_lost += delta
                events.append(
                    {"event": "loss", "where": "kernel", "node": node, "group": group, "lost": delta}
                )
        return events


def describe(events: list[Event], batch: Batch | None = None) -> str | None:
    """One line for people (a pcapng comment, a log window) on ``batch`` (by default the
    (node, group) the first event names); None without events."""
    if not events:
        return None
    node, group = (batch.node, batch.group) if batch is not None else (events[0]["node"], events[0]["group"])
    parts = []
    for e in events:
        if e["event"] == "restart":
            parts.append(f"daemon {e['node'] or '-'} restarted")
        elif e["where"] == "feed":
            parts.append(f"{e['lost']} packets lost on the feed before this one")
        else:
            parts.append(f"{e['lost']} packets dropped by the kernel before this one")
    return f"nflogd: {', '.join(parts)} (node {node or '-'}, group {group})"
