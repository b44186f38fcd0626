"""Faults and load against the real daemon in a test namespace, every figure exact.

- overload: the machine's top send rate for 20 s into a small receive buffer;
- a subscriber stopped with SIGSTOP among others that keep reading;
- kill -9 and a restart on the same files, with a Subscriber left running;
- 1,000 subscribers connecting and leaving, and 100 SIGHUPs, under traffic.

Traffic stays on the namespace's loopback; bench/flood.c (compiled once per session) is
the fast sender. The whole file takes about a minute on 2 cores, most of it the overload.
The one-hour soak is ``bench/run.py soak``, not a test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import zmq
from daemonutil import REPO, NflogdProcess, wait_until
from feedutil import collect
from nflogd_client import Subscriber, wire
from nsutil import SteadyTraffic

pytestmark = [pytest.mark.timeout(120), pytest.mark.kernel]

OVERLOAD_SECONDS = 20.0
FLOOD_CHUNK = 200_000  # packets per flood run while overloading (about a second flat out)


# -- helpers ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def flood_bin(tmp_path_factory) -> str:
    """bench/flood.c compiled into a temporary directory."""
    out = tmp_path_factory.mktemp("flood") / "flood"
    src = REPO / "bench" / "flood.c"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True, timeout=60)
    return str(out)


def flood(netns, flood_bin: str, count: int, rate: float = 0, port: int = 9999, size: int = 64) -> int:
    """Send ``count`` UDP datagrams to 127.0.0.1:port in the namespace (rate 0: flat out)."""
    res = netns.run(flood_bin, str(count), str(rate), "127.0.0.1", str(port), str(size), timeout=120)
    return json.loads(res.stdout)["sent"]


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def bound_groups(netns) -> dict[int, int]:
    """{group: netlink port id} bound in the namespace, from the kernel's own list."""
    out = netns.run("cat", "/proc/net/netfilter/nfnetlink_log").stdout
    return {int(f[0]): int(f[1]) for f in (line.split() for line in out.splitlines()) if f}


def count_metric(d: NflogdProcess, name: str, group: int) -> int:
    value = d.metric(name, group=str(group))
    assert value is not None, f"{name}{{group={group}}} missing"
    return int(value)


class FeedCounter(threading.Thread):
    """Drains a SUB socket in its own thread, reading only the headers (cheap at any rate).

    Per group: packets, messages, gaps in ``first_seq`` (there must be none), the latest
    ``kernel_dropped`` and the epochs seen.
    """

    def __init__(self, sock: zmq.Socket):
        super().__init__(daemon=True)
        self.sock = sock
        self.halt = threading.Event()
        self.packets: dict[int, int] = {}
        self.messages = 0
        self.next_seq: dict[int, int] = {}
        self.gaps: list[tuple[int, int, int]] = []  # (group, expected, got)
        self.kernel_dropped: dict[int, int] = {}
        self.epochs: set[int] = set()
        self.error: BaseException | None = None

    def run(self) -> None:
        sock = self.sock
        try:
            while not self.halt.is_set():
                if not sock.poll(50):
                    continue
                while True:
                    try:
                        msg = sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._count(msg)
        except BaseException as e:  # reported by stop()
            self.error = e

    def _count(self, msg: list[bytes]) -> None:
        (_m, _v, _f, group, count, _rs, _nl, epoch, first_seq, kdrop) = wire.HEADER.unpack_from(msg[1])
        expected = self.next_seq.get(group, 0)
        if first_seq != expected:
            self.gaps.append((group, expected, first_seq))
        self.next_seq[group] = first_seq + count
        self.packets[group] = self.packets.get(group, 0) + count
        self.kernel_dropped[group] = kdrop
        self.epochs.add(epoch)
        self.messages += 1

    def total(self, group: int) -> int:
        return self.packets.get(group, 0)

    def quiet(self, seconds: float = 0.3, timeout: float = 15.0) -> None:
        """Return once no message has come for ``seconds``."""
        deadline = time.monotonic() + timeout
        last = -1
        while self.messages != last:
            assert time.monotonic() < deadline, "the feed never went quiet"
            last = self.messages
            time.sleep(seconds)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.sock.close(linger=0)
        if self.error is not None:
            raise self.error


# -- overload ---------------------------------------------------------------------------------


