"""nflogd: NFLOG capture on Python 3, and the daemon that publishes it on ZeroMQ."""
