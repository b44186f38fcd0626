"""The daemon's and the relay's configuration: YAML in, frozen dataclasses out, every mistake a
``ConfigError``.

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
Units are in the names (``flush_ms``, ``rcvbuf`` in bytes); ``ffi.py`` turns them into kernel units.
``etc/nflogd.yaml`` and ``etc/nflogd-relay.yaml`` document every key.
"""

from __future__ import annotations

import errno
import grp
import ipaddress
import os
import pwd
import re
import socket
import stat
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml
from nflogd_client import curve as _curve

from nflogd.errors import ConfigError

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

_DEFAULT_BIND = ("ipc:///run/nflogd/feed.sock",)
_DEFAULT_HWM = 100_000
_DEFAULT_METRICS_HOST = "127.0.0.1"
_DEFAULT_METRICS_PORT = 9477

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
_DEFAULT_MAX_CONNECTIONS = 256
_MAX_CONNECTIONS_RANGE = (1, 100_000)
# A peer that has not completed the ZMTP handshake (CURVE included) by then is dropped.
_DEFAULT_HANDSHAKE_TIMEOUT_MS = 10_000
_HANDSHAKE_TIMEOUT_RANGE = (100, 600_000)
#: The largest config file read (bytes): a config is a few KB.
CONFIG_MAX_BYTES = 1 << 20
_PORT_RANGE = (1, 65535)
_NODE_MAX_BYTES = 255
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # what `ip netns add` makes under /run/netns
_NAME_MAX = 255
_PATH_MAX = 4095
_IPC_PATH_MAX_BYTES = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL

_TOP_KEYS = ("groups", "metrics", "node", "publish", "user")
_PUBLISH_KEYS = (
    "bind", "curve", "handshake_timeout_ms", "hwm", "insecure", "ipc_filter_groups", "max_connections",
)  # fmt: skip
_CURVE_KEYS = ("authorized_keys_dir", "secret_key_file")
_GID_MAX = 2**32 - 2  # (gid_t)-1 means "no group"
_METRICS_KEYS = ("listen",)
_RELAY_TOP_KEYS = ("jetstream", "metrics", "publish", "upstreams")
_UPSTREAM_KEYS = ("client_secret_key_file", "endpoint", "server_public_key")
_RELAY_DEFAULT_BIND = ("ipc:///run/nflogd-relay/feed.sock",)
_RELAY_DEFAULT_LISTEN = "127.0.0.1:9478"
# The relay's jetstream section: integer keys with (default, lo, hi); docs/jetstream.md.
_JETSTREAM_INTS: dict[str, tuple[int, int, int]] = {
    "partitions": (8, 1, 1024),  # subjects <prefix>.0.> .. <prefix>.N-1.>: consumer groups split by these
    "replicas": (1, 1, 5),  # 3 on a three-node cluster
    "max_age_s": (7 * 86400, 0, 10 * 365 * 86400),  # retention by age; 0: no limit
    "max_bytes": (0, 0, 1 << 50),  # retention by size; 0: no limit
    "duplicate_window_s": (120, 1, 86400),  # Nats-Msg-Id dedup window
    "max_in_flight": (256, 1, 100_000),  # publishes awaiting their ack
    "buffer_bytes": (64 << 20, 1 << 16, 1 << 34),  # messages held (queued + in flight), bytes
    "ack_timeout_ms": (5000, 10, 600_000),  # a publish retried after this long without an ack
    "connect_timeout_ms": (5000, 10, 600_000),  # start: reach the cluster and check the stream
}
_JETSTREAM_KEYS = ("servers", "stream", "subject_prefix", "storage", *_JETSTREAM_INTS)
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]{1,255}")
_SUBJECT_PREFIX = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")

_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")
_ENDPOINT_FORMS = "tcp://HOST:PORT or ipc:///absolute/path"


