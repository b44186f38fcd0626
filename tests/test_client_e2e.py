"""The clients against the real daemon in a test namespace, with real kernel packets.

Every packet is checked against an independent copy: an AF_PACKET socket on the
namespace's loopback (``LoopCapture``) records the bytes the kernel received and its
receive timestamp, the same ``skb->tstamp`` NFLOG reports at INPUT (in microseconds).

- a Subscriber per group gets exactly its group, IPv4 and IPv6, byte-exact, truncated
  by copy_range where configured;
- scapy through ZMQNFLOGSocket in each form of sniff();
- nflog-tap's pcap read back by tcpdump (and tshark for LINKTYPE_NFLOG);
- a rogue publisher sending garbage on a second endpoint of the same client;
- the daemon stopped (SIGTERM or SIGKILL) and started again on the same ipc path.

The in-process fake-publisher tests (test_subscriber, test_scapy_socket, test_tap) cover
the clients' own edge cases; here the point is the real daemon and the real kernel.
"""

from __future__ import annotations

import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import zmq
from daemonutil import NflogdProcess
from feedutil import collect
from nflogd_client import Subscriber, tap, wire
from nflogd_client.scapy_socket import ZMQNFLOGSocket, install_zmq_listener
from scapy.compat import raw
from scapy.config import conf
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6
from scapy.sendrecv import AsyncSniffer, sniff
from scapy.utils import EDecimal, RawPcapReader

pytestmark = [pytest.mark.timeout(60), pytest.mark.kernel]

WAIT = 10.0  # seconds: the bound on anything that should happen at once
TAP_WAIT = 30.0  # a subprocess that imports scapy first
NODE = "e2e"
PORT = {1: 9991, 2: 9992, 3: 9993}  # udp dport -> logged to this group, at INPUT
PREFIX = "g1 in: "  # group 1's rule has a log prefix
SNAP = 64  # group 3's copy_range: its packets arrive truncated
BIG = 300  # payload bytes of group 3's packets, well over SNAP


# -- an independent copy of what the kernel received ----------------------------------------------

ETH_P_ALL = 3
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
PACKET_HOST = 0


class LoopCapture:
    """AF_PACKET on the namespace's loopback: each UDP packet received, by destination port,
    as ``(IP bytes, kernel receive timestamp in ns)``, in arrival order."""

    def __init__(self, netns):
        with netns.entered():
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind(("lo", 0))
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.by_port: dict[int, list[tuple[bytes, int]]] = {}

    def _read(self, timeout: float) -> bool:
        if not select.select([self.sock], [], [], max(timeout, 0))[0]:
            return False
        frame, anc, _, addr = self.sock.recvmsg(65536, 64)
        if addr[2] != PACKET_HOST:  # loopback shows each packet twice: keep the received copy
            return True
        ts = None
        for level, kind, value in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", value[:16])
                ts = sec * 1_000_000_000 + nsec
        data = frame[14:]  # loopback's all-zero Ethernet header
        if data[0] >> 4 == 4 and data[9] == 17:
            port = struct.unpack_from(">H", data, (data[0] & 15) * 4 + 2)[0]
        elif data[0] >> 4 == 6 and data[6] == 17:
            port = struct.unpack_from(">H", data, 42)[0]
        else:
            return True  # ICMP port unreachable and the like
        assert ts is not None, "no SO_TIMESTAMPNS on a captured packet"
        self.by_port.setdefault(port, []).append((data, ts))
        return True

    def expect(self, group: int, n: int, timeout: float = WAIT) -> list[tuple[bytes, int]]:
        """The first ``n`` packets to ``group``'s port (asserting that many came)."""
        deadline = time.monotonic() + timeout
        have = self.by_port.setdefault(PORT[group], [])
        while len(have) < n and self._read(deadline - time.monotonic()):
            pass
        while self._read(0):  # and whatever else is queued, so nothing is left for later
            pass
        assert len(have) >= n, f"the loopback capture saw {len(have)} of {n} packets to group {group}"
        return have[:n]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def capture(netns):
    c = LoopCapture(netns)
    yield c
    c.close()


