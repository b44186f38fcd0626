"""The relay's settings (``nflogd-relay``), and the mapping from its YAML file to them: its
upstreams and the ``jetstream`` section, with ``publish`` and ``metrics`` as the daemon's
(``nflogd.config_publish``); the same rules, the same one-line errors as ``nflogd.config``.

::

    from nflogd import config_relay

    relay = config_relay.load_relay("/etc/nflogd-relay.yaml")
    relay.upstreams                           # (UpstreamConfig(endpoint="tcp://router1:5555"), ...)
    relay.publish, relay.metrics              # as the daemon's; metrics default 127.0.0.1:9478
    relay.jetstream                           # JetStreamConfig(servers=(...), ...), or None

``etc/nflogd-relay.yaml`` documents every key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Any

from nflogd_client import curve as _curve

from .addresses import check_endpoint, check_listed_once, check_nats_url
from .checks import FieldError, check_int, show
from .config_file import (
    at,
    check_absolute,
    check_keys,
    check_z85,
    document,
    parse_section,
    read_text,
    require_curve,
)
from .config_publish import (
    METRICS_KEYS,
    PUBLISH_KEYS,
    MetricsConfig,
    PublishConfig,
    parse_metrics,
    parse_publish,
)
from .errors import ConfigError

__all__ = ["JetStreamConfig", "RelayConfig", "UpstreamConfig", "load_relay", "parse_relay"]

_RELAY_TOP_KEYS = ("jetstream", "metrics", "publish", "upstreams")
_UPSTREAM_KEYS = ("client_secret_key_file", "endpoint", "server_public_key")
_RELAY_DEFAULT_BIND = ("ipc:///run/nflogd-relay/feed.sock",)
_RELAY_DEFAULT_LISTEN = "127.0.0.1:9478"
# The relay's jetstream section: inclusive ranges of its integer settings; docs/jetstream.md.
_JETSTREAM_RANGES: dict[str, tuple[int, int]] = {
    "partitions": (1, 1024),  # subjects <prefix>.0.> .. <prefix>.N-1.>: consumer groups split by these
    "replicas": (1, 5),  # 3 on a three-node cluster
    "max_age_s": (0, 10 * 365 * 86400),  # retention by age; 0: no limit
    "max_bytes": (0, 1 << 50),  # retention by size; 0: no limit
    "duplicate_window_s": (1, 86400),  # Nats-Msg-Id dedup window
    "max_in_flight": (1, 100_000),  # publishes awaiting their ack
    "buffer_bytes": (1 << 16, 1 << 34),  # messages held (queued + in flight), bytes
    "ack_timeout_ms": (10, 600_000),  # a publish retried after this long without an ack
    "connect_timeout_ms": (10, 600_000),  # start: reach the cluster and check the stream
}
_JETSTREAM_KEYS = ("servers", "stream", "subject_prefix", "storage", *_JETSTREAM_RANGES)
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


# --- the dataclasses -----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamConfig:
    """A feed the relay subscribes to: an nflogd daemon's endpoint, or another relay's.

    With CURVE, ``server_key`` is the daemon's public key and ``client_public_key`` and
    ``client_secret_key`` the relay's pair, Z85 text read by ``parse_relay`` (the secret key
    is left out of ``repr()``); all three are None without CURVE.
    """

    endpoint: str
    server_key: bytes | None = None
    client_public_key: bytes | None = None
    client_secret_key: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_endpoint("endpoint", self.endpoint)
        keys = {"server_key": self.server_key, "client_public_key": self.client_public_key,
                "client_secret_key": self.client_secret_key}  # fmt: skip
        given = [name for name, key in keys.items() if key is not None]
        if given and len(given) != len(keys):
            raise FieldError(", ".join(keys), f"give all three for CURVE or none, got {', '.join(given)}")
        for name in given:
            check_z85(name, keys[name])

    @property
    def curve(self) -> bool:
        """True when the connection to this upstream uses CURVE."""
        return self.server_key is not None


@dataclass(frozen=True)
class JetStreamConfig:
    """The relay's feed into a NATS JetStream stream (``docs/jetstream.md``): where, which stream,
    its settings (created or checked at start), and the publisher's bounds.

    ``servers`` are ``nats://HOST:PORT`` (or ``tls://``) URLs; ``etc/nflogd-relay.yaml``
    documents every setting. The checks are the YAML's: ``replicas: 7`` raises
    ``ConfigError("replicas: must be an integer 1..5, got 7")``."""

    servers: tuple[str, ...]
    stream: str = "NFLOG"
    subject_prefix: str = "nflog"
    storage: str = "file"
    partitions: int = 8
    replicas: int = 1
    max_age_s: int = 7 * 86400
    max_bytes: int = 0
    duplicate_window_s: int = 120
    max_in_flight: int = 256
    buffer_bytes: int = 64 << 20
    ack_timeout_ms: int = 5000
    connect_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        if not isinstance(self.servers, tuple):
            raise FieldError("servers", f"must be a tuple of nats://HOST:PORT URLs, got {show(self.servers)}")
        for i, url in enumerate(self.servers):
            check_nats_url(f"servers[{i}]", url)
        if len(set(self.servers)) != len(self.servers):
            raise FieldError("servers", "each server at most once")
        if not isinstance(self.stream, str) or not _STREAM_NAME.fullmatch(self.stream):
            raise FieldError("stream", f"must be 1..255 of A-Z a-z 0-9 _ -, got {show(self.stream)}")
        prefix = self.subject_prefix
        if not isinstance(prefix, str) or not _SUBJECT_PREFIX.fullmatch(prefix) or len(prefix) > 200:
            raise FieldError(
                "subject_prefix", f"must be dot-separated tokens of A-Z a-z 0-9 _ -, got {show(prefix)}"
            )
        if self.storage not in ("file", "memory"):
            raise FieldError("storage", f"must be file or memory, got {show(self.storage)}")
        for name, (lo, hi) in _JETSTREAM_RANGES.items():
            check_int(name, getattr(self, name), lo, hi)
        if self.max_age_s and self.duplicate_window_s > self.max_age_s:
            raise FieldError(
                "duplicate_window_s",
                f"must not exceed max_age_s ({self.max_age_s}), got {self.duplicate_window_s}",
            )


@dataclass(frozen=True)
class RelayConfig:
    """The relay's whole configuration; ``metrics`` is None when turned off, ``jetstream``
    None without a jetstream section."""

    upstreams: tuple[UpstreamConfig, ...]
    publish: PublishConfig
    metrics: MetricsConfig | None
    jetstream: JetStreamConfig | None = None


# --- entry points --------------------------------------------------------------------------------


def load_relay(path: str | os.PathLike[str]) -> RelayConfig:
    """Read and parse the relay's YAML file at ``path``; errors name the file or the key path."""
    source = os.fspath(path)
    return parse_relay(read_text(source), source)


