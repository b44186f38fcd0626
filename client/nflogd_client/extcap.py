"""nflogd-extcap: the nflogd feed as a capture interface in Wireshark and tshark (extcap).

Install it once, into the personal extcap folder of the Wireshark on this machine::

    nflogd-extcap --install            # or: make extcap-install; --system for every user (root)

``tshark -D`` and Wireshark's capture dialog then list ``nflogd`` (any endpoint, typed into
its options dialog) and one interface per endpoint listed in ``nflogd-extcap.conf`` in the
Wireshark configuration folder (``~/.config/wireshark``, or ``$WIRESHARK_CONFIG_DIR``)::

    # ENDPOINT [display name]
    tcp://router1:5555  router1
    ipc:///run/nflogd/feed.sock

The options dialog asks for the endpoint, the groups (empty: all), the link type (NFLOG keeps
prefix, mark and interfaces; raw IP for tools that cannot read NFLOG), a capture-time
reordering window, and the CURVE key files; Wireshark saves them per interface. A capture
filter (``tcp port 22``) is compiled by libpcap (``nflogd_client.bpf``) and run at the daemon,
before anything is sent (``docs/filters.md``); one libpcap refuses is refused in Wireshark's
filter field, one the daemon refuses ends the capture with its reason.

The capture is pcapng: loss and daemon restarts become comments on the first packet after
them (``frame.comment``), lines in the toolbar's log window in Wireshark, and one line on
stderr at the end, which Wireshark and tshark show ("Error by extcap pipe: ..."). A capture
without loss writes nothing to stderr.
``docs/extcap.md`` has the details. The protocol: Wireshark's ``doc/README.extcap``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import struct
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Callable, TextIO

from . import __version__, tap
from .bpf import CaptureFilter, FilterError
from .events import FeedEvents, describe
from .filters import Filter, FilterRefused
from .pcapng import PcapngWriter, describe_packet, direction
from .reorder import Reorder
from .subscriber import DEFAULT_ENDPOINT
from .wire import Packet

_package = __name__.rpartition(".")[0]  # nflogd_client: its loggers

__all__ = ["CONFIG_NAME", "GENERIC", "config_dir", "interfaces", "main"]

PROG = "nflogd-extcap"
VERSION = __version__
#: The interface whose options dialog takes any endpoint.
GENERIC = "nflogd"
#: The file, in Wireshark's configuration folder, that lists endpoints as interfaces.
CONFIG_NAME = "nflogd-extcap.conf"
LINKTYPES = {"nflog": tap.LINKTYPE_NFLOG, "ip": tap.LINKTYPE_RAW}

# Control numbers and commands of the control pipes (doc/README.extcap, "CONTROL PROTOCOL").
_CTRL_LOG = 0
_CMD_SET, _CMD_ADD, _CMD_STATUSBAR = 1, 2, 6


class UsageError(Exception):
    """Bad input: one line naming the culprit, exit status 2."""


# -- interfaces ------------------------------------------------------------------------------------


def config_dir() -> Path:
    """Wireshark's personal configuration folder, found as Wireshark finds it."""
    env = os.environ.get("WIRESHARK_CONFIG_DIR")
    if env:
        return Path(env)
    home = Path(os.environ.get("HOME") or Path.home())
    legacy = home / ".wireshark"
    if legacy.is_dir():
        return legacy
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else home / ".config") / "wireshark"


def _slug(endpoint: str) -> str:
    return GENERIC + "-" + (re.sub(r"[^A-Za-z0-9]+", "-", endpoint).strip("-") or "x")


def interfaces() -> list[tuple[str, str, str]]:
    """(interface, endpoint, display name) for the generic one and each configured endpoint."""
    generic_ep = os.environ.get("NFLOGD_ENDPOINT", "").strip() or DEFAULT_ENDPOINT
    out = [(GENERIC, generic_ep, "nflogd feed (any endpoint: set it in the options)")]
    path = config_dir() / CONFIG_NAME
    try:
        text = path.read_text()
    except FileNotFoundError:
        return out
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
    seen = {GENERIC}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        endpoint, _, display = line.partition(" ")
        if not re.match(r"^(tcp|ipc|inproc|pgm|epgm|ws|wss|vmci|udp|tipc)://\S+$", endpoint) or "{" in line:
            raise UsageError(f"{path}:{n}: expected ENDPOINT [display name], got {line!r}")
        name = _slug(endpoint)
        base, i = name, 2
        while name in seen:
            name, i = f"{base}-{i}", i + 1
        seen.add(name)
        out.append((name, endpoint, f"nflogd feed {display.strip() or endpoint}"))
    return out


