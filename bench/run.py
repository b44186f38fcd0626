"""nflogd's bench: nflogd side by side with tcpdump and ulogd2 on the same traffic.

One nft rule logs every packet to three groups, ours, tcpdump's (``tcpdump -i nflog:N -w
/dev/null``) and ulogd2's (NFLOG -> BASE -> PCAP into a file on /dev/shm, its cheapest
output), so all three read the very same packets in the same run. Figures are ratios and
per-packet costs (CPU of every thread of a process over the packets it read), never
pass/fail. The ``groups`` part gives each of 1, 2 and 4 groups its own sender at full
speed, with one tcpdump per group beside one daemon serving them all.

    .venv/bin/python bench/run.py               # everything (make bench)
    .venv/bin/python bench/run.py capture       # one part: capture, daemon, groups, latency, idle,
                                                # client, conntrack, ifchurn, filter, curve, relay
    .venv/bin/python bench/run.py soak --seconds 3600 --interval 60   # not part of "all"

The soak runs the daemon with four groups, one of them at ``--rate`` (below capacity) and
three idle, for ``--seconds``, prints its RSS,
open files and loss every ``--interval`` seconds, and a verdict: memory flat and nothing
lost, or exit status 1. It writes bench/results/soak.json.

Traffic stays on the loopback of a namespace made for the run and deleted after it.
Results go to stdout and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))
from nsutil import NetNS  # noqa: E402

PY = sys.executable
# How much slower than a native run this one is: bench/vm.py's emulated guest (TCG) sets
# NFLOGD_TIME_SCALE, which stretches the start-up deadlines (never a measured figure).
TIME_SCALE = float(os.environ.get("NFLOGD_TIME_SCALE", "1"))
OURS, THEIRS, ULOGD = 1, 2, 3  # the groups: ours, tcpdump's, ulogd2's
ULOGD_PLUGINS = "/usr/lib/x86_64-linux-gnu/ulogd"


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) of a live process, in ns precision from schedstat."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def wait_line(proc: subprocess.Popen, stream, pattern: str, timeout: float = 10) -> str:
    timeout *= TIME_SCALE
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        line = stream.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[3:]} exited: {proc.returncode}")
            continue
        if re.search(pattern, line):
            return line
    raise RuntimeError(f"no {pattern!r} from {proc.args[3:]} within {timeout}s")


class Tcpdump:
    """tcpdump reading an nflog group into /dev/null, its CPU and count read at stop."""

    def __init__(self, ns: NetNS, group: int):
        self.proc = ns.popen(
            "tcpdump", "-i", f"nflog:{group}", "-w", "/dev/null", "-B", "8192", "-q",
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        wait_line(self.proc, self.proc.stderr, "listening on")
        self.cpu0 = cpu_seconds(self.proc.pid)

    def stop(self) -> dict:
        cpu = cpu_seconds(self.proc.pid) - self.cpu0
        self.proc.send_signal(signal.SIGINT)
        err = self.proc.communicate(timeout=10)[1]
        m = re.search(r"(\d+) packets? captured", err)
        return {"packets": int(m.group(1)) if m else 0, "cpu": cpu}


def pcap_records(path: str) -> int:
    """Records in a pcap file (classic format, either byte order)."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return 0
    order = "<" if data[:4] in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1") else ">"
    rec = struct.Struct(order + "IIII")
    off, n = 24, 0
    while off + rec.size <= len(data):
        off += rec.size + rec.unpack_from(data, off)[2]
        n += 1
    return n


