"""nflogd's bench: nflogd side by side with ``tcpdump -i nflog:N -w /dev/null`` on the same traffic.

One nft rule logs every packet to two groups, ours and tcpdump's, so both read the very
same packets in the same run. Figures are ratios and per-packet costs, never pass/fail.

    .venv/bin/python bench/run.py               # everything (make bench)
    .venv/bin/python bench/run.py capture       # one part: capture, daemon, latency, client
    .venv/bin/python bench/run.py soak --seconds 3600 --interval 60   # not part of "all"

The soak runs the daemon at ``--rate`` (below capacity) for ``--seconds``, prints its RSS,
open files and loss every ``--interval`` seconds, and a verdict: memory flat and nothing
lost, or exit status 1. It writes bench/results/soak.json.

Traffic stays on the loopback of a namespace made for the run and deleted after it.
Results go to stdout and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
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
OURS, THEIRS = 1, 2  # the groups: ours, tcpdump's


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, every thread) of a live process, in ns precision from schedstat."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def wait_line(proc: subprocess.Popen, stream, pattern: str, timeout: float = 10) -> str:
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


class CaptureReader:
    """bench/capture_reader.py: our capture reader alone."""

    def __init__(self, ns: NetNS, group: int, qthresh: int):
        self.proc = ns.popen(
            PY, os.path.join(HERE, "capture_reader.py"), "--group", str(group), "--qthresh", str(qthresh),
            stdout=subprocess.PIPE, text=True,
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


def flood(ns: NetNS, count: int, rate: float, size: int = 64) -> dict:
    res = ns.run(flood_binary(), str(count), str(rate), "127.0.0.1", "9999", str(size))
    return json.loads(res.stdout)


def settle(ns: NetNS, sent: dict) -> dict:
    """Let the readers drain, then one more packet: a loss shows once the next packet comes.

    Each wait is 1.2 s, past tcpdump's flush timer: libpcap leaves the kernel's default of 1 s.
    """
    time.sleep(1.2)
    flood(ns, 1, 0)
    time.sleep(1.2)
    return sent | {"sent": sent["sent"] + 1}


def namespace() -> NetNS:
    ns = NetNS("nflbench")
    ns.nft(
        "table inet bench {\n  chain c {\n    type filter hook output priority 0;\n"
        f"    udp dport 9999 log group {OURS} log group {THEIRS}\n  }}\n}}\n"
    )
    return ns


def row(name: str, sent: int, seconds: float, ours: dict, theirs: dict) -> dict:
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
    for key in ("kernel_dropped", "overflows", "lost_on_feed"):
        if key in ours:
            r["ours_" + key] = ours[key]
    if "kernel_dropped" in ours:  # exact accounting: read + counted loss == sent
        r["ours_unaccounted"] = sent - ours["packets"] - ours["kernel_dropped"]
    return r


def bench_capture(args) -> list[dict]:
    """The capture reader vs tcpdump: a fixed rate, then flat out, across queue thresholds."""
    cases = [(f"fixed q={q}", q, args.rate, args.rate * 5) for q in (64, 256)] + [
        (f"top q={q}", q, 0, args.count) for q in (1, 16, 64, 256)
    ]
    rows = []
    for name, qthresh, rate, count in cases:
        ns = namespace()
        try:
            ours = CaptureReader(ns, OURS, qthresh)
            theirs = Tcpdump(ns, THEIRS)
            sent = settle(ns, flood(ns, int(count), rate))
            rows.append(row(f"capture {name}", sent["sent"], sent["seconds"], ours.stop(), theirs.stop()))
        finally:
            ns.close()
        print_row(rows[-1])
    return rows


def daemon_config(tmp: str, endpoint: str) -> str:
    """The daemon's defaults, but for the endpoint and no metrics server."""
    path = os.path.join(tmp, "nflogd.yaml")
    with open(path, "w") as f:
        f.write(
            f"node: bench\ngroups:\n  - {OURS}\n"
            f"publish:\n  bind: [{json.dumps(endpoint)}]\nmetrics:\n  listen: null\n"
        )
    return path


