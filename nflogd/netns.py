"""Entering another network namespace just long enough to open a socket there.

A netlink socket belongs to the namespace it was created in for its whole life, whichever
namespace the thread reading it is in later. So a group of another namespace (a container,
a VRF-style router's namespace) is opened like this::

    with netns.entered("blue"):               # /run/netns/blue (ip netns add blue)
        sock = NflogSocket(5)                  # lives in "blue" until closed
    with netns.entered("/proc/4242/ns/net"):   # or any file that is a network namespace
        ...
    netns.entered(None)                        # stays where it is: the daemon's own namespace

setns(2) moves the calling thread only: other threads (ZeroMQ's, the metrics server's) never
leave the daemon's namespace, and the thread comes back before ``entered`` returns, also when
the body raises. The file is opened without blocking and refused unless it is a regular file
(what a namespace file is): a FIFO or a device at the path is "not a network namespace", at
once. Entering needs CAP_SYS_ADMIN (in the user namespace that owns the target);
``NamespaceError`` says so, naming the namespace, as it does for one that does not exist.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
from typing import Iterator

from .errors import NamespaceError
from .privileges import CAP_SYS_ADMIN, has_capability

__all__ = ["RUN_NETNS", "path_of", "identity", "can_enter", "entered"]

#: Where ``ip netns add NAME`` (and ``ip netns attach NAME PID``) pin named namespaces.
RUN_NETNS = "/run/netns"

CLONE_NEWNET = 0x40000000  # <sched.h>: setns()'s nstype for a network namespace

_libc = ctypes.CDLL(None, use_errno=True)


def path_of(netns: str) -> str:
    """The file behind a config's ``netns``: a bare name is under /run/netns, a path is itself."""
    return netns if "/" in netns else f"{RUN_NETNS}/{netns}"


def identity(netns: str) -> tuple[int, int]:
    """(st_dev, st_ino) of the namespace ``netns`` names now: equal means the same namespace."""
    try:
        st = os.stat(path_of(netns))
    except OSError as e:
        raise _error(netns, e.errno or errno.EIO) from None
    return st.st_dev, st.st_ino


def can_enter() -> bool:
    """Whether this thread holds CAP_SYS_ADMIN, without which ``entered`` fails for any namespace."""
    return has_capability(CAP_SYS_ADMIN)


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python 3.12+
    if setns is not None:
        setns(fd, CLONE_NEWNET)
    elif _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _error(netns: str, err: int) -> NamespaceError:
    path = path_of(netns)
    where = f"netns {netns!r}" + (f" ({path})" if path != netns else "")
    if err == errno.ENOENT:
        what = "no such network namespace"
    elif err == errno.EINVAL:
        what = "not a network namespace"
    elif err == errno.EPERM:
        what = "entering a network namespace needs CAP_SYS_ADMIN"
    else:
        what = os.strerror(err)
    return NamespaceError(err, f"{where}: {what}", netns)


@contextlib.contextmanager
def entered(netns: str | None) -> Iterator[tuple[int, int] | None]:
    """Run the body in the network namespace ``netns`` (None: where the thread is).

    Yields the namespace's ``identity()`` (None for None). Raises ``NamespaceError`` if the
    namespace cannot be opened or entered; the thread is then where it was.
    """
    if netns is None:
        yield None
        return
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            # O_NONBLOCK: a FIFO at the path opens at once (and is refused below), never blocks
            target = os.open(path_of(netns), os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as e:
            raise _error(netns, e.errno or errno.EIO) from None
        try:
            st = os.fstat(target)
            if not stat.S_ISREG(st.st_mode):  # a namespace file (nsfs) is a regular file
                raise _error(netns, errno.EINVAL)
            try:
                _setns(target)
            except OSError as e:
                raise _error(netns, e.errno or errno.EIO) from None
        finally:
            os.close(target)
        try:
            yield st.st_dev, st.st_ino
        finally:
            try:
                _setns(own)
            except OSError as e:  # cannot happen with the rights that got us in; never stay there
                raise SystemExit(f"nflogd: cannot return from netns {netns!r}: {e.strerror}") from None
    finally:
        os.close(own)
