"""The feed's CURVE endpoints (nflogd/feed/curve.py on the own server) against libzmq and by hand.

libzmq is the reference: the venv's pyzmq and Debian's python3-zmq (two libzmq versions), as
SUB and XSUB, each in a process of its own, must read every message of their group. The
CurveZMQ rules of rfc.zeromq.org/spec/26 for the server are held by a client made by hand
(``fuzz/fuzz_curve.py``'s ``Client``, libsodium through PyNaCl) over real sockets: keys refused
with an ERROR, replayed and malformed handshakes hung up on, the handshake a byte at a time,
the boxed traffic with nonces that only grow, a stalled greeting counted at its timeout.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest
import zmq
import zmq.auth
from fuzzutil import fuzzer
from nflogd_client import Subscriber, wire
from pubutil import RawPeer, serve
from test_interop import DEBIAN_PYTHON, MESSAGES, PYZMQ_READER, available, batch, free_port, read_through
from zmq.utils import z85

from nflogd.config_publish import CurveConfig, PublishConfig
from nflogd.feed.codec import CURVE_GREETING_REST, PARTIAL_GREETING
from nflogd.feed.curve import CurveKeys
from nflogd.metrics import limit_families
from nflogd.publish import Publisher

pytestmark = pytest.mark.timeout(60)

harness = fuzzer("curve")
Client, frame, greeting = harness.Client, harness.frame, harness.greeting

#: A libzmq reader with CURVE keys from argv[5:8] (server, public, secret; Z85), then
#: test_interop's reader.
CURVE_READER = (
    "import sys, zmq\n"
    "_keys = [k.encode() for k in sys.argv[5:8]]\n"
    "_socket = zmq.Context.socket\n"
    "def socket(self, kind, **kw):\n"
    "    s = _socket(self, kind, **kw)\n"
    "    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = _keys\n"
    "    return s\n"
    "zmq.Context.socket = socket\n"
) + PYZMQ_READER


@pytest.fixture
def keys():
    server = zmq.curve_keypair()
    alice = zmq.curve_keypair()
    raw = CurveKeys(z85.decode(server[0]), z85.decode(server[1]), frozenset([z85.decode(alice[0])]))
    return server, alice, raw


@pytest.fixture
def pub(ctx, keys):
    server, _, raw = keys
    curve = CurveConfig("server.key_secret", "clients", server[0], server[1])
    cfg = PublishConfig(bind=(f"tcp://127.0.0.1:{free_port()}",), curve=curve, handshake_timeout_ms=1000)
    p = Publisher(cfg, node="n", curve_keys=raw)
    yield p
    p.close(linger=0)


def port(pub) -> int:
    return int(pub.endpoints[0].rpartition(":")[2])


_OPEN: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_raw():
    yield
    while _OPEN:
        _OPEN.pop().close()


class Raw(RawPeer):
    """A hand-made peer on loopback tcp (closed after the test)."""

    def __init__(self, pub: Publisher, rcvbuf: int = 0):
        sock = socket.socket()
        if rcvbuf:  # before the connect: the window it offers stays small
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", port(pub)))
        _OPEN.append(sock)
        super().__init__(pub, sock)

    def send(self, data: bytes, step: int = 0) -> None:
        for at in range(0, len(data), step or len(data)):
            self.sock.sendall(data[at : at + (step or len(data))])
            if step:
                self.pub.handle_incoming()

    def command(self) -> bytes:
        """One frame's body (commands and MESSAGEs alike)."""
        head = self.read(2)
        if not head:
            return b""
        flags, size = head
        if flags & 2:
            size = int.from_bytes(bytes([size]) + self.read(7), "big")
        return self.read(size)


def handshake(pub, client: Client, step: int = 0, rcvbuf: int = 0) -> Raw:
    raw = Raw(pub, rcvbuf)
    assert raw.read(11) == PARTIAL_GREETING
    raw.send(greeting() + client.hello(), step)
    assert raw.read(53) == CURVE_GREETING_REST  # 3.1, CURVE, as-server
    client.welcome(raw.command())
    raw.send(client.initiate(), step)
    assert client.ready(raw.command()) == b"\x0bSocket-Type\x00\x00\x00\x04XPUB"
    return raw


def client_for(keys, pair=None) -> Client:
    server, alice, _ = keys
    pair = pair or alice
    return Client(z85.decode(server[0]), (z85.decode(pair[0]), z85.decode(pair[1])))


