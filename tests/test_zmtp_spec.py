"""The feed's ZMTP codec against the specs, rule by rule: rfc.zeromq.org/spec/23 (ZMTP 3.0) and
/spec/37 (ZMTP 3.1), each MUST (and SHALL) that binds the side that binds and publishes, and
the downgrade to ZMTP 2.0 (/spec/15) that /spec/23's "Backwards Interoperability" describes.

Each input goes into the codec twice, whole and one byte at a time: the events and the bytes
it answers with must be the same (``talk``). A few go over a real socket one byte per send,
against the real server of a Publisher.
"""

from __future__ import annotations

import socket
import struct

import pytest
import zmq
from fuzzutil import fuzzer
from hypothesis import given, settings
from hypothesis import strategies as st
from nflogd_client import wire
from nflogd_client.filters import FILTER_TOPIC
from pubutil import serve

from nflogd.config_publish import PublishConfig
from nflogd.feed.codec import (
    GREETING,
    GREETING_REST,
    MAX_FILTER_FRAME,
    MAX_FRAME,
    MAX_READY,
    PARTIAL_GREETING,
    Cancel,
    Codec,
    Handshake,
    Ping,
    Refused,
    Skipped,
    Subscribe,
    command,
    pong,
    properties,
    ready,
)
from nflogd.feed.server import Topics
from nflogd.publish import Publisher

pytestmark = pytest.mark.timeout(30)

SIG = b"\xff" + bytes(8) + b"\x7f"


def greeting(major: int = 3, minor: int = 1, mechanism: bytes = b"NULL", padding: bytes = bytes(8)) -> bytes:
    return b"\xff" + padding + b"\x7f" + bytes([major, minor]) + mechanism.ljust(20, b"\0") + bytes(32)


def prop(name: bytes, value: bytes) -> bytes:
    return bytes([len(name)]) + name + struct.pack(">I", len(value)) + value


def peer_ready(kind: bytes = b"SUB", *extra: bytes) -> bytes:
    return command(b"READY", prop(b"Socket-Type", kind) + b"".join(extra))


def frame(body: bytes, flags: int = 0) -> bytes:
    if len(body) < 256:
        return bytes([flags, len(body)]) + body
    return bytes([flags | 2]) + struct.pack(">Q", len(body)) + body


def run(data: bytes, step: int | None) -> tuple[list, bytes]:
    """The codec's events and output for ``data`` given whole (step None) or ``step`` bytes
    at a time; the events stop at a Refused."""
    codec = Codec()
    out = codec.output()
    events: list = []
    pieces = [data] if step is None else [data[i : i + step] for i in range(0, len(data), step)]
    for piece in pieces:
        codec.receive(piece)
        while (ev := codec.next_event()) is not None:
            events.append(ev)
        out += codec.output()
        if codec.done:
            break
    return events, out


def talk(data: bytes) -> tuple[list, bytes]:
    """``run`` whole, one byte at a time, and three at a time: all the same; the events (less
    Skipped) and the output."""
    whole = run(data, None)
    assert run(data, 1) == whole, "one byte at a time differs"
    assert run(data, 3) == whole, "three bytes at a time differ"
    events, out = whole
    return [e for e in events if not isinstance(e, Skipped)], out


def refused(events: list) -> Refused:
    assert events and isinstance(events[-1], Refused), events
    return events[-1]


OPEN = greeting() + peer_ready()  # a ZMTP 3.1 SUB, its handshake done


# -- spec 23/37, "Version Negotiation" --------------------------------------------------


def test_the_server_sends_signature_and_major_version_first_and_no_more():
    """23: "the peer SHALL send ... a partial greeting ... the first 11 octets"; then it
    "SHALL read the first eleven octets" of the other's before it decides the rest."""
    events, out = talk(SIG)
    assert out == PARTIAL_GREETING == b"\xff" + bytes(8) + b"\x7f\x03"
    assert events == []


