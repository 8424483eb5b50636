"""The fdbroker client library: :class:`Client` (blocking) and, in :mod:`fdbroker.aio`, the asyncio client.

Both are drivers of one core: the result types (:mod:`~fdbroker.client.models`), each verb's protocol written
once without I/O (:mod:`~fdbroker.client.flows`, as steps of :mod:`~fdbroker.client.steps`), the session's
mailbox (:mod:`~fdbroker.client.session`), prefetched tokens (:mod:`~fdbroker.client.prefetch`) and the trust
checks (:mod:`~fdbroker.client.trust`); :mod:`~fdbroker.client.raw` is the public low-level seam and
:mod:`~fdbroker.client.quick` the gRPC-free read-only path. See docs/client.md.

Submodules load on first use: :mod:`fdbroker.client.quick` needs no gRPC, so a command that only lists pays for
neither gRPC nor asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fdbroker.client.models import Entry, Event, Info, Lease, Listing, OwnedFd
    from fdbroker.client.raw import Raw
    from fdbroker.client.sync import Client, LeaseHandle, Watch

__all__ = ["Client", "Entry", "Event", "Info", "Lease", "LeaseHandle", "Listing", "OwnedFd", "Raw", "Watch"]

_WHERE = {
    "Entry": "models",
    "Event": "models",
    "Info": "models",
    "Lease": "models",
    "Listing": "models",
    "OwnedFd": "models",
    "Raw": "raw",
    "Client": "sync",
    "LeaseHandle": "sync",
    "Watch": "sync",
}


def __getattr__(name: str) -> Any:
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'fdbroker.client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"fdbroker.client.{mod}"), name)
