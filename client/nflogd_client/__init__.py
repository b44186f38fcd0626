"""Client library for the nflogd feed."""

from .wire import Batch, Packet, WireError

__all__ = ["Batch", "Packet", "WireError"]
