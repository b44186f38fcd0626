"""The daemon's and the relay's settings, and the mapping from their YAML files to them: frozen
dataclasses out, every mistake a ``ConfigError``.

::

    from nflogd import config
    from nflogd.errors import ConfigError

    cfg = config.load("/etc/nflogd.yaml")     # or config.parse(text, source="<stdin>")
    for g in cfg.groups:                      # GroupConfig(group=0, copy_range=65535, ...)
        print(g.group, g.copy_range, g.flush_ms)
    cfg.publish.bind                          # ("ipc:///run/nflogd/feed.sock",)
    cfg.publish.curve                         # CurveConfig(secret_key_file=..., ...), or None
    cfg.metrics                               # MetricsConfig(host="127.0.0.1", port=9477), or None
    cfg.user                                  # "nflogd", or None: stay as the starting user
    cfg.groups[0].netns                       # "blue" (/run/netns/blue), a path, or None: our own

    relay = config.load_relay("/etc/nflogd-relay.yaml")   # nflogd-relay: same rules, same errors
    relay.upstreams                           # (UpstreamConfig(endpoint="tcp://router1:5555"), ...)
    relay.publish, relay.metrics              # as the daemon's; metrics default 127.0.0.1:9478

    try:
        config.parse("groups: [{group: 2, copy_range: 70000}]")
    except ConfigError as err:
        print(err)    # groups[0].copy_range: must be an integer 0..65535, got 70000

Every error is ``nflogd.errors.ConfigError`` with a one-line message that starts with the key path
(``groups[2].copy_range``, ``publish.bind[1]``, ``metrics.listen``) or, for problems with the file
as a whole, with its name (``/etc/nflogd.yaml: invalid YAML at line 3 column 7: ...``).
The dataclasses check their fields and name the field (``GroupConfig(2, copy_range=70000)``:
``copy_range: must be ...``); the mapping from YAML puts the key path in front and checks what only
the file has: unknown keys, the shorthands (``groups: [5]``, ``bind: tcp://...``), node and user,
the curve key files, group names. The file is read and its YAML parsed by ``nflogd.yamlload``, imported by the
first ``load``/``parse``, so that building the dataclasses (``nflogd.classic``) needs no YAML;
endpoints and ``HOST:PORT`` are ``nflogd.addresses``' grammar.
Units are in the names (``flush_ms``, ``rcvbuf`` in bytes); ``ffi.py`` turns them into kernel units.
``etc/nflogd.yaml`` and ``etc/nflogd-relay.yaml`` document every key.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import zmq
from nflogd_client import curve as _curve

from .addresses import (
    ENDPOINT_FORMS,
    PORT_RANGE,
    check_endpoint,
    check_host,
    check_listed_once,
    check_nats_url,
    is_loopback,
    split_host_port,
)
from .checks import FieldError, check_int, is_int, show, utf8_len
from .errors import ConfigError

__all__ = [
    "Config",
    "GroupConfig",
    "PublishConfig",
    "CurveConfig",
    "MetricsConfig",
    "RelayConfig",
    "UpstreamConfig",
    "JetStreamConfig",
    "load",
    "parse",
    "load_relay",
    "parse_relay",
]

_DEFAULT_METRICS_LISTEN = "127.0.0.1:9477"

# Inclusive ranges of the integer settings of one group; the keys are also the YAML keys.
_GROUP_RANGES: dict[str, tuple[int, int]] = {
    "group": (0, 65535),  # u16 group number of the NFLOG target (--nflog-group)
    "copy_range": (0, 65535),  # bytes of each packet copied; 0 = metadata only
    "queue_threshold": (1, 65535),  # packets the kernel queues before sending a batch
    "flush_ms": (1, 60_000),  # longest a queued packet waits; the kernel counts 1/100 s
    "rcvbuf": (4096, 1 << 30),  # netlink socket receive buffer, bytes
}
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
_NODE_MAX_BYTES = 255
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # what `ip netns add` makes under /run/netns
_NAME_MAX = 255
_PATH_MAX = 4095

_TOP_KEYS = ("groups", "metrics", "node", "publish", "user")
# The publish keys that are PublishConfig's fields as they are; bind, curve, ipc_filter_groups are mapped.
_PUBLISH_FIELDS = (
    "handshake_timeout_ms", "hwm", "idle_timeout_ms", "insecure", "max_connections",
    "max_connections_per_source", "max_queued_bytes",
)  # fmt: skip
_PUBLISH_KEYS = ("bind", "curve", "ipc_filter_groups", *_PUBLISH_FIELDS)
_CURVE_KEYS = ("authorized_keys_dir", "secret_key_file")
_GID_MAX = 2**32 - 2  # (gid_t)-1 means "no group"
_METRICS_KEYS = ("listen",)
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
class GroupConfig:
    """One NFLOG group to capture, and how the kernel should batch it: capture's settings.

    ``GroupConfig(5, copy_range=256)`` owns the rules the YAML is held to: a field out of range
    raises ``ConfigError("copy_range: must be an integer 0..65535, got 70000")`` (from a file,
    ``groups[2].copy_range: ...``).

    ``conntrack`` attaches each packet's connection (state, tuples before and after NAT, id,
    zone, mark) to its record: NFULNL_CFG_F_CONNTRACK.

    ``netns`` opens the group in another network namespace: a name under /run/netns
    (``ip netns add blue``: ``"blue"``) or an absolute path to a namespace file
    (``"/proc/4242/ns/net"``); None is the daemon's own. Only the form is checked here: a
    namespace comes and goes with its container, so whether it exists is found out when the
    group is opened (``nflogd.netns``).
    """

    group: int
    copy_range: int = 65535
    queue_threshold: int = 1024
    flush_ms: int = 10
    rcvbuf: int = 8 * 2**20
    netns: str | None = None
    conntrack: bool = False

    def __post_init__(self) -> None:
        for name, (lo, hi) in _GROUP_RANGES.items():
            check_int(name, getattr(self, name), lo, hi)
        _check_netns("netns", self.netns)
        if not isinstance(self.conntrack, bool):
            raise FieldError("conntrack", f"must be true or false, got {show(self.conntrack)}")


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
        _check_z85("public_key", self.public_key)
        _check_z85("secret_key", self.secret_key)


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
    slow subscribers may have queued together (docs/security.md, "Threat model and limits").
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


@dataclass(frozen=True)
class Config:
    """The whole configuration; ``metrics`` is None when turned off, ``user`` None to keep the user."""

    node: str
    groups: tuple[GroupConfig, ...]
    publish: PublishConfig
    metrics: MetricsConfig | None
    user: str | None


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
            _check_z85(name, keys[name])

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


# --- the dataclasses' rules ----------------------------------------------------------------------


def _check_netns(key: str, value: Any) -> None:
    """None, a name as ``ip netns`` makes them, or an absolute path of a namespace file."""
    if value is None:
        return
    form = "a name under /run/netns or an absolute path like /proc/PID/ns/net"
    if not isinstance(value, str) or not value:
        raise FieldError(key, f"must be {form}, got {show(value)}")
    if "\0" in value:
        raise FieldError(key, f"must not contain a NUL character, got {show(value)}")
    size = utf8_len(key, value)
    if "/" in value:
        if not value.startswith("/"):
            raise FieldError(
                key, f"a path must be absolute (/run/netns/NAME, /proc/PID/ns/net), got {show(value)}"
            )
        if size > _PATH_MAX:
            raise FieldError(key, f"path is {size} bytes, at most {_PATH_MAX}")
    elif value in (".", "..") or not _NETNS_NAME.fullmatch(value) or size > _NAME_MAX:
        raise FieldError(
            key,
            f"not a namespace name: {show(value)} "
            f"(up to {_NAME_MAX} letters, digits, '_', '-', '.'; or an absolute path)",
        )


def _check_z85(name: str, key: Any) -> None:
    try:
        _curve.check_z85(key, name)
    except _curve.KeyFileError as e:
        raise ConfigError(str(e)) from None  # "NAME: ..." already


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


# --- entry points --------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse the YAML file at ``path``; errors name the file or the key path."""
    source = os.fspath(path)
    return parse(_read_text(source), source)


