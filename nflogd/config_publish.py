"""The sections both programs' files have, and what they configure: ``publish`` (the feed's
endpoints, CURVE on them, the limits every peer is held to) and ``metrics`` (the Prometheus
listener). ``nflogd.config`` (the daemon's file) and ``nflogd.config_relay`` (the relay's)
parse them with the same rules and the same errors.

::

    from nflogd.config_publish import PublishConfig

    PublishConfig(bind=("ipc:///run/nflogd/feed.sock",), hwm=100_000)
    PublishConfig(hwm=0)        # ConfigError: hwm: must be an integer 1..10000000, got 0
"""

from __future__ import annotations

import grp
from dataclasses import dataclass, field
from typing import Any

from nflogd_client import curve as _curve

from .addresses import (
    ENDPOINT_FORMS,
    PORT_RANGE,
    check_endpoint,
    check_host,
    check_listed_once,
    is_loopback,
    split_host_port,
)
from .checks import FieldError, check_int, is_int, show
from .config_file import at, check_absolute, check_keys, check_z85
from .errors import ConfigError

__all__ = [
    "CurveConfig",
    "MetricsConfig",
    "PublishConfig",
    "METRICS_KEYS",
    "PUBLISH_KEYS",
    "parse_metrics",
    "parse_publish",
]

DEFAULT_METRICS_LISTEN = "127.0.0.1:9477"
_HWM_RANGE = (1, 10_000_000)
# Per endpoint: peers connected at once; beyond, a new connection is closed at once.
_MAX_CONNECTIONS_RANGE = (1, 100_000)
# Bytes the feed's own peers may have queued together (a slow subscriber's backlog).
_MAX_QUEUED_BYTES_RANGE = (1 << 20, 1 << 40)
# A subscriber that has subscribed to nothing for this long is hung up on; 0: never.
_IDLE_TIMEOUT_RANGE = (0, 86_400_000)
_IDLE_TIMEOUT_MIN = 1000
# A peer that has not completed the ZMTP handshake (CURVE included) by then is dropped.
_HANDSHAKE_TIMEOUT_RANGE = (100, 600_000)
# How long a reader's filter goes on numbering once nobody holds it (docs/filters.md); 0: not at all.
_FILTER_LINGER_RANGE = (0, 3_600_000)
# The publish keys that are PublishConfig's fields as they are; bind, curve, ipc_filter_groups are mapped.
_PUBLISH_FIELDS = (
    "filter_linger_ms", "handshake_timeout_ms", "hwm", "idle_timeout_ms", "insecure", "max_connections",
    "max_connections_per_source", "max_queued_bytes",
)  # fmt: skip
PUBLISH_KEYS = ("bind", "curve", "ipc_filter_groups", *_PUBLISH_FIELDS)
_CURVE_KEYS = ("authorized_keys_dir", "secret_key_file")
_GID_MAX = 2**32 - 2  # (gid_t)-1 means "no group"
METRICS_KEYS = ("listen",)


# --- the dataclasses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CurveConfig:
    """CURVE on the tcp endpoints: the daemon's key pair and the directory of admitted clients.

    ``public_key``/``secret_key`` are Z85 text read from ``secret_key_file`` (``parse`` reads
    it, and checks that ``authorized_keys_dir`` can be read and holds valid ``*.key`` files);
    the secret key is left out of ``repr()``.
    """

    secret_key_file: str
    authorized_keys_dir: str
    public_key: bytes
    secret_key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        check_z85("public_key", self.public_key)
        check_z85("secret_key", self.secret_key)


@dataclass(frozen=True)
class PublishConfig:
    """Where the ZeroMQ PUB socket binds, and how many messages it queues per subscriber.

    ``curve``: CURVE on every tcp endpoint, or None. ``insecure``: allow tcp endpoints other
    hosts can reach without CURVE. ``ipc_filter_gids``: IPC_FILTER_GID for the ipc endpoints.
    ``max_connections``: peers connected at once per endpoint (more are closed at once);
    ``handshake_timeout_ms``: a peer that has not finished the ZMTP handshake by then is
    dropped. On the endpoints nflogd serves itself (ipc, tcp without CURVE):
    ``max_connections_per_source``: peers at once from one uid (ipc) or one address (tcp),
    at most ``max_connections`` in effect; ``idle_timeout_ms``: a subscriber that has
    subscribed to nothing for this long is hung up on (0: never); ``max_queued_bytes``: what
    slow subscribers may have queued together (docs/security.md, "Threat model and limits");
    ``filter_linger_ms``: how long a readers' filter goes on running and numbering what it
    passes once no reader holds it, so that one back within it counts what it missed
    (docs/filters.md, 0: it stops with its last reader).
    """

    bind: tuple[str, ...] = ("ipc:///run/nflogd/feed.sock",)
    hwm: int = 100_000
    curve: CurveConfig | None = None
    insecure: bool = False
    ipc_filter_gids: tuple[int, ...] = ()
    max_connections: int = 256
    handshake_timeout_ms: int = 10_000
    max_connections_per_source: int = 64
    idle_timeout_ms: int = 300_000
    max_queued_bytes: int = 64 << 20
    filter_linger_ms: int = 60_000

    def __post_init__(self) -> None:
        if not isinstance(self.bind, tuple):
            raise FieldError("bind", f"must be a tuple of endpoint strings, got {show(self.bind)}")
        check_listed_once("bind", self.bind, check_endpoint)
        check_int("hwm", self.hwm, *_HWM_RANGE)
        if not isinstance(self.insecure, bool):
            raise FieldError("insecure", f"must be true or false, got {show(self.insecure)}")
        _check_exposure("bind", self.bind, self.curve, self.insecure)
        check_int("max_connections", self.max_connections, *_MAX_CONNECTIONS_RANGE)
        check_int("handshake_timeout_ms", self.handshake_timeout_ms, *_HANDSHAKE_TIMEOUT_RANGE)
        check_int("max_connections_per_source", self.max_connections_per_source, *_MAX_CONNECTIONS_RANGE)
        check_int("idle_timeout_ms", self.idle_timeout_ms, *_IDLE_TIMEOUT_RANGE)
        if 0 < self.idle_timeout_ms < _IDLE_TIMEOUT_MIN:
            raise FieldError(
                "idle_timeout_ms",
                f"must be 0 (never) or at least {_IDLE_TIMEOUT_MIN}, got {self.idle_timeout_ms}",
            )
        check_int("max_queued_bytes", self.max_queued_bytes, *_MAX_QUEUED_BYTES_RANGE)
        check_int("filter_linger_ms", self.filter_linger_ms, *_FILTER_LINGER_RANGE)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus HTTP listener; ``host`` is an address or name, IPv6 without brackets."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str):
            raise FieldError("host", f"must be a string, got {show(self.host)}")
        if self.host.startswith("[") and self.host.endswith("]"):
            raise FieldError("host", f"must be an IPv6 address without brackets, got {show(self.host)}")
        check_host("host", self.host, allow_wildcard=False)
        check_int("port", self.port, *PORT_RANGE)


