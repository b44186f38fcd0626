"""Builds nflogd._nflog_cffi (CFFI API mode, out of line) from _nflog.h and its C files.

Run by setuptools at install time (``cffi_modules`` in setup.py); never at import.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
for header in ("_nflog.h", "_filter.h"):  # _filter.h uses _nflog.h's struct nflogd_record
    with open(os.path.join(HERE, header)) as f:
        ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "nflogd._nflog_cffi",
    '#include "_nflog.h"\n#include "_filter.h"',
    sources=[
        os.path.relpath(os.path.join(HERE, name)) for name in ("_nflog.c", "_feed.c", "_peers.c", "_filter.c")
    ],
    include_dirs=[HERE],
    libraries=["netfilter_log", "mnl", "pcap", "dl", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
