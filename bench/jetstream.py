"""relay -> JetStream -> reader, beside the ZeroMQ relay: rates and CPU per message and per packet.

    .venv/bin/python bench/jetstream.py [--messages 20000] [--packets 1,16,256] [--seconds 3] [--rate N]

Per packets-per-message (100-byte packets): first ``bench/relay.py``'s nflogd-relay row (the
ZeroMQ relay alone, for comparison). Then a real nats-server (the venv's, JetStream on, file
storage, a temporary store) and nflogd-relay with a jetstream section: a publisher process sends
``--messages`` feed messages (fewer for big ones: at most 100 MB in all) with increasing
sequence numbers as fast as the relay takes them; the time until the stream holds them all
gives the rate into the stream, /proc the relay's and the server's CPU per message. Then one
``JetStreamSubscriber(start="all")`` in this process reads them all back: its rate and CPU
(``time.process_time``, its nats thread included). All processes share the machine's cores:
compare the columns of one run, not runs on different machines. Nothing here is a test.
``--rate N``: the publisher sends N messages/s, as a fleet's feed comes, instead of as fast as
the relay takes them (where batching hides the cost of each wake-up), and the ZeroMQ row is
the relay without a stream fed at the same rate.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq
from nflogd_client import wire
from nflogd_client.jetstream import JetStreamSubscriber
from nflogd_client.wire import Packet

sys.path.insert(0, str(Path(__file__).resolve().parent))
import relay as zrelay  # noqa: E402  bench/relay.py: the ZeroMQ relay's row

REPO = Path(__file__).resolve().parent.parent
RELAY = REPO / ".venv" / "bin" / "nflogd-relay"
NATS = REPO / ".venv" / "bin" / "nats-server"
MAX_BYTES = 100 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def publisher(endpoint: str, packets: int, messages: int, rate: float = 0.0) -> None:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.XPUB_NODROP, 1)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.bind(endpoint)
    sock.recv()  # the relay's subscription
    count, table, data = wire.pack_records(
        Packet.build(1, bytes(100), 1_700_000_000_000_000_000 + i) for i in range(packets)
    )
    time.sleep(0.3)
    t0 = time.monotonic()
    for i in range(messages):
        if rate:  # a steady rate, as a fleet's feed comes, rather than as fast as the relay takes it
            time.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        while True:
            try:
                sock.send_multipart(
                    wire.frames(1, "router1", 1, i * packets, 0, count, table, data), zmq.NOBLOCK
                )
                break
            except zmq.Again:
                time.sleep(0.0005)
    time.sleep(1)


def cpu_seconds(pid: int) -> float:
    return zrelay.cpu_seconds(pid)


async def _stored(url: str) -> int:
    import nats

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info("NFLOG")).state.messages
    finally:
        await nc.close()


def stored(url: str) -> int:
    try:
        return asyncio.run(_stored(url))
    except Exception:
        return 0


def run_zmq_at(packets: int, messages: int, tmp: str, rate: float) -> dict:
    """The ZeroMQ relay alone fed at ``rate`` messages/s (the same publisher), one SUB reading:
    its CPU per message at that rate, for the stream row beside it."""
    up, down = f"ipc://{tmp}/z-up-{packets}.sock", f"ipc://{tmp}/z-down-{packets}.sock"
    cfg = Path(tmp) / f"relay-z-{packets}.yaml"
    cfg.write_text(f"upstreams: ['{up}']\npublish: {{bind: '{down}'}}\nmetrics: {{listen: null}}\n")
    relay = subprocess.Popen([str(RELAY), "-c", str(cfg), "--log-level", "warning"])
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.connect(down)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        time.sleep(1.0)
        pub = mp.Process(target=publisher, args=(up, packets, messages, rate), daemon=True)
        cpu0 = cpu_seconds(relay.pid)
        pub.start()
        n = 0
        while n < messages and sub.poll(5000):
            sub.recv_multipart()
            n += 1
        cpu = cpu_seconds(relay.pid) - cpu0
        pub.kill()
        return {"msgs": n, "cpu us/msg": round(cpu / max(n, 1) * 1e6, 1)}
    finally:
        sub.close(linger=0)
        ctx.term()
        relay.send_signal(signal.SIGTERM)
        relay.wait(10)


def run_stream(packets: int, messages: int, tmp: str, rate: float = 0.0) -> dict:
    port = free_port()
    store = Path(tmp) / f"store-{packets}"
    conf = Path(tmp) / f"nats-{packets}.conf"
    conf.write_text(
        f"listen: 127.0.0.1:{port}\n"
        f'jetstream {{ store_dir: "{store}", max_file_store: 4GB, max_memory_store: 64MB }}\n'
    )
    url = f"nats://127.0.0.1:{port}"
    srv = subprocess.Popen([str(NATS), "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    up = f"ipc://{tmp}/js-up-{packets}.sock"
    cfg = Path(tmp) / f"relay-js-{packets}.yaml"
    cfg.write_text(
        f"upstreams: ['{up}']\npublish: {{bind: 'ipc://{tmp}/js-down-{packets}.sock'}}\n"
        f"metrics: {{listen: null}}\njetstream: {{servers: '{url}', buffer_bytes: {1 << 30}}}\n"
    )
    relay = None
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        relay = subprocess.Popen([str(RELAY), "-c", str(cfg), "--log-level", "warning"])
        time.sleep(1.0)
        pub = mp.Process(target=publisher, args=(up, packets, messages, rate), daemon=True)
        relay_cpu0, srv_cpu0 = cpu_seconds(relay.pid), cpu_seconds(srv.pid)
        t0 = time.perf_counter()
        pub.start()
        n = 0
        while n < messages:
            time.sleep(0.05)
            n = stored(url)
            if time.perf_counter() - t0 > 300:
                break
        elapsed = time.perf_counter() - t0
        relay_cpu = cpu_seconds(relay.pid) - relay_cpu0
        srv_cpu = cpu_seconds(srv.pid) - srv_cpu0
        pub.kill()
        # the reader
        c0, r0 = time.process_time(), time.perf_counter()
        got = 0
        with JetStreamSubscriber(f"{url}/NFLOG", start="all") as sub:
            while got < n * packets:
                b = sub.recv_batch(timeout=10)
                if b is None:
                    break
                got += len(b.packets)
            lost = sub.total_lost
        read_s, read_cpu = time.perf_counter() - r0, time.process_time() - c0
        return {
            "path": "relay -> JetStream -> reader",
            "packets/msg": packets,
            "msgs": n,
            "into stream msgs/s": round(n / elapsed),
            "packets/s": round(n * packets / elapsed),
            "relay cpu us/msg": round(relay_cpu / n * 1e6, 1),
            "nats-server cpu us/msg": round(srv_cpu / n * 1e6, 1),
            "reader packets/s": round(got / read_s),
            "reader cpu us/packet": round(read_cpu / max(got, 1) * 1e6, 2),
            "reader lost": lost,
        }
    finally:
        for p in (relay, srv):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--packets", default="1,16,256", help="packets per message, comma-separated")
    ap.add_argument("--seconds", type=float, default=3.0, help="for the ZeroMQ relay's row")
    ap.add_argument(
        "--rate", type=float, default=0.0, help="messages/s into the relay (default 0: as fast as it can)"
    )
    a = ap.parse_args()
    if not NATS.exists():
        sys.exit(f"{NATS}: missing; make deps puts nats-server there")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        for packets in (int(x) for x in a.packets.split(",")):
            size = 40 + 7 + packets * (72 + 100)
            messages = min(a.messages, MAX_BYTES // size)
            if a.rate:  # the ZeroMQ relay at the same rate
                zmq_row = {"msgs/s": a.rate, **run_zmq_at(packets, messages, tmp, a.rate)}
            else:
                zmq_row = zrelay.run("nflogd-relay", packets, a.seconds, tmp)
            print(zmq_row, flush=True)
            js_row = run_stream(packets, messages, tmp, a.rate)
            js_row["relay cpu ratio (JetStream / ZeroMQ)"] = round(
                js_row["relay cpu us/msg"] / max(zmq_row["cpu us/msg"], 0.1), 2
            )
            js_row["zmq relay msgs/s"] = zmq_row["msgs/s"]
            js_row["zmq relay cpu us/msg"] = zmq_row["cpu us/msg"]
            print(js_row, flush=True)
            rows.append(js_row)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
