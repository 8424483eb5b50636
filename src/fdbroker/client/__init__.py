"""The fdbroker client library: :class:`Client` (blocking) and, in :mod:`fdbroker.aio`, the asyncio client."""

from fdbroker.client.core import Entry, Event, Info, Lease, OwnedFd
from fdbroker.client.sync import Client, LeaseHandle, Listing, Watch

__all__ = ["Client", "Entry", "Event", "Info", "Lease", "LeaseHandle", "Listing", "OwnedFd", "Watch"]
