"""nflog-tap: the nflogd feed as a pcap stream, JSON lines, or one line per packet.

Usage (the options, link types, limits and exit statuses: ``docs/nflog-tap.md``)::

    nflog-tap                                   # print every packet of every group
    nflog-tap -e tcp://r1:5555 -g 5 -w - | tcpdump -r - -n
    nflog-tap --linktype nflog -w x.pcap        # with prefix, mark, ifindexes, uid, ...
    nflog-tap --format json | jq .              # JSON lines (docs/json-lines.md)
    nflog-tap --stats                           # a live per-group view
    nflog-tap -g 5 udp and dst port 53          # a capture filter, run at the daemon

It never ends with a traceback: a malformed endpoint exits 2 with one line naming it; an
unreachable one is said once on stderr, with its likely cause, and retried; the last line
on stderr counts packets written and lost.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import struct
import sys
import time
from types import FrameType
from typing import IO, Any, Callable, TextIO, Union

import zmq

from . import __version__
from . import jetstream as _jetstream
from . import subscriber as _subscriber
from .events import Event, FeedEvents
from .filters import HOOKS, FilterRefused
from .reorder import Reorder
from .subscriber import Subscriber
from .wire import Packet

#: What the tap reads: the feed, or a JetStream stream of it.
Reader = Union[Subscriber, _jetstream.JetStreamSubscriber]

__all__ = [
    "FAMILY",
    "LINKTYPE_NFLOG",
    "LINKTYPE_RAW",
    "NFULA_GID",
    "NFULA_HWADDR",
    "NFULA_IFINDEX_INDEV",
    "NFULA_IFINDEX_OUTDEV",
    "NFULA_IFINDEX_PHYSINDEV",
    "NFULA_IFINDEX_PHYSOUTDEV",
    "NFULA_MARK",
    "NFULA_PACKET_HDR",
    "NFULA_PAYLOAD",
    "NFULA_PREFIX",
    "NFULA_SEQ",
    "NFULA_TIMESTAMP",
    "NFULA_UID",
    "SNAPLEN",
    "build_parser",
    "main",
    "nflog_record",
]

LINKTYPE_RAW = 101  # raw IPv4 or IPv6, told apart by the version nibble
LINKTYPE_NFLOG = 239
SNAPLEN = 262144  # libpcap's MAXIMUM_SNAPLEN: the file header never truncates a record
_NS = 1_000_000_000

# The LINKTYPE_NFLOG record (libpcap pcap/nflog.h, tcpdump print-nflog.c). Its header is
# the kernel's struct nfgenmsg: family u8, version u8, res_id (the group) big-endian u16.
_HDR = struct.Struct(">BBH")
# Each attribute is a TLV whose length (header included, padding excluded) and type are in
# host byte order, padded to 4 bytes like the kernel's NLA_ALIGN; values are big-endian.
_TLV = struct.Struct("=HH")
_BE32 = struct.Struct(">I")
_PACKET_HDR = struct.Struct(">HBx")  # struct nfulnl_msg_packet_hdr: hw_protocol, hook, pad
_TIMESTAMP = struct.Struct(">QQ")  # struct nfulnl_msg_packet_timestamp: sec, usec
_HWADDR = struct.Struct(">H2x8s")  # struct nfulnl_msg_packet_hw: hw_addrlen, pad, hw_addr[8]

# enum nfulnl_attr_type, include/uapi/linux/netfilter/nfnetlink_log.h
NFULA_PACKET_HDR = 1
NFULA_MARK = 2
NFULA_TIMESTAMP = 3
NFULA_IFINDEX_INDEV = 4
NFULA_IFINDEX_OUTDEV = 5
NFULA_IFINDEX_PHYSINDEV = 6
NFULA_IFINDEX_PHYSOUTDEV = 7
NFULA_HWADDR = 8
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NFULA_UID = 11
NFULA_SEQ = 12
NFULA_GID = 14

#: hw_protocol -> the header's family: AF_INET, AF_INET6; AF_UNSPEC for anything else.
FAMILY = {0x0800: 2, 0x86DD: 10}


#: The longest attribute value a TLV's u16 length can carry.
_TLV_MAX_VALUE = 0xFFFF - _TLV.size
#: The latest seconds of a pcap record header that libpcap reads (it takes them as a signed
#: 32-bit time: tcpdump shows later ones as "Error converting time"): 2038-01-19 03:14:07 UTC.
_PCAP_SEC_MAX = 0x7FFFFFFF


def _pcap_time(ts_ns: int) -> tuple[int, int]:
    """(sec, usec) for a pcap record header; a time past 2038 (pcap's limit) is clamped."""
    sec, ns = divmod(ts_ns, _NS)
    if sec > _PCAP_SEC_MAX:
        return _PCAP_SEC_MAX, 999_999
    return sec, ns // 1000


def _tlv(kind: int, value: bytes) -> bytes:
    value = value[:_TLV_MAX_VALUE]  # a longer value (a 70,000-byte payload) is cut to fit
    n = _TLV.size + len(value)
    return _TLV.pack(n, kind) + value + b"\0" * (-n % 4)


def nflog_record(p: Packet) -> bytes:
    """One LINKTYPE_NFLOG record: the attributes the kernel sent, in the kernel's order."""
    parts = [
        _HDR.pack(FAMILY.get(p.hw_protocol, 0), 0, p.group),
        _tlv(NFULA_PACKET_HDR, _PACKET_HDR.pack(p.hw_protocol, p.hook)),
    ]
    if p.prefix is not None:  # NUL-terminated, the count including the NUL
        parts.append(_tlv(NFULA_PREFIX, p.prefix.encode()[: _TLV_MAX_VALUE - 1] + b"\0"))
    for kind, value in (
        (NFULA_IFINDEX_INDEV, p.indev),
        (NFULA_IFINDEX_PHYSINDEV, p.physindev),
        (NFULA_IFINDEX_OUTDEV, p.outdev),
        (NFULA_IFINDEX_PHYSOUTDEV, p.physoutdev),
        (NFULA_MARK, p.mark),
    ):
        if value is not None:
            parts.append(_tlv(kind, _BE32.pack(value)))
    hw = p.hwaddr
    if hw is not None:
        parts.append(_tlv(NFULA_HWADDR, _HWADDR.pack(len(hw), hw)))
    if p.ts_kernel:  # the daemon's receive time is no kernel timestamp: only in the pcap header
        sec, ns = divmod(p.ts_ns, _NS)
        parts.append(_tlv(NFULA_TIMESTAMP, _TIMESTAMP.pack(min(sec, 2**64 - 1), ns // 1000)))
    for kind, value in ((NFULA_UID, p.uid), (NFULA_GID, p.gid), (NFULA_SEQ, p.kernel_seq)):
        if value is not None:
            parts.append(_tlv(kind, _BE32.pack(value)))
    if p.caplen:
        parts.append(_tlv(NFULA_PAYLOAD, p.data))
    return b"".join(parts)


def _group(text: str) -> int:
    try:
        g = int(text)
    except ValueError:
        g = -1
    if not 0 <= g <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"NFLOG groups are integers 0..65535, got {text!r}")
    return g


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"a packet count is a positive integer, got {text!r}")
    return n


def _window(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 10_000:
        raise argparse.ArgumentTypeError(f"a reordering window is 0..10000 milliseconds, got {text!r}")
    return n


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="nflog-tap",
        description="Write the nflogd feed as pcap (-w), or print one line per packet.",
        epilog="Default endpoint: $NFLOGD_ENDPOINT, else " + _subscriber.DEFAULT_ENDPOINT + ".",
    )
    ap.add_argument("--version", action="version", version=f"nflog-tap {__version__}")
    ap.add_argument(
        "-e",
        "--endpoint",
        action="append",
        metavar="ENDPOINT",
        help="ZeroMQ endpoint of a daemon's feed (ipc://..., tcp://host:port); repeat for several",
    )
    ap.add_argument(
        "-g",
        "--group",
        action="append",
        type=_group,
        metavar="GROUP",
        help="NFLOG group; repeat; default all",
    )
    ap.add_argument("-c", "--count", type=_count, metavar="COUNT", help="stop after COUNT packets")
    ap.add_argument(
        "-w",
        "--write",
        metavar="FILE",
        help="write to FILE (pcapng if it ends in .pcapng, else pcap, unless --format says), '-' for stdout",
    )
    ap.add_argument(
        "--format",
        choices=("text", "pcap", "pcapng", "json"),
        help="text: a line per packet (default without -w); pcap (default with -w); "
        "pcapng: an interface per (node, group), each packet's attributes in its comment; "
        "json: JSON lines, a packet, loss or restart per line (docs/json-lines.md)",
    )
    ap.add_argument("--payload", action="store_true", help="json: each packet's captured bytes, base64")
    ap.add_argument(
        "--ifnames",
        action="store_true",
        help="json: name interfaces by this host's indexes for every node "
        "(default: only for the node named like this host)",
    )
    ap.add_argument(
        "--reorder-ms",
        type=_window,
        default=0,
        metavar="MS",
        help="hold packets up to MS milliseconds to write several groups or daemons in time order "
        "(default 0: off)",
    )
    ap.add_argument(
        "--linktype",
        choices=("ip", "nflog"),
        default="ip",
        help="ip: LINKTYPE_RAW, the packets (default); nflog: LINKTYPE_NFLOG, with the NFLOG attributes",
    )
    ap.add_argument(
        "--stats",
        action="store_true",
        help="instead of packets: packets/s, bytes/s and loss per group, redrawn each second",
    )
    ap.add_argument(
        "--server-key",
        metavar="KEY",
        help="CURVE: the daemon's public key, its .key file or 40 Z85 characters (with --client-key)",
    )
    ap.add_argument(
        "--client-key", metavar="FILE", help="CURVE: this client's NAME.key_secret file (with --server-key)"
    )
    meta = ap.add_argument_group("filter (run at the daemon; docs/filters.md)")
    meta.add_argument("--prefix", metavar="TEXT", help="packets logged with exactly this log prefix")
    meta.add_argument("--prefix-start", metavar="TEXT", help="packets whose log prefix begins with TEXT")
    meta.add_argument("--mark", type=_mark, metavar="VALUE[/MASK]", help="packets with mark & MASK == VALUE")
    for name, what in (("uid", "of the local socket"), ("gid", "of the local socket"),
                       ("indev", "input interface index"), ("outdev", "output interface index")):  # fmt: skip
        meta.add_argument(f"--{name}", type=_u32, metavar="N", help=f"packets with this {name} ({what})")
    meta.add_argument(
        "--hook", action="append", choices=sorted(HOOKS), help="packets logged at this hook; repeat"
    )
    ap.add_argument(
        "expression",
        nargs="*",
        metavar="EXPRESSION",
        help="capture filter in libpcap's language, as tcpdump takes it (udp and dst port 53)",
    )
    return ap


def _u32(text: str) -> int:
    try:
        n = int(text, 0)
    except ValueError:
        n = -1
    if not 0 <= n <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"expected an integer 0..4294967295, got {text!r}")
    return n


def _mark(text: str) -> tuple[int, int]:
    value, _, mask = text.partition("/")
    return _u32(value), _u32(mask) if mask else 0xFFFFFFFF


def _filter_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Subscriber's filter arguments from the command line (empty: no filter)."""
    out: dict[str, Any] = {}
    if args.expression:
        out["filter"] = " ".join(args.expression)
    for name in ("prefix", "prefix_start", "mark", "uid", "gid", "indev", "outdev", "hook"):
        if getattr(args, name) is not None:
            out[name] = getattr(args, name)
    return out


def _connect(
    endpoints: list[str] | None, groups: list[int] | None, *, prog: str = "nflog-tap", **keys: Any
) -> Reader:
    """The Subscriber; a rejected endpoint or key raises SystemExit(2) after one line naming it."""
    if endpoints and any(_jetstream.is_jetstream_endpoint(e) for e in endpoints):
        return _connect_stream(endpoints, groups, **keys)
    try:
        return Subscriber(endpoints, groups, **keys)
    except (ValueError, TypeError) as e:  # names the endpoint or the key already
        print(f"nflog-tap: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except zmq.ZMQError as e:
        err: BaseException = e
    # Subscriber connects all endpoints on one socket: find the culprit on a throwaway one.
    culprit = None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    for ep in _subscriber._endpoints(endpoints):
        probe = ctx.socket(zmq.SUB)
        try:
            probe.connect(ep)
        except zmq.ZMQError as e:
            culprit, err = ep, e
            break
        finally:
            probe.close(linger=0)
    where = f"endpoint {culprit!r}: " if culprit is not None else ""
    reason = (
        zmq.strerror(err.errno) if isinstance(err, zmq.ZMQError) and err.errno is not None else err
    )  # without "(addr=...)"
    print(f"{prog}: {where}{reason}", file=sys.stderr)
    raise SystemExit(2)


def _connect_stream(
    endpoints: list[str], groups: list[int] | None, **keys: Any
) -> _jetstream.JetStreamSubscriber:
    """A JetStreamSubscriber for one nats:// endpoint (nflogd_client.jetstream); errors as _connect's."""
    try:
        if len(endpoints) != 1:
            raise ValueError("a nats:// endpoint is read alone; give it as the only -e")
        if any(keys.get(k) for k in ("server_public_key", "client_secret_key_file")):
            raise ValueError("--server-key and --client-key are for ZeroMQ endpoints, not nats://")
        if set(keys) - {"server_public_key", "client_secret_key_file"}:
            raise ValueError("a filter is run by a daemon for a ZeroMQ endpoint, not for nats://")
        return _jetstream.JetStreamSubscriber(endpoints[0], groups)
    except ConnectionError as e:  # it names the servers and the stream
        print(f"nflog-tap: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except (ValueError, TypeError, ImportError) as e:
        print(f"nflog-tap: endpoint {endpoints[-1]!r}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


class _Signals:
    """SIGINT and SIGTERM end the capture between packets, never in the middle of a record.

    While the tap waits for the feed the handler raises KeyboardInterrupt to leave the
    blocking receive; otherwise it only sets ``stop``, seen after the current packet.
    """

    def __init__(self) -> None:
        self.stop = False
        self.waiting = False
        self._saved: dict[int, object] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True
        if self.waiting:
            raise KeyboardInterrupt

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._saved[sig] = signal.signal(sig, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._saved.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


class _PcapLimits:
    """Packets the feed carries but pcap cannot hold as they are: a time past 2038, a packet
    over ``SNAPLEN`` (libpcap refuses a record whose original length exceeds it), a payload
    over what an NFLOG attribute holds. Each is written clamped; the first is said on stderr
    in one line, all are counted (``clamped``) for the last line."""

    def __init__(self) -> None:
        self.clamped = 0

    def check(self, p: Packet, sec: int, length: int, cut: bool = False) -> None:
        why = []
        if sec == _PCAP_SEC_MAX and p.ts_ns >= (_PCAP_SEC_MAX + 1) * _NS:
            why.append("a time past 2038 written as 2038-01-19 03:14:07 UTC")
        if length > SNAPLEN or cut:
            why.append(f"a packet of {max(p.len, p.caplen)} bytes cut to fit")
        if not why:
            return
        if not self.clamped:
            print(
                f"nflog-tap: group {p.group} seq {p.seq}: beyond what pcap holds: {', '.join(why)};"
                " such packets are written clamped and counted in the last line",
                file=sys.stderr,
                flush=True,
            )
        self.clamped += 1


def _pcap_writer(out: IO[bytes], linktype: str, limits: _PcapLimits) -> Callable[[Packet], bool | None]:
    from scapy.utils import PcapWriter

    writer = PcapWriter(
        out, linktype=LINKTYPE_NFLOG if linktype == "nflog" else LINKTYPE_RAW, snaplen=SNAPLEN
    )
    writer.write_header(None)  # at once: an empty capture is still a valid file
    write = writer.write_packet

    if linktype == "nflog":

        def emit(p: Packet) -> bool | None:
            sec, usec = _pcap_time(p.ts_ns)
            record = nflog_record(p)
            # As libpcap's nflog device: the record's length is what was captured, and a cut
            # packet shows by its IP header's length. Without payload (a metadata-only group)
            # no header tells: the original length adds the packet's, orig_len - caplen.
            n = len(record)
            wirelen = n if p.caplen else n + p.len
            limits.check(p, sec, wirelen, p.caplen > _TLV_MAX_VALUE)
            write(record[:SNAPLEN], sec=sec, usec=usec, caplen=min(n, SNAPLEN), wirelen=min(wirelen, SNAPLEN))
            return None

    else:

        def emit(p: Packet) -> bool | None:
            sec, usec = _pcap_time(p.ts_ns)
            wirelen = max(p.len, p.caplen)  # a metadata-only packet: no bytes, its real length
            limits.check(p, sec, wirelen)
            data = p.data[:SNAPLEN]  # tcpdump refuses a record over the file's snaplen
            write(data, sec=sec, usec=usec, caplen=len(data), wirelen=min(wirelen, SNAPLEN))
            return None

    return emit


def _format_of(path: str | None) -> str:
    """The output format a -w FILE implies: text without one, pcapng by its name, else pcap."""
    if path is None:
        return "text"
    return "pcapng" if path.lower().endswith(".pcapng") else "pcap"


def _pcapng_writer(
    out: IO[bytes], endpoints: list[str]
) -> tuple[Callable[[Packet], bool | None], Callable[[list[Event]], None]]:
    """pcapng: an interface per (node, group), described by the endpoints; loss and restarts
    as a comment on the next packet."""
    from .events import describe
    from .pcapng import FeedPcapng

    feed = FeedPcapng(out, ", ".join(endpoints), snaplen=SNAPLEN, application=f"nflog-tap {__version__}")
    pending: list[str] = []

    def on_events(events: list[Event]) -> None:
        text = describe(events)
        if text:
            pending.append(text)

    def emit(p: Packet) -> bool | None:
        feed.packet(p, "; ".join(pending) or None)
        pending.clear()
        return None

    return emit, on_events


def _printer(out: IO[str]) -> Callable[[Packet], None]:
    from scapy.config import conf

    from .layers import LAYERS

    def emit(p: Packet) -> None:
        sec, ns = divmod(p.ts_ns, _NS)
        usec = ns // 1000
        when = time.strftime("%H:%M:%S", time.localtime(sec)) + f".{usec:06d}"
        length = f"{p.len}" if p.caplen == p.len else f"{p.len} (captured {p.caplen})"
        prefix = "" if p.prefix is None else f" prefix {p.prefix!r}"
        summary = _short(p)
        if summary is None:
            try:
                summary = LAYERS.get(p.hw_protocol, conf.raw_layer)(p.data).summary()
            except Exception:
                summary = f"{len(p.data)} bytes, hw_protocol {p.hw_protocol:#06x}"
        out.write(f"{when} {p.node or '-'} group {p.group} seq {p.seq} len {length}{prefix} {summary}\n")

    return emit


def _short(p: Packet) -> str | None:
    """What to print for a packet captured short of its addresses, else None (dissect it):
    scapy would fill the missing fields with its defaults (127.0.0.1, proto 0)."""
    data = p.data
    if not data:
        return "no payload (metadata only)"
    version = data[0] >> 4
    if p.hw_protocol == 0x0800 and version == 4 and len(data) < max(20, (data[0] & 15) * 4):
        return f"IPv4, {len(data)} bytes of its header captured, no addresses"
    if p.hw_protocol == 0x86DD and version == 6 and len(data) < 40:
        return f"IPv6, {len(data)} bytes of its header captured, no addresses"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the client's warnings (an endpoint's failure, a malformed message) and recoveries, on stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("nflog-tap: %(message)s"))
    client_log = logging.getLogger("nflogd_client")
    client_log.addHandler(handler)
    saved = client_log.level, client_log.propagate
    client_log.setLevel(logging.INFO)
    client_log.propagate = False
    try:
        with _Signals() as signals:
            return _run(args, signals)
    finally:
        client_log.removeHandler(handler)
        client_log.setLevel(saved[0])
        client_log.propagate = saved[1]


def _run(args: argparse.Namespace, signals: _Signals) -> int:
    if (args.server_key is None) != (args.client_key is None):
        build_parser().error("--server-key and --client-key go together")
    if args.stats and (args.write is not None or args.count is not None):
        build_parser().error("--stats writes and counts no packets: leave out -w and -c")
    sub = _connect(
        args.endpoint, args.group, server_public_key=args.server_key, client_secret_key_file=args.client_key,
        **_filter_options(args),
    )  # fmt: skip
    try:
        return _output(args, signals, sub)
    except FilterRefused as e:
        print(f"nflog-tap: filter refused by the daemon: {e}", file=sys.stderr)
        return 1


def _output(args: argparse.Namespace, signals: _Signals, sub: Reader) -> int:
    if args.stats:
        try:
            return _stats(sub, signals, sys.stdout)
        finally:
            sub.close()
    fmt = args.format or _format_of(args.write)
    if fmt in ("pcap", "pcapng") and args.write is None:
        build_parser().error(f"--format {fmt} needs -w FILE (or -w - for stdout)")
    if fmt == "pcapng" and args.linktype != "ip":
        build_parser().error(
            "--linktype nflog goes with --format pcap; pcapng keeps the attributes in comments"
        )
    if (args.payload or args.ifnames) and fmt != "json":
        build_parser().error("--payload and --ifnames go with --format json")
    out: IO[Any] | None = None
    try:
        binary = fmt in ("pcap", "pcapng")
        if args.write in (None, "-"):
            stream: IO[Any] = sys.stdout.buffer if binary else sys.stdout
        else:
            try:
                stream = open(args.write, "wb" if binary else "w")
            except OSError as e:
                print(f"nflog-tap: cannot write {args.write!r}: {e.strerror}", file=sys.stderr)
                return 1
        out = stream
        emit: Callable[[Packet], bool | None]
        on_events = None
        limits = _PcapLimits()
        if fmt == "text":
            emit = _printer(out)
            done = "printed"
        elif fmt == "pcap":
            emit = _pcap_writer(out, args.linktype, limits)
            out.flush()
            done = "written"
        elif fmt == "pcapng":
            emit, on_events = _pcapng_writer(out, _subscriber._endpoints(args.endpoint))
            out.flush()
            done = "written"
        else:
            from .jsonl import JsonLines

            lines = JsonLines(out, payload=args.payload, ifnames=args.ifnames)
            emit, on_events = lines.packet, lines.events
            done = "written"
        n = flushed = 0  # packets emitted; of those, flushed out of this process
        limit = args.count
        events = FeedEvents(sub)
        reorder = Reorder(args.reorder_ms / 1000)

        def put(p: Packet) -> bool:
            """Write one packet; False if the output cannot hold it."""
            return emit(p) is not False

        try:
            try:
                while not signals.stop and (limit is None or n < limit):
                    out.flush()  # before waiting: every packet received so far is out (per batch)
                    flushed = n
                    signals.waiting = True
                    try:
                        if signals.stop:
                            break
                        batch = sub.recv_batch(reorder.wait(None))
                    finally:
                        signals.waiting = False
                    if batch is not None:
                        if on_events is not None:
                            on_events(events.after(batch))
                        reorder.add(batch.packets)
                    for p, _ in reorder.ready():
                        if signals.stop or (limit is not None and n >= limit):
                            break
                        if put(p):
                            n += 1
            except KeyboardInterrupt:  # a signal while waiting: nothing is half written
                pass
            for p, _ in reorder.drain():  # held by the window, already received
                if limit is not None and n >= limit:
                    break
                if put(p):
                    n += 1
            out.flush()
            flushed = n
        except BrokenPipeError:  # the reader went away: the end, quietly
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())  # what is left in the buffer goes nowhere, without an error
            os.close(devnull)
        extra = f", {limits.clamped} clamped to pcap's limits" if limits.clamped else ""
        print(
            f"nflog-tap: {flushed} packets {done}, {sub.total_lost} lost{extra}" + _extra(sub),
            file=sys.stderr,
        )
        return 0
    finally:
        if out is not None and args.write not in (None, "-"):
            out.close()
        sub.close()


def _stats(sub: Reader, signals: _Signals, out: TextIO, interval: float = 1.0) -> int:
    """``--stats``: per (node, group), totals from batches, a table every ``interval`` seconds."""
    seen: dict[tuple[str, int], list[int]] = {}  # key -> [packets, bytes, kernel lost]
    events = FeedEvents(sub)
    shown: dict[tuple[str, int], tuple[int, int]] = {}  # key -> (packets, bytes) at the last table
    redraw = out.isatty()
    last = time.monotonic()
    next_tick = last + interval
    try:
        while not signals.stop:
            now = time.monotonic()
            if now >= next_tick:
                out.write(_stats_table(sub, seen, shown, now - last, redraw))
                out.flush()
                last, next_tick = now, max(next_tick + interval, now + interval / 10)
                continue
            signals.waiting = True
            try:
                if signals.stop:
                    break
                batch = sub.recv_batch(next_tick - now)
            finally:
                signals.waiting = False
            if batch is not None:
                s = seen.setdefault((batch.node, batch.group), [0, 0, 0])
                s[0] += len(batch.packets)
                s[1] += sum(p.len for p in batch.packets)
                s[2] += sum(e["lost"] for e in events.after(batch) if e["where"] == "kernel")
    except KeyboardInterrupt:  # a signal while waiting
        pass
    total = sum(s[0] for s in seen.values())
    print(f"nflog-tap: {total} packets counted, {sub.total_lost} lost" + _extra(sub), file=sys.stderr)
    return 0


def _stats_table(
    sub: Reader,
    seen: dict[tuple[str, int], list[int]],
    shown: dict[tuple[str, int], tuple[int, int]],
    elapsed: float,
    redraw: bool,
) -> str:
    when = time.strftime("%H:%M:%S")
    lines = [f"nflog-tap --stats {when}", f"{'node':<16} {'group':>5} {'packets/s':>10} {'bytes/s':>11} "
             f"{'packets':>10} {'lost':>8} {'kernel':>8}"]  # fmt: skip
    for key in sorted(seen):
        packets, nbytes, kernel = seen[key]
        p0, b0 = shown.get(key, (0, 0))
        shown[key] = (packets, nbytes)
        pps, bps = (packets - p0) / elapsed, (nbytes - b0) / elapsed
        node, group = key
        lost = sub.lost.get(key, 0)
        lines.append(
            f"{node or '-':<16} {group:>5} {pps:>10.0f} {_si(bps):>11} {packets:>10} {lost:>8} {kernel:>8}"
        )
    if not seen:
        lines.append("(no packets yet)")
    statuses = sub.endpoints if isinstance(sub, Subscriber) else {}  # a JetStream reader has none
    for endpoint, st in statuses.items():
        lines.append(f"endpoint {endpoint}: {st.state}" + (f" ({st.error})" if st.error else ""))
    text = "\n".join(lines) + "\n"
    return "\x1b[H\x1b[J" + text if redraw else text + "\n"


def _si(bps: float) -> str:
    for unit in ("B/s", "kB/s", "MB/s"):
        if bps < 999.95:
            return f"{bps:.0f} {unit}" if unit == "B/s" else f"{bps:.1f} {unit}"
        bps /= 1000
    return f"{bps:.1f} GB/s"


def _extra(sub: Reader) -> str:
    extra = ""
    if sub.malformed:
        extra += f", {sub.malformed} malformed messages skipped"
    if sub.restarts:
        extra += f", {sub.restarts} daemon restarts"
    return extra


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
