"""A config file read safely and its YAML parsed strictly; every failure one ``ConfigError`` line.

::

    from nflogd import yamlload

    data = yamlload.load(yamlload.read_text("/etc/nflogd.yaml"), "/etc/nflogd.yaml")

``read_text`` opens without blocking and reads only a regular file of at most
``CONFIG_MAX_BYTES`` (a FIFO would block for good, /dev/zero never end), as UTF-8. ``load`` is
``yaml.safe_load`` that also refuses a key given twice in one mapping and reports every YAML
failure where it is: ``/etc/nflogd.yaml: invalid YAML at line 3 column 7: ...``. What the data
means is ``nflogd.config``'s business.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, BinaryIO

import yaml

from .checks import show
from .errors import ConfigError

__all__ = ["CONFIG_MAX_BYTES", "load", "open_regular", "read_text"]

#: The largest config file read (bytes): a config is a few KB.
CONFIG_MAX_BYTES = 1 << 20


def read_text(source: str) -> str:
    """The file's text; every failure a ConfigError naming it (``PATH: cannot read: ...``)."""
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


def open_regular(path: str, max_bytes: int) -> _Bounded:
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

    def __init__(self, f: BinaryIO, max_bytes: int):
        self._f, self._max = f, max_bytes

    def read(self) -> bytes:
        data = self._f.read(self._max + 1)
        if len(data) > self._max:
            raise OSError(errno.EFBIG, f"larger than {self._max} bytes")
        return data

    def __enter__(self) -> _Bounded:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a directory")):  # fmt: skip
        if test(mode):
            return name
    return "not a regular file"


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
                        f"duplicate key {show(key)} (first at line {first.line + 1})",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        # Any other node: SafeConstructor raises its own "expected a mapping node" error.
        return super().construct_mapping(node, deep=deep)  # type: ignore[arg-type]

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except (IndexError, KeyError, AttributeError):
            # PyYAML's scalar constructors fail so on explicitly tagged values they cannot
            # read: !!int "" (IndexError), !!bool maybe (KeyError), !!timestamp x
            # (AttributeError). Report them where they are, like any other YAML error.
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            what = show(node.value) if isinstance(node, yaml.ScalarNode) else "this node"
            raise yaml.constructor.ConstructorError(
                None, None, f"{tag} cannot read {what}", node.start_mark
            ) from None


def load(text: str, source: str) -> Any:
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


def _one_line(text: str) -> str:
    return " ".join(text.split())