# --- the dataclasses ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupConfig:
    """One NFLOG group to capture, and how the kernel should batch it.

    ``GroupConfig(5, copy_range=256)`` validates like the YAML does: a field out of range raises
    ``ConfigError("copy_range: must be an integer 0..65535, got 70000")``.

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

    def __post_init__(self) -> None:
        for name, (lo, hi) in _GROUP_RANGES.items():
            _check_int(name, getattr(self, name), lo, hi)
        _check_netns("netns", self.netns)


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
        for name in ("public_key", "secret_key"):
            try:
                _curve.check_z85(getattr(self, name), name)
            except _curve.KeyFileError as e:
                raise ConfigError(str(e)) from None


@dataclass(frozen=True)
class PublishConfig:
    """Where the ZeroMQ PUB socket binds, and how many messages it queues per subscriber.

    ``curve``: CURVE on every tcp endpoint, or None. ``insecure``: allow tcp endpoints other
    hosts can reach without CURVE. ``ipc_filter_gids``: IPC_FILTER_GID for the ipc endpoints.
    ``max_connections``: peers connected at once per endpoint (more are closed at once);
    ``handshake_timeout_ms``: a peer that has not finished the ZMTP handshake by then is
    dropped (docs/security.md, "Limits").
    """

    bind: tuple[str, ...] = _DEFAULT_BIND
    hwm: int = _DEFAULT_HWM
    curve: CurveConfig | None = None
    insecure: bool = False
    ipc_filter_gids: tuple[int, ...] = ()
    max_connections: int = _DEFAULT_MAX_CONNECTIONS
    handshake_timeout_ms: int = _DEFAULT_HANDSHAKE_TIMEOUT_MS

    def __post_init__(self) -> None:
        if not isinstance(self.bind, tuple):
            raise ConfigError(f"bind: must be a tuple of endpoint strings, got {_show(self.bind)}")
        _check_endpoints("bind", self.bind)
        _check_int("hwm", self.hwm, *_HWM_RANGE)
        _check_int("max_connections", self.max_connections, *_MAX_CONNECTIONS_RANGE)
        _check_int("handshake_timeout_ms", self.handshake_timeout_ms, *_HANDSHAKE_TIMEOUT_RANGE)
        if not isinstance(self.insecure, bool):
            raise ConfigError(f"insecure: must be true or false, got {_show(self.insecure)}")
        _check_exposure("bind", self.bind, self.curve, self.insecure)


@dataclass(frozen=True)
class MetricsConfig:
    """The Prometheus HTTP listener; ``host`` is an address or name, IPv6 without brackets."""

    host: str
    port: int

    def __post_init__(self) -> None:
        if not isinstance(self.host, str):
            raise ConfigError(f"host: must be a string, got {_show(self.host)}")
        if self.host.startswith("[") and self.host.endswith("]"):
            raise ConfigError(f"host: must be an IPv6 address without brackets, got {_show(self.host)}")
        _check_host("host", self.host, allow_wildcard=False)
        _check_int("port", self.port, *_PORT_RANGE)


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
        _check_endpoint("endpoint", self.endpoint)
        keys = {"server_key": self.server_key, "client_public_key": self.client_public_key,
                "client_secret_key": self.client_secret_key}  # fmt: skip
        given = [name for name, key in keys.items() if key is not None]
        if given and len(given) != len(keys):
            raise ConfigError(f"{', '.join(keys)}: give all three for CURVE or none, got {', '.join(given)}")
        for name in given:
            try:
                _curve.check_z85(keys[name], name)
            except _curve.KeyFileError as e:
                raise ConfigError(str(e)) from None

    @property
    def curve(self) -> bool:
        """True when the connection to this upstream uses CURVE."""
        return self.server_key is not None


@dataclass(frozen=True)
class JetStreamConfig:
    """The relay's feed into a NATS JetStream stream (``docs/jetstream.md``): where, which stream,
    its settings (created or checked at start), and the publisher's bounds."""

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


@dataclass(frozen=True)
class RelayConfig:
    """The relay's whole configuration; ``metrics`` is None when turned off, ``jetstream``
    None without a jetstream section."""

    upstreams: tuple[UpstreamConfig, ...]
    publish: PublishConfig
    metrics: MetricsConfig | None
    jetstream: JetStreamConfig | None = None


# --- entry points --------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse the YAML file at ``path``; errors name the file or the key path."""
    source = os.fspath(path)
    return parse(_read_text(source), source)


