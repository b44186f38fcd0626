"""Dropping root after the NFLOG groups are bound, keeping CAP_NET_ADMIN only.

Use (the config's ``user`` is set, the daemon started as root)::

    readers = [GroupReader(g) for g in cfg.groups]   # needs CAP_NET_ADMIN
    drop("nflogd")                                    # before any thread exists
    ctx = zmq.Context()                               # threads start from here on

Order, after capabilities(7): ``prctl(PR_SET_KEEPCAPS, 1)`` so that setuid()
keeps the permitted set; ``setgroups`` to the user's groups; ``setgid``;
``setuid``; then ``capset`` to CAP_NET_ADMIN alone (permitted and effective),
which a SIGHUP that adds a group needs for binding it. Capabilities belong to
each thread, so this must run while the process has one thread: threads
started later inherit the reduced set.

Running as the service user already (systemd ``User=nflogd`` with
``AmbientCapabilities=CAP_NET_ADMIN``) needs none of this: ``drop`` returns
without doing anything when the process already is that user.
"""

from __future__ import annotations

import grp
import importlib
import logging
import os
import pwd

from .errors import ConfigError, NflogdError

__all__ = ["drop", "PRELOAD"]

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


def drop(user: str) -> None:
    """Become ``user`` (and its groups), keeping CAP_NET_ADMIN; raise NflogdError if not possible."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user: no such user {user!r}") from None
    if os.getuid() == pw.pw_uid and os.geteuid() == pw.pw_uid:
        log.debug("already running as %s", user)
        return
    if _threads() != 1:
        raise NflogdError("user: cannot drop privileges: threads are already running")
    groups = os.getgrouplist(user, pw.pw_gid)
    for name in PRELOAD:
        importlib.import_module(name)
    from . import ffi  # the compiled module (already loaded by capture when groups are bound)

    try:
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
