"""The relay's upstream reader in C (nflogd/feed/_upstream.c, ``ffi.CUpstream``): an upstream's
libzmq socket read through pyzmq's own libzmq, a group's messages passed to the feed's readers
as they came and what needs Python handed back; the upstreams' thread (``ffi.CUpstreams``), the
headers it keeps for the sequence marks, and readers' full sockets retried by the thread.

Real parts only: pyzmq's XPUB as the upstream, the relay's XSUB, the feed's own server
(``Publisher``) and a libzmq SUB reading it, over ipc.
"""

from __future__ import annotations

import re
import select
import threading
import time

import pytest
import zmq
from nflogd_client import filters, wire
from nflogd_client.wire import Packet
from pubutil import serve

from nflogd.config_publish import PublishConfig
from nflogd.ffi import NOTED_MAX, CUpstream, CUpstreams, load_zmq
from nflogd.publish import Publisher
from nflogd.relay import read_upstreams_in_c

pytestmark = pytest.mark.timeout(120)


def message(node: str = "r1", first_seq: int = 0, packets: int = 1, size: int = 60, group: int = 1):
    """A daemon's message of ``packets`` packets."""
    batch = [Packet.build(group, bytes(size), 1_700_000_000_000_000_000 + i) for i in range(packets)]
    return wire.encode(group, node, 1, first_seq, batch)


class Link:
    """An upstream (XPUB), the relay's XSUB subscribed to everything on it, the feed's server
    and one reader (SUB) of every group."""

    def __init__(self, ctx: zmq.Context, tmp, reader_hwm: int = 1000):
        read_upstreams_in_c()
        self.up = ctx.socket(zmq.XPUB)
        self.up.setsockopt(zmq.SNDHWM, 0)
        self.up.bind(f"ipc://{tmp}/up.sock")
        self.xsub = ctx.socket(zmq.XSUB)
        self.xsub.connect(f"ipc://{tmp}/up.sock")
        self.xsub.send(b"\x01")
        assert self.up.poll(5000) and self.up.recv() == b"\x01"
        self.pub = Publisher(PublishConfig(bind=(f"ipc://{tmp}/down.sock",)))
        self.reader = ctx.socket(zmq.SUB)
        self.reader.setsockopt(zmq.RCVHWM, reader_hwm)
        self.reader.connect(f"ipc://{tmp}/down.sock")
        self.reader.subscribe(b"")
        serve(
            self.pub, lambda: self.pub.subscribers == 1 and self.pub.subscription_messages >= 1, "the reader"
        )

    @property
    def feed(self):
        return self.pub.cfeed

    def close(self) -> None:
        self.reader.close(linger=0)
        self.pub.close(linger=0)
        self.xsub.close(linger=0)
        self.up.close(linger=0)


@pytest.fixture
def link(ctx, tmp_path):
    lk = Link(ctx, tmp_path)
    yield lk
    lk.close()


#: A message handed back: its frames, whether C forwarded it, the notes of its pass.
Back = tuple[list[bytes], bool, list[bytes]]


def pass_until(c: CUpstream, feed, done, timeout: float = 10.0) -> list[Back]:
    """Pass what comes until ``done(c)``: each message handed back, whether C forwarded it,
    and the notes of the pass it came in."""
    back = []
    deadline = time.monotonic() + timeout
    while not done(c):
        assert time.monotonic() < deadline, f"{c.messages} messages passed"
        status = c.pass_to(feed, 64)
        if status == CUpstream.HELD:
            back.append((c.held(), c.held_forwarded, c.notes()))
        elif status == CUpstream.EMPTY:
            time.sleep(0.005)
    return back


def test_a_groups_message_goes_to_the_readers_as_it_came_and_the_rest_comes_back(link):
    group = message()
    other = [b"abc", b"def"]  # a topic of no group: Publisher.forward's to match or count
    reply = filters.reply(filters.FILTER_TOPIC + b"\x01" * 8, True)
    six = [wire.topic(1)] + [b"x"] * 5
    for m in (group, six, other, reply, group):
        link.up.send_multipart(m)
    c = CUpstream(link.xsub.underlying)
    try:
        back = pass_until(c, link.feed, lambda c: c.messages == 5)
        assert [(frames, forwarded) for frames, forwarded, _ in back] == [(other, False), (reply, False)]
        assert c.unsent == 1  # more than four frames: nowhere
        assert c.bytes_in == sum(len(f) for m in (group, six, other, reply, group) for f in m)
        for _ in range(2):
            assert link.reader.poll(5000)
            assert link.reader.recv_multipart() == group
        assert not link.reader.poll(300)
        assert c.pass_to(link.feed, 64) == CUpstream.EMPTY
    finally:
        c.close()


def test_keep_hands_back_each_message_it_forwarded_and_a_filters_connection_only_its_topics(link):
    group = message()
    kept = CUpstream(link.xsub.underlying, keep=True)
    try:
        link.up.send_multipart(group)
        back = pass_until(kept, link.feed, lambda c: c.messages == 1)
        assert [(frames, forwarded) for frames, forwarded, _ in back] == [(group, True)]
        assert back[0][2] == [group[1]]  # its header noted before it came back
        assert link.reader.poll(5000) and link.reader.recv_multipart() == group
    finally:
        kept.close()
    reply = filters.reply(filters.FILTER_TOPIC + b"\x02" * 8, False, "no")
    filtered = CUpstream(link.xsub.underlying, filtered=True)
    try:
        for m in (group, reply, group):
            link.up.send_multipart(m)
        back = pass_until(filtered, link.feed, lambda c: c.messages == 1)
        assert [(frames, forwarded) for frames, forwarded, _ in back] == [(reply, False)]
        time.sleep(0.2)
        assert filtered.pass_to(link.feed, 64) == CUpstream.EMPTY
        assert filtered.messages == 1  # the groups' own: dropped, uncounted
        assert not link.reader.poll(300)
    finally:
        filtered.close()


