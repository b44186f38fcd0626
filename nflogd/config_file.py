"""Reading a settings file, the daemon's or the relay's: the YAML document, its sections and
the mapping's own checks, each error with the key path in front.

::

    from nflogd import config_file

    data = config_file.document(config_file.read_text(path), path, ("groups", "publish"))
    with config_file.at("groups[2]"):
        GroupConfig(**item)        # copy_range: ...  ->  groups[2].copy_range: ...

The file is read and its YAML parsed by ``nflogd.yamlload``, imported by the first
``read_text``/``document``, so that building the dataclasses (``nflogd.classic``) needs no
YAML. The value checks the dataclasses are built from are ``nflogd.checks``'; the error
type is ``nflogd.errors.ConfigError``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable

import zmq
from nflogd_client import curve as _curve

from .checks import FieldError, show, utf8_len
from .errors import ConfigError

__all__ = [
    "at", "check_absolute", "check_keys", "check_text", "check_z85", "document", "parse_section",
    "read_text", "require_curve",
]  # fmt: skip


# The YAML layer is imported here, on the first load or parse: the dataclasses need none of it.


def read_text(source: str) -> str:
    from . import yamlload

    return yamlload.read_text(source)


def document(text: str, source: str, keys: tuple[str, ...]) -> dict[Any, Any]:
    """The YAML's top level: a mapping of settings with only the ``keys`` known."""
    from . import yamlload

    data = yamlload.load(text, source)
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: top level must be a mapping of settings, got {show(data)}")
    check_keys(source, data, keys)
    return data


# --- sections ------------------------------------------------------------------------------------


@contextlib.contextmanager
def at(path: str, shorthand: str | None = None) -> Iterator[None]:
    """Put the key path in front of the errors of the dataclass built inside: ``groups[2]`` and
    ``copy_range: ...`` make ``groups[2].copy_range: ...``. A scalar written for the whole
    mapping (``groups: [5]`` for ``{group: 5}``) is its field ``shorthand``: named ``path``."""
    try:
        yield
    except FieldError as e:
        raise e.at(path, shorthand) from None


def parse_section(
    path: str, data: dict[Any, Any], keys: tuple[str, ...], build: Callable[[dict[Any, Any]], Any]
) -> Any:
    """An optional mapping: absent means all defaults, anything but a mapping is an error."""
    section = data.get(path, {})
    if not isinstance(section, dict):
        hint = " (to turn metrics off, write 'listen: null' under it)" if path == "metrics" else ""
        raise ConfigError(f"{path}: must be a mapping, got {show(section)}{hint}")
    check_keys(path, section, keys)
    return build(section)


# --- the mapping's own checks --------------------------------------------------------------------


def check_keys(path: str, mapping: dict[Any, Any], allowed: tuple[str, ...]) -> None:
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"{path}: unknown key {show(key)}; expected one of {', '.join(sorted(allowed))}"
            )


def check_text(path: str, value: Any, lo: int, hi: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{path}: must be a string of {lo}..{hi} UTF-8 bytes, got {show(value)}")
    size = utf8_len(path, value)
    if not lo <= size <= hi:
        raise ConfigError(f"{path}: must be a string of {lo}..{hi} UTF-8 bytes, got {size} bytes")
    return value


def check_absolute(path: str, value: Any) -> None:
    """A key file's path: absolute, without a NUL."""
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ConfigError(f"{path}: must be an absolute path, got {show(value)}")


def check_z85(name: str, key: Any) -> None:
    try:
        _curve.check_z85(key, name)
    except _curve.KeyFileError as e:
        raise ConfigError(str(e)) from None  # "NAME: ..." already


def require_curve(path: str) -> None:
    if not zmq.has("curve"):
        raise ConfigError(f"{path}: this libzmq was built without CURVE support")
