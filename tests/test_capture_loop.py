"""capture_loop.CaptureLoop: a group read and published by its own thread, in C or in Python.

Real kernel, real feed: a group bound in the test's namespace, a Publisher on an ipc path, a
SUB socket reading what the loop sent.
"""

from __future__ import annotations

import sys
import threading
import time

import pytest
import zmq
from nflogd_client import wire

from nflogd.capture import GroupReader
from nflogd.capture_loop import WAIT_S, CaptureLoop
from nflogd.config import GroupConfig
from nflogd.config_publish import PublishConfig
from nflogd.publish import Publisher

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]

GROUP = 7


def feed(ctx, tmp_path, node: str = "r1", rcvhwm: int = 0):
    """A Publisher on an ipc endpoint and a SUB socket it has seen subscribe."""
    ep = f"ipc://{tmp_path}/feed.sock"
    pub = Publisher(PublishConfig(bind=(ep,)), node=node, epoch=42)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    sub.connect(ep)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    end = time.monotonic() + 5
    while pub.subscription_messages == 0:
        assert time.monotonic() < end, "no subscription reached the publisher"
        pub.handle_incoming()
        time.sleep(0.01)
    return pub, sub


def messages(sub, packets: int, deadline: float = 5.0, pub: Publisher | None = None) -> list[list[bytes]]:
    """Raw messages until they hold ``packets`` packets or the deadline passed (``pub``'s
    control-loop side run meanwhile: it writes what a slow subscriber has queued)."""
    out, n = [], 0
    end = time.monotonic() + deadline
    while n < packets and time.monotonic() < end:
        if pub is not None:
            pub.handle_incoming()
        if sub.poll(100):
            msg = sub.recv_multipart()
            out.append(msg)
            n += len(wire.decode(msg).packets)
    return out


def run_loop(reader, pub, netns, payloads, port: int = 9999) -> CaptureLoop:
    failed = threading.Event()
    loop = CaptureLoop(reader, pub, on_error=failed.set)
    loop.start()
    netns.send_udp(payloads, port=port)
    return loop


def test_c_and_python_senders_write_the_same_feed(netns, ctx, tmp_path):
    """The C sender's messages are wire format v1 as wire.frames() makes it, and the feed's
    sequence carries on when a group's loop changes sender (the handover of first_seq)."""
    netns.log_rule(GROUP, match="udp dport 9999", extra='prefix "c7"')
    with netns.entered():
        reader = GroupReader(GroupConfig(group=GROUP, flush_ms=10))
        pub, sub = feed(ctx, tmp_path)
    assert pub.cfeed is not None
    cfeed = pub.cfeed
    try:
        sent_c = [b"c%03d" % i for i in range(40)]
        loop = run_loop(reader, pub, netns, sent_c)
        got_c = messages(sub, len(sent_c))
        loop.stop()
        # the same group again, its loop now on the Python sender
        pub.cfeed = None
        sent_py = [b"p%03d" % i for i in range(25)]
        loop = run_loop(reader, pub, netns, sent_py)
        got_py = messages(sub, len(sent_py))
        loop.stop()
    finally:
        pub.cfeed = cfeed
        sub.close(linger=0)
        pub.close(linger=0)
        reader.close()
    seq = 0
    for msgs, sent in ((got_c, sent_c), (got_py, sent_py)):
        payloads = []
        for msg in msgs:
            b = wire.decode(msg)
            assert (b.group, b.node, b.epoch, b.first_seq, b.kernel_dropped) == (GROUP, "r1", 42, seq, 0)
            # byte for byte what the Python encoder makes of the same record table and data
            assert msg == wire.frames(GROUP, "r1", 42, seq, 0, len(b.packets), msg[2], msg[3])
            seq += len(b.packets)
            payloads += [p.data[28:] for p in b.packets]
            assert all(p.prefix == "c7" and p.len == p.caplen == len(p.data) for p in b.packets)
        assert payloads == sent
    assert pub.next_seq(GROUP) == len(sent_c) + len(sent_py)
    assert reader.counters.packets == len(sent_c) + len(sent_py)


def slow_subscriber(netns, ctx, tmp_path):
    """3000 packets of 1000 bytes read and sent while the subscriber reads nothing (its
    socket full, then its queue); the reader and its loop end before it reads. Every message
    it reads then is intact, byte for byte, and none is missing."""
    netns.log_rule(GROUP, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=GROUP, flush_ms=10, rcvbuf=8 << 20))
        pub, sub = feed(ctx, tmp_path, rcvhwm=1)
    assert pub.cfeed is not None
    sent = [b"%05d" % i + bytes([i % 251]) * 995 for i in range(3000)]
    try:
        loop = run_loop(reader, pub, netns, sent)
        end = time.monotonic() + 10
        while reader.counters.packets < len(sent):
            assert time.monotonic() < end, reader.counters
            time.sleep(0.05)
        loop.stop()
        reader.close()
        got = messages(sub, len(sent), deadline=10, pub=pub)
    finally:
        sub.close(linger=0)
        pub.close(linger=0)
        reader.close()
    assert sum(len(m[3]) for m in got) > 2 << 20 and max(len(m[3]) for m in got) > 64 << 10
    payloads, seq = [], 0
    for msg in got:
        b = wire.decode(msg)
        assert msg == wire.frames(GROUP, "r1", 42, seq, 0, len(b.packets), msg[2], msg[3])
        seq += len(b.packets)
        payloads += [p.data[28:] for p in b.packets]
    assert payloads == sent
    return pub


def test_a_slow_subscriber_gets_its_queue_intact(netns, ctx, tmp_path):
    """The feed's own peers: what a subscriber's socket does not take is queued for it (a
    copy), and written as the socket drains, after the reader is gone."""
    pub = slow_subscriber(netns, ctx, tmp_path)
    assert pub.slow_dropped == 0