def _read_text(source: str) -> str:
    """The file's text; every failure a ConfigError naming it.

    Opened without blocking and refused unless it is a regular file of at most
    CONFIG_MAX_BYTES: a FIFO would block for good, /dev/zero never end."""
    try:
        with open_regular(source, CONFIG_MAX_BYTES) as f:
            return f.read().decode("utf-8")
    except OSError as e:
        why = f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)
        raise ConfigError(f"{source}: cannot read: {why}") from None
    except UnicodeDecodeError as e:
        bad = e.object[e.start : e.start + 1].hex()
        raise ConfigError(f"{source}: cannot read: not UTF-8 (byte 0x{bad} at offset {e.start})") from None
    except ValueError as e:  # e.g. a NUL in the path
        raise ConfigError(f"{source}: cannot read: {e}") from None


def parse(text: str, source: str = "<config>") -> Config:
    """Parse configuration YAML; ``source`` names the text in errors about the document as a whole."""
    data = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of settings, got {_show(data)}")
    _check_keys(source, data, _TOP_KEYS)

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
    data = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of settings, got {_show(data)}")
    _check_keys(source, data, _RELAY_TOP_KEYS)
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


def open_regular(path: str, max_bytes: int):
    """``path`` opened for reading in binary, if it is a regular file of at most ``max_bytes``.

    The open never blocks (O_NONBLOCK: a FIFO opens at once and is then refused by type);
    anything else raises OSError with the reason as ``strerror``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file ({_file_kind(st.st_mode)})", path)
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"{st.st_size} bytes, larger than {max_bytes}", path)
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return _Bounded(f, max_bytes)


class _Bounded:
    """A file whose ``read()`` returns at most ``max_bytes`` (a file growing while read)."""

    def __init__(self, f, max_bytes: int):
        self._f, self._max = f, max_bytes

    def read(self) -> bytes:
        data = self._f.read(self._max + 1)
        if len(data) > self._max:
            raise OSError(errno.EFBIG, f"larger than {self._max} bytes")
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


# --- YAML ----------------------------------------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that rejects a key given twice in one mapping instead of keeping the last."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # "<<: *base" may be overridden; that is what merge keys are for
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:
                    break  # an unhashable key: the base class reports it with its position
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"duplicate key {_show(key)} (first at line {first.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (IndexError, KeyError, AttributeError):
            # PyYAML's scalar constructors fail so on explicitly tagged values they cannot
            # read: !!int "" (IndexError), !!bool maybe (KeyError), !!timestamp x
            # (AttributeError). Report them where they are, like any other YAML error.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            what = _show(node.value) if isinstance(node, yaml.ScalarNode) else "this node"
            raise yaml.constructor.ConstructorError(
                None, None, f"{tag} cannot read {what}", node.start_mark
            ) from None


def _load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` plus duplicate-key rejection, with every failure as one ConfigError line."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = e.problem or e.context or "syntax error"
        if e.problem and e.context and e.problem.startswith("but "):
            what = f"{e.context}, {e.problem}"  # "expected a single document ..., but found another ..."
        what = _one_line(what)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: invalid YAML{where}: {what}") from None
    except yaml.reader.ReaderError as e:
        line = text.count("\n", 0, e.position) + 1
        column = e.position - (text.rfind("\n", 0, e.position) + 1) + 1
        what = f"unacceptable character #x{e.character:04x}: {e.reason}"
        raise ConfigError(f"{source}: invalid YAML at line {line} column {column}: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {_one_line(str(e))}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as e:
        # PyYAML's constructors let these through for scalars that match an implicit tag but not
        # its range, e.g. the timestamp 2020-13-45 ("month must be in 1..12") or "!!int abc".
        raise ConfigError(f"{source}: invalid YAML: {_one_line(str(e))}") from None


# --- sections ------------------------------------------------------------------------------------


def _parse_groups(path: str, value: Any) -> tuple[GroupConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list of NFLOG group numbers, got {_show(value)}")
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
    if isinstance(item, dict):
        _check_keys(path, item, (*_GROUP_RANGES, "netns"))
        if "group" not in item:
            raise ConfigError(f"{path}: missing key 'group', the NFLOG group number 0..65535")
        for name, (lo, hi) in _GROUP_RANGES.items():
            if name in item:
                _check_int(f"{path}.{name}", item[name], lo, hi)
        _check_netns(f"{path}.netns", item.get("netns"))
        return GroupConfig(**item)
    if _is_int(item):
        _check_int(path, item, *_GROUP_RANGES["group"])
        return GroupConfig(item)
    raise ConfigError(
        f"{path}: must be a group number 0..65535 or a mapping with a 'group' key, got {_show(item)}"
    )


def _parse_section(
    path: str, data: dict[Any, Any], keys: tuple[str, ...], build: Callable[[dict[Any, Any]], Any]
) -> Any:
    """An optional mapping: absent means all defaults, anything but a mapping is an error."""
    section = data.get(path, {})
    if not isinstance(section, dict):
        hint = " (to turn metrics off, write 'listen: null' under it)" if path == "metrics" else ""
        raise ConfigError(f"{path}: must be a mapping, got {_show(section)}{hint}")
    _check_keys(path, section, keys)
    return build(section)


def _parse_publish(section: dict[Any, Any]) -> PublishConfig:
    bind = section.get("bind", list(_DEFAULT_BIND))
    if isinstance(bind, str):
        bind = [bind]
    elif not isinstance(bind, list):
        raise ConfigError(f"publish.bind: must be an endpoint string or a list of them, got {_show(bind)}")
    if not bind:
        raise ConfigError(f"publish.bind: must not be empty; give at least one of {_ENDPOINT_FORMS}")
    _check_endpoints("publish.bind", bind)
    hwm = section.get("hwm", _DEFAULT_HWM)
    _check_int("publish.hwm", hwm, *_HWM_RANGE)
    insecure = section.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"publish.insecure: must be true or false, got {_show(insecure)}")
    curve = _parse_curve("publish.curve", section.get("curve"))
    _check_exposure("publish.bind", bind, curve, insecure)
    gids = _parse_ipc_groups("publish.ipc_filter_groups", section.get("ipc_filter_groups"))
    max_connections = section.get("max_connections", _DEFAULT_MAX_CONNECTIONS)
    _check_int("publish.max_connections", max_connections, *_MAX_CONNECTIONS_RANGE)
    handshake = section.get("handshake_timeout_ms", _DEFAULT_HANDSHAKE_TIMEOUT_MS)
    _check_int("publish.handshake_timeout_ms", handshake, *_HANDSHAKE_TIMEOUT_RANGE)
    return PublishConfig(
        bind=tuple(bind), hwm=hwm, curve=curve, insecure=insecure, ipc_filter_gids=gids,
        max_connections=max_connections, handshake_timeout_ms=handshake,
    )  # fmt: skip


def _parse_curve(path: str, section: Any) -> CurveConfig | None:
    """``publish.curve``: read the secret key and check the client key directory now."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(
            f"{path}: must be a mapping with secret_key_file and authorized_keys_dir, got {_show(section)}"
        )
    _check_keys(path, section, _CURVE_KEYS)
    for key in _CURVE_KEYS:
        if key not in section:
            raise ConfigError(f"{path}: missing key {key!r}")
        value = section[key]
        if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
            raise ConfigError(f"{path}.{key}: must be an absolute path, got {_show(value)}")
    if not _zmq_has_curve():
        raise ConfigError(f"{path}: this libzmq was built without CURVE support")
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


