"""ZMTP as the feed's XPUB side speaks it: one peer's conversation, bytes in, events out.

No sockets here: ``receive()`` takes what the peer sent, in pieces of any size (one byte at
a time gives the same events as one read), ``next_event()`` hands out what those bytes say,
one frame at a time, and ``output()`` what to send back during the handshake. The server
(``server.py``) moves the bytes; after the handshake what the peer gets is written by the C
sender, and the only reply the codec asks for is a PONG (``pong()``)::

    codec = Codec()
    sock.send(codec.output())              # signature and major version: 11 bytes
    codec.receive(sock.recv(4096))
    while (event := codec.next_event()) is not None:
        ...                                # Handshake, Subscribe, Cancel, Ping, Skipped, Refused
    sock.send(codec.output())              # the rest of the greeting, READY (or an ERROR)

The conversation, as rfc.zeromq.org/spec/23 (ZMTP 3.0) and /spec/37 (ZMTP 3.1) have it for
the side that binds: the first 11 bytes of the greeting go out at once; the peer's major
version decides the rest (3 or more: the rest of a 3.1 greeting; 1 or 2: a ZMTP 2.0 peer,
/spec/15, gets its socket type and identity and ZMTP 2.0 framing, as libzmq downgrades;
anything else is refused). With the NULL mechanism a 3.1 peer's READY comes first, parsed
and checked (a SUB or XSUB), then ours, or an ERROR command saying why not; a 3.0 peer gets
ours with the greeting (spec 23: each side sends READY before reading the other's). After that:
subscriptions as messages (3.0) or SUBSCRIBE/CANCEL commands (3.1), PINGs answered, every
other message or command skipped. A protocol breach is a ``Refused`` event, the codec's
last: the server sends its ``error`` (if any) and closes.

Bounds, which keep what one peer can make the daemon hold small: the READY at
``MAX_READY`` bytes, any later frame at ``MAX_FRAME`` (a subscription is 3 bytes, a PING at
most 21); the bytes received and not yet parsed are the caller's to bound (it reads only
when the codec has no events left).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .curve import CurveHandshake

from nflogd_client.filters import FILTER_TOPIC

__all__ = [
    "MAX_FILTER_FRAME",
    "MAX_FRAME",
    "MAX_READY",
    "Cancel",
    "Codec",
    "Event",
    "Handshake",
    "Ping",
    "Refused",
    "Skipped",
    "Subscribe",
    "command",
    "error",
    "pong",
    "properties",
    "ready",
]

#: The largest READY body accepted (bytes): its Socket-Type and whatever ``ZMQ_METADATA``
#: properties a peer adds (libzmq's XPUB took any).
MAX_READY = 4096
#: The largest frame after the handshake (bytes): a subscription is at most 3, a PING 21; as
#: libzmq's MAXMSGSIZE did on the XPUB.
MAX_FRAME = 64
#: The largest filter (un)subscription, message or command (bytes): a filter of 512 BPF
#: instructions is about 4.5 KiB (docs/filters.md); a longer program still fits, so that the
#: server refuses it with its reason; a frame past this is a breach.
MAX_FILTER_FRAME = 16384
#: How a filter's (un)subscription begins, as a message and as a ZMTP 3.1 command.
_FILTER_HEADS = {
    False: (b"\x01" + FILTER_TOPIC, b"\x00" + FILTER_TOPIC),
    True: (b"\x09SUBSCRIBE" + FILTER_TOPIC, b"\x06CANCEL" + FILTER_TOPIC),
}

#: How a CURVE MESSAGE command begins (spec 26).
_MESSAGE_HEAD = b"\x07MESSAGE"

SIGNATURE = b"\xff" + bytes(8) + b"\x7f"
#: The first 11 bytes of the greeting: the signature and the major version, 3.
PARTIAL_GREETING = SIGNATURE + b"\x03"
#: The rest of a ZMTP 3.1 greeting with the NULL mechanism (as-server 0), 53 bytes.
GREETING_REST = b"\x01" + b"NULL".ljust(20, b"\0") + b"\0" + bytes(31)
GREETING = PARTIAL_GREETING + GREETING_REST
#: The same with the CURVE mechanism, as-server 1 (spec 26 over ZMTP 3.0).
CURVE_GREETING_REST = b"\x01" + b"CURVE".ljust(20, b"\0") + b"\x01" + bytes(31)
#: A CURVE MESSAGE's cost over the frame it boxes: its name, short nonce, MAC and flags.
CURVE_OVERHEAD = 8 + 8 + 16 + 1

_MORE, _LONG, _COMMAND = 1, 2, 4
#: ZMTP 2.0's socket types (spec 15) this side serves, and what it says it is: PUB (XPUB is
#: an API name only, at the protocol level a PUB).
_V2_TYPES = {2: b"SUB", 10: b"XSUB"}
_V2_PUB = 1
_PEER_TYPES = (b"SUB", b"XSUB")
_SIZE = struct.Struct(">Q")
_VALUE = struct.Struct(">I")


def command(name: bytes, body: bytes = b"") -> bytes:
    """A ZMTP command frame, short or long as its size asks."""
    return command_raw(bytes([len(name)]) + name + body)


def _ready_body(socket_type: bytes = b"XPUB") -> bytes:
    """A READY's metadata: the Socket-Type property alone."""
    return bytes([11]) + b"Socket-Type" + _VALUE.pack(len(socket_type)) + socket_type


