"""How many packets a group's receive buffer holds while nobody reads it (docs/operations.md).

Run as root from the checkout: ``.venv/bin/python bench/rcvbuf.py``. In a throwaway network
namespace, for each (rcvbuf, queue_threshold, copy_range, payload) it binds a group, sends
100 000 UDP packets on loopback without reading, then reads what the buffer kept. The
table's "per MiB" column is what sizing ``rcvbuf`` needs: packets held per MiB of buffer.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from nsutil import NetNS  # noqa: E402

from nflogd.capture import GroupReader  # noqa: E402
from nflogd.config import GroupConfig  # noqa: E402

SENT = 100_000
CASES = [  # rcvbuf, queue_threshold, copy_range, UDP payload bytes
    (1 << 20, 256, 65535, 64),
    (1 << 20, 256, 65535, 1400),
    (1 << 20, 256, 128, 1400),
    (1 << 20, 1, 65535, 64),
    (8 << 20, 256, 65535, 64),
    (8 << 20, 256, 65535, 1400),
    (8 << 20, 256, 128, 1400),
]


def held(ns: NetNS, rcvbuf: int, qthresh: int, copy_range: int, payload: int) -> int:
    settings = GroupConfig(9, queue_threshold=qthresh, copy_range=copy_range, rcvbuf=rcvbuf, netns=ns.name)
    with GroupReader(settings, warn_overflow=False) as reader:
        with ns.socket() as s:
            data = b"x" * payload
            for _ in range(SENT):
                s.sendto(data, ("127.0.0.1", 9999))
        got, idle = 0, 0
        while idle < 3:
            batch = reader.read(0.2)
            if batch is None:
                idle += 1
            else:
                idle, got = 0, got + batch.count
    return got


def main() -> None:
    ns = NetNS("nflbench")
    try:
        ns.log_rule(9, match="udp dport 9999")
        print(f"kernel {os.uname().release}, {SENT} packets sent unread")
        print("rcvbuf MiB | queue_threshold | copy_range | IP packet bytes | held | per MiB")
        for rcvbuf, qthresh, copy_range, payload in CASES:
            n = held(ns, rcvbuf, qthresh, copy_range, payload)
            mib = rcvbuf / 2**20
            row = (f"{mib:10.0f}", f"{qthresh:15d}", f"{copy_range:10d}", f"{payload + 28:15d}", f"{n:6d}")
            print(" | ".join(row), f"| {n / mib:7.0f}")
    finally:
        ns.close()


if __name__ == "__main__":
    main()