def _find(interface: str) -> tuple[str, str, str]:
    for it in interfaces():
        if it[0] == interface:
            return it
    raise UsageError(f"--extcap-interface {interface!r}: not one of this program's interfaces")


def print_interfaces(out: TextIO) -> None:
    out.write(f"extcap {{version={VERSION}}}{{display=nflogd feed}}\n")
    for name, _, display in interfaces():
        out.write(f"interface {{value={name}}}{{display={display}}}\n")
    out.write(
        f"control {{number={_CTRL_LOG}}}{{type=button}}{{role=logger}}{{display=Feed log}}"
        "{tooltip=Loss and daemon restarts during the capture}\n"
    )


def print_dlts(out: TextIO) -> None:
    out.write(
        f"dlt {{number={tap.LINKTYPE_NFLOG}}}{{name=NFLOG}}{{display=NFLOG: packets with their attributes}}\n"
    )
    out.write(f"dlt {{number={tap.LINKTYPE_RAW}}}{{name=RAW}}{{display=Raw IPv4/IPv6}}\n")


def print_config(interface: str, out: TextIO) -> None:
    _, endpoint, _ = _find(interface)
    args = [
        "{call=--endpoint}{display=Endpoint}{type=string}{required=true}"
        f"{{default={endpoint}}}{{tooltip=ZeroMQ endpoint of a daemon or relay: tcp://host:port, ipc://path}}",
        "{call=--groups}{display=NFLOG groups}{type=string}{validation=^[0-9, ]*$}"
        "{tooltip=Comma-separated groups; empty for every group}",
        "{call=--linktype}{display=Link type}{type=selector}"
        "{tooltip=NFLOG keeps prefix, mark and interfaces; raw IP for tools that cannot read NFLOG}",
        "{call=--reorder-ms}{display=Reordering window (ms)}{type=unsigned}{range=0,10000}{default=0}"
        "{tooltip=Hold packets this long to put several groups or daemons in time order; 0: off}",
        "{call=--server-key}{display=CURVE server public key}{type=fileselect}{mustexist=true}"
        "{tooltip=The daemon's NAME.key (with the client key)}",
        "{call=--client-key}{display=CURVE client secret key}{type=fileselect}{mustexist=true}"
        "{tooltip=This client's NAME.key_secret (with the server key)}",
    ]
    for i, a in enumerate(args):
        out.write(f"arg {{number={i}}}{a}{{save=true}}\n")
    out.write("value {arg=2}{value=nflog}{display=NFLOG}{default=true}\n")
    out.write("value {arg=2}{value=ip}{display=Raw IP}{default=false}\n")


# -- install ---------------------------------------------------------------------------------------


def extcap_folder(system: bool) -> Path:
    """Where this machine's Wireshark looks for extcap programs (``tshark -G folders``).

    Personal: "Personal Extcap path" (Wireshark 4.1 on: ~/.local/lib/wireshark/extcap), else
    Wireshark 4.0's <personal configuration>/extcap; without tshark, ~/.local/lib/wireshark/extcap.
    """
    folders: dict[str, str] = {}
    tshark = shutil.which("tshark")
    if tshark:
        try:
            r = subprocess.run([tshark, "-G", "folders"], capture_output=True, text=True, timeout=30)
            for line in r.stdout.splitlines():
                key, sep, value = line.partition(":")
                if sep:
                    folders.setdefault(key.strip().lower(), value.strip())
        except (OSError, subprocess.SubprocessError):
            pass
    if system:
        if "extcap path" not in folders:
            raise UsageError("--system: tshark -G folders names no system extcap path; give --extcap-dir")
        return Path(folders["extcap path"])
    if "personal extcap path" in folders:
        return Path(folders["personal extcap path"])
    if "personal configuration" in folders:
        return Path(folders["personal configuration"]) / "extcap"
    return Path(os.environ.get("HOME") or Path.home()) / ".local" / "lib" / "wireshark" / "extcap"


