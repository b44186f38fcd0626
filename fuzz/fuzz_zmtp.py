"""Coverage-guided fuzzing of the feed's ZMTP codec, ``nflogd.feed.codec.Codec`` (atheris).

::

    make fuzz                                        # both targets, FUZZ_SECONDS=60 each
    .venv/bin/python fuzz/fuzz_zmtp.py WORKDIR fuzz/corpus/zmtp -max_total_time=60
    .venv/bin/python fuzz/fuzz_zmtp.py --make-corpus # rewrite the seed corpus

An input is its first byte, the size of the pieces the rest is delivered in (0: whole),
and the rest: what a peer sends the server. For every input:

- the codec raises nothing, and hands out only its events; after a ``Refused`` it hands
  out nothing more;
- delivered whole, one byte at a time and in the input's pieces, it gives the same events
  and the same bytes to send;
- what it holds unparsed stays under one frame's bound (``MAX_READY`` and its header), and
  what it sends is its greeting, READY and at most one ERROR;
- a topic is at most ``MAX_FRAME`` bytes, a PING's context at most 16, an ERROR it sends a
  well-formed command.

The seed corpus (``fuzz/corpus/zmtp``) holds ``seeds()``: every form of greeting, READY,
subscription and command the specs know, and breaches of each; ``tests/test_bad_input.py``
replays it through ``check()`` in every test run.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside it, loaded by path too
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = HERE / "corpus" / "zmtp"


def run(data: bytes, step: int) -> tuple[list, bytes]:
    """Events and output of a fresh codec given ``data`` in pieces of ``step`` (0: whole)."""
    from nflogd.feed import codec as z

    c = z.Codec()
    out = c.output()
    events: list = []
    pieces = [data] if step <= 0 else [data[i : i + step] for i in range(0, len(data), step)]
    refused = False
    for piece in pieces:
        c.receive(piece)
        while (ev := c.next_event()) is not None:
            if refused:
                raise AssertionError(f"an event after Refused: {ev!r}")
            if not isinstance(ev, z.Event):
                raise AssertionError(f"not an event: {ev!r}")
            refused = isinstance(ev, z.Refused)
            events.append(ev)
        if c.unparsed > z.MAX_READY + 9:
            raise AssertionError(f"{c.unparsed} bytes held unparsed")
        out += c.output()
    if refused != c.done:
        raise AssertionError("done without Refused, or the reverse")
    return events, out


def check(data: bytes) -> None:
    """The property, for one input; raises on a violation."""
    from nflogd.feed import codec as z

    if not data:
        return
    step, stream = data[0], data[1:]
    whole = run(stream, 0)
    for other in (1, step):
        if run(stream, other) != whole:
            raise AssertionError(f"delivered {other} bytes at a time, the codec says otherwise")
    events, out = whole
    if not out.startswith(z.PARTIAL_GREETING):
        raise AssertionError("the greeting does not come first")
    allowed = (z.GREETING + z.ready(), z.PARTIAL_GREETING + b"\x01\x00\x00")
    if not any(a.startswith(out) for a in allowed):
        raise AssertionError(f"sent {out!r}")
    for ev in events:
        if isinstance(ev, (z.Subscribe, z.Cancel)) and len(ev.topic) >= z.MAX_FRAME:
            raise AssertionError(f"a {len(ev.topic)}-byte topic")
        if isinstance(ev, z.Ping) and len(ev.context) > 16:
            raise AssertionError("a PING context over 16 bytes")
        if isinstance(ev, z.Refused):
            if not ev.reason:
                raise AssertionError("a Refused without a reason")
            err = ev.error
            well_formed = err[:1] == b"\x04" and err[1] == len(err) - 2 and err[2:8] == b"\x05ERROR"
            if err and not (well_formed and err[8] == len(err) - 9):
                raise AssertionError(f"a malformed ERROR {err!r}")
        if isinstance(ev, z.Handshake) and ev.socket_type not in (b"SUB", b"XSUB"):
            raise AssertionError(f"a handshake with {ev.socket_type!r}")


# -- the seed corpus ---------------------------------------------------------------------------


def _frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body


def _prop(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def seeds() -> list[bytes]:
    """Streams a peer may send, each with the piece size it is delivered in."""
    from nflogd.feed.codec import command

    sig = b"\xff" + bytes(8) + b"\x7f"

    def greeting(minor: int = 1, mechanism: bytes = b"NULL") -> bytes:
        return sig + bytes([3, minor]) + mechanism.ljust(20, b"\0") + bytes(32)

    def ready(kind: bytes = b"SUB", *extra: bytes) -> bytes:
        return command(b"READY", _prop(b"Socket-Type", kind) + b"".join(extra))

    traffic = (
        _frame(b"\x01") + _frame(b"\x01\x00\x05") + _frame(b"\x00\x00\x05") + command(b"SUBSCRIBE", b"\x01")
        + command(b"CANCEL", b"\x01") + command(b"PING", b"\x00\x0actx") + command(b"PONG", b"x")
        + _frame(b"a", 1) + _frame(b"\x01b") + command(b"JOIN", b"g")
    )  # fmt: skip
    streams = [
        greeting(0) + ready() + traffic,
        greeting(1) + ready(b"XSUB", _prop(b"X-Meta", b"m" * 300), _prop(b"Identity", b"")) + traffic,
        sig + b"\x01\x02\x00\x00" + _frame(b"\x01") + _frame(b"\x00\x00\x01"),  # ZMTP 2.0 SUB
        sig + b"\x01\x0a\x00\x02me" + _frame(b"\x01\x00"),  # ZMTP 2.0 XSUB with an identity
        greeting(1) + ready(b"PUB"),
        greeting(0) + ready(b"DEALER"),
        greeting(1, b"CURVE") + ready(),
        greeting(1) + command(b"ERROR", b"\x04nope"),
        greeting(1) + ready() + b"\x02" + struct.pack(">Q", 1 << 40),
        greeting(1) + ready() + b"\x08\x01\x01",
        greeting(1) + _frame(b"\x01"),
        greeting(1) + command(b"READY", b"\x00\x00\x00\x00\x00"),
        greeting(1) + ready() + _frame(b"\x04PING\x00", 4),
        greeting(1) + ready() + _frame(b"\x05READY", 5),
        b"GET / HTTP/1.1\r\n\r\n",
        sig + b"\x00",
    ]
    return [bytes([step]) + s for s in streams for step in (0, 7)]


def main() -> None:
    harness.main(CORPUS, seeds, check, "nflogd.feed.codec")


if __name__ == "__main__":
    main()
