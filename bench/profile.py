"""Where the daemon's CPU goes per kernel batch: ``perf record`` and ``strace -c`` on the real daemon.

    .venv/bin/python bench/profile.py                 # 20,000 packets/s for 5 s (make profile)
    .venv/bin/python bench/profile.py --rate 0        # flat out

The daemon runs with its defaults (one group, an ipc feed, one counting subscriber) in a
namespace made for the run, as ``bench/run.py daemon`` does. Three passes over the same
traffic, so that neither tool disturbs the other's figures: ``perf record -g`` over every
thread of the daemon (then ``perf report --sort dso`` and the top symbols), and
``strace -c -f`` for system calls per kernel batch; a first pass with no tool attached gives
each thread's CPU and wake-ups per feed message, from /proc. The batch count comes from the
subscriber (messages received). Output: stdout, and bench/results/profile.txt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402


def threads(pid: int) -> dict[str, tuple[str, int, int]]:
    """tid -> (name, CPU ns, voluntary context switches) of every thread of a process."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        with open(f"{base}/comm") as f:
            name = f.read().strip()
        with open(f"{base}/schedstat") as f:
            cpu = int(f.read().split()[0])
        with open(f"{base}/status") as f:
            switches = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        out[tid] = (name, cpu, switches)
    return out


def one_pass(tool: list[str], rate: int, seconds: float) -> tuple[str, dict, dict]:
    """Daemon + subscriber in a fresh namespace; ``tool`` (or nothing) is attached to the
    daemon for the flood. The result has each thread's CPU and wake-ups over the flood."""
    ns = run.namespace()
    tmp = tempfile.mkdtemp(prefix="nflprof-")
    out = os.path.join(tmp, "tool.out")
    try:
        daemon = run.Daemon(ns, tmp)
        pid = daemon.proc.pid
        cmd = [part.replace("{pid}", str(pid)).replace("{out}", out) for part in tool]
        attached = (
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            if cmd
            else None
        )
        time.sleep(1.0)  # perf and strace attach before the first packet
        before = threads(pid)
        count = int(rate * seconds) if rate else 1_000_000
        sent = run.flood(ns, count, rate)
        time.sleep(0.5)
        after = threads(pid)
        err = ""
        if attached is not None:
            attached.send_signal(2)  # SIGINT: both tools write their summary and detach
            err = attached.communicate(timeout=120)[1]
        ours, sub = daemon.stop()
    finally:
        ns.close()
    text = err
    if os.path.exists(out):
        with open(out) as f:
            text = f.read() + text
    shutil.rmtree(tmp, ignore_errors=True)
    per_thread = {
        tid: (name, cpu - before.get(tid, (name, 0, 0))[1], sw - before.get(tid, (name, 0, 0))[2])
        for tid, (name, cpu, sw) in after.items()
    }
    return text, sent, sub | ours | {"threads": per_thread}


def perf_report(data: str) -> str:
    def report(*extra: str) -> str:
        res = subprocess.run(
            ["perf", "report", "-i", data, "--stdio", "--no-children", "--percent-limit", "1", *extra],
            capture_output=True, text=True,
        )  # fmt: skip
        return "\n".join(line for line in res.stdout.splitlines() if line and not line.startswith("#"))

    return report("--sort", "dso", "-g", "none") + "\n\n" + report("--sort", "dso,sym", "-g", "none")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=int, default=20000, help="packets/s; 0 sends 1,000,000 flat out")
    ap.add_argument("--seconds", type=float, default=5)
    a = ap.parse_args()
    for tool in ("perf", "strace"):
        if not shutil.which(tool):
            sys.exit(f"bench/profile.py: {tool} not found (make bench installs it)")
    lines = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    _, sent, got = one_pass([], a.rate, a.seconds)
    batches = max(got.get("messages", 0), 1)
    say(f"== per thread, no tool attached: {got['packets']} packets in {batches} feed messages")
    for _, (name, cpu, switches) in sorted(got["threads"].items()):
        per_msg, wakeups = cpu / 1e3 / batches, switches / batches
        say(f"{name:16s} CPU {per_msg:7.1f} us per message, {wakeups:5.2f} wake-ups per message")
    data = os.path.join(HERE, "results", "perf.data")
    os.makedirs(os.path.dirname(data), exist_ok=True)
    _, sent, got = one_pass(["perf", "record", "-q", "-g", "-o", data, "-p", "{pid}"], a.rate, a.seconds)
    batches = max(got.get("messages", 0), 1)
    say(f"== perf: {sent['sent']} packets sent, {got['packets']} received in {batches} feed messages")
    per_msg, per_pkt = got["cpu"] * 1e6 / batches, got["cpu"] * 1e6 / max(got["packets"], 1)
    say(f"daemon CPU {per_msg:.0f} us per message, {per_pkt:.3f} us per packet")
    say(perf_report(data))
    text, sent, got = one_pass(["strace", "-c", "-f", "-o", "{out}", "-p", "{pid}"], a.rate, a.seconds)
    batches = max(got.get("messages", 0), 1)
    say(f"\n== strace -c -f: {got['packets']} packets in {batches} feed messages")
    for line in text.splitlines():
        cols = line.split()
        if len(cols) >= 5 and cols[3].isdigit():
            say(f"{line}    ({int(cols[3]) / batches:.1f} per message)")
        elif line.strip():
            say(line)
    with open(os.path.join(HERE, "results", "profile.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
