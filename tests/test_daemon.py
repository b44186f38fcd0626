"""The real daemon in a network namespace: feed, metrics, loss accounting, signals, reload, sd_notify."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemonutil import (
    REPO,
    DaemonError,
    NflogdProcess,
    nflogd_command,
    packet_count,
    receive,
    unit_settings,
    wait_until,
)
from feedutil import collect
from nflogd_client import Subscriber, wire
from nsutil import SteadyTraffic
from scapy.layers.inet import IP, UDP

from nflogd.sdnotify import Notifier

pytestmark = pytest.mark.timeout(60)


def by_group(batches) -> dict[int, list]:
    out: dict[int, list] = {}
    for b in batches:
        out.setdefault(b.group, []).append(b)
    return out


def assert_contiguous(batches, start: int = 0) -> int:
    """Each batch starts where the previous ended; returns the next seq."""
    seq = start
    for b in batches:
        assert b.first_seq == seq, f"feed gap: expected seq {seq}, got {b!r}"
        seq = b.next_seq
    return seq


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def bound_groups(netns) -> set[int]:
    """Groups bound in the namespace, from the kernel's own list."""
    out = netns.run("cat", "/proc/net/netfilter/nfnetlink_log").stdout
    return {int(line.split()[0]) for line in out.splitlines() if line.strip()}


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("nflogd: ")]


# -- the feed and the metrics ---------------------------------------------------


def check_ipv4(data: bytes, payload: bytes, dport: int) -> None:
    assert data[0] == 0x45
    assert struct.unpack_from(">H", data, 2)[0] == len(data)
    assert data[9] == 17
    assert data[12:16] == data[16:20] == socket.inet_aton("127.0.0.1")
    assert struct.unpack_from(">HH", data, 22) == (dport, 8 + len(payload))
    assert data[28:] == payload


def check_ipv6(data: bytes, payload: bytes, dport: int) -> None:
    assert data[0] >> 4 == 6
    assert struct.unpack_from(">H", data, 4)[0] == 8 + len(payload) == len(data) - 40
    assert data[6] == 17
    assert data[8:24] == data[24:40] == socket.inet_pton(socket.AF_INET6, "::1")
    assert struct.unpack_from(">HH", data, 42) == (dport, 8 + len(payload))
    assert data[48:] == payload


@pytest.mark.kernel
def test_feed_ipv4_ipv6_and_metrics(netns, tmp_path, ctx):
    ports = {1: 9991, 2: 9992}
    for g, port in ports.items():
        netns.log_rule(g, match=f"udp dport {port}")
    with NflogdProcess(netns, tmp_path, groups=[1, 2], node="r1") as d:
        assert d.ready_msg["READY"] == "1" and "groups 1, 2" in d.ready_msg["STATUS"]
        sub = d.subscribe(ctx)
        sent: dict[int, list[tuple[int, bytes]]] = {1: [], 2: []}
        for g, port in ports.items():
            for i in range(12):
                p4 = f"g{g} v4 #{i} ".encode() + bytes(range(256))[: 17 * i]
                p6 = f"g{g} v6 #{i} ".encode() + bytes(range(255, -1, -1))[: 13 * i]
                netns.send_udp([p4], "127.0.0.1", port)
                netns.send_udp([p6], "::1", port)
                sent[g] += [(4, p4), (6, p6)]
        total = sum(len(v) for v in sent.values())
        batches = receive(sub, lambda bs: packet_count(bs) >= total)
        assert packet_count(batches) == total
        epochs = {b.epoch for b in batches}
        assert len(epochs) == 1 and epochs.pop() > 0
        groups = by_group(batches)
        for g, port in ports.items():
            assert assert_contiguous(groups[g]) == len(sent[g])
            pkts = [p for b in groups[g] for p in b.packets]
            assert [p.seq for p in pkts] == list(range(len(sent[g])))
            for pkt, (family, payload) in zip(pkts, sent[g]):
                assert (pkt.node, pkt.group) == ("r1", g)
                assert pkt.len == pkt.caplen == len(pkt.data) and not pkt.truncated
                (check_ipv4 if family == 4 else check_ipv6)(pkt.data, payload, port)
                assert pkt.hw_protocol == (0x0800 if family == 4 else 0x86DD)
                assert abs(pkt.ts - time.time()) < 60
            assert all(b.kernel_dropped == 0 for b in groups[g])

            m = d.scrape()
            label = (("group", str(g)),)
            assert m[("nflogd_packets_total", label)] == len(sent[g])
            assert m[("nflogd_bytes_total", label)] == sum(p.len for p in pkts)
            assert m[("nflogd_kernel_dropped_packets_total", label)] == 0
            assert m[("nflogd_truncated_packets_total", label)] == 0
            assert m[("nflogd_overflows_total", label)] == 0
        assert m[("nflogd_subscribers", ())] == 1
        assert [k for k in m if k[0] == "nflogd_build_info"]
        sub.close(linger=0)
    assert d.returncode == 0


