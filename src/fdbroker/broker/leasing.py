"""Leasing: arbitration per entry (holders, a FIFO queue of waiters, fencing epochs) and the lease life cycle.

An exclusive lease excludes every other lease; shared leases exclude exclusive ones. Waiters are served strictly
in arrival order: a shared request that arrives while an exclusive one waits queues behind it, so a stream of
shared holders cannot starve an exclusive waiter.

Fencing epochs come from one broker-wide counter (:class:`EpochCounter`) seeded from the wall clock in
microseconds at start, so the epoch of an entry strictly increases with every grant, across deletes and
re-creations of the name and across broker restarts (as long as the clock does not step back by more than the
time between restarts). A downstream system keeps the highest epoch it has accepted and refuses any request
carrying a lower one: a holder that lost its lease (expired, paused, partitioned) is rejected even if it still
believes it holds it.

The life cycle (:class:`Leasing`): a lease is granted at once or queued, kept alive, and ends in exactly one
place, :meth:`Leasing.end_lease`, whatever ends it — a release or check-in, expiry, the holder's session ending,
the entry's removal, or a handover. :class:`Leasing` keeps the one record of who holds what (holders by lease
id); each entry's :attr:`LeaseTable.holders` and the per-session index are views of it that only
:meth:`Leasing._record` and :meth:`Leasing.end_lease` change.

Descriptor ownership: a grant delivers a copy of the entry's descriptor (the registry keeps its own); a check-in's
descriptor becomes the entry's (the registry owns it) or, refused, is the caller's to give to the closer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fdbroker import limits
from fdbroker.broker.access import entry_for
from fdbroker.broker.policy import Identity, Limits, Policy
from fdbroker.broker.registry import Entry, PutOptions, Registry
from fdbroker.broker.sessions import Session
from fdbroker.broker.tokens import Token
from fdbroker.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from fdbroker.names import validate_name
from fdbroker.protocol import lease_wait_reserve
from fdbroker.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    from fdbroker.broker.audit import Audit
    from fdbroker.broker.handoffs import Handoffs

EXCLUSIVE = pb.LeaseState.MODE_EXCLUSIVE
SHARED = pb.LeaseState.MODE_SHARED
OP = pb.Operation
EV = pb.Event


class EpochCounter:
    """A strictly increasing counter, seeded from the wall clock (µs) so it keeps increasing across restarts."""

    def __init__(self, seed: int | None = None) -> None:
        self._last = int(time.time() * 1_000_000) if seed is None else seed

    def next(self) -> int:
        self._last = max(self._last + 1, int(time.time() * 1_000_000))
        return self._last

    def continue_above(self, above: int) -> None:
        """Make every later epoch higher than ``above`` (still following the clock)."""
        self._last = max(self._last, above, int(time.time() * 1_000_000))


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

    def renew(self, now: float, wall: float) -> None:
        """Keep-alive: expire ``ttl`` seconds from now."""
        self.expires_at = now + self.ttl
        self.expire_time = wall + self.ttl

    @classmethod
    def handed_over(cls, e: Entry, held: pb.LeaseHolder, now: float) -> Holder:
        """A holder of a predecessor's session (no session of ours), as the predecessor described it."""
        return cls(
            lease_id=held.lease_id,
            name=e.name,
            entry_id=e.id,
            session_id="",
            identity=Identity(held.identity.pid, held.identity.uid, held.identity.gid),
            mode=pb.LeaseState.MODE_UNSPECIFIED,
            epoch=held.epoch,
            ttl=0.0,
            expires_at=now,
            expire_time=held.expire_time.ToNanoseconds() / 1e9,
        )


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

    def give_up(self, w: Waiter) -> None:
        """``w`` stops waiting: cancelled, and out of the queue now rather than when it reaches the head (a live
        waiter ahead would keep it there, and the per-uid limit counts only live requests, so queueing and giving
        up would grow the queue without bound)."""
        w.cancelled = True
        with contextlib.suppress(ValueError):
            self.waiters.remove(w)

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


