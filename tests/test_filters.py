"""Filters run at the daemon: the real daemon, real kernel packets, the real clients.

- a reader with ``udp and dst port 53`` gets exactly those packets, byte for byte as an
  unfiltered reader gets them, numbered by its filter; the per-filter metrics count them;
- metadata (the log prefix, the hook) without a program;
- two readers with one filter: one evaluation per packet (the metric counts packets once);
- loss while filtered: counted exactly, in packets the filter passed, never the excluded ones;
- refusals (bpf_validate, the size limit, a second filter on one connection): the reason
  comes back, the metric counts them, the log says so once;
- nflog-tap's trailing EXPRESSION and scapy's sniff(filter=...).

The filter's own bits (spec bytes, the metadata test in the reader) are in test_filter_spec.py.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq
from daemonutil import NflogdProcess, wait_until
from feedutil import collect
from nflogd_client import Filter, FilterRefused, Subscriber, wire
from nflogd_client import filters as filters_mod
from scapy.layers.inet import IP, UDP

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]

WAIT = 10.0
TAP_WAIT = 30.0
DNS, OTHER, SSH = 53, 9999, 22


def rules(netns) -> None:
    """Group 1: every UDP datagram at INPUT; group 2: port OTHER's; group 3: port SSH's."""
    netns.log_rule(1, hook="input", match="meta l4proto udp", extra='prefix "all: "')
    netns.log_rule(2, hook="input", match=f"udp dport {OTHER}", extra='prefix "other: "')
    netns.log_rule(3, hook="input", match=f"udp dport {SSH}", extra='prefix "ssh: "')


@pytest.fixture
def daemon(netns, tmp_path):
    rules(netns)
    with NflogdProcess(netns, tmp_path / "d", groups=[1, 2, 3], node="f") as d:
        yield d
    assert "Traceback" not in d.stderr, d.stderr


@pytest.fixture
def closing():
    opened: list = []
    yield opened
    for c in opened:
        c.close()


def accepted(sub: Subscriber, timeout: float = WAIT) -> None:
    """Wait for the daemon's answer to the Subscriber's filter (it must accept)."""
    deadline = time.monotonic() + timeout
    while sub.filter_state == "pending":
        assert time.monotonic() < deadline, "no answer to the filter"
        assert sub.recv(timeout=0.02) is None
    assert sub.filter_state == "accepted"


def send(netns, port: int, n: int, tag: str) -> list[bytes]:
    payloads = [f"{tag} #{i}".encode() for i in range(n)]
    for i, p in enumerate(payloads):
        netns.send_udp([p], "127.0.0.1" if i % 2 == 0 else "::1", port)
    return payloads


def dport(p: wire.Packet) -> int:
    return struct.unpack_from(">H", p.data, 22 if p.data[0] >> 4 == 4 else 42)[0]


def packets(d: NflogdProcess, group: int = 1) -> int:
    return int(d.metric("nflogd_packets_total", group=str(group)) or 0)


def filter_metric(d: NflogdProcess, kind: str, expression: str) -> int:
    """nflogd_feed_filter_{passed,dropped}_packets_total of the filter with this text."""
    found = [
        v for (name, labels), v in d.scrape().items()
        if name == f"nflogd_feed_filter_{kind}_packets_total" and dict(labels).get("expression") == expression
    ]  # fmt: skip
    assert len(found) == 1, f"{kind} of {expression!r}: {found}"
    return int(found[0])


def test_a_filtered_reader_gets_only_its_packets_as_the_unfiltered_one_does(netns, daemon, ctx, closing):
    d = daemon
    dns = Subscriber(d.endpoint, groups=[1], filter="udp and dst port 53", context=ctx)
    every = Subscriber(d.endpoint, groups=[1], context=ctx)
    closing += [dns, every]
    accepted(dns)
    wait_until(lambda: d.metric("nflogd_subscribers") == 2, "two subscribers")
    time.sleep(0.2)  # the unfiltered reader's subscription: no reply to wait for
    sent = []
    for r in range(3):
        sent += send(netns, DNS, 4, f"dns{r}") + send(netns, OTHER, 6, f"other{r}")
        wait_until(lambda r=r: packets(d) >= 10 * (r + 1), "published")
    got = collect(dns, lambda ps: len(ps) >= 12, WAIT)
    all_ = collect(every, lambda ps: len(ps) >= 30, WAIT)
    assert dns.recv(timeout=0.3) is None
    assert len(all_) == 30 and len(got) == 12
    want = [p for p in all_ if dport(p) == DNS]
    assert [p.data for p in got] == [p.data for p in want]
    assert [p.seq for p in got] == list(range(12))  # the filter's numbering
    for p, q in zip(got, want):  # field for field (but the offsets into the data frame)
        assert p._r[:1] + p._r[2:12] + p._r[13:] == q._r[:1] + q._r[2:12] + q._r[13:]
        assert p.prefix == q.prefix == "all: "
    assert dns.total_lost == 0 and every.total_lost == 0
    assert filter_metric(d, "passed", "udp and dst port 53") == 12
    assert filter_metric(d, "dropped", "udp and dst port 53") == 18
    assert d.metric("nflogd_feed_sent_bytes_total") > 0


def test_metadata_alone_prefix_and_hook(netns, daemon, ctx, closing):
    d = daemon
    ssh = Subscriber(d.endpoint, groups=[3], prefix="ssh: ", hook="input", context=ctx)
    lead = Subscriber(d.endpoint, groups=[1, 2, 3], prefix_start="oth", context=ctx)
    output = Subscriber(d.endpoint, groups=[3], hook="output", context=ctx)
    closing += [ssh, lead, output]
    for s in (ssh, lead, output):
        accepted(s)
    send(netns, SSH, 3, "s")
    send(netns, OTHER, 2, "o")
    got = collect(ssh, lambda ps: len(ps) >= 3, WAIT)
    assert [(p.group, p.prefix, p.hook) for p in got] == [(3, "ssh: ", 1)] * 3
    got = collect(lead, lambda ps: len(ps) >= 2, WAIT)
    assert [(p.group, p.prefix) for p in got] == [(2, "other: ")] * 2
    assert output.recv(timeout=0.3) is None and lead.recv(timeout=0) is None


def test_two_readers_with_one_filter_cost_one_evaluation(netns, daemon, ctx, closing):
    d = daemon
    expr = "udp and dst port 53"
    a = Subscriber(d.endpoint, groups=[1], filter=expr, context=ctx)
    b = Subscriber(d.endpoint, groups=[1], filter=expr, context=ctx)
    closing += [a, b]
    accepted(a)
    accepted(b)
    send(netns, DNS, 5, "d")
    send(netns, OTHER, 15, "o")
    wait_until(lambda: packets(d) >= 20, "published")
    for s in (a, b):
        assert len(collect(s, lambda ps: len(ps) >= 5, WAIT)) == 5
    # each packet tested once for both readers: 20 evaluations, not 40
    assert filter_metric(d, "passed", expr) == 5
    assert filter_metric(d, "dropped", expr) == 15


@contextlib.contextmanager
def overloaded_reader(netns, tmp_path, ctx, closing):
    """A daemon with publish.hwm 2 and a reader filtering for DNS with a receive hwm of 1 that
    does not read while 50 rounds of 8 DNS and 8 other datagrams of 1,400 bytes come: the
    daemon has dropped messages for it. (daemon, reader)."""
    rules(netns)
    workdir = tmp_path / "d"
    publish = {"bind": [f"ipc://{workdir}/run/feed.sock"], "hwm": 2}
    with NflogdProcess(netns, workdir, groups=[1], node="f", extra={"publish": publish}) as d:
        sub = Subscriber(d.endpoint, groups=[1], filter="udp and dst port 53", rcvhwm=1, context=ctx)
        closing.append(sub)
        accepted(sub)
        big = b"x" * 1400
        for r in range(50):
            netns.send_udp([big] * 8, "127.0.0.1", DNS)
            netns.send_udp([big] * 8, "127.0.0.1", OTHER)
            wait_until(lambda r=r: packets(d) >= 16 * (r + 1), "published")
        wait_until(lambda: (d.metric("nflogd_feed_slow_dropped_messages_total") or 0) > 0, "a drop")
        yield d, sub


def test_loss_while_filtered_counts_only_the_packets_the_filter_passed(netns, tmp_path, ctx, closing):
    """A reader that does not read while 600 KiB of its packets come, past its socket's
    buffers and a daemon's hwm of 2 messages: what it lost is exactly the packets its filter
    passed and it did not get, never one of those excluded."""
    with overloaded_reader(netns, tmp_path, ctx, closing) as (d, sub):
        got = []
        while (batch := sub.recv_batch(timeout=0.5)) is not None:  # what was queued, to the end
            got += batch.packets
        netns.send_udp([b"last"], "127.0.0.1", DNS)  # a message after the loss shows the gap
        got += collect(sub, lambda ps: any(p.data.endswith(b"last") for p in ps), WAIT)
        assert d.metric("nflogd_kernel_dropped_packets_total", group="1") == 0
    assert sub.total_lost > 0
    assert len(got) + sub.total_lost == 401  # 50 x 8 and the last; none of the 400 excluded


def raw_filter(ctx, endpoint: str, spec: bytes, sock=None) -> tuple[zmq.Socket, bool, str]:
    """A libzmq SUB stating a hand-made filter; the daemon's answer (accepted, reason)."""
    if sock is None:
        sock = ctx.socket(zmq.SUB)
        sock.connect(endpoint)
    topic = filters_mod.FILTER_TOPIC + spec
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    assert sock.poll(int(WAIT * 1000)), "no answer to the filter"
    msg = sock.recv_multipart()
    assert msg[0] == topic
    return sock, *filters_mod.filter_reply(msg)


