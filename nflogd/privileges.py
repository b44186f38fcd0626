"""This thread's capabilities: the one reader of them, and dropping root after the NFLOG
groups are bound, keeping CAP_NET_ADMIN only.

Use::

    has_capability(CAP_NET_ADMIN)                     # this thread's effective set, from /proc
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

Both make the privileges final first: the bounding set is cut to CAP_NET_ADMIN
(while CAP_SETPCAP is still there, so before ``setuid``) and ``PR_SET_NO_NEW_PRIVS``
is set, so that no ``execve`` can give back what ``capset`` took. Without a
``user``, a daemon started as root stays uid 0 but holds CAP_NET_ADMIN alone
(logged at info level: uid 0 still owns root's files); ZeroMQ's threads, the
authenticator and the metrics server start after this and inherit it.

Running as the service user already (systemd ``User=nflogd`` with
``AmbientCapabilities=CAP_NET_ADMIN``) needs no ``setuid``: ``drop`` only
confines a process that already is that user. The system calls go through libc
(ctypes) on the calling thread.
"""

from __future__ import annotations

import ctypes
import errno
import grp
import importlib
import logging
import os
import pwd

from .errors import ConfigError, NflogdError

__all__ = ["drop", "confine", "has_capability", "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "PRELOAD"]

log = logging.getLogger(__name__)

#: Modules Python imports lazily on paths the daemon takes after the drop: host names go
#: through the idna codec, HTTP headers through latin-1. Imported while still root, since
#: the interpreter may live where the user cannot read (a pyenv under /root, say).
PRELOAD = ("encodings.idna", "encodings.latin_1", "encodings.ascii", "importlib.metadata")

# <linux/capability.h>
CAP_NET_ADMIN = 12  # binding an NFLOG group
CAP_SYS_ADMIN = 21  # setns(2) into another network namespace
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

# <linux/prctl.h>
PR_SET_KEEPCAPS = 8
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38


class _CapHeader(ctypes.Structure):  # struct __user_cap_header_struct
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):  # struct __user_cap_data_struct
    _fields_ = [
        ("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32),
    ]  # fmt: skip


_libc = ctypes.CDLL(None, use_errno=True)
_prctl_call = _libc.prctl
_prctl_call.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl_call.restype = ctypes.c_int
_capset = _libc.capset
_capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_capset.restype = ctypes.c_int


def _prctl(option: int, arg: int = 0) -> int:
    """prctl(option, arg, 0, 0, 0): its result, or -errno."""
    rc = _prctl_call(option, arg, 0, 0, 0)
    return rc if rc >= 0 else -ctypes.get_errno()


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


def has_capability(cap: int) -> bool:
    """True when capability number ``cap`` is in the calling thread's effective set."""
    try:
        return bool(_cap_set("CapEff") >> cap & 1)
    except (OSError, ValueError):
        return False


def _set_keepcaps(on: bool) -> None:
    """prctl(PR_SET_KEEPCAPS): keep the permitted capabilities across setuid()."""
    rc = _prctl(PR_SET_KEEPCAPS, 1 if on else 0)
    if rc < 0:
        raise OSError(-rc, f"PR_SET_KEEPCAPS: {os.strerror(-rc)}")


def _keep_net_admin() -> None:
    """Reduce the permitted and effective capabilities to CAP_NET_ADMIN alone (capset), and
    clear PR_SET_KEEPCAPS."""
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()  # CAP_TO_INDEX: capabilities 0..31 in data[0]
    data[CAP_NET_ADMIN // 32].effective = data[CAP_NET_ADMIN // 32].permitted = 1 << CAP_NET_ADMIN % 32
    if _capset(ctypes.byref(hdr), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset(CAP_NET_ADMIN): {os.strerror(err)}")
    _prctl(PR_SET_KEEPCAPS, 0)


def _make_final() -> None:
    """Drop every capability but CAP_NET_ADMIN from the bounding set (where it can: that needs
    CAP_SETPCAP, so before setuid; EPERM is skipped) and set PR_SET_NO_NEW_PRIVS, so that no
    execve() gives back what capset() takes away. Threads created afterwards inherit both."""
    for cap in range(64):
        if cap == CAP_NET_ADMIN:
            continue
        in_set = _prctl(PR_CAPBSET_READ, cap)
        if in_set < 0:  # EINVAL past the kernel's last capability (prctl(2))
            break
        if in_set == 1:
            rc = _prctl(PR_CAPBSET_DROP, cap)
            if rc < 0 and rc != -errno.EPERM:
                raise OSError(-rc, f"prctl(PR_CAPBSET_DROP): {os.strerror(-rc)}")
    rc = _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if rc < 0:
        raise OSError(-rc, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(-rc)}")


def confine() -> None:
    """Keep CAP_NET_ADMIN at most, for good, staying the current user; before any thread exists."""
    if _threads() != 1:
        raise NflogdError("cannot limit capabilities: threads are already running")
    net_admin = 1 << CAP_NET_ADMIN
    try:
        _make_final()
        permitted = _cap_set("CapPrm")
        if permitted & ~net_admin:
            if not permitted & net_admin:
                raise NflogdError("cannot limit capabilities: CAP_NET_ADMIN is not permitted")
            _keep_net_admin()
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
    try:
        _make_final()  # the bounding set needs CAP_SETPCAP: before setuid
        _set_keepcaps(True)
        os.setgroups(groups)
        os.setgid(pw.pw_gid)
        os.setuid(pw.pw_uid)
        _keep_net_admin()
        _set_keepcaps(False)
    except OSError as e:
        raise NflogdError(f"user: cannot switch to {user!r}: {e.strerror or e}") from None
    names = []
    for gid in groups:
        try:
            names.append(grp.getgrgid(gid).gr_name)
        except KeyError:
            names.append(str(gid))
    log.info("running as %s (groups %s) with CAP_NET_ADMIN", user, ",".join(names))