def _zmq_has_curve() -> bool:
    import zmq

    return bool(zmq.has("curve"))


def _parse_ipc_groups(path: str, value: Any) -> tuple[int, ...]:
    """Group names (looked up now) or gids, for IPC_FILTER_GID; absent or empty: no filter."""
    if value is None:
        return ()
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a group name or gid, or a list of them, got {_show(value)}")
    gids: list[int] = []
    for i, item in enumerate(value):
        item_path = f"{path}[{i}]"
        if _is_int(item):
            _check_int(item_path, item, 0, _GID_MAX)
            gid = item
        elif isinstance(item, str):
            try:
                gid = grp.getgrnam(item).gr_gid
            except (KeyError, ValueError):
                raise ConfigError(f"{item_path}: no such group {_show(item)}") from None
        else:
            raise ConfigError(f"{item_path}: must be a group name or a gid, got {_show(item)}")
        if gid not in gids:
            gids.append(gid)
    return tuple(gids)


def _parse_metrics(section: dict[Any, Any]) -> MetricsConfig | None:
    listen = section.get("listen", f"{_DEFAULT_METRICS_HOST}:{_DEFAULT_METRICS_PORT}")
    if listen is None:
        return None
    path = "metrics.listen"
    if not isinstance(listen, str):
        raise ConfigError(f'{path}: must be "host:port" or null to turn metrics off, got {_show(listen)}')
    host, port = _split_host_port(path, listen, listen, allow_wildcard=False)
    return MetricsConfig(host=host, port=port)


