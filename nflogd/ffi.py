"""The binding to nflogd's compiled C: the NFLOG reader (``_nflog.c``), the feed senders
(``feed/_feed.c``, ``feed/_peers.c``) and the relay's upstream reader (``feed/_upstream.c``).

errno becomes an exception in one place (``check``, which names a busy group's holder from
/proc and asks ``privileges`` whether CAP_NET_ADMIN is held), and kernel units appear only
here (the flush timeout goes to the kernel in 1/100 s)::

    sock = NflogSocket(5)
    sock.set_rcvbuf(8 << 20)
    sock.configure(copy_range=65535, queue_threshold=64, flush_ms=10, bind=True)
    n = sock.read(timeout_ms=100)      # records in sock.table(n), payloads in sock.data()
    sock.close()

    feed = CFeed(epoch)
    with feed:                         # the mutex every user of the peers holds
        feed.set_node(b"r1")
        peer = feed.add_peer(fd)       # a subscriber's socket, its handshake done (feed/server.py)
    sock.pump(feed, timeout_ms=1000)   # read and publish until idle, woken or overrun

    load_zmq(pyzmq_module_path)        # the relay: libzmq as pyzmq loaded it
    up = CUpstream(socket.underlying)  # an upstream's libzmq socket
    status = up.pass_to(feed, 64)      # its messages onto the feed: EMPTY, MORE or HELD
    ups = CUpstreams(gather_us=2000)   # or read by a thread of their own:
    threading.Thread(target=ups.run, args=(feed,)).start()
    with ups:
        ups.add(up, socket.getsockopt(zmq.FD))

Every call releases the GIL (CFFI does for every call into the module).
"""

from __future__ import annotations

import errno
import math
import os
import struct

from ._nflog_cffi import ffi, lib
from .errors import BufferOverflow, GroupBusy, NFLogError, NoPermission
from .privileges import CAP_NET_ADMIN, has_capability

__all__ = [
    "NflogSocket",
    "CFeed",
    "CUpstream",
    "CUpstreams",
    "load_zmq",
    "check",
    "RECORD_SIZE",
    "KERNEL_NLBUFSIZ",
]

RECORD_SIZE = ffi.sizeof("struct nflogd_record")
#: The (group, node)s whose messages ``CUpstreams`` notes between two takes.
NOTED_MAX = lib.NFLOGD_NOTED_MAX

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


def _free_reader(r) -> None:
    """The reader's end."""
    lib.nflogd_reader_free(r)


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
        self._r = ffi.gc(r, _free_reader)
        self.bound = False

    def fileno(self) -> int:
        return self._r.fd

    @property
    def portid(self) -> int:
        return self._r.portid

    def set_rcvbuf(self, nbytes: int) -> None:
        """Size the socket's receive buffer (SO_RCVBUFFORCE, past net.core.rmem_max)."""
        check(lib.nflogd_set_rcvbuf(self._r, nbytes), self.group, "set receive buffer")

    def configure(
        self,
        *,
        copy_range: int,
        queue_threshold: int,
        flush_ms: int,
        bind: bool = False,
        conntrack: bool = False,
    ) -> None:
        """Bind (when ``bind``) and set the group's copy range, batch size and flush time.

        ``copy_range`` 0 copies metadata only. ``flush_ms`` is rounded up to the kernel's
        1/100 s (at least 1). Sequence numbering (NFULNL_CFG_F_SEQ) is always on;
        ``conntrack`` adds NFULNL_CFG_F_CONNTRACK: each packet's connection (NFULA_CT).
        """
        timeout_cs = max(1, math.ceil(flush_ms / 10))
        args = (copy_range, queue_threshold, timeout_cs, KERNEL_NLBUFSIZ, 1 if conntrack else 0)
        rc = lib.nflogd_configure(self._r, 1 if bind else 0, *args)
        if rc == -errno.EAGAIN and conntrack:
            # nfulnl_recv_config() loaded the conntrack netlink module and asks to try again.
            rc = lib.nflogd_configure(self._r, 1 if bind else 0, *args)
        if rc == -errno.EOPNOTSUPP and conntrack:
            raise NFLogError(
                errno.EOPNOTSUPP,
                f"group {self.group}: conntrack: the kernel has no conntrack netlink (nf_conntrack_netlink)",
            )
        check(rc, self.group, "bind" if bind else "configure")
        if bind:
            self.bound = True

    def read(self, timeout_ms: int = 0) -> int:
        """Receive one kernel batch; the number of records (0 when none came in time).

        Raises BufferOverflow after an overrun (the C side has counted it already).
        """
        return check(lib.nflogd_read(self._r, timeout_ms), self.group, "receive")

    def set_ifnames(self, names: dict[int, str]) -> None:
        """The interface names of the socket's namespace (index -> name): each batch's data
        then ends with the names of its interfaces (the wire header's IFNAMES flag)."""
        blob = bytearray()
        for index in sorted(names):
            name = names[index].encode()[:15]
            blob += struct.pack("<IB", index, len(name)) + name
        check(lib.nflogd_set_ifnames(self._r, bytes(blob), len(blob), len(names)), self.group, "set ifnames")

    @property
    def batch_flags(self) -> int:
        """The wire header's flags for the last batch."""
        return int(self._r.batch_flags)

    def parse(self, buf: bytes) -> int:
        """Parse one receive buffer of kernel messages into the batch, as ``read()`` does
        after its recv(): the record count. For tests and fuzzing of the parser."""
        return check(lib.nflogd_parse(self._r, buf, len(buf)), self.group, "parse")

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

    def pump_until_idle(self, feed: CFeed | None, idle_ms: int, sent: bool) -> int:
        """As pump(), but waiting with no end until a batch was sent (or ``sent``: one was before),
        then until a read gets nothing within ``idle_ms``: 2 (idle after traffic), 0 if woken, 1
        after an overrun."""
        rc = lib.nflogd_pump_until_idle(self._r, feed._f if feed is not None else ffi.NULL, idle_ms, sent)
        return check(rc, self.group, "receive")

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


