"""The sd_notify protocol, by hand: one AF_UNIX datagram per state change, no libsystemd.

Use::

    n = Notifier.from_environ()        # does nothing when $NOTIFY_SOCKET is unset
    n.ready("capturing groups 1, 5")   # READY=1 + STATUS=...
    if n.watchdog_interval: ...        # seconds between WATCHDOG=1, half of $WATCHDOG_USEC
    n.watchdog()
    n.stopping()

See sd_notify(3): ``$NOTIFY_SOCKET`` is a filesystem path or, starting with
``@``, an abstract socket name; each message is newline-separated
``KEY=VALUE`` lines in one datagram. ``$WATCHDOG_USEC`` applies to us only when
``$WATCHDOG_PID`` is unset or is our pid.

Sends never block and never raise: a full or vanished socket is logged once.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Mapping

__all__ = ["Notifier"]

log = logging.getLogger(__name__)


class Notifier:
    """Talks to the service manager at ``address``; a no-op when ``address`` is None."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None):
        self.address = address
        self.watchdog_interval: float | None = (
            watchdog_usec / 2 / 1e6 if watchdog_usec and watchdog_usec > 0 else None
        )
        self._sock: socket.socket | None = None  # made on the first message
        self._failed = False
        self._target = ("\0" + address[1:] if address.startswith("@") else address) if address else None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        usec = None
        wd_pid = env.get("WATCHDOG_PID")
        try:
            if env.get("WATCHDOG_USEC") and (not wd_pid or int(wd_pid) == pid):
                usec = int(env["WATCHDOG_USEC"])
        except ValueError:
            log.warning("ignoring a malformed $WATCHDOG_USEC/$WATCHDOG_PID")
        return cls(env.get("NOTIFY_SOCKET") or None, usec)

    @property
    def enabled(self) -> bool:
        return self._target is not None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it went out."""
        if self._target is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self._target)
        except OSError as e:
            level = logging.DEBUG if self._failed else logging.WARNING
            self._failed = True
            log.log(level, "sd_notify to %s failed: %s", self.address, e.strerror or e)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC, as systemd >= 253 wants; answer with ready() after."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
