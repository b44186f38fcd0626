"""Subscriber against in-process XPUB publishers on ipc endpoints: filtering, loss and
restart accounting, malformed messages, timeouts, several feeds."""

from __future__ import annotations

import logging
import time

import pytest
import zmq
import zmq.auth
from nflogd_client import DEFAULT_ENDPOINT, Subscriber, wire
from nflogd_client.wire import Batch, Packet
from zmq.auth.thread import ThreadAuthenticator

pytestmark = pytest.mark.timeout(30)

WAIT = 10.0  # seconds a test waits for something that should arrive at once


class Publisher:
    """An XPUB socket standing in for the daemon's feed."""

    def __init__(
        self, ctx: zmq.Context, endpoint: str, node: str = "r1", epoch: int = 1, secret_key_file=None
    ):
        self.endpoint = endpoint
        self.node = node
        self.epoch = epoch
        self.socket = ctx.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # every subscription, not only each topic's first
        if secret_key_file is not None:  # a CURVE server with this key pair
            public, secret = zmq.auth.load_certificate(secret_key_file)
            self.socket.curve_server = True
            self.socket.curve_publickey = public
            self.socket.curve_secretkey = secret
        self.socket.bind(endpoint)
        self.subscriptions: list[bytes] = []

    def wait_subscribed(self, *topics: bytes, pump=None) -> None:
        """Read subscription messages until every topic has been subscribed to.

        ``pump`` is called between polls: a SUB socket resends its subscriptions after a
        reconnect only when its own thread next uses it (libzmq processes the reconnect
        there), so a test that restarts the publisher must keep the subscriber busy.
        """
        deadline = time.monotonic() + WAIT
        while not set(topics) <= set(self.subscriptions):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"{self.endpoint}: subscribed {self.subscriptions}, wanted {topics}"
            if pump is not None:
                pump()
                remaining = min(remaining, 0.1)
            if self.socket.poll(int(remaining * 1000)):
                msg = self.socket.recv()
                if msg[:1] == b"\x01":
                    self.subscriptions.append(msg[1:])

    def send(self, group: int, first_seq: int = 0, count: int = 1, *, epoch=None, kernel_dropped=0):
        packets = [
            Packet.build(group, bytes([i % 256]) * 20, 1_700_000_000_000_000_000 + first_seq + i)
            for i in range(count)
        ]
        epoch = self.epoch if epoch is None else epoch
        self.socket.send_multipart(wire.encode(group, self.node, epoch, first_seq, packets, kernel_dropped))

    def send_raw(self, frames: list[bytes]) -> None:
        self.socket.send_multipart(frames)

    def close(self) -> None:
        self.socket.close(linger=0)


@pytest.fixture
def endpoint(tmp_path):
    def make(name: str = "feed") -> str:
        ep = f"ipc://{tmp_path}/{name}.sock"
        assert len(ep) < 100, f"ipc path too long for sun_path: {ep}"
        return ep

    return make


@pytest.fixture
def publisher(ctx, endpoint):
    made: list[Publisher] = []

    def make(name: str = "feed", **kw) -> Publisher:
        pub = Publisher(ctx, endpoint(name), **kw)
        made.append(pub)
        return pub

    yield make
    for pub in made:
        pub.close()


@pytest.fixture
def subscriber(ctx):
    made: list[Subscriber] = []

    def make(*args, **kw) -> Subscriber:
        kw.setdefault("context", ctx)
        sub = Subscriber(*args, **kw)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()


def recv_n(sub: Subscriber, n: int) -> list[Packet]:
    deadline = time.monotonic() + WAIT
    got = []
    while len(got) < n:
        pkt = sub.recv(timeout=max(0.0, deadline - time.monotonic()))
        assert pkt is not None, f"got {len(got)} packets of {n}"
        got.append(pkt)
    return got


def connected(pub: Publisher, sub_factory, groups=None, **kw) -> Subscriber:
    sub = sub_factory(pub.endpoint, groups, **kw)
    if groups is None:
        topics = [b""]
    else:
        topics = [wire.topic(g) for g in ([groups] if isinstance(groups, int) else groups)]
    pub.wait_subscribed(*topics)
    return sub


# -- filtering ------------------------------------------------------------------------------------

# Groups whose topics share a byte with group 5's 00 05, or read like it.
NEIGHBOURS = [0, 50, 261, 1280, 1285, 1330, 0xFF05, 0x0550]


