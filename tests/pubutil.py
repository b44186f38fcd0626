"""A Publisher's control-loop side, run by a test that has no daemon around it::

serve(pub, lambda: pub.subscribers == 1, "no subscriber")   # handle_incoming
"""

from __future__ import annotations

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