class CFeed:
    """The feed as the C sender sees it: its own peers (``feed/_peers.c``) and the mutex every
    user of them holds.

    ``with feed:`` holds the mutex (waiting without the GIL); every other method but
    ``sent`` is called holding it.
    """

    def __init__(self, epoch: int):
        f = lib.nflogd_feed_new(epoch)
        if f == ffi.NULL:
            raise MemoryError("nflogd_feed_new")
        self._f = ffi.gc(f, lib.nflogd_feed_free)
        self._p = lib.nflogd_feed_peers(self._f)

    def __enter__(self) -> CFeed:
        lib.nflogd_feed_lock(self._f)
        return self

    def __exit__(self, *exc) -> None:
        lib.nflogd_feed_unlock(self._f)

    def set_node(self, node: bytes) -> None:
        """The node name stamped on each message; the caller holds the lock."""
        if lib.nflogd_feed_set_node(self._f, node, len(node)) < 0:
            raise ValueError(f"node name is {len(node)} bytes in UTF-8, at most 255")

    # -- the feed's own peers (feed/_peers.c) ------------------------------------------

    def set_peer_poll(self, epfd: int, wake_fd: int) -> None:
        """The epoll on which a peer with queued messages is armed for EPOLLOUT, and the
        eventfd written when a peer begins to drop messages (-1: none)."""
        lib.nflogd_peers_set_poll(self._p, epfd, wake_fd)

    def set_hwm(self, hwm: int) -> None:
        """Messages a peer may have queued; past that its new ones are dropped (counted)."""
        lib.nflogd_peers_set_hwm(self._p, hwm)

    def set_filter_linger(self, ms: int) -> None:
        """How long a filter's run goes on once no peer holds it (publish.filter_linger_ms)."""
        lib.nflogd_peers_set_filter_linger(self._p, ms)

    def set_max_queued_bytes(self, max_bytes: int) -> None:
        """Bytes every peer's queue may hold together; past them a new message is dropped for
        a peer that would queue it (counted in ``peer_dropped`` and ``full_dropped``)."""
        lib.nflogd_peers_set_max_bytes(self._p, max_bytes)

    @property
    def queued_bytes(self) -> int:
        """Bytes queued now for every peer (a message queued for several counts once)."""
        return lib.nflogd_peers_queued_bytes(self._p)

    @property
    def full_dropped(self) -> int:
        """Messages dropped for a peer because the queues held their maximum of bytes."""
        return lib.nflogd_peers_full_dropped(self._p)

    def add_peer(self, fd: int) -> int:
        """A subscriber's socket, its handshake done: from now on only the feed writes it.
        Its id, or -errno."""
        return lib.nflogd_peers_add(self._p, fd)

    def set_peer_curve(self, peer: int, key: bytes, nonce: int) -> None:
        """The peer speaks CURVE: its frames boxed with ``key`` (crypto_box_beforenm's),
        ``nonce`` the next short nonce."""
        if len(key) != 32 or lib.nflogd_peers_set_curve(self._p, peer, key, nonce) < 0:
            raise KeyError(peer)

    def peer_nonce(self, peer: int) -> int:
        """A CURVE peer's next short nonce (0: not CURVE)."""
        return lib.nflogd_peers_nonce(self._p, peer)

    def remove_peer(self, peer: int) -> None:
        """Forget the peer and its queue; the caller closes its socket afterwards."""
        lib.nflogd_peers_remove(self._p, peer)

    def peer_filter(self, peer: int, every: bool, prefix: bytes, exact: bytes | bytearray | None) -> None:
        """The groups the peer gets: all, those whose high byte has its bit in the 32 bytes of
        ``prefix``, those whose bit is set in the 8192 bytes of ``exact``."""
        bits = ffi.from_buffer(exact) if exact is not None else ffi.NULL
        rc = lib.nflogd_peers_filter(self._p, peer, 1 if every else 0, ffi.from_buffer(prefix), bits)
        if rc < 0:
            raise MemoryError("nflogd_peers_filter") if rc == -errno.ENOMEM else KeyError(peer)

    def set_peer_filter(self, peer: int, spec: bytes | None) -> tuple[int, str]:
        """The peer's filter (a spec of ``nflogd_client.filters``; None: none) in place of its
        old one: (its slot, ""), or (-1, the one-line reason it was refused: the peer keeps
        its old one)."""
        why = ffi.new("char[]", 256)
        data = ffi.from_buffer(spec) if spec is not None else ffi.NULL
        rc = lib.nflogd_peers_set_filter(self._p, peer, data, len(spec or b""), why, 256)
        if rc == -errno.ENOENT:
            raise KeyError(peer)
        return (rc, "") if rc >= 0 or spec is None else (-1, ffi.string(why).decode(errors="replace"))

    def set_peer_filter_topic(self, peer: int, topic: bytes | None) -> None:
        """The topic of the peer's filtered messages: ``topic`` (``wire.FILTERED_TOPIC`` and
        its filter's id) and the group; None: the group's alone."""
        if topic is not None and len(topic) != lib.NFLOGD_FILTERED_TOPIC:
            raise ValueError(f"a filtered topic of {len(topic)} bytes")
        if lib.nflogd_peers_set_filter_topic(self._p, peer, topic if topic is not None else ffi.NULL) < 0:
            raise KeyError(peer)

    def filters(self) -> list[tuple[str, str, int, int, int]]:
        """Each filter in use: (digest in hex, its text, holders, packets passed, dropped)."""
        fs = lib.nflogd_peers_filters(self._p)
        text = ffi.new("char[]", 256)
        out = []
        for slot in range(lib.NFLOGD_FILTER_MAX):
            holders = lib.nflogd_filters_holders(fs, slot)
            if holders:
                n = lib.nflogd_filters_text(fs, slot, text, 256)
                out.append((
                    f"{lib.nflogd_filters_digest(fs, slot):016x}",
                    ffi.unpack(text, n).decode(errors="replace"),
                    holders, lib.nflogd_filters_passed(fs, slot), lib.nflogd_filters_dropped(fs, slot),
                ))  # fmt: skip
        return out

    def sent_bytes(self) -> int:
        """Bytes written to the peers (a CURVE one's boxed)."""
        return lib.nflogd_peers_sent_bytes(self._p)

    def flush_peer(self, peer: int) -> int:
        """Write what the peer has queued: 1 all of it, 0 its socket is full, -errno failed."""
        return lib.nflogd_peers_flush(self._p, peer)

    def peer_command(self, peer: int, frame: bytes) -> int:
        """A command frame to the peer after its queue: 1 sent or queued, 0 dropped, -errno."""
        return lib.nflogd_peers_command(self._p, peer, ffi.from_buffer(frame), len(frame))

    def peer_message(self, peer: int, frames) -> int:
        """A message (1 to 4 frames) to the peer as the feed's go (boxed for a CURVE peer,
        dropped and counted at its hwm): 1 sent or queued, 0 or 2 dropped, -errno."""
        bufs = [ffi.from_buffer(f) for f in frames] + [ffi.NULL] * (4 - len(frames))
        lens = [len(f) for f in frames] + [0] * (4 - len(frames))
        return lib.nflogd_peers_message(
            self._p, peer, bufs[0], lens[0], bufs[1], lens[1], bufs[2], lens[2], bufs[3], lens[3], len(frames)
        )

    def peer_queued(self, peer: int = -1) -> int:
        """Messages the peer (-1: every peer) has queued now."""
        return lib.nflogd_peers_queued(self._p, peer)

    def peer_queued_packets(self) -> int:
        """The packets in the messages every peer has queued now."""
        return lib.nflogd_peers_queued_packets(self._p)

    def peer_dropped(self, peer: int = -1) -> int:
        """Messages dropped for the peer (-1: every peer, gone ones too) at its hwm."""
        return lib.nflogd_peers_dropped(self._p, peer)

    def forward(self, frames) -> None:
        """One message as a relay received it (four frames, zmq.Frames or bytes; the topic's 2
        bytes the group's) to every peer subscribed to its group; the mutex taken in C around
        it (the caller does not hold it): one call a message, the relay's path."""
        topic, header, table, data = map(ffi.from_buffer, frames)
        lib.nflogd_feed_forward(self._f, topic, header, len(header), table, len(table), data, len(data), -1)

    def send_to_peers(self, group: int, frames) -> None:
        """One message (its four frames) to every peer subscribed to ``group``."""
        topic, header, table, data = (ffi.from_buffer(f) for f in frames)
        lib.nflogd_peers_send(
            self._p, group, topic, len(topic), header, len(header), table, len(table), data, len(data)
        )

    @property
    def sent(self) -> int:
        return lib.nflogd_feed_sent(self._f)


