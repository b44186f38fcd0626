"""The Subscriber for asyncio programs, on ``zmq.asyncio``: nothing blocks the event loop.

::

    from nflogd_client.aio import AsyncSubscriber

    async with AsyncSubscriber("ipc:///run/nflogd/feed.sock", groups=[5]) as sub:
        pkt = await sub.recv(timeout=1.0)       # a Packet, or None after 1 s
        batch = await sub.recv_batch()          # one whole message
        async for pkt in sub:                   # forever
            print(pkt.node, pkt.group, pkt.len, sub.lost)

``AsyncSubscriber`` is a ``Subscriber`` whose receiving methods are coroutines, as
``zmq.asyncio.Socket`` is a ``zmq.Socket`` whose ``recv`` returns a future. Everything else
is the Subscriber's own code, not a copy: the arguments (endpoints, groups, CURVE keys), the
decoding and the per-(node, group) accounting (``lost``, ``kernel_dropped``, ``restarts``,
``malformed``, ``received``), the packets of a batch handed out one by one, and the CURVE
refusal handling (``refused``, a new attempt every ``AUTH_RETRY_S`` while ``recv`` waits).

Cancelling a ``recv`` (``task.cancel()``, ``asyncio.wait_for``) loses nothing: a message is
taken off the socket only once it is there, and then without waiting. ``context`` is a
``zmq.asyncio.Context`` (default: its process-wide instance) or a plain ``zmq.Context``,
which is shadowed. One AsyncSubscriber belongs to one event loop.
"""

from __future__ import annotations

import itertools
import time

import zmq
import zmq.asyncio

from .subscriber import Subscriber
from .wire import Batch, Packet

__all__ = ["AsyncSubscriber"]

#: With CURVE, seconds between looks at the socket monitor (refusals) while ``recv`` waits.
CURVE_TICK_S = 0.25

_monitor_ids = itertools.count()


class AsyncSubscriber(Subscriber):
    """``Subscriber`` (same arguments, same counters) with ``await recv()``, ``await recv_batch()``,
    ``async for`` and ``async with``."""

    def __init__(self, endpoints=None, groups=None, *, context: zmq.Context | None = None, **kw):
        if context is None:
            context = zmq.asyncio.Context.instance()
        elif not isinstance(context, zmq.asyncio.Context):
            context = zmq.asyncio.Context.shadow(context.underlying)
        super().__init__(endpoints, groups, context=context, **kw)

    def _open_monitor(self, events: int) -> zmq.Socket:
        # A plain PAIR socket on the same context: the Subscriber's refusal handling reads it
        # without waiting, between the event loop's polls of the SUB socket.
        addr = f"inproc://nflogd-client-monitor-{id(self)}-{next(_monitor_ids)}"
        self.socket.monitor(addr, events)
        mon = zmq.Context.shadow(self.socket.context.underlying).socket(zmq.PAIR)
        mon.connect(addr)
        return mon

    async def recv(self, timeout: float | None = None) -> Packet | None:  # type: ignore[override]
        """The next packet, or ``None`` after ``timeout`` seconds (``None``: wait forever)."""
        if self.pending():
            return Subscriber.recv(self, 0)  # from the batch at hand: never touches the socket
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            batch = await self._next_message(deadline)
            if batch is None:
                return None
            if batch.packets:
                self._batch, self._index = batch, 0
                return Subscriber.recv(self, 0)

    async def recv_batch(self, timeout: float | None = None) -> Batch | None:  # type: ignore[override]
        """One whole message as a ``Batch`` (what ``recv`` left of one first), or ``None``."""
        if self.pending():
            return Subscriber.recv_batch(self, 0)  # the rest of the batch at hand
        self._batch = None
        deadline = None if timeout is None else time.monotonic() + timeout
        return await self._next_message(deadline)

    async def _next_message(self, deadline: float | None) -> Batch | None:  # type: ignore[override]
        sock = self.socket
        while True:
            if self._monitor is not None:
                self._handle_refusals()
                self._reconnect_due()
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._monitor is not None:
                wait = CURVE_TICK_S if wait is None else min(wait, CURVE_TICK_S)
            events = await sock.poll(None if wait is None else int(wait * 1000 + 0.999), zmq.POLLIN)
            if events & zmq.POLLIN:
                try:
                    msg = await sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:  # pragma: no cover - poll said readable
                    continue
                batch = self._take(msg)
                if batch is not None:
                    return batch
            elif deadline is not None and time.monotonic() >= deadline:
                return None

    def __iter__(self):
        raise TypeError("AsyncSubscriber: use 'async for pkt in sub'")

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Packet:
        return await self.recv(None)  # type: ignore[return-value]  # never None without a timeout

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()
