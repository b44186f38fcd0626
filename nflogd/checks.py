"""The value checks the settings are built from, and how a message spells the value it refuses.

::

    from nflogd.checks import FieldError, check_int

    check_int("copy_range", 70000, 0, 65535)
    # FieldError: copy_range: must be an integer 0..65535, got 70000

Every check raises ``FieldError``, a ``ConfigError`` that keeps the key (``copy_range``,
``bind[1]``) apart from the reason, so that ``nflogd.config`` can put the YAML path in front
(``groups[2].copy_range: ...``) of a rule a dataclass owns: ``err.at("groups[2]")``.
``show`` renders the "got ..." part: YAML's spelling for scalars, a kind for containers.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["FieldError", "check_int", "is_int", "show", "utf8_len"]


class FieldError(ConfigError):
    """``key: why``, or ``key: why (also other)`` where a value stands twice.

    ``key`` (and ``also``) is the field (``hwm``, ``bind[1]``) or its path; ``at`` moves the
    error under a path."""

    def __init__(self, key: str, why: str, also: str | None = None):
        super().__init__(f"{key}: {why}" if also is None else f"{key}: {why} (also {also})")
        self.key, self.why, self.also = key, why, also

    def at(self, path: str, shorthand: str | None = None) -> FieldError:
        """The error under ``path``: ``hwm`` becomes ``publish.hwm``; the field ``shorthand``,
        written as a bare scalar for the whole mapping, becomes ``path`` itself."""

        def move(key: str) -> str:
            return path if key == shorthand else f"{path}.{key}"

        return FieldError(move(self.key), self.why, None if self.also is None else move(self.also))


def is_int(value: Any) -> bool:
    """An integer, and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value: Any, lo: int, hi: int) -> int:
    """The one integer check: ``bool`` is not an integer, and the range is inclusive."""
    if not is_int(value) or not lo <= value <= hi:
        raise FieldError(key, f"must be an integer {lo}..{hi}, got {show(value)}")
    return value


def utf8_len(key: str, text: str) -> int:
    """``text``'s length in UTF-8 bytes; a lone surrogate raises naming ``key``."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise FieldError(
            key, f"not encodable as UTF-8: character {text[e.start]!r} at offset {e.start}"
        ) from None


def show(value: Any, limit: int = 60) -> str:
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
