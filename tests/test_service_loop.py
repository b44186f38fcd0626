"""Program's loop with real ZeroMQ sockets: a watched socket is polled through its ZMQ_FD, which
signals a change and not a state, so a handler that left messages (returned True) and a socket
touched outside its handler (``recheck``) are served the next turn without a new message."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from nflogd import service
from nflogd.sdnotify import Notifier

pytestmark = pytest.mark.timeout(30)


class Loop(service.Program):
    """The loop alone: it stops once ``want`` messages were read, or after ``limit_s``."""

    def __init__(self, want: int, limit_s: float = 2.0):
        super().__init__(None, "", Notifier(None))
        self.want = want
        self.got: list[bytes] = []
        self.timer(self._give_up, limit_s)

    def _give_up(self) -> None:
        self._stop = True

    def read_one(self, sock: zmq.Socket) -> bool:
        """A handler that reads one message a call, True while it may have left some."""
        try:
            self.got.append(sock.recv(zmq.NOBLOCK))
        except zmq.Again:
            return False
        if len(self.got) >= self.want:
            self._stop = True
        return True


@pytest.fixture
def pair():
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    pull.bind("inproc://loop21")
    push.connect("inproc://loop21")
    yield push, pull
    push.close(linger=0)
    pull.close(linger=0)
    ctx.term()


@pytest.mark.parametrize("gather", [False, True])
def test_a_handler_that_left_messages_is_called_again_without_a_new_one(pair, gather):
    push, pull = pair
    for i in range(5):
        push.send(b"%d" % i)
    time.sleep(0.1)  # all five queued before the loop's first turn: one edge for five messages
    loop = Loop(want=5)
    loop.gather_s = 0.002
    loop.watch(pull, lambda: loop.read_one(pull), gather=gather)
    loop.run()
    assert loop.got == [b"0", b"1", b"2", b"3", b"4"]


def test_messages_that_come_while_the_loop_waits_are_read(pair):
    push, pull = pair
    loop = Loop(want=3)
    loop.watch(pull, lambda: loop.read_one(pull))

    def later():
        for i in range(3):
            time.sleep(0.05)
            push.send(b"%d" % i)

    t = threading.Thread(target=later)
    t.start()
    loop.run()
    t.join()
    assert loop.got == [b"0", b"1", b"2"]


def test_a_socket_touched_outside_its_handler_is_served_after_recheck(pair):
    push, pull = pair
    loop = Loop(want=1, limit_s=1.0)
    loop.watch(pull, lambda: loop.read_one(pull))
    loop._pending.clear()  # as after a first turn that found nothing
    push.send(b"x")
    time.sleep(0.1)
    assert pull.getsockopt(zmq.EVENTS) & zmq.POLLIN  # ZeroMQ took the signal in: the fd says nothing now
    loop.recheck(pull)
    t0 = time.monotonic()
    loop.run()
    assert loop.got == [b"x"]
    assert time.monotonic() - t0 < 0.5  # served at once, not at the loop's time limit


def test_unwatch_forgets_the_socket(pair):
    push, pull = pair
    loop = Loop(want=1, limit_s=0.3)
    loop.watch(pull, lambda: loop.read_one(pull))
    loop.unwatch(pull)
    push.send(b"x")
    loop.run()
    assert loop.got == []
    assert loop._handlers == {} and loop._pending == set()