# -- libzmq, the reference ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["pyzmq", "debian-pyzmq"])
@pytest.mark.parametrize("kind", ["SUB", "XSUB"])
def test_every_message_of_its_group_reaches_a_libzmq_curve_reader(pub, keys, impl, kind):
    if not available(impl):
        pytest.fail(f"{impl} is not installed: make deps installs it (TEST_DEBS)")
    server, alice, _ = keys
    python = sys.executable if impl == "pyzmq" else DEBIAN_PYTHON
    cmd = [python, "-c", CURVE_READER, kind, pub.endpoints[0], wire.topic(1).hex(), str(MESSAGES),
           server[0].decode(), alice[0].decode(), alice[1].decode()]  # fmt: skip
    version, got, sent, err = read_through(
        pub,
        cmd,
        lambda i: b"%s %s %d " % (impl.encode(), kind.encode(), i) + bytes(300 if i % 20 == 0 else i % 10),
    )
    assert got == sent, (impl, kind, version, len(got), err[-2000:])


def test_a_libzmq_reader_whose_key_is_not_admitted_is_told_400(ctx, pub, keys, caplog):
    """The server answers INITIATE with ERROR "400" (as a ZAP handler's refusal): libzmq
    reports a failed authentication with that status, the daemon counts and logs the key."""
    server, _, _ = keys
    bob = zmq.curve_keypair()
    s = ctx.socket(zmq.SUB)
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server[0], bob[0], bob[1]
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH)
    s.connect(pub.endpoints[0])
    with caplog.at_level("WARNING", logger="nflogd.publish"):
        serve(pub, lambda: mon.poll(0), "the refusal", 10)
    event = zmq.utils.monitor.recv_monitor_message(mon)
    assert event["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH and event["value"] == 400
    assert pub.keys_refused >= 1
    assert f"its CURVE key {bob[0].decode()} is not in publish.curve.authorized_keys_dir" in caplog.text
    s.disable_monitor()
    mon.close(linger=0)
    s.close(linger=0)


def test_a_libzmq_reader_with_the_wrong_server_key_gets_nothing(ctx, pub, keys):
    _, alice, _ = keys
    s = ctx.socket(zmq.SUB)
    s.curve_serverkey = zmq.curve_keypair()[0]
    s.curve_publickey, s.curve_secretkey = alice
    s.subscribe(b"")
    s.connect(pub.endpoints[0])
    serve(pub, lambda: pub.handshake_timeouts >= 1 or pub.subscribers == 0, "the hang-up", 5)
    pub.publish(batch(1, b"secret"))
    assert not s.poll(300)
    assert pub.subscription_messages == 0
    s.close(linger=0)


# -- spec 26, the server's side, by hand ----------------------------------------------------------


def test_the_handshake_and_traffic_a_byte_at_a_time(pub, keys):
    """Every byte of the client's handshake sent alone; the boxed subscription, PING and the
    feed's boxed messages with nonces that grow by one from READY's."""
    client = client_for(keys)
    raw = handshake(pub, client, step=1)
    raw.send(client.message(b"\x01" + wire.topic(5)) + client.message(b"\x04PING\x00\x0actx-1", flags=2), 1)
    serve(pub, lambda: pub.subscription_messages == 1, "the subscription")
    body = raw.command()
    assert body[8:16] == (2).to_bytes(8, "big")  # READY had 1
    assert client.open(body) == (2, b"\x04PONGctx-1")
    pub.publish(batch(4, b"not this"))
    pub.publish(batch(5, b"this"))
    frames, nonces = [], []
    while True:
        body = raw.command()
        nonces.append(int.from_bytes(body[8:16], "big"))
        flags, data = client.open(body)
        frames.append(data)
        if not flags & 1:
            break
    assert nonces == [3, 4, 5, 6]
    assert wire.decode(frames).packets[0].data == b"this"


def test_a_replayed_hello_and_initiate_get_no_ready(pub, keys):
    """A HELLO and INITIATE recorded from one connection, sent again on another: the server
    answers the HELLO (it cannot tell) with a new cookie key, and the old INITIATE's cookie
    does not open: hung up on, nothing sent after WELCOME."""
    client = client_for(keys)
    hello = client.hello()
    first = Raw(pub)
    first.read(11)
    first.send(greeting() + hello)
    first.read(53)
    client.welcome(first.command())
    initiate = client.initiate()
    first.send(initiate)
    assert client.ready(first.command())
    again = Raw(pub)
    again.read(11)
    again.send(greeting() + hello)
    again.read(53)
    assert again.command()[:8] == b"\x07WELCOME"
    again.send(initiate)
    assert again.command() == b"" and again.closed_by_server()
    # the same INITIATE twice on one connection: the second is a breach
    third_client = client_for(keys)
    third = handshake(pub, third_client)
    third.send(initiate)
    assert third.command() == b"" and third.closed_by_server()
    assert pub.subscribers == 1  # the first only


@pytest.mark.parametrize(
    "what",
    ["version", "padding", "other server", "short hello", "hello twice", "message first", "null", "as-server",
     "vouch for another server", "no socket type", "pub", "old nonce", "forged box"],
)  # fmt: skip
def test_a_broken_handshake_or_message_is_hung_up_on(pub, keys, what):
    """Each breach of spec 26 (or of ZMTP 3.0's CURVE) ends the connection, and nothing of
    the feed reaches that peer."""
    client = client_for(keys)
    raw = Raw(pub)
    raw.read(11)
    if what in ("null", "as-server"):
        raw.send(greeting(mechanism=b"NULL") if what == "null" else greeting(as_server=1))
        assert raw.closed_by_server()
        return
    hellos = {
        "version": lambda: client.hello(version=b"\x01\x01"),
        "padding": lambda: client.hello(padding=b"\x00" * 71 + b"\x01"),
        "other server": lambda: Client(zmq_key(zmq.curve_keypair()[0])).hello(),
        "short hello": lambda: frame(b"\x05HELLO\x01\x00" + bytes(100), 4),
        "message first": lambda: frame(b"\x07MESSAGE" + bytes(40)),
    }
    if what in hellos:
        raw.send(greeting() + hellos[what]())
        assert raw.closed_by_server()
        return
    raw.send(greeting() + client.hello())
    raw.read(53)
    client.welcome(raw.command())
    if what == "hello twice":
        raw.send(client.hello())
        assert raw.command() == b"" and raw.closed_by_server()
        return
    initiates = {
        "vouch for another server": lambda: client.initiate(vouch_for=bytes(32)),
        "no socket type": lambda: client.initiate(metadata=b""),
        "pub": lambda: client.initiate(metadata=harness.prop(b"Socket-Type", b"PUB")),
    }
    if what in initiates:
        raw.send(initiates[what]())
        assert raw.command() == b"" and raw.closed_by_server()
        return
    raw.send(client.initiate())
    assert client.ready(raw.command())
    serve(pub, lambda: pub.subscribers == 1, "the peer")
    if what == "old nonce":
        raw.send(client.message(b"\x01", nonce=client.nonce - 1))
    else:
        forged = bytearray(client.message(b"\x01"))
        forged[-1] ^= 1
        raw.send(bytes(forged))
    assert raw.closed_by_server()
    assert pub.subscription_messages == 0


def zmq_key(z85_key: bytes) -> bytes:
    return z85.decode(z85_key)


def test_a_stalled_curve_greeting_counts_as_a_handshake_timeout(pub, keys, caplog):
    """A peer that stops after its HELLO is hung up on at publish.handshake_timeout_ms and
    counted, as on a NULL endpoint."""
    client = client_for(keys)
    raw = Raw(pub)
    raw.read(11)
    raw.send(greeting() + client.hello())
    raw.read(53)
    assert raw.command()[:8] == b"\x07WELCOME"
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="nflogd.publish"):
        assert raw.closed_by_server()
    assert 0.5 < time.monotonic() - start < 3
    assert pub.handshake_timeouts == 1
    assert "did not finish the handshake within 1 s" in caplog.text