def parse(text: str, source: str = "<config>") -> Config:
    """Parse configuration YAML; ``source`` names the text in errors about the document as a whole."""
    data = _document(text, source, _TOP_KEYS)
    node = data["node"] if "node" in data else socket.gethostname()
    _check_text("node", node, 1, _NODE_MAX_BYTES)

    if "groups" not in data:
        raise ConfigError("groups: is required, a non-empty list of NFLOG group numbers")
    groups = _parse_groups("groups", data["groups"])

    publish = _parse_section("publish", data, _PUBLISH_KEYS, _parse_publish)
    metrics = _parse_section("metrics", data, _METRICS_KEYS, _parse_metrics)
    user = _parse_user("user", data.get("user"))
    return Config(node=node, groups=groups, publish=publish, metrics=metrics, user=user)


def load_relay(path: str | os.PathLike[str]) -> RelayConfig:
    """Read and parse the relay's YAML file at ``path``; errors name the file or the key path."""
    source = os.fspath(path)
    return parse_relay(_read_text(source), source)


def parse_relay(text: str, source: str = "<config>") -> RelayConfig:
    """Parse the relay's YAML (``etc/nflogd-relay.yaml`` documents it), as ``parse`` does the daemon's."""
    data = _document(text, source, _RELAY_TOP_KEYS)
    if "upstreams" not in data:
        raise ConfigError("upstreams: is required, a non-empty list of nflogd endpoints to subscribe to")
    upstreams = _parse_upstreams("upstreams", data["upstreams"])

    def publish(section: dict[Any, Any]) -> PublishConfig:
        return _parse_publish({"bind": list(_RELAY_DEFAULT_BIND), **section})

    def metrics(section: dict[Any, Any]) -> MetricsConfig | None:
        return _parse_metrics({"listen": _RELAY_DEFAULT_LISTEN, **section})

    return RelayConfig(
        upstreams=upstreams,
        publish=_parse_section("publish", data, _PUBLISH_KEYS, publish),
        metrics=_parse_section("metrics", data, _METRICS_KEYS, metrics),
        jetstream=_parse_jetstream("jetstream", data["jetstream"]) if "jetstream" in data else None,
    )


