"""The feed socket: sequence numbers, delivery policy, ipc endpoint safety, subscriber gauge."""

from __future__ import annotations

import os
import socket
import time
from types import SimpleNamespace

import pytest
import zmq
from nflogd_client import wire
from pubutil import serve

from nflogd.config_publish import PublishConfig
from nflogd.errors import NflogdError
from nflogd.publish import Publisher

pytestmark = pytest.mark.timeout(30)


def batch(group: int, n: int, tag: bytes = b"", size: int = 0):
    pkts = [
        wire.Packet.build(group, (b"%s#%d " % (tag, i)).ljust(size, b"."), ts_ns=10**18 + i, mark=i)
        for i in range(n)
    ]  # fmt: skip
    count, table, data = wire.pack_records(pkts)
    return SimpleNamespace(group=group, count=count, table=table, data=data), pkts


def subscribe(ctx, pub: Publisher, endpoint: str, topics=(b"",), rcvhwm: int = 0):
    """A SUB socket the publisher has seen subscribe (each subscription is counted)."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    sub.setsockopt(zmq.LINGER, 0)
    seen = pub.subscription_messages
    sub.connect(endpoint)
    for t in topics:
        sub.setsockopt(zmq.SUBSCRIBE, t)
    wanted = seen + len(topics)
    serve(pub, lambda: pub.subscription_messages >= wanted, "no subscription reached the publisher")
    return sub


def recv_all(sub, quiet: float = 0.2, pub: Publisher | None = None) -> list[wire.Batch]:
    """Every message until none came for ``quiet`` s (``pub``'s queued ones flushed meanwhile)."""
    out = []
    while True:
        if pub is not None:
            pub.handle_incoming()
        if not sub.poll(int(quiet * 1000)):
            return out
        out.append(wire.decode(sub.recv_multipart()))


def test_sequence_per_group_contiguous_and_byte_exact(ctx, tmp_path):
    ep = f"ipc://{tmp_path}/feed.sock"
    pub = Publisher(PublishConfig(bind=(ep,)), node="n1", epoch=123)
    try:
        sub = subscribe(ctx, pub, ep)
        sends = [(1, 3, 0), (2, 2, 0), (1, 4, 5), (2, 0, 0), (1, 1, 7)]
        expected = []
        for group, n, dropped in sends:
            b, pkts = batch(group, n, b"g%d" % group)
            assert pub.publish(b, dropped) is bool(n)
            if n:
                expected.append((group, dropped, pkts))
        got = recv_all(sub)
        assert [(m.group, m.first_seq, len(m.packets), m.kernel_dropped) for m in got] == [
            (1, 0, 3, 0), (2, 0, 2, 0), (1, 3, 4, 5), (1, 7, 1, 7),
        ]  # fmt: skip
        assert {(m.node, m.epoch) for m in got} == {("n1", 123)}
        for m, (_, _, pkts) in zip(got, expected):
            for i, (p, orig) in enumerate(zip(m.packets, pkts)):
                assert p.seq == m.first_seq + i
                assert (p.data, p.ts_ns, p.mark, p.len) == (orig.data, orig.ts_ns, orig.mark, orig.len)
        assert (pub.next_seq(1), pub.next_seq(2), pub.next_seq(3)) == (8, 2, 0)
        sub.close()
    finally:
        pub.close()


def test_epoch_defaults_to_start_time(ctx, tmp_path):
    before = time.time_ns()
    pub = Publisher(PublishConfig(bind=(f"ipc://{tmp_path}/f.sock",)))
    try:
        assert before <= pub.epoch <= time.time_ns()
    finally:
        pub.close()


def test_topic_filters_exact_groups(ctx, tmp_path):
    ep = f"ipc://{tmp_path}/feed.sock"
    pub = Publisher(PublishConfig(bind=(ep,)))
    try:
        sub = subscribe(ctx, pub, ep, topics=(wire.topic(5),))
        for g in (50, 5, 500, 5):
            pub.publish(batch(g, 1)[0])
        assert [(m.group, m.first_seq) for m in recv_all(sub)] == [(5, 0), (5, 1)]
        sub.close()
    finally:
        pub.close()


def test_ipc_parent_dir_and_file_modes(ctx, tmp_path):
    path = tmp_path / "run" / "nflogd" / "feed.sock"
    old = os.umask(0o022)
    try:
        pub = Publisher(PublishConfig(bind=(f"ipc://{path}",)))
    finally:
        assert os.umask(old) == 0o022  # restored after the bind
    try:
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        assert oct(path.parent.stat().st_mode & 0o777) == oct(0o750)
    finally:
        pub.close()
    assert not path.exists()  # ours, so removed


def test_live_ipc_path_refused(ctx, tmp_path):
    ep = f"ipc://{tmp_path}/feed.sock"
    first = Publisher(PublishConfig(bind=(ep,)))
    try:
        with pytest.raises(NflogdError) as err:
            Publisher(PublishConfig(bind=(ep,)))
        assert str(err.value) == f"publish.bind: {ep}: another process is serving this path"
        sub = subscribe(ctx, first, ep)  # the first one still serves its path
        first.publish(batch(1, 1)[0])
        assert len(recv_all(sub)) == 1
        sub.close()
    finally:
        first.close()


def test_stale_socket_file_is_taken_over(ctx, tmp_path):
    path = tmp_path / "feed.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # closed without unlinking: connect is refused
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",)))
    try:
        assert path.is_socket()
    finally:
        pub.close()


def test_non_socket_file_refused_and_kept(ctx, tmp_path):
    path = tmp_path / "feed.sock"
    path.write_text("precious")
    with pytest.raises(NflogdError, match="exists and is not a socket"):
        Publisher(PublishConfig(bind=(f"ipc://{path}",)))
    assert path.read_text() == "precious"


def test_tcp_endpoint_in_use_names_it(ctx):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        ep = f"tcp://127.0.0.1:{port}"
        with pytest.raises(NflogdError) as err:
            Publisher(PublishConfig(bind=(ep,)))
    assert str(err.value) == f"publish.bind: {ep}: Address already in use"


def test_close_leaves_a_replaced_file_alone(ctx, tmp_path):
    path = tmp_path / "feed.sock"
    pub = Publisher(PublishConfig(bind=(f"ipc://{path}",)))
    path.unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        pub.close()
        assert path.is_socket()


def wait_subscribers(pub: Publisher, n: int, timeout: float = 5.0) -> None:
    serve(pub, lambda: pub.subscribers == n, f"subscribers {pub.subscribers}, expected {n}", timeout)


def test_subscriber_gauge_counts_connected_peers(ctx, tmp_path):
    path = tmp_path / "feed.sock"
    ep = f"ipc://{path}"
    pub = Publisher(PublishConfig(bind=(ep,)))
    try:
        assert pub.subscribers == 0
        a = subscribe(ctx, pub, ep)
        b = subscribe(ctx, pub, ep)
        wait_subscribers(pub, 2)
        a.close()
        wait_subscribers(pub, 1)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:  # not ZeroMQ at all
            raw.connect(str(path))
            wait_subscribers(pub, 2)
        wait_subscribers(pub, 1)
        b.close()
        wait_subscribers(pub, 0)
    finally:
        pub.close()


def test_slow_subscriber_loses_its_own_messages_and_never_blocks(ctx, tmp_path):
    ep = f"ipc://{tmp_path}/feed.sock"
    pub = Publisher(PublishConfig(bind=(ep,), hwm=10))
    try:
        slow = subscribe(ctx, pub, ep, rcvhwm=10)  # reads nothing while we publish
        msg, _ = batch(1, 4, size=1000)
        t0 = time.monotonic()
        results = [pub.publish(msg) for _ in range(3000)]
        assert time.monotonic() - t0 < 5
        assert all(results) and pub.unsent == 0 and pub.next_seq(1) == 12000
        assert pub.queued <= 10
        seqs = [m.first_seq for m in recv_all(slow, pub=pub)]
        pub.publish(msg)  # once it reads again, it gets the next message
        seqs += [m.first_seq for m in recv_all(slow, pub=pub)]
        assert 0 < len(seqs) < 3001 and seqs == sorted(seqs) and seqs[-1] == 12000
        assert any(b - a > 4 for a, b in zip(seqs, seqs[1:])), "the slow subscriber saw no gap"
        # what it lost is counted, message for message, and it got the rest
        assert pub.slow_dropped == 3001 - len(seqs) and pub.queued == 0
        slow.close()
    finally:
        pub.close()


def test_rebind_adds_and_removes_endpoints(ctx, tmp_path):
    one, two = tmp_path / "one.sock", tmp_path / "two.sock"
    pub = Publisher(PublishConfig(bind=(f"ipc://{one}",)))
    try:
        pub.rebind([f"ipc://{two}"])
        assert pub.endpoints == [f"ipc://{two}"]
        assert two.is_socket() and not one.exists()
        bad = tmp_path / "file"
        bad.write_text("")
        with pytest.raises(NflogdError, match="not a socket"):
            pub.rebind([f"ipc://{one}", f"ipc://{two}", f"ipc://{bad}"])
        assert pub.endpoints == [f"ipc://{two}"] and not one.exists()  # nothing changed
        sub = subscribe(ctx, pub, f"ipc://{two}")
        pub.publish(batch(3, 2)[0])
        assert [m.group for m in recv_all(sub)] == [3]
        sub.close()
    finally:
        pub.close()


def test_set_hwm_applies_at_once_to_connected_subscribers(ctx, tmp_path):
    ep = f"ipc://{tmp_path}/f.sock"
    pub = Publisher(PublishConfig(bind=(ep,), hwm=7))
    try:
        slow = subscribe(ctx, pub, ep, rcvhwm=1)  # reads nothing: its socket fills, then its queue
        msg, _ = batch(1, 4, size=1000)
        for _ in range(2000):
            pub.publish(msg)
        assert pub.queued == 7
        pub.set_hwm(70)
        for _ in range(200):
            pub.publish(msg)
        assert (pub.hwm, pub.queued) == (70, 70)
        slow.close()
    finally:
        pub.close()