def _parse_jetstream(path: str, section: Any) -> JetStreamConfig:
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: must be a mapping with at least servers, got {_show(section)}")
    _check_keys(path, section, _JETSTREAM_KEYS)
    servers = section.get("servers")
    if isinstance(servers, str):
        servers = [servers]
    if not isinstance(servers, list) or not servers:
        raise ConfigError(f"{path}.servers: is required, a nats://HOST:PORT URL or a non-empty list of them")
    for i, url in enumerate(servers):
        where = f"{path}.servers[{i}]"
        if not isinstance(url, str) or not url.startswith(("nats://", "tls://")):
            raise ConfigError(f"{where}: must be nats://HOST:PORT (or tls://), got {_show(url)}")
        rest = url.split("://", 1)[1]
        if "/" in rest or "@" in rest:
            raise ConfigError(f"{where}: must be nats://HOST:PORT without a path or user, got {_show(url)}")
        _split_host_port(where, rest, url, allow_wildcard=False)
    if len(set(servers)) != len(servers):
        raise ConfigError(f"{path}.servers: each server at most once")
    stream = section.get("stream", "NFLOG")
    if not isinstance(stream, str) or not _STREAM_NAME.fullmatch(stream):
        raise ConfigError(f"{path}.stream: must be 1..255 of A-Z a-z 0-9 _ -, got {_show(stream)}")
    prefix = section.get("subject_prefix", "nflog")
    if not isinstance(prefix, str) or not _SUBJECT_PREFIX.fullmatch(prefix) or len(prefix) > 200:
        raise ConfigError(
            f"{path}.subject_prefix: must be dot-separated tokens of A-Z a-z 0-9 _ -, got {_show(prefix)}"
        )
    storage = section.get("storage", "file")
    if storage not in ("file", "memory"):
        raise ConfigError(f"{path}.storage: must be file or memory, got {_show(storage)}")
    ints = {}
    for key, (default, lo, hi) in _JETSTREAM_INTS.items():
        ints[key] = _check_int(f"{path}.{key}", section.get(key, default), lo, hi)
    if ints["max_age_s"] and ints["duplicate_window_s"] > ints["max_age_s"]:
        raise ConfigError(
            f"{path}.duplicate_window_s: must not exceed max_age_s ({ints['max_age_s']}),"
            f" got {ints['duplicate_window_s']}"
        )
    return JetStreamConfig(
        servers=tuple(servers), stream=stream, subject_prefix=prefix, storage=storage, **ints
    )


def _parse_user(path: str, user: Any) -> str | None:
    if user is None:
        return None
    if not isinstance(user, str):
        raise ConfigError(f"{path}: must be a user name or null, got {_show(user)}")
    try:
        pwd.getpwnam(user)
    except (KeyError, ValueError):  # ValueError: a NUL or an unencodable character in the name
        raise ConfigError(f"{path}: no such user {_show(user)}") from None
    return user


