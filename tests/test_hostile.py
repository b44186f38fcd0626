"""Hostile peers, files and limits: nothing a client, a file or a limit does may crash, stall or
bloat the daemon (docs/security.md, "Threat model").

The attackers are unprivileged (uid 65534 through setpriv) and run the system's python3 with the
standard library only: they speak ZMTP by hand (tests/test_hostile.py's ATTACKER), as anyone can.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path

import daemonutil
import pytest
import zmq
from daemonutil import NflogdProcess, nflogd_command, receive, wait_until
from feedutil import rec
from nflogd_client import Subscriber, wire
from nsutil import SteadyTraffic

FEED_PORT = 5556
PYTHON = "/usr/bin/python3"  # not the checkout's: the attacker may not be able to enter it
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

ATTACKER = r"""
import socket, struct, sys, time
mode, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
GREETING = b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" + b"\0" * 31
READY_BODY = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 3) + b"SUB"
READY = b"\x04" + bytes([len(READY_BODY)]) + READY_BODY

def frame(body):
    if len(body) < 256:
        return b"\x00" + bytes([len(body)]) + body
    return b"\x02" + struct.pack(">Q", len(body)) + body

def zmtp():
    s = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    s.sendall(GREETING + READY)
    return s

end = time.monotonic() + seconds
if mode == "idle":  # connections that never say a word
    conns = []
    for _ in range(int(sys.argv[4])):
        try:
            conns.append(socket.create_connection(("127.0.0.1", port)))
        except OSError:
            time.sleep(0.01)
    print(len(conns), flush=True)
    time.sleep(seconds)
elif mode == "flood":  # one topic, again and again
    blob = frame(b"\x01\x00\x01") * 100_000
    while time.monotonic() < end:
        try:
            s = zmtp()
            while time.monotonic() < end:
                s.sendall(blob)
        except OSError:
            time.sleep(0.05)
elif mode == "late":  # connected for a second, then one topic no message can match
    s = zmtp()
    time.sleep(1.0)
    s.sendall(frame(b"\x01" + b"abc"))
    t0 = time.monotonic()
    s.settimeout(seconds)
    try:
        while s.recv(65536):
            pass
        print("closed after %.3f s" % (time.monotonic() - t0), flush=True)
    except OSError:
        print("still open", flush=True)
elif mode == "topics":  # distinct long topics (60 bytes: what the feed's 64-byte message limit lets in)
    i = 0
    while time.monotonic() < end:
        try:
            s = zmtp()
            for _ in range(10):
                if time.monotonic() > end:
                    break
                topics = (struct.pack(">Q", i + k).ljust(60, b"t") for k in range(2500))
                s.sendall(b"".join(frame(b"\x01" + t) for t in topics))
                i += 2500
        except OSError:
            time.sleep(0.05)
elif mode == "stall":  # every group subscribed, nothing ever read (a tiny receive buffer)
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    s.sendall(GREETING + READY + frame(b"\x01"))
    print("subscribed", flush=True)
    time.sleep(seconds)
elif mode in ("pings", "subs"):  # argv[4] connections, each sending as fast as the server reads
    if mode == "pings":  # PINGs, their PONGs never read
        blob = b"\x04\x07\x04PING\x00\x00" * 20_000
    else:  # every 2-byte topic subscribed, then cancelled, again and again
        subs = b"".join(frame(b"\x01" + struct.pack(">H", g)) for g in range(65536))
        blob = subs + subs.replace(b"\x00\x03\x01", b"\x00\x03\x00")
    conns = []
    for _ in range(int(sys.argv[4])):
        s = zmtp()
        s.setblocking(False)
        conns.append([s, 0])
    print("flooding", flush=True)
    while time.monotonic() < end:
        for c in conns:
            try:
                c[1] = (c[1] + c[0].send(blob[c[1]:])) % len(blob)  # frames stay whole
            except BlockingIOError:
                pass
        time.sleep(0.0005)
    print(len(conns), flush=True)
