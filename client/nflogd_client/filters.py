"""Filters a reader states and the daemon runs: a capture filter and NFLOG metadata.

::

    from nflogd_client.filters import Filter, FilterRefused

    f = Filter("udp and dst port 53")              # libpcap's language, compiled here
    f = Filter(prefix="dns: ", mark=(0x10, 0xF0))  # metadata only: log prefix, mark & mask
    f = Filter("tcp", prefix_start="ssh", uid=0, indev=2, outdev=3, hook="input")
    f.spec()                                       # the bytes sent (docs/wire-format.md, "Filters")
    f.match(pkt)                                   # the same test in this process (a wire.Packet)

A ``Subscriber(..., filter=...)`` sends the filter to the daemon as a subscription
(``topic()``): the daemon checks the program with libpcap's ``bpf_validate``, runs it with
``bpf_filter`` on each packet before anything is sent, and answers with a reply message
(``reply()``). A refusal raises ``FilterRefused`` (a one-line reason) from ``recv()``.
The expression is compiled by this host's libpcap on LINKTYPE_RAW (``nflogd_client.bpf``):
the program starts at the IPv4/IPv6 header. Every predicate given must hold; a packet
without the attribute (no prefix, no uid: a forwarded packet) does not match it.
``docs/filters.md`` has what runs where and the limits.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable
from typing import Any

from .bpf import CaptureFilter
from .wire import FILTERED_TOPIC, Packet

__all__ = [
    "FILTER_TOPIC",
    "FILTERED_TOPIC",
    "HOOKS",
    "MAX_INSNS",
    "Filter",
    "FilterRefused",
    "filter_reply",
    "is_reply",
    "make_filter",
    "reply",
    "spec_id",
    "spec_length",
    "spec_text",
]

#: The topic prefix of a filter subscription and of the daemon's reply to it. No group's
#: topic is longer than 2 bytes, so no message of the feed begins with it.
FILTER_TOPIC = b"\xffNFLF"
VERSION = 1
#: The spec's head: version, match bits, hooks, prefix_len, mark, mask, uid, gid, indev,
#: outdev, instructions, text_len, reserved (docs/wire-format.md, "Filters").
HEAD = struct.Struct("<BBBBIIIIIIHBB")
MAX_INSNS = 512
#: The most bytes of program sent: the daemon reads a filter's subscription up to 16 KiB.
MAX_SPEC = 15 * 1024
MAX_PREFIX = 128
MAX_TEXT = 255
#: Bytes a reader may add to its filter subscription after the spec (its tag: each reader's
#: subscription a topic of its own, which an XPUB such as nflogd-relay's passes on and answers).
MAX_TAG = 16
#: Reply bodies: the first byte.
ACCEPTED, REFUSED = 0, 1

M_PREFIX, M_PREFIX_START, M_MARK, M_UID, M_GID, M_INDEV, M_OUTDEV, M_HOOK = (1 << i for i in range(8))

#: Netfilter hooks by name (the record's ``hook``).
HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}


class FilterRefused(Exception):
    """The daemon refused the reader's filter; the text is its one-line reason."""


def _u32(name: str, value: int | None) -> int:
    if value is None:
        return 0
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFFFFFF:
        raise ValueError(f"{name}: expected an integer 0..4294967295, got {value!r}")
    return value


def _hooks(hook: int | str | Iterable[int | str] | None) -> int:
    if hook is None:
        return 0
    items = [hook] if isinstance(hook, (int, str)) else list(hook)
    bits = 0
    for h in items:
        n = HOOKS.get(h.lower()) if isinstance(h, str) else h
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 7:
            raise ValueError(f"hook: expected 0..4 or one of {', '.join(HOOKS)}, got {h!r}")
        bits |= 1 << n
    if not bits:
        raise ValueError("hook: empty; give at least one hook")
    return bits