def test_overload_at_top_rate_every_packet_published_or_counted_dropped(netns, tmp_path, ctx, flood_bin):
    """20 s flat out into a 64 KiB receive buffer: the daemon stays up and
    published + kernel-dropped == sent, exactly, on the feed and in the metrics."""
    netns.log_rule(1, match="udp dport 9999")
    with NflogdProcess(netns, tmp_path, groups=[{"group": 1, "rcvbuf": 65536}]) as d:
        feed = FeedCounter(d.subscribe(ctx, [wire.topic(1)]))
        feed.start()
        try:
            sent = 0
            t0 = time.monotonic()
            while time.monotonic() - t0 < OVERLOAD_SECONDS:
                sent += flood(netns, flood_bin, FLOOD_CHUNK)
                assert d.alive(), d.stderr
            seconds = time.monotonic() - t0
            # Let the daemon drain; a kernel loss shows once the next packet after it
            # arrives, so send one more until everything is accounted for.
            feed.quiet()
            for _ in range(20):
                if feed.total(1) + feed.kernel_dropped.get(1, 0) >= sent:
                    break
                sent += flood(netns, flood_bin, 1)
                feed.quiet(0.2)
        finally:
            feed.stop()
        published, dropped = feed.total(1), feed.kernel_dropped[1]
        print(
            f"\noverload: sent {sent} in {seconds:.1f} s ({sent / seconds:.0f}/s), published {published},"
            f" kernel-dropped {dropped} ({100 * dropped / sent:.1f} %), {feed.messages} messages"
        )
        assert d.alive(), d.stderr
        assert dropped > 0, "nothing was dropped: no overload, the test proves nothing"
        assert published + dropped == sent
        assert feed.gaps == [] and len(feed.epochs) == 1
        assert count_metric(d, "nflogd_packets_total", 1) == published
        assert count_metric(d, "nflogd_kernel_dropped_packets_total", 1) == dropped
        assert count_metric(d, "nflogd_overflows_total", 1) >= 1
    assert d.returncode == 0
    assert "Traceback" not in d.stderr


# -- a stopped subscriber ----------------------------------------------------------------------

# A Subscriber in its own process (so that SIGSTOP stops it alone): reads until a packet
# ending in END, then prints what it counted as JSON.
SUBSCRIBER = r"""
import json, sys
from nflogd_client import Subscriber
endpoint, group, rcvhwm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
last_seq = None
with Subscriber(endpoint, groups=group, rcvhwm=rcvhwm) as sub:
    while True:
        batch = sub.recv_batch(timeout=60)
        if batch is None:
            break
        if batch.packets:
            last_seq = batch.packets[-1].seq
        if any(p.data.endswith(b"END") for p in batch.packets):
            break
    print(json.dumps({"received": sub.received, "lost": sub.total_lost, "last_seq": last_seq,
                      "malformed": sub.malformed, "restarts": sub.restarts}), flush=True)
"""


def start_subscriber(d: NflogdProcess, group: int, rcvhwm: int) -> subprocess.Popen:
    """The SUBSCRIBER script, returned once the daemon has logged its subscription."""
    line = f"DEBUG: subscribe {wire.topic(group).hex()!r}"
    before = d.stderr.count(line)
    proc = subprocess.Popen(
        [sys.executable, "-c", SUBSCRIBER, d.endpoint, str(group), str(rcvhwm)],
        stdout=subprocess.PIPE, text=True, cwd=str(REPO),
    )  # fmt: skip
    wait_until(lambda: d.stderr.count(line) > before or proc.poll() is not None, what="the subscription")
    assert proc.poll() is None, "the subscriber exited"
    return proc


