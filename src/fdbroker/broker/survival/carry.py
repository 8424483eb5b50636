"""What a handover and a restart share: carrying an entry over from a previous broker process, and the handover
protocol's limits and error (the protocol itself is described in :mod:`fdbroker.broker.survival`)."""

from __future__ import annotations

import os
from collections.abc import Callable

from fdbroker.broker.leasing import LeaseTable
from fdbroker.broker.registry import Entry, Owner, Registry
from fdbroker.broker.rundir import HANDOVER_SOCKET
from fdbroker.errors import BrokerError, Code
from fdbroker.v1 import broker_pb2 as pb

__all__ = [
    "DEFAULT_TIMEOUT",
    "HANDOVER_SOCKET",
    "MAX_FRAME_BYTES",
    "MAX_RESTORED_TTL",
    "HandoverError",
    "Progress",
    "allowed",
    "restore",
]

MAX_FRAME_BYTES = 32 * 1024 * 1024  # 253 entries with 32 labels of 318 bytes each fit comfortably
DEFAULT_TIMEOUT = 30.0

Progress = Callable[[int, int], None]
"""Called by the receiving side with (entries installed so far, entries in all)."""


class HandoverError(BrokerError):
    """A handover could not be done; the old broker (if any) goes on serving with every entry."""

    code = Code.FAILED_PRECONDITION


def allowed(uid: int) -> bool:
    """May a peer of ``uid`` take part in a handover with this process? Only our own uid, or root."""
    return uid == os.geteuid() or uid == 0


# A restored expiry is clamped like a requested one (a corrupt fd-store record must not make an entry unencodable).
MAX_RESTORED_TTL = 366 * 24 * 3600.0


def restore(
    registry: Registry,
    name: str,
    fd: int,
    info: pb.DescriptorInfo,
    owner: Owner,
    *,
    labels: dict[str, str] | None = None,
    create_time: float | None = None,
    create_revision: int = 0,
    revision: int = 0,
    expires_in: float | None = None,
    expire_time: float | None = None,
    ephemeral: bool = False,
    session_id: str = "",
    lease_epoch: int = 0,
    entry_bytes: bytes | None = None,
) -> Entry:
    """Install an entry carried over from a previous broker process (handover or fd store), as it was.

    No event and no new revision: the entry keeps ``revision``/``create_revision`` (0: the current revision),
    and the registry's counter is raised to at least ``revision``. ``expires_in``: seconds left (None: never);
    ``expire_time``: its wall-clock form (default now + ``expires_in``). ``lease_epoch``: the last fencing
    epoch granted on the name (holders do not survive). ``entry_bytes``: the entry's serialized ``pb.Entry`` as
    the previous process had it, when the restore changes nothing in it (saves building it again). Ownership as
    :meth:`Registry.install`: on success the registry owns ``fd``; on any :class:`BrokerError` it is still the
    caller's.
    """
    now_wall = registry.wall()
    floor = max(registry.revision, revision, create_revision)
    entry = Entry(
        id=0,  # assigned by the registry
        name=name,
        fd=fd,
        info_bytes=info.SerializeToString(),
        owner=owner,
        session_id=session_id,
        labels=dict(labels or {}),
        create_time=now_wall if create_time is None else create_time,
        create_revision=create_revision or floor,
        revision=revision or floor,
        ephemeral=ephemeral,
    )
    if expires_in is not None:
        left = min(max(0.0, expires_in), MAX_RESTORED_TTL)
        entry.expires_at = registry.clock() + left
        entry.expire_time = now_wall + left if expire_time is None else expire_time
    if lease_epoch:
        entry.lease = LeaseTable(epoch=lease_epoch)
    if entry_bytes is not None:
        entry.keep_form(entry_bytes)
    registry.install([entry])
    return entry
