"""Logging once per episode: what a peer or the kernel repeats is warned about once, then counted.

::

    overruns = Episodes(log)
    overruns.hit("group %d: receive buffer overrun", 5)   # a warning: the first of an episode
    overruns.hit("group %d: receive buffer overrun", 5)   # debug: the same episode

An episode ends after ``quiet_s`` seconds without a hit; the next hit warns again. The
counting itself is the caller's (a metric); this only decides the log level.
"""

from __future__ import annotations

import logging
import time

__all__ = ["Episodes", "QUIET_S"]

#: Seconds without a hit that end an episode.
QUIET_S = 10.0


class Episodes:
    """One kind of event of one source; ``hit()`` logs it at ``level`` if it starts an episode."""

    def __init__(self, logger: logging.Logger, quiet_s: float = QUIET_S):
        self.log = logger
        self.quiet_s = quiet_s
        self.last: float | None = None

    def hit(self, fmt: str, *args: object, level: int = logging.WARNING) -> bool:
        """Log the event (``level`` if it starts an episode, else debug); True if it did."""
        now = time.monotonic()
        first = self.last is None or now - self.last >= self.quiet_s
        self.last = now
        self.log.log(level if first else logging.DEBUG, fmt, *args)
        return first