elif mode == "hold":  # argv[4] connections with the handshake done, subscribed to nothing
    conns = []
    for _ in range(int(sys.argv[4])):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(GREETING + READY)
        conns.append(s)
    time.sleep(0.5)
    open_ = 0
    for s in conns:
        s.setblocking(False)
        try:
            while s.recv(65536):
                pass
        except BlockingIOError:
            open_ += 1
        except OSError:
            pass
    print(open_, flush=True)
    time.sleep(seconds)
elif mode == "first":  # a reader: seconds from its connect to its first message (argv[4]: endpoint)
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.SUBSCRIBE, b"")
    t0 = time.monotonic()
    s.connect(sys.argv[4])
    print("%.3f" % (time.monotonic() - t0) if s.poll(int(seconds * 1000)) else "none", flush=True)
    s.close(linger=0)
    ctx.term()
elif mode == "huge":  # a message header declaring 1 GiB, then the bytes
    chunk = b"x" * (1 << 20)
    for _ in range(3):
        try:
            s = zmtp()
            s.sendall(b"\x02" + struct.pack(">Q", 1 << 30))
            for _ in range(200):
                s.sendall(chunk)
        except OSError:
            pass
"""


def attacker(netns, mode: str, seconds: float, *extra: str, nofile: int = 4096) -> subprocess.Popen:
    """ATTACKER as uid 65534 in the namespace, against the feed's tcp endpoint."""
    cmd = [
        "prlimit",
        f"--nofile={nofile}",
        *NOBODY,
        PYTHON,
        "-c",
        ATTACKER,
        mode,
        str(FEED_PORT),
        str(seconds),
    ]
    return netns.popen(*cmd, *extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_message_s(netns, endpoint: str, seconds: float = 5.0) -> float | None:
    """Seconds a new reader (root, in the namespace) waits from its connect to its first
    message on ``endpoint``; None if none came within ``seconds``."""
    cmd = [sys.executable, "-c", ATTACKER, "first", str(FEED_PORT), str(seconds), endpoint]  # with pyzmq
    out = netns.popen(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True).communicate(
        timeout=seconds + 10
    )[0]
    return None if out.strip() == "none" else float(out)


def feed_config(d: NflogdProcess, **publish) -> None:
    d.write_config(
        d.make_config(extra={"publish": {"bind": [d.endpoint, f"tcp://127.0.0.1:{FEED_PORT}"], **publish}})
    )


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def one_packet_through(d: NflogdProcess, netns, payload: bytes) -> None:
    """A real packet reaches a real subscriber on the ipc endpoint."""
    ctx = zmq.Context()
    sub = d.subscribe(ctx, topics=(wire.topic(1),))
    try:
        netns.send_udp([payload])
        batches = receive(sub, lambda bs: any(p.data.endswith(payload) for b in bs for p in b.packets))
        assert any(p.data.endswith(payload) for b in batches for p in b.packets), d.stderr
    finally:
        sub.close(linger=0)
        ctx.term()


def warnings(d: NflogdProcess, text: str) -> int:
    return sum(1 for line in d.stderr.splitlines() if " WARNING: " in f" {line}" and text in line)


def finished(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.communicate(timeout=10)


# -- 1. file descriptors --------------------------------------------------------------------


@pytest.mark.kernel
def test_idle_connections_cannot_exhaust_file_descriptors(netns, tmp_path, monkeypatch):
    """700 idle tcp connections from uid 65534 against a daemon started with a soft limit of
    256 open files: it raises the limit to the hard one, keeps max_connections per endpoint
    (the rest closed at once, counted, logged once), drops silent peers after
    handshake_timeout_ms, and an ipc reader still gets packets (before: EMFILE past 256, libzmq
    spinning, then an abort at the next ipc connect)."""
    netns.log_rule(1, match="udp dport 9999")
    plain = daemonutil.nflogd_command
    monkeypatch.setattr(daemonutil, "nflogd_command", lambda: ["prlimit", "--nofile=256:1024", *plain()])
    d = NflogdProcess(netns, tmp_path, groups=[1])
    # one address: the per-source limit as high as the endpoint's, which this test is about
    feed_config(d, max_connections=100, max_connections_per_source=100, handshake_timeout_ms=2000)
    endpoint = f"tcp://127.0.0.1:{FEED_PORT}"
    with d:
        limits = Path(f"/proc/{d.pid}/limits").read_text().splitlines()
        assert any(line.startswith("Max open files") and line.split()[3] == "1024" for line in limits)
        att = attacker(netns, "idle", 10, "700")
        try:
            assert int(att.stdout.readline()) == 700
            # the kernel hands the connections over about 100 (the listen backlog) at a time
            refused = "nflogd_feed_refused_connections_total"
            wait_until(lambda: (d.metric(refused, endpoint=endpoint) or 0) >= 200,
                       "connections past the budget to be refused")  # fmt: skip
            assert d.metric("nflogd_subscribers") <= 100
            assert len(os.listdir(f"/proc/{d.pid}/fd")) < 256
            one_packet_through(d, netns, b"through the crowd")
            # those let in never said a word: dropped by the daemon while the attacker holds them
            wait_until(lambda: d.metric("nflogd_subscribers") < 90, "silent peers to be dropped", timeout=6)
            assert d.metric("nflogd_feed_handshake_timeouts_total") >= 10
            assert att.poll() is None
        finally:
            finished(att)
        assert d.alive(), d.stderr
    assert d.returncode == 0, d.stderr
    assert warnings(d, "closing new connections") == 1, d.stderr
    assert warnings(d, "did not finish the handshake") == 1, d.stderr


# -- 2. subscription flood ------------------------------------------------------------------


@pytest.mark.kernel
def test_subscription_flood_stalls_nothing(netns, tmp_path):
    """uid 65534 floods one topic's subscription over loopback tcp for 4 s while packets flow:
    the watchdog pings on time, the kernel drops nothing, every packet is captured; the flood
    is one metric episode and one warning."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path, groups=[1], env={"WATCHDOG_USEC": "1000000"})  # a ping every 0.5 s
    feed_config(d)
    with d:
        traffic = SteadyTraffic(netns, [9999], interval=0.0005)
        traffic.start()
        att = attacker(netns, "flood", 4)
        pings = []
        sock = d.notify.sock
        deadline = time.monotonic() + 4.5
        try:
            while time.monotonic() < deadline:
                sock.settimeout(0.1)
                try:
                    if b"WATCHDOG=1" in sock.recv(65536):
                        pings.append(time.monotonic())
                except (socket.timeout, TimeoutError):
                    pass
        finally:
            sent = traffic.stop()[9999]
            finished(att)
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert len(pings) >= 6 and max(gaps) < 1.5, (gaps, d.stderr[-2000:])
        wait_until(lambda: d.metric("nflogd_packets_total", group="1") == sent, "every packet captured")
        assert d.metric("nflogd_kernel_dropped_packets_total", group="1") == 0
        assert d.metric("nflogd_feed_subscription_floods_total") >= 1
        one_packet_through(d, netns, b"after the flood")
    assert warnings(d, "subscription flood") == 1, d.stderr[-2000:]


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["pings", "subs"])
def test_a_flooding_user_delays_no_new_reader(netns, tmp_path, mode):
    """uid 65534 floods over loopback tcp from 50 connections (pings: PINGs whose PONGs it
    never reads; subs: every 2-byte topic subscribed and cancelled, again and again): each peer
    reads from its own share of a turn, so a new reader, on tcp and on ipc, gets its first
    message within a second while the flood goes on (before: when the flood ended, 11-16 s);
    the capture loses nothing."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path, groups=[1])
    feed_config(d)
    with d:
        traffic = SteadyTraffic(netns, [9999], interval=0.002)
        traffic.start()
        att = attacker(netns, mode, 8, "50")
        try:
            assert att.stdout.readline() == "flooding\n", att.stderr.read() if att.poll() is not None else ""
            time.sleep(1.0)
            for endpoint in (f"tcp://127.0.0.1:{FEED_PORT}", d.endpoint):
                waited = first_message_s(netns, endpoint)
                assert waited is not None and waited < 1.0, (endpoint, waited, d.stderr[-2000:])
            assert att.poll() is None, "the flood ended before the readers were served"
        finally:
            sent = traffic.stop()[9999]
            finished(att)
        wait_until(lambda: d.metric("nflogd_packets_total", group="1") == sent, "every packet captured")
        assert d.metric("nflogd_kernel_dropped_packets_total", group="1") == 0
        if mode == "subs":
            assert d.metric("nflogd_feed_subscription_messages_total") > 10_000  # the flood was read
    assert d.returncode == 0, d.stderr


@pytest.mark.kernel
def test_one_address_holds_at_most_its_share_of_connections(netns, tmp_path):
    """uid 65534 opens 100 handshaken connections over loopback tcp and holds them: 64
    (publish.max_connections_per_source) stay, the rest are closed at once, counted and
    logged once; the endpoint keeps room (max_connections 256), and a reader on ipc is served."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path, groups=[1])
    feed_config(d, idle_timeout_ms=0)
    endpoint = f"tcp://127.0.0.1:{FEED_PORT}"
    with d:
        att = attacker(netns, "hold", 4, "100")
        try:
            assert int(att.stdout.readline()) == 64
            metric = "nflogd_feed_source_refused_connections_total"
            wait_until(lambda: d.metric(metric, endpoint=endpoint) == 36, "36 connections refused")
            assert d.metric("nflogd_feed_refused_connections_total", endpoint=endpoint) == 0
            assert d.metric(metric, endpoint=d.endpoint) == 0
            one_packet_through(d, netns, b"beside the crowd")
        finally:
            finished(att)
    assert d.returncode == 0, d.stderr
    assert warnings(d, "publish.max_connections_per_source") == 1, d.stderr


# -- 3. memory ------------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["topics", "huge"])
def test_peer_cannot_grow_memory(netns, tmp_path, mode):
    """topics: distinct 60-byte subscriptions as fast as they go (before, with 400-byte ones:
    32 -> 500 MB; those are now refused by the message size limit);
    huge: a header declaring a 1 GiB message, then 200 MB (before: allocated). RSS stays under
    a ceiling, the peer is dropped and counted, the daemon serves on."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path, groups=[1], log_level="info")
    feed_config(d)
    with d:
        before = rss_mb(d.pid)
        att = attacker(netns, mode, 5)
        peak = before
        while att.poll() is None:
            peak = max(peak, rss_mb(d.pid))
            time.sleep(0.05)
        finished(att)
        assert peak < before + 60, (before, peak)
        if mode == "topics":
            assert d.metric("nflogd_feed_dropped_peers_total") >= 1
            assert warnings(d, "longer than any group's") == 1, d.stderr
    assert d.returncode == 0, d.stderr


@pytest.mark.kernel
def test_a_foreign_topic_under_traffic_is_hung_up_on(netns, tmp_path):
    """While the capture thread sends (each send takes the feed socket's ZMQ_FD wake-ups) and
    the control loop waits for events only, a subscription still reaches it at once: a peer
    connected for a second, that then subscribes to a topic no message can match, is hung
    up on within the second, and the feed goes on."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path, groups=[1])
    feed_config(d)
    with d:
        traffic = SteadyTraffic(netns, [9999], interval=0.001)
        traffic.start()
        try:
            out, err = attacker(netns, "late", 3).communicate(timeout=10)
        finally:
            sent = traffic.stop()[9999]
        assert out.startswith("closed after "), (out, err, d.stderr[-2000:])
        assert float(out.split()[2]) < 1.0, out
        assert d.metric("nflogd_feed_dropped_peers_total") == 1
        wait_until(lambda: d.metric("nflogd_packets_total", group="1") == sent, "every packet captured")
        one_packet_through(d, netns, b"after the topic")
    assert d.returncode == 0, d.stderr


@pytest.mark.kernel
def test_a_subscriber_that_never_reads_costs_at_most_its_hwm(netns, tmp_path):
    """uid 65534 subscribes to every group over loopback tcp and reads nothing while 1000-byte
    packets flow: the daemon queues publish.hwm messages for it and drops the rest, counted,
    warned of once; RSS stays flat, and a reader on the ipc endpoint gets every packet."""
    netns.log_rule(1, match="udp dport 9999")
    d = NflogdProcess(netns, tmp_path, groups=[1])
    feed_config(d, hwm=50)
    with d:
        before = rss_mb(d.pid)
        ctx = zmq.Context()
        sub = Subscriber(d.endpoint, groups=[1], context=ctx)
        att = attacker(netns, "stall", 8)
        try:
            assert att.stdout.readline() == "subscribed\n"
            sub.recv(timeout=0.1)  # connects
            wait_until(lambda: d.metric("nflogd_feed_subscription_messages_total") == 2, "both subscribed")
            traffic = SteadyTraffic(netns, [9999], interval=0.0005, size=1000)
            traffic.start()
            wait_until(lambda: (d.metric("nflogd_feed_slow_dropped_messages_total") or 0) > 100,
                       "messages for the stuck peer to be dropped", timeout=8)  # fmt: skip
            sent = traffic.stop()[9999]
            assert d.metric("nflogd_feed_queued_messages") == 50
            assert rss_mb(d.pid) < before + 40
            got = 0
            while got < sent:
                batch = sub.recv_batch(timeout=5)
                assert batch is not None, (got, sent)
                got += len(batch.packets)
            assert got == sent and sub.total_lost == 0
        finally:
            sub.close()
            ctx.term()
            finished(att)
        wait_until(lambda: d.metric("nflogd_feed_queued_messages") == 0, "the stuck peer's queue freed")
    assert d.returncode == 0, d.stderr
    assert warnings(d, "is too slow") == 1, d.stderr


@pytest.mark.kernel
def test_relay_bounds_what_its_readers_send(netns, tmp_path):
    """Through the relay: long topics from uid 65534 are dropped at the relay (its reader hung
    up on, counted) and never reach the daemon behind it."""
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path / "d", groups=[1], log_level="info") as d:
        r = daemonutil.RelayProcess(netns, tmp_path / "r", upstreams=[d.endpoint], log_level="info")
        r.write_config(
            r.make_config(extra={"publish": {"bind": [r.endpoint, f"tcp://127.0.0.1:{FEED_PORT}"]}})
        )
        with r:
            before_d, before_r = rss_mb(d.pid), rss_mb(r.pid)
            att = attacker(netns, "topics", 4)
            peak_r = before_r
            while att.poll() is None:
                peak_r = max(peak_r, rss_mb(r.pid))
                time.sleep(0.05)
            finished(att)
            assert peak_r < before_r + 60, (before_r, peak_r)
            assert rss_mb(d.pid) < before_d + 20
            assert r.metric("nflogd_relay_feed_dropped_peers_total") >= 1
            assert r.metric("nflogd_relay_subscribed_topics") == 0
        assert r.returncode == 0, r.stderr


# -- 4. files -------------------------------------------------------------------------------


def check(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*nflogd_command(), "--check", "-c", str(path)], capture_output=True, text=True, timeout=10
    )


def test_config_that_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), ("/dev/zero", "a character device"), (tmp_path, "a directory")):
        r = check(path)
        assert r.returncode == 2, r
        assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.startswith(f"nflogd: {path}: cannot read") and kind in r.stderr, r.stderr
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    r = check(big)
    assert r.returncode == 2 and "larger than" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.kernel
def test_fifo_as_netns_is_refused_at_start_and_reload(netns, tmp_path):
    netns.log_rule(1, match="udp dport 9999")
    fifo = tmp_path / "ns.fifo"
    os.mkfifo(fifo)
    d = NflogdProcess(netns, tmp_path, groups=[{"group": 2, "netns": str(fifo)}])
    assert d.run_to_exit() == 1
    assert d.stderr.strip().splitlines()[-1] == f"nflogd: group 2: netns '{fifo}': not a network namespace", (
        d.stderr
    )
    with NflogdProcess(netns, tmp_path / "again", groups=[1]) as d:
        d.write_config(d.make_config(groups=[1, {"group": 2, "netns": str(fifo)}]))
        status = d.reload()
        assert (
            "last reload failed" in status.get("STATUS", "") and "not a network namespace" in status["STATUS"]
        )
        one_packet_through(d, netns, b"after the fifo")
    assert d.returncode == 0, d.stderr


def test_fifo_in_the_authorized_keys_dir(tmp_path):
    keys = tmp_path / "keys"
    clients = keys / "clients"
    clients.mkdir(parents=True)
    subprocess.run(
        [str(Path(sys.executable).parent / "nflogd-keygen"), str(keys), "server"],
        check=True,
        capture_output=True,
    )
    os.mkfifo(clients / "evil.key")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "groups: [1]\npublish:\n  bind: ['tcp://127.0.0.1:5557']\n  curve:\n"
        f"    secret_key_file: {keys}/server.key_secret\n    authorized_keys_dir: {clients}\n"
    )
    r = check(cfg)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert f"{clients}/evil.key: not a regular file" in r.stderr, r.stderr


# -- 5. nflog-tap on wire-valid extremes ----------------------------------------------------


def run_tap_on(feed, tmp_path, linktype: str, packets) -> Path:
    out = tmp_path / f"x-{linktype}.pcap"
    from test_tap import tap_command

    feed.publish_when_subscribed({b""}, wire.encode(3, "r1", 1, 0, packets))
    r = subprocess.run(
        [*tap_command(), "-e", feed.endpoint, "-c", str(len(packets)), "--linktype", linktype,
         "-w", str(out)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    return out


def tcpdump_reads(path: Path) -> list[str]:
    r = subprocess.run(["tcpdump", "-n", "-r", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


@pytest.mark.needs("tcpdump")
@pytest.mark.parametrize("linktype", ["ip", "nflog"])
def test_tap_writes_extremes_tcpdump_reads(feed, tmp_path, linktype):
    ip = bytes.fromhex("4500") + struct.pack(">H", 20) + bytes(16)
    packets = [
        rec(3, ip, ts_ns=2**64 - 1),
        rec(3, ip + b"a" * 70_000, prefix="p" * 300),
        rec(3, ip + b"b" * 300_000),
    ]
    assert len(tcpdump_reads(run_tap_on(feed, tmp_path, linktype, packets))) == 3


# -- 6. ipc directory -----------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("owner, mode", [(65534, 0o1777), (0, 0o777), (0, 0o770)])
def test_ipc_directory_others_can_write_is_refused(netns, tmp_path, owner, mode):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chown(shared, owner, owner)
    os.chmod(shared, mode)
    d = NflogdProcess(netns, tmp_path, groups=[1])
    d.write_config(d.make_config(extra={"publish": {"bind": [f"ipc://{shared}/feed.sock"]}}))
    assert d.run_to_exit() == 1
    last = d.stderr.strip().splitlines()[-1]
    assert last.startswith(f"nflogd: publish.bind: ipc://{shared}/feed.sock: {shared} is "), d.stderr
    assert "could replace the socket" in last and not (shared / "feed.sock").exists()


# -- 7. metrics server under a task limit ---------------------------------------------------


@pytest.mark.kernel
def test_metrics_under_a_task_limit(netns, tmp_path):
    """A pids cgroup of 40 and 60 idle connections to /metrics: the scrape works, SIGTERM exits
    0 and removes the ipc socket (before: a thread per connection, tracebacks, exit 1)."""
    netns.log_rule(1, match="udp dport 9999")
    cg = Path("/sys/fs/cgroup/pids") / f"nflt-{uuid.uuid4().hex[:10]}"
    if not Path("/sys/fs/cgroup/pids").is_dir():
        cg = Path("/sys/fs/cgroup") / f"nflt-{uuid.uuid4().hex[:10]}"
    cg.mkdir()
    try:
        (cg / "pids.max").write_text("40")
        with NflogdProcess(netns, tmp_path, groups=[1]) as d:
            (cg / "cgroup.procs").write_text(str(d.pid))
            idle = []
            try:
                for _ in range(60):
                    s = netns.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.connect(("127.0.0.1", daemonutil.METRICS_PORT))
                    idle.append(s)
                assert any(name == "nflogd_build_info" for name, _ in d.scrape())  # the scrape works
                assert d.metric("nflogd_metrics_dropped_connections_total") >= 28
            finally:
                for s in idle:
                    s.close()
            sock_file = Path(d.endpoint[len("ipc://") :])
            assert sock_file.exists()
        assert d.returncode == 0, d.stderr
        assert "Traceback" not in d.stderr and "can't start new thread" not in d.stderr, d.stderr
        assert not sock_file.exists()
    finally:
        cg.rmdir()


# -- 8. subscriber state --------------------------------------------------------------------


def test_subscriber_bounds_nodes_and_names_a_shared_node(feed):
    """10,000 node names keep at most max_nodes of state; two publishers named r1 (epochs
    alternating) are reported as such, not as restarts and loss."""
    with Subscriber(feed.endpoint, max_nodes=100) as sub:
        feed.wait_subscribed({b""})
        msgs = [wire.encode(1, f"n{i}", 7, 0, [rec(1, b"x")]) for i in range(10_000)]
        for i in range(200):
            epoch, seq = (100, i // 2) if i % 2 == 0 else (200, 1000 + i // 2)
            msgs.append(wire.encode(1, "r1", epoch, seq, [rec(1, b"y")]))
        # in steps below ZeroMQ's default high-water marks, so that no message is dropped on the way
        for start in range(0, len(msgs), 500):
            for m in msgs[start : start + 500]:
                feed.publish(m)
            while sub.received < min(start + 500, len(msgs)):
                assert sub.recv_batch(timeout=10) is not None
        assert len(sub.lost) <= 100 and len(sub._streams) <= 100 and len(sub._epochs) <= 100
        assert sub.evicted >= 9_900
        assert sub.duplicate_nodes == {"r1"}
        assert sub.restarts == 0 and sub.total_lost == 0, (sub.restarts, sub.lost)


# -- 9. tight limits ------------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("limit", ["--nofile=10", "--nofile=12", "--as=62914560", "--as=209715200"])
def test_tight_limits_one_line_or_clean_stop(netns, tmp_path, monkeypatch, limit):
    """Either a one-line error at start, or a run that SIGTERM ends with status 0; never a
    libzmq abort or a traceback."""
    plain = daemonutil.nflogd_command
    monkeypatch.setattr(daemonutil, "nflogd_command", lambda: ["prlimit", limit, *plain()])
    d = NflogdProcess(netns, tmp_path, groups=[1], log_level="info")
    d.start(wait_ready=False)
    try:
        wait_until(
            lambda: not d.alive() or any(m.get("READY") == "1" for m in d.notify.drain(0.05)),
            "an end or READY=1",
        )
        if d.alive():
            d.send_signal(signal.SIGTERM)
            assert d.wait(5) == 0, d.stderr
        else:
            assert d.returncode == 1, d.stderr
            lines = d.stderr.strip().splitlines()
            assert lines[-1].startswith("nflogd: ") and ("RLIMIT" in lines[-1]), d.stderr
    finally:
        d.stop()
    assert "Traceback" not in d.stderr and "Assertion" not in d.stderr and d.returncode in (0, 1), d.stderr
    if "nofile" in limit:
        assert d.returncode == 1 and "RLIMIT_NOFILE" in d.stderr, d.stderr
