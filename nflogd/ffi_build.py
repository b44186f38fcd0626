"""Builds nflogd._nflog_cffi (CFFI API mode, out of line) from the C files and their headers.

One module: the capture (``_nflog.c``, ``_nflog.h``), the feed's senders
(``feed/_peers.c``, ``feed/_feed.c``, ``feed/_filter.c``) and the relay's upstream reader
(``feed/_upstream.c``), with their headers. The cdef is the headers as they
are, less their include guards and includes and less what follows a "C only" line.

Run by setuptools at install time (``cffi_modules`` in setup.py); never at import.
``NFLOGD_SANITIZE=1`` builds it with AddressSanitizer and UndefinedBehaviorSanitizer
(``make test-asan``).
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
# _filter.h after _nflog.h
HEADERS = ("_nflog.h", "feed/_peers.h", "feed/_feed.h", "feed/_filter.h", "feed/_upstream.h")
SOURCES = ("_nflog.c", "feed/_feed.c", "feed/_peers.c", "feed/_filter.c", "feed/_upstream.c")
_PREPROCESSOR = re.compile(r"#\s*(include|ifndef|endif)\b|#define NFLOGD_\w+_H$")


def cdef_of(path: str) -> str:
    """The declarations of a header that CFFI reads."""
    with open(path) as f:
        text = f.read()
    text = text.split("/* -- C only", 1)[0]
    return "\n".join(line for line in text.splitlines() if not _PREPROCESSOR.match(line))


ffibuilder = FFI()
ffibuilder.cdef("\n".join(cdef_of(os.path.join(HERE, h)) for h in HEADERS))

SANITIZE = bool(os.environ.get("NFLOGD_SANITIZE"))


def _source(name: str) -> str:
    """Relative for setuptools; absolute for make test-asan's compile() in a directory of its own."""
    path = os.path.join(HERE, name)
    return path if SANITIZE else os.path.relpath(path)


_flags = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_link: list[str] = []
if SANITIZE:
    _flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined",
              "-fno-sanitize-recover=all",
              "-fsanitize-recover=alignment", "-Wall", "-Wextra", "-Wno-unused-parameter"]  # fmt: skip
    _link = ["-fsanitize=address,undefined"]

ffibuilder.set_source(
    "nflogd._nflog_cffi",
    "\n".join(f'#include "{h}"' for h in HEADERS),
    sources=[_source(name) for name in SOURCES],
    include_dirs=[HERE],
    libraries=["netfilter_log", "mnl", "sodium", "pcap", "pthread", "dl"],
    extra_compile_args=_flags,
    extra_link_args=_link,
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
