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
``malformed``, ``received``), the packets of a batch handed out one by one, and each
endpoint's state (``endpoints``: connecting, connected or refused, and why; ``refused``; a
new attempt every ``AUTH_RETRY_S`` after a refusal), kept while ``recv`` waits.

The socket is the Subscriber's own; the event loop waits on a ``zmq.asyncio`` shadow of it.
Cancelling a ``recv`` (``task.cancel()``, ``asyncio.wait_for``) loses nothing: a message is
taken off the socket only once it is there, and then returned without another wait. ``recv``
lets the loop's other tasks run once per message, also while messages keep coming.
``context`` is a ``zmq.Context`` (default: the process-wide instance) or a
``zmq.asyncio.Context``, whose plain shadow is used. One AsyncSubscriber belongs to one event
loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import Any

import zmq
import zmq.asyncio

from .subscriber import Subscriber
from .wire import Batch, Packet

__all__ = ["AsyncSubscriber"]

#: Seconds between looks at the socket monitor (connections, refusals) while ``recv`` waits.
MONITOR_TICK_S = 0.25


class AsyncSubscriber(Subscriber):
    """``Subscriber`` (same arguments, same counters) with ``await recv()``, ``await recv_batch()``,
    ``async for`` and ``async with``."""

    def __init__(
        self,
        endpoints: str | Iterable[str] | None = None,
        groups: int | Iterable[int] | None = None,
        *,
        context: zmq.Context[Any] | None = None,
        **kw: Any,
    ) -> None:
        if isinstance(context, zmq.asyncio.Context):  # its sockets are asyncio's: take the plain kind
            context = zmq.Context.shadow(context.underlying)
        super().__init__(endpoints, groups, context=context, **kw)
        # The Subscriber's own plain socket does everything but the wait: a shadow of it, on
        # the running event loop, is what ``recv`` awaits (libzmq's ZMQ_FD in the loop).
        self._waiter = zmq.asyncio.Socket.shadow(self.socket.underlying)
        self._polling: asyncio.Future[int] | None = None  # the wait under way, cancelled by close()

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
            # Let the loop's other tasks run once per message, even while messages flow, and
            # before one is taken off the socket: a cancellation here loses nothing.
            await asyncio.sleep(0)
            try:
                msg = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                self._update()  # the Subscriber's endpoint states: monitor events, probes, retries
                ms = self._poll_ms(deadline)
                tick = int(MONITOR_TICK_S * 1000)  # the monitor's socket is not awaited: look again
                # pyzmq's _future.pyi gives Socket.poll the Poller's signature and result
                polling: asyncio.Future[int] = self._waiter.poll(  # type: ignore[call-arg, assignment]
                    tick if ms is None else min(ms, tick), zmq.POLLIN
                )
                self._polling = polling
                try:
                    ready = await polling
                finally:
                    self._polling = None
                if not ready and deadline is not None and time.monotonic() >= deadline:
                    self._update()
                    return None
                continue
            batch = self._take(msg)  # no await between taking the message and returning it
            if batch is not None:
                return batch

    def __iter__(self) -> Iterator[Packet]:
        raise TypeError("AsyncSubscriber: use 'async for pkt in sub'")

    def __aiter__(self) -> AsyncSubscriber:
        return self

    async def __anext__(self) -> Packet:
        return await self.recv(None)  # type: ignore[return-value]  # never None without a timeout

    async def __aenter__(self) -> AsyncSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self, linger: int = 0) -> None:
        """Close the socket; a ``recv`` waiting meanwhile raises ``asyncio.CancelledError``."""
        if self._polling is not None:
            self._polling.cancel()
        Subscriber.close(self, linger)