def test_stop_ends_the_wait_at_once(netns, ctx, tmp_path):
    with netns.entered():
        reader = GroupReader(GroupConfig(group=GROUP))
        pub, sub = feed(ctx, tmp_path)
    try:
        loop = CaptureLoop(reader, pub, on_error=lambda: None)
        loop.start()
        time.sleep(0.2)  # inside its wait for the kernel, which has no end in C
        t0 = time.monotonic()
        loop.stop()
        assert not loop.alive and time.monotonic() - t0 < WAIT_S / 2
    finally:
        sub.close(linger=0)
        pub.close(linger=0)
        reader.close()


SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n, rate = int(sys.argv[1]), float(sys.argv[2])
t0 = time.monotonic()
for i in range(n):
    s.sendto(b"x%05d" % i, ("127.0.0.1", 9999))
    time.sleep(max(0.0, t0 + (i + 1) / rate - time.monotonic()))
"""


def under_a_gil_hog(netns, ctx, tmp_path, c_sender: bool, count: int = 3000) -> tuple[int, GroupReader]:
    """``count`` packets at 1,500/s from another process to a group whose receive buffer holds
    one kernel batch, while this thread keeps the GIL for 2.5 s; then one more packet (a drop
    shows once the group's next packet arrives). Returns (packets on the feed, the reader)."""
    netns.log_rule(GROUP, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=GROUP, rcvbuf=4096, queue_threshold=8, flush_ms=10))
        pub, sub = feed(ctx, tmp_path)
    if not c_sender:
        pub.cfeed = None
    old = sys.getswitchinterval()
    try:
        loop = CaptureLoop(reader, pub, on_error=lambda: None)
        loop.start()
        sender = netns.popen(sys.executable, "-c", SENDER, str(count), "1500")
        sys.setswitchinterval(1.0)  # other Python threads get the GIL about once a second
        end = time.monotonic() + 2.5
        while time.monotonic() < end:  # the control thread, busy in Python
            pass
        sys.setswitchinterval(old)
        assert sender.wait(10) == 0
        netns.send_udp([b"last"])
        got = sum(len(wire.decode(m).packets) for m in messages(sub, count + 1, deadline=5))
        loop.stop()
    finally:
        sys.setswitchinterval(old)
        sub.close(linger=0)
        pub.close(linger=0)
        reader.close()
    return got, reader


def test_reading_goes_on_while_another_thread_holds_the_gil(netns, ctx, tmp_path):
    """The C loop reads and sends without the GIL: nothing is lost."""
    got, reader = under_a_gil_hog(netns, ctx, tmp_path, c_sender=True)
    assert (got, reader.counters.kernel_dropped, reader.counters.overflows) == (3001, 0, 0)


def test_fallback_python_loop_loses_packets_when_the_gil_is_held(netns, ctx, tmp_path):
    """The Python sender needs the GIL for every batch, so the kernel drops, and every drop
    is counted (read + dropped == sent)."""
    got, reader = under_a_gil_hog(netns, ctx, tmp_path, c_sender=False)
    assert reader.counters.kernel_dropped > 0
    assert got + reader.counters.kernel_dropped == 3001


def switches(thread: threading.Thread) -> int:
    """The thread's context switches so far (each wake-up is one)."""
    with open(f"/proc/self/task/{thread.native_id}/status") as f:
        status = f.read()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches" in line)


@pytest.mark.parametrize("c_sender", [True, False], ids=["C", "Python"])
def test_a_group_gone_idle_sends_its_sequence_mark_once(netns, ctx, tmp_path, c_sender):
    """A second after a group's last packet, its sequence mark: a message of no packets whose
    first_seq is where the sequence stands, so that a reader learns the end of what was sent.
    Then nothing more, and (in C) no wake-up, until the next packet; a stop marks again."""
    netns.log_rule(GROUP, match="udp dport 9999")
    with netns.entered():
        reader = GroupReader(GroupConfig(group=GROUP, flush_ms=10))
        pub, sub = feed(ctx, tmp_path)
    if not c_sender:
        pub.cfeed = None
    loop = None
    try:
        loop = run_loop(reader, pub, netns, [b"a%03d" % i for i in range(30)])
        got = messages(sub, 30)
        t_last = time.monotonic()
        assert sum(len(wire.decode(m).packets) for m in got) == 30
        assert sub.poll(3000), "no mark"
        mark = wire.decode(sub.recv_multipart())
        waited = time.monotonic() - t_last
        assert (mark.packets, mark.first_seq, mark.epoch, mark.node) == ([], 30, 42, "r1")
        assert 0.5 < waited < 2.5, waited
        time.sleep(0.2)  # the thread back in its wait once the mark is out
        idle_from = switches(loop._thread)
        assert not sub.poll(2500), "more than one mark"
        if c_sender:
            assert switches(loop._thread) == idle_from, "the idle capture thread woke up"
        netns.send_udp([b"b%03d" % i for i in range(5)])
        got = messages(sub, 5)
        assert wire.decode(got[0]).first_seq == 30
        assert sub.poll(3000)
        assert wire.decode(sub.recv_multipart()).first_seq == 35  # idle again: marked again
        netns.send_udp([b"c"])
        messages(sub, 1)
        loop.stop()  # before a second's idle: the stop marks
        assert sub.poll(1000)
        last = wire.decode(sub.recv_multipart())
        assert (last.packets, last.first_seq) == ([], 36)
    finally:
        if loop is not None:
            loop.stop()  # a failure above must not leave the thread on a closed reader
        sub.close(linger=0)
        pub.close(linger=0)
        reader.close()