@pytest.mark.parametrize("groups", [5, [5], (5, 1280)], ids=["int", "list", "tuple"])
def test_groups_are_filtered_at_the_publisher(publisher, subscriber, groups):
    pub = publisher()
    sub = connected(pub, subscriber, groups)
    wanted = {groups} if isinstance(groups, int) else set(groups)
    # The publisher holds exactly our topics: it filters, we do not see the rest at all.
    assert sorted(pub.subscriptions) == sorted(wire.topic(g) for g in wanted)
    for i, g in enumerate(NEIGHBOURS + [5]):
        pub.send(g, first_seq=i)
    pub.send(5, first_seq=100)  # a sentinel: everything sent before it has arrived by then
    got = []
    while not got or got[-1].seq != 100:
        got += recv_n(sub, 1)
    assert {p.group for p in got} <= wanted
    assert [p.group for p in got if p.group == 5] == [5, 5]
    assert [p.group for p in got].count(1280) == (1 if 1280 in wanted else 0)
    assert sub.recv(timeout=0.1) is None


def test_no_groups_means_all(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, None)
    assert pub.subscriptions == [b""]
    for g in NEIGHBOURS:
        pub.send(g)
    assert sorted(p.group for p in recv_n(sub, len(NEIGHBOURS))) == sorted(NEIGHBOURS)


@pytest.mark.parametrize("groups", [70000, -1, [5, "6"], [], True, [5, 5.0]])
def test_bad_groups_are_refused_by_name(subscriber, endpoint, groups):
    with pytest.raises(ValueError, match="groups: "):
        subscriber(endpoint(), groups)


@pytest.mark.parametrize("groups", [5.0, "5", b"\x00\x05"])
def test_groups_of_the_wrong_type_are_refused(subscriber, endpoint, groups):
    with pytest.raises(TypeError, match="groups: "):
        subscriber(endpoint(), groups)


def test_endpoints_must_not_be_empty(subscriber):
    with pytest.raises(ValueError, match="endpoints: empty"):
        subscriber([])


# -- loss accounting ------------------------------------------------------------------------------


def test_sequence_gaps_are_counted_per_group(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, [5, 6])
    pub.send(5, 1000, 10)  # baseline: nothing counted though we joined late
    pub.send(5, 1010, 5)
    pub.send(5, 1020, 5, kernel_dropped=2)  # 5 lost
    pub.send(6, 500, 1)  # another group: its own baseline
    pub.send(5, 1100, 1, kernel_dropped=7)  # 75 lost
    pub.send(6, 501, 1)
    got = recv_n(sub, 23)
    assert [p.seq for p in got if p.group == 5] == [*range(1000, 1015), *range(1020, 1025), 1100]
    assert sub.lost == {("r1", 5): 80, ("r1", 6): 0}
    assert sub.total_lost == 80
    assert sub.kernel_dropped == {("r1", 5): 7, ("r1", 6): 0}
    assert (sub.restarts, sub.malformed, sub.received) == (0, 0, 23)


def test_sequence_going_back_in_an_epoch_is_a_reset_not_loss(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, 5)
    pub.send(5, 0, 10)
    pub.send(5, 3, 2)  # back: a reset, new baseline at 5
    pub.send(5, 5, 1)
    pub.send(5, 8, 1)  # 2 lost after the new baseline
    recv_n(sub, 14)
    assert sub.lost == {("r1", 5): 2}
    assert sub.restarts == 0


def test_epoch_change_counts_a_restart_and_what_the_new_run_sent_before(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, None)
    pub.send(5, 0, 10)
    pub.send(6, 0, 4, kernel_dropped=9)
    pub.send(5, 7, 3, epoch=2)  # restart: 0..6 of the new run were published before
    pub.send(6, 2, 1, epoch=2, kernel_dropped=0)  # same restart, other group: 0..1 lost
    pub.send(5, 10, 1, epoch=2)  # contiguous
    pub.send(7, 100, 1, epoch=2)  # a group first seen now: baseline
    recv_n(sub, 20)
    assert sub.restarts == 1  # one daemon restart, whatever the number of groups
    assert sub.lost == {("r1", 5): 7, ("r1", 6): 2, ("r1", 7): 0}
    assert sub.kernel_dropped == {("r1", 5): 0, ("r1", 6): 0, ("r1", 7): 0}
    pub.send(5, 0, 1, epoch=3)  # a restart seen at its very first message: nothing lost
    recv_n(sub, 1)
    assert (sub.restarts, sub.lost[("r1", 5)]) == (2, 7)


def test_daemon_restart_on_the_same_endpoint_is_survived(ctx, endpoint, subscriber):
    ep = endpoint()
    first = Publisher(ctx, ep, epoch=1)
    try:
        sub = connected(first, subscriber, 5)
        first.send(5, 0, 5)
        recv_n(sub, 5)
    finally:
        first.close()
    second = Publisher(ctx, ep, epoch=2)  # ZeroMQ reconnects by itself
    try:
        second.wait_subscribed(wire.topic(5), pump=lambda: sub.recv(timeout=0))
        second.send(5, 3, 2)
        assert [p.seq for p in recv_n(sub, 2)] == [3, 4]
    finally:
        second.close()
    assert (sub.restarts, sub.lost) == (1, {("r1", 5): 3})