class Ulogd:
    """ulogd2 reading an nflog group: NFLOG -> BASE -> PCAP into a file on /dev/shm, batched
    as our group is (queue threshold, 10 ms flush, 8 MiB buffer); packets counted from the file."""

    def __init__(self, ns: NetNS, group: int, tmp: str, qthresh: int = 1024, conntrack: bool = False):
        shm = tempfile.mkdtemp(prefix="nflbench-ulogd-", dir="/dev/shm")
        self.pcap, self.log = os.path.join(shm, "ulogd.pcap"), os.path.join(tmp, "ulogd.log")
        conf = os.path.join(tmp, "ulogd.conf")
        plugins = "".join(
            f'plugin="{ULOGD_PLUGINS}/ulogd_{p}.so"\n'
            for p in ("inppkt_NFLOG", "raw2packet_BASE", "output_PCAP")
        )
        with open(conf, "w") as f:
            f.write(
                f'[global]\nlogfile="{self.log}"\nloglevel=3\n{plugins}'
                "stack=log1:NFLOG,base1:BASE,pcap1:PCAP\n\n"
                f"[log1]\ngroup={group}\nnetlink_socket_buffer_size=8388608\n"
                f"netlink_socket_buffer_maxsize=8388608\nnetlink_qthreshold={qthresh}\n"
                f"netlink_qtimeout=1\n{'attach_conntrack=1' if conntrack else ''}\n\n"
                f'[pcap1]\nfile="{self.pcap}"\nsync=0\n'
            )
        self.proc = ns.popen("ulogd", "-c", conf, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10 * TIME_SCALE
        while not (os.path.exists(self.log) and "entering main loop" in open(self.log).read()):
            if self.proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(
                    f"ulogd did not start: {open(self.log).read() if os.path.exists(self.log) else ''}"
                )
            time.sleep(0.05)
        self.cpu0 = cpu_seconds(self.proc.pid)

    def stop(self) -> dict:
        cpu = cpu_seconds(self.proc.pid) - self.cpu0
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        n = pcap_records(self.pcap)
        shutil.rmtree(os.path.dirname(self.pcap), ignore_errors=True)
        return {"packets": n, "cpu": cpu}


def have_ulogd() -> bool:
    return shutil.which("ulogd") is not None and os.path.exists(f"{ULOGD_PLUGINS}/ulogd_output_PCAP.so")


class CaptureReader:
    """bench/capture_reader.py: our capture reader alone."""

    def __init__(self, ns: NetNS, group: int, qthresh: int, conntrack: bool = False):
        self.proc = ns.popen(
            PY, os.path.join(HERE, "capture_reader.py"), "--group", str(group), "--qthresh", str(qthresh),
            *(["--conntrack"] if conntrack else []), stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_line(self.proc, self.proc.stdout, "^ready")
        self.cpu0 = cpu_seconds(self.proc.pid)

    def stop(self) -> dict:
        cpu = cpu_seconds(self.proc.pid) - self.cpu0
        self.proc.send_signal(signal.SIGTERM)
        out = self.proc.communicate(timeout=10)[0]
        return json.loads(out.strip().splitlines()[-1]) | {"cpu": cpu}


def flood_binary() -> str:
    """bench/flood.c, compiled when missing or older than its source."""
    src = os.path.join(HERE, "flood.c")
    out = os.path.join(HERE, "results", "flood")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", out, src], check=True)
    return out


def flood(ns: NetNS, count: int, rate: float, size: int = 64, port: int = 9999) -> dict:
    res = ns.run(flood_binary(), str(count), str(rate), "127.0.0.1", str(port), str(size))
    return json.loads(res.stdout)


def settle(ns: NetNS, sent: dict) -> dict:
    """Let the readers drain, then one more packet: a loss shows once the next packet comes.

    Each wait is 1.2 s, past tcpdump's flush timer: libpcap leaves the kernel's default of 1 s.
    """
    time.sleep(1.2)
    flood(ns, 1, 0)
    time.sleep(1.2)
    return sent | {"sent": sent["sent"] + 1}


class BenchNS(NetNS):
    """The run's namespace; ``close()`` also ends every process started in it that still runs
    (a reader left behind when a part fails half-way)."""

    def __init__(self):
        super().__init__("nflbench")
        self.procs: list[subprocess.Popen] = []

    def popen(self, *cmd: str, **kw) -> subprocess.Popen:
        proc = super().popen(*cmd, **kw)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        super().close()


def namespace(ulogd: bool = False) -> NetNS:
    ns = BenchNS()
    also = f" log group {ULOGD}" if ulogd else ""
    ns.nft(
        "table inet bench {\n  chain c {\n    type filter hook output priority 0;\n"
        f"    udp dport 9999 log group {OURS} log group {THEIRS}{also}\n  }}\n}}\n"
    )
    return ns


def row(name: str, sent: int, seconds: float, ours: dict, theirs: dict, ulogd: dict | None = None) -> dict:
    us = lambda d: 1e6 * d["cpu"] / max(d["packets"], 1)  # noqa: E731
    r = {
        "case": name,
        "sent": sent,
        "rate_pps": round(sent / seconds),
        "ours_packets": ours["packets"],
        "ours_lost": sent - ours["packets"],
        "ours_us_per_pkt": round(us(ours), 3),
        "tcpdump_packets": theirs["packets"],
        "tcpdump_lost": sent - theirs["packets"],
        "tcpdump_us_per_pkt": round(us(theirs), 3),
    }
    r["cpu_ratio"] = round(r["ours_us_per_pkt"] / r["tcpdump_us_per_pkt"], 2) if theirs["cpu"] else None
    if ulogd is not None:
        r["ulogd_packets"] = ulogd["packets"]
        r["ulogd_lost"] = sent - ulogd["packets"]
        r["ulogd_us_per_pkt"] = round(us(ulogd), 3)
        r["ulogd_ratio"] = round(r["ours_us_per_pkt"] / r["ulogd_us_per_pkt"], 2) if ulogd["cpu"] else None
    for key in ("kernel_dropped", "overflows", "lost_on_feed"):
        if key in ours:
            r["ours_" + key] = ours[key]
    if "kernel_dropped" in ours:  # exact accounting: read + counted loss == sent
        r["ours_unaccounted"] = sent - ours["packets"] - ours["kernel_dropped"]
    return r


def bench_capture(args) -> list[dict]:
    """The capture reader alone (the daemon's C read path, no feed) vs tcpdump and ulogd2: a
    fixed rate, then flat out, across queue thresholds."""
    cases = [(f"fixed q={q}", q, args.rate, args.rate * 5) for q in (256, 1024)] + [
        (f"top q={q}", q, 0, args.count) for q in (16, 256, 1024)
    ]
    rows = []
    for name, qthresh, rate, count in cases:
        ns = namespace(ulogd=have_ulogd())
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            ours = CaptureReader(ns, OURS, qthresh)
            theirs = Tcpdump(ns, THEIRS)
            ulogd = Ulogd(ns, ULOGD, tmp, qthresh) if have_ulogd() else None
            sent = settle(ns, flood(ns, int(count), rate))
            u = ulogd.stop() if ulogd else None
            rows.append(row(f"capture {name}", sent["sent"], sent["seconds"], ours.stop(), theirs.stop(), u))
        finally:
            ns.close()
            shutil.rmtree(tmp, ignore_errors=True)
        print_row(rows[-1])
    return rows


def daemon_config(
    tmp: str,
    endpoint: str,
    groups: list[int] = [OURS],  # noqa: B006
    name: str = "nflogd",
    curve: dict | None = None,
    conntrack: bool = False,
) -> str:
    """The daemon's defaults, but for the groups (with ``conntrack: true`` or not), the endpoint
    (with ``curve``'s keys: CURVE on it) and no metrics server."""
    path = os.path.join(tmp, f"{name}.yaml")
    keys = (
        f"  curve:\n    secret_key_file: {curve['server_secret']}\n"
        f"    authorized_keys_dir: {curve['clients']}\n"
        if curve
        else ""
    )
    entry = "{{group: {}, conntrack: true}}" if conntrack else "{}"
    with open(path, "w") as f:
        f.write(
            "node: bench\ngroups:\n" + "".join(f"  - {entry.format(g)}\n" for g in groups)
            + f"publish:\n  bind: [{json.dumps(endpoint)}]\n{keys}metrics:\n  listen: null\n"
        )  # fmt: skip
    return path


class Daemon:
    """The real nflogd in the namespace, and a counting subscriber of every group: outside it on
    ipc (the default), or in it on a tcp ``endpoint`` (a CURVE one with ``curve``'s keys);
    ``reader=False``: none."""

    def __init__(
        self, ns: NetNS, tmp: str, latency: bool = False, groups: list[int] = [OURS],  # noqa: B006
        endpoint: str | None = None, name: str = "nflogd", curve: dict | None = None, reader: bool = True,
        filter: str | None = None, conntrack: bool = False, raw: bool = False,  # noqa: A002
    ):  # fmt: skip
        endpoint = endpoint or f"ipc://{tmp}/{name}.sock"
        cfg = daemon_config(tmp, endpoint, groups, name, curve, conntrack)
        nflogd = os.path.join(os.path.dirname(PY), "nflogd")
        self.proc = ns.popen(nflogd, "-c", cfg, stderr=subprocess.PIPE, text=True)
        wait_line(self.proc, self.proc.stderr, "capturing")
        self.sub = None
        if reader:
            cmd = [PY, os.path.join(HERE, "subscriber_count.py"), endpoint, ",".join(map(str, groups))]
            if latency:
                cmd.append("--latency")
            if filter:
                cmd += ["--filter", filter]
            if raw:
                cmd.append("--raw")
            if curve:
                cmd += ["--server-key", curve["server_public"], "--client-key", curve["reader_secret"]]
            if endpoint.startswith("tcp://"):
                self.sub = ns.popen(*cmd, stdout=subprocess.PIPE, text=True)
            else:
                self.sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
                if isinstance(ns, BenchNS):
                    ns.procs.append(self.sub)  # outside the namespace, but ended with it all the same
            wait_line(self.sub, self.sub.stdout, "^ready")
        self.cpu0 = cpu_seconds(self.proc.pid)
        self.sub_cpu0 = cpu_seconds(self.sub.pid) if self.sub is not None else 0.0

    def stop(self) -> tuple[dict, dict]:
        cpu = cpu_seconds(self.proc.pid) - self.cpu0
        if self.sub is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=10)
            return {"cpu": cpu}, {}
        sub_cpu = cpu_seconds(self.sub.pid) - self.sub_cpu0
        self.sub.send_signal(signal.SIGTERM)
        sub = json.loads(self.sub.communicate(timeout=10)[0].strip().splitlines()[-1]) | {"cpu": sub_cpu}
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=10)
        ours = {"packets": sub["packets"], "cpu": cpu, "lost_on_feed": sub["lost"]}
        return ours | {"kernel_dropped": sub["kernel_dropped"]}, sub


