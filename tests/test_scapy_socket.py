"""ZMQNFLOGSocket against an in-process XPUB feed: every sniff() form, exact packets."""

from __future__ import annotations

import threading
import time

import pytest
import zmq
from feedutil import TS, msg, rec, topics
from nflogd_client import filters, scapy_socket, wire
from nflogd_client.filters import Filter, FilterRefused
from nflogd_client.scapy_socket import ZMQNFLOGSocket, install_zmq_listener
from scapy.automaton import ObjectPipe
from scapy.compat import raw
from scapy.config import conf
from scapy.interfaces import resolve_iface
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import AsyncSniffer, sniff
from scapy.utils import EDecimal

pytestmark = pytest.mark.timeout(60)

WAIT = 10.0  # seconds: the bound on anything that should happen at once

V4 = raw(IP(src="192.0.2.1", dst="198.51.100.2") / UDP(sport=40000, dport=40001) / b"payload-v4")
V6 = raw(IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=40000, dport=40002) / b"payload-v6")
V4_BIG = raw(IP(src="192.0.2.1", dst="198.51.100.3") / UDP(sport=40000, dport=40003) / (b"z" * 400))


@pytest.fixture(autouse=True)
def restore_l2listen():
    saved = conf.L2listen
    try:
        yield
    finally:
        conf.L2listen = saved


@pytest.fixture
def sockets():
    """Sockets a test opens directly; all closed afterwards."""
    opened: list[ZMQNFLOGSocket] = []
    yield opened
    for s in opened:
        s.close()


def check_v4(p, data=V4, group=5, seq=0, prefix=None, wirelen=None):
    assert type(p) is IP
    assert raw(p) == data
    assert p.time == EDecimal(TS) / 1_000_000_000
    assert p.wirelen == (len(data) if wirelen is None else wirelen)
    assert (p.nflog_group, p.nflog_node, p.nflog_seq, p.nflog_prefix) == (group, "r1", seq, prefix)


# -- the socket itself -----------------------------------------------------------------------------


def test_recv_ipv4_ipv6_exact_and_groups_by_iface(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, iface="nflog:5,6")
    sockets.append(sock)
    assert sock.iface == "nflog:5,6"
    feed.wait_subscribed(topics(5, 6))
    truncated = V4_BIG[:60]
    feed.publish(
        msg(7, rec(7, V4)),  # not subscribed: filtered at the publisher, never arrives
        msg(5, rec(5, V4, prefix="in: ", mark=3, uid=1000), rec(5, truncated, len=len(V4_BIG))),
        msg(6, rec(6, V6), first_seq=40),
    )
    a, b, c = (sock.recv(timeout=WAIT) for _ in range(3))
    check_v4(a, prefix="in: ")
    assert a[UDP].dport == 40001 and a.load == b"payload-v4"
    assert a.nflog_packet.mark == 3 and a.nflog_packet.uid == 1000
    check_v4(b, data=truncated, seq=1, wirelen=len(V4_BIG))
    assert b.wirelen > len(raw(b))
    assert type(c) is IPv6
    assert raw(c) == V6 and c.wirelen == len(V6) and c.time == EDecimal("1700000000.123456789")
    assert (c.nflog_group, c.nflog_node, c.nflog_seq, c.nflog_prefix) == (6, "r1", 40, None)
    assert sock.recv(timeout=0.2) is None  # group 7 never came
    assert sock.total_lost == 0


def test_conntrack_vlan_and_link_header_as_attributes(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, groups=5)
    sockets.append(sock)
    feed.wait_subscribed(topics(5))
    ct = wire.Conntrack(
        state="new", reply_dir=False, info=2, id=9, mark=None, status=None, timeout=None, zone=None,
        proto=17, orig=wire.CtTuple("192.0.2.1", "203.0.113.9", 40000, 40001), reply=None, labels=None,
    )  # fmt: skip
    l2 = bytes.fromhex("0200000000020200000000010800")
    feed.publish(msg(5, rec(5, V4, ct=ct), rec(5, V4, vlan=wire.Vlan(0x0007, 0x8100), l2hdr=l2)))
    a, b = (sock.recv(timeout=WAIT) for _ in range(2))
    check_v4(a)
    assert a.nflog_ct == ct and a.nflog_ct.orig.dst == "203.0.113.9" and a.nflog_vlan is None
    check_v4(b, seq=1)
    assert b.nflog_ct is None and b.nflog_vlan.id == 7 and b.nflog_l2hdr == l2


