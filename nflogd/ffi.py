"""The binding to nflogd's compiled C: the NFLOG reader (``_nflog.c``) and the feed sender (``_feed.c``).

errno becomes an exception in one place (``check``, which names a busy group's holder from
/proc and asks ``privileges`` whether CAP_NET_ADMIN is held), and kernel units appear only
here (the flush timeout goes to the kernel in 1/100 s)::

    sock = NflogSocket(5)
    sock.set_rcvbuf(8 << 20)
    sock.configure(copy_range=65535, queue_threshold=64, flush_ms=10, bind=True)
    n = sock.read(timeout_ms=100)      # records in sock.table(n), payloads in sock.data()
    sock.close()

    feed = CFeed.create(epoch)         # None when pyzmq's libzmq cannot be shared
    with feed:                         # the mutex every user of the sockets holds
        feed.set_sockets([xpub]); feed.set_node(b"r1")
    sock.pump(feed, timeout_ms=1000)   # read and publish until idle, woken or overrun

Every call releases the GIL (CFFI does for every call into the module).
"""

from __future__ import annotations

import errno
import math
import os
import threading

from ._nflog_cffi import ffi, lib
from .errors import BufferOverflow, GroupBusy, NFLogError, NoPermission
from .privileges import CAP_NET_ADMIN, has_capability

__all__ = ["NflogSocket", "CFeed", "check", "RECORD_SIZE", "KERNEL_NLBUFSIZ"]

RECORD_SIZE = ffi.sizeof("struct nflogd_record")

#: The kernel's batch skb size (NFULA_CFG_NLBUFSIZ): its maximum, 128 KiB, so that one
#: netlink message carries as many packets as the queue threshold allows.
KERNEL_NLBUFSIZ = 131072

#: Where the kernel lists bound groups: "group portid qlen copy_mode copy_range timeout use".
PROC_NFLOG = "/proc/net/netfilter/nfnetlink_log"


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


def port_process(portid: int) -> tuple[int, str] | None:
    """(pid, command) of a process holding the NETLINK_NETFILTER socket ``portid`` in this
    thread's namespace: its inode from /proc/net/netlink, then the /proc/PID/fd that links to
    it; None where /proc does not tell (another namespace's process, no permission)."""
    inode = None
    try:
        with open("/proc/thread-self/net/netlink") as f:
            next(f)  # sk Eth Pid Groups Rmem Wmem Dump Locks Drops Inode
            for line in f:
                cols = line.split()
                if len(cols) >= 10 and cols[1] == "12" and int(cols[2]) == portid:  # NETLINK_NETFILTER
                    inode = cols[9]
                    break
    except (OSError, ValueError, StopIteration):
        return None
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != target:
                    continue
                with open(f"/proc/{pid}/comm") as f:
                    return int(pid), f.read().strip()
            except OSError:
                continue
    return None


def check(rc: int, group: int, op: str) -> int:
    """Return ``rc`` if it is not a negative errno, else raise the matching NFLogError."""
    if rc >= 0:
        return rc
    err = -rc
    if err == errno.ENOBUFS:
        raise BufferOverflow()
    if err == errno.EPERM and op == "bind":
        if not has_capability(CAP_NET_ADMIN):
            raise NoPermission(group)
        portid = group_holder(group)
        raise GroupBusy(group, portid, None if portid is None else port_process(portid))
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

    def views(self, count: int) -> tuple[memoryview, memoryview]:
        """``table(count)`` and ``data()`` without a copy: valid only until the next read()."""
        r = self._r
        return (
            memoryview(ffi.buffer(r.records, count * RECORD_SIZE)),
            memoryview(ffi.buffer(r.data, r.data_len)),
        )

    def wake(self) -> None:
        """End a read() or pump() that another thread is waiting in (it returns 0)."""
        check(lib.nflogd_wake(self._r), self.group, "wake")

    def pump(self, feed: CFeed | None, timeout_ms: int) -> bool:
        """Read batches and send each on ``feed`` (None: only count them) until a read gets
        nothing within ``timeout_ms`` (-1: no end) or wake() was called (False), or an overrun was
        counted (True). Raises NFLogError for anything else."""
        rc = lib.nflogd_pump(self._r, feed._f if feed is not None else ffi.NULL, timeout_ms)
        return check(rc, self.group, "receive") == 1

    @property
    def feed_seq(self) -> int:
        """The ``first_seq`` of the next message pump() sends."""
        return self._r.feed_seq

    @feed_seq.setter
    def feed_seq(self, value: int) -> None:
        self._r.feed_seq = value

    @property
    def dropped_base(self) -> int:
        """Kernel drops of this group before this socket, added to the feed's kernel_dropped."""
        return self._r.dropped_base

    @dropped_base.setter
    def dropped_base(self, value: int) -> None:
        self._r.dropped_base = value

    @property
    def packets(self) -> int:
        """Records read since the bind."""
        return self._r.packets

    @property
    def bytes(self) -> int:
        """Their real lengths, added up."""
        return self._r.bytes

    @property
    def truncated(self) -> int:
        """Records the copy range cut (caplen < len)."""
        return self._r.truncated

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
    def buffers(self) -> int:
        """Receive buffers (kernel batches) read since the socket opened."""
        return self._r.buffers

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