def test_sigstopped_subscriber_loses_alone_and_sees_its_gap(netns, tmp_path, ctx, flood_bin):
    """Small batches (8 packets) and a publisher HWM of 1000 messages, so the stopped
    subscriber's queue overflows within the 5000 messages of the flood. The daemon and the
    other subscribers (one in this process, one in another) lose nothing; the stopped one
    counts exactly what it missed once it resumes."""
    netns.log_rule(1, match="udp dport { 9998, 9999 }")  # 9998: the END packets
    cfg = {"publish": {"bind": [f"ipc://{tmp_path}/run/feed.sock"], "hwm": 1000}}
    groups = [{"group": 1, "queue_threshold": 8}]
    with NflogdProcess(netns, tmp_path, groups=groups, extra=cfg) as d:
        slow = start_subscriber(d, 1, rcvhwm=20)
        other = start_subscriber(d, 1, rcvhwm=100_000)
        feed = FeedCounter(d.subscribe(ctx, [wire.topic(1)]))
        feed.start()
        try:
            sent = flood(netns, flood_bin, 100, rate=1000, size=200)  # all three see seq 0 on
            wait_until(lambda: feed.total(1) == sent, what="the first packets")
            slow.send_signal(signal.SIGSTOP)
            wait_until(lambda: proc_state(slow.pid) == "T", what="the subscriber to stop")
            sent += flood(netns, flood_bin, 40_000, rate=20_000, size=200)
            wait_until(lambda: feed.total(1) == sent, what="the flood on the feed")
            slow.send_signal(signal.SIGCONT)
            time.sleep(0.5)  # it drains what its queues kept
            ends = 0
            with netns.socket() as s:
                while slow.poll() is None and ends < 50:  # END until it has read one
                    s.sendto(b"END", ("127.0.0.1", 9998))
                    ends += 1
                    time.sleep(0.1)
            sent += ends
            wait_until(lambda: feed.total(1) == sent, what="the END packets")
        finally:
            for p in (slow, other):
                if p.poll() is None:
                    p.send_signal(signal.SIGCONT)
            feed.stop()
        slow_out, other_out = (json.loads(p.communicate(timeout=60)[0]) for p in (slow, other))
        print(f"\nsigstop: sent {sent}; stopped subscriber {slow_out}; running one {other_out}")
        # capture and the running subscribers lost nothing
        assert feed.gaps == [] and feed.total(1) == sent
        assert count_metric(d, "nflogd_packets_total", 1) == sent
        assert count_metric(d, "nflogd_kernel_dropped_packets_total", 1) == 0
        assert other_out["lost"] == 0 and other_out["received"] == other_out["last_seq"] + 1
        assert other_out["last_seq"] + 1 >= sent - ends + 1
        # the stopped one lost, and counted every packet it did not get
        assert slow_out["lost"] > 0
        assert slow_out["received"] + slow_out["lost"] == slow_out["last_seq"] + 1
        assert slow_out["last_seq"] + 1 > sent - ends  # it saw an END, after the flood
        assert slow_out["malformed"] == slow_out["restarts"] == 0


# -- kill -9 and restart -----------------------------------------------------------------------


def test_kill_9_then_restart_rebinds_at_once_and_clients_resume(netns, tmp_path, ctx):
    """SIGKILL leaves the ipc socket file; the kernel frees the NFLOG instance as the socket
    closes, so the restarted daemon binds the same groups at once (no EPERM/EBUSY), takes
    over the stale file, and a Subscriber that kept running resumes by itself, counting the
    restart and, as lost, what the new run published before it reconnected."""
    netns.log_rule(1, match="udp dport 9999")
    netns.log_rule(2, match="udp dport 9998")
    groups = [1, 2]
    first = NflogdProcess(netns, tmp_path, groups=groups).start()
    try:
        sub = Subscriber(first.endpoint, groups=[1, 2], context=ctx)
        wait_until(lambda: first.stderr.count("DEBUG: subscribe") >= 2, what="the subscriptions")
        before = netns.send_udp([b"before %d" % i for i in range(50)])
        got = collect(sub, lambda ps: len(ps) >= before)
        assert len(got) == before and sub.total_lost == 0
        old_ports = bound_groups(netns)
        assert set(old_ports) == {1, 2}

        first.send_signal(signal.SIGKILL)
        assert first.wait(5) == -signal.SIGKILL
        sock_path = first.endpoint[len("ipc://") :]
        assert os.path.exists(sock_path), "SIGKILL should leave the socket file behind"
        assert bound_groups(netns) == {}, "the kernel kept the dead daemon's groups"
        netns.send_udp([b"while down %d" % i for i in range(20)])  # no one listens: gone
        assert sub.recv(timeout=0.3) is None  # the client notices nothing but silence
    finally:
        first.stop()

    second = NflogdProcess(netns, tmp_path, groups=groups)
    t0 = time.monotonic()
    with second.start():
        ready_s = time.monotonic() - t0
        assert ready_s < 5, f"READY after {ready_s:.1f} s"
        assert second.ready_msg is not None and "groups 1, 2" in second.ready_msg["STATUS"]
        new_ports = bound_groups(netns)
        assert set(new_ports) == {1, 2} and not set(new_ports.values()) & set(old_ports.values())
        # Send in rounds while the Subscriber waits in recv(): libzmq reconnects and resends
        # its subscriptions by itself; what the new run published before that is lost.
        after = 0
        resumed: list = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not resumed:
            after += netns.send_udp([b"after %d" % after], port=9999)
            resumed = collect(sub, lambda ps: bool(ps), timeout=0.1)
        assert resumed, f"the Subscriber did not resume; stderr:\n{second.stderr}"
        after += netns.send_udp([b"more %d" % i for i in range(30)], port=9999)
        after2 = netns.send_udp([b"g2 %d" % i for i in range(10)], port=9998)
        n = len(resumed)
        resumed += collect(sub, lambda ps: n + len(ps) + sub.total_lost >= after + after2)
        sub.close()
        print(f"\nkill -9: READY after {ready_s:.2f} s; sent {after} + {after2} after the restart,"
              f" received {len(resumed)}, lost {sub.lost}, restarts {sub.restarts}")  # fmt: skip
        assert sub.restarts == 1
        g1 = [p for p in resumed if p.group == 1]
        g2 = [p for p in resumed if p.group == 2]
        assert len(g1) + sub.lost[("test", 1)] == after
        assert [p.seq for p in g1] == list(range(sub.lost[("test", 1)], after))
        assert [p.seq for p in g2] == list(range(after2)) and sub.lost[("test", 2)] == 0
        assert {p.data[28:] for p in g1} <= {b"after %d" % i for i in range(after)} | {
            b"more %d" % i for i in range(30)
        }
        assert count_metric(second, "nflogd_packets_total", 1) == after
    assert second.returncode == 0
    assert "Traceback" not in second.stderr and "already bound" not in second.stderr


