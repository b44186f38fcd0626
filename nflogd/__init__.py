"""nflogd: NFLOG capture on Python 3, and the daemon that publishes it on ZeroMQ.

The classic local API (from scapy-nflog-capture)::

    from nflogd import NFLOG, NFLOGListenSocket, install_nflog_listener

Names load on first use, so ``import nflogd`` needs neither the compiled reader nor scapy.
"""

import importlib

from nflogd_client import __version__  # one version for both distributions: nflogd_client/VERSION

_LAZY = {
    "NFLOG": "classic",
    "NFWouldBlock": "classic",
    "NFLOGListenSocket": "scapy_listen",
    "install_nflog_listener": "scapy_listen",
    "GroupReader": "capture",
    "GroupSet": "capture",
    "NFLogError": "errors",
    "BufferOverflow": "errors",
    "GroupBusy": "errors",
    "NoPermission": "errors",
    "ConfigError": "errors",
    "NflogdError": "errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nflogd' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
