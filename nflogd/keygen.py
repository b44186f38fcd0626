"""nflogd-keygen: a CURVE key pair in ZeroMQ's certificate files.

::

    nflogd-keygen /etc/nflogd/curve server           # server.key, server.key_secret
    nflogd-keygen ~/.curve alice                      # a client's pair; then, on the router:
    cp alice.key /etc/nflogd/curve/clients/ && systemctl reload nflogd

Writes ``DIR/NAME.key`` (the public key, mode 0644: hand it out) and ``DIR/NAME.key_secret``
(public and secret key, mode 0600: it stays with its owner) with
``zmq.auth.create_certificates``; ``DIR`` is created (mode 0755 less the umask) if missing. Prints the two
paths. Existing files are never overwritten. Errors are one line on stderr: exit status 2
for bad arguments, 1 when the files cannot be written.
"""

from __future__ import annotations

import argparse
import os
import sys

import zmq
import zmq.auth

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(2, f"{self.prog}: {message} (usage: {self.prog} DIR NAME)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="nflogd-keygen",
        description="Write a CURVE key pair for nflogd: DIR/NAME.key (public), DIR/NAME.key_secret.",
    )
    from . import __version__

    p.add_argument("--version", action="version", version=f"nflogd-keygen {__version__}")
    p.add_argument("dir", metavar="DIR", help="directory for the two files (created if missing)")
    p.add_argument("name", metavar="NAME", help="base name: the server's or the client's name")
    return p


def _fail(message: str, status: int) -> int:
    print(f"nflogd-keygen: {message}", file=sys.stderr, flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    name = args.name
    if (
        not name
        or "/" in name
        or "\0" in name
        or name.startswith(".")
        or name.endswith((".key", ".key_secret"))
    ):
        return _fail(
            f"NAME must be a plain file name without '/', a leading '.' or a .key suffix, got {name!r}", 2
        )
    if not zmq.has("curve"):
        return _fail("this libzmq was built without CURVE support", 1)
    directory = args.dir
    public = os.path.join(directory, f"{name}.key")
    secret = os.path.join(directory, f"{name}.key_secret")
    for path in (public, secret):
        if os.path.lexists(path):
            return _fail(f"{path} exists; remove it or choose another NAME", 1)
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        return _fail(f"cannot create {directory}: {e.strerror or e}", 1)
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(directory, name)
        os.chmod(public, 0o644)
        os.chmod(secret, 0o600)
    except OSError as e:
        where = e.filename or directory
        return _fail(f"cannot write in {where}: {e.strerror or e}", 1)
    finally:
        os.umask(old)
    print(public)
    print(secret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