def install(folder: Path) -> Path:
    """Write the launcher ``folder/nflogd-extcap``: this Python running this module."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / PROG
        tmp = folder / f".{PROG}.tmp"
        tmp.write_text(f"#!/bin/sh\nexec '{sys.executable}' -m {__package__}.extcap \"$@\"\n")
        tmp.chmod(0o755)
        os.replace(tmp, target)
    except OSError as e:
        raise UsageError(f"cannot install into {folder}: {e.strerror}") from None
    return target


# -- capture ---------------------------------------------------------------------------------------


def _groups(text: str | None) -> list[int] | None:
    if text is None or not text.strip():
        return None
    groups = []
    for part in re.split(r"[\s,]+", text.strip()):
        try:
            g = int(part)
        except ValueError:
            g = -1
        if not 0 <= g <= 0xFFFF:
            raise UsageError(f"--groups: NFLOG groups are integers 0..65535, got {part!r}")
        groups.append(g)
    return groups


class _Control:
    """Wireshark's control pipes: log lines out (the toolbar's logger), EOF on ``in`` stops."""

    def __init__(self, path_in: str | None, path_out: str | None, on_close: Callable[[], None]) -> None:
        self._out: IO[bytes] | None = None
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._on_close = on_close
        if path_in or path_out:
            threading.Thread(target=self._run, args=(path_in, path_out), daemon=True).start()

    def _run(self, path_in: str | None, path_out: str | None) -> None:
        try:
            if path_out:
                out = open(path_out, "wb", buffering=0)  # blocks until Wireshark opens its end
                with self._lock:
                    self._out = out
                    pending, self._pending = self._pending, []
                for frame in pending:
                    self._write(out, frame)
            if path_in:
                with open(path_in, "rb", buffering=0) as f:
                    while f.read(65536):  # Initialized, Set: nothing of ours to set
                        pass
                self._on_close()  # Wireshark closed its end: the capture is over
        except OSError:
            self._on_close()

    @staticmethod
    def _write(out: IO[bytes], frame: bytes) -> None:
        try:
            out.write(frame)
        except OSError:
            pass

    def send(self, command: int, text: str, control: int = _CTRL_LOG) -> None:
        payload = text.encode()[:65535]
        n = len(payload) + 2
        frame = b"T" + struct.pack(">I", n)[1:] + bytes((control, command)) + payload
        with self._lock:
            out = self._out
            if out is None:
                self._pending.append(frame)
                return
        self._write(out, frame)


class _ControlLog(logging.Handler):
    """The client's warnings (an endpoint away, refused, back) as lines of the log window too."""

    def __init__(self, control: _Control) -> None:
        super().__init__(logging.INFO)
        self._control = control

    def emit(self, record: logging.LogRecord) -> None:
        self._control.send(_CMD_ADD, record.getMessage() + "\n")