# -- limits, the same as on NULL endpoints ------------------------------------------------------


def test_a_reader_over_the_connection_limit_is_told_so(ctx, keys, tmp_path):
    """publish.max_connections reached: the next reader, CURVE or not, gets our greeting and an
    ERROR "300" (ZAP's temporary error) before the close, and nflogd_client names the limit,
    not a key."""
    server, _, raw = keys
    curve = CurveConfig("server.key_secret", "clients", server[0], server[1])
    tcp = f"tcp://127.0.0.1:{free_port()}"
    ipc = f"ipc://{tmp_path}/f.sock"
    cfg = PublishConfig(bind=(tcp, ipc), curve=curve, max_connections=1)
    pub = Publisher(cfg, node="n", curve_keys=raw)
    try:
        first = handshake(pub, client_for(keys))
        held = [first]
        ipc_first = ctx.socket(zmq.SUB)
        ipc_first.connect(ipc)
        serve(pub, lambda: pub.subscribers == 2, "the first readers")
        _, keyfile = zmq.auth.create_certificates(str(tmp_path), "carol")
        carol = zmq.auth.load_certificate(keyfile)[0]
        raw.authorized = raw.authorized | {z85.decode(carol)}  # admitted: only the limit refuses her

        readers = [
            Subscriber(tcp, server_public_key=server[0], client_secret_key_file=keyfile, context=ctx),
            Subscriber(ipc, context=ctx),
        ]
        for reader, endpoint in zip(readers, (tcp, ipc)):

            def refused(reader=reader, endpoint=endpoint) -> bool:
                reader.recv(timeout=0)
                return reader.endpoints[endpoint].state == "refused"

            serve(pub, refused, f"the refusal on {endpoint}", 10)
            assert "refused for now" in reader.endpoints[endpoint].error
            assert "publish.max_connections" in reader.endpoints[endpoint].error
            reader.close()
        assert pub.refused[tcp] >= 1 and pub.refused[ipc] >= 1
        assert pub.subscribers == 2 and held
        ipc_first.close(linger=0)
    finally:
        pub.close(linger=0)


