"""The capture reader alone, for the bench: binds GROUP, counts packets until SIGTERM.

Prints "ready" once bound, then at SIGTERM one JSON line with its counters and the CPU seconds
it spent after "ready".
"""

import argparse
import json
import os
import signal
import sys

from nflogd.capture import GroupReader
from nflogd.config import GroupConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--qthresh", type=int, default=64)
    ap.add_argument("--rcvbuf", type=int, default=8 << 20)
    a = ap.parse_args()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    reader = GroupReader(GroupConfig(group=a.group, queue_threshold=a.qthresh, rcvbuf=a.rcvbuf))
    print("ready", flush=True)
    t0 = os.times()  # CPU from here on: start-up is not per-packet cost
    while not stop:
        reader.read(0.1)
    t = os.times()
    out = reader.counters.as_dict() | {"cpu": t.user + t.system - t0.user - t0.system}
    reader.close()
    print(json.dumps(out), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