class Thread:
    """The upstreams' thread over one link's XSUB."""

    def __init__(self, link: Link):
        self.link = link
        self.ups = CUpstreams(2000)
        self.c = CUpstream(link.xsub.underlying)
        self.thread = threading.Thread(target=self.ups.run, args=(link.feed,), daemon=True)
        self.thread.start()
        with self.ups:
            self.ups.add(self.c, link.xsub.getsockopt(zmq.FD))

    def stop(self) -> None:
        self.ups.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
        with self.ups:
            self.ups.remove(self.c)
        self.c.close()


def read(sock: zmq.Socket, n: int, timeout: float = 10.0) -> list[list[bytes]]:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n:
        assert time.monotonic() < deadline, f"{len(got)} of {n} messages"
        if sock.poll(100):
            got.append(sock.recv_multipart())
    return got


def wakeups(tid: int | None) -> int:
    """The thread's voluntary context switches so far (/proc)."""
    with open(f"/proc/self/task/{tid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))


def read_all(sock: zmq.Socket, n: int, timeout: float = 30.0) -> list[list[bytes]]:
    """Up to ``n`` messages, what came within ``timeout`` (for a thread: no assertion)."""
    got: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        if sock.poll(100):
            got.append(sock.recv_multipart())
    return got


def test_the_thread_passes_messages_on_and_keeps_the_last_header_of_each_streams_kind(link):
    t0 = time.monotonic()
    t = Thread(link)
    try:
        sent = [
            message("r1", 0, packets=2),
            message("r1", 2),
            message("r2", 0),
            wire.frames(1, "r1", 1, 3, 0, 0, b"", b""),  # r1's mark
            [wire.topic(1), b"JUNK" + bytes(40), b"", b""],  # not a daemon's header: passed, not noted
        ]
        for m in sent:
            link.up.send_multipart(m)
        assert read(link.reader, len(sent)) == sent
        notes = t.ups.take_notes()
        assert [header for _, header in notes] == [sent[1][1], sent[2][1], sent[3][1]]
        assert all(t0 <= when <= time.monotonic() for when, _ in notes)
        assert t.ups.take_notes() == [] and t.ups.notes_dropped == 0 and t.ups.errors == 0
        assert t.c.messages == len(sent)
    finally:
        t.stop()


def test_past_its_limit_of_streams_the_thread_counts_what_it_did_not_note_and_says_so_at_half(link):
    t = Thread(link)
    try:
        n = NOTED_MAX + 10
        for i in range(n):
            link.up.send_multipart(message(f"n{i}"))
        read(link.reader, n, timeout=60)
        assert select.select([t.ups.notes_fd], [], [], 0)[0]  # readable since half were noted
        assert t.ups.notes_dropped == 10
        assert len(t.ups.take_notes()) == NOTED_MAX
        assert not select.select([t.ups.notes_fd], [], [], 0)[0]  # taken: no longer readable
    finally:
        t.stop()


def test_a_full_readers_socket_is_written_by_the_thread_and_one_that_stops_reading_by_the_loop(ctx, tmp_path):
    """A burst far past what a reader's socket holds reaches it whole with no turn of the
    control loop (the thread retries what it queued); a reader that stops reading is given up
    by the thread after its retries (it stops waking) and armed for the loop, which writes the
    rest once the reader reads again."""
    link = Link(ctx, tmp_path, reader_hwm=4)
    t = Thread(link)
    try:
        burst = [message("r1", i, packets=64, size=1000) for i in range(60)]  # 60 x 72 KB
        first: list[list[bytes]] = []
        # the reader reads all along (its socket is its thread's until joined): the thread
        # gives a reader up to the control loop only after some half a second without progress
        reading = threading.Thread(target=lambda: first.extend(read_all(link.reader, len(burst))))
        reading.start()
        for m in burst:
            link.up.send_multipart(m)
        reading.join(60)
        assert first == burst  # no serve(): the thread wrote it all
        assert link.pub.cfeed.peer_queued() == 0
        for m in burst:  # again, to a reader that reads nothing for a while
            link.up.send_multipart(m)
        time.sleep(1.5)  # 250 tries, each after 2 ms at most
        assert link.pub.cfeed.peer_queued() > 0
        before = wakeups(t.thread.native_id)
        time.sleep(0.3)
        assert wakeups(t.thread.native_id) - before < 10  # given up: no retry every 2 ms
        got: list[list[bytes]] = []

        def drained() -> bool:
            while link.reader.poll(0):
                got.append(link.reader.recv_multipart())
            return len(got) == len(burst)

        serve(link.pub, drained, "the rest, written by the control loop", timeout=30)
        assert got == burst
        assert link.pub.slow_dropped == 0
    finally:
        t.stop()
        link.close()


def test_libzmq_is_taken_only_from_a_loaded_object_that_has_it(link):
    with pytest.raises(ValueError, match="is not loaded"):
        load_zmq("/nonexistent/libzmq.so.5")
    with open("/proc/self/maps") as f:
        libc = next(line.split()[-1] for line in f if re.search(r"/libc[.-]", line))
    with pytest.raises(
        ValueError, match=f"{re.escape(libc)}: no zmq_msg_init in it or the libraries it uses"
    ):
        load_zmq(libc)
    c = CUpstream(link.xsub.underlying)  # the functions of pyzmq's libzmq, still in place
    try:
        link.up.send_multipart(message())
        pass_until(c, link.feed, lambda c: c.messages == 1)
        assert link.reader.poll(5000) and link.reader.recv_multipart() == message()
    finally:
        c.close()
