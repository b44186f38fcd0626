"""The capture reader alone, for the bench: binds GROUP, counts packets until SIGTERM.

It reads as the daemon's capture threads do (``GroupReader.pump``: the C read loop without
the GIL), without a feed to send on. Prints "ready" once bound, then at SIGTERM one JSON
line with its counters (bench/run.py measures its CPU from outside, as it does tcpdump's).
"""

import argparse
import json
import signal
import sys

from nflogd.capture import GroupReader
from nflogd.config import GroupConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--group", type=int, required=True)
    ap.add_argument("--qthresh", type=int, default=1024)
    ap.add_argument("--rcvbuf", type=int, default=8 << 20)
    ap.add_argument("--conntrack", action="store_true", help="attach each packet's connection")
    a = ap.parse_args()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    settings = GroupConfig(group=a.group, queue_threshold=a.qthresh, rcvbuf=a.rcvbuf, conntrack=a.conntrack)
    reader = GroupReader(settings)
    print("ready", flush=True)
    while not stop:
        reader.pump(None, 0.1)
    out = reader.counters.as_dict()
    reader.close()
    print(json.dumps(out), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
