"""Coverage-guided fuzzing of the feed's decoder, ``nflogd_client.wire.decode`` (atheris).

::

    make fuzz                                        # FUZZ_SECONDS=60 by default
    .venv/bin/python fuzz/fuzz_wire.py WORKDIR fuzz/corpus/wire -max_total_time=60
    .venv/bin/python fuzz/fuzz_wire.py --make-corpus # rewrite the seed corpus

An input is one ZeroMQ message: its frames one after another, each as a little-endian u32
length and that many bytes (a length past the end takes what is left). For every input:

- ``decode`` returns a ``Batch`` or raises ``WireError`` with a message; anything else is a
  crash;
- a ``Batch`` encodes again (or the encoder refuses, by ``ValueError``, what the format
  cannot carry), and decoding that gives the same header and the same packets, field by
  field.

The seed corpus (``fuzz/corpus/wire``) holds the test vectors of ``tests/vectors`` and a
few real encodes; ``tests/test_bad_input.py`` replays it through ``check()`` in every test
run, so an input that once crashed stays a test once added there.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py beside it, loaded by path too
import harness  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = HERE / "corpus" / "wire"
VECTORS = ROOT / "tests" / "vectors"
_LEN = struct.Struct("<I")


def split_frames(data: bytes) -> list[bytes]:
    """The frames of an input (see the module docstring)."""
    frames = []
    i = 0
    while i < len(data):
        if len(data) - i < _LEN.size:
            frames.append(data[i:])
            break
        (n,) = _LEN.unpack_from(data, i)
        i += _LEN.size
        frames.append(data[i : i + n])
        i += n
    return frames


def join_frames(frames: list[bytes]) -> bytes:
    return b"".join(_LEN.pack(len(f)) + f for f in frames)


def check(data: bytes) -> None:
    """The property, for one input; raises on a violation."""
    from nflogd_client import wire

    frames = split_frames(data)
    try:
        batch = wire.decode(frames)
    except wire.WireError as e:
        if not str(e):
            raise AssertionError("a WireError without a message") from None
        return
    try:
        again = wire.encode(
            batch.group, batch.node, batch.epoch, batch.first_seq, batch.packets, batch.kernel_dropped
        )
    except ValueError:
        return  # e.g. a Latin-1 prefix whose UTF-8 no longer fits prefix_len
    back = wire.decode(again)
    head = ("group", "node", "epoch", "first_seq", "kernel_dropped")
    if [getattr(back, k) for k in head] != [getattr(batch, k) for k in head]:
        raise AssertionError(f"header changed: {batch!r} -> {back!r}")
    if len(back.packets) != len(batch.packets):
        raise AssertionError("packet count changed")
    for a, b in zip(batch.packets, back.packets):
        if a.fields() != b.fields():
            raise AssertionError(f"packet changed:\n{a.fields()}\n{b.fields()}")


# -- the seed corpus ---------------------------------------------------------------------------


def seeds() -> list[list[bytes]]:
    """The test vectors' frames, and real encodes of what the vectors do not show."""
    from nflogd_client import wire
    from nflogd_client.wire import Packet

    out = [
        [bytes.fromhex(h) for h in json.loads(p.read_text())["frames"]]
        for p in sorted(VECTORS.glob("*.json"))
    ]
    v4 = bytes.fromhex("4500001c1c46400040010a990a0000010a0000020800e5ca12340001")
    full = Packet.build(
        7, v4, 10**18, prefix="caf\u00e9 ", mark=0, indev=1, outdev=2, physindev=3, physoutdev=4,
        uid=0, gid=0, hw_protocol=0x0800, hook=2, hwaddr=b"\x00\x11\x22\x33\x44\x55\x66\x77",
        kernel_seq=2**32 - 1, len=1500,
    )  # fmt: skip
    out.append(wire.encode(7, "\u00e9" * 127, 2**64 - 1, 2**64 - 2, [full], 2**64 - 1))
    out.append(wire.encode(65535, "", 0, 0, []))  # an empty batch
    out.append(wire.encode(1, "r", 1, 10, [Packet.build(1, bytes([i]) * i, i) for i in range(8)]))
    widened = wire.encode(3, "w", 1, 0, [full, Packet.build(3, b"", 1, ts_kernel=False)])
    header = bytearray(widened[1])
    struct.pack_into("<H", header, 12, 80)  # a later minor version's record_size
    table = b"".join(widened[2][i : i + 72] + b"\xa5" * 8 for i in range(0, len(widened[2]), 72))
    out.append([widened[0], bytes(header), table, widened[3]])
    latin1 = wire.encode(4, "l", 1, 0, [Packet.build(4, b"x", prefix="\u00ff" * 3)])
    latin1[3] = latin1[3][:1] + b"\xff" * 3  # a prefix that is not UTF-8
    out.append(latin1)
    return out


def main() -> None:
    harness.main(CORPUS, lambda: [join_frames(f) for f in seeds()], check, "nflogd_client.wire")


if __name__ == "__main__":
    main()