def _capture(args: argparse.Namespace) -> int:
    name, default_ep, _ = _find(args.extcap_interface)
    try:
        out = open(args.fifo, "wb")  # first: until it is open, Wireshark waits and shows nothing
    except OSError as e:
        raise UsageError(f"--fifo {args.fifo!r}: {e.strerror}") from None
    try:
        server_key, client_key = args.server_key or None, args.client_key or None
        if (server_key is None) != (client_key is None):
            raise UsageError("--server-key and --client-key go together (the CURVE key files)")
        groups = _groups(args.groups)
        flt: dict[str, Filter] = {}
        if args.extcap_capture_filter and args.extcap_capture_filter.strip():
            try:
                flt["filter"] = Filter(args.extcap_capture_filter)
            except FilterError as e:
                raise UsageError(str(e)) from None
        endpoint = args.endpoint or default_ep
        sub = tap._connect(
            [endpoint], groups, prog=PROG, server_public_key=server_key, client_secret_key_file=client_key,
            **flt,
        )  # fmt: skip
    except UsageError as e:
        # stderr first: Wireshark reads it once it sees the fifo end, and shows it.
        print(f"{PROG}: {e}", file=sys.stderr, flush=True)
        out.close()
        return 2
    except BaseException:  # SystemExit(2) from tap._connect, its line already on stderr
        out.close()
        raise
    signals = tap._Signals()
    control = _Control(
        args.extcap_control_in, args.extcap_control_out, lambda: setattr(signals, "stop", True)
    )
    control.send(_CMD_SET, f"capturing {endpoint} groups {args.groups or 'all'}\n")
    # The client's lines about endpoints (away, refused, back): in the log window, and the
    # warnings on stderr too, which Wireshark shows when the capture ends.
    client_log = logging.getLogger(_package)
    client_log.addHandler(_ControlLog(control))
    to_stderr = logging.StreamHandler(sys.stderr)
    to_stderr.setLevel(logging.WARNING)
    client_log.addHandler(to_stderr)
    nflog = args.linktype == "nflog"
    written = cut = status = 0  # packets written; of those, cut to the snaplen; the exit status
    events = FeedEvents(sub)
    carry: list[str] = []  # comments of batches the filter left no packet of
    reorder = Reorder(args.reorder_ms / 1000.0)
    try:
        with signals:
            w = PcapngWriter(
                out,
                LINKTYPES[args.linktype],
                tap.SNAPLEN,
                if_name=name,
                if_description=f"nflogd feed {endpoint}",
                application=f"{PROG} {VERSION}",
            )
            out.flush()

            def emit(p: Packet, comment: str | None) -> None:
                nonlocal written, cut
                if nflog:
                    record = tap.nflog_record(p)
                    w.packet(record, p.ts_ns, len(record), comment, flags=direction(p))
                else:
                    if len(p.data) > tap.SNAPLEN:  # Wireshark refuses a longer record as corrupt
                        if not cut:
                            control.send(_CMD_ADD, f"{_cut_line(p)}\n")
                        cut += 1
                    w.packet(
                        p.data[: tap.SNAPLEN], p.ts_ns, p.len, comment,
                        flags=direction(p), comments=(describe_packet(p),),
                    )  # fmt: skip
                written += 1

            try:
                while not signals.stop:
                    signals.waiting = True
                    try:
                        if signals.stop:
                            break
                        batch = sub.recv_batch(reorder.wait(0.5))
                    finally:
                        signals.waiting = False
                    if batch is not None:
                        comment = describe(events.after(batch), batch)
                        if comment:
                            control.send(_CMD_ADD, comment + "\n")
                            control.send(_CMD_STATUSBAR, comment)
                            carry.append(comment)
                        packets = batch.packets  # the filter's: at the daemon, or by the Subscriber
                        if packets:  # the comments wait for a packet to go on
                            reorder.add(packets, "; ".join(carry) or None)
                            carry.clear()
                    for p, comment in reorder.ready():
                        emit(p, comment)
                    out.flush()
            except KeyboardInterrupt:  # a signal while waiting
                pass
            for p, comment in reorder.drain():
                emit(p, comment)
            out.flush()
    except BrokenPipeError:  # Wireshark closed the fifo: the capture is over
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)
    except FilterRefused as e:
        print(f"{PROG}: filter refused by the daemon: {e}", file=sys.stderr, flush=True)
        status = 1
    finally:
        # Before the fifo closes: Wireshark reads the extcap's stderr once it sees the end.
        _summary(sub, events, written, control, cut)
        try:
            out.close()
        except OSError:
            pass
        sub.close()
    return status


def _cut_line(p: Packet) -> str:
    return (
        f"group {p.group} seq {p.seq}: a packet of {len(p.data)} captured bytes cut to {tap.SNAPLEN},"
        " the most Wireshark reads; such packets are counted at the end"
    )