def thread_wakeups(pid: int) -> dict[str, int]:
    """Context switches so far of every thread of a process, by "tid name"."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            name = f.read().strip()
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            out[f"{tid} {name}"] = sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
    return out


@pytest.mark.kernel
def test_an_idle_daemon_makes_no_wakeups(netns, tmp_path, ctx):
    """Between packets no thread of the daemon runs: the capture thread waits in C for the
    kernel with no timeout, and the control loop waits for events (the first send after
    that wakes it to watch the feed), once the group's sequence mark, a second after its
    last packet, is out. It serves on after the quiet spell."""
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path, groups=[1]) as d:
        sub = d.subscribe(ctx)
        netns.send_udp([b"before"], "127.0.0.1", 9999)
        assert packet_count(receive(sub, lambda bs: packet_count(bs) >= 1)) == 1
        time.sleep(2.0)  # the sequence mark (at 1 s), the control loop's last look after it
        before = thread_wakeups(d.pid)
        time.sleep(3)
        after = thread_wakeups(d.pid)
        assert after == before, {t: after[t] - before.get(t, 0) for t in after if after[t] != before.get(t)}
        netns.send_udp([b"after"], "127.0.0.1", 9999)
        batches = receive(sub, lambda bs: packet_count(bs) >= 1)
        assert [p.data[-5:] for b in batches for p in b.packets] == [b"after"]
        sub.close(linger=0)
    assert d.returncode == 0


@pytest.mark.kernel
def test_flood_while_stopped_loss_is_exact(netns, tmp_path, ctx):
    """SIGSTOP under a flood overruns a small rcvbuf; every packet is published or counted lost."""
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path, groups=[{"group": 1, "rcvbuf": 32768}]) as d:
        sub = d.subscribe(ctx)
        d.send_signal(signal.SIGSTOP)
        wait_until(lambda: proc_state(d.pid) == "T", what="the daemon to stop", timeout=5.0)
        sent = netns.send_udp([b"flood %06d " % i + b"x" * 200 for i in range(5000)])
        d.send_signal(signal.SIGCONT)
        batches: list = []

        def settle(quiet: float = 0.3) -> None:
            while True:
                more = receive(sub, lambda bs: False, timeout=quiet)
                if not more:
                    return
                batches.extend(more)

        settle()  # the daemon has read what the socket held, and met the overrun

        def accounted(bs) -> bool:
            every = batches + bs
            return bool(every) and packet_count(every) + every[-1].kernel_dropped >= sent

        for _ in range(20):  # a few more packets show the kernel's sequence gap
            sent += netns.send_udp([b"after %d" % i for i in range(3)])
            batches += receive(sub, accounted, timeout=1.0)
            if accounted([]):
                break
        published = packet_count(batches)
        dropped = batches[-1].kernel_dropped
        assert dropped > 0, "the flood did not overrun the buffer; the test proves nothing"
        assert published + dropped == sent
        assert assert_contiguous(batches) == published
        assert [b.kernel_dropped for b in batches] == sorted(b.kernel_dropped for b in batches)

        m = d.scrape()
        label = (("group", "1"),)
        assert m[("nflogd_packets_total", label)] == published
        assert m[("nflogd_kernel_dropped_packets_total", label)] == dropped
        assert m[("nflogd_packets_total", label)] + m[("nflogd_kernel_dropped_packets_total", label)] == sent
        assert m[("nflogd_overflows_total", label)] >= 1
        sub.close(linger=0)
    assert d.returncode == 0
    assert "receive buffer overrun" in d.stderr


# -- command line ---------------------------------------------------------------


def run_cli(*args: str, module: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "nflogd"] if module else nflogd_command()
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30, cwd=REPO)


@pytest.mark.parametrize("module", [False, True], ids=["script", "python-m"])
def test_check_documented_config(module):
    res = run_cli("--check", "-c", str(REPO / "etc" / "nflogd.yaml"), module=module)
    assert (res.returncode, res.stderr) == (0, "")


@pytest.mark.parametrize(
    "text, expect",
    [
        ("groups: [{group: 2, copy_range: 70000}]\n", "groups[0].copy_range"),
        ("groups: [1]\nbogus: 1\n", "bogus"),
        ("groups: [1\n", "invalid YAML"),
        ("groups: [1]\npublish: {bind: ['ftp://x']}\n", "publish.bind[0]"),
        (None, "cannot read"),
    ],
    ids=["range", "unknown-key", "yaml", "endpoint", "missing-file"],
)
def test_check_bad_config(tmp_path, text, expect):
    path = tmp_path / "nflogd.yaml"
    if text is not None:
        path.write_text(text)
    res = run_cli("--check", "-c", str(path))
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nflogd: ") and expect in lines[0], res.stderr
    assert res.stdout == ""


@pytest.mark.kernel
def test_bad_config_at_start_exits_2(netns, tmp_path):
    d = NflogdProcess(netns, tmp_path)
    d.write_config("groups: []\n")
    assert d.run_to_exit() == 2
    assert error_lines(d.stderr) == [line for line in d.stderr.splitlines() if line.strip()]
    assert "groups: must not be empty" in d.stderr


@pytest.mark.kernel
def test_group_held_by_another_process(netns, tmp_path):
    with NflogdProcess(netns, tmp_path / "a", groups=[7], metrics=False):
        b = NflogdProcess(netns, tmp_path / "b", groups=[8, 7], metrics=False, log_level="warning")
        assert b.run_to_exit() == 1
        lines = b.stderr.splitlines()
        assert len(lines) == 1 and "Traceback" not in b.stderr, b.stderr
        assert lines[0].startswith("nflogd: group 7 is already bound"), lines[0]
        assert bound_groups(netns) == {7}  # b let go of group 8 again


@pytest.mark.kernel
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_within_a_second(netns, tmp_path, signum):
    netns.log_rule(3, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path, groups=[3, 4]) as d:
        assert bound_groups(netns) == {3, 4}
        sock_path = d.endpoint[len("ipc://") :]
        assert os.path.exists(sock_path)
        t0 = time.monotonic()
        d.send_signal(signum)
        rc = d.wait(5)
        elapsed = time.monotonic() - t0
        assert d.notify.wait("STOPPING", timeout=1)
    assert rc == 0 and elapsed < 1.0, (rc, elapsed, d.stderr)
    assert "Traceback" not in d.stderr
    assert bound_groups(netns) == set()
    assert not os.path.exists(sock_path)


@pytest.mark.kernel
def test_ipc_file_modes(netns, tmp_path):
    with NflogdProcess(netns, tmp_path, metrics=False) as d:
        path = Path(d.endpoint[len("ipc://") :])
        assert oct(path.stat().st_mode & 0o777) == oct(0o660)
        assert oct(path.parent.stat().st_mode & 0o777) == oct(0o750)


@pytest.mark.kernel
def test_second_daemon_on_same_ipc_path_refused(netns, tmp_path):
    with NflogdProcess(netns, tmp_path / "a", groups=[1], metrics=False) as a:
        b = NflogdProcess(
            netns, tmp_path / "b", groups=[2], metrics=False, log_level="warning",
            extra={"publish": {"bind": [a.endpoint]}},
        )  # fmt: skip
        assert b.run_to_exit() == 1
        assert b.stderr.splitlines() == [
            f"nflogd: publish.bind: {a.endpoint}: another process is serving this path"
        ]
        assert a.alive() and os.path.exists(a.endpoint[len("ipc://") :])
        a.send_signal(signal.SIGKILL)  # leaves its socket file behind
        a.wait(5)
    # a stale file is taken over
    with NflogdProcess(
        netns, tmp_path / "c", groups=[1], metrics=False, extra={"publish": {"bind": [a.endpoint]}}
    ) as c:
        assert c.alive()


@pytest.mark.kernel
def test_metrics_port_in_use(netns, tmp_path):
    holder = netns.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        holder.bind(("127.0.0.1", 9477))
        holder.listen()
        d = NflogdProcess(netns, tmp_path, log_level="warning")
        assert d.run_to_exit() == 1
        assert d.stderr.splitlines() == ["nflogd: metrics: 127.0.0.1:9477: Address already in use"]
    finally:
        holder.close()


# -- reload ---------------------------------------------------------------------


@pytest.mark.kernel
def test_sighup_adds_removes_and_reconfigures_groups_under_traffic(netns, tmp_path, ctx):
    for g in (1, 2, 3, 4):
        netns.log_rule(g, match=f"udp dport {9990 + g}")
    with NflogdProcess(netns, tmp_path, groups=[1, 2, 4]) as d:
        sub = d.subscribe(ctx)
        sender = SteadyTraffic(netns, [9991, 9992, 9994], interval=0.0005)
        sender.start()
        try:
            batches = receive(sub, lambda bs: packet_count(bs) >= 150)
            cfg = d.make_config(groups=[1, 3, {"group": 4, "copy_range": 40}])
            d.write_config(cfg)
            ready = d.reload()
            assert "failed" not in ready["STATUS"] and "groups 1, 3, 4" in ready["STATUS"]
            batches += receive(sub, lambda bs: packet_count(bs) >= 150)
        finally:
            sender.stop()
        sent = sender.sent
        assert bound_groups(netns) == {1, 3, 4}
        after = netns.send_udp([b"new group %d" % i for i in range(5)], port=9993)
        netns.send_udp([b"to removed group"], port=9992)

        def complete(bs):
            g = by_group(batches + bs)
            return (
                packet_count(g.get(1, [])) >= sent[9991]
                and packet_count(g.get(4, [])) >= sent[9994]
                and packet_count(g.get(3, [])) >= after
            )

        batches += receive(sub, complete)
        groups = by_group(batches)
        # untouched group 1 and reconfigured group 4: nothing lost, seq contiguous
        for g, port in ((1, 9991), (4, 9994)):
            assert assert_contiguous(groups[g]) == packet_count(groups[g]) == sent[port]
            assert groups[g][-1].kernel_dropped == 0
        pkts4 = [p for b in groups[4] for p in b.packets]
        assert not pkts4[0].truncated and pkts4[-1].truncated and pkts4[-1].caplen == 40
        # added group 3 gets what was sent after the reload; removed group 2 gets nothing more
        assert [p.data[28:] for b in groups[3] for p in b.packets] == [b"new group %d" % i for i in range(5)]
        assert packet_count(groups[2]) < sent[9992]
        assert receive(sub, lambda bs: False, timeout=0.3) == []

        m = d.scrape()
        assert m[("nflogd_packets_total", (("group", "1"),))] == sent[9991]
        assert m[("nflogd_packets_total", (("group", "2"),))] == packet_count(groups[2])  # kept
        assert m[("nflogd_packets_total", (("group", "3"),))] == after
        assert m[("nflogd_truncated_packets_total", (("group", "4"),))] >= 1
        sub.close(linger=0)
    assert d.returncode == 0


@pytest.mark.kernel
def test_sighup_with_invalid_config_keeps_running(netns, tmp_path, ctx):
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path, groups=[1]) as d:
        sub = d.subscribe(ctx)
        d.write_config("groups: [1\n")
        ready = d.reload()
        assert "last reload failed" in ready["STATUS"]
        errors = [line for line in d.stderr.splitlines() if " ERROR: reload:" in line]
        assert len(errors) == 1 and errors[0].endswith("keeping the running configuration")
        netns.send_udp([b"still here"])
        batches = receive(sub, lambda bs: packet_count(bs) >= 1)
        assert batches[0].packets[0].data[28:] == b"still here"
        assert bound_groups(netns) == {1}
        sub.close(linger=0)
    assert d.returncode == 0


@pytest.mark.kernel
def test_a_busy_group_names_the_process_holding_it(netns, tmp_path):
    with NflogdProcess(netns, tmp_path / "a", groups=[5], metrics=False) as holder:
        d = NflogdProcess(netns, tmp_path / "b", groups=[5], metrics=False)
        assert d.run_to_exit() == 1
    (line,) = [x for x in d.stderr.splitlines() if x.startswith("nflogd: ")]
    assert re.fullmatch(
        rf"nflogd: group 5 is already bound by netlink port \d+ \(pid {holder.pid}, nflogd\)", line
    )


@pytest.mark.kernel
def test_sighup_group_busy_applies_nothing(netns, tmp_path):
    with NflogdProcess(netns, tmp_path / "a", groups=[5], metrics=False):
        with NflogdProcess(netns, tmp_path / "b", groups=[1]) as d:
            d.write_config(d.make_config(groups=[2, 5], metrics=False))
            ready = d.reload()
            assert "last reload failed: group 5 is already bound" in ready["STATUS"]
            assert bound_groups(netns) == {1, 5}
            assert d.metric("nflogd_packets_total", group="1") == 0  # metrics stayed on


@pytest.mark.kernel
def test_sighup_changes_endpoints_node_and_metrics(netns, tmp_path, ctx):
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path, groups=[1]) as d:
        second = f"ipc://{tmp_path}/run2/feed.sock"
        cfg = d.make_config(groups=[1], node="renamed")
        cfg["publish"] = {"bind": [second]}
        cfg["metrics"] = {"listen": "127.0.0.1:9478"}
        d.write_config(cfg)
        d.reload()
        assert not os.path.exists(d.endpoint[len("ipc://") :])
        d.endpoint = second
        sub = d.subscribe(ctx)
        netns.send_udp([b"x"])
        (batch,) = receive(sub, lambda bs: packet_count(bs) >= 1)
        assert batch.node == "renamed"
        with netns.entered():
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", 9477), timeout=2).close()
            import http.client

            conn = http.client.HTTPConnection("127.0.0.1", 9478, timeout=5)
            conn.request("GET", "/metrics")
            body = conn.getresponse().read().decode()
            conn.close()
        assert 'nflogd_packets_total{group="1"} 1.0' in body
        sub.close(linger=0)


# -- privileges -----------------------------------------------------------------


@pytest.mark.kernel
def test_drops_to_user_keeping_net_admin(netns, ctx):
    """user: nobody -> every thread uid 65534 with CAP_NET_ADMIN only; a reload can still bind a
    new group. (tests/test_security.py: the same with the CURVE authenticator, and without user.)"""
    netns.log_rule(2, match="udp dport 9999")
    workdir = Path(tempfile.mkdtemp(prefix="nflogd-priv-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)  # nobody must reach its config and the notify socket
        with NflogdProcess(netns, workdir, groups=[1], extra={"user": "nobody"}) as d:
            tasks = list(Path(f"/proc/{d.pid}/task").iterdir())
            assert len(tasks) >= 3  # main, ZeroMQ's I/O thread and reaper, the metrics server
            for task in tasks:
                fields = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines())
                assert fields["Uid"].split() == ["65534"] * 4
                assert int(fields["CapEff"], 16) == int(fields["CapPrm"], 16) == 1 << 12
            run = workdir / "run"
            assert (run.stat().st_uid, oct(run.stat().st_mode & 0o777)) == (65534, oct(0o750))
            d.write_config(d.make_config(groups=[1, 2]) | {"user": "nobody"})
            os.chmod(d.config_path, 0o644)
            assert "failed" not in d.reload()["STATUS"]
            assert bound_groups(netns) == {1, 2}
            sub = d.subscribe(ctx)
            netns.send_udp([b"as nobody"])
            (batch,) = receive(sub, lambda bs: packet_count(bs) >= 1)
            assert (batch.group, batch.packets[0].data[28:]) == (2, b"as nobody")
            assert d.metric("nflogd_packets_total", group="2") == 1
            sub.close(linger=0)
        assert d.returncode == 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -- sd_notify ------------------------------------------------------------------


@pytest.mark.kernel
@pytest.mark.parametrize("own_pid", [True, False], ids=["ours", "other-pid"])
def test_watchdog(netns, tmp_path, own_pid):
    env = {"WATCHDOG_USEC": "200000"}  # every 0.1 s
    if not own_pid:
        env["WATCHDOG_PID"] = "1"
    with NflogdProcess(netns, tmp_path, metrics=False, env=env) as d:
        time.sleep(0.6)
        n = sum(1 for m in d.notify.drain(0.05) if m.get("WATCHDOG") == "1")
    assert (n >= 3) if own_pid else (n == 0), n


def test_notifier_without_socket_is_a_noop():
    n = Notifier.from_environ({})
    assert not n.enabled and n.watchdog_interval is None and n.ready() is False


def test_notifier_abstract_socket_and_watchdog_pid():
    name = f"nflogd-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as srv:
        srv.bind("\0" + name)
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000"}, pid=42)
        assert n.watchdog_interval == 15.0
        assert n.ready("up") and n.watchdog() and n.stopping()
        srv.settimeout(1)
        assert [srv.recv(100) for _ in range(3)] == [b"READY=1\nSTATUS=up", b"WATCHDOG=1", b"STOPPING=1"]
        n.close()
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "41"}
    assert Notifier.from_environ(env, pid=42).watchdog_interval is None
    assert Notifier.from_environ({**env, "WATCHDOG_PID": "42"}, pid=42).watchdog_interval == 15.0


def test_notifier_vanished_socket_does_not_raise(tmp_path):
    n = Notifier(str(tmp_path / "gone.sock"))
    assert n.ready() is False and n.watchdog() is False
    n.close()


@pytest.mark.kernel
def test_daemon_error_names_stderr(netns, tmp_path):
    """The helper's own failure report carries the daemon's stderr."""
    d = NflogdProcess(netns, tmp_path, ready_timeout=5)
    d.write_config("groups: [1]\nbogus: 1\n")
    with pytest.raises(DaemonError, match="bogus"):
        with d:
            pass


# -- systemd files --------------------------------------------------------------


def test_unit_has_what_the_daemon_relies_on():
    s = unit_settings(REPO / "systemd" / "nflogd.service")
    expect = {
        "Type": "notify", "WatchdogSec": "30", "ExecStart": "/usr/bin/nflogd -c /etc/nflogd.yaml",
        "User": "nflogd", "Group": "nflog", "AmbientCapabilities": "CAP_NET_ADMIN",
        "CapabilityBoundingSet": "CAP_NET_ADMIN", "RuntimeDirectory": "nflogd",
        "RuntimeDirectoryMode": "0750", "MemoryDenyWriteExecute": "yes", "Restart": "on-failure",
        "RestrictAddressFamilies": "AF_NETLINK AF_UNIX AF_INET AF_INET6",
    }  # fmt: skip
    assert {k: s.get(k, [None])[-1] for k in expect} == expect
    assert "PrivateNetwork" not in s and "PrivateUsers" not in s
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def veth_out(netns, name: str = "va") -> None:
    """A veth pair in the namespace and a neighbour behind ``name``: UDP to 10.77.0.2 leaves
    through it (and ends at the peer, inside the namespace)."""
    for cmd in (
        f"ip link add {name} type veth peer name vb",
        f"ip addr add 10.77.0.1/24 dev {name}",
        f"ip link set {name} up",
        "ip link set vb up",
        f"ip neigh replace 10.77.0.2 lladdr 02:00:00:00:00:02 dev {name}",
    ):
        netns.run(*cmd.split())


@pytest.mark.kernel
def test_the_routers_interface_names_follow_a_rename(netns, tmp_path, ctx):
    """Records name their interfaces as the router does (the names trailer), and a renamed
    interface shows its new name in the first packet after the rename, within a second."""
    veth_out(netns)
    netns.log_rule(3, match="udp dport 9997")
    with NflogdProcess(netns, tmp_path, groups=[3], node="r1") as d:
        sub = d.subscribe(ctx)
        netns.send_udp([b"before"], "10.77.0.2", 9997)
        (first,) = [p for b in receive(sub, lambda bs: packet_count(bs) >= 1) for p in b.packets]
        index = first.outdev
        assert first.outdev_name == "va" and first.indev is None and first.indev_name is None
        for cmd in ("ip link set va down", "ip link set va name uplink0", "ip link set uplink0 up"):
            netns.run(*cmd.split())
        netns.run(*"ip neigh replace 10.77.0.2 lladdr 02:00:00:00:00:02 dev uplink0".split())
        renamed = time.monotonic()
        netns.send_udp([b"after"], "10.77.0.2", 9997)
        (second,) = [p for b in receive(sub, lambda bs: packet_count(bs) >= 1) for p in b.packets]
        assert time.monotonic() - renamed < 1.0
        assert (second.outdev, second.outdev_name) == (index, "uplink0")
        sub.close(linger=0)
    assert d.returncode == 0


@pytest.mark.kernel
def test_dropped_interface_notifications_read_the_table_again(netns, tmp_path, ctx):
    """The daemon stopped (SIGSTOP) while 400 veth pairs come and go and its veth is
    renamed: the kernel drops notifications its buffer cannot hold (ENOBUFS). Once it runs
    again it reads the whole table again, counts it in nflogd_ifnames_resyncs_total (0 before),
    logs it, and the next packet names the renamed interface."""
    veth_out(netns)
    netns.log_rule(3, match="udp dport 9997")
    with NflogdProcess(netns, tmp_path, groups=[3], node="r1") as d:
        assert d.metric("nflogd_ifnames_resyncs_total") == 0
        sub = d.subscribe(ctx)
        d.send_signal(signal.SIGSTOP)
        try:
            batch = "".join(f"link add c{i} type veth peer name p{i}\nlink del c{i}\n" for i in range(400))
            netns.run("ip", "-batch", "-", input=batch)
            for cmd in ("ip link set va down", "ip link set va name uplink1", "ip link set uplink1 up"):
                netns.run(*cmd.split())
            netns.run(*"ip neigh replace 10.77.0.2 lladdr 02:00:00:00:00:02 dev uplink1".split())
        finally:
            d.send_signal(signal.SIGCONT)
        wait_until(lambda: d.metric("nflogd_ifnames_resyncs_total"), "a resync")
        netns.send_udp([b"after"], "10.77.0.2", 9997)
        (pkt,) = [p for b in receive(sub, lambda bs: packet_count(bs) >= 1) for p in b.packets]
        assert pkt.outdev_name == "uplink1"
        assert "interface notifications overran; reading the whole table again" in d.stderr
        sub.close(linger=0)
    assert d.returncode == 0


@pytest.mark.kernel
def test_conntrack_group_where_the_kernel_cannot(netns, tmp_path):
    """conntrack: true on a kernel without conntrack for NFLOG stops the start with one line
    naming the group; where it has it, the daemon starts."""
    netns.log_rule(4, match="udp dport 9996")
    d = NflogdProcess(netns, tmp_path, groups=[{"group": 4, "conntrack": True}])
    rc = d.run_to_exit() if not supports_ct_for_nflog(netns) else None
    if rc is None:
        with d:
            assert d.ready_msg["READY"] == "1"
        return
    assert rc != 0
    lines = d.stderr.strip().splitlines()
    assert (
        lines[-1] == "nflogd: group 4: conntrack: the kernel has no conntrack netlink (nf_conntrack_netlink)"
    )
    assert "Traceback" not in d.stderr


@pytest.mark.kernel
def test_conntrack_shows_the_address_before_dnat(netns, tmp_path, ctx):
    """A DNAT rule (in conntrack zone 7, ct mark 5) sends 127.0.0.2:9999 to 127.0.0.1:9998.
    Read through the daemon and a Subscriber, the packet logged at INPUT in a group with
    ``conntrack: true`` carries the translated address, and its connection the tuple the sender
    chose (original) and the one replies use (reply); the same packet in a group without
    conntrack carries none. Skipped where the kernel attaches no conntrack to NFLOG
    (CONFIG_NETFILTER_NETLINK_GLUE_CT off): make test-vm runs it under Debian's kernel."""
    if not supports_ct_for_nflog(netns):
        pytest.skip("this kernel attaches no conntrack to NFLOG (CONFIG_NETFILTER_NETLINK_GLUE_CT)")
    netns.nft(
        "table ip nat {\n"
        "  chain zone { type filter hook output priority raw;\n"
        "    ip daddr 127.0.0.2 ct zone set 7\n  }\n"
        "  chain out { type nat hook output priority -100;\n"
        "    ip daddr 127.0.0.2 udp dport 9999 ct mark set 5 dnat to 127.0.0.1:9998\n  }\n"
        "}\n"
    )
    netns.log_rule(11, hook="input", match="udp dport 9998")
    netns.log_rule(12, hook="input", match="udp dport 9998")
    groups = [{"group": 11, "conntrack": True}, 12]
    with NflogdProcess(netns, tmp_path, groups=groups, node="nat1") as d:
        sub = Subscriber(d.endpoint, groups=[11, 12], context=ctx)
        wait_until(lambda: d.stderr.count("DEBUG: subscribe ") >= 2, "the subscriptions")
        with netns.socket() as s:
            s.bind(("127.0.0.1", 40001))
            s.sendto(b"one", ("127.0.0.2", 9999))
            s.sendto(b"two", ("127.0.0.2", 9999))
        got = collect(sub, lambda ps: len(ps) >= 4)
        sub.close()
    first, second = [p for p in got if p.group == 11]
    (plain, _) = [p for p in got if p.group == 12]
    assert IP(first.data).dst == "127.0.0.1" and IP(first.data)[UDP].dport == 9998
    ct = first.ct
    assert ct is not None and first.extended
    assert ct.orig == wire.CtTuple("127.0.0.1", "127.0.0.2", 40001, 9999)
    assert ct.reply == wire.CtTuple("127.0.0.1", "127.0.0.1", 9998, 40001)
    assert (ct.proto, ct.mark, ct.zone) == (17, 5, 7)
    assert (ct.state, ct.reply_dir) == ("new", False)
    assert second.ct.state == "new"  # UDP is new until a reply comes
    assert ct.status & 0x20  # IPS_DST_NAT
    assert second.ct.id == ct.id and ct.id is not None
    assert plain.ct is None and plain.vlan is None and plain.l2hdr is None
    assert plain.data == first.data


