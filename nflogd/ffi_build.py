"""Builds nflogd._nflog_cffi (CFFI API mode, out of line) from _nflog.h and its C files.

Run by setuptools at install time (``cffi_modules`` in setup.py); never at import.
"""

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))

ffibuilder = FFI()
with open(os.path.join(HERE, "_nflog.h")) as f:
    ffibuilder.cdef(f.read())

ffibuilder.set_source(
    "nflogd._nflog_cffi",
    '#include "_nflog.h"',
    sources=[os.path.relpath(os.path.join(HERE, name)) for name in ("_nflog.c", "_feed.c", "_peers.c")],
    include_dirs=[HERE],
    libraries=["netfilter_log", "mnl", "dl", "pthread"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