def test_padding_is_never_validated():
    """23/37: "A peer ... MUST NOT validate [the padding] nor interpret it in any way": ZMTP 1.0
    detection's identity size there, or any byte, changes nothing."""
    for padding in (bytes(8), b"\x00" * 7 + b"\x01", b"\xaa" * 8, b"\xff" * 8):
        events, out = talk(greeting(padding=padding) + peer_ready())
        assert events == [Handshake((3, 1), b"SUB", {b"socket-type": b"SUB"})]
        assert out == GREETING + ready()


@pytest.mark.parametrize("major, minor", [(3, 0), (3, 1), (3, 2), (3, 255), (4, 0), (255, 255)])
def test_higher_versions_are_accepted(major, minor):
    """23: "MUST accept protocol versions greater or equal to 3.0"; 37: "... to 3.1"."""
    events, out = talk(greeting(major, minor) + peer_ready())
    assert events == [Handshake((major, minor), b"SUB", {b"socket-type": b"SUB"})]
    assert out == GREETING + ready()


def test_the_server_speaks_its_own_protocol_to_a_higher_version():
    """23: "A peer SHALL always use its own protocol (including framing) when talking to an
    equal or higher protocol peer": a 4.0 peer gets a 3.1 greeting and a ZMTP 3 READY, and
    its ZMTP 3 frames are read as such."""
    events, out = talk(greeting(4, 0) + peer_ready() + frame(b"\x01\x00\x05"))
    assert out[:64] == GREETING and out[10:12] == b"\x03\x01" and out[64:] == ready()
    assert events[-1] == Subscribe(b"\x00\x05")


@pytest.mark.parametrize(
    "sent, why",
    [
        (b"\x05abcde", "ZMTP 1.0: a short identity frame"),
        (b"GET / HTTP/1.1\r\n\r\n", "not ZMTP"),
        (b"\xff" + bytes(8) + b"\x00", "ZMTP 1.0: a long identity frame (bit 0 of octet 10 clear)"),
        (SIG + b"\x00", "major version 0"),
    ],
)  # fmt: skip
def test_a_version_it_cannot_downgrade_to_is_closed(sent, why):
    """23/37: "If a peer cannot downgrade its protocol to match its peer, it MUST close the
    connection" (no ERROR: that peer would not understand one); at the first octet that
    says so, not at the 64th."""
    events, out = talk(sent)
    assert refused(events).error == b"", why
    assert out == PARTIAL_GREETING
    first = run(sent[:1], 1)[0]
    assert (sent[0] != 0xFF) == bool(first and isinstance(first[-1], Refused))


# -- spec 23/37, "Authentication and Confidentiality" ----------------------------------


def test_reading_a_major_version_sends_the_full_greeting():
    """23/37: "A peer that reads a full greeting, including mechanism, MUST also send a full
    greeting including mechanism": the rest goes as soon as the peer's major version is read."""
    events, out = talk(SIG + b"\x03")
    assert out == GREETING and events == []
    assert GREETING[12:32] == b"NULL".ljust(20, b"\0")


@pytest.mark.parametrize("mechanism", [b"PLAIN", b"CURVE", b"null", b"NULLX", b"NUL", b"GSSAPI"])
def test_a_mechanism_other_than_null_is_closed(mechanism):
    """23/37: "If the mechanism that the peer received does not exactly match the mechanism it
    sent, it MUST close the connection"."""
    events, out = talk(greeting(mechanism=mechanism) + peer_ready())
    assert "mechanism" in refused(events).reason
    assert out == GREETING and len(events) == 1


def test_the_null_greeting_says_as_server_zero():
    """23/37 (NULL): "the as-server field MUST be zero"."""
    assert GREETING[32] == 0 and GREETING[33:] == bytes(31) and len(GREETING) == 64


# -- "Error Handling" -------------------------------------------------------------------


@pytest.mark.parametrize(
    "sent",
    [
        greeting() + command(b"ERROR", b"\x05nope!"),  # instead of READY
        OPEN + command(b"ERROR", b"\x00"),  # after the handshake
        greeting(3, 0) + command(b"ERROR", b""),  # no reason at all
    ],
)
def test_an_error_command_is_fatal(sent):
    """23/37: "The peer SHALL treat an incoming ERROR command as fatal, and act by closing the
    connection" (and answer nothing)."""
    events, _ = talk(sent)
    r = refused(events)
    assert r.reason.startswith("ERROR from the peer") and r.error == b""


