"""Watch streams: registry events fanned out to watchers at a cost to the writer that does not grow with them.

Watchers read the registry's own event history (there is no queue per watcher): each keeps a cursor, the last
revision it examined, and scans forward from it. The writer's share of a change is one call per *group* of
watchers — watchers with the same prefix and the same visibility (anonymous, or one uid/gid) — to decide once
whether the event is for them, count it and wake them if they wait. A watcher that does not read (its gRPC
stream is full) costs the writer nothing and holds no events; encoding happens on the watcher's own turn, from a
shared cache of decoded events.

When many streams are open, a group is woken at most once per *linger* (0 for a handful of watchers, growing
with their number to at most :data:`MAX_LINGER`): every member then sends one message carrying everything that
happened meanwhile, encoded once for all members at the same position. Fan-out costs the writer a bounded share
of the loop however many watchers there are, and a watcher's latency grows by at most the linger.

A watcher more than ``queue_limit`` of its events behind (it is not reading, or reads slower than events come)
is cut off with RESOURCE_EXHAUSTED naming the revision to resume from, as is one whose cursor fell out of the
history window. Watch streams are capped per uid and, for anonymous callers (whom gRPC cannot tell apart), in
total: ``max_watchers_per_uid`` and ``max_anonymous_watchers`` in the policy's limits.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from fdbroker import limits
from fdbroker.broker.audit import Audit
from fdbroker.broker.history import Record, event_of
from fdbroker.broker.policy import Identity, Policy
from fdbroker.broker.registry import Registry
from fdbroker.errors import ResourceExhausted
from fdbroker.v1 import broker_pb2 as pb

BATCH = 256  # events per WatchResponse
_CACHE = 4096  # decoded events and visibility decisions kept, by revision
LINGER_PER_WATCHER = 0.000_5  # seconds of wake-up delay per open watch stream beyond FREE_WATCHERS
FREE_WATCHERS = 8
MAX_LINGER = 0.1

VisKey = tuple[int, int] | None  # (uid, gid) of the watcher, None when anonymous


@dataclass(eq=False)
class _Group:
    prefix: str
    identity: Identity | None  # a representative: every member decides visibility the same way
    seq: int = 0  # events for this group since it was created
    members: int = 0
    waiter: asyncio.Future[int] | None = None
    wake_at: int = 0  # first revision of a scheduled (lingering) wake-up; 0: none scheduled
    # The last batch a member encoded: (cursor before, broker revision then, cursor after, counted, events,
    # bytes). Members at the same cursor before anything changed get the same bytes.
    shared: tuple[int, int, int, int, int, bytes] | None = None


@dataclass(eq=False)
class Watcher:
    """One watch stream's position. Use it from the stream's own task only."""

    hub: WatchHub
    group: _Group
    key: tuple[str, VisKey]
    uid: int | None  # None: anonymous
    header: int  # the header revision: events after it follow
    cursor: int  # last revision examined
    seen: int  # group.seq consumed
    joined: int  # events at revisions <= this are not counted in group.seq (the backlog)
    closed: bool = field(default=False)

    def read(self) -> list[pb.Event]:
        """The next events for this watcher (at most :data:`BATCH`), advancing its cursor; [] when it has read
        everything so far. :class:`ResourceExhausted` when it was cut off (the message says where to resume)."""
        return self.hub._read(self)

    def read_encoded(self) -> bytes | None:
        """:meth:`read` as a serialized ``WatchResponse`` (shared with group members at the same position);
        None when there is nothing new."""
        return self.hub._read_encoded(self)

    async def wait(self) -> None:
        """Until something may be there for :meth:`read`."""
        await self.hub._wait(self)

    def close(self) -> None:
        """The stream ended: leave the group and free the quota. Idempotent."""
        self.hub._close(self)


class WatchHub:
    """The watchers of one registry."""

    def __init__(
        self, registry: Registry, policy: Callable[[], Policy], audit: Audit, *, queue_limit: int
    ) -> None:
        self._audit = audit
        self._metrics = audit.metrics
        self.registry = registry
        self._policy = policy
        self.queue_limit = queue_limit
        self._groups: dict[tuple[str, VisKey], _Group] = {}
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._anonymous = 0
        self._events: collections.OrderedDict[int, pb.Event] = collections.OrderedDict()
        self._decided: collections.OrderedDict[tuple[int, VisKey], bool] = collections.OrderedDict()
        self._decided_for: Policy | None = None
        registry.history.on_record = self._on_record

    def __len__(self) -> int:
        return self._anonymous + sum(self._per_uid.values())

    # -- opening and closing -------------------------------------------------------------------------------------

    def open(self, identity: Identity | None, prefix: str, start_revision: int) -> Watcher:
        """A watcher of ``prefix`` for ``identity`` from ``start_revision`` (0: from now).

        Raises PERMISSION_DENIED/UNAUTHENTICATED (policy), INVALID_ARGUMENT (a start in the future),
        OUT_OF_RANGE (a start before the history window), RESOURCE_EXHAUSTED (watch quota).
        """
        policy = self._policy()
        policy.check(identity, "watch")
        reg = self.registry
        limits.start_revision(start_revision, reg.revision)
        if start_revision:
            reg.history.check(start_revision)
        lim = policy.limits
        if identity is None:
            if self._anonymous >= lim.max_anonymous_watchers:
                err = ResourceExhausted(
                    f"{self._anonymous} anonymous watch streams are open, the limit "
                    f"(max_anonymous_watchers); watch with a session (connect the conduit) or try later"
                )
                raise self._audit.exhausted(None, "watch", "max_anonymous_watchers", err)
            self._anonymous += 1
            vis: VisKey = None
        else:
            if self._per_uid[identity.uid] >= lim.max_watchers_per_uid:
                err = ResourceExhausted(
                    f"uid {identity.uid} has {self._per_uid[identity.uid]} watch streams open, its limit "
                    "(max_watchers_per_uid); close some or raise the limit in the policy"
                )
                raise self._audit.exhausted(identity, "watch", "max_watchers_per_uid", err)
            self._per_uid[identity.uid] += 1
            vis = (identity.uid, identity.gid)
        key = (prefix, vis)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(prefix, identity)
        group.members += 1
        header = start_revision - 1 if start_revision else reg.revision
        return Watcher(
            hub=self,
            group=group,
            key=key,
            uid=None if identity is None else identity.uid,
            header=header,
            cursor=header,
            seen=group.seq,
            joined=reg.revision,
        )

    def _close(self, w: Watcher) -> None:
        if w.closed:
            return
        w.closed = True
        if w.uid is None:
            self._anonymous -= 1
        else:
            self._per_uid[w.uid] -= 1
            if not self._per_uid[w.uid]:
                del self._per_uid[w.uid]
        g = w.group
        g.members -= 1
        if not g.members:
            if g.waiter is not None and not g.waiter.done():
                g.waiter.cancel()
            del self._groups[w.key]

    # -- the writer's side ---------------------------------------------------------------------------------------

    def _on_record(self, rec: Record) -> None:
        """Called by the registry for every event: count it for the groups it is for and wake their waiters."""
        if not self._groups:
            return
        name, rev = rec[2], rec[1]
        for (prefix, vis), g in self._groups.items():
            if not name.startswith(prefix) or not self._visible(rec, vis, g.identity):
                continue
            g.seq += 1
            if g.waiter is None or g.wake_at:
                continue
            linger = self._linger()
            if linger:
                g.wake_at = rev
                asyncio.get_running_loop().call_later(linger, self._wake, g)
            else:
                g.wake_at = rev
                self._wake(g)

    def _linger(self) -> float:
        extra = len(self) - FREE_WATCHERS
        return 0.0 if extra <= 0 else min(MAX_LINGER, extra * LINGER_PER_WATCHER)

    @staticmethod
    def _wake(g: _Group) -> None:
        fut, rev = g.waiter, g.wake_at
        g.waiter, g.wake_at = None, 0
        if fut is not None and not fut.done():
            fut.set_result(rev)

    def _visible(self, rec: Record, vis: VisKey, identity: Identity | None) -> bool:
        """The policy's decision for one event and one identity, made once and shared."""
        policy = self._policy()
        if policy is not self._decided_for:  # reloaded: earlier decisions may no longer hold
            self._decided.clear()
            self._decided_for = policy
        k = (rec[1], vis)
        d = self._decided.get(k)
        if d is None:
            d = self._decided[k] = policy.allows(identity, "watch", rec[2], rec[8])
            if len(self._decided) > _CACHE:
                self._decided.popitem(last=False)
        return d

    # -- the watcher's side --------------------------------------------------------------------------------------

    def _read(self, w: Watcher) -> list[pb.Event]:
        reg = self.registry
        behind = w.group.seq - w.seen
        if behind > self.queue_limit or (
            w.cursor < reg.revision and w.cursor + 1 < reg.history.oldest_revision
        ):
            self._metrics.watch_cutoffs.inc()
            raise ResourceExhausted(
                f"watcher fell more than {self.queue_limit} events behind and was cut off; "
                f"resume with start_revision={w.cursor + 1}"
            )
        out: list[pb.Event] = []
        if w.cursor >= reg.revision:
            return out
        prefix, vis = w.key
        ident = w.group.identity
        cursor, counted = w.cursor, 0
        for rec in reg.history.after(w.cursor):
            rev = rec[1]
            if len(out) >= BATCH:
                break
            cursor = rev
            if rec[2].startswith(prefix) and self._visible(rec, vis, ident):
                out.append(self._event(rec))
                if rev > w.joined:
                    counted += 1
        else:
            cursor = max(
                cursor, reg.revision
            )  # revisions without events (a takeover's jump) are examined too
        w.cursor = cursor
        w.seen += counted
        return out

    def _read_encoded(self, w: Watcher) -> bytes | None:
        g, rev = w.group, self.registry.revision
        shared = g.shared
        if (
            shared is not None
            and shared[0] == w.cursor
            and shared[1] == rev
            and g.seq - w.seen <= self.queue_limit
        ):
            _, _, w.cursor, counted, n, data = shared
            w.seen += counted
            self._metrics.watch_events.inc(n=n)
            return data
        before, seen = w.cursor, w.seen
        events = self._read(w)
        if not events:
            return None
        resp = pb.WatchResponse(events=events)
        resp.header.revision = rev
        data = resp.SerializeToString()
        g.shared = (before, rev, w.cursor, w.seen - seen, len(events), data)
        self._metrics.watch_events.inc(n=len(events))
        return data

    async def _wait(self, w: Watcher) -> None:
        if w.cursor < self.registry.revision:
            return
        g = w.group
        if g.waiter is None or g.waiter.done():
            g.waiter = asyncio.get_running_loop().create_future()
        rev = await asyncio.shield(g.waiter)
        # Every event between our cursor and the one that woke the group was for another group.
        w.cursor = max(w.cursor, rev - 1)

    def _event(self, rec: Record) -> pb.Event:
        """The decoded event of a record, shared by every watcher (they must not modify it)."""
        rev = rec[1]
        ev = self._events.get(rev)
        if ev is None:
            ev = self._events[rev] = event_of(rec)
            if len(self._events) > _CACHE:
                self._events.popitem(last=False)
        return ev
