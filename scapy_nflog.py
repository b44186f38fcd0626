"""scapy-nflog-capture's ``scapy_nflog`` module name, for code written against it::

    import scapy_nflog
    scapy_nflog.install_nflog_listener()     # conf.L2listen: sniff() reads NFLOG group 0

A thin alias of ``nflogd.scapy_listen`` (the classic API on Python 3): the same objects.
"""

from nflogd.scapy_listen import NFLOGListenSocket, install_nflog_listener

__all__ = ["NFLOGListenSocket", "install_nflog_listener"]
