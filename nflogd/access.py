"""Who may read the CURVE feed: ``zmq.auth.ThreadAuthenticator`` over ``publish.curve``.

Use (after the privilege drop: the authenticator is a thread, and must not run as root)::

    ctx = zmq.Context()
    access = CurveAccess(ctx, cfg.publish.curve)   # ZAP handler running, keys loaded
    pub = Publisher(ctx, cfg.publish)              # only now the CURVE socket binds
    ...
    access.configure(new_cfg.publish.curve)        # SIGHUP: the authorized keys again
    pub.close(); access.close()

The policy is pyzmq's (``configure_curve``: a client is admitted if its public key is one of
the ``*.key`` files of ``authorized_keys_dir``); this module only refuses to run it on keys it
cannot read. ``zmq.auth`` logs a directory it fails to load and then rejects every client;
here that is a ``ConfigError`` naming the key (``publish.curve.authorized_keys_dir: cannot read
/etc/nflogd/curve/clients: [Errno 13] Permission denied``), before anything is applied. The
files are read as the user the daemon runs as, so a key root could read at ``--check`` but the
service user cannot is found at start, not at the first SIGHUP.

Order matters: libzmq admits every CURVE client when no ZAP handler is bound in the context,
so the handler starts before the CURVE socket binds and stops after it closes.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
from nflogd_client import curve
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .config import CurveConfig
from .errors import ConfigError
from .feed.curve import CurveKeys
from .publish import ZAP_DOMAIN

__all__ = ["CurveAccess", "check_keys"]

log = logging.getLogger(__name__)


def check_keys(settings: CurveConfig) -> dict[bytes, str]:
    """Read ``settings`` (a CurveConfig) now: its secret key file must still hold the same key,
    and the authorized keys are returned as ``{Z85 key: file}``; ConfigError naming the key."""
    try:
        pair = curve.keypair(settings.secret_key_file)
    except curve.KeyFileError as e:
        raise ConfigError(f"publish.curve.secret_key_file: {e}") from None
    if pair != (settings.public_key, settings.secret_key):
        raise ConfigError(
            f"publish.curve.secret_key_file: {settings.secret_key_file} changed since the config was read"
        )
    try:
        return curve.authorized_keys(settings.authorized_keys_dir)
    except curve.KeyFileError as e:
        raise ConfigError(f"publish.curve.authorized_keys_dir: {e}") from None


class CurveAccess:
    """The CURVE clients admitted, those of ``settings.authorized_keys_dir``: in ``keys`` (the
    feed's own server reads them at each handshake) and, with ``zap``, for the context's ZAP
    handler (the relay's XPUB)."""

    def __init__(self, ctx: zmq.Context[Any], settings: CurveConfig, zap: bool = True) -> None:
        self.settings = settings
        self.authorized: dict[bytes, str] = {}
        #: The server's key pair and the admitted keys, raw, as ``feed.curve`` takes them.
        self.keys = CurveKeys(z85.decode(settings.public_key), z85.decode(settings.secret_key), frozenset())
        self.auth: ThreadAuthenticator | None = None
        if not zap:
            self.configure(settings)
            return
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("nflogd.auth"))
        self.auth = auth
        auth.start()
        try:
            self.configure(settings)
        except BaseException:
            self.close()
            raise

    def configure(self, settings: CurveConfig) -> int:
        """Load the authorized keys of ``settings`` (start, SIGHUP); the number of keys.

        On a ConfigError nothing changes: the keys loaded before stay in force.
        """
        keys = check_keys(settings)
        # The keys check_keys read (each file refused unless regular, opened without blocking),
        # in the form configure_curve would store; not configure_curve itself, whose
        # load_certificates opens every *.key file blocking (a FIFO there would hang us).
        auth = self.auth
        if auth is not None:
            auth.allow_any = False
            auth.certs[ZAP_DOMAIN] = dict.fromkeys(keys, True)
        self.keys.authorized = frozenset(z85.decode(k) for k in keys)
        self.settings = settings
        self.authorized = keys
        if keys:
            log.info(
                "CURVE: %d authorized client key%s in %s",
                len(keys), "" if len(keys) == 1 else "s", settings.authorized_keys_dir,
            )  # fmt: skip
        else:
            log.warning("CURVE: no *.key file in %s: no client is admitted", settings.authorized_keys_dir)
        return len(keys)

    def close(self) -> None:
        """Stop the ZAP handler (after the CURVE socket is closed)."""
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