class Daemon:
    """The real nflogd in the namespace, and a counting subscriber outside it (ipc)."""

    def __init__(self, ns: NetNS, tmp: str, latency: bool = False):
        endpoint = f"ipc://{tmp}/feed.sock"
        cfg = daemon_config(tmp, endpoint)
        nflogd = os.path.join(os.path.dirname(PY), "nflogd")
        self.proc = ns.popen(
            *os.environ.get("NFLOGD_WRAP", "").split(), nflogd, "-c", cfg, stderr=subprocess.PIPE, text=True
        )
        wait_line(self.proc, self.proc.stderr, "capturing")
        cmd = [PY, os.path.join(HERE, "subscriber_count.py"), endpoint, str(OURS)]
        if latency:
            cmd.append("--latency")
        self.sub = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        wait_line(self.sub, self.sub.stdout, "^ready")
        self.cpu0 = cpu_seconds(self.proc.pid)

    def stop(self) -> tuple[dict, dict]:
        cpu = cpu_seconds(self.proc.pid) - self.cpu0
        self.sub.send_signal(signal.SIGTERM)
        sub = json.loads(self.sub.communicate(timeout=10)[0].strip().splitlines()[-1])
        self.proc.send_signal(signal.SIGTERM)
        self.proc.communicate(timeout=10)
        return {"packets": sub["packets"], "cpu": cpu, "lost_on_feed": sub["lost"]}, sub


def bench_daemon(args) -> list[dict]:
    """The daemon and a subscriber vs tcpdump, end to end."""
    rows = []
    for name, rate, count in (("fixed", args.rate, args.rate * 5), ("top", 0, args.count)):
        ns = namespace()
        tmp = tempfile.mkdtemp(prefix="nflbench-")
        try:
            daemon = Daemon(ns, tmp)
            theirs = Tcpdump(ns, THEIRS)
            sent = settle(ns, flood(ns, int(count), rate))
            ours, _ = daemon.stop()
            rows.append(row(f"daemon {name}", sent["sent"], sent["seconds"], ours, theirs.stop()))
        finally:
            ns.close()
        print_row(rows[-1])
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


def bench_client(args) -> list[dict]:
    res = subprocess.run(
        [PY, os.path.join(HERE, "client_decode.py")], capture_output=True, text=True, check=True
    )
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    for r in rows:
        print_row(r)
    return rows


# -- soak --------------------------------------------------------------------------------------

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
        daemon = ns.popen(nflogd, "-c", daemon_config(tmp, endpoint), stderr=subprocess.PIPE, text=True)
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


def print_row(r: dict) -> None:
    print("  ".join(f"{k}={v}" for k, v in r.items()), flush=True)


PARTS = {"capture": bench_capture, "daemon": bench_daemon, "latency": bench_latency, "client": bench_client}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parts", nargs="*", choices=[*PARTS, "soak", []], help="default: all but soak")
    ap.add_argument(
        "--rate", type=int, default=20000, help="the fixed rate, packets/s (5 s of it; soak: all along)"
    )
    ap.add_argument("--count", type=int, default=1000000, help="packets sent flat out")
    ap.add_argument("--seconds", type=float, default=3600, help="soak: how long (default one hour)")
    ap.add_argument("--interval", type=float, default=60, help="soak: seconds between samples")
    args = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "kernel": os.uname().release}}
    for part in args.parts or PARTS:
        print(f"== {part}", flush=True)
        results[part] = (PARTS | {"soak": bench_soak})[part](args)
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    # a soak alone keeps its own file, so that it does not replace the comparison figures
    name = "soak.json" if args.parts == ["soak"] else "latest.json"
    with open(os.path.join(HERE, "results", name), "w") as f:
        json.dump(results, f, indent=1)
    if any(r.get("result") == "FAIL" for r in results.get("soak", [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
