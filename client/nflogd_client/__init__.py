"""Client library for the nflogd feed.

``Subscriber`` gives raw packets (``Packet``, in ``Batch``es) with loss accounting, and
``AsyncSubscriber`` the same to asyncio programs; ``ZMQNFLOGSocket`` and
``install_zmq_listener`` give scapy packets. Those three are loaded on first use, so
importing this package imports neither scapy nor asyncio.
"""

from importlib import import_module as _import_module
from importlib import resources as _resources
from typing import Any as _Any

#: The version of nflogd and nflogd-client: the one source is ``nflogd_client/VERSION``.
__version__ = _resources.files(__name__).joinpath("VERSION").read_text().strip()

from .endpoints import EndpointStatus
from .filters import Filter, FilterRefused
from .subscriber import DEFAULT_ENDPOINT, Subscriber
from .wire import Batch, Packet, WireError

__all__ = [
    "AsyncSubscriber",
    "DEFAULT_ENDPOINT",
    "Batch",
    "EndpointStatus",
    "Filter",
    "FilterRefused",
    "Packet",
    "Subscriber",
    "WireError",
    "ZMQNFLOGSocket",
    "install_zmq_listener",
]

# Public names that live in modules importing scapy or asyncio: name -> module, imported on first access.
_LAZY = {
    "AsyncSubscriber": "aio",
    "ZMQNFLOGSocket": "scapy_socket",
    "install_zmq_listener": "scapy_socket",
}


def __getattr__(name: str) -> _Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
