"""The feed's own ZMTP server (nflogd/feed/server.py): what libzmq peers and hand-made ZMTP peers get.

Real sockets on loopback and ipc, a real Publisher; the raw peers speak ZMTP 3 by hand, as
anyone can (rfc.zeromq.org/spec/23), to reach what libzmq would never send.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import time
from types import SimpleNamespace

import pytest
import zmq
from nflogd_client import wire
from pubutil import RawPeer, serve

from nflogd.config_publish import PublishConfig
from nflogd.feed.codec import GREETING_REST, MAX_FRAME, PARTIAL_GREETING
from nflogd.feed.codec import ready as server_ready
from nflogd.publish import Publisher

pytestmark = pytest.mark.timeout(30)


def greeting(minor: int = 0) -> bytes:
    """A client's ZMTP 3.x greeting with the NULL mechanism (3.0 unless told)."""
    return b"\xff" + bytes(8) + b"\x7f" + bytes([3, minor]) + b"NULL".ljust(20, b"\0") + bytes(32)


def frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body


def command(name: bytes, data: bytes = b"") -> bytes:
    return frame(bytes([len(name)]) + name + data, flags=4)


def ready(kind: bytes = b"SUB") -> bytes:
    return command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", len(kind)) + kind)


class Raw(RawPeer):
    """A hand-made ZMTP peer of the publisher ``pub`` on its ipc path."""

    def __init__(self, pub: Publisher, path: str):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(path)
        super().__init__(pub, sock)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frames(self) -> list[bytes]:
        """One message (or command) from the server: its frames' bodies."""
        out = []
        while True:
            flags, size = self.read(2)
            if flags & 2:
                size = struct.unpack(">Q", bytes([size]) + self.read(7))[0]
            out.append(self.read(size))
            if not flags & 1:
                return out


@pytest.fixture
def pub(ctx, tmp_path):
    p = Publisher(PublishConfig(bind=(f"ipc://{tmp_path}/f.sock",)), node="n1", epoch=7)
    yield p
    p.close(linger=0)


@pytest.fixture
def path(tmp_path):
    return f"{tmp_path}/f.sock"


def handshake(pub, path) -> Raw:
    raw = Raw(pub, path)
    assert raw.read(len(PARTIAL_GREETING)) == PARTIAL_GREETING  # signature, major version 3
    raw.send(greeting() + ready())
    assert raw.read(len(GREETING_REST)) == GREETING_REST  # 3.1, NULL
    assert raw.read(len(server_ready())) == server_ready()  # READY with Socket-Type XPUB
    return raw


def batch(group: int, tag: bytes):
    pkts = [wire.Packet.build(group, tag, ts_ns=10**18)]
    count, table, data = wire.pack_records(pkts)

    return SimpleNamespace(group=group, count=count, table=table, data=data)  # a KernelBatch


def delivered(pub, sock, group: int, data: bytes) -> bool:
    """Whether a message of ``group`` carrying ``data``, published now, is what the libzmq
    socket ``sock`` receives next."""
    pub.publish(batch(group, data))
    return bool(sock.poll(2000)) and wire.decode(sock.recv_multipart()).packets[0].data == data


def test_the_server_speaks_zmtp_3_and_filters_by_topic(pub, path):
    """ZMTP 3.0 subscriptions (a message with a leading 1) and 3.1's SUBSCRIBE command both
    count; each peer gets the groups it asked for, as wire format v1 frames."""
    raw = handshake(pub, path)
    raw.send(frame(b"\x01" + wire.topic(5)) + command(b"SUBSCRIBE", wire.topic(6)))
    serve(pub, lambda: pub.subscription_messages == 2, "two subscriptions")
    for group in (4, 5, 6):
        pub.publish(batch(group, b"g%d" % group))
    got = [wire.decode(raw.frames()) for _ in range(2)]
    assert [(b.group, b.node, b.epoch, b.packets[0].data) for b in got] == [
        (5, "n1", 7, b"g5"),
        (6, "n1", 7, b"g6"),
    ]
    raw.send(command(b"CANCEL", wire.topic(6)))
    serve(pub, lambda: pub.subscription_messages == 3, "the cancel")
    pub.publish(batch(6, b"no"))
    pub.publish(batch(5, b"yes"))
    assert wire.decode(raw.frames()).packets[0].data == b"yes"
    raw.close()


def test_ping_gets_a_pong_with_its_context(pub, path):
    """A peer with heartbeats (the relay's upstream XSUB) gets each PING answered."""
    raw = handshake(pub, path)
    raw.send(command(b"PING", b"\x00\x0a" + b"ctx-1"))
    assert raw.frames() == [b"\x04PONG" + b"ctx-1"]
    raw.close()