# -- the daemon, traffic, synchronisation ---------------------------------------------------------


@pytest.fixture
def closing():
    """Clients (Subscriber, ZMQNFLOGSocket, Rogue) a test opens: closed afterwards, whatever happened."""
    opened: list = []
    yield opened
    for c in opened:
        c.close()


@pytest.fixture
def daemon(netns, tmp_path):
    """nflogd in ``netns`` reading groups 1, 2 and 3 (copy_range SNAP), node NODE."""
    netns.log_rule(1, hook="input", match=f"udp dport {PORT[1]}", extra=f'prefix "{PREFIX}"')
    netns.log_rule(2, hook="input", match=f"udp dport {PORT[2]}")
    netns.log_rule(3, hook="input", match=f"udp dport {PORT[3]}")
    groups = [1, 2, {"group": 3, "copy_range": SNAP}]
    with NflogdProcess(netns, tmp_path / "d", groups=groups, node=NODE) as d:
        yield d
    assert "Traceback" not in d.stderr, d.stderr


def subscriptions(d: NflogdProcess) -> int:
    """Subscriptions the daemon has logged so far (its debug log: ``subscribe '0001'``)."""
    return d.stderr.count("DEBUG: subscribe ")


def wait_subscribed(d: NflogdProcess, before: int, n: int, timeout: float = WAIT) -> None:
    """Wait for ``n`` more subscriptions than ``before``: the client's reached the daemon."""
    deadline = time.monotonic() + timeout
    while subscriptions(d) < before + n:
        assert d.alive(), f"the daemon died; stderr:\n{d.stderr}"
        assert time.monotonic() < deadline, f"{n} subscriptions not seen in {timeout} s:\n{d.stderr}"
        time.sleep(0.01)