# -- malformed messages ---------------------------------------------------------------------------


def test_malformed_messages_are_counted_warned_once_and_skipped(publisher, subscriber, caplog):
    pub = publisher()
    sub = connected(pub, subscriber, None)
    good = wire.encode(5, "r1", 1, 3, [Packet.build(5, b"x")])
    bad_magic = [good[0], b"XXXX" + good[1][4:], good[2], good[3]]
    version_2 = [good[0], good[1][:4] + b"\x02" + good[1][5:], good[2], good[3]]
    garbage = [
        [b"\x00\x05garbage"],  # passes a group-5 filter, one frame
        [b"hello, world"],  # foreign: another application's message
        [wire.topic(5), b"hello"],  # foreign multipart
        bad_magic,
        version_2,
        [b"", b"", b"", b""],
    ]
    caplog.set_level(logging.WARNING, logger="nflogd_client.subscriber")
    pub.send(5, 0, 2)
    for i, frames in enumerate(garbage):
        pub.send_raw(frames)
        pub.send(5, 2 + i, 1)
    got = recv_n(sub, 2 + len(garbage))
    assert [p.seq for p in got] == list(range(2 + len(garbage)))
    assert sub.malformed == len(garbage)
    assert sub.lost == {("r1", 5): 0}
    warnings = [r for r in caplog.records if r.name == "nflogd_client.subscriber"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "expected 4 frames, got 1" in warnings[0].getMessage()


def test_only_malformed_messages_time_out_as_none(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, None)
    for _ in range(3):
        pub.send_raw([b"junk"])
    assert sub.recv(timeout=0.5) is None
    assert sub.malformed == 3


# -- receiving ------------------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [0.0, 0.3, 1.0])
def test_recv_timeout_returns_none_in_about_the_time_asked(publisher, subscriber, timeout):
    pub = publisher()
    sub = connected(pub, subscriber, 5)
    pub.send(6)  # another group: filtered out, wakes nobody
    for call in (sub.recv, sub.recv_batch):
        start = time.monotonic()
        assert call(timeout=timeout) is None
        elapsed = time.monotonic() - start
        assert timeout - 0.01 <= elapsed < timeout + 0.5, f"{call.__name__}({timeout}) took {elapsed:.3f}s"


def test_recv_serves_the_current_batch_first_and_recv_batch_the_rest(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, 5)
    pub.send(5, 0, 5, kernel_dropped=4)
    first = sub.recv(timeout=WAIT)
    assert first.seq == 0 and sub.pending() == 4
    assert sub.socket.poll(0) == 0  # the rest is not on the socket
    assert [sub.recv(timeout=0).seq for _ in range(2)] == [1, 2]
    rest = sub.recv_batch(timeout=0)
    assert isinstance(rest, Batch)
    assert (rest.first_seq, rest.next_seq, rest.node, rest.group, rest.kernel_dropped) == (3, 5, "r1", 5, 4)
    assert [p.seq for p in rest.packets] == [3, 4]
    assert sub.pending() == 0
    assert sub.recv_batch(timeout=0.05) is None
    pub.send(5, 5, 3)
    whole = sub.recv_batch(timeout=WAIT)
    assert (whole.first_seq, len(whole.packets), sub.pending()) == (5, 3, 0)
    assert sub.received == 8


def test_an_empty_batch_is_accounted_returned_by_recv_batch_and_skipped_by_recv(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, 5)
    pub.send(5, 0, 2)
    pub.send(5, 4, 0, kernel_dropped=1)  # no packets, but a gap of 2 and a kernel figure
    pub.send(5, 4, 1)
    assert len(sub.recv_batch(timeout=WAIT).packets) == 2
    empty = sub.recv_batch(timeout=WAIT)
    assert empty.packets == [] and empty.first_seq == 4
    pub.send(5, 5, 0)
    pub.send(5, 5, 1)
    assert [p.seq for p in recv_n(sub, 2)] == [4, 5]  # the second empty batch is passed over
    assert sub.lost == {("r1", 5): 2}
    assert sub.kernel_dropped == {("r1", 5): 0}


def test_iteration_and_poller(publisher, subscriber):
    pub = publisher()
    sub = connected(pub, subscriber, 5)
    poller = zmq.Poller()
    poller.register(sub.socket, zmq.POLLIN)
    assert poller.poll(0) == []
    pub.send(5, 0, 3)
    assert poller.poll(WAIT * 1000) == [(sub.socket, zmq.POLLIN)]
    it = iter(sub)
    assert [next(it).seq for _ in range(3)] == [0, 1, 2]


def test_several_endpoints_are_merged_with_separate_accounting(publisher, subscriber):
    a = publisher("a", node="a", epoch=1)
    b = publisher("b", node="b", epoch=1)
    sub = subscriber([a.endpoint, b.endpoint], 5)
    a.wait_subscribed(wire.topic(5))
    b.wait_subscribed(wire.topic(5))
    for first in (0, 10, 30):  # a: a gap of 10
        a.send(5, first, 10)
    for first in (0, 10, 20):  # b: none
        b.send(5, first, 10, epoch=7)
    b.send(5, 35, 1, epoch=8)  # b restarts; a does not
    got = recv_n(sub, 61)
    assert [p.seq for p in got if p.node == "a"] == [*range(20), *range(30, 40)]
    assert [p.seq for p in got if p.node == "b"] == [*range(30), 35]
    assert sub.lost == {("a", 5): 10, ("b", 5): 35}
    assert sub.restarts == 1


def test_several_curve_endpoints_each_with_its_daemons_key(ctx, publisher, subscriber, tmp_path):
    auth = ThreadAuthenticator(ctx)  # admits every client key: the daemons' side is not tested here
    auth.start()
    auth.configure_curve(domain="*", location=zmq.auth.CURVE_ALLOW_ANY)
    try:
        keys = {name: zmq.auth.create_certificates(tmp_path, name) for name in ("a", "b", "client")}
        a = publisher("a", node="a", secret_key_file=keys["a"][1])
        b = publisher("b", node="b", secret_key_file=keys["b"][1])
        b_key = zmq.auth.load_certificate(keys["b"][0])[0]
        sub = subscriber(
            [a.endpoint, b.endpoint],
            5,
            server_public_key={a.endpoint: keys["a"][0], b.endpoint: b_key},  # a file, the Z85 text
            client_secret_key_file=keys["client"][1],
        )
        a.wait_subscribed(wire.topic(5))
        b.wait_subscribed(wire.topic(5))
        a.send(5, 0, 3)
        b.send(5, 0, 2)
        got = recv_n(sub, 5)
        assert sorted((p.node, p.seq) for p in got) == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("b", 1)]
        assert sub.lost == {("a", 5): 0, ("b", 5): 0}
        secret = keys["client"][1]
        with pytest.raises(ValueError, match=f"server_public_key: no key for {b.endpoint}"):
            subscriber(
                [a.endpoint, b.endpoint], server_public_key={a.endpoint: b_key}, client_secret_key_file=secret
            )
        with pytest.raises(ValueError, match="'tcp://x:1': not one of the endpoints"):
            subscriber(
                a.endpoint,
                server_public_key={a.endpoint: b_key, "tcp://x:1": b_key},
                client_secret_key_file=secret,
            )
        with pytest.raises(
            ValueError, match=rf"server_public_key\['{a.endpoint}'\]: cannot read /nonexistent"
        ):
            subscriber(
                a.endpoint, server_public_key={a.endpoint: "/nonexistent"}, client_secret_key_file=secret
            )
    finally:
        auth.stop()