def test_other_hw_protocol_is_raw_layer(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, groups=5)
    sockets.append(sock)
    feed.wait_subscribed(topics(5))
    feed.publish(msg(5, rec(5, b"\x01\x02\x03opaque", hw_protocol=0x88B5)))
    p = sock.recv(timeout=WAIT)
    assert type(p) is conf.raw_layer and raw(p) == b"\x01\x02\x03opaque"
    assert p.nflog_packet.hw_protocol == 0x88B5


def test_a_packet_without_payload_is_raw_with_its_real_length(feed, sockets):
    """A metadata-only group's packet: no invented IP header with scapy's default addresses."""
    sock = ZMQNFLOGSocket(feed.endpoint, groups=5)
    sockets.append(sock)
    feed.wait_subscribed(topics(5))
    feed.publish(msg(5, rec(5, b"", len=1500), rec(5, b"", len=900)))
    p = sock.recv(timeout=WAIT)
    assert type(p) is conf.raw_layer and raw(p) == b"" and p.wirelen == 1500
    assert "127.0.0.1" not in p.summary()
    cls, data, _ = sock.recv_raw()
    assert (cls, data) == (conf.raw_layer, b"")


def test_recv_raw(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, groups=[6])
    sockets.append(sock)
    feed.wait_subscribed(topics(6))
    feed.publish(msg(6, rec(6, V6)))
    assert ZMQNFLOGSocket.select([sock], WAIT) == [sock]
    cls, data, ts = sock.recv_raw()
    assert (cls, data) == (IPv6, V6) and ts == pytest.approx(TS / 1e9)


def test_loss_counters(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint)  # every group
    sockets.append(sock)
    feed.wait_subscribed(topics())
    feed.publish(msg(5, rec(5, V4), rec(5, V4)), msg(5, rec(5, V4), first_seq=5))
    seqs = [sock.recv(timeout=WAIT).nflog_seq for _ in range(3)]
    assert seqs == [0, 1, 5]
    assert sock.total_lost == 3 and sock.lost == {("r1", 5): 3}
    assert sock.lost is sock.subscriber.lost


def test_select_pending_at_once_and_other_objects(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, groups=5)
    sockets.append(sock)
    pipe = ObjectPipe("control")
    try:
        assert ZMQNFLOGSocket.select([sock, pipe], 0.05) == []  # idle, bounded
        feed.wait_subscribed(topics(5))
        feed.publish(msg(5, rec(5, V4), rec(5, V4), rec(5, V4)))
        assert ZMQNFLOGSocket.select([sock, pipe], WAIT) == [sock]
        assert sock.recv().nflog_seq == 0
        # Two packets wait in this process: the SUB socket is not readable, select() knows.
        assert sock.subscriber.pending() == 2
        t0 = time.monotonic()
        assert ZMQNFLOGSocket.select([pipe, sock], None) == [sock]
        assert time.monotonic() - t0 < 1
        assert [sock.recv().nflog_seq for _ in range(2)] == [1, 2]
        # Another selectable object (sniff's stop pipe) wakes the wait, and comes first.
        pipe.send(None)
        assert ZMQNFLOGSocket.select([sock, pipe], WAIT) == [pipe]
        feed.publish(msg(5, rec(5, V4), first_seq=3))
        deadline = time.monotonic() + WAIT
        ready: list = []
        while sock not in ready and time.monotonic() < deadline:
            ready = ZMQNFLOGSocket.select([sock, pipe], WAIT)
        assert ready == [pipe, sock]
    finally:
        pipe.close()


def test_recv_after_select_does_not_block_on_an_empty_message(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, groups=5)
    sockets.append(sock)
    feed.wait_subscribed(topics(5))
    feed.publish(msg(5))  # a batch without packets
    assert ZMQNFLOGSocket.select([sock], WAIT) == [sock]
    t0 = time.monotonic()
    assert sock.recv() is None
    assert time.monotonic() - t0 < 1


