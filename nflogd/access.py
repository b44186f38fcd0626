"""Who may read the CURVE feed: the keys of ``publish.curve.authorized_keys_dir``.

Use::

    access = CurveAccess(cfg.publish.curve)                  # the keys read now
    pub = Publisher(cfg.publish, curve_keys=access.keys)
    ...
    access.configure(new_cfg.publish.curve)                  # SIGHUP: the authorized keys again

A client is admitted if its public key is one of the ``*.key`` files of
``authorized_keys_dir`` (the policy pyzmq's ``configure_curve`` had for a ZAP handler); the
feed's own server (``nflogd.feed.curve``) reads ``keys`` at each handshake, so a reload applies
to the next one. Keys that cannot be read are a ``ConfigError`` naming the key
(``publish.curve.authorized_keys_dir: cannot read /etc/nflogd/curve/clients: [Errno 13]
Permission denied``), before anything is applied. The files are read as the user the daemon
runs as, so a key root could read at ``--check`` but the service user cannot is found at
start, not at the first SIGHUP.
"""

from __future__ import annotations

import logging

from nflogd_client import curve
from zmq.utils import z85

from .config_publish import CurveConfig
from .errors import ConfigError
from .feed.curve import CurveKeys

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
    """The CURVE clients admitted, those of ``settings.authorized_keys_dir``, in ``keys`` (the
    feed's own server reads them at each handshake)."""

    def __init__(self, settings: CurveConfig) -> None:
        self.settings = settings
        self.authorized: dict[bytes, str] = {}
        #: The server's key pair and the admitted keys, raw, as ``feed.curve`` takes them.
        self.keys = CurveKeys(z85.decode(settings.public_key), z85.decode(settings.secret_key), frozenset())
        self.configure(settings)

    def configure(self, settings: CurveConfig) -> int:
        """Load the authorized keys of ``settings`` (start, SIGHUP); the number of keys.

        On a ConfigError nothing changes: the keys loaded before stay in force.
        """
        keys = check_keys(settings)
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