def parse_relay(text: str, source: str = "<config>") -> RelayConfig:
    """Parse the relay's YAML (``etc/nflogd-relay.yaml`` documents it), as ``parse`` does the daemon's."""
    data = document(text, source, _RELAY_TOP_KEYS)
    if "upstreams" not in data:
        raise ConfigError("upstreams: is required, a non-empty list of nflogd endpoints to subscribe to")
    upstreams = _parse_upstreams("upstreams", data["upstreams"])

    def publish(section: dict[Any, Any]) -> PublishConfig:
        return parse_publish({"bind": list(_RELAY_DEFAULT_BIND), **section})

    def metrics(section: dict[Any, Any]) -> MetricsConfig | None:
        return parse_metrics({"listen": _RELAY_DEFAULT_LISTEN, **section})

    return RelayConfig(
        upstreams=upstreams,
        publish=parse_section("publish", data, PUBLISH_KEYS, publish),
        metrics=parse_section("metrics", data, METRICS_KEYS, metrics),
        jetstream=_parse_jetstream("jetstream", data["jetstream"]) if "jetstream" in data else None,
    )


# --- sections ------------------------------------------------------------------------------------


def _parse_jetstream(path: str, section: Any) -> JetStreamConfig:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: must be a mapping with at least servers, got {show(section)}")
    check_keys(path, section, _JETSTREAM_KEYS)
    servers = section.get("servers")
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not servers:
        raise ConfigError(f"{path}.servers: is required, a nats://HOST:PORT URL or a non-empty list of them")
    fields = {key: value for key, value in section.items() if key != "servers"}
    with at(path):
        return JetStreamConfig(servers=tuple(servers), **fields)


def _parse_upstreams(path: str, value: Any) -> tuple[UpstreamConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list of endpoints or mappings, got {show(value)}")
    if not value:
        raise ConfigError(f"{path}: must not be empty; list at least one nflogd endpoint")
    upstreams = tuple(_parse_upstream(f"{path}[{i}]", item) for i, item in enumerate(value))
    check_listed_once(path, [upstream.endpoint for upstream in upstreams])
    return upstreams


def _parse_upstream(path: str, item: Any) -> UpstreamConfig:
    """A bare endpoint, or a mapping with ``endpoint`` and, for CURVE, the two key settings."""
    if isinstance(item, str):
        with at(path, shorthand="endpoint"):
            return UpstreamConfig(item)
    if not isinstance(item, dict):
        raise ConfigError(
            f"{path}: must be an endpoint string or a mapping with 'endpoint', got {show(item)}"
        )
    check_keys(path, item, _UPSTREAM_KEYS)
    if "endpoint" not in item:
        raise ConfigError(f"{path}: missing key 'endpoint', like tcp://router1:5555")
    with at(path):
        upstream = UpstreamConfig(item["endpoint"])  # its errors before those of the key files
    server, secret_file = item.get("server_public_key"), item.get("client_secret_key_file")
    if server is None and secret_file is None:
        return upstream
    if server is None:
        raise ConfigError(f"{path}: client_secret_key_file needs server_public_key, the daemon's public key")
    if secret_file is None:
        raise ConfigError(
            f"{path}: server_public_key needs client_secret_key_file, the relay's NAME.key_secret "
            "(the daemon admits only the clients whose public key it holds)"
        )
    if not isinstance(server, str):
        raise ConfigError(
            f"{path}.server_public_key: must be a key file or 40 Z85 characters, got {show(server)}"
        )
    check_absolute(f"{path}.client_secret_key_file", secret_file)
    require_curve(path)
    try:
        server_key = _curve.public_key(server)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.server_public_key: {e}") from None
    try:
        public, secret = _curve.keypair(secret_file)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.client_secret_key_file: {e}") from None
    return replace(upstream, server_key=server_key, client_public_key=public, client_secret_key=secret)
