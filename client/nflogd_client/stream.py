"""The feed as stream-engine records: one message, one record of (key, headers, value).

The one mapping between a feed message (``wire``'s four frames) and a record of a stream
engine, used by the relay's JetStream publisher (``nflogd/jetstream.py``) and the client's
JetStream reader (``nflogd_client/jetstream.py``); ``docs/wire-format.md`` ("Stream records")
is its contract, with a test vector. Engine-neutral: JetStream uses ``key`` in its subject and
``msg_id`` as ``Nats-Msg-Id``; a Kafka driver would use the same key as the record key and the
same partition number.

::

    rec = record(frames)                  # frames: the 4 frames of one message, bytes or zmq Frames
    rec.partition, rec.key, rec.msg_id    # 3, "router1.5", "router1.5.1718000000123456789.1000"
    rec.value                             # frames 1, 2 and 3 joined: the wire bytes, whole
    subject(prefix, rec)                  # "nflog.3.router1.5"
    frames_of(rec.value)                  # the 4 frames again, for wire.decode
"""

from __future__ import annotations

import functools
import zlib
from typing import TYPE_CHECKING, NamedTuple, Sequence

from . import wire

if TYPE_CHECKING:
    import zmq

__all__ = ["Record", "node_token", "partition", "record", "subject", "frames_of", "MSG_ID_HEADER"]

#: The header that carries ``msg_id``; JetStream drops a second message with the same id
#: inside the stream's duplicate window.
MSG_ID_HEADER = "Nats-Msg-Id"

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


class Record(NamedTuple):
    """One feed message as a stream record (``docs/wire-format.md``, "Stream records")."""

    node: str
    group: int
    epoch: int
    first_seq: int
    count: int  # type: ignore[assignment]  # the header's field name; shadows tuple.count
    partition: int
    key: str  # "<node token>.<group>"
    msg_id: str  # "<key>.<epoch>.<first_seq>", a sequence mark's "<key>.<epoch>.<first_seq>.mark"
    value: bytes  # frames 1, 2, 3 of the message, concatenated


def node_token(node: str | bytes) -> str:
    """The node name as one subject token: the UTF-8 bytes ``A-Z a-z 0-9 _ -`` as they are,
    every other byte as ``%XX`` (upper-case hex); the empty name is ``=``.

    No token holds ``.``, ``*``, ``>`` or white space, and the rule is reversible, so two
    nodes never share a token.
    """
    raw = node.encode() if isinstance(node, str) else bytes(node)
    if not raw:
        return "="
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in raw)


def partition(node: str | bytes, group: int, partitions: int) -> int:
    """The partition of a (node, group): CRC-32 of the node's UTF-8 bytes, a NUL byte and the
    group as 2 bytes big-endian (the feed's topic), modulo ``partitions``."""
    raw = node.encode() if isinstance(node, str) else bytes(node)
    return zlib.crc32(raw + b"\0" + wire.TOPIC.pack(group)) % partitions


def record(frames: Sequence[bytes | zmq.Frame], partitions: int = 1) -> Record:
    """The record of one feed message; raises ``wire.WireError`` if its header is not version 1.

    Only the header is read (the records and data are passed on unread): the relay maps every
    message without decoding it, and readers decode the value with ``wire.decode``.
    """
    if len(frames) != 4:
        raise wire.WireError(f"expected 4 frames, got {len(frames)}")
    f1 = frames[1]
    header = f1 if isinstance(f1, bytes) else f1.bytes
    if len(header) < wire.HEADER.size:
        raise wire.WireError(f"header is {len(header)} bytes, expected at least {wire.HEADER.size}")
    magic, version, _, group, count, _, node_len, epoch, first_seq, _ = wire.HEADER.unpack_from(header)
    if magic != wire.MAGIC or version != wire.VERSION:
        raise wire.WireError(
            f"not a version-{wire.VERSION} nflogd header (magic {magic!r}, version {version})"
        )
    node, key, part = _keyed(header[wire.HEADER.size : wire.HEADER.size + node_len], group, partitions)
    # a zmq Frame is a buffer: joined with no copy before this one
    value = b"".join((header, frames[2], frames[3]))  # type: ignore[arg-type]
    return Record(
        node, group, epoch, first_seq, count, part, key,
        f"{key}.{epoch}.{first_seq}" if count else f"{key}.{epoch}.{first_seq}.mark",
        value,
    )  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _keyed(node_b: bytes, group: int, partitions: int) -> tuple[str, str, int]:
    """A (node, group)'s name, key and partition: the same for every message of it."""
    key = f"{node_token(node_b)}.{group}"
    return node_b.decode(errors="replace"), key, partition(node_b, group, partitions)


def subject(prefix: str, rec: Record) -> str:
    """The JetStream subject of a record: ``<prefix>.<partition>.<node token>.<group>``."""
    return f"{prefix}.{rec.partition}.{rec.key}"


def frames_of(value: bytes) -> list[bytes]:
    """The four frames of a message from a record's value (the topic rebuilt from the header's
    group); ``wire.decode`` of the result checks everything else."""
    if len(value) < wire.HEADER.size:
        raise wire.WireError(
            f"record value is {len(value)} bytes, shorter than a header ({wire.HEADER.size})"
        )
    _, _, _, group, count, rsize, node_len, _, _, _ = wire.HEADER.unpack_from(value)
    h_end = wire.HEADER.size + node_len
    t_end = h_end + count * rsize
    if t_end > len(value):
        raise wire.WireError(f"record value is {len(value)} bytes; its header and records need {t_end}")
    return [wire.TOPIC.pack(group), value[:h_end], value[h_end:t_end], value[t_end:]]