# -- churn: subscribers and SIGHUPs --------------------------------------------------------------

CHURN_SUBSCRIBERS = 1000
CHURN_BATCH = 50
FD_SLACK = 2  # open files a single read may see beyond the settled count: connections closing
RSS_SLACK_KIB = 8 * 1024  # resident memory growth over the whole churn, beyond the first round
RSS_FLAT_KIB = 2 * 1024  # ... and over its second half, where it must have levelled off


def settled_fds(pid: int) -> int:
    """The daemon's open files without transients (a metrics scrape's or a peer's connection
    still closing): the fewest of reads over 0.3 s."""
    counts = []
    for _ in range(6):
        counts.append(open_fds(pid))
        time.sleep(0.05)
    return min(counts)


def subscribers_gauge(d: NflogdProcess) -> int:
    return int(d.metric("nflogd_subscribers") or 0)


class Reader(threading.Thread):
    """A long-lived Subscriber read in its own thread; keeps seqs to prove contiguity."""

    def __init__(self, endpoint: str, group: int, ctx):
        super().__init__(daemon=True)
        self.sub = Subscriber(endpoint, groups=group, context=ctx)
        self.seqs: list[int] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                batch = self.sub.recv_batch(timeout=0.05)
                if batch is not None:
                    self.seqs.extend(p.seq for p in batch.packets)
        except BaseException as e:
            self.error = e

    def wait_for(self, n: int, timeout: float = 15.0) -> None:
        wait_until(lambda: len(self.seqs) >= n, f"{n} packets (have {len(self.seqs)})", timeout)
        time.sleep(0.2)  # and no more than n

    def stop(self) -> Subscriber:
        self.halt.set()
        self.join(5)
        self.sub.close()
        if self.error is not None:
            raise self.error
        return self.sub


