"""Capture filters (``tcp port 22``, ``host 192.0.2.1``) compiled by libpcap, applied to feed packets.

::

    from nflogd_client.bpf import CaptureFilter, FilterError

    f = CaptureFilter("udp and dst port 53")     # FilterError: libpcap's message, e.g. "syntax error"
    if f.match(pkt):                             # pkt: a wire.Packet
        ...

The expression is compiled by the system's libpcap (``pcap_compile`` on a dead handle of
LINKTYPE_RAW, the packet starting at its IPv4/IPv6 header) and run by ``pcap_offline_filter``,
so it means what it means to tcpdump and dumpcap. It sees the captured bytes (``caplen``)
and the packet's real length (``len``): ``greater 1000`` matches a packet the copy range cut.
libpcap is loaded on first use (Debian: ``libpcap0.8``, which tcpdump and tshark pull in);
without it a filter raises ``FilterError`` saying so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import struct
import threading

from .wire import Packet

__all__ = ["CaptureFilter", "FilterError"]

DLT_RAW = 12  # pcap_open_dead takes DLT_ values; DLT_RAW is LINKTYPE_RAW (101) in files
_SNAPLEN = 262144
_NETMASK_UNKNOWN = 0xFFFFFFFF


class FilterError(ValueError):
    """A capture filter libpcap does not compile (or no libpcap); the text says why."""


class _Program(ctypes.Structure):  # struct bpf_program, <pcap/bpf.h>
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _PktHdr(ctypes.Structure):  # struct pcap_pkthdr, <pcap/pcap.h>
    _fields_ = [
        ("tv_sec", ctypes.c_long),
        ("tv_usec", ctypes.c_long),
        ("caplen", ctypes.c_uint32),
        ("len", ctypes.c_uint32),
    ]


_lib: ctypes.CDLL | None = None
_lock = threading.Lock()  # pcap_compile is not thread-safe in older libpcap


def _libpcap() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("pcap") or "libpcap.so.0.8"
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            raise FilterError(
                "capture filters need libpcap (Debian: libpcap0.8), which is not installed"
            ) from None
        lib.pcap_open_dead.restype = ctypes.c_void_p
        lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.pcap_compile.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(_Program),
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_uint32,
        ]
        lib.pcap_geterr.restype = ctypes.c_char_p
        lib.pcap_geterr.argtypes = [ctypes.c_void_p]
        lib.pcap_offline_filter.argtypes = [
            ctypes.POINTER(_Program),
            ctypes.POINTER(_PktHdr),
            ctypes.c_char_p,
        ]
        lib.pcap_freecode.argtypes = [ctypes.POINTER(_Program)]
        lib.pcap_close.argtypes = [ctypes.c_void_p]
        _lib = lib
    return _lib


class CaptureFilter:
    """One compiled expression; ``match(pkt)`` is True for the packets it accepts."""

    def __init__(self, expression: str):
        self.expression = expression
        lib = _libpcap()
        prog = _Program()
        self._prog: _Program | None = prog
        with _lock:
            handle = lib.pcap_open_dead(DLT_RAW, _SNAPLEN)
            if not handle:
                raise FilterError("libpcap: pcap_open_dead failed")
            try:
                rc = lib.pcap_compile(handle, ctypes.byref(prog), expression.encode(), 1, _NETMASK_UNKNOWN)
                if rc != 0:
                    why = (lib.pcap_geterr(handle) or b"cannot compile").decode(errors="replace")
                    raise FilterError(f"capture filter {expression!r}: {why}")
            finally:
                lib.pcap_close(handle)
        self._lib = lib
        self._hdr = _PktHdr()

    def match(self, pkt: Packet) -> bool:
        """True if the filter accepts this ``wire.Packet`` (its IP bytes, caplen and len)."""
        prog = self._prog
        if prog is None:
            raise ValueError(f"capture filter {self.expression!r} is closed")
        h = self._hdr
        h.caplen = pkt.caplen
        h.len = max(pkt.len, pkt.caplen)
        return bool(self._lib.pcap_offline_filter(ctypes.byref(prog), ctypes.byref(h), pkt.data) != 0)

    def program(self) -> bytes:
        """The compiled program, each instruction as 8 little-endian bytes (code u16, jt u8,
        jf u8, k u32): what a filter sends the daemon (``nflogd_client.filters``)."""
        prog = self._prog
        if prog is None:
            raise ValueError(f"capture filter {self.expression!r} is closed")
        raw = ctypes.string_at(prog.bf_insns, prog.bf_len * 8)
        return b"".join(struct.pack("<HBBI", *insn) for insn in struct.iter_unpack("=HBBI", raw))

    def close(self) -> None:
        if self._prog is not None:
            self._lib.pcap_freecode(ctypes.byref(self._prog))
            self._prog = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown may have unloaded ctypes
        try:
            self.close()
        except Exception:
            pass
