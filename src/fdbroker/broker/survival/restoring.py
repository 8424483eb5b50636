"""Restoring one passed descriptor at start (systemd's fd store, or the keeper): the entry it was, from the
keeper's record or from ``fdstore.json`` (:mod:`.fdstore` drives it over every descriptor passed).

Ownership as :func:`~.carry.restore`: on success the registry owns the descriptor; on failure (a reason
returned) it is still the caller's.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from google.protobuf.message import DecodeError

from fdbroker import fdinfo
from fdbroker.broker.registry import Owner, Registry
from fdbroker.broker.survival import keeper
from fdbroker.broker.survival.carry import restore
from fdbroker.errors import BrokerError
from fdbroker.v1 import broker_pb2 as pb

log = logging.getLogger("fdbroker.fdstore")

HandedLease = tuple[str, pb.LeaseHolder]
"""A lease the previous broker's sessions held: the entry's name and the holder as it was described."""
EndSessions = Callable[[Sequence[HandedLease]], None]
"""Ends the previous process's sessions: releases their leases (HANDOVER), removes their ephemeral entries."""


@dataclass
class Restored:
    """What a restore found: how many entries came back, and the leases their ended sessions held."""

    entries: int = 0
    leases: list[HandedLease] = field(default_factory=list)
    revision: int = 0  # the highest revision a record carried
    epoch: int = 0  # the highest fencing epoch a record carried


class Kept(NamedTuple):
    """An entry as the keeper kept it: the message and its serialized form."""

    entry: pb.Entry
    data: bytes


def entry_of(record: keeper.Record, name: str) -> Kept | None:
    """The entry a keeper record carries, if it decodes and names the same entry."""
    data = keeper.decode_meta(record.meta)
    if not data:
        return None
    try:
        m = pb.Entry.FromString(data)
    except DecodeError:
        log.warning("fd store: the keeper's metadata for %r does not decode; using fdstore.json", name)
        return None
    return Kept(m, data) if m.name == name else None


def kept(registry: Registry, fd: int, k: Kept, now: float, out: Restored) -> str:
    """Restore ``fd`` as the entry the keeper kept beside it, as it was (like a takeover: the description is not
    read again, it is the same descriptor); record its lease holders in ``out``. "" or why not."""
    # 19,900 of these run before the broker serves: each field is read once (a upb read builds an object).
    m = k.entry
    lease = m.lease
    holders = lease.holders
    expires_in = expire_time = None
    if m.HasField("expire_time"):
        expire_time = _seconds(m.expire_time)
        if expire_time <= now:
            return "its TTL ran out while the broker was down"
        expires_in = expire_time - now
    owner = m.owner
    labels = m.labels
    ephemeral = m.ephemeral
    try:
        info = m.info if m.HasField("info") else fdinfo.describe(fd)
        restore(
            registry,
            m.name,
            fd,
            info,
            Owner(owner.pid, owner.uid, owner.gid),
            labels={key: labels[key] for key in labels} if len(labels) else None,
            create_time=_seconds(m.create_time),
            create_revision=m.create_revision,
            revision=m.revision,
            expires_in=expires_in,
            expire_time=expire_time,
            ephemeral=ephemeral,
            session_id="keeper" if ephemeral else "",
            lease_epoch=lease.epoch,
            # Unchanged by the restore unless a lease was held or awaited (those do not come along).
            entry_bytes=k.data if not holders and not lease.waiters else None,
        )
    except OSError as err:
        return f"cannot inspect it ({err})"
    except BrokerError as err:
        return err.message
    if m.revision > out.revision:
        out.revision = m.revision
    if lease.epoch > out.epoch:
        out.epoch = lease.epoch
    for h in holders:
        out.leases.append((m.name, h))
        out.epoch = max(out.epoch, h.epoch)
    return ""


def _seconds(t: Any) -> float:
    """A ``Timestamp`` in seconds (what ``ToNanoseconds() / 1e9`` gives, for less)."""
    return float(t.seconds * 1_000_000_000 + t.nanos) / 1e9


def saved(
    registry: Registry, fd: int, name: str, rec: Any, me: Owner, now: float
) -> tuple[str, tuple[int, int] | None]:
    """Restore ``fd`` with its ``fdstore.json`` record ``rec``, used only if it describes the same open file
    (``st_dev``/``st_ino``); without one the entry gets ``me`` as owner, no labels, no expiry. Returns "" or why
    not, and the file's identity (to record when the entry is stored)."""
    try:
        info = fdinfo.describe(fd)
        st = os.fstat(fd)
    except OSError as err:
        return f"cannot inspect it ({err})", None
    ino = (st.st_dev, st.st_ino)
    kw: dict[str, Any] = {}
    owner = me
    if isinstance(rec, dict) and rec.get("ino") is not None and tuple(rec["ino"]) == ino:
        try:
            pid, uid, gid = (int(x) for x in rec["owner"])
            owner = Owner(pid, uid, gid)
            expire_time = rec.get("expire_time")
            if expire_time is not None:
                expire_time = float(expire_time)
                if expire_time <= now:
                    return "its TTL ran out while the broker was down", None
                kw["expires_in"] = expire_time - now
                kw["expire_time"] = expire_time
            kw["labels"] = {str(k): str(v) for k, v in dict(rec.get("labels") or {}).items()}
            kw["create_time"] = float(rec["create_time"])
            kw["create_revision"] = int(rec["create_revision"])
            kw["revision"] = int(rec["revision"])
        except (KeyError, TypeError, ValueError) as err:
            log.warning("fd store: bad record for %r (%s); restoring it with default metadata", name, err)
            owner, kw = me, {}
    else:
        log.info("fd store: no metadata for %r; restored with the broker's identity as owner", name)
    try:
        restore(registry, name, fd, info, owner, **kw)
    except BrokerError as err:
        return err.message, None
    return "", ino
