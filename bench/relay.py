"""nflogd-relay against zmq.proxy: messages per second through each, and relay CPU per message.

    .venv/bin/python bench/relay.py [--seconds 3] [--packets 1,16,256]

One publisher process sends prebuilt feed messages (``wire.encode``, 100-byte packets, N per
message) on an ipc XPUB with XPUB_NODROP, so it waits at the high-water mark instead of dropping;
the forwarder under test (``nflogd-relay`` with one upstream, or a bare ``zmq.proxy(XPUB, XSUB)``)
passes them to one SUB process that counts without decoding. Printed per row: messages and
packets per second at the subscriber, messages lost on the way (the relay drops for a client
that lags, as the daemon does), and the forwarder's CPU time per message (/proc/PID/stat).
All three processes share the machine's cores, so compare rows of one run, not across machines.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
from nflogd_client import wire
from nflogd_client.wire import Packet

REPO = Path(__file__).resolve().parent.parent
RELAY = REPO / ".venv" / "bin" / "nflogd-relay"


def publisher(endpoint: str, packets: int, seconds: float) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.bind(endpoint)
    sock.recv()  # the forwarder's subscription
    batch = [Packet.build(1, bytes(100), 1_700_000_000_000_000_000 + i) for i in range(packets)]
    # built once, sent again and again: the publisher must outrun the forwarder
    msg = [zmq.Frame(f) for f in wire.encode(1, "router1", 1, 0, batch)]
    time.sleep(0.3)
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(100):
            sock.send_multipart(msg, copy=False)
        sent += 100
    sock.send_multipart([b"\xff\xff", b"END", str(sent).encode(), b""])
    time.sleep(1)


def subscriber(endpoint: str, out) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.connect(endpoint)
    sock.subscribe(b"")
    n = 0
    t0 = None
    while True:
        msg = sock.recv_multipart(copy=False)
        if t0 is None:
            t0 = time.perf_counter()
        if msg[0].bytes == b"\xff\xff":
            break
        n += 1
    out.send((n, time.perf_counter() - t0, int(msg[2].bytes)))


def proxy(up: str, down: str) -> None:
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.XPUB), ctx.socket(zmq.XSUB)
    front.bind(down)
    back.connect(up)
    zmq.proxy(front, back)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(kind: str, packets: int, seconds: float, tmp: str) -> dict:
    up, down = f"ipc://{tmp}/up.sock", f"ipc://{tmp}/down.sock"
    if kind == "nflogd-relay":
        cfg = Path(tmp) / "relay.yaml"
        cfg.write_text(f"upstreams: ['{up}']\npublish: {{bind: '{down}'}}\nmetrics: {{listen: null}}\n")
        cmd = [str(RELAY)] if RELAY.exists() else [sys.executable, "-m", "nflogd.relay"]
        fwd = subprocess.Popen([*cmd, "-c", str(cfg), "--log-level", "warning"])
        pid, stop = fwd.pid, fwd.terminate
    else:
        p = mp.Process(target=proxy, args=(up, down), daemon=True)
        p.start()
        pid, stop = p.pid, p.kill
    time.sleep(0.5)
    recv_end, send_end = mp.Pipe(False)
    sub = mp.Process(target=subscriber, args=(down, send_end))
    sub.start()
    time.sleep(0.3)
    pub = mp.Process(target=publisher, args=(up, packets, seconds), daemon=True)
    cpu0 = cpu_seconds(pid)
    pub.start()
    n, elapsed, sent = recv_end.recv()
    cpu = cpu_seconds(pid) - cpu0
    sub.join()
    pub.kill()
    stop()
    return {
        "forwarder": kind,
        "packets/msg": packets,
        "msgs/s": round(n / elapsed),
        "packets/s": round(n * packets / elapsed),
        "lost msgs": sent - n,
        "cpu us/msg": round(cpu / n * 1e6, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--packets", default="1,16,256", help="packets per message, comma-separated")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for packets in (int(x) for x in a.packets.split(",")):
            for kind in ("zmq.proxy", "nflogd-relay"):
                rows.append(run(kind, packets, a.seconds, tmp))
                print(rows[-1], flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