class Filter:
    """A capture filter (``expression``, libpcap's language) and metadata predicates.

    ``prefix``: the log prefix, exactly; ``prefix_start``: text the log prefix begins with;
    ``mark``: a mark, or ``(value, mask)`` for ``mark & mask == value``; ``uid``, ``gid``:
    of the local socket; ``indev``, ``outdev``: interface indexes on the daemon's host;
    ``hook``: a hook (0..4 or ``"input"``, ...) or several. ``FilterError`` (a ValueError)
    if libpcap does not compile the expression, ValueError for a bad option.
    """

    def __init__(
        self,
        expression: str | None = None,
        *,
        prefix: str | None = None,
        prefix_start: str | None = None,
        mark: int | tuple[int, int] | None = None,
        uid: int | None = None,
        gid: int | None = None,
        indev: int | None = None,
        outdev: int | None = None,
        hook: int | str | Iterable[int | str] | None = None,
    ) -> None:
        self.expression = expression.strip() if expression else None
        what, text = 0, b""
        if prefix is not None and prefix_start is not None:
            raise ValueError("prefix and prefix_start: give one of them")
        wanted = prefix if prefix is not None else prefix_start
        self.prefix = wanted.encode() if wanted is not None else None
        if self.prefix is not None:
            if len(self.prefix) > MAX_PREFIX:
                raise ValueError(f"prefix: {len(self.prefix)} bytes in UTF-8, at most {MAX_PREFIX}")
            what |= M_PREFIX if prefix is not None else M_PREFIX_START
        if mark is not None:
            value, mask = (mark, 0xFFFFFFFF) if isinstance(mark, int) else mark
            _u32("mark", value), _u32("mark mask", mask)
            if value & ~mask:
                raise ValueError(f"mark: value {value:#x} has bits outside the mask {mask:#x}")
            what |= M_MARK
        else:
            value = mask = 0
        self.mark = (value, mask) if mark is not None else None
        self.uid, self.gid, self.indev, self.outdev = uid, gid, indev, outdev
        for bit, name, v in ((M_UID, "uid", uid), (M_GID, "gid", gid), (M_INDEV, "indev", indev),
                             (M_OUTDEV, "outdev", outdev)):  # fmt: skip
            if v is not None:
                _u32(name, v)
                what |= bit
        self.hooks = _hooks(hook)
        if self.hooks:
            what |= M_HOOK
        self._what = what
        self._capture = CaptureFilter(self.expression) if self.expression else None
        program = self._capture.program() if self._capture is not None else b""
        if len(program) > MAX_SPEC:  # a longer one the daemon refuses with its reason
            raise ValueError(
                f"capture filter {self.expression!r}: {len(program) // 8} BPF instructions, "
                f"far more than a daemon runs ({MAX_INSNS})"
            )
        text = str(self).encode()[:MAX_TEXT]
        p = self.prefix or b""
        self._spec = (
            HEAD.pack(VERSION, what, self.hooks, len(p), value, mask, uid or 0, gid or 0, indev or 0,
                      outdev or 0, len(program) // 8, len(text), 0)
            + p + text + program
        )  # fmt: skip

    def spec(self) -> bytes:
        """The filter's bytes as the daemon reads them."""
        return self._spec

    def topic(self, tag: bytes = b"") -> bytes:
        """The subscription that states it (and the topic of the daemon's reply), with the
        reader's ``tag`` (at most MAX_TAG bytes) after the spec."""
        return FILTER_TOPIC + self._spec + tag

    def id(self) -> bytes:
        """The filter's 8-byte id: the topics of its filtered messages carry it (``spec_id``)."""
        return spec_id(self._spec)

    def group_topic(self, topic: bytes) -> bytes:
        """The subscription to a group (its 2-byte topic; b"": every group) through this
        filter: the daemon sends that group's filtered messages with this topic and the group."""
        return FILTERED_TOPIC + self.id() + topic

    @staticmethod
    def new_tag() -> bytes:
        """A reader's tag: 8 random bytes."""
        return os.urandom(8)

    def match(self, pkt: Packet) -> bool:
        """The daemon's test, run here (for a feed that does not filter: CURVE, the relay)."""
        what = self._what
        if what & (M_PREFIX | M_PREFIX_START):
            if pkt.prefix is None:
                return False
            got = pkt.prefix.encode()
            if got != self.prefix if what & M_PREFIX else not got.startswith(self.prefix or b""):
                return False
        if self.mark is not None and (pkt.mark is None or pkt.mark & self.mark[1] != self.mark[0]):
            return False
        for want, got in ((self.uid, pkt.uid), (self.gid, pkt.gid), (self.indev, pkt.indev),
                          (self.outdev, pkt.outdev)):  # fmt: skip
            if want is not None and got != want:
                return False
        if self.hooks and not self.hooks & (1 << pkt.hook):
            return False
        return self._capture is None or self._capture.match(pkt)

    def __str__(self) -> str:
        parts = [self.expression] if self.expression else []
        if self.prefix is not None:
            kind = "prefix" if self._what & M_PREFIX else "prefix_start"
            parts.append(f"{kind}={self.prefix.decode()!r}")
        if self.mark is not None:
            parts.append(f"mark={self.mark[0]:#x}/{self.mark[1]:#x}")
        for name in ("uid", "gid", "indev", "outdev"):
            if getattr(self, name) is not None:
                parts.append(f"{name}={getattr(self, name)}")
        if self.hooks:
            names = [n for n, v in HOOKS.items() if self.hooks & (1 << v)]
            parts.append(f"hook={','.join(names)}")
        return " ".join(parts)

    def __repr__(self) -> str:
        return f"<Filter {self}>"


def is_reply(msg: list[bytes]) -> bool:
    """A message of the daemon's filter replies, not of the feed."""
    return bytes(msg[0][: len(FILTER_TOPIC)]) == FILTER_TOPIC


def filter_reply(msg: list[bytes]) -> tuple[bool, str]:
    """(accepted, the daemon's reason) of a reply message: the filter's topic, then the body:
    one status byte (0 accepted, 1 refused) and a UTF-8 reason."""
    body = bytes(msg[1]) if len(msg) > 1 else b""
    if len(msg) != 2 or not body:
        return False, "a malformed reply to the filter"
    return body[0] == ACCEPTED, body[1:].decode(errors="replace")


def reply(spec_topic: bytes, accepted: bool, reason: str = "") -> list[bytes]:
    """The daemon's reply to a filter subscription (its frames)."""
    return [spec_topic, bytes([ACCEPTED if accepted else REFUSED]) + reason.encode()]


def spec_id(spec: bytes) -> bytes:
    """A filter's id: the first 8 bytes of the SHA-256 of its spec."""
    return hashlib.sha256(spec).digest()[:8]


def spec_length(spec: bytes) -> int:
    """The bytes of the spec at the start of ``spec`` as its head counts them (what follows
    is the reader's tag); 0 if there is no head."""
    if len(spec) < HEAD.size:
        return 0
    head: tuple[int, ...] = HEAD.unpack_from(spec)
    return HEAD.size + head[3] + head[11] + 8 * head[10]


def spec_text(spec: bytes) -> str:
    """The text a spec carries (the reader's expression and options), "" if none or malformed."""
    if len(spec) < HEAD.size:
        return ""
    head = HEAD.unpack_from(spec)
    start = HEAD.size + head[3]
    return spec[start : start + head[11]].decode(errors="replace")


def make_filter(expression: str | Filter | None, options: dict[str, Any]) -> Filter | None:
    """A reader's filter from its ``filter=`` and metadata options (None: neither given)."""
    if isinstance(expression, Filter):
        if options:
            raise ValueError(f"{', '.join(options)}: give them to the Filter, not beside it")
        return expression
    if expression is None and not options:
        return None
    return Filter(expression, **options)