def test_send_refused(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint)
    sockets.append(sock)
    with pytest.raises(OSError, match="only listens"):
        sock.send(IP(dst="192.0.2.9") / UDP())


def test_arguments(feed, sockets):
    with pytest.raises(ValueError, match="udp portt 53.*syntax error"):  # libpcap's word, before connecting
        ZMQNFLOGSocket(feed.endpoint, filter="udp portt 53")
    with pytest.raises(ValueError, match="not an NFLOG name"):
        ZMQNFLOGSocket(feed.endpoint, iface="eth0")
    with pytest.raises(ValueError, match="'x' is not an integer"):
        ZMQNFLOGSocket(feed.endpoint, iface="nflog:5,x")
    with pytest.raises(ValueError, match="not an integer"):
        ZMQNFLOGSocket(feed.endpoint, iface="nflog:70000")
    with pytest.raises(TypeError, match="grups"):
        ZMQNFLOGSocket(feed.endpoint, grups=5)
    # What sniff() hands any L2 listener is accepted; the default interface is ignored.
    sock = ZMQNFLOGSocket(
        feed.endpoint,
        groups=[6],
        iface=conf.iface,
        type=3,
        promisc=True,
        nofilter=1,
        monitor=False,
        filter="",
    )
    sockets.append(sock)
    assert sock.iface == "nflog:6"
    explicit = ZMQNFLOGSocket(feed.endpoint, groups=[6], iface="nflog")  # iface wins
    sockets.append(explicit)
    assert explicit.iface == "nflog"


def test_subscriber_keywords_pass_through(feed, sockets):
    ctx = zmq.Context()
    try:
        sock = ZMQNFLOGSocket(feed.endpoint, context=ctx, rcvhwm=123)
        sockets.append(sock)
        assert sock.subscriber.socket.context is ctx
        assert sock.subscriber.socket.getsockopt(zmq.RCVHWM) == 123
        cls = install_zmq_listener(feed.endpoint, 5, rcvhwm=77)
        with cls() as installed:
            assert installed.subscriber.socket.getsockopt(zmq.RCVHWM) == 77
            assert installed.iface == "nflog:5"
        with pytest.raises(TypeError, match="rcvhw"):
            install_zmq_listener(feed.endpoint, rcvhw=1)
    finally:
        for s in sockets:
            s.close()
        ctx.term()


def test_close(feed):
    with ZMQNFLOGSocket(feed.endpoint) as sock:
        assert not sock.closed
    assert sock.closed and sock.subscriber.closed
    sock.close()
    assert ZMQNFLOGSocket.select([sock], WAIT) == [sock]  # so that sniff() reads, sees EOF, drops it
    with pytest.raises(EOFError):
        sock.recv()


def test_nflog_interface_names_resolve():
    for name in ("nflog", "nflog:5", "nflog:5,6"):
        dev = resolve_iface(name)
        assert dev.name == name and dev.network_name == "nflog"
        assert dev.l2listen() is ZMQNFLOGSocket
    assert not resolve_iface("nflog").is_valid()  # never chosen as conf.iface
    assert conf.iface != "nflog"
    with pytest.raises(ValueError):
        resolve_iface("nflogd")
    assert scapy_socket.__all__ == ["LAYERS", "ZMQNFLOGSocket", "install_zmq_listener"]


# -- each way of sniffing --------------------------------------------------------------------------


def test_sniff_L2socket(feed):
    feed.publish_when_subscribed(topics(5), msg(7, rec(7, V6)), msg(5, rec(5, V4, prefix="a"), rec(5, V4)))
    pkts = sniff(L2socket=ZMQNFLOGSocket, iface="nflog:5", endpoint=feed.endpoint, count=2, timeout=WAIT)
    feed.join()
    assert len(pkts) == 2
    check_v4(pkts[0], prefix="a")
    check_v4(pkts[1], seq=1)
    assert pkts[0].sniffed_on == "nflog:5"