def test_libzmq_heartbeats_keep_a_quiet_connection(ctx, pub, path):
    """A libzmq XSUB with a 0.3 s heartbeat timeout stays connected through 1.5 s of silence."""
    xsub = ctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.HEARTBEAT_IVL, 100)
    xsub.setsockopt(zmq.HEARTBEAT_TIMEOUT, 300)
    events = xsub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        xsub.connect(f"ipc://{path}")
        xsub.send(b"\x01")
        serve(pub, lambda: pub.subscription_messages == 1, "the subscription")
        end = time.monotonic() + 1.5
        serve(pub, lambda: time.monotonic() > end, "")
        assert not events.poll(0), "the heartbeat timed out"
        assert delivered(pub, xsub, 3, b"after")
    finally:
        xsub.disable_monitor()
        events.close(linger=0)
        xsub.close(linger=0)


@pytest.mark.parametrize(
    "sent, why",
    [
        (b"GET / HTTP/1.1\r\n\r\n", "not ZMTP"),
        (b"\xff" + bytes(8) + b"\x7f" + b"\x00" + bytes(53), "version 0"),
        (b"\xff" + bytes(8) + b"\x7f" + b"\x01\x00\x00\x00", "a ZMTP 2.0 PAIR"),
        (b"\xff" + bytes(8) + b"\x7f\x03\x00" + b"PLAIN".ljust(20, b"\0") + bytes(32), "PLAIN"),
        (greeting() + ready(b"PUB"), "a PUB"),
        (greeting() + frame(b"\x01"), "a message before READY"),
        (greeting() + ready() + frame(b"\x01" + bytes(MAX_FRAME)), "a frame past MAX_FRAME"),
        (greeting() + ready() + b"\x02" + struct.pack(">Q", 1 << 40), "a 1 TiB frame"),
        (greeting() + ready() + b"\x40\x01\x01", "unknown flags"),
        (greeting() + ready() + frame(b"\x01" + b"abc"), "a topic no group has"),
    ],
)  # fmt: skip
def test_a_peer_breaking_the_rules_is_hung_up_on(ctx, pub, path, sent, why):
    """Each breach closes that peer's connection, and only it: a libzmq SUB beside it gets
    the feed on, and nothing is left of the peer."""
    sub = ctx.socket(zmq.SUB)
    sub.connect(f"ipc://{path}")
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    serve(pub, lambda: pub.subscription_messages == 1, "the SUB's subscription")
    raw = Raw(pub, path)
    raw.send(sent)
    assert raw.closed_by_server(), why
    serve(pub, lambda: pub.subscribers == 1, "the peer gone")
    assert delivered(pub, sub, 2, b"on")
    assert pub.dropped_peers == (1 if why == "a topic no group has" else 0)
    raw.close()
    sub.close(linger=0)


def test_a_foreign_topic_closes_only_its_connection_on_loopback_tcp(ctx):
    """Every loopback tcp peer has the same address: the XPUB could only hang up on all of
    them; the server closes the one that sent the topic."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ep = f"tcp://127.0.0.1:{port}"
    pub = Publisher(PublishConfig(bind=(ep,)))
    sub = ctx.socket(zmq.SUB)
    bad = socket.create_connection(("127.0.0.1", port))
    try:
        sub.connect(ep)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        serve(pub, lambda: pub.subscription_messages == 1, "the SUB's subscription")
        bad.sendall(greeting() + ready() + frame(b"\x01" + b"abc"))
        serve(pub, lambda: pub.dropped_peers == 1 and pub.subscribers == 1, "the foreign topic's peer gone")
        assert delivered(pub, sub, 1, b"still here")
    finally:
        bad.close()
        sub.close(linger=0)
        pub.close(linger=0)


def test_a_silent_peer_is_dropped_at_the_handshake_timeout(ctx, tmp_path, caplog):
    path = f"{tmp_path}/f.sock"
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",), handshake_timeout_ms=200))
    raws: list[Raw] = []
    try:
        raws += [Raw(pub, path) for _ in range(3)]
        serve(pub, lambda: pub.subscribers == 3, "three peers")
        t0 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="nflogd.publish"):
            serve(pub, lambda: pub.subscribers == 0, "silent peers dropped")
        assert 0.15 < time.monotonic() - t0 < 2 and pub.handshake_timeouts == 3
        assert pub.next_check_ms() is None  # nothing left to time out
        assert sum("did not finish the handshake" in r.getMessage() for r in caplog.records) == 1
        assert all(r.closed_by_server() for r in raws)
    finally:
        for r in raws:
            r.close()
        pub.close(linger=0)


def test_a_stuck_subscriber_costs_at_most_hwm_and_is_warned_of_once(ctx, tmp_path, caplog):
    """A peer that subscribes and never reads: its socket fills, then hwm messages are
    queued for it, the rest dropped and counted; one warning; a reader beside it loses
    nothing."""
    path = f"{tmp_path}/f.sock"
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",), hwm=20))
    good = ctx.socket(zmq.SUB)
    good.setsockopt(zmq.RCVHWM, 0)
    try:
        stuck = handshake(pub, path)
        stuck.send(frame(b"\x01"))
        good.connect(f"ipc://{path}")
        good.setsockopt(zmq.SUBSCRIBE, b"")
        serve(pub, lambda: pub.subscription_messages == 2, "both subscriptions")
        b = batch(1, b"x" * 1400)
        got = 0
        with caplog.at_level(logging.WARNING, logger="nflogd.publish"):
            for _ in range(3000):  # at the good reader's pace
                pub.publish(b)
                pub.handle_incoming()
                assert good.poll(2000)
                good.recv_multipart()
                got += 1
        assert got == 3000 and not good.poll(200)
        assert pub.slow_dropped > 2000 and pub.queued == 20
        assert sum("is too slow" in r.getMessage() for r in caplog.records) == 1
        stuck.close()
        serve(pub, lambda: pub.subscribers == 1 and pub.queued == 0, "the stuck peer gone, its queue freed")
    finally:
        good.close(linger=0)
        pub.close(linger=0)


# -- the limits of docs/security.md: per source, idle, the bytes queued -----------------------

HOLD_IPC = r"""
import socket, struct, sys, time
GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x01" + b"NULL".ljust(20, b"\0") + b"\0" * 32
BODY = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 3) + b"SUB"
conns = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    try:
        s.sendall(GREETING + b"\x04" + bytes([len(BODY)]) + BODY)
    except OSError:  # closed at once
        pass
    conns.append(s)