# -- "Framing" --------------------------------------------------------------------------


@pytest.mark.parametrize("bit", [3, 4, 5, 6, 7])
def test_reserved_flag_bits_must_be_zero(bit):
    """23/37: "Bits 7-3 are reserved ... and MUST be zero": a frame with one set is a breach,
    in the handshake (an ERROR then, instead of READY) and after it."""
    events, out = talk(greeting() + bytes([1 << bit | 4, 0]))
    assert refused(events).error.startswith(b"\x04") and out == GREETING
    events, out = talk(OPEN + bytes([1 << bit, 1, 1]))
    assert refused(events).error == b"" and out == GREETING + ready()


def test_more_must_be_zero_on_a_command():
    """23/37: the MORE bit "SHALL be zero on command frames"."""
    assert "MORE" in refused(talk(OPEN + bytes([4 | 1, 6, 4]) + b"PING\x00\x00")[0]).reason


def test_long_and_short_frames_alike():
    """23/37: a short frame is 0-255 octets, a long one 0 to 2^63-1: a READY and a
    subscription in long frames read as in short ones."""
    long_ready = bytes([6]) + struct.pack(">Q", len(peer_ready()) - 2) + peer_ready()[2:]
    events, _ = talk(greeting() + long_ready + b"\x02" + struct.pack(">Q", 2) + b"\x01\x07")
    assert events == [Handshake((3, 1), b"SUB", {b"socket-type": b"SUB"}), Subscribe(b"\x07")]


@pytest.mark.parametrize("size", [MAX_FILTER_FRAME + 1, 1 << 32, (1 << 63) - 1, (1 << 64) - 1])
def test_a_frame_past_the_bound_is_refused_at_its_header(size):
    """Frames past MAX_FILTER_FRAME after the handshake are refused on their header alone:
    nothing of the body is waited for or kept."""
    events, _ = talk(OPEN + b"\x02" + struct.pack(">Q", size))
    assert "byte frame" in refused(events).reason


@pytest.mark.parametrize("size", [MAX_FRAME + 1, MAX_FILTER_FRAME])
def test_a_frame_past_max_frame_is_refused_at_its_first_bytes_unless_a_filter(size):
    """Past MAX_FRAME, up to MAX_FILTER_FRAME, only a filter's subscription is read
    (docs/filters.md): the frame's first 15 bytes say whether it is one."""
    events, _ = talk(OPEN + b"\x02" + struct.pack(">Q", size) + b"\x01\xffNFLX" + bytes(9))
    assert "byte frame" in refused(events).reason
    body = b"\x01" + FILTER_TOPIC + bytes(size - 1 - len(FILTER_TOPIC))
    events, _ = talk(OPEN + b"\x02" + struct.pack(">Q", size) + body)
    assert events[1:] == [Subscribe(body[1:])]
    cmd = b"\x09SUBSCRIBE" + FILTER_TOPIC + bytes(size - 10 - len(FILTER_TOPIC))
    events, _ = talk(OPEN + b"\x06" + struct.pack(">Q", size) + cmd)
    assert events[1:] == [Subscribe(cmd[10:])]


def test_a_multipart_message_is_not_a_subscription():
    """An XSUB may send any message: only a single-frame one starting with 0 or 1 is an
    (un)subscription; the frames of a multipart one are skipped, each an event."""
    events, _ = talk(OPEN + frame(b"\x01\x00\x01", 1) + frame(b"\x01\x00\x02") + frame(b"\x01\x00\x03"))
    assert events[1:] == [Subscribe(b"\x00\x03")]
    everything, _ = run(OPEN + frame(b"x", 1) + frame(b"y"), 1)
    assert [type(e) for e in everything[-2:]] == [Skipped, Skipped]


# -- NULL: "The NULL Security Mechanism" -------------------------------------------------


