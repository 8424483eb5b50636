"""Lease arbitration for one entry: holders, a FIFO queue of waiters, and fencing epochs.

An exclusive lease excludes every other lease; shared leases exclude exclusive ones. Waiters are served strictly
in arrival order: a shared request that arrives while an exclusive one waits queues behind it, so a stream of
shared holders cannot starve an exclusive waiter.

Fencing epochs come from one broker-wide counter (:class:`EpochCounter`) seeded from the wall clock in
microseconds at start, so the epoch of an entry strictly increases with every grant, across deletes and
re-creations of the name and across broker restarts (as long as the clock does not step back by more than the
time between restarts). A downstream system keeps the highest epoch it has accepted and refuses any request
carrying a lower one: a holder that lost its lease (expired, paused, partitioned) is rejected even if it still
believes it holds it.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fdbroker.broker.policy import Identity
from fdbroker.v1 import broker_pb2 as pb

EXCLUSIVE = pb.LeaseState.MODE_EXCLUSIVE
SHARED = pb.LeaseState.MODE_SHARED


class EpochCounter:
    """A strictly increasing counter, seeded from the wall clock (µs) so it keeps increasing across restarts."""

    def __init__(self, seed: int | None = None) -> None:
        self._last = int(time.time() * 1_000_000) if seed is None else seed

    def next(self) -> int:
        self._last = max(self._last + 1, int(time.time() * 1_000_000))
        return self._last


@dataclass(slots=True, eq=False)
class Holder:
    lease_id: str
    name: str
    entry_id: int  # the entry (descriptor) the lease was granted on; a check-in requires it still in place
    session_id: str
    identity: Identity
    mode: int
    epoch: int
    ttl: float
    expires_at: float  # monotonic
    expire_time: float  # wall clock
    checkin: bytes | None = None  # token of a check-in in flight (Release with return_descriptor)


@dataclass(slots=True, eq=False)
class Waiter:
    session_id: str
    mode: int
    grant: Callable[[], None]  # called when the waiter reaches the head of the queue and can be granted
    cancelled: bool = False


@dataclass(eq=False)
class LeaseTable:
    """Lease state of one entry name. Lives on the entry and follows the name across replaces."""

    epoch: int = 0
    holders: dict[str, Holder] = field(default_factory=dict)
    waiters: collections.deque[Waiter] = field(default_factory=collections.deque)

    @property
    def mode(self) -> int:
        for h in self.holders.values():
            return h.mode
        return pb.LeaseState.MODE_UNSPECIFIED

    def conflicts(self, mode: int) -> bool:
        """Would a grant of ``mode`` conflict with the current holders (ignoring the queue)?"""
        if not self.holders:
            return False
        return mode == EXCLUSIVE or self.mode == EXCLUSIVE

    def grantable(self, mode: int) -> bool:
        """Can a new request of ``mode`` be granted now without jumping the queue?"""
        live = any(not w.cancelled for w in self.waiters)
        return not live and not self.conflicts(mode)

    def exclusive_holder(self) -> Holder | None:
        for h in self.holders.values():
            if h.mode == EXCLUSIVE:
                return h
        return None

    def grant(
        self,
        *,
        name: str,
        entry_id: int,
        session_id: str,
        identity: Identity,
        mode: int,
        ttl: float,
        epochs: EpochCounter,
        now: float,
        wall: float,
    ) -> Holder:
        """Record a new holder with the next epoch. The caller checked :meth:`conflicts`."""
        epoch = epochs.next()
        self.epoch = epoch
        h = Holder(
            lease_id=secrets.token_urlsafe(12),
            name=name,
            entry_id=entry_id,
            session_id=session_id,
            identity=identity,
            mode=mode,
            epoch=epoch,
            ttl=ttl,
            expires_at=now + ttl,
            expire_time=wall + ttl,
        )
        self.holders[h.lease_id] = h
        return h

    def pump(self) -> None:
        """Grant queued waiters from the head while they fit (FIFO; stops at the first that conflicts)."""
        while self.waiters:
            w = self.waiters[0]
            if w.cancelled:
                self.waiters.popleft()
                continue
            if self.conflicts(w.mode):
                return
            self.waiters.popleft()
            w.grant()

    def fill_pb(self, m: pb.LeaseState) -> None:
        m.epoch = self.epoch
        m.waiters = sum(1 for w in self.waiters if not w.cancelled)
        if not self.holders:
            return
        m.mode = self.mode  # type: ignore[assignment]
        for h in self.holders.values():
            hp = m.holders.add(lease_id=h.lease_id, epoch=h.epoch)
            hp.identity.pid, hp.identity.uid, hp.identity.gid = h.identity.pid, h.identity.uid, h.identity.gid
            hp.expire_time.FromNanoseconds(int(h.expire_time * 1e9))

    @property
    def idle(self) -> bool:
        return not self.holders and not any(not w.cancelled for w in self.waiters)
