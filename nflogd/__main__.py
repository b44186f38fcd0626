"""``python -m nflogd``: the same as the ``nflogd`` command."""

import sys

from .daemon import main

if __name__ == "__main__":
    sys.exit(main())
