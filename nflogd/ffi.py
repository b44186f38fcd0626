"""The binding to nflogd's compiled NFLOG reader (``_nflog.c``): one netlink socket, one group.

Nothing else lives here: errno becomes an exception in one place (``check``), and kernel
units appear only here (the flush timeout goes to the kernel in 1/100 s)::

    sock = NflogSocket(5)
    sock.set_rcvbuf(8 << 20)
    sock.configure(copy_range=65535, queue_threshold=64, flush_ms=10, bind=True)
    n = sock.read(timeout_ms=100)      # records in sock.table(n), payloads in sock.data()
    sock.close()

The blocking read releases the GIL (CFFI does for every call into the module).
"""

from __future__ import annotations

import errno
import math
import os

from ._nflog_cffi import ffi, lib
from .errors import BufferOverflow, GroupBusy, NFLogError, NoPermission

__all__ = [
    "NflogSocket", "check", "set_keepcaps", "keep_net_admin", "confine", "has_capability",
    "RECORD_SIZE", "KERNEL_NLBUFSIZ",
]  # fmt: skip

RECORD_SIZE = ffi.sizeof("struct nflogd_record")

#: The kernel's batch skb size (NFULA_CFG_NLBUFSIZ): its maximum, 128 KiB, so that one
#: netlink message carries as many packets as the queue threshold allows.
KERNEL_NLBUFSIZ = 131072

#: Where the kernel lists bound groups: "group portid qlen copy_mode copy_range timeout use".
PROC_NFLOG = "/proc/net/netfilter/nfnetlink_log"

CAP_NET_ADMIN = 12  # <linux/capability.h>


def has_capability(cap: int) -> bool:
    """True when capability number ``cap`` is in the calling thread's effective set."""
    try:
        with open("/proc/thread-self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> cap & 1)
    except (OSError, ValueError):
        pass
    return False


def has_net_admin() -> bool:
    """True when CAP_NET_ADMIN, which binding a group needs, is in this thread's effective set."""
    return has_capability(CAP_NET_ADMIN)


def group_holder(group: int) -> int | None:
    """The netlink port id bound to ``group`` in this namespace, from /proc, if it tells."""
    try:
        with open(PROC_NFLOG) as f:
            for line in f:
                cols = line.split()
                if len(cols) >= 2 and int(cols[0]) == group:
                    return int(cols[1])
    except (OSError, ValueError):
        pass
    return None


def check(rc: int, group: int, op: str) -> int:
    """Return ``rc`` if it is not a negative errno, else raise the matching NFLogError."""
    if rc >= 0:
        return rc
    err = -rc
    if err == errno.ENOBUFS:
        raise BufferOverflow()
    if err == errno.EPERM and op == "bind":
        if not has_net_admin():
            raise NoPermission(group)
        raise GroupBusy(group, group_holder(group))
    raise NFLogError(err, f"group {group}: {op}: {os.strerror(err)}")


class NflogSocket:
    """One netlink socket bound to one NFLOG group; the C reader's buffers behind it."""

    def __init__(self, group: int):
        if not 0 <= group <= 0xFFFF:
            raise ValueError(f"group must be 0..65535, got {group}")
        self.group = group
        r = lib.nflogd_reader_new(group)
        if r == ffi.NULL:
            err = ffi.errno
            raise NFLogError(
                err, f"group {group}: cannot open a netfilter netlink socket: {os.strerror(err)}"
            )
        self._r = ffi.gc(r, lib.nflogd_reader_free)
        self.bound = False

    def fileno(self) -> int:
        return self._r.fd

    @property
    def portid(self) -> int:
        return self._r.portid

    def set_rcvbuf(self, nbytes: int) -> None:
        """Size the socket's receive buffer (SO_RCVBUFFORCE, past net.core.rmem_max)."""
        check(lib.nflogd_set_rcvbuf(self._r, nbytes), self.group, "set receive buffer")

    def configure(self, *, copy_range: int, queue_threshold: int, flush_ms: int, bind: bool = False) -> None:
        """Bind (when ``bind``) and set the group's copy range, batch size and flush time.

        ``copy_range`` 0 copies metadata only. ``flush_ms`` is rounded up to the kernel's
        1/100 s (at least 1). Sequence numbering (NFULNL_CFG_F_SEQ) is always on.
        """
        timeout_cs = max(1, math.ceil(flush_ms / 10))
        rc = lib.nflogd_configure(
            self._r, 1 if bind else 0, copy_range, queue_threshold, timeout_cs, KERNEL_NLBUFSIZ
        )
        check(rc, self.group, "bind" if bind else "configure")
        if bind:
            self.bound = True

    def read(self, timeout_ms: int = 0) -> int:
        """Receive one kernel batch; the number of records (0 when none came in time).

        Raises BufferOverflow after an overrun (the C side has counted it already).
        """
        return check(lib.nflogd_read(self._r, timeout_ms), self.group, "receive")

    def table(self, count: int) -> bytes:
        """The last batch's records, in the wire format's record layout."""
        return ffi.buffer(self._r.records, count * RECORD_SIZE)[:]

    def data(self) -> bytes:
        """The last batch's payloads and prefixes, which the records point into."""
        return ffi.buffer(self._r.data, self._r.data_len)[:]

    @property
    def batch_bytes(self) -> int:
        return self._r.batch_bytes

    @property
    def batch_truncated(self) -> int:
        return self._r.batch_truncated

    @property
    def lost(self) -> int:
        """Packets missing from the NFLOG sequence since the bind."""
        return self._r.lost

    @property
    def overflows(self) -> int:
        """ENOBUFS events since the socket opened."""
        return self._r.overflows

    @property
    def kernel_error(self) -> int:
        """errno of the last error the kernel reported without being asked (0: none)."""
        return self._r.last_error

    def close(self) -> None:
        """Unbind the group and close the socket (also when the object is collected)."""
        r = getattr(self, "_r", None)
        if r is None:
            return
        if self.bound:
            lib.nflogd_unbind(r)
            self.bound = False
        self._r = None
        ffi.release(r)


def set_keepcaps(on: bool) -> None:
    """prctl(PR_SET_KEEPCAPS): keep the permitted capabilities across setuid()."""
    rc = lib.nflogd_set_keepcaps(1 if on else 0)
    if rc < 0:
        raise OSError(-rc, f"PR_SET_KEEPCAPS: {os.strerror(-rc)}")


def keep_net_admin() -> None:
    """Reduce the permitted and effective capabilities to CAP_NET_ADMIN alone."""
    rc = lib.nflogd_keep_net_admin()
    if rc < 0:
        raise OSError(-rc, f"capset(CAP_NET_ADMIN): {os.strerror(-rc)}")


def confine() -> None:
    """Bounding set down to CAP_NET_ADMIN (where CAP_SETPCAP allows) and PR_SET_NO_NEW_PRIVS."""
    rc = lib.nflogd_confine()
    if rc < 0:
        raise OSError(-rc, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(-rc)}")
