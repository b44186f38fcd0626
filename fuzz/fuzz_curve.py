"""Coverage-guided fuzzing of the feed's CURVE codec, ``Codec(curve=CurveHandshake(...))`` (atheris).

::

    make fuzz                                        # every target, FUZZ_SECONDS=60 each
    .venv/bin/python fuzz/fuzz_curve.py WORKDIR fuzz/corpus/curve -max_total_time=60
    .venv/bin/python fuzz/fuzz_curve.py --make-corpus # rewrite the seed corpus

Random bytes never open a box, so the harness is a CurveZMQ client (``Client``, libsodium
through PyNaCl, as the server) that takes the input as far as it says: an input is its first
byte, the size of the pieces it is delivered in (0: whole), its second, the mode, and the rest:

- mode 0: after a CURVE greeting, the rest as it is (HELLO's parsing);
- mode 1: after the greeting and a valid HELLO, the rest as it is (INITIATE's);
- mode 2: after a whole handshake, the rest as frames to box, each ``flags, size, bytes``, every
  one a MESSAGE with the next nonce (subscriptions, commands, breaches inside the boxes);
- mode 3: after a whole handshake, the rest as it is (what is no MESSAGE, or a forged one);
- mode 4: the same as 2 from a client whose key is not authorized (ERROR 400, nothing after).

For every input: the codec raises nothing and hands out only events, nothing after a
``Refused``; whole, a byte at a time and in the input's pieces it gives the same events; what it
holds unparsed stays under a frame's bound; a topic is under ``MAX_FRAME`` bytes. The seed
corpus (``fuzz/corpus/curve``) is ``seeds()``; ``tests/test_bad_input.py`` replays it.
``tests/test_curve.py`` drives the server over sockets with ``Client``.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from nacl import bindings as sodium

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside it, loaded by path too
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus" / "curve"
_NONCE = struct.Struct(">Q")

SERVER = sodium.crypto_box_seed_keypair(b"s" * 32)  # (public, secret)
ALICE = sodium.crypto_box_seed_keypair(b"a" * 32)  # authorized
MALLORY = sodium.crypto_box_seed_keypair(b"m" * 32)  # not
SEED = b"t" * 32  # the harness client's short-term key pair


def frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + _NONCE.pack(len(body)) + body


def prop(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def greeting(minor: int = 1, mechanism: bytes = b"CURVE", as_server: int = 0) -> bytes:
    return (
        b"\xff"
        + bytes(8)
        + b"\x7f"
        + bytes([3, minor])
        + mechanism.ljust(20, b"\0")
        + bytes([as_server])
        + bytes(31)
    )


class Client:
    """A CurveZMQ client (rfc.zeromq.org/spec/26 over ZMTP 3.0), the commands as frames."""

    def __init__(
        self,
        server_public: bytes,
        pair: tuple[bytes, bytes] = ALICE,
        kind: bytes = b"SUB",
        seed: bytes | None = None,
    ):
        """``seed``: 32 bytes that make the short-term key pair (the same HELLO each time)."""
        self.server = server_public
        self.public, self.secret = pair
        self.kind = kind
        self.t_public, self.t_secret = (
            sodium.crypto_box_keypair() if seed is None else sodium.crypto_box_seed_keypair(seed)
        )
        self.nonce = 1
        self.server_t = b""
        self.cookie = b""
        self.key = b""

    def _next(self) -> bytes:
        n = _NONCE.pack(self.nonce)
        self.nonce += 1
        return n

    def hello(self, version: bytes = b"\x01\x00", padding: bytes = bytes(72)) -> bytes:
        n = self._next()
        box = sodium.crypto_box(bytes(64), b"CurveZMQHELLO---" + n, self.server, self.t_secret)
        return frame(b"\x05HELLO" + version + padding + self.t_public + n + box, 4)

    def welcome(self, body: bytes) -> None:
        """The server's WELCOME command body: its short-term key and the cookie."""
        assert body[:8] == b"\x07WELCOME", body[:8]
        plain = sodium.crypto_box_open(body[24:], b"WELCOME-" + body[8:24], self.server, self.t_secret)
        self.server_t, self.cookie = plain[:32], plain[32:128]

    def initiate(self, metadata: bytes | None = None, vouch_for: bytes | None = None) -> bytes:
        vn = sodium.randombytes(16)
        vouch = sodium.crypto_box(self.t_public + (vouch_for or self.server), b"VOUCH---" + vn, self.server_t,
                                  self.secret)  # fmt: skip
        meta = prop(b"Socket-Type", self.kind) if metadata is None else metadata
        n = self._next()
        box = sodium.crypto_box(self.public + vn + vouch + meta, b"CurveZMQINITIATE" + n, self.server_t,
                                self.t_secret)  # fmt: skip
        self.key = sodium.crypto_box_beforenm(self.server_t, self.t_secret)
        return frame(b"\x08INITIATE" + self.cookie + n + box, 4)

    def ready(self, body: bytes) -> bytes:
        """The server's READY command body -> its metadata."""
        assert body[:6] == b"\x05READY", body[:6]
        return sodium.crypto_box_open_afternm(body[14:], b"CurveZMQREADY---" + body[6:14], self.key)

    def message(self, data: bytes, flags: int = 0, nonce: int | None = None) -> bytes:
        """A frame (flags: 1 MORE, 2 COMMAND) boxed as a MESSAGE, with the next nonce unless told."""
        n = self._next() if nonce is None else _NONCE.pack(nonce)
        box = sodium.crypto_box_afternm(bytes([flags]) + data, b"CurveZMQMESSAGEC" + n, self.key)
        return frame(b"\x07MESSAGE" + n + box)

    def open(self, body: bytes) -> tuple[int, bytes]:
        """A server's MESSAGE body -> (flags, data)."""
        assert body[:8] == b"\x07MESSAGE", body[:8]
        plain = sodium.crypto_box_open_afternm(body[16:], b"CurveZMQMESSAGES" + body[8:16], self.key)
        return plain[0], plain[1:]