def ready(socket_type: bytes = b"XPUB") -> bytes:
    """A NULL READY command with the Socket-Type property alone."""
    return command(b"READY", _ready_body(socket_type))


def command_raw(body: bytes) -> bytes:
    """A command frame around ``body``, its name's length byte and name included."""
    if len(body) < 256:
        return bytes([_COMMAND, len(body)]) + body
    return bytes([_COMMAND | _LONG]) + _SIZE.pack(len(body)) + body


def error(reason: str) -> bytes:
    """An ERROR command, a short frame: the reason, printable ASCII, at most 248 bytes."""
    text = "".join(c if " " <= c <= "~" else "?" for c in reason).encode()[:248]
    return command(b"ERROR", bytes([len(text)]) + text)


def _shown(name: bytes) -> str:
    """A peer's bytes in a reason: printable ASCII, at most 32 of them."""
    return "".join(chr(c) if 32 <= c <= 126 else "?" for c in name[:32])


def pong(context: bytes) -> bytes:
    """The PONG answering a PING with ``context`` (at most 16 bytes)."""
    return command(b"PONG", context[:16])


def properties(data: bytes) -> dict[bytes, bytes] | None:
    """A READY's metadata (names lower-cased), or None if malformed (a name of 0 bytes, a
    size past the end)."""
    props, at = {}, 0
    while at < len(data):
        n = data[at]
        if n == 0 or at + 1 + n + 4 > len(data):
            return None
        name = bytes(data[at + 1 : at + 1 + n])
        (size,) = _VALUE.unpack_from(data, at + 1 + n)
        start = at + 1 + n + 4
        if start + size > len(data):
            return None
        props[name.lower()] = bytes(data[start : start + size])
        at = start + size
    return props


# -- events ---------------------------------------------------------------------------


class Event:
    """What the peer's bytes said, one frame (or the greeting's end) at a time."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Handshake(Event):
    """The handshake is done: from now on the peer gets messages. ``version`` (major, minor):
    the peer's, (2, 0) for a ZMTP 2.0 peer; ``socket_type`` b"SUB" or b"XSUB";
    ``properties`` its READY's metadata (names lower-cased; empty for ZMTP 2.0)."""

    version: tuple[int, int]
    socket_type: bytes
    properties: dict[bytes, bytes]
    #: The client's long-term key (raw, 32 bytes) on a CURVE endpoint; None with NULL.
    client_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Subscribe(Event):
    """A subscription to ``topic`` (a message of 1 and the topic, or a SUBSCRIBE command)."""

    topic: bytes


@dataclass(frozen=True, slots=True)
class Cancel(Event):
    """A subscription cancelled (a message of 0 and the topic, or a CANCEL command)."""

    topic: bytes


@dataclass(frozen=True, slots=True)
class Ping(Event):
    """A PING: answer with ``pong(context)``. ``ttl`` in tenths of a second."""

    ttl: int
    context: bytes


@dataclass(frozen=True, slots=True)
class Skipped(Event):
    """A frame with nothing to do (a PONG, an unknown command, a message that is no
    subscription, the greeting's parts): one event all the same, so that a peer's every
    frame costs it a share of its turn."""

    what: str


