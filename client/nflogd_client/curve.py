"""CURVE keys in ZeroMQ's certificate files, read strictly; shared by the daemon and its clients.

::

    from nflogd_client import curve

    public = curve.public_key("/etc/nflogd/curve/server.key")   # or the 40-character Z85 text
    public, secret = curve.keypair("/home/alice/.curve/alice.key_secret")
    allowed = curve.authorized_keys("/etc/nflogd/curve/clients")  # {Z85 key: its file}

The files are the ones ``zmq.auth.create_certificates`` writes and ``nflogd-keygen DIR NAME``
makes: ``NAME.key`` holds the public key, ``NAME.key_secret`` the public and the secret key.
Keys are returned as Z85 text in ``bytes`` (40 bytes for 32 key bytes), the form ZeroMQ's
``CURVE_*KEY`` socket options and ``zmq.auth`` take.

``zmq.auth.load_certificates`` (what ``ThreadAuthenticator.configure_curve`` calls) reads every
``*.key`` file of a directory but only logs a failure and then rejects everyone; here a missing
directory, an unreadable file or a malformed key raises ``KeyFileError`` naming the file, so that
the daemon refuses a bad key set before it starts instead of serving nobody. A file that is not
a regular file (a FIFO would block the reader for good) or larger than ``KEY_FILE_MAX_BYTES`` is
refused before a byte is read. The certificate is parsed as ``zmq.auth.load_certificate`` does.
"""

from __future__ import annotations

import os
import stat
from typing import Union

from zmq.utils import z85

__all__ = ["KEY_Z85_LEN", "KeyFileError", "authorized_keys", "check_z85", "keypair", "public_key"]

#: Length of a Z85-encoded CURVE key: 32 bytes -> 40 characters.
KEY_Z85_LEN = 40
#: The largest key file read, bytes (nflogd-keygen's are about 300).
KEY_FILE_MAX_BYTES = 64 * 1024

PathLike = Union[str, "os.PathLike[str]"]


class KeyFileError(ValueError):
    """A key file or directory cannot be read or holds no valid key; the message names it."""


def _why(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)


def check_z85(key: bytes | str, what: str) -> bytes:
    """``key`` as 40 Z85 bytes if it decodes to a 32-byte CURVE key; else KeyFileError naming ``what``."""
    raw = key.encode("ascii", "replace") if isinstance(key, str) else bytes(key)
    if len(raw) != KEY_Z85_LEN:
        raise KeyFileError(f"{what}: a CURVE key is {KEY_Z85_LEN} Z85 characters, got {len(raw)}")
    try:
        z85.decode(raw)
    except (ValueError, KeyError, IndexError, TypeError):
        raise KeyFileError(f"{what}: not a Z85-encoded CURVE key") from None
    return raw


def _read_file(name: str) -> bytes:
    """A key file's bytes: opened without blocking, refused unless a regular file of at most
    KEY_FILE_MAX_BYTES (a FIFO in a key directory would block the reader for good)."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise KeyFileError(f"{name}: not a regular file")
        if st.st_size > KEY_FILE_MAX_BYTES:
            raise KeyFileError(f"{name}: {st.st_size} bytes, not a key file (at most {KEY_FILE_MAX_BYTES})")
        data = os.read(fd, KEY_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > KEY_FILE_MAX_BYTES:
        raise KeyFileError(f"{name}: larger than {KEY_FILE_MAX_BYTES} bytes, not a key file")
    return data


def _field(data: bytes, name: bytes) -> bytes | None:
    """A ``name = "value"`` line of a certificate, parsed as ``zmq.auth.load_certificate`` does."""
    for line in data.splitlines():
        line = line.strip()
        if not line.startswith(b"#") and line.startswith(name):
            return line.split(b"=", 1)[1].strip(b" \t'\"") if b"=" in line else b""
    return None


def _read(path: PathLike) -> tuple[bytes, bytes | None]:
    """(public, secret or None) from one certificate file, every failure a KeyFileError."""
    name = os.fspath(path)
    try:
        data = _read_file(name)
    except OSError as e:
        raise KeyFileError(f"cannot read {name}: {_why(e)}") from None
    public, secret = _field(data, b"public-key"), _field(data, b"secret-key")
    if not public:  # no "public-key = ..." line
        raise KeyFileError(f"{name}: no public key in it (not a ZeroMQ certificate file)") from None
    public = check_z85(public, f"{name}: public-key")
    if secret is not None:
        secret = check_z85(secret, f"{name}: secret-key")
    return public, secret


def public_key(value: PathLike | bytes) -> bytes:
    """A public key from a ``.key`` (or ``.key_secret``) file, or given as 40 Z85 characters.

    A value that is 40 characters long and decodes as Z85 is the key itself, unless a file of
    that name exists.
    """
    if isinstance(value, (bytes, bytearray)):
        return check_z85(bytes(value), "public key")
    text = os.fspath(value)
    if len(text) == KEY_Z85_LEN and not os.path.exists(text):
        try:
            return check_z85(text, "public key")
        except KeyFileError:
            pass  # then it is a file name that does not exist: say so below
    return _read(text)[0]


def keypair(path: PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a ``NAME.key_secret`` file."""
    public, secret = _read(path)
    if secret is None:
        name = os.fspath(path)
        raise KeyFileError(
            f"{name}: no secret key in it; give the NAME.key_secret file that nflogd-keygen writes, "
            "not NAME.key"
        )
    return public, secret


def authorized_keys(directory: PathLike) -> dict[bytes, str]:
    """Every public key in the ``*.key`` files of ``directory``, as ``{Z85 key: file path}``.

    The same files ``zmq.auth.load_certificates`` reads (names ending in ``.key``, not starting
    with a dot, sub-directories not searched). An empty directory gives ``{}``: nobody is allowed.
    """
    name = os.fspath(directory)
    try:
        entries = sorted(os.listdir(name))
    except OSError as e:
        raise KeyFileError(f"cannot read {name}: {_why(e)}") from None
    keys: dict[bytes, str] = {}
    for entry in entries:
        if entry.startswith(".") or not entry.endswith(".key"):
            continue
        path = os.path.join(name, entry)
        public, _ = _read(path)
        keys.setdefault(public, path)
    return keys
