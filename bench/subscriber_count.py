"""A counting subscriber for the bench: ENDPOINT GROUPS [--latency] [--filter EXPR] [--raw]
[--server-key FILE --client-key FILE]; counts until SIGTERM.

GROUPS is one group or several, comma-separated. Prints "ready" once its subscription is in
place, then one JSON line: packets, messages, feed loss, kernel drops the feed reported, and
with --latency the send-to-receive delay percentiles (from bench/flood.c's stamps). With
--filter the daemon runs that capture filter for it; "bytes" counts the messages' bytes.
With --raw it reads the messages off the Subscriber's socket and counts their records and
bytes (every frame) without decoding them: a reader that costs next to nothing, for
measuring what the daemon spends whatever its readers do.
"""

import argparse
import json
import signal
import struct
import time

from nflogd_client import Subscriber, wire

STAMP = struct.Struct(">Q")
UDP_PAYLOAD = {0x0800: 28, 0x86DD: 48}  # IP + UDP header bytes before flood.c's stamp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoint")
    ap.add_argument("groups", type=lambda text: [int(g) for g in text.split(",")])
    ap.add_argument("--latency", action="store_true")
    ap.add_argument("--server-key", help="CURVE: the publisher's public key file")
    ap.add_argument("--client-key", help="CURVE: this reader's secret key file")
    ap.add_argument("--filter", default=None)
    ap.add_argument("--raw", action="store_true")
    a = ap.parse_args()
    keys = {}
    if a.server_key:
        keys = {"server_public_key": a.server_key, "client_secret_key_file": a.client_key}
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    packets = messages = nbytes = 0
    delays = []
    with Subscriber(a.endpoint, groups=a.groups, filter=a.filter, **keys) as sub:
        time.sleep(0.3)  # let the subscription reach the publisher
        while sub.filter_state == "pending":
            sub.recv(timeout=0.05)
        print("ready", flush=True)
        if a.raw:
            packets, messages, nbytes = count_raw(sub, lambda: stop)
        else:
            while not stop:  # a SIGTERM is seen within a second (the bench reads the CPU time before)
                batch = sub.recv_batch(timeout=1.0)
                if batch is None:
                    continue
                packets += len(batch.packets)
                messages += 1
                nbytes += 42 + len(batch.node.encode())  # topic, header, node: ZMTP framing aside
                nbytes += sum(72 + p.caplen + len((p.prefix or "").encode()) for p in batch.packets)
                if a.latency:
                    now = time.time_ns()
                    for p in batch.packets:
                        off = UDP_PAYLOAD.get(p.hw_protocol, 28)
                        delays.append((now - STAMP.unpack_from(p.data, off)[0]) / 1e6)
        out = {"packets": packets, "messages": messages, "bytes": nbytes, "lost": sub.total_lost}
        out["kernel_dropped"] = sum(sub.kernel_dropped.values())
    if delays:
        delays.sort()
        pick = lambda q: round(delays[min(len(delays) - 1, int(q * len(delays)))], 2)  # noqa: E731
        out["latency_ms"] = {"p50": pick(0.5), "p99": pick(0.99), "max": round(delays[-1], 2)}
    print(json.dumps(out), flush=True)


def count_raw(sub: Subscriber, stopped) -> tuple[int, int, int]:
    """Messages off the socket until ``stopped()``: (records, messages, bytes); a filter's
    replies (two frames) and sequence marks (no records) are not counted as messages."""
    packets = messages = nbytes = 0
    sock = sub.socket
    while not stopped():
        if not sock.poll(1000):
            continue
        frames = sock.recv_multipart(copy=False)
        if len(frames) != 4:
            continue
        count = wire.HEADER.unpack_from(frames[1].buffer)[4]
        if count:
            packets += count
            messages += 1
            nbytes += sum(len(f) for f in frames)
    return packets, messages, nbytes


if __name__ == "__main__":
    main()