def bench_daemon(args) -> list[dict]:
    """The daemon and a subscriber vs tcpdump and ulogd2, end to end."""
    rows = []
    for name, rate, count in (("fixed", args.rate, args.rate * 5), ("top", 0, args.count)):
        ns = namespace(ulogd=have_ulogd())
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            daemon = Daemon(ns, tmp)
            theirs = Tcpdump(ns, THEIRS)
            ulogd = Ulogd(ns, ULOGD, tmp) if have_ulogd() else None
            sent = settle(ns, flood(ns, int(count), rate))
            u = ulogd.stop() if ulogd else None
            ours, _ = daemon.stop()
            rows.append(row(f"daemon {name}", sent["sent"], sent["seconds"], ours, theirs.stop(), u))
        finally:
            ns.close()
            shutil.rmtree(tmp, ignore_errors=True)
        print_row(rows[-1])
    return rows


#: A capture filter passing 1 % of bench/flood.c's packets: the low 16 bits of its stamp (ns).
FILTER_1PCT = "udp[14:2] < 655"


def bench_filter(args) -> list[dict]:
    """One reader of the group at the top rate, without a filter, then with one the daemon
    runs for it that passes 1 %, each in its own run, twice: with a reader that costs next to
    nothing (``subscriber_count.py --raw``: frames counted, not decoded), for the daemon's CPU
    per packet and the bytes sent to the reader, so that the reader's own CPU (a Subscriber of
    the whole group needs more than a core here) does not change how the daemon batches; then
    with a Subscriber, for the reader's own CPU per packet sent. ``--rounds`` rounds, the order
    swapped every other one so that a drift of the machine's load weighs on both sides; the
    ratios are each round's and their median."""
    rows, rounds = [], []
    for k in range(args.rounds):
        runs = [(reader, name, expr) for reader in ("raw", "subscriber") for name, expr in
                (("none", None), ("1%", FILTER_1PCT))]  # fmt: skip
        got = {}
        for reader, name, expression in runs if k % 2 == 0 else runs[::-1]:
            ns = namespace()
            tmp = tempfile.mkdtemp(prefix="nflbench-")
            try:
                daemon = Daemon(ns, tmp, filter=expression, raw=reader == "raw")
                sent = settle(ns, flood(ns, args.count, 0))
                ours, sub = daemon.stop()
            finally:
                ns.close()
                shutil.rmtree(tmp, ignore_errors=True)
            n = sent["sent"]
            got[reader, name] = r = {
                "case": f"round {k + 1} {reader} reader, filter {name}", "sent": n,
                "rate_pps": round(n / sent["seconds"]), "kernel_dropped": ours["kernel_dropped"],
                "daemon_us_per_pkt": round(1e6 * ours["cpu"] / n, 3), "reader_packets": sub["packets"],
                "reader_messages": sub["messages"], "reader_bytes": sub["bytes"],
                "reader_us_per_pkt": round(1e6 * sub["cpu"] / n, 3),
            }  # fmt: skip
            rows.append(r)
            print_row(r)
        (plain, filtered), (sub_plain, sub_filtered) = (
            (got[reader, "none"], got[reader, "1%"]) for reader in ("raw", "subscriber")
        )
        rounds.append({
            "daemon_cpu_ratio": round(filtered["daemon_us_per_pkt"] / plain["daemon_us_per_pkt"], 2),
            "bytes_ratio_pct": round(100 * filtered["reader_bytes"] / max(plain["reader_bytes"], 1), 2),
            "reader_cpu_fall": round(
                sub_plain["reader_us_per_pkt"] / max(sub_filtered["reader_us_per_pkt"], 1e-9), 1
            ),
            "daemon_cpu_ratio_subscribers": round(
                sub_filtered["daemon_us_per_pkt"] / sub_plain["daemon_us_per_pkt"], 2
            ),
        })  # fmt: skip
    ratios = {"case": f"filter 1% vs none, median of {len(rounds)}"}
    for key in rounds[0]:
        values = [r[key] for r in rounds]
        ratios[key] = round(statistics.median(values), 2)
        ratios[f"{key}_rounds"] = values
    print_row(ratios)
    return [*rows, ratios]


