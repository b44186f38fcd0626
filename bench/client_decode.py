"""Client-side rates for the bench: wire.decode, Subscriber, and ZMQNFLOGSocket vs plain scapy.

Publishes prebuilt 64-packet messages of real IPv4/UDP packets over an ipc endpoint, so
only the client's work is timed: the CPU time of the thread that receives (time.thread_time),
not waits for ZeroMQ's I/O thread. Prints one JSON line per figure.
"""

import json
import os
import tempfile
import threading
import time

import zmq
from nflogd_client import Subscriber, ZMQNFLOGSocket, wire
from scapy.layers.inet import IP, UDP

GROUP = 1
PER_BATCH = 64


def message(first_seq: int) -> list[bytes]:
    raw = bytes(IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=4000, dport=9999) / bytes(64))
    pkts = [
        wire.Packet.build(group=GROUP, data=raw, ts_ns=time.time_ns(), hw_protocol=0x0800, prefix="bench")
        for _ in range(PER_BATCH)
    ]
    return wire.encode(GROUP, "bench", 1, first_seq, pkts)


def rate(n: int, seconds: float) -> int:
    return round(n / seconds)


def bench_decode(msg) -> dict:
    n = 5000
    t0 = time.thread_time()
    for _ in range(n):
        wire.decode(msg)
    return {"case": "wire.decode", "packets_per_s": rate(n * PER_BATCH, time.thread_time() - t0)}


def publish(endpoint: str, ctx: zmq.Context, msgs, sent: threading.Event) -> None:
    pub = ctx.socket(zmq.XPUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(endpoint)
    pub.recv()  # the subscription: nothing is sent before anyone listens
    for m in msgs:
        pub.send_multipart(m)
    sent.set()
    pub.close(linger=-1)


def through_feed(make, consume, count: int) -> tuple[int, float]:
    """Publish ``count`` prebuilt messages; time ``consume(client, packets)`` alone.

    The messages are built before, and queued by the publisher thread before the clock
    starts, so only the client's receiving and decoding is timed.
    """
    template = message(0)[2:]  # record table and data of one batch
    msgs = [wire.frames(GROUP, "bench", 1, i * PER_BATCH, 0, PER_BATCH, *template) for i in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/feed.sock"
        ctx = zmq.Context()
        sent = threading.Event()
        t = threading.Thread(target=publish, args=(endpoint, ctx, msgs, sent))
        t.start()
        client = make(endpoint)
        sent.wait(30)
        t0 = time.thread_time()
        n = consume(client, count * PER_BATCH)
        dt = time.thread_time() - t0
        client.close()
        t.join()
        ctx.term()
    return n, dt


def bench_subscriber() -> list[dict]:
    def batches(sub, want):
        n = 0
        while n < want:
            b = sub.recv_batch(timeout=5)
            if b is None:
                break
            n += len(b.packets)
        return n

    def singles(sub, want):
        n = 0
        while n < want and sub.recv(timeout=5) is not None:
            n += 1
        return n

    out = []
    for name, consume in (("Subscriber.recv_batch", batches), ("Subscriber.recv", singles)):
        n, dt = through_feed(lambda ep: Subscriber(ep, groups=GROUP, rcvhwm=0), consume, 3000)
        out.append({"case": name, "packets": n, "packets_per_s": rate(n, dt)})
    return out


def bench_scapy_socket(rounds: int = 3) -> list[dict]:
    """Per-packet time of ZMQNFLOGSocket.recv() against IP(raw) on the same bytes.

    The two alternate, best of ``rounds`` each, so that load on the machine hits both alike.
    """
    datas = [p.data for p in wire.decode(message(0)).packets] * 50

    def take(sock, want):
        n = 0
        while n < want and sock.recv() is not None:
            n += 1
        return n

    plain = ours = float("inf")
    n = 0
    for _ in range(rounds):
        t0 = time.thread_time()
        for d in datas:
            IP(d)
        plain = min(plain, (time.thread_time() - t0) / len(datas))
        n, dt = through_feed(lambda ep: ZMQNFLOGSocket(ep, groups=GROUP, rcvhwm=0), take, 50)
        ours = min(ours, dt / max(n, 1))
    return [
        {
            "case": "ZMQNFLOGSocket.recv vs IP(raw)",
            "packets": n,
            "us_per_pkt": round(ours * 1e6, 2),
            "plain_us_per_pkt": round(plain * 1e6, 2),
            "overhead_pct": round(100 * (ours / plain - 1), 1),
        }
    ]


def main() -> None:
    os.environ.pop("NFLOGD_ENDPOINT", None)
    rows = [bench_decode(message(0)), *bench_subscriber(), *bench_scapy_socket()]
    for r in rows:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
