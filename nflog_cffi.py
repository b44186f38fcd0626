"""scapy-nflog-capture's ``nflog_cffi`` module name, for code written against it::

    from nflog_cffi import NFLOG
    nflog = NFLOG().generator(0, extra_attrs=['len', 'ts'], nlbufsiz=2*2**20)

A thin alias of ``nflogd.classic`` (the classic API on Python 3): the same objects.
"""

from nflogd.classic import NFLOG, NFWouldBlock
from nflogd.errors import NFLogError

__all__ = ["NFLOG", "NFLogError", "NFWouldBlock"]