def bench_groups(args) -> list[dict]:
    """1, 2 and 4 busy groups, each with its own sender flat out: one daemon for all of them
    vs one tcpdump per group. Packets captured per second and CPU per packet of each side."""
    rows = []
    for n in (1, 2, 4):
        ns = BenchNS()
        ours_groups = [10 + i for i in range(n)]
        rules = "".join(f"    udp dport {9999 - i} log group {10 + i} log group {20 + i}\n" for i in range(n))
        ns.nft(
            f"table inet bench {{\n  chain c {{\n    type filter hook output priority 0;\n{rules}  }}\n}}\n"
        )
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            daemon = Daemon(ns, tmp, groups=ours_groups)
            tcpdumps = [Tcpdump(ns, 20 + i) for i in range(n)]
            each = args.count // n
            flood_cmd = [flood_binary(), str(each), "0", "127.0.0.1"]
            senders = [ns.popen(*flood_cmd, str(9999 - i), "64", stdout=subprocess.PIPE) for i in range(n)]
            outs = [json.loads(p.communicate(timeout=300)[0]) for p in senders]
            sent = sum(o["sent"] for o in outs)
            seconds = max(o["seconds"] for o in outs)
            time.sleep(1.2)  # as settle(): drain, then a packet per group shows any loss
            sent += sum(flood(ns, 1, 0, port=9999 - i)["sent"] for i in range(n))
            time.sleep(1.2)
            ours, _ = daemon.stop()
            theirs = [t.stop() for t in tcpdumps]
        finally:
            ns.close()
            shutil.rmtree(tmp, ignore_errors=True)
        tcp = {"packets": sum(t["packets"] for t in theirs), "cpu": sum(t["cpu"] for t in theirs)}
        r = row(f"groups {n}", sent, seconds, ours, tcp)
        r["ours_pps_captured"] = round(ours["packets"] / seconds)
        r["tcpdump_pps_captured"] = round(tcp["packets"] / seconds)
        rows.append(r)
        print_row(r)
    return rows


def bench_latency(args) -> list[dict]:
    """Send-to-subscriber latency at 1000 packets/s with the default config."""
    ns = namespace()
    tmp = tempfile.mkdtemp(prefix="nflbench-")
    try:
        daemon = Daemon(ns, tmp, latency=True)
        sent = flood(ns, 3000, 1000)
        time.sleep(0.5)
        ours, sub = daemon.stop()
    finally:
        ns.close()
    r = {"case": "latency 1000 pps", "sent": sent["sent"], "received": ours["packets"]} | sub["latency_ms"]
    print_row(r)
    return [r]


def bench_idle(args) -> list[dict]:
    """No traffic for 10 s: CPU per second of the daemon serving four groups and a
    subscriber, of four tcpdumps (one per group) and of ulogd2 (one group)."""
    ns = namespace(ulogd=have_ulogd())
    groups = [OURS, 4, 5, 6]
    tmp = tempfile.mkdtemp(prefix="nflbench-")
    try:
        daemon = Daemon(ns, tmp, groups=groups)
        tcpdumps = [Tcpdump(ns, g) for g in (THEIRS, 7, 8, 9)]
        ulogd = Ulogd(ns, ULOGD, tmp) if have_ulogd() else None
        time.sleep(1.0)  # past every start-up
        procs = {"ours": [daemon], "tcpdump": tcpdumps, "ulogd": [ulogd] if ulogd else []}
        first = {k: [cpu_seconds(p.proc.pid) for p in v] for k, v in procs.items()}
        seconds = 10.0
        time.sleep(seconds)
        last = {k: [cpu_seconds(p.proc.pid) for p in v] for k, v in procs.items()}
        if ulogd:
            ulogd.stop()
        for t in tcpdumps:
            t.stop()
        daemon.stop()
    finally:
        ns.close()
        shutil.rmtree(tmp, ignore_errors=True)
    r = {"case": "idle 4 groups", "seconds": seconds}
    for k in procs:
        if procs[k]:
            r[f"{k}_us_per_s"] = round(1e6 * (sum(last[k]) - sum(first[k])) / seconds, 1)
    print_row(r)
    return [r]