# -- construction and lifetime --------------------------------------------------------------------


def test_endpoint_defaults_from_the_environment(publisher, subscriber, monkeypatch):
    pub = publisher()
    monkeypatch.setenv("NFLOGD_ENDPOINT", pub.endpoint)
    sub = subscriber(groups=5)
    assert list(sub.endpoints) == [pub.endpoint]
    pub.wait_subscribed(wire.topic(5))
    pub.send(5, 0, 1)
    assert recv_n(sub, 1)[0].group == 5
    monkeypatch.setenv("NFLOGD_ENDPOINT", "ipc:///nonexistent/a.sock, tcp://127.0.0.1:1")
    assert list(subscriber().endpoints) == ["ipc:///nonexistent/a.sock", "tcp://127.0.0.1:1"]
    monkeypatch.delenv("NFLOGD_ENDPOINT")
    assert list(subscriber().endpoints) == [DEFAULT_ENDPOINT] == ["ipc:///run/nflogd/feed.sock"]


def test_options_close_and_context_manager(endpoint):
    with Subscriber(endpoint(), 5, rcvhwm=1234) as sub:  # the process-wide context
        assert sub.socket.getsockopt(zmq.RCVHWM) == 1234
        assert not sub.closed
        assert "open" in repr(sub)
    assert sub.closed
    sub.close()  # again: nothing happens
    assert "closed" in repr(sub)