def test_the_server_replies_to_a_ready_with_ready():
    """37: "the client SHALL send a READY command and then wait for a READY command in reply
    ... If there is no error, [the server] MUST send a READY command in reply"."""
    events, out = run(greeting(), 1)
    assert out == GREETING  # no READY before the client's
    events, out = talk(OPEN)
    assert out == GREETING + ready() and ready() == command(b"READY", prop(b"Socket-Type", b"XPUB"))


def test_a_3_0_peer_gets_ready_before_its_own_is_read():
    """23: "each peer MUST send its READY command before attempting to receive a READY from
    the other peer": to a 3.0 peer, the server's READY goes with its greeting."""
    events, out = talk(greeting(3, 0))
    assert out == GREETING + ready() and events == []
    events, out = talk(greeting(3, 0) + peer_ready(b"PUB"))
    assert refused(events).error == b""  # no ERROR after a READY: the grammar has none


@pytest.mark.parametrize(
    "kind", [b"PUB", b"XPUB", b"DEALER", b"ROUTER", b"REQ", b"REP", b"PUSH", b"PULL", b"PAIR", b"sub"]
)
def test_a_socket_type_that_cannot_subscribe_gets_an_error(kind):
    """23/37 "The Socket-Type Property": an XPUB serves SUB and XSUB only; "When a peer
    validates the socket type, it SHOULD handle errors by returning an ERROR command, and
    then disconnecting the peer": the ERROR goes instead of READY."""
    events, out = talk(greeting() + peer_ready(kind))
    r = refused(events)
    assert out == GREETING and r.error == command(b"ERROR", bytes([len(r.reason)]) + r.reason.encode())
    assert kind.decode() in r.reason


@pytest.mark.parametrize("kind", [b"SUB", b"XSUB"])
def test_sub_and_xsub_are_served(kind):
    events, _ = talk(greeting() + peer_ready(kind))
    assert events == [Handshake((3, 1), kind, {b"socket-type": kind})]


def test_property_names_are_case_insensitive():
    """23/37: "Metadata names SHALL be case-insensitive"."""
    for name in (b"socket-type", b"SOCKET-TYPE", b"sOcKeT-tYpE"):
        events, _ = talk(greeting() + command(b"READY", prop(name, b"SUB")))
        assert events[0].socket_type == b"SUB"


@pytest.mark.parametrize(
    "body, why",
    [
        (prop(b"Socket-Type", b"SUB") + b"\x00" + struct.pack(">I", 0), "a name of 0 octets"),
        (prop(b"Socket-Type", b"SUB") + b"\x05Ident", "a property cut short"),
        (b"\x0bSocket-Type" + struct.pack(">I", 4) + b"SUB", "a value past the end"),
        (prop(b"Identity", b""), "no Socket-Type"),
    ],
)  # fmt: skip
def test_a_malformed_ready_gets_an_error(body, why):
    """23/37: "The name SHALL be 1 to 255 characters. Zero-sized names are not valid"; a
    value's size SHALL be four octets: a READY that breaks them is refused with an ERROR."""
    events, out = talk(greeting() + command(b"READY", body))
    assert refused(events).error.startswith(b"\x04"), why
    assert out == GREETING


def test_a_message_or_other_command_before_ready_is_refused():
    """NULL: "null = ready *message | error": before the READY, nothing else."""
    assert "message before READY" in refused(talk(greeting() + frame(b"\x01"))[0]).reason
    assert "PING before READY" in refused(talk(greeting() + command(b"PING", b"\x00\x00"))[0]).reason


def test_a_second_ready_is_refused():
    assert "second READY" in refused(talk(OPEN + peer_ready())[0]).reason