def _lease_terms(req: pb.LeaseRequest) -> tuple[int, float]:
    """The mode (unset: exclusive) and TTL a lease request asks for, range-checked; then its name."""
    mode = req.mode or EXCLUSIVE
    if mode not in (EXCLUSIVE, SHARED):
        raise InvalidArgument(f"unknown lease mode {mode} for {req.name!r}", name=req.name)
    ttl = limits.duration(
        req.ttl,
        "lease ttl",
        minimum=limits.MIN_LEASE_TTL,
        maximum=limits.MAX_LEASE_TTL,
        name=req.name,
        optional=False,
    )
    validate_name(req.name)
    return mode, ttl


def holders_text(lt: LeaseTable) -> str:
    """Who holds a lease, for error messages: pid, uid, mode and epoch of each holder."""
    return ", ".join(
        f"pid {h.identity.pid} (uid {h.identity.uid}, {'exclusive' if h.mode == EXCLUSIVE else 'shared'}, "
        f"epoch {h.epoch})"
        for h in lt.holders.values()
    )


def check_lease_free(e: Entry, s: Session | None, action: str) -> None:
    """:class:`FailedPrecondition` naming the holder if another session holds an exclusive lease on ``e``."""
    lt = e.lease
    if lt is None:
        return
    h = lt.exclusive_holder()
    if h is not None and (s is None or h.session_id != s.id):
        raise FailedPrecondition(
            f"cannot {action} {e.name!r}: it is under an exclusive lease held by pid {h.identity.pid} "
            f"(uid {h.identity.uid}) until {time.strftime('%H:%M:%S', time.localtime(h.expire_time))}; "
            "wait for the release, or lease it with --wait",
            name=e.name,
        )


class LeaseQuota:
    """Per uid: leases held and lease requests queued, against the policy's ``max_leases_per_uid`` and
    ``max_lease_waiters_per_uid``. A refusal is RESOURCE_EXHAUSTED naming the limit, counted and audited like every
    quota refusal (:meth:`Audit.exhausted`)."""

    def __init__(self, limits: Callable[[], Limits], audit: Audit) -> None:
        self._limits = limits
        self._audit = audit
        self._held: collections.Counter[int] = collections.Counter()
        self._queued: collections.Counter[int] = collections.Counter()

    def held(self, uid: int, change: int) -> None:
        self._count(self._held, uid, change)

    def queued(self, uid: int, change: int) -> None:
        self._count(self._queued, uid, change)

    @staticmethod
    def _count(counts: collections.Counter[int], uid: int, change: int) -> None:
        n = counts[uid] + change
        if n > 0:
            counts[uid] = n
        else:
            del counts[uid]  # no key left behind for a uid that holds nothing

    def full(self, s: Session, name: str) -> ResourceExhausted | None:
        """The refusal (already counted) if the session's uid holds ``max_leases_per_uid`` leases, else None."""
        limit = self._limits().max_leases_per_uid
        uid = s.identity.uid
        if self._held[uid] < limit:
            return None
        err = ResourceExhausted(
            f"uid {uid} holds {self._held[uid]} leases, its limit ({limit}); cannot lease {name!r}: release some, "
            "or raise max_leases_per_uid in the policy",
            name=name,
        )
        return self._audit.exhausted(s, "lease", "max_leases_per_uid", err)

    def check(self, s: Session, name: str, *, queue: bool) -> None:
        """Raise RESOURCE_EXHAUSTED if the session's uid may not hold one more lease or (``queue``) queue one more
        request."""
        full = self.full(s, name)
        if full is not None:
            raise full
        limit = self._limits().max_lease_waiters_per_uid
        uid = s.identity.uid
        if queue and self._queued[uid] >= limit:
            err = ResourceExhausted(
                f"uid {uid} has {self._queued[uid]} lease requests queued, its limit ({limit}); cannot queue for "
                f"{name!r}: retry later, or raise max_lease_waiters_per_uid in the policy",
                name=name,
            )
            raise self._audit.exhausted(s, "lease", "max_lease_waiters_per_uid", err)


