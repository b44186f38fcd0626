"""Stand-in routers for the relay bench: ENDPOINT... [--rate PPS] [--packets N]; until SIGTERM.

Each endpoint is one router's feed, the daemon's own ``Publisher`` on it (the server every
nflogd serves its readers with), node ``routerI``, group 1. Each sends a message of ``--packets``
100-byte packets ``--rate / --packets`` times a second, as a daemon's flush timer cuts a
steady rate into batches. Prints "ready" once every feed has a subscriber, then one JSON line
at SIGTERM: messages and packets sent.
"""

import argparse
import json
import signal
import time
from types import SimpleNamespace

from nflogd_client import wire
from nflogd_client.wire import Packet

from nflogd.config_publish import PublishConfig
from nflogd.publish import Publisher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("endpoints", nargs="+")
    ap.add_argument("--rate", type=int, default=20000, help="packets/s per router")
    ap.add_argument("--packets", type=int, default=200, help="packets per message")
    a = ap.parse_args()
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    count, table, data = wire.pack_records(
        Packet.build(1, bytes(100), 1_700_000_000_000_000_000 + i) for i in range(a.packets)
    )
    batch = SimpleNamespace(group=1, count=count, table=table, data=data, flags=0)
    pubs = [
        Publisher(PublishConfig(bind=(ep,)), node=f"router{i}", epoch=1) for i, ep in enumerate(a.endpoints)
    ]
    while not stop and not all(p.subscription_messages for p in pubs):
        for p in pubs:
            p.handle_incoming()
        time.sleep(0.01)
    print("ready", flush=True)
    period = a.packets / a.rate
    sent = 0
    t0 = time.monotonic()
    while not stop:
        for p in pubs:
            p.publish(batch)
            p.handle_incoming()
        sent += 1
        time.sleep(max(0.0, t0 + sent * period - time.monotonic()))
    for p in pubs:
        p.close(linger=1000)
    print(json.dumps({"messages": sent * len(pubs), "packets": sent * len(pubs) * a.packets}), flush=True)


if __name__ == "__main__":
    main()