def bench_client(args) -> list[dict]:
    res = subprocess.run(
        [PY, os.path.join(HERE, "client_decode.py")], capture_output=True, text=True, check=True
    )
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print_row(r)
    return rows


# -- soak --------------------------------------------------------------------------------------

SOAK_GROUPS = [OURS, 4, 5, 6]  # four groups, one of them busy
SOAK_RSS_GROWTH_KIB = 8 * 1024  # over the whole run, from the first sample (after warm-up)
SOAK_RSS_FLAT_KIB = 2 * 1024  # over the second half, where it must have levelled off


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


class SoakFeed(threading.Thread):
    """A Subscriber of our group read in this process: packets, feed loss, kernel loss."""

    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        from nflogd_client import Subscriber

        self.sub = Subscriber(endpoint, groups=OURS)
        self.received = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            batch = self.sub.recv_batch(timeout=0.2)
            if batch is not None:
                self.received += len(batch.packets)

    @property
    def lost(self) -> int:
        return self.sub.total_lost

    @property
    def kernel_dropped(self) -> int:
        return sum(self.sub.kernel_dropped.values())

    def quiet(self, seconds: float = 0.5) -> None:
        last = -1
        while self.received != last:
            last = self.received
            time.sleep(seconds)

    def stop(self) -> None:
        self.halt.set()
        self.join(5)
        self.sub.close()