class Leasing:
    """Every lease of a broker, from grant to end.

    ``handoffs`` issues check-in tokens and delivers leased descriptors; ``policy()`` is the policy in force;
    ``wakeup()`` tells housekeeping that a new expiry may be due sooner than it thought.
    """

    def __init__(
        self,
        registry: Registry,
        handoffs: Handoffs,
        policy: Callable[[], Policy],
        audit: Audit,
        *,
        clock: Callable[[], float],
        wakeup: Callable[[], None],
    ) -> None:
        self._audit = audit
        self._registry = registry
        self._handoffs = handoffs
        self._policy = policy
        self._clock = clock
        self._wakeup = wakeup
        self.epochs = EpochCounter()  # the broker's fencing epochs (a handover continues them)
        self._quota = LeaseQuota(lambda: policy().limits, audit)
        self._holders: dict[str, Holder] = {}  # the record: lease id -> holder
        self._by_session: dict[str, dict[str, Holder]] = {}  # a view: session id -> its holders

    def __len__(self) -> int:
        return len(self._holders)

    # -- granting ------------------------------------------------------------------------------------------------

    async def lease(self, s: Session, req: pb.LeaseRequest, timeout: float | None) -> pb.LeaseResponse:
        """Grant a lease (waiting FIFO if asked) and deliver the descriptor against a LEASE token.

        ``timeout``: seconds left before the RPC deadline (None: no deadline). A waiting request stops queueing
        :func:`lease_wait_reserve` before the deadline, so DEADLINE_EXCEEDED reaches the caller as the broker's
        answer (naming the holders) and never races a grant the caller would not see.
        """
        mode, ttl = _lease_terms(req)
        e = entry_for(self._policy(), self._registry, s.identity, "lease", req.name)
        lt = e.lease
        if lt is None:
            lt = e.lease = LeaseTable()
        grantable = lt.grantable(mode)
        self._quota.check(s, req.name, queue=not grantable and req.wait)
        if grantable:
            h = self._grant(s, e, lt, mode, ttl)
        elif not req.wait:
            raise FailedPrecondition(
                f"{req.name!r} is leased by {holders_text(lt) or 'nobody, but earlier requests are queued'}; "
                "retry later, or ask with wait (--wait) to queue",
                name=req.name,
            )
        else:
            if timeout is not None:
                timeout = max(0.0, timeout - lease_wait_reserve(timeout))
            h = await self._wait(s, e, lt, mode, ttl, timeout)
        # A waiter resumes one loop step after its grant: the lease may have ended meanwhile (session closed,
        # entry removed). Never hand out a lease id that is already gone.
        e2 = self._registry.find(req.name)
        if self._holders.get(h.lease_id) is not h or e2 is None:
            self.end_lease(h, EV.REASON_RELEASED)
            raise NotFound(f"entry {req.name!r} went away as its lease was granted", name=req.name)
        handoff, item = self._handoffs.push(OP.OPERATION_LEASE, e2)
        try:
            r = pb.LeaseResponse(lease_id=h.lease_id, epoch=h.epoch, entry=e2.to_pb(), handoff=handoff)
            r.expire_time.FromNanoseconds(int(h.expire_time * 1e9))
        except BaseException:
            self.end_lease(h, EV.REASON_RELEASED)
            raise
        self._handoffs.deliver(s, [item])
        return r

    def _grant(self, s: Session, e: Entry, lt: LeaseTable, mode: int, ttl: float) -> Holder:
        """Record a grant now (synchronously, so the queue never hands one slot out twice)."""
        h = lt.grant(
            name=e.name,
            entry_id=e.id,
            session_id=s.id,
            identity=s.identity,
            mode=mode,
            ttl=ttl,
            epochs=self.epochs,
            now=self._clock(),
            wall=time.time(),
        )
        self._record(h)
        self._registry.touch(e, EV.TYPE_LEASE_GRANTED, lease_id=h.lease_id, epoch=h.epoch)
        self._audit.lease_granted(s, e, h)
        self._wakeup()
        return h

    def _record(self, h: Holder) -> None:
        """Add ``h`` (already in its entry's table) to the record and the per-session view."""
        self._holders[h.lease_id] = h
        self._by_session.setdefault(h.session_id, {})[h.lease_id] = h
        self._quota.held(h.identity.uid, +1)

    async def _wait(
        self, s: Session, e: Entry, lt: LeaseTable, mode: int, ttl: float, timeout: float | None
    ) -> Holder:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Holder] = loop.create_future()
        name = e.name

        def grant() -> None:
            # Called by LeaseTable.pump when this waiter is at the head and fits, or when the entry is removed.
            if fut.done() or w.cancelled:
                return
            cur = self._registry.find(name)
            if cur is None or cur.lease is not lt:
                fut.set_exception(
                    NotFound(f"entry {name!r} was removed while waiting for its lease", name=name)
                )
            elif s.closed:
                fut.set_exception(Unauthenticated(f"the session ended while waiting for a lease on {name!r}"))
            elif (full := self._quota.full(s, name)) is not None:
                fut.set_exception(full)  # the next in line is considered at once
            else:
                fut.set_result(self._grant(s, cur, lt, mode, ttl))

        w = Waiter(session_id=s.id, mode=mode, grant=grant)
        lt.waiters.append(w)
        e.invalidate()
        self._quota.queued(s.identity.uid, +1)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException as exc:
            lt.give_up(w)
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.end_lease(fut.result(), EV.REASON_RELEASED)  # granted as we gave up: pass it on
            lt.pump()
            cur = self._registry.find(name)
            if cur is not None:
                cur.invalidate()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"no lease on {name!r} within the deadline; held by {holders_text(lt) or 'nobody'}, "
                    f"{sum(1 for x in lt.waiters if not x.cancelled)} other request(s) queued",
                    name=name,
                ) from None
            raise
        finally:
            self._quota.queued(s.identity.uid, -1)

    # -- keeping and giving back ---------------------------------------------------------------------------------

    def keepalive(self, s: Session, lease_ids: Sequence[str]) -> pb.KeepAliveResponse:
        """Renew the session's own leases by their TTL; the others are reported gone."""
        r = pb.KeepAliveResponse()
        now = self._clock()
        wall = time.time()
        for lid in lease_ids:
            h = self._holders.get(lid)
            if h is None or h.session_id != s.id:
                r.gone.append(lid)
                continue
            h.renew(now, wall)
            e = self._registry.find(h.name)
            if e is not None:
                e.invalidate()
            rn = r.renewed.add(lease_id=lid)
            rn.expire_time.FromNanoseconds(int(h.expire_time * 1e9))
        self._wakeup()
        return r

    def release(self, s: Session, lease_id: str, return_descriptor: bool) -> pb.ReleaseResponse:
        """End a lease. With ``return_descriptor`` (check-in) the lease stays held until the descriptor arrives
        in a ``Deposit`` frame, so the next holder gets the checked-in descriptor, never the old one; if the token
        expires or the session ends first, the lease is released with the entry unchanged.

        A plain release is allowed whatever happened to the entry meanwhile (the lease belongs to the name and
        survives a replace). A check-in is refused (FAILED_PRECONDITION, nothing changed, the lease still held)
        when the entry's descriptor was replaced since the grant: the holder would overwrite a descriptor it
        never saw.
        """
        h = self._holders.get(lease_id)
        if h is None or h.session_id != s.id:
            raise NotFound(f"no lease {lease_id!r} held by this session (it may have expired)")
        r = pb.ReleaseResponse()
        if return_descriptor:
            e = self._registry.find(h.name)
            if e is None or e.id != h.entry_id:
                raise FailedPrecondition(
                    f"entry {h.name!r} was replaced since lease {lease_id[:6]}… was granted; a check-in would "
                    "overwrite a descriptor this holder never had, so nothing was changed and the lease is still "
                    "held: release without return_descriptor (or put --replace while holding the lease)",
                    name=h.name,
                )
            if h.checkin is not None:
                raise FailedPrecondition(f"lease {lease_id[:6]}… is already being checked in", name=h.name)
            tok = self._handoffs.issue(s, OP.OPERATION_CHECKIN, h.name, e.id, payload=h.lease_id)
            h.checkin = tok.token
            r.handoff.CopyFrom(self._handoffs.handoff_pb(tok))
            return r
        self.end_lease(h, EV.REASON_RELEASED)
        return r

    def checkin(self, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        """The descriptor of a check-in arrived: make it the entry's descriptor, then end the lease.

        Ownership: on success the registry owns ``fd``; on a :class:`BrokerError` it is still the caller's.
        """
        h = self._holders.get(tok.payload)
        if h is None or h.checkin != tok.token:
            raise FailedPrecondition(
                f"the lease on {tok.name!r} ended before its descriptor was checked in (expired, released or the "
                "entry was removed); the descriptor was not stored",
                name=tok.name,
            )
        try:
            old = self._registry.find(tok.name)
            if old is None or old.id != h.entry_id:
                raise FailedPrecondition(
                    f"entry {tok.name!r} was removed or replaced during the check-in; the descriptor was not "
                    "stored",
                    name=tok.name,
                )
            opts = PutOptions(labels=dict(old.labels), replace=True, ephemeral=old.ephemeral)
            if old.expires_at is not None:
                opts.ttl = max(0.001, old.expires_at - self._clock())
            self._registry.put(
                tok.name, fd, info, old.owner, old.session_id, opts, pending=self._handoffs.promised()
            )
        finally:
            self.end_lease(h, EV.REASON_RELEASED, checked_in=True)
        return self._registry.get(tok.name)

    def checkin_abandoned(self, tok: Token) -> None:
        """A check-in token left unredeemed (expired, voided): release the lease, the entry unchanged."""
        h = self._holders.get(tok.payload)
        if h is not None and h.checkin == tok.token:
            self.end_lease(h, EV.REASON_RELEASED)

    # -- ending --------------------------------------------------------------------------------------------------

    def end_lease(self, h: Holder, reason: int, *, checked_in: bool = False) -> None:
        """End one lease, for ``reason`` (a ``pb.Event.Reason``): the one place a lease ends.

        Forgets the holder everywhere, records LEASE_RELEASED with ``reason`` (when its entry still shows it),
        audits it (a check-in's own record covers ``checked_in`` ones), and grants queued requests that now fit.
        Idempotent.
        """
        if self._holders.pop(h.lease_id, None) is None:
            return
        self._quota.held(h.identity.uid, -1)
        self._audit.lease_ended(h, reason, self._registry.find(h.name), checked_in=checked_in)
        mine = self._by_session.get(h.session_id)
        if mine is not None:
            mine.pop(h.lease_id, None)
            if not mine:
                del self._by_session[h.session_id]
        e = self._registry.find(h.name)
        if e is None or e.lease is None or e.lease.holders.pop(h.lease_id, None) is None:
            return
        self._registry.touch(e, EV.TYPE_LEASE_RELEASED, reason, lease_id=h.lease_id, epoch=h.epoch)
        e.lease.pump()

    def end_session(self, s: Session) -> None:
        """The session ended: each of its leases ends (HOLDER_DIED), in name order, and queued requests move up."""
        for h in sorted(self._by_session.get(s.id, {}).values(), key=lambda h: (h.name, h.lease_id)):
            self.end_lease(h, EV.REASON_HOLDER_DIED)

    def end_entry(self, e: Entry) -> list[Waiter]:
        """``e`` is about to be removed: its leases end (ENTRY_REMOVED) with nobody queued being granted. Returns
        the queued requests; the caller calls each one's ``grant()`` once the entry is gone (they fail with
        NOT_FOUND)."""
        lt = e.lease
        if lt is None:
            return []
        waiters = list(lt.waiters)
        lt.waiters.clear()
        for h in list(lt.holders.values()):
            self.end_lease(h, EV.REASON_ENTRY_REMOVED)
        return waiters

    def end_handed_over(self, name: str, held: pb.LeaseHolder) -> None:
        """A lease a predecessor's session held (its sessions did not come along): record it, then end it
        (HANDOVER), so it ends like any other."""
        e = self._registry.find(name)
        if e is None:
            return
        if e.lease is None:
            e.lease = LeaseTable()
        h = Holder.handed_over(e, held, self._clock())
        e.lease.holders[h.lease_id] = h
        self._record(h)
        self.end_lease(h, EV.REASON_HANDOVER)

    def expire(self, now: float) -> None:
        """End every lease whose TTL has passed (EXPIRED)."""
        for h in [h for h in self._holders.values() if h.expires_at <= now]:
            self.end_lease(h, EV.REASON_EXPIRED)

    def next_expiry(self) -> float | None:
        """When the next lease expires (monotonic), or None without leases."""
        return min((h.expires_at for h in self._holders.values()), default=None)
