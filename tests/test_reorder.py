"""The reordering window: Reorder on its own, nflog-tap's pcap from an in-process feed, and
JSON lines from the real daemon with two groups whose batches the kernel cuts at different rates."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import test_tap
from daemonutil import NflogdProcess
from feedutil import TS, FakeFeed, msg, rec, topics
from nflogd_client.reorder import Reorder
from nsutil import SteadyTraffic
from scapy.utils import RawPcapReader
from test_tap import V4, finish, run_tap

pytestmark = pytest.mark.timeout(120)

procs = test_tap.procs  # the fixture: subprocesses killed at the end
MS = 1_000_000  # ns


def pkts(*ts_ms: int, group: int = 5):
    return [rec(group, V4, TS + t * MS) for t in ts_ms]


def order(items) -> list[int]:
    return [(p.ts_ns - TS) // MS for p, _ in items]


def test_window_orders_by_timestamp_and_bounds_the_wait():
    r = Reorder(0.1)
    r.add(pkts(10, 20, 30), "first", now_ns=0)
    r.add(pkts(5, 15, group=6), now_ns=1)
    assert order(r.ready(now_ns=2)) == []  # nothing is 100 ms older than the newest yet
    r.add(pkts(140, group=6), now_ns=3)  # 100 ms past 30: everything up to 40 ms may go
    out = list(r.ready(now_ns=4))
    assert order(out) == [5, 10, 15, 20, 30]
    assert [note for _, note in out] == [None, "first", None, None, None]  # with its batch's first packet
    assert len(r) == 1
    assert order(r.ready(now_ns=3 + 100 * MS - 1)) == []
    assert order(r.ready(now_ns=3 + 100 * MS)) == [140]  # held 100 ms here: it goes, traffic or not
    assert r.wait(5.0) == 5.0


def test_window_zero_passes_in_arrival_order_and_max_packets_bounds():
    r = Reorder(0)
    r.add(pkts(30, 10))
    r.add(pkts(20))
    assert order(r.ready()) == [30, 10, 20] and r.wait(None) is None
    r = Reorder(10.0, max_packets=2)
    r.add(pkts(3, 1, 2), now_ns=0)
    assert order(r.ready(now_ns=0)) == [1]  # over the bound: the oldest goes
    assert order(r.drain()) == [2, 3]
    with pytest.raises(ValueError, match="reordering window: must be >= 0 seconds, got -1"):
        Reorder(-1)


def test_tap_pcap_in_time_order_across_groups(procs, tmp_path):
    """Group 6's newer batch arrives before group 5's older one: the window puts 5 first."""
    messages = (
        msg(6, *pkts(50, 60, group=6)),
        msg(5, *pkts(10, 20)),
        msg(6, *pkts(300, group=6), first_seq=2),
    )
    out = {}
    for window in ("0", "200"):
        feed = FakeFeed(tmp_path / f"feed{window}.sock")
        feed.publish_when_subscribed(topics(5, 6), *messages)
        path = tmp_path / f"w{window}.pcap"
        p = run_tap(
            procs,
            "-e",
            feed.endpoint,
            "-g",
            "5",
            "-g",
            "6",
            "-c",
            "5",
            "-w",
            str(path),
            "--reorder-ms",
            window,
        )
        _, err = finish(p)
        feed.close()
        assert p.returncode == 0 and err == "nflog-tap: 5 packets written, 0 lost\n", err
        with RawPcapReader(str(path)) as r:
            out[window] = [(m.sec * 10**6 + m.usec - TS // 1000) // 1000 for _, m in r]
    assert out["0"] == [50, 60, 10, 20, 300]  # as they came: a step back of 50 ms
    assert out["200"] == [10, 20, 50, 60, 300]


def test_bad_window_argument(procs):
    p = run_tap(procs, "-e", "ipc:///tmp/nflog-tap-unused.sock", "--reorder-ms", "20000")
    _, err = finish(p)
    assert p.returncode == 2 and "a reordering window is 0..10000 milliseconds, got '20000'" in err


def run_json(netns, d, window: str, n: int) -> list[int]:
    """time_ns of the first ``n`` packets nflog-tap --format json writes with this window."""
    tap_bin = str(Path(sys.executable).parent / "nflog-tap")
    p = subprocess.Popen(
        [tap_bin, "-e", d.endpoint, "--format", "json", "-c", str(n), "--reorder-ms", window],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    sender = SteadyTraffic(netns, [9991, 9992], interval=0.002)
    sender.start()
    try:
        out, err = p.communicate(timeout=60)
    finally:
        sender.stop()
    assert p.returncode == 0, err
    objs = [json.loads(line) for line in out.decode().splitlines()]
    return [o["time_ns"] for o in objs if o["event"] == "packet"]


@pytest.mark.kernel
def test_real_daemon_two_groups_in_time_order(netns, tmp_path):
    """Group 1's batches are cut every 200 ms, group 2's every 10 ms: without a window the
    output steps back in time at each group-1 batch; with 500 ms it never does."""
    netns.log_rule(1, hook="input", match="udp dport 9991")
    netns.log_rule(2, hook="input", match="udp dport 9992")
    groups = [{"group": 1, "flush_ms": 200, "queue_threshold": 1000}, {"group": 2, "flush_ms": 10}]
    with NflogdProcess(netns, tmp_path / "d", groups=groups) as d:
        plain = run_json(netns, d, "0", 300)
        ordered = run_json(netns, d, "500", 300)
    steps = lambda ts: [b - a for a, b in zip(ts, ts[1:])]  # noqa: E731
    assert min(steps(plain)) < -50 * MS  # the bug the window fixes: a group-1 batch 200 ms late
    assert min(steps(ordered)) >= 0, steps(ordered)
