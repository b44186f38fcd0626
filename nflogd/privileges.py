"""Dropping root after the NFLOG groups are bound, keeping CAP_NET_ADMIN only.

Use::

    readers = [GroupReader(g) for g in cfg.groups]   # needs CAP_NET_ADMIN
    drop("nflogd")                                    # config user set; before any thread exists
    confine()                                         # or, without a user: CAP_NET_ADMIN at most
    ctx = zmq.Context()                               # threads start from here on

Order, after capabilities(7): ``prctl(PR_SET_KEEPCAPS, 1)`` so that setuid()
keeps the permitted set; ``setgroups`` to the user's groups; ``setgid``;
``setuid``; then ``capset`` to CAP_NET_ADMIN alone (permitted and effective),
which a SIGHUP that adds a group needs for binding it. Capabilities belong to
each thread, so this must run while the process has one thread: threads
started later inherit the reduced set.

Both end in ``confine()``: the bounding set is cut to CAP_NET_ADMIN (while
CAP_SETPCAP is still there, so before ``setuid``) and ``PR_SET_NO_NEW_PRIVS``
is set, so that no ``execve`` can give back what ``capset`` took. Without a
``user``, a daemon started as root stays uid 0 but holds CAP_NET_ADMIN alone
(logged at info level: uid 0 still owns root's files); ZeroMQ's threads, the
authenticator and the metrics server start after this and inherit it.

Running as the service user already (systemd ``User=nflogd`` with
``AmbientCapabilities=CAP_NET_ADMIN``) needs no ``setuid``: ``drop`` only
confines a process that already is that user.
"""

from __future__ import annotations

import grp
import importlib
import logging
import os
import pwd

from .errors import ConfigError, NflogdError

__all__ = ["drop", "confine", "PRELOAD"]

log = logging.getLogger(__name__)

#: Modules Python imports lazily on paths the daemon takes after the drop: host names go
#: through the idna codec, HTTP headers through latin-1. Imported while still root, since
#: the interpreter may live where the user cannot read (a pyenv under /root, say).
PRELOAD = ("encodings.idna", "encodings.latin_1", "encodings.ascii", "importlib.metadata")


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _cap_set(name: str) -> int:
    """A capability set of this thread from /proc (``CapPrm``, ``CapEff``, ``CapBnd``)."""
    with open("/proc/thread-self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1], 16)
    return 0  # pragma: no cover - every Linux since 2.6.25 lists them


def confine() -> None:
    """Keep CAP_NET_ADMIN at most, for good, staying the current user; before any thread exists."""
    if _threads() != 1:
        raise NflogdError("cannot limit capabilities: threads are already running")
    from . import ffi

    net_admin = 1 << ffi.CAP_NET_ADMIN
    try:
        ffi.confine()
        permitted = _cap_set("CapPrm")
        if permitted & ~net_admin:
            if not permitted & net_admin:
                raise NflogdError("cannot limit capabilities: CAP_NET_ADMIN is not permitted")
            ffi.keep_net_admin()
    except OSError as e:
        raise NflogdError(f"cannot limit capabilities: {e.strerror or e}") from None
    if _cap_set("CapBnd") & ~net_admin:
        log.debug("bounding set not reduced (no CAP_SETPCAP); PR_SET_NO_NEW_PRIVS is set")
    if os.geteuid() == 0:
        log.info(
            "running as root (uid 0) with CAP_NET_ADMIN only; set 'user:' in the config "
            "(the systemd unit runs as nflogd) so that the daemon does not own root's files"
        )


def drop(user: str) -> None:
    """Become ``user`` (and its groups), keeping CAP_NET_ADMIN; raise NflogdError if not possible."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None
    if os.getuid() == pw.pw_uid and os.geteuid() == pw.pw_uid:
        log.debug("already running as %s", user)
        confine()
        return
    if _threads() != 1:
        raise NflogdError("user: cannot drop privileges: threads are already running")
    groups = os.getgrouplist(user, pw.pw_gid)
    for name in PRELOAD:
        importlib.import_module(name)
    from . import ffi  # the compiled module (already loaded by capture when groups are bound)

    try:
        ffi.confine()  # the bounding set needs CAP_SETPCAP: before setuid
        ffi.set_keepcaps(True)
        os.setgroups(groups)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        ffi.keep_net_admin()
        ffi.set_keepcaps(False)
    except OSError as e:
        raise NflogdError(f"user: cannot switch to {user!r}: {e.strerror or e}") from None
    names = []
    for gid in groups:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    log.info("running as %s (groups %s) with CAP_NET_ADMIN", user, ",".join(names))
