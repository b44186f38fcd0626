"""CurveZMQ for the feed's side (the server): the handshake and the client's MESSAGEs, no sockets.

rfc.zeromq.org/spec/26 (CurveZMQ) as ZMTP 3.0's CURVE mechanism carries it (/spec/25): the
client's HELLO is answered with a WELCOME holding a cookie, its INITIATE (the cookie back, the
client's long-term key, a vouch for its short-term one, its metadata) with a READY, or an ERROR
when its key is not one of ``authorized_keys_dir``. After that every frame either way is a
MESSAGE: a box of the frame's flags and body under the session's key, with a nonce that only
grows. ``codec.Codec(curve=...)`` drives this per peer; what the feed sends after READY is
boxed by the C sender (``_peers.c``) with the session key precomputed here (``session_key``)
and the next nonce (``next_nonce``)::

    keys = CurveKeys(public, secret, authorized)       # raw 32-byte keys
    hs = CurveHandshake(keys)
    welcome = hs.hello(hello_body)                     # or CurveRefused
    client_key, metadata, ready = hs.initiate(initiate_body)
    flags, data = hs.open_message(message_body)        # a client's MESSAGE

Every cryptographic operation is libsodium's (through PyNaCl): crypto_box for HELLO, WELCOME,
INITIATE and the vouch, crypto_box_beforenm and the _afternm boxes for READY and MESSAGEs,
crypto_secretbox for the cookie, randombytes for the server's short-term key pair, the cookie
key and the long nonces. What is written here is framing: the commands' layouts and the
nonces' prefixes as the spec gives them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nacl import bindings as sodium
from nacl.exceptions import CryptoError

__all__ = ["CurveHandshake", "CurveKeys", "CurveRefused", "HELLO_SIZE", "message_nonce"]

#: A HELLO command's body (its name's length byte and name included), as the spec fixes it.
HELLO_SIZE = 200
_BOX_MAC = 16
_NONCE = struct.Struct(">Q")
_VOUCH_BOX = 32 + 32 + _BOX_MAC  # C' and S


class CurveRefused(Exception):
    """The handshake failed: ``reason`` for the log; ``status`` a ZAP status code ("400") when
    the peer is to be told with an ERROR (its key refused), else empty (the peer broke the
    protocol: it is hung up on)."""

    def __init__(self, reason: str, status: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class CurveKeys:
    """The server's long-term key pair and the client keys admitted (raw, 32 bytes each);
    ``authorized`` is replaced at a reload and read at each INITIATE."""

    public: bytes
    secret: bytes
    authorized: frozenset[bytes]


def message_nonce(prefix: bytes, counter: int) -> bytes:
    """A short nonce in full: the 16-byte prefix the spec gives and the counter, big-endian."""
    return prefix + _NONCE.pack(counter)


def _name(body: bytes | bytearray | memoryview, name: bytes) -> bool:
    return len(body) > len(name) and body[0] == len(name) and bytes(body[1 : 1 + len(name)]) == name


def _open_box(ciphertext: bytes, nonce: bytes, pk: bytes, sk: bytes, what: str) -> bytes:
    try:
        return sodium.crypto_box_open(ciphertext, nonce, pk, sk)
    except CryptoError:
        raise CurveRefused(f"{what}: its box does not open") from None


class CurveHandshake:
    """One client's CurveZMQ conversation, the server's side."""

    __slots__ = ("_keys", "_client_t", "_server_t", "_server_t_secret", "_cookie_key", "_peer_nonce",
                 "session_key", "next_nonce", "client_key", "refused_key")  # fmt: skip

    def __init__(self, keys: CurveKeys) -> None:
        self._keys = keys
        self._client_t: bytes | None = None  # C'
        self._server_t = b""  # S', s'
        self._server_t_secret = b""
        self._cookie_key: bytes | None = None  # K: forgotten once the cookie is back
        self._peer_nonce = 0  # the client's last short nonce: each next one must be greater
        #: crypto_box_beforenm(C', s'), once READY is made.
        self.session_key = b""
        #: The server's next short nonce after READY (the C sender's from then on).
        self.next_nonce = 1
        #: The client's long-term key (raw), once admitted; or the one refused.
        self.client_key: bytes | None = None
        self.refused_key: bytes | None = None

    def _take_nonce(self, raw: bytes, what: str) -> int:
        (n,) = _NONCE.unpack(raw)
        if n <= self._peer_nonce:
            raise CurveRefused(f"{what}: a short nonce that did not grow ({n} after {self._peer_nonce})")
        self._peer_nonce = n
        return n

    def hello(self, body: bytes) -> bytes:
        """The client's HELLO (the command's body) -> our WELCOME command's body."""
        if self._client_t is not None:
            raise CurveRefused("a second HELLO")
        if len(body) != HELLO_SIZE or not _name(body, b"HELLO"):
            raise CurveRefused(f"a malformed HELLO ({len(body)} bytes, not {HELLO_SIZE})")
        if body[6:8] != b"\x01\x00":
            raise CurveRefused(f"CurveZMQ version {body[6]}.{body[7]}, not 1.0")
        if any(body[8:80]):
            raise CurveRefused("a HELLO whose padding is not zero")
        client_t = bytes(body[80:112])
        self._take_nonce(bytes(body[112:120]), "HELLO")
        zeros = _open_box(bytes(body[120:200]), b"CurveZMQHELLO---" + bytes(body[112:120]), client_t,
                          self._keys.secret, "HELLO")  # fmt: skip
        if zeros != bytes(64):
            raise CurveRefused("a HELLO whose signature box is not 64 zero bytes")
        self._client_t = client_t
        self._server_t, self._server_t_secret = sodium.crypto_box_keypair()
        self._cookie_key = sodium.randombytes(32)
        cookie_nonce = sodium.randombytes(16)
        cookie = cookie_nonce + sodium.crypto_secretbox(
            client_t + self._server_t_secret, b"COOKIE--" + cookie_nonce, self._cookie_key
        )
        welcome_nonce = sodium.randombytes(16)
        box = sodium.crypto_box(self._server_t + cookie, b"WELCOME-" + welcome_nonce, client_t,
                                self._keys.secret)  # fmt: skip
        return b"\x07WELCOME" + welcome_nonce + box

    def initiate(self, body: bytes, metadata: bytes) -> tuple[bytes, bytes, bytes]:
        """The client's INITIATE -> (its long-term key, its metadata, our READY command's
        body, which boxes ``metadata``). CurveRefused with a status when its key is not
        authorized."""
        if self._client_t is None or self._cookie_key is None:
            raise CurveRefused("an INITIATE before HELLO" if self._client_t is None else "a second INITIATE")
        if len(body) < 9 + 96 + 8 + 32 + 96 + _BOX_MAC or not _name(body, b"INITIATE"):
            raise CurveRefused(f"a malformed INITIATE ({len(body)} bytes)")
        key, self._cookie_key = self._cookie_key, None  # one INITIATE per cookie
        try:
            cookie = sodium.crypto_secretbox_open(bytes(body[25:105]), b"COOKIE--" + bytes(body[9:25]), key)
        except CryptoError:
            raise CurveRefused("INITIATE: not our cookie") from None
        if cookie != self._client_t + self._server_t_secret:
            raise CurveRefused("INITIATE: a cookie for another HELLO")
        short = bytes(body[105:113])
        self._take_nonce(short, "INITIATE")
        plain = _open_box(bytes(body[113:]), b"CurveZMQINITIATE" + short, self._client_t,
                          self._server_t_secret, "INITIATE")  # fmt: skip
        if len(plain) < 128:
            raise CurveRefused("INITIATE: a box too short for a vouch")
        client_key, vouch_nonce, vouch = plain[:32], plain[32:48], plain[48:128]
        vouched = _open_box(vouch, b"VOUCH---" + vouch_nonce, client_key, self._server_t_secret, "the vouch")
        if vouched != self._client_t + self._keys.public:
            raise CurveRefused("INITIATE: the vouch is for another key or another server")
        if client_key not in self._keys.authorized:
            self.refused_key = client_key
            raise CurveRefused("its key is not in authorized_keys_dir", status="400")
        self.client_key = client_key
        self.session_key = sodium.crypto_box_beforenm(self._client_t, self._server_t_secret)
        self._server_t_secret = b""
        ready = self.box_command(b"\x05READY", b"CurveZMQREADY---", metadata)
        return client_key, plain[128:], ready

    def box_command(self, name: bytes, prefix: bytes, data: bytes) -> bytes:
        """A command whose body is our next short nonce and a box of ``data`` (READY; a MESSAGE
        in tests: the C sender boxes the feed's)."""
        nonce = _NONCE.pack(self.next_nonce)
        self.next_nonce += 1
        return name + nonce + sodium.crypto_box_afternm(data, prefix + nonce, self.session_key)

    def open_message(self, body: bytes) -> tuple[int, bytes]:
        """A client's MESSAGE (the command's body) -> (flags, frame body): flags bit 0 MORE,
        bit 1 COMMAND."""
        if len(body) < 8 + 8 + _BOX_MAC + 1 or not _name(body, b"MESSAGE"):
            raise CurveRefused("a frame that is no MESSAGE after the handshake")
        short = bytes(body[8:16])
        self._take_nonce(short, "MESSAGE")
        try:
            plain = sodium.crypto_box_open_afternm(bytes(body[16:]), b"CurveZMQMESSAGEC" + short,
                                                   self.session_key)  # fmt: skip
        except CryptoError:
            raise CurveRefused("MESSAGE: its box does not open") from None
        if plain[0] & ~3:
            raise CurveRefused(f"MESSAGE: flags {plain[0]:#04x}")
        return plain[0], plain[1:]