def test_stalled_curve_greetings_show_in_the_handshake_timeout_metric(ctx, keys):
    """Peers that stall at each step of the CURVE handshake (no greeting, the greeting only,
    HELLO without INITIATE) are hung up on at publish.handshake_timeout_ms, each counted in
    nflogd_feed_handshake_timeouts_total, and an admitted reader still gets in meanwhile."""
    server, _, raw_keys = keys
    curve = CurveConfig("server.key_secret", "clients", server[0], server[1])
    cfg = PublishConfig(bind=(f"tcp://127.0.0.1:{free_port()}",), curve=curve, handshake_timeout_ms=300)
    pub = Publisher(cfg, node="n", curve_keys=raw_keys)
    try:
        stalled = []
        for step in range(3):
            for _ in range(10):
                client = client_for(keys)
                r = Raw(pub)
                if step >= 1:
                    r.send(greeting())
                if step >= 2:
                    r.send(client.hello())
                stalled.append(r)
        serve(pub, lambda: pub.subscribers == 30, "30 stalled peers")
        reader = handshake(pub, client_for(keys))
        serve(pub, lambda: pub.handshake_timeouts == 30, "30 handshake timeouts", 10)
        assert pub.subscribers == 1 and reader
        families = {f.name: f for f in limit_families("nflogd", pub, None)}
        assert [s.value for s in families["nflogd_feed_handshake_timeouts"].samples] == [30]
    finally:
        pub.close(linger=0)


def test_curve_readers_that_never_read_are_held_to_hwm_and_max_queued_bytes(ctx, keys, caplog):
    """Four admitted CURVE peers that subscribe and never read: each has at most publish.hwm
    messages queued, the rest dropped and counted; a new hwm applies at once to the peers
    connected already; with a high hwm, all of them together hold at most
    publish.max_queued_bytes, warned of once. A CURVE reader beside them loses nothing."""
    server, alice, raw_keys = keys
    curve = CurveConfig("server.key_secret", "clients", server[0], server[1])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = PublishConfig(bind=(endpoint,), curve=curve, hwm=100)
    pub = Publisher(cfg, node="n", curve_keys=raw_keys)
    good = ctx.socket(zmq.SUB)
    good.curve_serverkey, good.curve_publickey, good.curve_secretkey = server[0], alice[0], alice[1]
    good.setsockopt(zmq.RCVHWM, 0)
    b = batch(1, b"x" * 16000)  # what the kernel takes for a peer (its send buffer grows
    # to tcp_wmem's 4 MiB) is passed by a few hundred of them

    def publish(n: int) -> None:
        for _ in range(n):
            pub.publish(b)
            pub.handle_incoming()
            assert good.poll(2000)
            good.recv_multipart()

    try:
        for _ in range(4):
            client = client_for(keys)
            r = handshake(pub, client, rcvbuf=4096)
            r.send(client.message(b"\x01"))
        good.subscribe(b"")
        good.connect(endpoint)
        serve(pub, lambda: pub.subscription_messages == 5, "five subscriptions", 10)
        publish(1000)
        # at hwm, but what the kernel took meanwhile as its buffers grew
        assert 4 * 90 <= pub.queued <= 4 * 100, pub.queued
        assert pub.slow_dropped > 4 * 100 and pub.full_dropped == 0
        pub.set_hwm(20)  # at once: every new message dropped for each of the four
        before = pub.slow_dropped
        publish(50)
        assert pub.queued <= 4 * 100 and pub.slow_dropped - before == 4 * 50
        cap = pub.queued_bytes + (256 << 10)
        pub.set_limits(PublishConfig(bind=(endpoint,), curve=curve, max_queued_bytes=cap))
        pub.set_hwm(1_000_000)
        peak = 0
        with caplog.at_level("WARNING", logger="nflogd.publish"):
            for _ in range(20):
                publish(50)
                peak = max(peak, pub.queued_bytes)
        assert cap - 17000 < peak <= cap + 4 * 17000 and pub.full_dropped > 0
        assert sum("publish.max_queued_bytes" in r.getMessage() for r in caplog.records) == 1
        assert not good.poll(100)
    finally:
        good.close(linger=0)
        pub.close(linger=0)