def _parse_upstreams(path: str, value: Any) -> tuple[UpstreamConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(f"{path}: must be a list of endpoints or mappings, got {_show(value)}")
    if not value:
        raise ConfigError(f"{path}: must not be empty; list at least one nflogd endpoint")
    endpoints = [item.get("endpoint") if isinstance(item, dict) else item for item in value]
    upstreams = tuple(_parse_upstream(f"{path}[{i}]", item) for i, item in enumerate(value))
    _check_endpoints(path, endpoints)  # each is valid by now: this finds the duplicates
    return upstreams


def _parse_upstream(path: str, item: Any) -> UpstreamConfig:
    """A bare endpoint, or a mapping with ``endpoint`` and, for CURVE, the two key settings."""
    if isinstance(item, str):
        _check_endpoint(path, item)
        return UpstreamConfig(item)
    if not isinstance(item, dict):
        raise ConfigError(
            f"{path}: must be an endpoint string or a mapping with 'endpoint', got {_show(item)}"
        )
    _check_keys(path, item, _UPSTREAM_KEYS)
    if "endpoint" not in item:
        raise ConfigError(f"{path}: missing key 'endpoint', like tcp://router1:5555")
    _check_endpoint(f"{path}.endpoint", item["endpoint"])
    server, secret_file = item.get("server_public_key"), item.get("client_secret_key_file")
    if server is None and secret_file is None:
        return UpstreamConfig(item["endpoint"])
    if server is None:
        raise ConfigError(f"{path}: client_secret_key_file needs server_public_key, the daemon's public key")
    if secret_file is None:
        raise ConfigError(
            f"{path}: server_public_key needs client_secret_key_file, the relay's NAME.key_secret "
            "(the daemon admits only the clients whose public key it holds)"
        )
    if not isinstance(server, str):
        raise ConfigError(
            f"{path}.server_public_key: must be a key file or 40 Z85 characters, got {_show(server)}"
        )
    if not isinstance(secret_file, str) or not secret_file.startswith("/") or "\0" in secret_file:
        raise ConfigError(
            f"{path}.client_secret_key_file: must be an absolute path, got {_show(secret_file)}"
        )
    if not _zmq_has_curve():
        raise ConfigError(f"{path}: this libzmq was built without CURVE support")
    try:
        server_key = _curve.public_key(server)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.server_public_key: {e}") from None
    try:
        public, secret = _curve.keypair(secret_file)
    except _curve.KeyFileError as e:
        raise ConfigError(f"{path}.client_secret_key_file: {e}") from None
    return UpstreamConfig(item["endpoint"], server_key, public, secret)


# --- endpoints and hosts -------------------------------------------------------------------------


def _check_endpoints(path: str, endpoints: list[Any] | tuple[Any, ...]) -> None:
    first_at: dict[str, int] = {}
    for i, endpoint in enumerate(endpoints):
        item_path = f"{path}[{i}]"
        _check_endpoint(item_path, endpoint)
        if endpoint in first_at:
            raise ConfigError(
                f"{item_path}: {_show(endpoint)} is listed twice (also {path}[{first_at[endpoint]}])"
            )
        first_at[endpoint] = i


def _check_endpoint(path: str, endpoint: Any) -> None:
    """Accept ``tcp://HOST:PORT`` and ``ipc:///absolute/path``, the two transports a PUB feed needs."""
    if not isinstance(endpoint, str):
        raise ConfigError(f"{path}: must be an endpoint string like {_ENDPOINT_FORMS}, got {_show(endpoint)}")
    transport, sep, address = endpoint.partition("://")
    if not sep:
        raise ConfigError(f"{path}: must be an endpoint like {_ENDPOINT_FORMS}, got {_show(endpoint)}")
    if transport == "tcp":
        _split_host_port(path, address, endpoint, allow_wildcard=True)
    elif transport == "ipc":
        if not address.startswith("/"):
            raise ConfigError(f"{path}: ipc path must be absolute (ipc:///run/...), got {_show(endpoint)}")
        if "\0" in address:
            raise ConfigError(f"{path}: ipc path must not contain a NUL character, got {_show(endpoint)}")
        size = _utf8_len(path, address)
        if size > _IPC_PATH_MAX_BYTES:
            raise ConfigError(
                f"{path}: ipc path is {size} bytes, "
                f"at most {_IPC_PATH_MAX_BYTES} fit in a Unix socket address"
            )
    else:
        raise ConfigError(f"{path}: unsupported transport {_show(transport)}; expected {_ENDPOINT_FORMS}")


def _split_host_port(path: str, address: str, whole: str, *, allow_wildcard: bool) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6addr]:port``; return the host without brackets and the port."""
    if address.startswith("["):
        inside, bracket, rest = address[1:].partition("]")
        if not bracket:
            raise ConfigError(f"{path}: missing ']' after the IPv6 address in {_show(whole)}")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise ConfigError(f"{path}: not an IPv6 address in brackets: {_show(inside)}") from None
        if not rest.startswith(":"):
            raise ConfigError(f"{path}: missing ':PORT' after ']' in {_show(whole)}")
        host, port_text = inside, rest[1:]
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon:
            raise ConfigError(f"{path}: missing ':PORT' in {_show(whole)}")
        if ":" in host:
            raise ConfigError(
                f"{path}: an IPv6 address needs brackets, like [::1]:{port_text}; got {_show(whole)}"
            )
        _check_host(path, host, allow_wildcard=allow_wildcard)
    if port_text == "*":
        raise ConfigError(f"{path}: a wildcard port is not allowed; name a port 1..65535")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ConfigError(f"{path}: port must be an integer 1..65535, got {_show(port_text)}")
    port = int(port_text)
    if not _PORT_RANGE[0] <= port <= _PORT_RANGE[1]:
        raise ConfigError(f"{path}: port must be an integer 1..65535, got {port}")
    return host, port


def _check_host(path: str, host: str, *, allow_wildcard: bool) -> None:
    """An IPv4 address, a bare IPv6 address, ``*`` if allowed, or a DNS/interface name."""
    if not host:
        hint = "'*' or 0.0.0.0 for all addresses" if allow_wildcard else "0.0.0.0 for all addresses"
        raise ConfigError(f"{path}: missing host before ':PORT' (use {hint})")
    if host == "*":
        if allow_wildcard:
            return
        raise ConfigError(f"{path}: '*' is not a host here; use 0.0.0.0 or [::] for all addresses")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ConfigError(f"{path}: not a valid IPv4 address: {_show(host)}") from None
        return
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{path}: not a valid IPv6 address: {_show(host)}") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(
            f"{path}: not an IP address or host name: {_show(host)} "
            "(names are dot-separated labels of letters, digits, '-' and '_')"
        )


def _is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 (or ::ffff:127.x.y.z) and the name ``localhost``; not ``*``, not names."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _check_exposure(path: str, bind: Any, curve: CurveConfig | None, insecure: bool) -> None:
    """Refuse a tcp endpoint other hosts can reach when nothing protects it."""
    if curve is not None or insecure:
        return
    for i, endpoint in enumerate(bind):
        if not endpoint.startswith("tcp://"):
            continue
        host, _ = _split_host_port(f"{path}[{i}]", endpoint[len("tcp://") :], endpoint, allow_wildcard=True)
        if not _is_loopback(host):
            raise ConfigError(
                f"{path}[{i}]: {endpoint} is not a loopback address and publish.curve is not set: "
                "every host that reaches it could read the feed; set publish.curve "
                "(docs/security.md) or publish.insecure: true"
            )


# --- scalars -------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(path: str, value: Any, lo: int, hi: int) -> int:
    """The one integer check: ``bool`` is not an integer, and the range is inclusive."""
    if not _is_int(value) or not lo <= value <= hi:
        raise ConfigError(f"{path}: must be an integer {lo}..{hi}, got {_show(value)}")
    return value


def _check_text(path: str, value: Any, lo: int, hi: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string of {lo}..{hi} UTF-8 bytes, got {_show(value)}")
    size = _utf8_len(path, value)
    if not lo <= size <= hi:
        raise ConfigError(f"{path}: must be a string of {lo}..{hi} UTF-8 bytes, got {size} bytes")
    return value


def _check_netns(path: str, value: Any) -> None:
    """None, a name as ``ip netns`` makes them, or an absolute path of a namespace file."""
    if value is None:
        return
    form = "a name under /run/netns or an absolute path like /proc/PID/ns/net"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: must be {form}, got {_show(value)}")
    if "\0" in value:
        raise ConfigError(f"{path}: must not contain a NUL character, got {_show(value)}")
    size = _utf8_len(path, value)
    if "/" in value:
        if not value.startswith("/"):
            raise ConfigError(
                f"{path}: a path must be absolute (/run/netns/NAME, /proc/PID/ns/net), got {_show(value)}"
            )
        if size > _PATH_MAX:
            raise ConfigError(f"{path}: path is {size} bytes, at most {_PATH_MAX}")
    elif value in (".", "..") or not _NETNS_NAME.fullmatch(value) or size > _NAME_MAX:
        raise ConfigError(
            f"{path}: not a namespace name: {_show(value)} "
            f"(up to {_NAME_MAX} letters, digits, '_', '-', '.'; or an absolute path)"
        )


def _utf8_len(path: str, text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise ConfigError(
            f"{path}: not encodable as UTF-8: character {text[e.start]!r} at offset {e.start}"
        ) from None


def _check_keys(path: str, mapping: dict[Any, Any], allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{path}: unknown key {_show(key)}; expected one of {', '.join(sorted(allowed))}"
            )


def _show(value: Any, limit: int = 60) -> str:
    """A value as the message's "got ...": YAML spelling for scalars, a kind for containers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int) and value.bit_length() > 192:
        return f"a {value.bit_length()}-bit integer"  # str() of a huge int is slow, or refused
    if isinstance(value, (int, float, str)):
        text = repr(value) if isinstance(value, (str, float)) else str(value)
        return text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