def command_body(out: bytes) -> bytes:
    """The body of the first command frame in ``out`` (the server's bytes after its greeting)."""
    if out[0] & 2:
        (size,) = _NONCE.unpack(out[1:9])
        return out[9 : 9 + size]
    return out[2 : 2 + out[1]]


def run(mode: int, rest: bytes, step: int) -> list:
    """The events a fresh CURVE codec hands out for one input, delivered in pieces of ``step``."""
    from nflogd.feed import codec as z
    from nflogd.feed.curve import CurveHandshake, CurveKeys

    keys = CurveKeys(SERVER[0], SERVER[1], frozenset([ALICE[0]]))
    c = z.Codec(CurveHandshake(keys))
    events: list = []
    greeting_out = len(z.PARTIAL_GREETING + z.CURVE_GREETING_REST)

    def feed(data: bytes) -> bytes:
        pieces = [data] if step <= 0 else [data[i : i + step] for i in range(0, len(data), step)]
        for piece in pieces:
            c.receive(piece)
            while (ev := c.next_event()) is not None:
                if events and isinstance(events[-1], z.Refused):
                    raise AssertionError(f"an event after Refused: {ev!r}")
                if not isinstance(ev, z.Event):
                    raise AssertionError(f"not an event: {ev!r}")
                if isinstance(ev, (z.Subscribe, z.Cancel)) and len(ev.topic) >= z.MAX_FRAME:
                    raise AssertionError(f"a {len(ev.topic)}-byte topic")
                events.append(ev)
            if c.unparsed > z.MAX_READY + 9:
                raise AssertionError(f"{c.unparsed} bytes held unparsed")
        return c.output()

    client = Client(SERVER[0], MALLORY if mode == 4 else ALICE, seed=SEED)
    if mode == 0:
        feed(greeting() + rest)
        return events
    out = feed(greeting() + client.hello())
    if c.done:
        raise AssertionError(f"a valid HELLO refused: {events[-1]!r}")
    if len(out) <= greeting_out:
        raise AssertionError(f"a valid HELLO, {step} bytes at a time, got no WELCOME")
    client.welcome(command_body(out[greeting_out:]))
    if mode == 1:
        feed(rest)
        return events
    out = feed(client.initiate())
    if mode == 4:
        if not (c.done and events[-1].error == z.error("400")):
            raise AssertionError("an unauthorized key not told 400")
        return events
    if not c.open or not out:
        raise AssertionError(f"a valid INITIATE, {step} bytes at a time, refused or unanswered")
    if client.ready(command_body(out)) != z._ready_body():
        raise AssertionError("READY's metadata")
    if mode == 3:
        feed(rest)
        return events
    boxed, at = b"", 0
    while at + 2 <= len(rest):
        flags, size = rest[at], rest[at + 1]
        boxed += client.message(rest[at + 2 : at + 2 + size], flags)
        at += 2 + size
    feed(boxed)
    return events


