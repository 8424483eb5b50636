"""``fdbroker.aio``: the asyncio client. ``fdbroker.aio.Client`` has the verbs, results, errors and descriptor
ownership of :class:`fdbroker.Client`; see :mod:`fdbroker.client.aio`."""

from fdbroker.client.aio import Client, LeaseHandle, PendingLease, Watch
from fdbroker.client.models import Entry, Event, Info, Lease, Listing, OwnedFd

__all__ = [
    "Client",
    "Entry",
    "Event",
    "Info",
    "Lease",
    "LeaseHandle",
    "Listing",
    "OwnedFd",
    "PendingLease",
    "Watch",
]