def load_zmq(path: str) -> None:
    """Read upstream sockets (``CUpstream``) through the libzmq that the loaded object at
    ``path`` uses (pyzmq's extension module); ValueError with the reason if it has none."""
    why = ffi.new("char[]", 256)
    if lib.nflogd_zmq_load(os.fsencode(path), why, 256) < 0:
        raise ValueError(ffi.string(why).decode(errors="replace"))


class CUpstream:
    """One upstream's libzmq socket as ``feed/_upstream.c`` reads it: its messages straight onto
    a ``CFeed``, and back to Python only what needs Python. ``load_zmq()`` first.

    ``filtered``: a filter's connection (its messages on the filters' topics are handed back,
    any other is dropped); ``keep``: every message forwarded is handed back too.
    """

    #: pass_to(): the socket has nothing more; burst messages were read; one is held (held()).
    EMPTY, MORE, HELD = 0, 1, 2

    def __init__(self, socket_address: int, filtered: bool = False, keep: bool = False):
        u = lib.nflogd_upstream_new(socket_address, int(filtered), int(keep))
        if u == ffi.NULL:
            raise MemoryError("nflogd_upstream_new (load_zmq first)")
        self._u = ffi.gc(u, lib.nflogd_upstream_free)  # its counters outlive close()
        self._len = ffi.new("uint32_t *")
        self._notes = ffi.new("const uint8_t **")

    def close(self) -> None:
        """Let go of the held message; before the socket closes (the counters stay)."""
        lib.nflogd_upstream_clear(self._u)

    def pass_to(self, feed: CFeed, burst: int) -> int:
        """Up to ``burst`` messages onto the feed (the caller does not hold its mutex): EMPTY,
        MORE or HELD; OSError if libzmq failed."""
        return _checked(lib.nflogd_upstream_pass(self._u, feed._f, burst))

    def held(self) -> list[bytes]:
        """The held message's frames, copied."""
        u, n = self._u, self._len
        out = []
        for i in range(lib.nflogd_upstream_held(u)):
            p = lib.nflogd_upstream_frame(u, i, n)
            out.append(ffi.unpack(ffi.cast("char *", p), n[0]))
        return out

    @property
    def held_forwarded(self) -> bool:
        """The held message went onto the feed already (it is handed back for ``keep``)."""
        return bool(lib.nflogd_upstream_held_forwarded(self._u))

    def notes(self) -> list[bytes]:
        """The header frames of the last pass's forwarded messages."""
        size = lib.NFLOGD_NOTE_SIZE
        n = lib.nflogd_upstream_notes(self._u, self._notes)
        raw = ffi.buffer(self._notes[0], n * size)[:] if n else b""
        return [_note(raw, at) for at in range(0, len(raw), size)]

    @property
    def messages(self) -> int:
        return lib.nflogd_upstream_messages(self._u)

    @property
    def bytes_in(self) -> int:
        return lib.nflogd_upstream_bytes(self._u)

    @property
    def unsent(self) -> int:
        """Messages of more than four frames, dropped."""
        return lib.nflogd_upstream_unsent(self._u)