def _summary(sub: tap.Reader, events: FeedEvents, written: int, control: _Control, cut: int = 0) -> None:
    """The count at the end. Wireshark shows whatever an extcap writes to stderr as an error:
    only loss, restarts and skipped messages go there; the log window gets the count anyway."""
    trouble = []
    if sub.total_lost:
        trouble.append(f"{sub.total_lost} packets lost on the feed")
    if events.kernel_lost:
        trouble.append(f"{events.kernel_lost} packets dropped by the kernel")
    if sub.restarts:
        trouble.append(f"{sub.restarts} daemon restarts")
    if sub.malformed:
        trouble.append(f"{sub.malformed} malformed messages skipped")
    if cut:
        trouble.append(f"{cut} packets cut to {tap.SNAPLEN} bytes")
    summary = f"{written} packets captured" + "".join(f", {t}" for t in trouble)
    if trouble:
        print(f"{PROG}: {summary}", file=sys.stderr, flush=True)
    control.send(_CMD_ADD, summary + "\n")


# -- command line ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="The nflogd feed as a Wireshark/tshark capture interface (extcap).",
        epilog=f"Interfaces: {GENERIC}, and one per endpoint in <Wireshark config>/{CONFIG_NAME}.",
    )
    ap.add_argument("--version", action="version", version=f"{PROG} {VERSION}")
    ap.add_argument("--install", action="store_true", help="install into Wireshark's personal extcap folder")
    ap.add_argument("--system", action="store_true", help="with --install: the system extcap folder")
    ap.add_argument("--extcap-dir", metavar="DIR", help="with --install: this folder instead")
    # The extcap protocol (Wireshark's doc/README.extcap).
    ap.add_argument("--extcap-interfaces", action="store_true")
    ap.add_argument("--extcap-version", nargs="?", const="", metavar="VERSION")
    ap.add_argument("--extcap-interface", metavar="IFACE")
    ap.add_argument("--extcap-dlts", action="store_true")
    ap.add_argument("--extcap-config", action="store_true")
    ap.add_argument("--extcap-capture-filter", metavar="FILTER")
    ap.add_argument("--extcap-control-in", metavar="FIFO")
    ap.add_argument("--extcap-control-out", metavar="FIFO")
    ap.add_argument("--capture", action="store_true")
    ap.add_argument("--fifo", metavar="FIFO")
    # The options dialog.
    ap.add_argument("--endpoint", metavar="ENDPOINT")
    ap.add_argument("--groups", metavar="LIST")
    ap.add_argument("--linktype", choices=tuple(LINKTYPES), default="nflog")
    ap.add_argument("--reorder-ms", type=int, default=0, metavar="MS")
    ap.add_argument("--server-key", metavar="FILE")
    ap.add_argument("--client-key", metavar="FILE")
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args, unknown = ap.parse_known_args(argv)
    # Later Wireshark versions add options of their own (--extcap-reload-option, --debug ...).
    bad = [a for a in unknown if not a.startswith(("--extcap-", "--debug"))]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    out = sys.stdout
    try:
        if args.install:
            folder = Path(args.extcap_dir) if args.extcap_dir else extcap_folder(args.system)
            print(f"{PROG}: installed {install(folder)}")
            return 0
        if args.extcap_interfaces or args.extcap_interface is None:
            if not args.extcap_interfaces:
                raise UsageError(
                    "give --extcap-interfaces, or --extcap-interface with an action (see --help)"
                )
            print_interfaces(out)
            return 0
        if args.extcap_dlts:
            _find(args.extcap_interface)
            print_dlts(out)
            return 0
        if args.extcap_config:
            print_config(args.extcap_interface, out)
            return 0
        if args.capture:
            if not args.fifo:
                raise UsageError("--capture needs --fifo")
            if not 0 <= args.reorder_ms <= 10_000:
                raise UsageError(f"--reorder-ms: 0..10000 milliseconds, got {args.reorder_ms}")
            return _capture(args)
        if args.extcap_capture_filter is not None:
            # The validation call: nothing on stdout means valid; else the first line says why.
            _find(args.extcap_interface)
            if args.extcap_capture_filter.strip():
                try:
                    CaptureFilter(args.extcap_capture_filter).close()
                except FilterError as e:
                    out.write(f"{e}\n")
            return 0
        raise UsageError("--extcap-interface needs --extcap-dlts, --extcap-config or --capture")
    except UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
