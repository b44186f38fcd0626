"""Where nflogd-relay's CPU goes per message at a steady rate: per thread, ``perf record`` and
``strace -c`` on the real relay, with its JetStream path or its ZeroMQ path alone.

    .venv/bin/python bench/profile_relay.py                     # JetStream, 5,000 messages/s
    .venv/bin/python bench/profile_relay.py --zmq --packets 16  # the ZeroMQ path alone

The relay has one upstream (``bench/jetstream.py``'s publisher: feed messages of 100-byte
packets at ``--rate`` messages/s) and, with ``--zmq``, one counting SUB downstream; otherwise a
jetstream section and a nats-server of its own (file storage, a temporary store), no SUB. Three
passes over the same traffic, so that neither tool disturbs the other's figures: one with no
tool attached (each thread's CPU and wake-ups per message, from /proc), one under
``perf record -g`` (``perf report`` by thread and library, then the top symbols), one under
``strace -c -f`` (system calls per message, every thread). The relay runs as
``python -m nflogd.relay``, so ``PYTHONPATH`` can point it at another tree of the code (an
older commit's, to compare). Output: stdout, and bench/results/profile-relay.txt.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import jetstream as js  # noqa: E402, I001  bench/jetstream.py: its publisher, nats-server and helpers
import profile as prof  # noqa: E402  bench/profile.py: threads() and perf_report()


def label(pid: int, tid: str, name: str) -> str:
    if tid == str(pid):
        return "control loop"
    if name.startswith("ZMQbg/IO"):
        return "ZeroMQ I/O"
    if name.startswith("ZMQbg"):
        return name
    if name.startswith("nflogd-upstream"):
        return "upstreams thread"  # feed/_upstream.c, when there is no stream publisher
    return "stream publisher"  # the one other Python thread (nflogd/streampub.py)


def one_pass(tool: list[str], a: argparse.Namespace, tmp: str) -> tuple[str, int, dict]:
    """The relay fed ``a.messages`` at ``a.rate``; ``tool`` (or nothing) attached to it. Returns
    the tool's output, the messages passed on, and each thread's CPU and wake-ups."""
    run = tempfile.mkdtemp(dir=tmp)
    os.chmod(run, 0o755)
    up, down = f"ipc://{run}/up.sock", f"ipc://{run}/down.sock"
    section, srv, url = "", None, ""
    if not a.zmq:
        port = js.free_port()
        conf = Path(run) / "nats.conf"
        conf.write_text(f'listen: 127.0.0.1:{port}\njetstream {{ store_dir: "{run}/store" }}\n')
        null = subprocess.DEVNULL
        srv = subprocess.Popen([str(js.NATS), "-c", str(conf)], stdout=null, stderr=null)
        url = f"nats://127.0.0.1:{port}"
        section = f"jetstream: {{servers: '{url}', buffer_bytes: {1 << 30}}}\n"
        time.sleep(0.5)
    cfg = Path(run) / "relay.yaml"
    cfg.write_text(f"upstreams: ['{up}']\npublish: {{bind: '{down}'}}\nmetrics: {{listen: null}}\n{section}")
    # run where no nflogd tree is, so that PYTHONPATH, not the working directory, picks the code
    relay = subprocess.Popen(
        [sys.executable, "-m", "nflogd.relay", "-c", str(cfg), "--log-level", "error"], cwd=run
    )
    out = os.path.join(run, "tool.out")
    attached = None
    sub = ctx = None
    try:
        time.sleep(1.0)
        if a.zmq:
            import zmq

            ctx = zmq.Context()
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.connect(down)
            sub.setsockopt(zmq.SUBSCRIBE, b"")
            time.sleep(0.5)
        cmd = [part.replace("{pid}", str(relay.pid)).replace("{out}", out) for part in tool]
        if cmd:
            attached = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)  # perf and strace attach before the first message
        before = prof.threads(relay.pid)
        pub = mp.Process(target=js.publisher, args=(up, a.packets, a.messages, a.rate), daemon=True)
        pub.start()
        n = 0
        if sub is not None:
            while n < a.messages and sub.poll(5000):
                sub.recv_multipart()
                n += 1
        else:
            deadline = time.monotonic() + 120
            while n < a.messages and time.monotonic() < deadline:
                time.sleep(0.1)
                n = js.stored(url)
        after = prof.threads(relay.pid)
        pub.kill()
        err = ""
        if attached is not None:
            attached.send_signal(signal.SIGINT)  # both tools write their summary and detach
            err = attached.communicate(timeout=120)[1]
    finally:
        if sub is not None:
            sub.close(linger=0)
            ctx.term()
        relay.send_signal(signal.SIGTERM)
        relay.wait(20)
        if srv is not None:
            srv.terminate()
            srv.wait()
    text = err
    if os.path.exists(out):
        text = Path(out).read_text() + text
    per_thread = {}
    for tid, (name, cpu, sw) in after.items():
        _, cpu0, sw0 = before.get(tid, (name, 0, 0))
        per_thread[label(relay.pid, tid, name)] = (cpu - cpu0, sw - sw0)
    return text, n, per_thread


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=5000, help="messages/s into the relay")
    ap.add_argument("--messages", type=int, default=15000)
    ap.add_argument("--packets", type=int, default=1, help="packets per message")
    ap.add_argument("--zmq", action="store_true", help="the ZeroMQ path alone: no jetstream section")
    a = ap.parse_args()
    for tool in ("perf", "strace"):
        if not shutil.which(tool):
            sys.exit(f"bench/profile_relay.py: {tool} not found (make bench-debs installs it)")
    if not a.zmq and not js.NATS.exists():
        sys.exit(f"{js.NATS}: missing; make deps puts nats-server there")
    lines: list[str] = []

    def say(text: str = "") -> None:
        print(text, flush=True)
        lines.append(text)

    path = "ZeroMQ" if a.zmq else "JetStream"
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        _, n, threads = one_pass([], a, tmp)
        say(f"== {path} path, {a.rate:g} messages/s, {a.packets} packets/message: {n} messages, no tool")
        total = 0.0
        for name, (cpu, switches) in sorted(threads.items()):
            per_msg = cpu / 1e3 / max(n, 1)
            total += per_msg
            wakeups = switches / max(n, 1)
            say(f"{name:18s} CPU {per_msg:6.1f} us per message, {wakeups:5.2f} wake-ups per message")
        say(f"{'relay':18s} CPU {total:6.1f} us per message")
        data = str(results / "perf-relay.data")
        _, n, _ = one_pass(["perf", "record", "-q", "-g", "-o", data, "-p", "{pid}"], a, tmp)
        say(f"\n== perf record -g: {n} messages (pid:thread; the control loop's tid is the pid)")
        res = subprocess.run(
            ["perf", "report", "-i", data, "--stdio", "--no-children", "--percent-limit", "1",
             "--sort", "pid,dso", "-g", "none"],
            capture_output=True, text=True,
        )  # fmt: skip
        say("\n".join(line for line in res.stdout.splitlines() if line and not line.startswith("#")))
        say(prof.perf_report(data).split("\n\n", 1)[-1])
        text, n, _ = one_pass(["strace", "-c", "-f", "-o", "{out}", "-p", "{pid}"], a, tmp)
        say(f"\n== strace -c -f: {n} messages")
        for line in text.splitlines():
            cols = line.split()
            if len(cols) >= 5 and cols[3].isdigit():
                say(f"{line}    ({int(cols[3]) / max(n, 1):.2f} per message)")
            elif line.strip() and not line.startswith("strace:"):
                say(line)
    (results / "profile-relay.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