def test_idle_and_per_source_limits_hold_on_a_curve_endpoint(ctx, keys):
    """publish.idle_timeout_ms and publish.max_connections_per_source as on NULL endpoints: an
    admitted CURVE peer that subscribes to nothing is hung up on and counted, a third
    connection from one address past its share of two is closed at once and counted, and the
    peer that subscribed stays."""
    server, _, raw_keys = keys
    curve = CurveConfig("server.key_secret", "clients", server[0], server[1])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cfg = PublishConfig(bind=(endpoint,), curve=curve, idle_timeout_ms=1000, max_connections_per_source=2)
    pub = Publisher(cfg, node="n", curve_keys=raw_keys)
    try:
        t0 = time.monotonic()
        idle = handshake(pub, client_for(keys))
        busy_client = client_for(keys)
        busy = handshake(pub, busy_client)
        busy.send(busy_client.message(b"\x01"))
        third = Raw(pub)
        serve(pub, lambda: pub.source_refused.get(endpoint) == 1, "the third connection refused")
        assert third.closed_by_server()
        assert idle.closed_by_server()
        assert 0.9 < time.monotonic() - t0 < 5
        assert (pub.idle_hangups, pub.subscribers, pub.subscription_messages) == (1, 1, 1)
        assert busy.sock.fileno() >= 0
    finally:
        pub.close(linger=0)


@pytest.mark.kernel
def test_a_daemons_captured_packets_reach_a_curve_and_a_null_reader_alike(netns, tmp_path):
    """The capture thread boxes each frame for a CURVE reader from where it lies, its flags byte
    in the byte in front (the reader's buffers' headroom): the CURVE reader on tcp and a NULL
    reader on ipc of the same daemon get the same packets, byte for byte, in one message and in
    several, with payloads of every length up to a few hundred bytes."""
    from feedutil import collect
    from test_security import TCP, curve_daemon, in_netns, make_keys

    keys = make_keys(tmp_path / "curve")
    netns.log_rule(1, hook="input", match="meta l4proto udp", extra='prefix "both: "')
    with curve_daemon(netns, tmp_path / "d", keys, groups=[1]) as d:
        cctx = in_netns(netns, zmq.Context)
        opened = []
        try:
            boxed = in_netns(
                netns,
                lambda: Subscriber(
                    TCP, groups=[1], server_public_key=keys.server_pub,
                    client_secret_key_file=keys.alice_secret, context=cctx,
                ),
            )  # fmt: skip
            opened.append(boxed)
            plain = Subscriber(d.endpoint, groups=[1], context=cctx)
            opened.append(plain)
            time.sleep(1.0)  # both subscribed before the first packet
            payloads = [bytes([i % 251]) * (i * 7 % 400) for i in range(60)]
            for i in range(0, len(payloads), 20):
                netns.send_udp(payloads[i : i + 20], "127.0.0.1", 9999)
                time.sleep(0.05)
            got_boxed = collect(boxed, lambda ps: len(ps) >= 60, 15)
            got_plain = collect(plain, lambda ps: len(ps) >= 60, 15)

            def seen(ps):
                return [(p.seq, p.len, p.prefix, p.data) for p in ps]

            assert len(got_boxed) == 60
            assert seen(got_boxed) == seen(got_plain)
            assert sorted(p.data[28:] for p in got_boxed) == sorted(payloads)
            assert boxed.total_lost == 0 and plain.total_lost == 0
        finally:
            for s in opened:
                s.close()
            cctx.destroy(linger=0)
