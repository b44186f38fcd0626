"""The grammar of the addresses a config names: endpoints the daemon and the relay bind or
connect (``tcp://HOST:PORT``, ``ipc:///absolute/path``), ``HOST:PORT`` listeners and NATS
servers (``nats://HOST:PORT``).

::

    from nflogd import addresses

    addresses.check_endpoint("publish.bind[0]", "tcp://[::1]:5555")
    addresses.split_host_port("metrics.listen", "127.0.0.1:9477", "127.0.0.1:9477",
                              allow_wildcard=False)            # ("127.0.0.1", 9477)
    addresses.is_loopback("::ffff:127.0.0.1")                  # True

Each failure is a ``FieldError`` (a ``ConfigError``) naming the key it was given, with the
accepted forms. Stricter than ``nflogd_client.endpoints.check_endpoint``, the clients' quick
look before libzmq connects: here hosts and addresses are checked, an ipc path must fit a Unix
socket address, abstract ``ipc://@name`` sockets are refused, and the message names the key.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from typing import Any

from .checks import FieldError, show, utf8_len

__all__ = [
    "ENDPOINT_FORMS",
    "IPC_PATH_MAX_BYTES",
    "PORT_RANGE",
    "check_endpoint",
    "check_host",
    "check_listed_once",
    "check_nats_url",
    "is_loopback",
    "split_host_port",
]

ENDPOINT_FORMS = "tcp://HOST:PORT or ipc:///absolute/path"
PORT_RANGE = (1, 65535)
IPC_PATH_MAX_BYTES = 107  # sizeof(sockaddr_un.sun_path) - 1 for the terminating NUL
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


def check_endpoint(key: str, endpoint: Any) -> None:
    """Accept ``tcp://HOST:PORT`` and ``ipc:///absolute/path``, the two transports a PUB feed needs."""
    if not isinstance(endpoint, str):
        raise FieldError(key, f"must be an endpoint string like {ENDPOINT_FORMS}, got {show(endpoint)}")
    transport, sep, address = endpoint.partition("://")
    if not sep:
        raise FieldError(key, f"must be an endpoint like {ENDPOINT_FORMS}, got {show(endpoint)}")
    if transport == "tcp":
        split_host_port(key, address, endpoint, allow_wildcard=True)
    elif transport == "ipc":
        if not address.startswith("/"):
            raise FieldError(key, f"ipc path must be absolute (ipc:///run/...), got {show(endpoint)}")
        if "\0" in address:
            raise FieldError(key, f"ipc path must not contain a NUL character, got {show(endpoint)}")
        size = utf8_len(key, address)
        if size > IPC_PATH_MAX_BYTES:
            raise FieldError(
                key, f"ipc path is {size} bytes, at most {IPC_PATH_MAX_BYTES} fit in a Unix socket address"
            )
    else:
        raise FieldError(key, f"unsupported transport {show(transport)}; expected {ENDPOINT_FORMS}")


def check_listed_once(
    key: str, values: Sequence[Any], check: Callable[[str, Any], None] | None = None
) -> None:
    """Refuse the first value listed twice (``key[i]``, naming the first place too); with ``check``,
    each is first checked as ``check(key[i], value)``."""
    first_at: dict[Any, int] = {}
    for i, value in enumerate(values):
        item_key = f"{key}[{i}]"
        if check is not None:
            check(item_key, value)
        if value in first_at:
            raise FieldError(item_key, f"{show(value)} is listed twice", also=f"{key}[{first_at[value]}]")
        first_at[value] = i


def check_nats_url(key: str, url: Any) -> None:
    """``nats://HOST:PORT`` or ``tls://HOST:PORT``: a NATS server, without a path or user."""
    if not isinstance(url, str) or not url.startswith(("nats://", "tls://")):
        raise FieldError(key, f"must be nats://HOST:PORT (or tls://), got {show(url)}")
    rest = url.split("://", 1)[1]
    if "/" in rest or "@" in rest:
        raise FieldError(key, f"must be nats://HOST:PORT without a path or user, got {show(url)}")
    split_host_port(key, rest, url, allow_wildcard=False)


def split_host_port(key: str, address: str, whole: str, *, allow_wildcard: bool) -> tuple[str, int]:
    """Split ``host:port`` or ``[v6addr]:port`` (``whole`` is what the message quotes); return the
    host without brackets and the port."""
    if address.startswith("["):
        inside, bracket, rest = address[1:].partition("]")
        if not bracket:
            raise FieldError(key, f"missing ']' after the IPv6 address in {show(whole)}")
        try:
            ipaddress.IPv6Address(inside)
        except ValueError:
            raise FieldError(key, f"not an IPv6 address in brackets: {show(inside)}") from None
        if not rest.startswith(":"):
            raise FieldError(key, f"missing ':PORT' after ']' in {show(whole)}")
        host, port_text = inside, rest[1:]
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon:
            raise FieldError(key, f"missing ':PORT' in {show(whole)}")
        if ":" in host:
            raise FieldError(
                key, f"an IPv6 address needs brackets, like [::1]:{port_text}; got {show(whole)}"
            )
        check_host(key, host, allow_wildcard=allow_wildcard)
    if port_text == "*":
        raise FieldError(key, "a wildcard port is not allowed; name a port 1..65535")
    if not (port_text.isascii() and port_text.isdigit()):
        raise FieldError(key, f"port must be an integer 1..65535, got {show(port_text)}")
    port = int(port_text)
    if not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
        raise FieldError(key, f"port must be an integer 1..65535, got {port}")
    return host, port


def check_host(key: str, host: str, *, allow_wildcard: bool) -> None:
    """An IPv4 address, a bare IPv6 address, ``*`` if allowed, or a DNS/interface name."""
    if not host:
        hint = "'*' or 0.0.0.0 for all addresses" if allow_wildcard else "0.0.0.0 for all addresses"
        raise FieldError(key, f"missing host before ':PORT' (use {hint})")
    if host == "*":
        if allow_wildcard:
            return
        raise FieldError(key, "'*' is not a host here; use 0.0.0.0 or [::] for all addresses")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise FieldError(key, f"not a valid IPv4 address: {show(host)}") from None
        return
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise FieldError(key, f"not a valid IPv6 address: {show(host)}") from None
        return
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        raise FieldError(
            key,
            f"not an IP address or host name: {show(host)} "
            "(names are dot-separated labels of letters, digits, '-' and '_')",
        )


def is_loopback(host: str) -> bool:
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
