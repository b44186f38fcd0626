"""A Publisher's control-loop side, run by a test that has no daemon around it::

serve(pub, lambda: pub.subscribers == 1, "no subscriber")   # handle_incoming

and ``RawPeer``, what the tests' hand-made peers of it share: reading what the server sends
while serving it.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

import zmq

from nflogd.publish import Publisher


def serve(pub: Publisher, until: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll the publisher's fds and handle what comes until ``until()``; an
    AssertionError saying ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, what
        zmq.select(pub.fds, [], [], 0.05)
        pub.handle_incoming()


class RawPeer:
    """A hand-made peer of the publisher ``pub`` on the connected ``sock`` (served while it
    waits); the tests' own classes say how it connects and what it sends."""

    def __init__(self, pub: Publisher, sock: socket.socket):
        self.pub = pub
        self.sock = sock
        self.sock.setblocking(False)
        self.buf = b""

    def read(self, n: int, timeout: float = 3.0) -> bytes:
        """``n`` bytes; b"" if the server closed first."""

        def got() -> bool:
            try:
                chunk = self.sock.recv(65536)
            except BlockingIOError:
                return len(self.buf) >= n
            if not chunk:
                raise EOFError
            self.buf += chunk
            return len(self.buf) >= n

        try:
            serve(self.pub, got, f"{n} bytes from the server", timeout)
        except EOFError:
            return b""
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def closed_by_server(self, timeout: float = 3.0) -> bool:
        while self.read(1 << 20, timeout=timeout):
            pass
        return True

    def close(self) -> None:
        self.sock.close()