def _libzmq_path() -> str | None:
    """The file of the one libzmq mapped into this process (pyzmq's), if there is one."""
    found = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if line.count(" ") >= 5 else ""
                if os.path.basename(path).startswith("libzmq"):
                    found.add(path)
    except OSError:
        return None
    return found.pop() if len(found) == 1 else None


_zmq_loaded: bool | None = None
_zmq_lock = threading.Lock()


def load_libzmq() -> bool:
    """Give the C feed sender pyzmq's own libzmq; False when it cannot be found or its
    version is not pyzmq's (then the feed is sent from Python)."""
    global _zmq_loaded
    with _zmq_lock:
        if _zmq_loaded is None:
            import zmq

            path = _libzmq_path()
            version = ffi.new("int[3]")
            ok = (
                path is not None
                and lib.nflogd_zmq_load(path.encode(), version, version + 1, version + 2) == 0
            )
            _zmq_loaded = ok and tuple(version) == zmq.zmq_version_info()
        return _zmq_loaded


class CFeed:
    """The feed's sockets as the C sender sees them, and the mutex every user of them holds.

    ``with feed:`` holds the mutex (waiting without the GIL). ``CFeed.create()`` returns
    None when pyzmq's libzmq cannot be shared (see ``load_libzmq``).
    """

    def __init__(self, epoch: int):
        f = lib.nflogd_feed_new(epoch)
        if f == ffi.NULL:
            raise MemoryError("nflogd_feed_new")
        self._f = ffi.gc(f, lib.nflogd_feed_free)

    @classmethod
    def create(cls, epoch: int) -> CFeed | None:
        return cls(epoch) if load_libzmq() else None

    def __enter__(self) -> CFeed:
        lib.nflogd_feed_lock(self._f)
        return self

    def __exit__(self, *exc) -> None:
        lib.nflogd_feed_unlock(self._f)

    def set_sockets(self, sockets) -> None:
        """The pyzmq sockets to send on, at most two; the caller holds the lock."""
        ptrs = [ffi.cast("void *", s.underlying) for s in sockets] + [ffi.NULL] * (2 - len(sockets))
        lib.nflogd_feed_set_sockets(self._f, ptrs[0], ptrs[1])

    def set_node(self, node: bytes) -> None:
        """The node name stamped on each message; the caller holds the lock."""
        if lib.nflogd_feed_set_node(self._f, node, len(node)) < 0:
            raise ValueError(f"node name is {len(node)} bytes in UTF-8, at most 255")

    def wake_on_incoming(self, fd: int) -> None:
        """A send that finds a socket with incoming messages writes 1 to the eventfd ``fd``,
        once; the caller holds the lock."""
        lib.nflogd_feed_wake_on_incoming(self._f, fd)

    @property
    def sent(self) -> int:
        return lib.nflogd_feed_sent(self._f)

    @property
    def unsent(self) -> int:
        return lib.nflogd_feed_unsent(self._f)
