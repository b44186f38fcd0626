"""UDP sender for the bench: COUNT datagrams to ADDR:PORT, paced at RATE per second (0: flat out).

Each payload starts with the send time (time_ns, 8 bytes big-endian) for latency figures.
Prints one JSON line: {"sent": N, "seconds": S}.
"""

import argparse
import json
import socket
import struct
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--rate", type=float, default=0, help="packets per second; 0 sends flat out")
    ap.add_argument("--addr", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9999)
    ap.add_argument("--size", type=int, default=64, help="UDP payload bytes (at least 8)")
    a = ap.parse_args()
    fam = socket.AF_INET6 if ":" in a.addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    dest = (a.addr, a.port)
    pad = bytes(max(0, a.size - 8))
    pack = struct.Struct(">Q").pack
    send = s.sendto
    now = time.time_ns
    t0 = time.monotonic()
    if a.rate <= 0:
        payload = pack(now()) + pad
        for _ in range(a.count):
            send(payload, dest)
    else:
        step = 1.0 / a.rate
        due = t0
        for _ in range(a.count):
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            send(pack(now()) + pad, dest)
            due += step
    print(json.dumps({"sent": a.count, "seconds": time.monotonic() - t0}), flush=True)


if __name__ == "__main__":
    main()