def check(data: bytes) -> None:
    """The property, for one input; raises on a violation."""
    if len(data) < 2:
        return
    step, mode, rest = data[0], data[1] % 5, data[2:]
    whole = run(mode, rest, 0)
    for other in (1, step):
        got = run(mode, rest, other)
        if got != whole:
            raise AssertionError(
                f"delivered {other} bytes at a time, the codec says otherwise: {got} {whole}"
            )


# -- the seed corpus ---------------------------------------------------------------------------


def seeds() -> list[bytes]:
    """Inputs of every mode: valid traffic and breaches of each step."""
    cmd = lambda name, data=b"": bytes([len(name)]) + name + data  # noqa: E731
    inner = (
        bytes([0, 1]) + b"\x01" + bytes([0, 3]) + b"\x01\x00\x05"
        + bytes([2, 12]) + cmd(b"SUBSCRIBE", b"\x00\x05")
        + bytes([2, 9]) + cmd(b"CANCEL", b"\x01") + bytes([2, 10]) + cmd(b"PING", b"\x00\x0actx")
        + bytes([1, 1]) + b"a" + bytes([0, 2]) + b"\x01b" + bytes([8, 1]) + b"\x01"
    )  # fmt: skip

    def hello(server: bytes = SERVER[0], **kw) -> bytes:
        return Client(server, seed=SEED).hello(**kw)

    streams = [
        (0, hello()),
        (0, hello(version=b"\x02\x00")),
        (0, hello(padding=b"\x01" + bytes(71))),
        (0, hello(MALLORY[0])),  # boxed for another server
        (0, frame(b"\x05HELLO" + bytes(10), 4)),
        (0, frame(b"\x08INITIATE" + bytes(300), 4)),
        (0, frame(b"\x05ERROR\x03400", 4)),
        (0, frame(b"\x01", 0)),
        (1, frame(b"\x08INITIATE" + bytes(300), 4)),
        (1, hello()),
        (1, frame(b"\x07MESSAGE" + bytes(40))),
        (2, inner),
        (2, bytes([2, 7]) + cmd(b"READY", b"x")),
        (2, bytes([2, 6]) + cmd(b"ERROR", b"\x00")),
        (2, bytes([0, 5]) + b"\x01" + bytes(4)),
        (3, frame(b"\x07MESSAGE" + bytes(40))),
        (3, frame(b"\x01\x00\x05")),
        (3, frame(b"\x07MESSAGE" + bytes(80), 4)),
        (4, inner),
    ]
    return [bytes([step, mode]) + rest for mode, rest in streams for step in (0, 7)]


def main() -> None:
    harness.main(CORPUS, seeds, check, "nflogd.feed.codec", "nflogd.feed.curve")


if __name__ == "__main__":
    main()