def spec(insns: list[tuple[int, int, int, int]], text: bytes = b"hand-made") -> bytes:
    program = b"".join(struct.pack("<HBBI", *i) for i in insns)
    return filters_mod.HEAD.pack(1, 0, 0, 0, 0, 0, 0, 0, 0, 0, len(insns), len(text), 0) + text + program


RET_ALL = (0x06, 0, 0, 0xFFFF)  # BPF_RET|BPF_K


def test_hostile_filters_are_refused_with_a_reason_counted_and_logged_once(netns, daemon, ctx, closing):
    d = daemon
    jump_out = spec([(0x05, 0, 0, 10), RET_ALL])  # BPF_JMP|BPF_JA past the end
    s1, ok, why = raw_filter(ctx, d.endpoint, jump_out)
    closing.append(s1)
    assert (ok, why) == (False, "capture filter program refused by bpf_validate")
    s2, ok, why = raw_filter(ctx, d.endpoint, spec([RET_ALL] * 513))
    closing.append(s2)
    assert (ok, why) == (False, "capture filter of 513 BPF instructions, more than 512")
    s3, ok, why = raw_filter(ctx, d.endpoint, spec([RET_ALL] * 512))
    closing.append(s3)
    assert (ok, why) == (True, "")
    _, ok, why = raw_filter(ctx, d.endpoint, spec([RET_ALL], b"another"), sock=s3)  # the same connection
    assert (ok, why) == (False, "one filter per connection, and this one holds another")
    s4, ok, why = raw_filter(ctx, d.endpoint, spec([RET_ALL]) + b"t" * 17)
    closing.append(s4)
    assert (ok, why) == (False, "malformed filter: 17 bytes after the spec, more than 16")
    assert d.metric("nflogd_feed_filters_refused_total") == 4
    assert d.alive()
    lines = [line for line in d.stderr.splitlines() if "filter refused" in line]
    assert len([line for line in lines if "WARNING" in line]) == 1, lines  # once per episode
    assert "refused by bpf_validate; 1 refused so far" in lines[0]