time.sleep(1.0)
alive = 0
for s in conns:
    s.setblocking(False)
    try:
        while s.recv(65536):
            pass
    except BlockingIOError:
        alive += 1
    except OSError:
        pass
print(alive, flush=True)
sys.stdin.read()
"""


@pytest.mark.kernel
def test_one_uid_holds_at_most_its_share_of_ipc_connections(ctx, caplog):
    """uid 65534 opens 12 handshaken ipc connections with publish.max_connections_per_source
    5: 5 stay, 7 are closed at once (its uid, from SO_PEERCRED), counted and logged once; a
    reader of another uid connects beside them and is served."""
    import os
    import select
    import shutil
    import subprocess
    import tempfile

    where = tempfile.mkdtemp()
    os.chmod(where, 0o755)
    path = f"{where}/f.sock"
    ep = f"ipc://{path}"
    pub = Publisher(PublishConfig(bind=(ep,), max_connections_per_source=5, idle_timeout_ms=0))
    os.chmod(path, 0o777)
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/usr/bin/python3"]
    proc = subprocess.Popen(
        [*nobody, "-c", HOLD_IPC, path, "12"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    sub = ctx.socket(zmq.SUB)
    lines: list[bytes] = []

    def printed() -> bool:
        assert proc.stdout is not None
        if select.select([proc.stdout], [], [], 0)[0]:
            lines.append(proc.stdout.readline())
        return bool(lines)

    try:
        with caplog.at_level(logging.WARNING, logger="nflogd.publish"):
            serve(pub, printed, "the held connections counted", 10)
        assert int(lines[0]) == 5 and pub.source_refused == {ep: 7} and pub.refused == {}
        sub.connect(ep)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        serve(pub, lambda: pub.subscription_messages == 1, "the reader's subscription")
        assert delivered(pub, sub, 3, b"beside them") and pub.subscribers == 6
        assert sum("publish.max_connections_per_source" in r.getMessage() for r in caplog.records) == 1
    finally:
        proc.kill()
        proc.communicate()
        sub.close(linger=0)
        pub.close(linger=0)
        shutil.rmtree(where)


def test_a_peer_subscribed_to_nothing_is_hung_up_on_after_the_idle_timeout(ctx, tmp_path, caplog):
    """publish.idle_timeout_ms: a peer with its handshake done and no topic, and one that
    cancelled its only topic, are hung up on when it runs out (counted, logged once); a
    subscribed reader stays."""
    path = f"{tmp_path}/f.sock"
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",), idle_timeout_ms=1000))
    sub = ctx.socket(zmq.SUB)
    try:
        sub.connect(f"ipc://{path}")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        idle = handshake(pub, path)
        t0 = time.monotonic()
        fickle = handshake(pub, path)
        fickle.send(frame(b"\x01" + wire.topic(2)))
        serve(pub, lambda: pub.subscription_messages == 2, "two subscriptions")
        assert pub.next_check_ms() is not None  # the loop wakes for the timeout
        end = time.monotonic() + 0.5
        serve(pub, lambda: time.monotonic() > end, "")
        fickle.send(frame(b"\x00" + wire.topic(2)))
        t1 = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="nflogd.publish"):
            serve(pub, lambda: pub.idle_hangups == 1, "the idle peer hung up on")
            assert 0.9 < time.monotonic() - t0 < 2.5
            serve(pub, lambda: pub.idle_hangups == 2, "the peer that cancelled hung up on")
            assert 0.9 < time.monotonic() - t1 < 2.5
        assert idle.closed_by_server() and fickle.closed_by_server()
        assert pub.subscribers == 1 and delivered(pub, sub, 2, b"still subscribed")
        assert sum("subscribed to nothing" in r.getMessage() for r in caplog.records) == 1
        idle.close()
        fickle.close()
    finally:
        sub.close(linger=0)
        pub.close(linger=0)


def test_slow_subscribers_share_one_cap_of_queued_bytes(ctx, tmp_path, caplog):
    """Four peers that subscribe and never read, publish.max_queued_bytes 1 MiB, hwm far
    above: what is queued for them stays at the cap (a message queued for all four counts
    once), the rest is dropped, counted, warned of once; a reader beside them loses nothing;
    when they go, the bytes are given back."""
    path = f"{tmp_path}/f.sock"
    cap = 1 << 20
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",), hwm=1_000_000, max_queued_bytes=cap))
    good = ctx.socket(zmq.SUB)
    good.setsockopt(zmq.RCVHWM, 0)
    stuck: list[Raw] = []
    try:
        for _ in range(4):
            stuck.append(handshake(pub, path))
            stuck[-1].send(frame(b"\x01"))
        good.connect(f"ipc://{path}")
        good.setsockopt(zmq.SUBSCRIBE, b"")
        serve(pub, lambda: pub.subscription_messages == 5, "five subscriptions")
        b = batch(1, b"x" * 1400)
        peak = 0
        with caplog.at_level(logging.WARNING, logger="nflogd.publish"):
            for _ in range(3000):
                pub.publish(b)
                pub.handle_incoming()
                peak = max(peak, pub.queued_bytes)
                assert good.poll(2000)
                good.recv_multipart()
        assert cap - 4096 < peak <= cap + 4 * 2048  # the cap, and at most a begun message each
        assert pub.full_dropped > 1000 and pub.slow_dropped == pub.full_dropped  # none at hwm
        assert not good.poll(100)
        assert sum("publish.max_queued_bytes" in r.getMessage() for r in caplog.records) == 1
        for r in stuck:
            r.close()
        serve(pub, lambda: pub.subscribers == 1 and pub.queued_bytes == 0, "the bytes given back")
    finally:
        for r in stuck:
            r.close()
        good.close(linger=0)
        pub.close(linger=0)


def test_the_last_words_count_the_packets_a_slow_peer_never_got(ctx, tmp_path, caplog):
    """A peer that reads nothing holds the publisher's queue for it; closed (as on SIGTERM)
    after its linger, the publisher says how many packets it could not send: with what the
    peer's socket had taken, every packet published."""
    path = f"{tmp_path}/f.sock"
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",), hwm=100_000), node="n1", epoch=7)
    raw = handshake(pub, path)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.send(frame(b"\x01"))  # subscribed to every group
    serve(pub, lambda: pub.subscription_messages > 0, "the subscription")
    sent = 0
    for i in range(300):
        pkts = [wire.Packet.build(3, b"%04d" % i + bytes(300), ts_ns=10**18) for _ in range(1 + i % 3)]
        count, table, data = wire.pack_records(pkts)
        pub.publish(SimpleNamespace(group=3, count=count, table=table, data=data))
        sent += count
    assert pub.queued > 0
    with caplog.at_level("WARNING", logger="nflogd.publish"):
        pub.close(linger=0)
    (line,) = [r.getMessage() for r in caplog.records if "not sent" in r.getMessage()]
    lost = int(re.search(r"stopped with (\d+) packets not sent", line).group(1))
    raw.sock.setblocking(True)
    rest = b""
    while chunk := raw.sock.recv(1 << 16):
        rest += chunk
    raw.close()
    got, frames, k = 0, [], 0
    buf = raw.buf + rest
    while k + 2 <= len(buf):  # whole messages only: one cut short was not delivered
        flags, size, head = buf[k], buf[k + 1], 2
        if flags & 2:
            size, head = struct.unpack(">Q", buf[k + 1 : k + 9])[0], 9
        if k + head + size > len(buf):
            break
        frames.append(buf[k + head : k + head + size])
        k += head + size
        if not flags & 1:
            got += len(wire.decode(frames).packets)
            frames = []
    assert lost > 0 and got + lost == sent