def test_ready_with_metadata_up_to_4_kib():
    """Any ZMQ_METADATA a libzmq SUB adds (X- properties), an Identity, a Resource (37: "The
    implementation SHALL accept all resource requests"): up to MAX_READY bytes of READY."""
    extra = [prop(b"X-Host", b"h" * 60), prop(b"Identity", b"\x01me"), prop(b"Resource", b"/feed")]
    base = len(b"\x05READY" + prop(b"Socket-Type", b"SUB") + b"".join(extra) + prop(b"X-Fill", b""))
    body_extra = [*extra, prop(b"X-Fill", b"f" * (MAX_READY - base))]
    full = peer_ready(b"SUB", *body_extra)
    assert len(full) - 9 == MAX_READY
    events, out = talk(greeting() + full)
    assert events[0].properties[b"x-host"] == b"h" * 60 and events[0].properties[b"resource"] == b"/feed"
    assert out == GREETING + ready()
    over = peer_ready(b"SUB", *body_extra, b"\x01X" + struct.pack(">I", 0))
    assert "byte frame" in refused(talk(greeting() + over)[0]).reason


def test_properties_parse_as_the_grammar_says():
    assert properties(prop(b"A", b"1") + prop(b"b-C", b"")) == {b"a": b"1", b"b-c": b""}
    assert properties(b"") == {}
    assert properties(b"\x01A\x00\x00\x00") is None


# -- "The Publish-Subscribe Pattern" ------------------------------------------------------


def test_both_subscription_forms_in_either_version():
    """23: SUBSCRIBE and unsubscribe messages (%d1 / %d0 and the subscription); 37: SUBSCRIBE
    and CANCEL commands; a peer may use either whatever version it announced."""
    sent = (
        frame(b"\x01\x00\x01") + frame(b"\x00\x00\x01") + command(b"SUBSCRIBE", b"\x00\x02")
        + command(b"CANCEL", b"\x00\x02") + frame(b"\x01") + command(b"SUBSCRIBE")
    )  # fmt: skip
    for g in (greeting(3, 0), greeting(3, 1)):
        events, _ = talk(g + peer_ready() + sent)
        assert events[1:] == [
            Subscribe(b"\x00\x01"), Cancel(b"\x00\x01"), Subscribe(b"\x00\x02"), Cancel(b"\x00\x02"),
            Subscribe(b""), Subscribe(b""),
        ]  # fmt: skip


def test_subscriptions_are_additive_and_not_idempotent():
    """23/37: "Subscribing to "A" and "A" counts as two subscriptions, and would require two
    unsubscribe messages to undo" (each peer's Topics keeps the count)."""
    topics = Topics()
    assert topics.subscribe(b"\x00\x01") is True
    assert topics.subscribe(b"\x00\x01") is False
    assert topics.cancel(b"\x00\x01") is False and topics.filter()[2] is not None
    assert topics.cancel(b"\x00\x01") is True and topics.filter() == (False, bytes(32), None)
    assert topics.cancel(b"\x00\x01") is False  # one too many: nothing happens
    assert (
        topics.subscribe(b"\x00")
        and topics.subscribe(b"")
        and topics.filter()[:2] == (True, b"\x01" + bytes(31))
    )


# -- 37 "Connection Heartbeating" ----------------------------------------------------------


@pytest.mark.parametrize("context", [b"", b"c", b"0123456789abcdef"])
def test_ping_is_answered_with_its_context(context):
    """37: "When a peer receives a PING command it SHALL respond with a PONG command that
    echoes the ping-context, which may be empty and MUST not exceed 16 octets"."""
    events, _ = talk(OPEN + command(b"PING", b"\x01\x00" + context))
    assert events[-1] == Ping(256, context)
    assert pong(context) == command(b"PONG", context) and len(pong(b"x" * 40)) == 2 + 5 + 16


def test_a_ping_context_over_16_octets_is_a_breach():
    assert "PING" in refused(talk(OPEN + command(b"PING", b"\x00\x00" + bytes(17)))[0]).reason
    assert "PING" in refused(talk(OPEN + command(b"PING", b"\x00"))[0]).reason


def test_pong_and_unknown_commands_are_skipped():
    events, _ = run(OPEN + command(b"PONG", b"x") + command(b"JOIN", b"g") + command(b"FUTURE"), None)
    assert [e.what for e in events[-3:]] == ["a PONG command", "a JOIN command", "a FUTURE command"]