def bench_soak(args) -> list[dict]:
    """The daemon at a steady rate below capacity for ``--seconds``: memory and loss sampled
    every ``--interval`` seconds, a verdict at the end (exit status 1 if it fails)."""
    if args.rate <= 0 or args.seconds <= 0 or args.interval <= 0:
        sys.exit("bench soak: --rate, --seconds and --interval must be positive")
    ns = namespace()
    tmp = tempfile.mkdtemp(prefix="nflsoak-")
    rows: list[dict] = []
    try:
        endpoint = f"ipc://{tmp}/feed.sock"
        nflogd = os.path.join(os.path.dirname(PY), "nflogd")
        cfg = daemon_config(tmp, endpoint, SOAK_GROUPS)
        daemon = ns.popen(nflogd, "-c", cfg, stderr=subprocess.PIPE, text=True)
        wait_line(daemon, daemon.stderr, "capturing")
        log: list[str] = []
        drain = threading.Thread(target=lambda: log.extend(daemon.stderr), daemon=True)
        drain.start()
        feed = SoakFeed(endpoint)
        feed.start()
        time.sleep(0.5)  # the subscription reaches the daemon before the first packet
        count = int(args.rate * args.seconds)
        sender = ns.popen(
            flood_binary(), str(count), str(args.rate), "127.0.0.1", "9999", "64",
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        t0 = time.monotonic()
        while sender.poll() is None:
            time.sleep(max(0.0, t0 + (len(rows) + 1) * args.interval - time.monotonic()))
            if sender.poll() is not None:
                break
            r = {
                "case": "soak", "t_s": round(time.monotonic() - t0), "received": feed.received,
                "kernel_dropped": feed.kernel_dropped, "feed_lost": feed.lost,
                "rss_kib": proc_rss_kib(daemon.pid), "fds": len(os.listdir(f"/proc/{daemon.pid}/fd")),
            }  # fmt: skip
            rows.append(r)
            print_row(r)
        sent = json.loads(sender.communicate(timeout=30)[0])["sent"]
        feed.quiet()
        sent += flood(ns, 1, 0)["sent"]  # a kernel loss shows once the next packet arrives
        feed.quiet()
        final = {
            "sent": sent, "received": feed.received, "kernel_dropped": feed.kernel_dropped,
            "feed_lost": feed.lost, "rss_kib": proc_rss_kib(daemon.pid),
        }  # fmt: skip
        feed.stop()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        drain.join(5)
    finally:
        ns.close()
    rss = [r["rss_kib"] for r in rows] or [final["rss_kib"]]
    growth, late = rss[-1] - rss[0], rss[-1] - rss[len(rss) // 2]
    flat = growth <= SOAK_RSS_GROWTH_KIB and late <= SOAK_RSS_FLAT_KIB
    lossless = final["received"] == sent and final["kernel_dropped"] == final["feed_lost"] == 0
    verdict = {
        "case": "soak verdict", "result": "PASS" if flat and lossless else "FAIL",
        "seconds": args.seconds, "rate_pps": args.rate, **final,
        "rss_growth_kib": growth, "rss_growth_second_half_kib": late, "memory_flat": flat,
        "nothing_lost": lossless, "daemon_exit": daemon.returncode,
        "daemon_warnings": [line.strip() for line in log if not line.startswith("INFO")][:5],
    }  # fmt: skip
    print_row(verdict)
    return rows + [verdict]


PLAIN = 4  # the conntrack part: the same packets to a group without conntrack


def conntrack_for_nflog(ns: NetNS) -> bool:
    """Whether this kernel attaches connections to NFLOG (CONFIG_NETFILTER_NETLINK_GLUE_CT)."""
    res = ns.run(
        PY, "-c", "from nflogd.capture import GroupReader; from nflogd.config import GroupConfig; "
        "GroupReader(GroupConfig(group=65000, conntrack=True)).close()", check=False,
    )  # fmt: skip
    return res.returncode == 0


def bench_conntrack(args) -> list[dict]:
    """The daemon's CPU per packet with ``conntrack: true``, beside a second daemon reading the
    same packets in a group without it and beside ulogd2's NFLOG with attach_conntrack, in one
    run (each daemon with its counting subscriber)."""
    rows = []
    for name, rate, count in (("fixed", args.rate, args.rate * 5), ("top", 0, args.count)):
        ns = BenchNS()
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            if not conntrack_for_nflog(ns):
                r = {"case": "conntrack", "result": "not measured: this kernel attaches no conntrack to "
                     f"NFLOG (CONFIG_NETFILTER_NETLINK_GLUE_CT off, {os.uname().release}): bench/vm.py "
                     "runs this part under Debian's kernel"}  # fmt: skip
                print_row(r)
                return [r]
            ulogd = have_ulogd()
            also = f" log group {ULOGD}" if ulogd else ""
            ns.nft(
                "table inet bench {\n  chain c {\n    type filter hook output priority 0;\n"
                f"    udp dport 9999 log group {OURS} log group {PLAIN}{also}\n  }}\n}}\n"
            )
            os.mkdir(os.path.join(tmp, "ct"))
            os.mkdir(os.path.join(tmp, "plain"))
            with_ct = Daemon(ns, os.path.join(tmp, "ct"), groups=[OURS], conntrack=True)
            plain = Daemon(ns, os.path.join(tmp, "plain"), groups=[PLAIN])
            u = Ulogd(ns, ULOGD, tmp, conntrack=True) if ulogd else None
            sent = settle(ns, flood(ns, int(count), rate))
            uu = u.stop() if u else None
            r = row(
                f"conntrack {name}", sent["sent"], sent["seconds"], with_ct.stop()[0], plain.stop()[0], uu
            )
            # here "tcpdump_*" is the plain group: rename for the reader
            r = {
                k.replace("tcpdump_", "plain_").replace("cpu_ratio", "ct_over_plain"): v for k, v in r.items()
            }
            rows.append(r)
        finally:
            ns.close()
            shutil.rmtree(tmp, ignore_errors=True)
        print_row(rows[-1])
    return rows


def churn(ns: NetNS, stop: threading.Event, counter: list[int]) -> None:
    """Interfaces come, get renamed and go, as fast as ip(8) makes them: 3 changes a round."""
    while not stop.is_set():
        batch = "".join(
            f"link add ch{i} type veth peer name cp{i}\nlink set ch{i} name cr{i}\nlink del cr{i}\n"
            for i in range(20)
        )
        ns.run("ip", "-batch", "-", input=batch)
        counter[0] += 20 * 3  # operations: an add (of a pair), a rename, a delete


def bench_ifchurn(args) -> list[dict]:
    """The daemon's CPU with its interface table under churn: the same fixed-rate traffic
    with no interface changes, then with interfaces added, renamed and deleted meanwhile."""
    rows = []
    for name in ("quiet", "churn"):
        ns = namespace()
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            daemon = Daemon(ns, tmp)
            stop, changes = threading.Event(), [0]
            churner = threading.Thread(target=churn, args=(ns, stop, changes)) if name == "churn" else None
            if churner:
                churner.start()
            sent = flood(ns, args.rate * 5, args.rate)
            stop.set()
            if churner:
                churner.join()
            sent = settle(ns, sent)
            ours, _ = daemon.stop()
            r = {
                "case": f"ifnames {name}", "sent": sent["sent"], "received": ours["packets"],
                "lost": sent["sent"] - ours["packets"], "interface_changes": changes[0],
                "daemon_cpu_s": round(ours["cpu"], 3),
                "us_per_pkt": round(1e6 * ours["cpu"] / max(ours["packets"], 1), 3),
            }  # fmt: skip
            rows.append(r)
        finally:
            ns.close()
            shutil.rmtree(tmp, ignore_errors=True)
        print_row(rows[-1])
    if len(rows) == 2 and rows[1]["interface_changes"]:
        extra = rows[1]["daemon_cpu_s"] - rows[0]["daemon_cpu_s"]
        r = {
            "case": "ifnames cost",
            "us_per_interface_change": round(1e6 * extra / rows[1]["interface_changes"], 1),
        }
        rows.append(r)
        print_row(r)
    return rows


def curve_keys(tmp: str) -> dict:
    """The daemon's key pair and one admitted reader's, as nflogd-keygen writes them."""
    import zmq.auth

    server_dir, reader_dir, clients = (os.path.join(tmp, d) for d in ("server", "reader", "clients"))
    for d in (server_dir, reader_dir, clients):
        os.makedirs(d)
    server_public, server_secret = zmq.auth.create_certificates(server_dir, "server")
    reader_public, reader_secret = zmq.auth.create_certificates(reader_dir, "reader")
    shutil.copy(reader_public, clients)
    return {"server_public": server_public, "server_secret": server_secret, "clients": clients,
            "reader_secret": reader_secret}  # fmt: skip


def box_cost_binary() -> str:
    """bench/box_cost.c (libsodium), compiled when missing or older than its source."""
    src = os.path.join(HERE, "box_cost.c")
    out = os.path.join(HERE, "results", "box_cost")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-o", out, src, "-lsodium"], check=True)
    return out


def bench_curve(args) -> list[dict]:
    """What one reader costs the daemon per message, CURVE beside NULL, on the same packets.

    Three daemons read the same packets (one nft rule logs each to three groups), each with
    its own group: one with no reader, one with a NULL reader and one with a CURVE reader, each
    on loopback tcp in the namespace. A reader's cost is its daemon's CPU less the readerless
    one's, per message its reader received. The encryption alone (``bench/box_cost.c``: the
    frames of a message of the same size boxed as ``_peers.c`` boxes them) is subtracted from
    the CURVE reader's: ``ratio`` is what CURVE costs beyond the encryption over a NULL reader.

    ``--rounds`` rounds of 10 s, each in a fresh namespace, the three roles passed round the
    three groups from one round to the next: the place the rule logs a group in shows in what
    its daemon costs, so a multiple of 3 rounds gives each role each place as often. One row per
    round, then their means, and ``ratio`` of the means (every round counts, none is dropped).
    """
    rows = []
    seconds = 10
    for k in range(args.rounds):
        groups = [ULOGD, OURS, THEIRS][k % 3 :] + [ULOGD, OURS, THEIRS][: k % 3]  # none, null, curve
        ns = namespace(ulogd=True)  # the third group: the daemon without a reader
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            keys = curve_keys(tmp)
            none = Daemon(ns, tmp, groups=[groups[0]], name="none", reader=False)
            null = Daemon(ns, tmp, groups=[groups[1]], endpoint="tcp://127.0.0.1:5601", name="null")
            cur = Daemon(
                ns, tmp, groups=[groups[2]], endpoint="tcp://127.0.0.1:5602", name="curve", curve=keys
            )
            sent = settle(ns, flood(ns, args.rate * seconds, args.rate))
            base, _ = none.stop()
            n, n_sub = null.stop()
            c, c_sub = cur.stop()
        finally:
            ns.close()
            shutil.rmtree(tmp, ignore_errors=True)
        base_us_per_pkt = 1e6 * base["cpu"] / sent["sent"]  # the kernel drops none at this rate

        def reader_us_per_msg(d: dict, sub: dict, base_us: float = base_us_per_pkt) -> float:
            return (1e6 * d["cpu"] / max(d["packets"], 1) - base_us) * d["packets"] / max(sub["messages"], 1)

        ppm = c["packets"] / max(c_sub["messages"], 1)  # packets per message, the CURVE reader's
        # one message's frames: topic, header + node name "bench", records, data (IPv4 + UDP + 64 bytes)
        sizes = [2, 45, round(88 * ppm), round((28 + 64) * ppm)]
        box = subprocess.run(
            [box_cost_binary(), "20000", *map(str, sizes)], capture_output=True, text=True, check=True
        )
        box_us = float(box.stdout) / 1000
        null_us, curve_us = reader_us_per_msg(n, n_sub), reader_us_per_msg(c, c_sub)
        r = {
            "case": f"one reader at {args.rate}/s",
            "round": k + 1,
            "groups": "/".join(map(str, groups)),
            "sent": sent["sent"],
            "packets_per_msg": round(ppm, 1),
            "null_msgs": n_sub["messages"],
            "curve_msgs": c_sub["messages"],
            "null_lost": sent["sent"] - n["packets"],
            "curve_lost": sent["sent"] - c["packets"],
            "daemon_no_reader_us_per_pkt": round(base_us_per_pkt, 3),
            "null_reader_us_per_msg": round(null_us, 1),
            "curve_reader_us_per_msg": round(curve_us, 1),
            "encryption_us_per_msg": round(box_us, 1),
            "ratio": round((curve_us - box_us) / null_us, 2) if null_us > 0 else None,
        }
        rows.append(r)
        print_row(r)
    if len(rows) > 1:
        mean = {"case": f"mean of {len(rows)} rounds"}
        for key in ("null_reader_us_per_msg", "curve_reader_us_per_msg", "encryption_us_per_msg"):
            mean[key] = round(statistics.fmean(r[key] for r in rows), 1)
        null_us, curve_us, box_us = (
            mean[k] for k in ("null_reader_us_per_msg", "curve_reader_us_per_msg", "encryption_us_per_msg")
        )
        mean["ratio"] = round((curve_us - box_us) / null_us, 2) if null_us > 0 else None
        mean["rounds_ratios"] = ",".join(str(r["ratio"]) for r in rows)
        rows.append(mean)
        print_row(mean)
    return rows


#: The forwarder a relay built on libzmq's XPUB cannot beat: zmq.proxy(XPUB, XSUB) in C.
PROXY = (
    "import sys, zmq\n"
    "ctx = zmq.Context()\n"
    "front, back = ctx.socket(zmq.XPUB), ctx.socket(zmq.XSUB)\n"
    "front.bind(sys.argv[1])\n"
    "for ep in sys.argv[2:]:\n"
    "    back.connect(ep)\n"
    "zmq.proxy(front, back)\n"
)


def bench_relay(args) -> list[dict]:
    """nflogd-relay's CPU per packet with 8 routers at ``--rate`` packets/s each (messages of 200
    packets, as a daemon's flush timer cuts them), one reader; beside it zmq.proxy(XPUB, XSUB)
    at the same load in the same run (libzmq's forwarder in C, no counting or marks).

    ``--rounds`` rounds, the forwarders taking turns (10 s each); one row per forwarder and
    round, then each forwarder's mean and the ratio of the means. ``--relay-before DIR``: an
    older tree's relay as a third forwarder."""
    rows = []
    routers, packets, seconds = 8, 200, 10
    tmp = tempfile.mkdtemp(prefix="nflbench-")
    relay = os.path.join(os.path.dirname(PY), "nflogd-relay")
    ups = [f"ipc://{tmp}/router{i}.sock" for i in range(routers)]
    kinds = ["nflogd-relay", "zmq.proxy"] + (["nflogd-relay before"] if args.relay_before else [])
    try:
        for k in range(args.rounds):
            for kind in kinds:
                before = args.relay_before if kind == "nflogd-relay before" else None
                rows.append(relay_round(kind, k + 1, relay, ups, tmp, args.rate, packets, seconds, before))
                print_row(rows[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {}
    for kind in kinds:
        mine = [r for r in rows if r["forwarder"] == kind]
        med[kind] = round(statistics.fmean(r["cpu_us_per_pkt"] for r in mine), 3)
        if len(mine) > 1:
            rows.append({"forwarder": kind, "mean_of_rounds": len(mine), "cpu_us_per_pkt": med[kind],
                         "cpu_us_per_msg": round(statistics.fmean(r["cpu_us_per_msg"] for r in mine), 1),
                         "reader_lost": sum(r["reader_lost"] for r in mine)})  # fmt: skip
            print_row(rows[-1])
    ratio = round(med["nflogd-relay"] / med["zmq.proxy"], 2)
    rows[0]["vs_zmq_proxy"] = ratio
    print(f"nflogd-relay / zmq.proxy CPU per packet: {ratio}", flush=True)
    if args.relay_before:
        rows[0]["vs_before"] = round(med["nflogd-relay"] / med["nflogd-relay before"], 2)
        print(f"nflogd-relay / nflogd-relay before CPU per packet: {rows[0]['vs_before']}", flush=True)
    return rows


def relay_round(kind: str, k: int, relay: str, ups: list[str], tmp: str, rate: int, packets: int,
                seconds: float, before: str | None = None) -> dict:  # fmt: skip
    """One forwarder, one reader and the routers for ``seconds``: the forwarder's CPU. ``before``:
    the relay is ``python -m nflogd.relay`` of that tree (its module built in place)."""
    routers = len(ups)
    down = f"ipc://{tmp}/{kind}.sock"
    feeds = subprocess.Popen(
        [PY, os.path.join(HERE, "routers.py"), *ups, "--rate", str(rate), "--packets", str(packets)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    end = time.monotonic() + 10
    while not all(os.path.exists(up[len("ipc://") :]) for up in ups):  # bound: no retries
        assert time.monotonic() < end and feeds.poll() is None, "the routers did not start"
        time.sleep(0.05)
    if kind.startswith("nflogd-relay"):
        cfg = os.path.join(tmp, "relay.yaml")
        with open(cfg, "w") as f:
            f.write(f"upstreams: {json.dumps(ups)}\npublish: {{bind: {json.dumps(down)}}}\n")
            f.write("metrics: {listen: null}\n")
        argv = [relay] if before is None else [PY, "-m", "nflogd.relay"]
        env = None if before is None else os.environ | {"PYTHONPATH": f"{before}:{before}/client"}
        # error level: the routers' end is no news
        fwd = subprocess.Popen([*argv, "-c", cfg, "--log-level", "error"], env=env, cwd=before)
    else:
        fwd = subprocess.Popen([PY, "-c", PROXY, down, *ups])
    reader = subprocess.Popen(
        [PY, os.path.join(HERE, "subscriber_count.py"), down, "1"], stdout=subprocess.PIPE, text=True
    )
    try:
        wait_line(reader, reader.stdout, "^ready")
        wait_line(feeds, feeds.stdout, "^ready")
        cpu0 = cpu_seconds(fwd.pid)
        time.sleep(seconds)
        feeds.send_signal(signal.SIGTERM)
        out = json.loads(feeds.communicate(timeout=10)[0].strip().splitlines()[-1])
        time.sleep(0.5)
        cpu = cpu_seconds(fwd.pid) - cpu0
        reader.send_signal(signal.SIGTERM)
        got = json.loads(reader.communicate(timeout=10)[0].strip().splitlines()[-1])
    finally:
        for p in (feeds, reader, fwd):
            if p.poll() is None:
                p.kill()
                p.wait(5)
        for up in ups:  # the next round's routers bind them again
            with contextlib.suppress(FileNotFoundError):
                os.unlink(up[len("ipc://") :])
    return {
        "forwarder": kind,
        "round": k,
        "routers": routers,
        "pps_per_router": rate,
        "packets_per_msg": packets,
        "packets": out["packets"],
        "reader_lost": out["packets"] - got["packets"],
        "cpu_us_per_pkt": round(1e6 * cpu / out["packets"], 3),
        "cpu_us_per_msg": round(1e6 * cpu / out["messages"], 1),
    }


def print_row(r: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)


PARTS = {
    "capture": bench_capture, "daemon": bench_daemon, "groups": bench_groups,
    "latency": bench_latency, "idle": bench_idle, "client": bench_client,
    "conntrack": bench_conntrack, "ifchurn": bench_ifchurn, "filter": bench_filter, "curve": bench_curve,
    "relay": bench_relay,
}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", choices=[*PARTS, "soak", []], help="default: all but soak")
    ap.add_argument(
        "--rate", type=int, default=20000, help="the fixed rate, packets/s (5 s of it; soak: all along)"
    )
    ap.add_argument("--count", type=int, default=1000000, help="packets sent flat out")
    ap.add_argument(
        "--relay-before",
        metavar="DIR",
        help="relay: also an older tree's relay (git archive of a commit, its module built in place)",
    )
    ap.add_argument(
        "--rounds", type=int, default=6,
        help="filter, curve, relay: rounds, interleaved (filter: then each ratio's median; curve, relay: the"
        " means)",
    )  # fmt: skip
    ap.add_argument("--seconds", type=float, default=3600, help="soak: how long (default one hour)")
    ap.add_argument("--interval", type=float, default=60, help="soak: seconds between samples")
    ap.add_argument(
        "--results", help="the results file in bench/results (default latest.json, soak.json for a soak)"
    )
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    for part in args.parts or PARTS:
        print(f"== {part}", flush=True)
        results[part] = (PARTS | {"soak": bench_soak})[part](args)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    # a soak alone keeps its own file, so that it does not replace the comparison figures
    name = args.results or ("soak.json" if args.parts == ["soak"] else "latest.json")
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(results, f, indent=1)
    if any(r.get("result") == "FAIL" for r in results.get("soak", [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
