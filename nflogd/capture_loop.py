"""The hot path: one thread per group, from the kernel to the feed, off the control plane.

Each ``CaptureLoop`` owns one ``GroupReader`` and sends every batch it reads to the
``Publisher``'s peers::

    loop = CaptureLoop(reader, publisher, on_error=wake_control_loop)
    loop.start()
    ...
    loop.stop()          # wakes the thread, joins it; the reader stays open
    loop.error           # the NflogdError that ended it, if one did

With ``publisher.cfeed`` (the C sender, always but in tests) the
thread spends its life in C with the GIL released: ``nflogd_pump`` waits for the kernel,
parses a whole receive buffer, builds the message and sends it under the feed's mutex,
batch after batch, and comes back to Python only on ``stop()``, to warn of an overrun, or
once the group has been idle ``MARK_IDLE_S`` after traffic: then it sends the group's
sequence mark (``Publisher.mark``: readers learn where the sequence ended) and waits in C
for the next batch with no timeout, so an idle group costs no wake-ups. Without it (the
reference the tests hold the C sender to), each batch comes back to Python and goes out
through ``Publisher.publish`` (the same bytes), with a wait of at most ``WAIT_S``, after
which the mark goes out.
Either way the groups are read in parallel, and nothing the control thread does
(subscriptions, monitor events, a metrics scrape, a reload) delays a read: the control
thread shares only the feed's lock, which it holds for a bounded time.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .capture import GroupReader
from .errors import NflogdError
from .publish import Publisher

__all__ = ["CaptureLoop", "MARK_IDLE_S", "WAIT_S"]

log = logging.getLogger("nflogd.capture")

#: Longest one wait for the kernel lasts without the C sender (the C wait has no end);
#: ``stop()`` ends either at once through the reader's eventfd.
WAIT_S = 1.0
#: Seconds a group is idle after its last packet before its sequence mark goes out: the
#: message that tells readers where the sequence ended (``docs/wire-format.md``).
MARK_IDLE_S = 1.0


class CaptureLoop:
    """A thread reading ``reader`` and publishing each batch until ``stop()``.

    ``base_dropped()`` gives the kernel drops of earlier readers of the same group (closed
    by a reload), which the feed's cumulative count includes. A read or send error ends
    the loop: it is kept in ``error`` and ``on_error()`` is called, so that the control
    loop can stop the daemon.
    """

    def __init__(
        self,
        reader: GroupReader,
        publisher: Publisher,
        *,
        on_error: Callable[[], None],
        base_dropped: Callable[[], int] = lambda: 0,
    ):
        self.reader = reader
        self._publisher = publisher
        self._on_error = on_error
        self._base_dropped = base_dropped
        self._running = False
        self.error: NflogdError | None = None
        self._thread = threading.Thread(target=self._run, name=f"nflogd-group-{reader.group}", daemon=True)

    @property
    def group(self) -> int:
        return self.reader.group

    def start(self) -> None:
        self._running = True
        self._thread.start()

    def _run(self) -> None:
        reader, publisher = self.reader, self._publisher
        base = self._base_dropped()
        try:
            if publisher.cfeed is not None:
                self._pump_in_c(base)
                return
            publish, group = publisher.publish, reader.group
            marked = publisher.next_seq(group)
            try:
                while self._running:
                    batch = reader.read(WAIT_S, copy=False)
                    if batch is not None:
                        publish(batch, reader.counters.kernel_dropped + base)
                    elif publisher.next_seq(group) != marked:  # idle for WAIT_S after traffic
                        marked = self._mark(None, base)
            finally:
                if publisher.next_seq(group) != marked:
                    self._mark(None, base)
        except NflogdError as e:
            self.error = e
            self._on_error()
        except BaseException as e:  # anything else is a bug: say so, and stop the daemon
            log.exception("group %d: capture stopped", reader.group)
            self.error = NflogdError(f"group {reader.group}: capture stopped: {e!r}")
            self._on_error()

    def _pump_in_c(self, base: int) -> None:
        reader, publisher = self.reader, self._publisher
        reader.feed_seq = publisher.next_seq(reader.group)
        reader.set_dropped_base(base)
        marked = reader.feed_seq
        try:
            while self._running:
                # in C until the group has been idle MARK_IDLE_S after traffic, then its mark;
                # after a mark, no wake-up until the next batch
                if reader.pump_until_idle(publisher.cfeed, MARK_IDLE_S, reader.feed_seq != marked):
                    marked = self._mark(reader.feed_seq, base)
        finally:
            publisher.set_next_seq(reader.group, reader.feed_seq)
            if reader.feed_seq != marked:
                self._mark(reader.feed_seq, base)

    def _mark(self, seq: int | None, base: int) -> int:
        """Send the group's sequence mark (``Publisher.mark``); the sequence it marked."""
        publisher, group = self._publisher, self.reader.group
        publisher.mark(group, seq, self.reader.counters.kernel_dropped + base)
        return publisher.next_seq(group) if seq is None else seq

    def stop(self) -> None:
        """Stop reading (a batch being published is sent first) and join the thread."""
        self._running = False
        if self._thread.is_alive():
            self.reader.wake()
            self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()
