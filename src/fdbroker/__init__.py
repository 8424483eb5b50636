"""fdbroker: a local broker that holds open file descriptors under names and hands them to allowed processes.

``fdbroker.Client`` is the blocking client, ``fdbroker.aio.Client`` the asyncio one, ``fdbroker.conduit`` the
SCM_RIGHTS library on its own. Importing ``fdbroker`` itself is cheap: the client (and gRPC) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fdbroker.client import Client, Entry, Event, Info, OwnedFd
    from fdbroker.errors import BrokerError

__all__ = ["BrokerError", "Client", "Entry", "Event", "Info", "OwnedFd", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Client", "Entry", "Event", "Info", "OwnedFd"):
        from fdbroker import client

        return getattr(client, name)
    if name == "BrokerError":
        from fdbroker.errors import BrokerError

        return BrokerError
    raise AttributeError(f"module 'fdbroker' has no attribute {name!r}")