def send(netns, group: int, n: int, tag: str = "", size: int = 0) -> list[bytes]:
    """``n`` UDP datagrams to ``group``'s port, alternately over IPv4 and IPv6; the payloads."""
    payloads = []
    for i in range(n):
        p = f"{tag} g{group} #{i} {'v4' if i % 2 == 0 else 'v6'} ".encode()
        if size:
            p = (p + bytes(range(256)) * (size // 256 + 1))[:size]
        netns.send_udp([p], "127.0.0.1" if i % 2 == 0 else "::1", PORT[group])
        payloads.append(p)
    return payloads


def metric(d: NflogdProcess, name: str, group: int) -> int:
    value = d.metric(name, group=str(group))
    assert value is not None, f"{name}{{group={group}}} missing"
    return int(value)


def wait_published(d: NflogdProcess, counts: dict[int, int], timeout: float = WAIT) -> None:
    """Wait until the daemon's nflogd_packets_total reaches ``counts`` (group -> packets)."""
    deadline = time.monotonic() + timeout
    while True:
        have = {g: metric(d, "nflogd_packets_total", g) for g in counts}
        if all(have[g] >= n for g, n in counts.items()):
            return
        assert time.monotonic() < deadline, f"published {have}, expected {counts}"
        time.sleep(0.02)


def check_packet(p: wire.Packet, group: int, captured: tuple[bytes, int], seq: int) -> None:
    """One feed packet against the kernel's own copy of it."""
    data, ts_ns = captured
    assert (p.node, p.group, p.seq) == (NODE, group, seq)
    assert p.hw_protocol == (0x0800 if data[0] >> 4 == 4 else 0x86DD)
    assert p.len == len(data)
    if group == 3:
        assert p.caplen == SNAP < p.len and p.truncated
        assert p.data == data[:SNAP]
    else:
        assert p.caplen == p.len and not p.truncated
        assert p.data == data
    # The kernel's receive time; NFLOG carries it in microseconds.
    assert p.ts_kernel and p.ts_ns == ts_ns // 1000 * 1000
    assert p.hook == 1  # NF_INET_LOCAL_IN
    assert p.prefix == (PREFIX if group == 1 else None)  # nft sends an empty NFULA_PREFIX: no prefix


# -- a Subscriber per group --------------------------------------------------------------------------


def test_subscriber_per_group_gets_exactly_its_packets(netns, daemon, capture, ctx, closing):
    d = daemon
    before = subscriptions(d)
    subs = {g: Subscriber(d.endpoint, groups=g, context=ctx) for g in (1, 2, 3)}
    every = Subscriber(d.endpoint, context=ctx)  # groups=None: the empty prefix
    closing += [*subs.values(), every]
    wait_subscribed(d, before, 4)
    n = 8
    sent = {g: send(netns, g, n, size=BIG if g == 3 else 0) for g in (1, 2, 3)}
    for g in (2, 3):  # and a second round, so each group has several batches
        sent[g] += send(netns, g, n, tag="again", size=BIG if g == 3 else 0)
    total = sum(len(v) for v in sent.values())

    got = {g: collect(subs[g], lambda ps, g=g: len(ps) >= len(sent[g]), WAIT) for g in (1, 2, 3)}
    got_all = collect(every, lambda ps: len(ps) >= total, WAIT)
    # Nothing more: another group's batch would have arrived by now (or shows in `got` already).
    for i, sub in enumerate((*subs.values(), every)):
        assert sub.recv(timeout=0 if i else 0.2) is None

    for g in (1, 2, 3):
        cap = capture.expect(g, len(sent[g]))
        assert len(got[g]) == len(sent[g])
        for i, (p, c, payload) in enumerate(zip(got[g], cap, sent[g])):
            check_packet(p, g, c, seq=i)
            if g != 3:
                assert p.data.endswith(payload)
        assert [p.fields() for p in got_all if p.group == g] == [p.fields() for p in got[g]]
        assert subs[g].lost == {(NODE, g): 0} and subs[g].kernel_dropped == {(NODE, g): 0}
        assert (subs[g].malformed, subs[g].restarts, subs[g].received) == (0, 0, len(sent[g]))
        assert metric(d, "nflogd_packets_total", g) == len(sent[g])
    assert every.lost == {(NODE, g): 0 for g in (1, 2, 3)} and every.received == total
    assert metric(d, "nflogd_truncated_packets_total", 3) == len(sent[3])
    assert metric(d, "nflogd_truncated_packets_total", 1) == 0


# -- scapy: each way of sniffing ------------------------------------------------------------------

SNIFF_FORMS = ["L2socket", "opened_socket", "AsyncSniffer", "install_zmq_listener", "iface"]


@pytest.fixture
def restore_l2listen():
    saved = conf.L2listen
    yield
    conf.L2listen = saved


class Sender(threading.Thread):
    """Sends the sniff tests' traffic once the daemon has ``n`` new subscriptions: 4 packets
    to group 1 (IPv4, IPv6), 2 to group 2 (not sniffed), 1 truncated one to group 3."""

    def __init__(self, netns, d: NflogdProcess, n: int = 2):
        super().__init__(daemon=True)
        self.netns, self.d, self.n = netns, d, n
        self.before = subscriptions(d)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            wait_subscribed(self.d, self.before, self.n)
            send(self.netns, 2, 2)
            send(self.netns, 1, 4)
            send(self.netns, 3, 1, size=BIG)
        except BaseException as e:  # reported by check()
            self.error = e

    def check(self) -> None:
        self.join(WAIT)
        assert not self.is_alive(), "sender stuck"
        if self.error is not None:
            raise self.error


def check_sniffed(pkts, capture: LoopCapture) -> None:
    """The 5 packets of groups 1 and 3 that Sender sends, each against the kernel's copy."""
    assert len(pkts) == 5, pkts
    assert sorted(p.nflog_group for p in pkts) == [1, 1, 1, 1, 3]
    expected = {1: capture.expect(1, 4), 3: capture.expect(3, 1)}
    for g in (1, 3):
        mine = [p for p in pkts if p.nflog_group == g]
        assert [p.nflog_seq for p in mine] == list(range(len(mine)))
        for p, (data, ts_ns) in zip(mine, expected[g]):
            assert type(p) is (IP if data[0] >> 4 == 4 else IPv6)
            assert p.nflog_node == NODE
            assert p.nflog_prefix == (PREFIX if g == 1 else None)
            assert p.nflog_packet.ts_kernel
            # The capture time, exact (EDecimal's == also takes floats that are merely close).
            assert isinstance(p.time, EDecimal)
            assert p.time.compare(EDecimal(ts_ns // 1000 * 1000) / 1_000_000_000) == 0
            assert abs(p.time - EDecimal(ts_ns) / 1_000_000_000) < EDecimal("0.000001")
            assert p.wirelen == len(data)
            if g == 3:
                assert len(raw(p)) == SNAP < p.wirelen
                assert raw(p) == data[:SNAP]
            else:
                assert raw(p) == data


@pytest.mark.usefixtures("restore_l2listen")
@pytest.mark.parametrize("form", SNIFF_FORMS)
def test_sniff(netns, daemon, capture, form, monkeypatch):
    d = daemon
    sender = Sender(netns, d)
    sock = None
    try:
        if form == "L2socket":
            sender.start()
            pkts = sniff(
                L2socket=ZMQNFLOGSocket, iface="nflog:1,3", endpoint=d.endpoint, count=5, timeout=WAIT
            )
        elif form == "opened_socket":
            sock = ZMQNFLOGSocket(d.endpoint, groups=[1, 3])
            sender.start()
            pkts = sniff(opened_socket=sock, count=5, timeout=WAIT)
            assert not sock.closed
            assert sock.lost == {(NODE, 1): 0, (NODE, 3): 0} and sock.total_lost == 0
        elif form == "AsyncSniffer":
            seen: list = []
            five = threading.Event()

            def prn(p):
                seen.append(p)
                if len(seen) == 5:
                    five.set()

            t = AsyncSniffer(L2socket=ZMQNFLOGSocket, iface="nflog:1,3", endpoint=d.endpoint, prn=prn)
            t.start()
            try:
                sender.start()
                assert five.wait(WAIT), f"{len(seen)} packets sniffed"
                # idle now, blocked waiting for traffic: stop() must still return at once
                t0 = time.monotonic()
                pkts = t.stop()
                assert time.monotonic() - t0 < 1.0
            finally:
                if t.running:
                    t.stop()
            assert list(pkts) == seen
        elif form == "install_zmq_listener":
            install_zmq_listener(d.endpoint, groups=[1, 3])
            sender.start()
            pkts = sniff(count=5, timeout=WAIT)  # plain sniff(): conf.L2listen
        else:  # "iface": nothing installed, the nflog name and $NFLOGD_ENDPOINT
            if conf.use_pcap:
                pytest.skip("with conf.use_pcap, libpcap's own 'nflog' device takes the name")
            monkeypatch.setenv("NFLOGD_ENDPOINT", d.endpoint)
            assert not (isinstance(conf.L2listen, type) and issubclass(conf.L2listen, ZMQNFLOGSocket))
            sender.start()
            pkts = sniff(iface="nflog:1,3", count=5, timeout=WAIT)
        sender.check()
        check_sniffed(pkts, capture)
    finally:
        if sock is not None:
            sock.close()


# -- nflog-tap into tcpdump and tshark -------------------------------------------------------------


def tap_command() -> list[str]:
    script = Path(sys.executable).parent / "nflog-tap"
    return [str(script)] if script.exists() else [sys.executable, "-m", "nflogd_client.tap"]


def pcap_records(path: Path) -> int:
    """Complete records in a pcap file that may still be being written."""
    b = path.read_bytes() if path.exists() else b""
    if len(b) < 24:
        return 0
    order = "<" if b[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    off = 24
    n = 0
    while off + 16 <= len(b):
        caplen = struct.unpack_from(order + "I", b, off + 8)[0]
        if off + 16 + caplen > len(b):
            break
        off += 16 + caplen
        n += 1
    return n


@pytest.mark.parametrize("linktype", ["ip", "nflog"])
def test_nflog_tap_into_tcpdump(netns, daemon, capture, tmp_path, linktype):
    d = daemon
    out = tmp_path / f"{linktype}.pcap"
    before = subscriptions(d)
    cmd = [*tap_command(), "-e", d.endpoint, "-g", "1", "-g", "3", "-w", str(out), "--linktype", linktype]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_subscribed(d, before, 2, timeout=TAP_WAIT)
        send(netns, 2, 3)  # not tapped
        send(netns, 1, 6)
        send(netns, 3, 2, size=BIG)
        want = 8
        wait_published(d, {1: 6, 2: 3, 3: 2})
        deadline = time.monotonic() + WAIT
        while pcap_records(out) < want and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pcap_records(out) == want
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=TAP_WAIT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert err.decode() == f"nflog-tap: {want} packets written, 0 lost\n"

    r = subprocess.run(["tcpdump", "-n", "-r", str(out)], capture_output=True, timeout=TAP_WAIT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert len(lines) == want, lines
    assert sum("IP 127.0.0.1." in x and f" > 127.0.0.1.{PORT[1]}: UDP" in x for x in lines) == 3
    assert sum("IP6 ::1." in x and f" > ::1.{PORT[1]}: UDP" in x for x in lines) == 3
    big = [x for x in lines if f".{PORT[3]}: UDP, length {BIG}" in x]  # from the copied headers
    assert len(big) == 2
    if linktype == "nflog":  # the record is the captured length; the IP header tells the rest
        assert all("bytes missing" in x for x in big)
    assert not [x for x in lines if f".{PORT[2]}:" in x]

    expected = {1: capture.expect(1, 6), 3: capture.expect(3, 2)}
    with RawPcapReader(str(out)) as reader:
        assert reader.linktype == (tap.LINKTYPE_RAW if linktype == "ip" else tap.LINKTYPE_NFLOG)
        records = list(reader)
    if linktype == "ip":  # the packets themselves, byte for byte, with their real length
        by_port: dict[int, list] = {}
        for data, meta in records:
            by_port.setdefault(PORT[3] if meta.caplen < meta.wirelen else PORT[1], []).append((data, meta))
        for g in (1, 3):
            assert len(by_port[PORT[g]]) == len(expected[g])
            for (data, meta), (kdata, ts_ns) in zip(by_port[PORT[g]], expected[g]):
                assert data == kdata[: SNAP if g == 3 else None]
                assert meta.wirelen == len(kdata)
                assert (meta.sec, meta.usec) == divmod(ts_ns // 1000, 1_000_000)
    else:  # the prefix, as Wireshark's dissector reads it
        r = subprocess.run(
            ["tshark", "-r", str(out), "-T", "fields", "-e", "nflog.res_id", "-e", "nflog.prefix"],
            capture_output=True,
            timeout=TAP_WAIT,
        )
        assert r.returncode == 0, r.stderr
        rows = sorted(r.stdout.decode().splitlines())
        assert rows == [f"1\t{PREFIX}"] * 6 + ["3\t"] * 2


# -- a rogue publisher next to the daemon ----------------------------------------------------------


def garbage() -> list[list[bytes]]:
    """Messages the SUB socket lets through (they start with group 1's topic) that are no
    version-1 batch: malformed ones and other applications' messages."""
    t = wire.topic(1)
    ok = wire.encode(1, "rogue", 7, 0, [wire.Packet.build(1, b"\x45" + b"\0" * 27, 1, hw_protocol=0x0800)])

    def spoil(index: int, value: bytes) -> list[bytes]:
        m = list(ok)
        m[index] = value
        return m

    header = ok[1]
    return [
        [t],  # one frame
        [t + b"garbage"],
        [t, b"hello", b"world"],  # another application's three frames
        [t, b'{"event": "login", "user": "x"}', b"", b""],  # foreign, four frames
        [*ok, b"extra"],  # five frames
        spoil(0, t + b"\x00"),  # a three-byte topic
        spoil(1, b"XXXX" + header[4:]),  # bad magic
        spoil(1, header[:4] + b"\x02" + header[5:]),  # version 2
        spoil(1, header[:20]),  # short header
        spoil(1, header[:6] + struct.pack("<H", 2) + header[8:]),  # header group 2 under topic 1
        spoil(2, ok[2][:-1]),  # record table one byte short
        spoil(3, ok[3][:-1]),  # payload beyond the data frame
        [t, bytes(65536), bytes(65536), bytes(65536)],  # large zeros
    ]


class Rogue:
    """A second XPUB the client also connects to; it knows nothing of the daemon."""

    def __init__(self, ctx, path: Path):
        self.endpoint = f"ipc://{path}"
        self.sock = ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)

    def wait_subscribed(self, topic: bytes, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0 and self.sock.poll(int(left * 1000) + 1), "no subscription at the rogue"
            if self.sock.recv() == b"\x01" + topic:
                return

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.mark.parametrize("client", ["Subscriber", "sniff"])
def test_rogue_publisher_garbage_is_counted_and_real_packets_arrive(
    netns, daemon, capture, ctx, tmp_path, client, closing
):
    d = daemon
    rogue = Rogue(ctx, tmp_path / "rogue.sock")
    closing.append(rogue)
    junk = garbage()
    sentinel = wire.encode(
        1, "rogue", 7, 0, [wire.Packet.build(1, b"\x45" + b"\0" * 27, 1, hw_protocol=0x0800)]
    )
    n = len(junk)  # one real packet after each junk message
    before = subscriptions(d)
    if client == "Subscriber":
        sub = Subscriber([d.endpoint, rogue.endpoint], groups=1, context=ctx)
        closing.append(sub)
    else:
        sock = ZMQNFLOGSocket([d.endpoint, rogue.endpoint], groups=1, context=ctx)
        closing.append(sock)
        sub = sock.subscriber
    error: list[BaseException] = []

    def publish() -> None:  # junk and real packets interleaved, then the rogue's last word
        try:
            for i, m in enumerate(junk):
                rogue.sock.send_multipart(m)
                send(netns, 1, 1, tag=f"real {i}")
            rogue.sock.send_multipart(sentinel)
        except BaseException as e:
            error.append(e)

    wait_subscribed(d, before, 1)
    rogue.wait_subscribed(wire.topic(1))
    t = threading.Thread(target=publish, daemon=True)
    t.start()
    if client == "Subscriber":
        got = collect(
            sub, lambda ps: sum(p.node == NODE for p in ps) >= n and any(p.node == "rogue" for p in ps), WAIT
        )
    else:
        pkts = sniff(opened_socket=sock, count=n + 1, timeout=WAIT)
        got = [p.nflog_packet for p in pkts]
        assert all(type(p) is IP for p in pkts)
    t.join(WAIT)
    assert not t.is_alive() and not error, error
    # The sentinel came last on the rogue's connection: every junk message before it is counted.
    rogue_pkts = [p for p in got if p.node == "rogue"]
    real = [p for p in got if p.node == NODE]
    assert len(rogue_pkts) == 1 and len(real) == n, got
    assert sub.malformed == len(junk)
    cap = capture.expect(1, n)
    for i, (p, c) in enumerate(zip(real, cap)):
        check_packet(p, 1, c, seq=i)
        assert p.data.endswith(f"real {i} g1 #0 v4 ".encode())
    assert sub.lost == {(NODE, 1): 0, ("rogue", 1): 0}
    assert sub.restarts == 0
    assert metric(d, "nflogd_packets_total", 1) == n


# -- the daemon restarted under a running client -------------------------------------------------------


def packets(batches, group: int) -> list[wire.Packet]:
    return [p for b in batches if b.group == group for p in b.packets]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_daemon_restart_midstream_client_resumes_and_counts_the_gap(
    netns, daemon, capture, ctx, signum, closing
):
    d = daemon
    before = subscriptions(d)
    sub = Subscriber(d.endpoint, groups=[1, 2], context=ctx)
    closing.append(sub)
    wait_subscribed(d, before, 2)
    send(netns, 1, 4, tag="first")
    send(netns, 2, 4, tag="first")
    old = collect(sub, lambda bs: sum(len(b.packets) for b in bs) >= 8, WAIT, batches=True)
    assert [len(packets(old, g)) for g in (1, 2)] == [4, 4]
    old_epoch = {b.epoch for b in old}
    assert len(old_epoch) == 1 and sub.lost == {(NODE, 1): 0, (NODE, 2): 0}

    assert d.stop(signum) == (0 if signum == signal.SIGTERM else -signal.SIGKILL)
    before = subscriptions(d)
    d.start()  # the same config: the same ipc path
    # The client does not touch its socket now, so libzmq has not resent its subscriptions
    # and the new run publishes to nobody: these packets advance the sequence and are lost.
    early = {1: len(send(netns, 1, 3, tag="early")), 2: len(send(netns, 2, 2, tag="early"))}
    wait_published(d, early)
    assert subscriptions(d) == before, "the client resubscribed before it was used"

    # Slow joiner: keep sending on group 1 while the client waits in recv, until it resumes.
    sent = dict(early)
    new: list[wire.Batch] = []
    deadline = time.monotonic() + WAIT
    while not packets(new, 1) and time.monotonic() < deadline:
        sent[1] += len(send(netns, 1, 1, tag="resume"))
        new += collect(sub, lambda bs: bool(bs), timeout=0.1, batches=True)
    assert packets(new, 1), f"the client did not resume; stderr:\n{d.stderr}"
    wait_subscribed(d, before, 2)  # both groups' subscriptions came back with the reconnection
    sent[1] += len(send(netns, 1, 5, tag="after"))
    sent[2] += len(send(netns, 2, 5, tag="after"))
    wait_published(d, sent)
    published = {g: metric(d, "nflogd_packets_total", g) for g in (1, 2)}
    assert published == sent  # every packet sent after the restart, published by the new run

    def accounted(bs) -> bool:
        every = new + bs
        return all(len(packets(every, g)) + sub.lost[(NODE, g)] >= published[g] for g in (1, 2))

    new += collect(sub, accounted, WAIT, batches=True)
    # after SIGTERM the old run's last words: each group's sequence mark, where it ended
    last_words = [b for b in new if b.epoch in old_epoch]
    assert all(not b.packets and b.first_seq == 4 for b in last_words)
    assert len(last_words) <= (2 if signum == signal.SIGTERM else 0)
    new = [b for b in new if b.epoch not in old_epoch]
    assert len({b.epoch for b in new}) == 1
    assert sub.restarts == 1  # one node, one restart, though two groups saw it
    for g in (1, 2):
        got = packets(new, g)
        lost = sub.lost[(NODE, g)]
        assert lost >= early[g]  # the gap: at least what the new run published before we were back
        assert len(got) + lost == published[g]
        assert [p.seq for p in got] == list(range(lost, published[g]))
        cap = capture.expect(g, 4 + published[g])  # the kernel's copies: 4 before, then the new run's
        for p in got:
            check_packet(p, g, cap[4 + p.seq], seq=p.seq)
        assert sub.kernel_dropped[(NODE, g)] == 0
    assert sub.recv(timeout=0.2) is None
    assert sub.malformed == 0


# -- a metadata-only group ---------------------------------------------------------------------------


def test_metadata_only_group_real_lengths_valid_pcap_no_invented_addresses(netns, tmp_path):
    """copy_range 0: records with caplen 0 and the real length, nflogd_bytes_total counting
    real bytes; nflog-tap writes them in NFLOG and in raw pcap, which tcpdump and tshark read,
    with their real length in the record's orig_len, and prints no address it did not see."""
    netns.log_rule(4, hook="input", match="udp dport 9994")
    with NflogdProcess(netns, tmp_path / "d", groups=[{"group": 4, "copy_range": 0}], node=NODE) as d:
        files = {lt: tmp_path / f"{lt}.pcap" for lt in ("ip", "nflog")}
        procs = {
            lt: subprocess.Popen(
                [*tap_command(), "-e", d.endpoint, "-g", "4", "-c", "2", "-w", str(f), "--linktype", lt],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for lt, f in files.items()
        }
        text = subprocess.Popen(
            [*tap_command(), "-e", d.endpoint, "-g", "4", "-c", "2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        procs["text"] = text
        try:
            wait_subscribed(d, 0, 3, timeout=TAP_WAIT)
            netns.send_udp([b"x" * 100], "127.0.0.1", 9994)
            netns.send_udp([b"y" * 1000], "::1", 9994)
            wait_published(d, {4: 2})
            assert metric(d, "nflogd_bytes_total", 4) == 128 + 1048
            assert metric(d, "nflogd_truncated_packets_total", 4) == 2
            results = {}
            for name in ("nflog", "ip", "text"):  # -c 2 ends each of them
                out, err = procs[name].communicate(timeout=TAP_WAIT)
                results[name] = (procs[name].returncode, out, err.decode())
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.communicate()
    assert results["nflog"][0] == 0 and results["nflog"][2] == "nflog-tap: 2 packets written, 0 lost\n"
    assert results["ip"][0] == 0 and results["ip"][2] == "nflog-tap: 2 packets written, 0 lost\n"
    # Raw IP: records of no captured bytes, the real length as orig_len
    with RawPcapReader(str(files["ip"])) as reader:
        assert [(data, meta.wirelen) for data, meta in reader] == [(b"", 128), (b"", 1048)]
    r = subprocess.run(["tcpdump", "-n", "-r", str(files["ip"])], capture_output=True, timeout=TAP_WAIT)
    assert r.returncode == 0 and len(r.stdout.decode().splitlines()) == 2, r.stderr
    # NFLOG: the attributes captured; orig_len - caplen is the packet the copy range left out
    with RawPcapReader(str(files["nflog"])) as reader:
        assert [meta.wirelen - len(data) for data, meta in reader] == [128, 1048]
    r = subprocess.run(["tcpdump", "-n", "-r", str(files["nflog"])], capture_output=True, timeout=TAP_WAIT)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.decode().splitlines()) == 2 and b"Invalid" not in r.stdout + r.stderr
    r = subprocess.run(
        ["tshark", "-r", str(files["nflog"]), "-T", "fields", "-e", "nflog.res_id", "-e", "frame.len"],
        capture_output=True,
        timeout=TAP_WAIT,
    )
    assert r.returncode == 0, r.stderr
    assert [row.split("\t")[0] for row in r.stdout.decode().splitlines()] == ["4", "4"]
    code, out, _ = results["text"]
    lines = out.decode().splitlines()
    assert code == 0 and len(lines) == 2
    assert " len 128 (captured 0) no payload (metadata only)" in lines[0]
    assert " len 1048 (captured 0) no payload (metadata only)" in lines[1]
    assert "127.0.0.1" not in out.decode() and "::1" not in out.decode()