def tap_command() -> list[str]:
    script = Path(sys.executable).parent / "nflog-tap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nflogd_client.tap"]


def test_nflog_tap_expression_runs_at_the_daemon(netns, daemon):
    d = daemon
    cmd = [*tap_command(), "-e", d.endpoint, "-g", "1", "-c", "4", "udp", "and", "dst", "port", "53"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "filter 'udp and dst port 53' in force" in d.stderr, "the tap's filter", TAP_WAIT)
        send(netns, OTHER, 6, "o")
        send(netns, DNS, 4, "d")
        out, err = p.communicate(timeout=TAP_WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    lines = out.decode().splitlines()
    assert len(lines) == 4 and all(":domain " in line for line in lines), lines
    assert err.decode() == "nflog-tap: 4 packets printed, 0 lost\n"


def test_nflog_tap_shows_the_daemons_refusal(netns, daemon):
    """A program libpcap compiles and the daemon refuses (over its size limit)."""
    expression = " or ".join(f"udp port {i}" for i in range(1, 200))
    assert len(Filter(expression).spec()) > 512 * 8
    cmd = [*tap_command(), "-e", daemon.endpoint, "-g", "1", *expression.split()]
    r = subprocess.run(cmd, capture_output=True, timeout=TAP_WAIT)
    assert r.returncode == 1
    err = r.stderr.decode()
    assert err.startswith("nflog-tap: filter refused by the daemon: capture filter of "), err
    assert err.endswith(" BPF instructions, more than 512\n") and err.count("\n") == 1, err


def test_scapy_sniff_filter_at_the_daemon(netns, daemon):
    from nflogd_client.scapy_socket import ZMQNFLOGSocket
    from scapy.layers.inet import UDP
    from scapy.sendrecv import AsyncSniffer

    d = daemon
    sniffer = AsyncSniffer(
        L2socket=ZMQNFLOGSocket, iface="nflog:1", endpoint=d.endpoint, filter="udp dst port 53", count=3
    )
    sniffer.start()
    try:
        wait_until(lambda: "in force" in d.stderr, "the sniffer's filter", TAP_WAIT)
        send(netns, OTHER, 5, "o")
        send(netns, DNS, 3, "d")
        sniffer.join(WAIT)
    finally:
        if sniffer.running:
            sniffer.stop()
    got = sniffer.results
    assert got is not None and len(got) == 3
    assert all(p[UDP].dport == DNS for p in got)


def test_a_refused_filter_raises_from_recv(netns, daemon, ctx, closing):
    """FilterRefused from recv(), the daemon's reason in it; the reader keeps working."""
    expression = " or ".join(f"udp port {i}" for i in range(1, 200))
    sub = Subscriber(daemon.endpoint, groups=[1], filter=expression, context=ctx)
    closing.append(sub)
    with pytest.raises(FilterRefused, match="more than 512$"):
        sub.recv(timeout=WAIT)
    assert sub.filter_state == "refused"
    assert sub.recv(timeout=0.1) is None


def test_filter_arguments(ctx):
    with pytest.raises(ValueError, match="syntax error"):
        Subscriber("ipc:///nonexistent/x.sock", filter="udp portt 1", context=ctx)
    with pytest.raises(ValueError, match="prefix and prefix_start"):
        Subscriber("ipc:///nonexistent/x.sock", prefix="a", prefix_start="b", context=ctx)
    with pytest.raises(ValueError, match="hook"):
        Subscriber("ipc:///nonexistent/x.sock", hook="sideways", context=ctx)
    with pytest.raises(ValueError, match="outside the mask"):
        Subscriber("ipc:///nonexistent/x.sock", mark=(0x10, 0x0F), context=ctx)
    assert wire.FLAG_FILTERED == 2


def test_async_subscriber_filters_at_the_daemon(netns, daemon):
    import asyncio

    from nflogd_client import AsyncSubscriber

    async def run() -> list[int]:
        async with AsyncSubscriber(daemon.endpoint, groups=[1], filter="udp and dst port 53") as sub:
            while sub.filter_state == "pending":
                assert await sub.recv(timeout=0.05) is None
            assert sub.filter_state == "accepted"
            send(netns, OTHER, 4, "o")
            send(netns, DNS, 2, "d")
            got = [await sub.recv(timeout=WAIT) for _ in range(2)]
            assert await sub.recv(timeout=0.3) is None
            return [dport(p) for p in got if p is not None]

    assert asyncio.run(asyncio.wait_for(run(), 30)) == [DNS, DNS]


def test_a_curve_readers_filter_runs_at_the_daemon_its_messages_boxed(netns, tmp_path):
    """A CURVE endpoint is the daemon's own server too: the filter's subscription is opened
    from its MESSAGE box, the daemon runs it, and the reply and the filtered messages come
    boxed for that reader; nothing is lost, only the filter's packets cross the connection."""
    from test_security import TCP, curve_daemon, in_netns, make_keys

    keys = make_keys(tmp_path / "curve")
    rules(netns)
    with curve_daemon(netns, tmp_path / "d", keys, groups=[1]) as d:
        cctx = in_netns(netns, zmq.Context)
        try:
            sub = in_netns(
                netns,
                lambda: Subscriber(
                    TCP,
                    groups=[1],
                    filter="udp and dst port 53",
                    server_public_key=keys.server_pub,
                    client_secret_key_file=keys.alice_secret,
                    context=cctx,
                ),  # fmt: skip
            )
            try:
                accepted(sub)
                assert "in force" in d.stderr
                send(netns, OTHER, 4, "o")
                send(netns, DNS, 3, "d")
                got = collect(sub, lambda ps: len(ps) >= 3, WAIT)
                assert [dport(p) for p in got] == [DNS] * 3
                assert sub.recv(timeout=0.3) is None and sub.total_lost == 0
                wait_until(lambda: packets(d) >= 7, "the daemon's count")
                assert filter_metric(d, "passed", "udp and dst port 53") == 3
                assert filter_metric(d, "dropped", "udp and dst port 53") == 4
            finally:
                sub.close()
        finally:
            cctx.destroy(linger=0)


def test_a_filtered_reader_gets_the_names_vlan_and_link_header_of_its_packets(netns, tmp_path, ctx, closing):
    """A bridge of two veth ports, one renamed (lanport0); the bridge family logs with the
    frames' VLAN tag and link-layer header, conntrack off. A reader whose filter passes only
    the frames of port lanport0 gets them with the router's name of that port, their VLAN tag
    and link header as the unfiltered reader gets them, and only the names its packets use."""
    for cmd in (
        "ip link add br0 type bridge",
        "ip link add va type veth peer name vb",
        "ip link set vb name lanport0",
        "ip link add vc type veth peer name vd",
        "ip link set lanport0 master br0",
        "ip link set vd master br0",
        "ip link set br0 up",
        *(f"ip link set {dev} up" for dev in ("va", "lanport0", "vc", "vd")),
    ):
        netns.run(*cmd.split())
    netns.nft(
        "table bridge tb {\n  chain c {\n    type filter hook prerouting priority 0;\n"
        '    meta l4proto udp log group 13 prefix "br"\n  }\n}\n'
    )
    dst, src = bytes.fromhex("020000000002"), bytes.fromhex("020000000001")

    def frame(dport: int, tag: bytes) -> bytes:
        ip = bytes(IP(src="10.99.0.1", dst="10.99.0.2") / UDP(sport=1, dport=dport) / tag)
        return dst + src + struct.pack(">HH", 0x8100, (1 << 13) | 5) + b"\x08\x00" + ip

    with NflogdProcess(netns, tmp_path / "d", groups=[13], node="f") as d:
        mine = Subscriber(d.endpoint, groups=[13], filter="udp and dst port 9", context=ctx)
        every = Subscriber(d.endpoint, groups=[13], context=ctx)
        closing += [mine, every]
        accepted(mine)
        wait_until(lambda: d.metric("nflogd_subscribers") == 2, "two subscribers")
        time.sleep(0.2)  # the unfiltered reader's subscription: no reply to wait for
        with netns.entered():
            a, c = (socket.socket(socket.AF_PACKET, socket.SOCK_RAW) for _ in range(2))
            a.bind(("va", 0))
            c.bind(("vc", 0))
        with a, c:
            for i in range(10):  # one burst: the batches hold frames of both ports
                a.send(frame(9, b"mine %d" % i))
                c.send(frame(10, b"other %d" % i))
        all_ = collect(every, lambda ps: len(ps) >= 20, WAIT)
        got = collect(mine, lambda ps: len(ps) >= 10, WAIT)
        assert mine.recv(timeout=0.3) is None
    assert "Traceback" not in d.stderr, d.stderr
    want = [p for p in all_ if dport(p) == 9]
    assert len(want) == 10 and len(got) == 10
    port, bridge = want[0].physindev, want[0].indev  # the bridge family: the port is physindev
    assert {(p.indev_name, p.physindev_name) for p in all_} == {("br0", "lanport0"), ("br0", "vd")}
    for i, (p, q) in enumerate(zip(got, want)):
        assert p.data == q.data and p.data.endswith(b"mine %d" % i)
        assert (p.physindev, p.physindev_name, p.indev_name, p.prefix) == (port, "lanport0", "br0", "br")
        assert p.vlan == q.vlan == (0x2005, 0x8100)
        assert p.l2hdr == q.l2hdr and p.l2hdr is not None and p.l2hdr[:12] == dst + src
        assert p.ct is None
        assert p.ifnames == {bridge: "br0", port: "lanport0"}  # only the names its packets use
    assert any(len(q.ifnames or {}) == 3 for q in all_), "no batch held frames of both ports"
    assert mine.total_lost == 0 and every.total_lost == 0


def test_a_filtered_reader_counts_a_lost_tail_from_the_sequence_mark(netns, tmp_path, ctx, closing):
    """As the loss test above, but nothing comes after the loss: the group's sequence mark
    (a message of no packets) reaches the filtered reader with the filter's numbering, so the
    packets lost at the end are counted, exactly, in packets the filter passed."""
    with overloaded_reader(netns, tmp_path, ctx, closing) as (d, sub):
        got, marks = [], []
        deadline = time.monotonic() + WAIT
        while not marks and time.monotonic() < deadline:
            batch = sub.recv_batch(timeout=0.5)
            if batch is not None:
                (got.extend(batch.packets) if batch.packets else marks.append(batch))
        assert marks, "no sequence mark"
        assert d.metric("nflogd_kernel_dropped_packets_total", group="1") == 0
    assert marks[0].first_seq == 400  # the filter's numbering: 50 x 8 passed
    assert sub.total_lost > 0
    assert len(got) + sub.total_lost == 400


def test_tagged_subscriptions_of_one_filter_hold_it_together_and_plain_groups_get_the_group_topic(
    netns, daemon, ctx, closing
):
    """Two subscriptions of one filter on one connection (tags differ, as a relay's readers'):
    each is answered with its own topic, and the filter stays while one is left. Groups
    subscribed with their own topics get the filtered messages with the group's topic
    (vector 8); through the filter (wire.FILTERED_TOPIC), with the filter's topic and id."""
    d = daemon
    f = spec([RET_ALL])
    sock, ok, why = raw_filter(ctx, d.endpoint, f + b"tag-one")
    closing.append(sock)
    assert (ok, why) == (True, "")
    _, ok, why = raw_filter(ctx, d.endpoint, f + b"tag-two", sock=sock)
    assert (ok, why) == (True, "")
    sock.setsockopt(zmq.UNSUBSCRIBE, filters_mod.FILTER_TOPIC + f + b"tag-one")
    sock.setsockopt(zmq.SUBSCRIBE, b"\x00\x02")  # group 2, its own topic
    wait_until(lambda: "subscribe '0002'" in d.stderr, "the group's subscription")
    send(netns, OTHER, 1, "plain")
    assert sock.poll(int(WAIT * 1000)), "the filter went with one of its two subscriptions"
    msg = sock.recv_multipart()
    assert msg[0] == b"\x00\x02" and wire.header_flags(msg) & wire.FLAG_FILTERED
    assert [p.data.endswith(b"plain #0") for p in wire.decode(msg).packets] == [True]

    through = ctx.socket(zmq.SUB)
    closing.append(through)
    through.connect(d.endpoint)
    other = Filter("udp", prefix="other: ")
    through.setsockopt(zmq.SUBSCRIBE, other.topic(b"t"))
    through.setsockopt(zmq.SUBSCRIBE, other.group_topic(b"\x00\x02"))
    assert through.poll(int(WAIT * 1000)) and filters_mod.filter_reply(through.recv_multipart()) == (True, "")
    wait_until(lambda: d.stderr.count("subscribe '0002'") >= 2, "the group's subscription through the filter")
    send(netns, OTHER, 1, "through")
    assert through.poll(int(WAIT * 1000))
    msg = through.recv_multipart()
    assert msg[0] == wire.FILTERED_TOPIC + filters_mod.spec_id(other.spec()) + b"\x00\x02"
    batch = wire.decode(msg)
    assert (batch.group, batch.first_seq, [p.prefix for p in batch.packets]) == (2, 0, ["other: "])