def _check_exposure(key: str, bind: tuple[str, ...], curve: CurveConfig | None, insecure: bool) -> None:
    """Refuse a tcp endpoint other hosts can reach when nothing protects it."""
    if curve is not None or insecure:
        return
    for i, endpoint in enumerate(bind):
        if not endpoint.startswith("tcp://"):
            continue
        host, _ = split_host_port(f"{key}[{i}]", endpoint[len("tcp://") :], endpoint, allow_wildcard=True)
        if not is_loopback(host):
            raise FieldError(
                f"{key}[{i}]",
                f"{endpoint} is not a loopback address and publish.curve is not set: "
                "every host that reaches it could read the feed; set publish.curve "
                "(docs/security.md) or publish.insecure: true",
            )


# --- the sections --------------------------------------------------------------------------------


def parse_publish(section: dict[Any, Any]) -> PublishConfig:
    fields = {key: section[key] for key in _PUBLISH_FIELDS if key in section}
    if "bind" in section:
        bind = section["bind"]
        if isinstance(bind, str):
            bind = [bind]
        elif not isinstance(bind, list):
            raise ConfigError(f"publish.bind: must be an endpoint string or a list of them, got {show(bind)}")
        if not bind:
            raise ConfigError(f"publish.bind: must not be empty; give at least one of {ENDPOINT_FORMS}")
        fields["bind"] = tuple(bind)
    curve = _parse_curve("publish.curve", section.get("curve"))
    gids = _parse_ipc_groups("publish.ipc_filter_groups", section.get("ipc_filter_groups"))
    with at("publish"):
        return PublishConfig(curve=curve, ipc_filter_gids=gids, **fields)


def _parse_curve(path: str, section: Any) -> CurveConfig | None:
    """``publish.curve``: read the secret key and check the client key directory now."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: must be a mapping with secret_key_file and authorized_keys_dir, got {show(section)}"
        )
    check_keys(path, section, _CURVE_KEYS)
    for key in _CURVE_KEYS:
        if key not in section:
            raise ConfigError(f"{path}: missing key {key!r}")
        check_absolute(f"{path}.{key}", section[key])
    secret_file, clients_dir = section["secret_key_file"], section["authorized_keys_dir"]
    try:
        public, secret = _curve.keypair(secret_file)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.secret_key_file: {e}") from None
    try:
        _curve.authorized_keys(clients_dir)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.authorized_keys_dir: {e}") from None
    return CurveConfig(
        secret_key_file=secret_file, authorized_keys_dir=clients_dir, public_key=public, secret_key=secret
    )


def _parse_ipc_groups(path: str, value: Any) -> tuple[int, ...]:
    """Group names (looked up now) or gids, for IPC_FILTER_GID; absent or empty: no filter."""
    if value is None:
        return ()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a group name or gid, or a list of them, got {show(value)}")
    gids: list[int] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if is_int(item):
            gid = check_int(item_path, item, 0, _GID_MAX)
        elif isinstance(item, str):
            try:
                gid = grp.getgrnam(item).gr_gid
            except (KeyError, ValueError):
                raise ConfigError(f"{item_path}: no such group {show(item)}") from None
        else:
            raise ConfigError(f"{item_path}: must be a group name or a gid, got {show(item)}")
        if gid not in gids:
            gids.append(gid)
    return tuple(gids)


def parse_metrics(section: dict[Any, Any]) -> MetricsConfig | None:
    listen = section.get("listen", DEFAULT_METRICS_LISTEN)
    if listen is None:
        return None
    path = "metrics.listen"
    if not isinstance(listen, str):
        raise ConfigError(f'{path}: must be "host:port" or null to turn metrics off, got {show(listen)}')
    host, port = split_host_port(path, listen, listen, allow_wildcard=False)
    return MetricsConfig(host=host, port=port)