# The YAML layer is imported here, on the first load or parse: the dataclasses need none of it.


def _read_text(source: str) -> str:
    from . import yamlload

    return yamlload.read_text(source)


def _document(text: str, source: str, keys: tuple[str, ...]) -> dict[Any, Any]:
    """The YAML's top level: a mapping of settings with only the ``keys`` known."""
    from . import yamlload

    data = yamlload.load(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of settings, got {show(data)}")
    _check_keys(source, data, keys)
    return data


# --- sections ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _at(path: str, shorthand: str | None = None) -> Iterator[None]:
    """Put the key path in front of the errors of the dataclass built inside: ``groups[2]`` and
    ``copy_range: ...`` make ``groups[2].copy_range: ...``. A scalar written for the whole
    mapping (``groups: [5]`` for ``{group: 5}``) is its field ``shorthand``: named ``path``."""
    try:
        yield
    except FieldError as e:
        raise e.at(path, shorthand) from None


def _parse_groups(path: str, value: Any) -> tuple[GroupConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list of NFLOG group numbers, got {show(value)}")
    if not value:
        raise ConfigError(f"{path}: must not be empty; list at least one NFLOG group")
    groups: list[GroupConfig] = []
    first_at: dict[int, int] = {}
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        group = _parse_group(item_path, item)
        if group.group in first_at:
            j = first_at[group.group]
            why = ""
            if group.netns != groups[j].netns:
                # The feed's topic and the metrics' label are the group number alone.
                why = "; a group number may be used once across all namespaces"
            raise ConfigError(f"{item_path}: group {group.group} is listed twice (also {path}[{j}]){why}")
        first_at[group.group] = i
        groups.append(group)
    return tuple(groups)


def _parse_group(path: str, item: Any) -> GroupConfig:
    """A bare group number, or a mapping of GroupConfig's fields."""
    if isinstance(item, dict):
        _check_keys(path, item, (*_GROUP_RANGES, "netns", "conntrack"))
        if "group" not in item:
            raise ConfigError(f"{path}: missing key 'group', the NFLOG group number 0..65535")
        with _at(path):
            return GroupConfig(**item)
    if is_int(item):
        with _at(path, shorthand="group"):
            return GroupConfig(item)
    raise ConfigError(
        f"{path}: must be a group number 0..65535 or a mapping with a 'group' key, got {show(item)}"
    )


def _parse_section(
    path: str, data: dict[Any, Any], keys: tuple[str, ...], build: Callable[[dict[Any, Any]], Any]
) -> Any:
    """An optional mapping: absent means all defaults, anything but a mapping is an error."""
    section = data.get(path, {})
    if not isinstance(section, dict):
        hint = " (to turn metrics off, write 'listen: null' under it)" if path == "metrics" else ""
        raise ConfigError(f"{path}: must be a mapping, got {show(section)}{hint}")
    _check_keys(path, section, keys)
    return build(section)


def _parse_publish(section: dict[Any, Any]) -> PublishConfig:
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
    with _at("publish"):
        return PublishConfig(curve=curve, ipc_filter_gids=gids, **fields)


def _parse_curve(path: str, section: Any) -> CurveConfig | None:
    """``publish.curve``: read the secret key and check the client key directory now."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: must be a mapping with secret_key_file and authorized_keys_dir, got {show(section)}"
        )
    _check_keys(path, section, _CURVE_KEYS)
    for key in _CURVE_KEYS:
        if key not in section:
            raise ConfigError(f"{path}: missing key {key!r}")
        _check_absolute(f"{path}.{key}", section[key])
    _require_curve(path)
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


def _parse_metrics(section: dict[Any, Any]) -> MetricsConfig | None:
    listen = section.get("listen", _DEFAULT_METRICS_LISTEN)
    if listen is None:
        return None
    path = "metrics.listen"
    if not isinstance(listen, str):
        raise ConfigError(f'{path}: must be "host:port" or null to turn metrics off, got {show(listen)}')
    host, port = split_host_port(path, listen, listen, allow_wildcard=False)
    return MetricsConfig(host=host, port=port)


def _parse_jetstream(path: str, section: Any) -> JetStreamConfig:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: must be a mapping with at least servers, got {show(section)}")
    _check_keys(path, section, _JETSTREAM_KEYS)
    servers = section.get("servers")
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not servers:
        raise ConfigError(f"{path}.servers: is required, a nats://HOST:PORT URL or a non-empty list of them")
    fields = {key: value for key, value in section.items() if key != "servers"}
    with _at(path):
        return JetStreamConfig(servers=tuple(servers), **fields)


def _parse_user(path: str, user: Any) -> str | None:
    if user is None:
        return None
    if not isinstance(user, str):
        raise ConfigError(f"{path}: must be a user name or null, got {show(user)}")
    try:
        pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: a NUL or an unencodable character in the name
        raise ConfigError(f"{path}: no such user {show(user)}") from None
    return user


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
        with _at(path, shorthand="endpoint"):
            return UpstreamConfig(item)
    if not isinstance(item, dict):
        raise ConfigError(
            f"{path}: must be an endpoint string or a mapping with 'endpoint', got {show(item)}"
        )
    _check_keys(path, item, _UPSTREAM_KEYS)
    if "endpoint" not in item:
        raise ConfigError(f"{path}: missing key 'endpoint', like tcp://router1:5555")
    with _at(path):
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
    _check_absolute(f"{path}.client_secret_key_file", secret_file)
    _require_curve(path)
    try:
        server_key = _curve.public_key(server)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.server_public_key: {e}") from None
    try:
        public, secret = _curve.keypair(secret_file)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.client_secret_key_file: {e}") from None
    return replace(upstream, server_key=server_key, client_public_key=public, client_secret_key=secret)


# --- the mapping's own checks --------------------------------------------------------------------


def _check_keys(path: str, mapping: dict[Any, Any], allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{path}: unknown key {show(key)}; expected one of {', '.join(sorted(allowed))}"
            )


def _check_text(path: str, value: Any, lo: int, hi: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string of {lo}..{hi} UTF-8 bytes, got {show(value)}")
    size = utf8_len(path, value)
    if not lo <= size <= hi:
        raise ConfigError(f"{path}: must be a string of {lo}..{hi} UTF-8 bytes, got {size} bytes")
    return value


def _check_absolute(path: str, value: Any) -> None:
    """A key file's path: absolute, without a NUL."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{path}: must be an absolute path, got {show(value)}")


def _require_curve(path: str) -> None:
    if not zmq.has("curve"):
        raise ConfigError(f"{path}: this libzmq was built without CURVE support")
