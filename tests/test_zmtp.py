"""The feed's own ZMTP server (nflogd/zmtp.py): what libzmq peers and hand-made ZMTP peers get.

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
from pubutil import serve

from nflogd.config import PublishConfig
from nflogd.publish import Publisher
from nflogd.zmtp import HELLO, MAX_FRAME, greeting

pytestmark = pytest.mark.timeout(30)


def frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body


def command(name: bytes, data: bytes = b"") -> bytes:
    return frame(bytes([len(name)]) + name + data, flags=4)


def ready(kind: bytes = b"SUB") -> bytes:
    return command(b"READY", b"\x0bSocket-Type" + struct.pack(">I", len(kind)) + kind)


class Raw:
    """A hand-made ZMTP peer of the publisher ``pub`` (served while it waits)."""

    def __init__(self, pub: Publisher, path: str):
        self.pub = pub
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

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

    def closed_by_server(self, timeout: float = 3.0) -> bool:
        while self.read(1 << 20, timeout=timeout):
            pass
        return True

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def pub(ctx, tmp_path):
    p = Publisher(ctx, PublishConfig(bind=(f"ipc://{tmp_path}/f.sock",)), node="n1", epoch=7)
    yield p
    p.close(linger=0)


@pytest.fixture
def path(tmp_path):
    return f"{tmp_path}/f.sock"


def handshake(pub, path) -> Raw:
    raw = Raw(pub, path)
    assert raw.read(len(HELLO)) == HELLO  # greeting, NULL, READY with Socket-Type XPUB
    raw.send(greeting() + ready())
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
        (b"\xff" + bytes(8) + b"\x7f" + b"\x02\x00" + bytes(52), "version 2"),
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
    pub = Publisher(ctx, PublishConfig(bind=(ep,)))
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
    pub = Publisher(ctx, PublishConfig(bind=(f"ipc://{path}",), handshake_timeout_ms=200))
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
    pub = Publisher(ctx, PublishConfig(bind=(f"ipc://{path}",), hwm=20))
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


def test_the_last_words_count_the_packets_a_slow_peer_never_got(ctx, tmp_path, caplog):
    """A peer that reads nothing holds the publisher's queue for it; closed (as on SIGTERM)
    after its linger, the publisher says how many packets it could not send: with what the
    peer's socket had taken, every packet published."""
    path = f"{tmp_path}/f.sock"
    pub = Publisher(ctx, PublishConfig(bind=(f"ipc://{path}",), hwm=100_000), node="n1", epoch=7)
    raw = Raw(pub, path)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    assert raw.read(len(HELLO)) == HELLO
    raw.send(greeting() + ready() + frame(b"\x01"))  # subscribed to every group
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