@pytest.mark.kernel
def test_a_vlan_sub_interface_shows_its_tag(netns, tmp_path, ctx):
    """va.42 (VLAN 42, priority 0 sent as PCP 3) on a veth pair whose other end is a bridge
    port: read through the daemon and a Subscriber, the bridge family's log of its frames
    carries the tag (NFULA_VLAN) and the link-layer header (NFULA_L2HDR), the inet family's log
    of the same packet leaving names va.42. Skipped where the kernel has no 8021q: make test-vm
    runs it under Debian's kernel (test_capture.py's bridged frame test covers the parser here)."""
    for cmd in ("ip link add br0 type bridge", "ip link add va type veth peer name vb"):
        netns.run(*cmd.split())
    vlan = netns.run(
        *"ip link add link va name va.42 type vlan id 42 egress-qos-map 0:3".split(), check=False
    )
    if vlan.returncode != 0:
        pytest.skip(f"this kernel has no VLAN sub-interfaces (8021q): {vlan.stderr.strip()}")
    for cmd in (
        "ip link set vb master br0",
        "ip addr add 10.42.0.1/24 dev va.42",
        "ip link set br0 up",
        "ip link set vb up",
        "ip link set va up",
        "ip link set va.42 up",
        "ip neigh replace 10.42.0.2 lladdr 02:00:00:00:00:02 dev va.42",
    ):
        netns.run(*cmd.split())
    mac = bytes.fromhex(netns.run("cat", "/sys/class/net/va/address").stdout.strip().replace(":", ""))
    netns.nft(
        "table bridge tb {\n  chain c {\n    type filter hook prerouting priority 0;\n"
        "    udp dport 9997 log group 13\n  }\n}\n"
        "table inet ti {\n  chain c {\n    type filter hook output priority 0;\n"
        "    udp dport 9997 log group 14\n  }\n}\n"
    )
    with NflogdProcess(netns, tmp_path, groups=[13, 14], node="sw1") as d:
        sub = Subscriber(d.endpoint, groups=[13, 14], context=ctx)
        wait_until(lambda: d.stderr.count("DEBUG: subscribe ") >= 2, "the subscriptions")
        netns.send_udp([b"tagged"], "10.42.0.2", 9997)
        got = collect(sub, lambda ps: {p.group for p in ps} == {13, 14})
        sub.close()
    (bridged,) = [p for p in got if p.group == 13]
    (sent,) = [p for p in got if p.group == 14]
    assert bridged.vlan == (0x6000 | 42, 0x8100) and (bridged.vlan.id, bridged.vlan.pcp) == (42, 3)
    assert bridged.l2hdr is not None and bridged.l2hdr[:12] == bytes.fromhex("020000000002") + mac
    assert "vb" in (bridged.indev_name, bridged.physindev_name)
    assert bridged.data == sent.data and IP(bridged.data).dst == "10.42.0.2"
    assert sent.vlan is None and sent.outdev_name == "va.42"


def supports_ct_for_nflog(netns) -> bool:
    from nflogd.capture import GroupReader
    from nflogd.config import GroupConfig
    from nflogd.errors import NFLogError

    with netns.entered():
        try:
            GroupReader(GroupConfig(group=65000, conntrack=True)).close()
        except NFLogError:
            return False
    return True