@pytest.mark.parametrize("body", [b"", b"\x00", b"\x05READ", b"\x09SUBSCRIB"])
def test_a_malformed_command_is_refused(body):
    """23/37: command-name = OCTET 1*255command-name-char: a name of 0 octets, or longer
    than the command, is no command."""
    assert "malformed command" in refused(talk(OPEN + frame(body, 4))[0]).reason


# -- 23 "Backwards Interoperability": ZMTP 2.0 ---------------------------------------------


def v2_greeting(kind: int = 2, identity: bytes = b"") -> bytes:
    return SIG + b"\x01" + bytes([kind]) + bytes([0, len(identity)]) + identity


@pytest.mark.parametrize("revision", [1, 2])
def test_a_zmtp_2_peer_is_spoken_to_in_zmtp_2(revision):
    """23: "If the peer version number is 1 or 2, the peer is using ZMTP 2.0, so send the ZMTP
    2.0 socket type and identity and continue with ZMTP 2.0" (15: PUB is %x01, an empty
    identity a final-short frame)."""
    events, out = talk(SIG + bytes([revision]) + b"\x02" + b"\x00\x00")
    assert out == PARTIAL_GREETING + b"\x01\x00\x00"
    assert events == [Handshake((2, 0), b"SUB", {})]


def test_zmtp_2_subscriptions_and_frames():
    """15: subscriptions are messages of 1 (or 0) and the topic, frames flags 0-3 only: a
    command bit is a breach there."""
    events, _ = talk(v2_greeting(10, b"me") + frame(b"\x01\x00\x09") + frame(b"\x00\x00\x09"))
    assert events == [Handshake((2, 0), b"XSUB", {}), Subscribe(b"\x00\x09"), Cancel(b"\x00\x09")]
    assert "flags" in refused(talk(v2_greeting() + frame(b"\x04PING\x00\x00", 4))[0]).reason


@pytest.mark.parametrize("kind", [0, 1, 3, 4, 5, 6, 7, 8, 9, 11, 255])
def test_a_zmtp_2_peer_that_cannot_subscribe_is_closed(kind):
    assert "socket type" in refused(talk(v2_greeting(kind))[0]).reason


def test_every_greeting_rest_field_sits_where_the_spec_puts_it():
    assert GREETING_REST == b"\x01" + b"NULL" + bytes(16) + b"\x00" + bytes(31)


# -- any bytes, in any pieces: the fuzzer's property ---------------------------------------


