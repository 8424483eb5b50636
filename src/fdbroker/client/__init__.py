"""The fdbroker client library: :class:`Client` (blocking) and, in :mod:`fdbroker.aio`, the asyncio client.

Submodules load on first use: :mod:`fdbroker.client.core` and :mod:`fdbroker.client.quick` need no gRPC, so a
command that only lists pays for neither gRPC nor asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fdbroker.client.core import Entry, Event, Info, Lease, OwnedFd
    from fdbroker.client.sync import Client, LeaseHandle, Listing, Watch

__all__ = ["Client", "Entry", "Event", "Info", "Lease", "LeaseHandle", "Listing", "OwnedFd", "Watch"]

_WHERE = {
    "Entry": "core",
    "Event": "core",
    "Info": "core",
    "Lease": "core",
    "OwnedFd": "core",
    "Client": "sync",
    "LeaseHandle": "sync",
    "Listing": "sync",
    "Watch": "sync",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'fdbroker.client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"fdbroker.client.{mod}"), name)
