"""Errors nflogd raises on purpose, in one tree.

::

    NflogdError                   everything below; the daemon prints str(err) on one line
    ├── ConfigError               (also ValueError) a bad config: message starts with the key path
    ├── NamespaceError            (also OSError) a group's netns cannot be opened or entered
    └── NFLogError                (also OSError) the kernel said no; .errno is kept
        ├── BufferOverflow        ENOBUFS: the socket's receive buffer overran, packets were lost
        ├── GroupBusy             EPERM on bind: another netlink socket holds the group
        └── NoPermission          EPERM without CAP_NET_ADMIN

``ffi.py`` maps errno to these in one place (``check()``); ``capture.py`` counts
``BufferOverflow`` and goes on; ``netns.py`` raises ``NamespaceError``; ``daemon.py``
catches ``NflogdError`` once.
"""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "NflogdError",
    "ConfigError",
    "NamespaceError",
    "NFLogError",
    "BufferOverflow",
    "GroupBusy",
    "NoPermission",
]


class NflogdError(Exception):
    """Base of every error nflogd raises on purpose."""


class ConfigError(NflogdError, ValueError):
    """The configuration is invalid: ``str(err)`` is ``"<key path>: <what was expected>"``."""


class NamespaceError(NflogdError, OSError):
    """A group's network namespace is missing, not one, or may not be entered; ``errno`` kept.

    ``str(err)`` names it: ``netns 'blue' (/run/netns/blue): no such network namespace``;
    ``err.netns`` is the config's value.
    """

    def __init__(self, errno: int, message: str, netns: str):
        super().__init__(errno, message)
        self.netns = netns

    def __str__(self) -> str:
        return str(self.strerror)


class NFLogError(NflogdError, OSError):
    """A netlink call failed; ``errno`` holds the kernel's answer.

    Kept from scapy-nflog-capture: ``NFLogError(errno, message)``.
    """

    def __init__(self, errno: int, message: str | None = None):
        super().__init__(errno, message or os.strerror(errno))

    def __str__(self) -> str:
        return str(self.strerror)


class BufferOverflow(NFLogError):
    """The netlink receive buffer overran (ENOBUFS): the kernel dropped packets."""

    def __init__(self, message: str = "netlink receive buffer overrun, packets dropped"):
        super().__init__(_errno.ENOBUFS, message)


class GroupBusy(NFLogError):
    """Another netlink socket already holds the group (the kernel answered EPERM)."""

    def __init__(self, group: int, portid: int | None = None, process: tuple[int, str] | None = None):
        self.group = group
        self.portid = portid
        #: (pid, command) of the process holding the port, where /proc tells.
        self.process = process
        holder = f" by netlink port {portid}" if portid is not None else ""
        if process is not None:
            holder += f" (pid {process[0]}, {process[1]})"
        super().__init__(_errno.EPERM, f"group {group} is already bound{holder}")


class NoPermission(NFLogError):
    """The process lacks CAP_NET_ADMIN, which binding an NFLOG group needs."""

    def __init__(self, group: int):
        self.group = group
        super().__init__(_errno.EPERM, f"group {group}: binding NFLOG groups needs CAP_NET_ADMIN")