def test_thousand_subscribers_come_and_go(netns, tmp_path, ctx):
    """1,000 subscribers of group 1 connect and leave in rounds of 50, with traffic on group
    1 queued to them as they go, while group 2 carries steady traffic to one long-lived
    subscriber: open files come back to where they were, memory stays within a bound,
    group 2 arrives complete."""
    netns.log_rule(1, match="udp dport 9991")
    netns.log_rule(2, match="udp dport 9992")
    with NflogdProcess(netns, tmp_path, groups=[1, 2]) as d:
        reader = Reader(d.endpoint, 2, ctx)
        reader.start()
        wait_until(lambda: subscribers_gauge(d) == 1, what="the long-lived subscriber")
        sender = SteadyTraffic(netns, [9991, 9992])
        sender.start()
        samples = []
        try:
            for rnd in range(CHURN_SUBSCRIBERS // CHURN_BATCH):
                subs = [Subscriber(d.endpoint, groups=1, context=ctx) for _ in range(CHURN_BATCH)]
                wait_until(lambda: subscribers_gauge(d) == 1 + CHURN_BATCH, what=f"round {rnd}: connects")
                for s in subs:
                    s.close()
                wait_until(lambda: subscribers_gauge(d) == 1, what=f"round {rnd}: disconnects")
                samples.append((open_fds(d.pid), rss_kib(d.pid)))
                if rnd == 0:
                    settled0 = settled_fds(d.pid)
        finally:
            sent = sender.stop()[9992]
        reader.wait_for(sent)
        settled_end = settled_fds(d.pid)  # the long-lived subscriber still connected, as at first
        sub = reader.stop()
        print(
            f"\nchurn: (fds, rss KiB) after round 1 {samples[0]}, 10 {samples[9]}, 20 {samples[-1]};"
            f" settled fds {settled0} -> {settled_end}; group 2: sent {sent}, received {len(reader.seqs)}"
        )
        fds0, rss0 = settled0, samples[0][1]
        assert max(f for f, _ in samples) <= fds0 + FD_SLACK, samples
        assert settled_end == fds0, "open files grew over 1,000 subscribers"
        assert samples[-1][1] - rss0 <= RSS_SLACK_KIB, samples
        assert samples[-1][1] - samples[len(samples) // 2][1] <= RSS_FLAT_KIB, samples
        assert reader.seqs == list(range(sent)) and sub.lost == {("test", 2): 0}
        assert count_metric(d, "nflogd_packets_total", 2) == sent
    assert d.returncode == 0


SIGHUPS = 100


def test_hundred_sighups_under_traffic(netns, tmp_path, ctx):
    """100 reloads in a row, each adding or removing group 3 and retuning group 2, then a
    burst of raw SIGHUPs: untouched group 1 and retuned group 2 lose nothing, open files
    and memory stay where they were."""
    for g in (1, 2, 3):
        netns.log_rule(g, match=f"udp dport {9990 + g}")
    with NflogdProcess(netns, tmp_path, groups=[1, 2]) as d:
        configs = [
            d.make_config(groups=[1, {"group": 2, "copy_range": 48}, 3]),
            d.make_config(groups=[1, {"group": 2, "flush_ms": 50}]),
        ]
        readers = {g: Reader(d.endpoint, g, ctx) for g in (1, 2)}
        for r in readers.values():
            r.start()
        wait_until(lambda: subscribers_gauge(d) == 2, what="the subscribers")
        sender = SteadyTraffic(netns, [9991, 9992, 9993], interval=0.0002)
        sender.start()
        samples = []
        t0 = time.monotonic()
        try:
            for i in range(SIGHUPS):
                d.write_config(configs[i % 2])
                status = d.reload()["STATUS"]
                assert "failed" not in status, status
                assert ("groups 1, 2, 3" in status) == (i % 2 == 0), status
                if i % 20 == 1:  # group 3 just closed: the same groups as the first sample
                    samples.append((settled_fds(d.pid), rss_kib(d.pid)))
            reload_s = time.monotonic() - t0
            for _ in range(20):  # a burst: the loop reads them together, rereads once or more
                d.send_signal(signal.SIGHUP)
            time.sleep(0.5)
            d.notify.drain(0.1)
            assert "failed" not in d.reload()["STATUS"]
            assert d.alive()
        finally:
            sent = sender.stop()
        for g, r in readers.items():
            r.wait_for(sent[9990 + g])
        samples.append((settled_fds(d.pid), rss_kib(d.pid)))
        subs = {g: r.stop() for g, r in readers.items()}
        print(f"\nsighup: {SIGHUPS} reloads in {reload_s:.1f} s; (fds, rss KiB) {samples};"
              f" sent {sent}")  # fmt: skip
        assert bound_groups(netns).keys() == {1, 2}
        for g in (1, 2):
            assert readers[g].seqs == list(range(sent[9990 + g])), f"group {g}"
            assert subs[g].lost == {("test", g): 0}
            assert count_metric(d, "nflogd_packets_total", g) == sent[9990 + g]
            assert count_metric(d, "nflogd_kernel_dropped_packets_total", g) == 0
        fds0, rss0 = samples[0]
        assert all(f == fds0 for f, _ in samples), samples
        assert samples[-1][1] - rss0 <= RSS_SLACK_KIB, samples
        assert samples[-1][1] - samples[len(samples) // 2][1] <= RSS_FLAT_KIB, samples
    assert d.returncode == 0
    assert "Traceback" not in d.stderr
