"""``python -m nflogd_client``: nflog-tap (``python -m nflogd_client --help``)."""

import sys

from .tap import main

sys.exit(main())
