"""The daemon's settings, and the mapping from its YAML file to them: frozen dataclasses out,
every mistake a ``ConfigError``. The sections the relay's file has too (``publish``,
``metrics``) are ``nflogd.config_publish``'s; the relay's own schema is ``nflogd.config_relay``;
reading the file and the key path in front of an error, ``nflogd.config_file``.

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
the curve key files, group names. The file is read and its YAML parsed by ``nflogd.yamlload``,
imported by the first ``load``/``parse``, so that building the dataclasses (``nflogd.classic``)
needs no YAML; endpoints and ``HOST:PORT`` are ``nflogd.addresses``' grammar.
Units are in the names (``flush_ms``, ``rcvbuf`` in bytes); ``ffi.py`` turns them into kernel units.
``etc/nflogd.yaml`` and ``etc/nflogd-relay.yaml`` document every key.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
from dataclasses import dataclass
from typing import Any

from .checks import FieldError, check_int, is_int, show, utf8_len
from .config_file import at, check_keys, check_text, document, parse_section, read_text
from .config_publish import (
    METRICS_KEYS,
    PUBLISH_KEYS,
    MetricsConfig,
    PublishConfig,
    parse_metrics,
    parse_publish,
)
from .errors import ConfigError

__all__ = ["Config", "GroupConfig", "load", "parse"]

# Inclusive ranges of the integer settings of one group; the keys are also the YAML keys.
_GROUP_RANGES: dict[str, tuple[int, int]] = {
    "group": (0, 65535),  # u16 group number of the NFLOG target (--nflog-group)
    "copy_range": (0, 65535),  # bytes of each packet copied; 0 = metadata only
    "queue_threshold": (1, 65535),  # packets the kernel queues before sending a batch
    "flush_ms": (1, 60_000),  # longest a queued packet waits; the kernel counts 1/100 s
    "rcvbuf": (4096, 1 << 30),  # netlink socket receive buffer, bytes
}
_NODE_MAX_BYTES = 255
_NETNS_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # what `ip netns add` makes under /run/netns
_NAME_MAX = 255
_PATH_MAX = 4095
_TOP_KEYS = ("groups", "metrics", "node", "publish", "user")


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
class Config:
    """The whole configuration; ``metrics`` is None when turned off, ``user`` None to keep the user."""

    node: str
    groups: tuple[GroupConfig, ...]
    publish: PublishConfig
    metrics: MetricsConfig | None
    user: str | None


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


# --- entry points --------------------------------------------------------------------------------


def load(path: str | os.PathLike[str]) -> Config:
    """Read and parse the YAML file at ``path``; errors name the file or the key path."""
    source = os.fspath(path)
    return parse(read_text(source), source)


def parse(text: str, source: str = "<config>") -> Config:
    """Parse configuration YAML; ``source`` names the text in errors about the document as a whole."""
    data = document(text, source, _TOP_KEYS)
    node = data["node"] if "node" in data else socket.gethostname()
    check_text("node", node, 1, _NODE_MAX_BYTES)

    if "groups" not in data:
        raise ConfigError("groups: is required, a non-empty list of NFLOG group numbers")
    groups = _parse_groups("groups", data["groups"])

    publish = parse_section("publish", data, PUBLISH_KEYS, parse_publish)
    metrics = parse_section("metrics", data, METRICS_KEYS, parse_metrics)
    user = _parse_user("user", data.get("user"))
    return Config(node=node, groups=groups, publish=publish, metrics=metrics, user=user)


# --- sections ------------------------------------------------------------------------------------


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
        check_keys(path, item, (*_GROUP_RANGES, "netns", "conntrack"))
        if "group" not in item:
            raise ConfigError(f"{path}: missing key 'group', the NFLOG group number 0..65535")
        with at(path):
            return GroupConfig(**item)
    if is_int(item):
        with at(path, shorthand="group"):
            return GroupConfig(item)
    raise ConfigError(
        f"{path}: must be a group number 0..65535 or a mapping with a 'group' key, got {show(item)}"
    )


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