def test_sniff_filter_goes_to_the_publisher_and_its_refusal_is_shown(feed, sockets, caplog):
    """sniff(filter=...) reaches the publisher as the filter's subscription; the publisher's
    refusal is FilterRefused from recv(), which sniff shows with its reason and ends on."""
    topic = Filter("udp").topic()
    feed.publish_when_subscribed({topic}, filters.reply(topic, False, "a test says no"))
    got = sniff(L2socket=ZMQNFLOGSocket, endpoint=feed.endpoint, filter="udp", count=1, timeout=WAIT)
    feed.join()
    assert len(got) == 0 and "failed with 'a test says no'" in caplog.text
    sock = ZMQNFLOGSocket(feed.endpoint, filter="tcp")
    sockets.append(sock)
    topic = Filter("tcp").topic()
    feed.publish_when_subscribed({topic}, filters.reply(topic, False, "no again"))
    with pytest.raises(FilterRefused, match="^no again$"):
        sock.recv(timeout=WAIT)
    feed.join()


def test_sniff_opened_socket(feed, sockets):
    sock = ZMQNFLOGSocket(feed.endpoint, groups=[5, 6])
    sockets.append(sock)
    feed.wait_subscribed(topics(5, 6))
    feed.publish(msg(5, rec(5, V4), rec(5, V4)), msg(6, rec(6, V6)))
    first = sniff(opened_socket=sock, count=2, timeout=WAIT)
    assert [p.nflog_seq for p in first] == [0, 1]
    assert not sock.closed  # an opened socket stays open, and goes on where it stopped
    second = sniff(opened_socket=sock, count=1, timeout=WAIT)
    assert type(second[0]) is IPv6 and raw(second[0]) == V6


@pytest.mark.parametrize("how", ["L2socket", "opened_socket"])
def test_async_sniffer_stop_is_prompt(feed, sockets, how):
    got = threading.Event()
    seen: list = []

    def prn(p):
        seen.append(p)
        if len(seen) == 2:
            got.set()

    if how == "L2socket":
        kwargs = {"L2socket": ZMQNFLOGSocket, "iface": "nflog:5", "endpoint": feed.endpoint}
    else:
        sock = ZMQNFLOGSocket(feed.endpoint, groups=5)
        sockets.append(sock)
        kwargs = {"opened_socket": sock}
    started = threading.Event()
    t = AsyncSniffer(prn=prn, started_callback=started.set, **kwargs)
    t.start()
    try:
        assert started.wait(WAIT)
        feed.wait_subscribed(topics(5))
        feed.publish(msg(5, rec(5, V4), rec(5, V4)))
        assert got.wait(WAIT)
        # Now idle, blocked waiting for traffic: stop() must still return at once.
        t0 = time.monotonic()
        result = t.stop()
        assert time.monotonic() - t0 < 2
    finally:
        if t.running:
            t.stop()
    assert [p.nflog_seq for p in result] == [0, 1]
    check_v4(result[0])
    if how == "opened_socket":
        assert not sock.closed


def test_install_zmq_listener_then_plain_sniff(feed):
    cls = install_zmq_listener(feed.endpoint, groups=5)
    assert conf.L2listen is cls and issubclass(cls, ZMQNFLOGSocket)
    feed.publish_when_subscribed(topics(5), msg(5, rec(5, V4), rec(5, V4)))
    pkts = sniff(count=2, timeout=WAIT)  # the installed groups
    feed.join()
    assert [p.nflog_group for p in pkts] == [5, 5]
    check_v4(pkts[0])
    # An nflog name picks other groups of the same feed (and the provider uses the installed class).
    feed.publish_when_subscribed(topics(6), msg(6, rec(6, V6)))
    pkts = sniff(iface="nflog:6", count=1, timeout=WAIT)
    feed.join()
    assert type(pkts[0]) is IPv6 and pkts[0].nflog_group == 6


def test_plain_sniff_iface_nflog_without_install(feed, monkeypatch):
    monkeypatch.setenv("NFLOGD_ENDPOINT", feed.endpoint)
    before = conf.L2listen
    feed.publish_when_subscribed(topics(6), msg(5, rec(5, V4)), msg(6, rec(6, V6)))
    pkts = sniff(iface="nflog:6", count=1, timeout=WAIT)
    feed.join()
    assert conf.L2listen is before
    assert len(pkts) == 1 and raw(pkts[0]) == V6 and pkts[0].nflog_group == 6