class CUpstreams:
    """Upstreams read by a thread of their own (``feed/_upstream.h``): ``run()``, called in
    that thread, passes their messages to the feed until ``stop()``, and keeps the last header
    it forwarded of each (group, node), and its last mark, with the time it was read, for
    ``take_notes()``.

    ``with ups:`` holds the set's mutex: ``add()``, ``remove()``, ``recheck()`` are called
    holding it, and so is any use of a member's socket (followed by ``recheck()``).
    """

    def __init__(self, gather_us: int):
        s = lib.nflogd_upstreams_new(gather_us)
        if s == ffi.NULL:
            raise MemoryError("nflogd_upstreams_new")
        self._s = ffi.gc(s, lib.nflogd_upstreams_free)
        self._notes = ffi.new("uint8_t[]", 2 * lib.NFLOGD_NOTED_MAX * lib.NFLOGD_TAKEN_NOTE_SIZE)

    def __enter__(self) -> CUpstreams:
        lib.nflogd_upstreams_lock(self._s)
        return self

    def __exit__(self, *exc) -> None:
        lib.nflogd_upstreams_unlock(self._s)

    def add(self, up: CUpstream, zmq_fd: int) -> None:
        _checked(lib.nflogd_upstreams_add(self._s, up._u, zmq_fd))

    def remove(self, up: CUpstream) -> None:
        lib.nflogd_upstreams_remove(self._s, up._u)

    def recheck(self, up: CUpstream) -> None:
        lib.nflogd_upstreams_recheck(self._s, up._u)

    def run(self, feed: CFeed) -> None:
        """The thread's body (without the GIL); OSError if its epoll failed."""
        _checked(lib.nflogd_upstreams_run(self._s, feed._f))

    def stop(self) -> None:
        lib.nflogd_upstreams_stop(self._s)

    @property
    def notes_fd(self) -> int:
        """Readable once half the (group, node)s that can be noted between takes are."""
        return lib.nflogd_upstreams_notes_fd(self._s)

    def take_notes(self) -> list[tuple[float, bytes]]:
        """The notes kept, in the order they were read: (``time.monotonic()`` seconds it was
        read at, the header frame)."""
        size = lib.NFLOGD_TAKEN_NOTE_SIZE
        n = lib.nflogd_upstreams_take_notes(self._s, self._notes, 2 * lib.NFLOGD_NOTED_MAX)
        raw = ffi.buffer(self._notes, n * size)[:]
        notes = []
        for at in range(0, len(raw), size):
            when, order = _NOTED.unpack_from(raw, at)
            notes.append((order, when / 1e9, _note(raw, at + _NOTED.size)))
        notes.sort()
        return [(when, header) for _, when, header in notes]

    @property
    def notes_dropped(self) -> int:
        """Notes of a (group, node) past NFLOGD_NOTED_MAX between takes, not kept."""
        return lib.nflogd_upstreams_notes_dropped(self._s)

    @property
    def errors(self) -> int:
        """Members whose read failed (libzmq), left alone since."""
        return lib.nflogd_upstreams_errors(self._s)


#: A taken note's time (CLOCK_MONOTONIC ns) and place in the order read, before the note.
_NOTED = struct.Struct("=QQ")


def _note(raw: bytes, at: int) -> bytes:
    """The header frame of the note at ``at``: its length (2 bytes, big-endian), then it."""
    return raw[at + 2 : at + 2 + (raw[at] << 8 | raw[at + 1])]


def _checked(rc: int) -> int:
    """``rc`` of the upstream reader's C, or OSError for its -errno."""
    if rc < 0:
        raise OSError(-rc, os.strerror(-rc))
    return rc