@dataclass(frozen=True, slots=True)
class Refused(Event):
    """A protocol breach: the conversation is over. ``error``: an ERROR command to send
    before closing (empty where the spec has none: before the handshake, ZMTP 2.0, after)."""

    reason: str
    error: bytes


# -- the conversation -----------------------------------------------------------------

_SIGNATURE, _VERSION, _REST, _V2_TYPE, _V2_IDENTITY, _READY, _OPEN, _V2_OPEN, _DONE, _HELLO, _INITIATE = (
    range(11)
)
_HANDSHAKE_COMMANDS = (_READY, _HELLO, _INITIATE)


class Codec:
    """One peer's ZMTP conversation, the feed's side (an XPUB that binds): the NULL mechanism,
    or CURVE with ``curve`` (a ``curve.CurveHandshake``, which also holds the session once
    the handshake is done)."""

    __slots__ = ("_buf", "_at", "_out", "_state", "_skip", "_ready_sent", "version", "socket_type", "curve")

    def __init__(self, curve: CurveHandshake | None = None) -> None:
        self.curve = curve
        self._buf = bytearray()
        self._at = 0  # parsed up to here
        self._out = bytearray(PARTIAL_GREETING)
        self._state = _SIGNATURE
        self._skip = False  # inside a multipart message: its frames are no subscription
        self._ready_sent = False  # our READY went before the peer's was read (a 3.0 peer)
        #: The peer's (major, minor) once its greeting is read; (2, 0) for ZMTP 2.0.
        self.version: tuple[int, int] | None = None
        self.socket_type: bytes | None = None

    @property
    def open(self) -> bool:
        """Whether the handshake is done (and no breach since)."""
        return self._state in (_OPEN, _V2_OPEN)

    @property
    def done(self) -> bool:
        """Whether the conversation is over (a Refused event was handed out)."""
        return self._state == _DONE

    @property
    def unparsed(self) -> int:
        """Bytes received and not parsed yet."""
        return len(self._buf) - self._at

    def receive(self, data: bytes) -> None:
        """Bytes the peer sent (any piece of its stream)."""
        if self._state == _DONE:
            return
        if self._at and self._at == len(self._buf):
            self._buf.clear()
            self._at = 0
        elif self._at > 65536:
            del self._buf[: self._at]
            self._at = 0
        self._buf += data

    def output(self) -> bytes:
        """What to send the peer now (the handshake's part; taken once)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def next_event(self) -> Event | None:
        """The next event, or None until more bytes are received."""
        state = self._state
        if state == _DONE:
            return None
        if state in (_OPEN, _V2_OPEN, _READY, _HELLO, _INITIATE):
            return self._frame()
        if state == _SIGNATURE:
            return self._signature()
        if state == _VERSION:
            return self._major()
        if state == _REST:
            return self._rest()
        if state == _V2_TYPE:
            return self._v2_type()
        return self._v2_identity()

    # -- the greeting ---------------------------------------------------------

    def _take(self, n: int) -> bytes | None:
        if len(self._buf) - self._at < n:
            return None
        out = bytes(self._buf[self._at : self._at + n])
        self._at += n
        return out

    def _refuse(self, reason: str, send_error: bool = False) -> Refused:
        self._state = _DONE
        self._buf.clear()
        self._at = 0
        err = error(reason) if send_error else b""
        return Refused(reason, err)

    def _may_error(self) -> bool:
        """Whether a refusal now answers with an ERROR: in the NULL handshake, instead of our
        READY (ZMTP 3.1: the server replies to the client's READY with READY or ERROR);
        after our READY went (3.0) or the handshake, the grammar has no ERROR."""
        return self._state == _READY and not self._ready_sent

    def _signature(self) -> Event | None:
        buf, at = self._buf, self._at
        if len(buf) > at and buf[at] != 0xFF:
            return self._refuse("not a ZMTP peer (ZMTP 1.0 or no ZeroMQ at all)")
        if len(buf) - at >= 10 and not buf[at + 9] & 1:
            return self._refuse("not a ZMTP peer (ZMTP 1.0 or no ZeroMQ at all)")
        if self._take(10) is None:
            return None
        self._state = _VERSION
        return Skipped("signature")

    def _major(self) -> Event | None:
        got = self._take(1)
        if got is None:
            return None
        major = got[0]
        self.version = (major, 0)
        if major >= 3:
            self._state = _REST
            self._out += GREETING_REST if self.curve is None else CURVE_GREETING_REST
            return Skipped("major version")
        if major in (1, 2) and self.curve is not None:
            return self._refuse("a ZMTP 2.0 peer on a CURVE endpoint")
        if major in (1, 2):  # ZMTP 2.0 (spec 23: "1 or 2"): its socket type and identity
            self.version = (2, 0)
            self._state = _V2_TYPE
            self._out += bytes([_V2_PUB, 0, 0])
            return Skipped("major version")
        return self._refuse(f"ZMTP version {major}")

    def _rest(self) -> Event | None:
        buf, at = self._buf, self._at
        if len(buf) - at < 53:
            return None
        minor = buf[at]
        mechanism = bytes(buf[at + 1 : at + 21]).rstrip(b"\0")
        self._at += 53  # minor, mechanism, as-server, filler: none of them checked but these
        as_server = buf[at + 21]
        self.version = (self.version[0] if self.version else 3, minor)
        if self.curve is not None:
            if mechanism != b"CURVE":
                return self._refuse(f"mechanism {_shown(mechanism)!r}, not CURVE")
            if as_server:
                return self._refuse("a CURVE peer that says it is the server")
            self._state = _HELLO
            return Skipped("greeting")
        if mechanism != b"NULL":
            return self._refuse(f"mechanism {_shown(mechanism)!r}, not NULL")
        self._state = _READY
        if minor == 0:  # ZMTP 3.0: each side sends its READY before it reads the other's
            self._out += ready()
            self._ready_sent = True
        return Skipped("greeting")

    def _v2_type(self) -> Event | None:
        got = self._take(1)
        if got is None:
            return None
        kind = _V2_TYPES.get(got[0])
        if kind is None:
            return self._refuse(f"ZMTP 2.0 socket type {got[0]}, not SUB or XSUB")
        self.socket_type = kind
        self._state = _V2_IDENTITY
        return Skipped("socket type")

    def _v2_identity(self) -> Event | None:
        buf, at = self._buf, self._at
        if len(buf) - at < 2:
            return None
        if buf[at] != 0:
            return self._refuse("a malformed ZMTP 2.0 identity")
        size = buf[at + 1]
        if len(buf) - at - 2 < size:
            return None
        self._at += 2 + size
        self._state = _V2_OPEN
        assert self.socket_type is not None
        return Handshake((2, 0), self.socket_type, {})

    # -- frames ---------------------------------------------------------------

    def _frame(self) -> Event | None:
        buf, at = self._buf, self._at
        if len(buf) - at < 2:
            return None
        flags = buf[at]
        v2 = self._state == _V2_OPEN
        if flags & ~(_MORE | _LONG | (0 if v2 else _COMMAND)):
            return self._refuse(f"a frame with flags {flags:#04x}", self._may_error())
        if flags & _LONG:
            if len(buf) - at < 9:
                return None
            (size,) = _SIZE.unpack_from(buf, at + 1)
            start = at + 9
        else:
            size = buf[at + 1]
            start = at + 2
        state = self._state
        if state in _HANDSHAKE_COMMANDS:
            limit = MAX_READY
        else:
            limit = MAX_FRAME if self.curve is None else MAX_FRAME + CURVE_OVERHEAD
        if size > limit:
            head = bytes(buf[start : start + 15])
            heads: tuple[bytes, ...]
            if self.curve is None:
                heads = _FILTER_HEADS[bool(flags & _COMMAND)]
                maybe = self._state != _READY and size <= MAX_FILTER_FRAME
            else:  # what a MESSAGE boxes is seen once opened (_curve_message): a filter, or refused
                heads = (_MESSAGE_HEAD,)
                maybe = state not in (_HELLO, _INITIATE) and size <= MAX_FILTER_FRAME + CURVE_OVERHEAD
            if not (maybe and head.startswith(heads)):
                if maybe and len(head) < 15 and any(h.startswith(head) for h in heads):
                    return None  # a filter, perhaps: wait for its first bytes
                return self._refuse(f"a {size}-byte frame (at most {limit})", self._may_error())
        if len(buf) - start < size:
            return None
        body = bytes(buf[start : start + size])
        self._at = start + size
        if self.curve is not None:
            if state in (_HELLO, _INITIATE):
                if not flags & _COMMAND or flags & _MORE:
                    return self._refuse("a message in the CURVE handshake")
                return self._curve_command(body)
            return self._curve_message(flags, body)  # data frames, as libzmq sends them
        return self._dispatch(flags, body)

    def _dispatch(self, flags: int, body: bytes) -> Event:
        """A frame read whole (or opened from a CURVE MESSAGE)."""
        if flags & _COMMAND:
            if flags & _MORE:
                return self._refuse("a command frame with MORE set", self._may_error())
            return self._command(body)
        if self._state == _READY:
            return self._refuse("a message before READY", self._may_error())
        if self._skip or flags & _MORE:
            self._skip = bool(flags & _MORE)  # not a subscription (nothing else reaches an XPUB)
            return Skipped("a frame of a multipart message")
        if body[:1] == b"\x01":
            return Subscribe(body[1:])
        if body[:1] == b"\x00":
            return Cancel(body[1:])
        return Skipped("a message that is no subscription")

    def _curve_command(self, body: bytes) -> Event:
        """HELLO, then INITIATE (or an ERROR from the peer)."""
        from .curve import CurveRefused

        curve = self.curve
        assert curve is not None
        if body[:6] == b"\x05ERROR":
            return self._command(body)
        try:
            if self._state == _HELLO:
                self._out += command_raw(curve.hello(body))
                self._state = _INITIATE
                return Skipped("HELLO")
            key, metadata, reply = curve.initiate(body, _ready_body())
        except CurveRefused as e:
            refused = self._refuse(e.reason)
            if e.status:  # ZMTP 3.1 / spec 26: an ERROR in place of READY, a ZAP status code
                return Refused(e.reason, error(e.status))
            return refused
        props = properties(metadata)
        if props is None:
            return self._refuse("a malformed INITIATE metadata")
        kind = props.get(b"socket-type")
        if kind not in _PEER_TYPES:
            shown = "none" if kind is None else _shown(kind)
            return self._refuse(f"socket type {shown}, not SUB or XSUB")
        assert self.version is not None
        self.socket_type = kind
        self._state = _OPEN
        self._out += command_raw(reply)
        return Handshake(self.version, kind, props, key)

    def _curve_message(self, _flags: int, body: bytes) -> Event:
        """A MESSAGE after the handshake: the frame it boxes, as if it came plain."""
        from .curve import CurveRefused

        assert self.curve is not None  # the frame's own flags say nothing: the boxed ones do
        try:
            inner_flags, data = self.curve.open_message(body)
        except CurveRefused as e:
            return self._refuse(e.reason)
        if len(data) > MAX_FRAME and not data.startswith(_FILTER_HEADS[bool(inner_flags & 2)]):
            return self._refuse(f"a {len(data)}-byte frame (at most {MAX_FRAME})")
        return self._dispatch((inner_flags & _MORE) | (_COMMAND if inner_flags & 2 else 0), data)

    def _command(self, body: bytes) -> Event:
        n = body[0] if body else 0
        if n == 0 or n + 1 > len(body):
            return self._refuse("a malformed command", self._may_error())
        name, data = body[1 : 1 + n], body[1 + n :]
        if name == b"ERROR":  # fatal, whenever it comes (spec 23, "Error Handling")
            reason = data[1 : 1 + data[0]] if data else b""
            return self._refuse(f"ERROR from the peer: {_shown(reason)}")
        if self._state == _READY:
            if name != b"READY":
                return self._refuse(f"{_shown(name)} before READY", self._may_error())
            props = properties(data)
            if props is None:
                return self._refuse("a malformed READY", self._may_error())
            kind = props.get(b"socket-type")
            if kind not in _PEER_TYPES:
                shown = "none" if kind is None else _shown(kind)
                return self._refuse(f"socket type {shown}, not SUB or XSUB", self._may_error())
            assert self.version is not None
            self.socket_type = kind
            self._state = _OPEN
            if not self._ready_sent:
                self._out += ready()
            return Handshake(self.version, kind, props)
        if name == b"SUBSCRIBE":  # ZMTP 3.1's form of a (un)subscription
            return Subscribe(data)
        if name == b"CANCEL":
            return Cancel(data)
        if name == b"PING":
            if len(data) < 2 or len(data) > 18:
                return self._refuse("a malformed PING")
            return Ping(data[0] << 8 | data[1], data[2:])
        if name == b"READY":
            return self._refuse("a second READY")
        return Skipped(f"a {_shown(name)} command")