FUZZ = fuzzer("zmtp")
FRAMES = st.one_of(
    st.binary(max_size=40).map(frame),
    st.binary(min_size=1, max_size=40).map(lambda b: frame(b, 4)),
    st.sampled_from([command(b"PING", b"\x00\x01ab"), command(b"SUBSCRIBE", b"\x00"), frame(b"\x01")]),
    st.binary(max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([b"", SIG, SIG + b"\x01\x02\x00\x00", greeting(), greeting(3, 0), OPEN]),
    st.lists(FRAMES, max_size=8),
    st.integers(0, 20),
)
def test_any_frames_in_any_pieces_hold_the_codecs_property(start, frames, step):
    """fuzz/fuzz_zmtp.py's property (the same events and bytes whole, a byte at a time and in
    pieces; bounded; well-formed), on streams that reach every state."""
    FUZZ.check(bytes([step]) + start + b"".join(frames))


# -- a few over a real socket, one byte per send ------------------------------------------


@pytest.fixture
def dribbler(pub, tmp_path):
    made: list[Dribbler] = []

    def make() -> Dribbler:
        made.append(Dribbler(pub, f"{tmp_path}/f.sock"))
        return made[-1]

    yield make
    for d in made:
        d.close()


@pytest.fixture
def pub(ctx, tmp_path):
    p = Publisher(PublishConfig(bind=(f"ipc://{tmp_path}/f.sock",)), node="n1", epoch=7)
    yield p
    p.close(linger=0)


class Dribbler:
    """A hand-made peer that writes one byte per send, the server served between bytes."""

    def __init__(self, pub: Publisher, path: str):
        self.pub = pub
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.got = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        for i in range(len(data)):
            self.sock.send(data[i : i + 1])
            self.pub.handle_incoming()
            self._take()

    def _take(self) -> None:
        try:
            while chunk := self.sock.recv(65536):
                self.got += chunk
        except BlockingIOError:
            pass

    def message(self) -> list[bytes]:
        """One message from the server, its frames' bodies."""
        frames = []
        while True:
            flags, size = self.wait_for(2)
            if flags & 2:
                (size,) = struct.unpack(">Q", bytes([size]) + self.wait_for(7))
            frames.append(self.wait_for(size))
            if not flags & 1:
                return frames

    def wait_for(self, n: int) -> bytes:
        def enough() -> bool:
            self._take()
            return len(self.got) >= n

        serve(self.pub, enough, f"{n} bytes")
        out, self.got = self.got[:n], self.got[n:]
        return out


def batch(group: int, data: bytes):
    from types import SimpleNamespace

    count, table, payload = wire.pack_records([wire.Packet.build(group, data, ts_ns=10**18)])
    return SimpleNamespace(group=group, count=count, table=table, data=payload)


@pytest.mark.parametrize("minor", [0, 1])
def test_byte_by_byte_over_ipc_a_subscriber_gets_its_group(pub, dribbler, minor):
    peer = dribbler()
    peer.send(greeting(3, minor) + peer_ready(b"SUB", prop(b"X-Big", b"m" * 300)))
    assert peer.wait_for(64 + len(ready())) == GREETING + ready()
    peer.send(command(b"SUBSCRIBE", wire.topic(4)) + frame(b"\x01" + wire.topic(5)))
    serve(pub, lambda: pub.subscription_messages == 2, "two subscriptions")
    peer.send(command(b"PING", b"\x00\x01ab"))
    assert peer.wait_for(len(pong(b"ab"))) == pong(b"ab")
    for g in (3, 4, 5):
        pub.publish(batch(g, b"g%d" % g))
    seen = [wire.decode(peer.message()).group for _ in range(2)]
    assert seen == [4, 5]


def test_byte_by_byte_a_zmtp_2_peer_over_ipc(pub, dribbler):
    peer = dribbler()
    peer.send(SIG + b"\x01")
    assert peer.wait_for(14) == PARTIAL_GREETING + b"\x01\x00\x00"
    peer.send(b"\x02\x00\x00" + frame(b"\x01"))
    serve(pub, lambda: pub.subscription_messages == 1, "the subscription")
    pub.publish(batch(9, b"v2"))
    flags, size = peer.wait_for(2)
    assert flags == 1 and peer.wait_for(size) == wire.topic(9)


def test_byte_by_byte_a_wrong_socket_type_gets_its_error_and_the_close(pub, dribbler):
    peer = dribbler()
    peer.send(greeting() + peer_ready(b"PUB"))

    def closed() -> bool:
        try:
            chunk = peer.sock.recv(65536)
        except BlockingIOError:
            return False
        peer.got += chunk
        return not chunk

    serve(pub, closed, "the close")
    assert peer.got.startswith(GREETING + b"\x04") and b"\x05ERROR" in peer.got and b"PUB" in peer.got
    assert pub.subscribers == 0


def test_libzmq_sub_with_metadata_is_served(ctx, pub, tmp_path):
    """A libzmq SUB whose READY carries ZMQ_METADATA gets the feed (XPUB served it)."""
    if not hasattr(zmq, "METADATA"):
        pytest.skip("pyzmq without ZMQ_METADATA")
    sub = ctx.socket(zmq.SUB)
    try:
        sub.setsockopt(zmq.METADATA, b"X-Host:" + b"h" * 60)
        sub.setsockopt(zmq.METADATA, b"X-Other:" + b"o" * 1000)
        sub.connect(f"ipc://{tmp_path}/f.sock")
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        serve(pub, lambda: pub.subscription_messages == 1, "the subscription")
        pub.publish(batch(2, b"meta"))
        assert sub.poll(2000) and wire.decode(sub.recv_multipart()).packets[0].data == b"meta"
    finally:
        sub.close(linger=0)
