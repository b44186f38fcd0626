"""``python -m nflogd_client``: nflog-tap (``python -m nflogd_client --help``)."""

import sys

__all__: list[str] = []

if __name__ == "__main__":
    from .tap import main

    sys.exit(main())
