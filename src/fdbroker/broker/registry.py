"""The named registry: held descriptors, the revision counter and the event history.

Pure bookkeeping, no gRPC and no sockets: the broker's event loop is its only caller, so nothing here locks.
The registry owns the descriptor of every entry it holds and gives it up when the entry leaves (delete, replace,
expiry, completed take, session end) to its ``discard`` function (the broker's closer thread: a held descriptor
came from a client, and its last close may block); callers never close an entry's ``fd`` themselves.

Every step that can fail (building the entry's serialized forms) runs before the registry takes a descriptor, so
once it owns one no error path can close it behind its back.

Every change gets the next revision of one broker-wide counter, and is recorded as an event in the bounded
history window (:mod:`.history`), so a client can list at revision R and watch from R + 1 with nothing missed and
nothing repeated.
"""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from fdbroker.broker import closer
from fdbroker.broker.delivery import item_tail
from fdbroker.broker.history import History
from fdbroker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from fdbroker.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    from fdbroker.broker.leasing import LeaseTable


class Owner(NamedTuple):
    """Kernel-verified identity of a depositor."""

    pid: int
    uid: int
    gid: int


@dataclass(slots=True, eq=False)
class Entry:
    """One held descriptor. ``fd`` belongs to the registry.

    Memory matters here (the broker holds up to RLIMIT_NOFILE of these): a upb message costs 0.6-1.7 KiB of
    arena, its serialized form ~100 bytes, so an entry keeps its description and its protobuf form as bytes and
    builds messages only when asked.
    """

    id: int
    name: str
    fd: int
    info_bytes: bytes  # a serialized pb.DescriptorInfo
    owner: Owner
    session_id: str
    labels: dict[str, str]
    create_time: float  # wall clock
    create_revision: int
    revision: int
    expires_at: float | None = None  # monotonic
    expire_time: float | None = None  # wall clock, for display
    ephemeral: bool = False
    taking: bytes | None = None  # token of a take in flight
    lease: LeaseTable | None = None
    _bytes: bytes | None = field(default=None, repr=False)
    _tail: bytes | None = field(default=None, repr=False)
    # The entry in the prefetch table (fastpath): its slot there (-1: none yet), the table, and whether the table
    # has the current tail (it must not once anything changes; :meth:`invalidate` withdraws it).
    slot: int = field(default=-1, repr=False)
    slots: Any = field(default=None, repr=False)
    tail_shown: bool = field(default=False, repr=False)

    @property
    def info(self) -> pb.DescriptorInfo:
        """What the broker read from the descriptor (a new message each call)."""
        return pb.DescriptorInfo.FromString(self.info_bytes)

    @property
    def kind(self) -> int:
        """The descriptor's ``Kind`` (see :func:`info_kind`)."""
        return info_kind(self.info_bytes)

    def invalidate(self) -> None:
        """Drop the cached serialized forms (after any change that shows in them), and withdraw the tail from the
        prefetch table: until it is shown again its tokens are redeemed in Python, which checks the lease."""
        self._bytes = None
        self._tail = None
        if self.tail_shown:
            self.tail_shown = False
            self.slots.slot_tail(self.slot, None)

    def keep_form(self, data: bytes) -> None:
        """Take ``data``, this entry's ``pb.Entry`` as a previous broker process serialized it, as its cached form
        (a handover: not encoded again). Before the entry is installed only. Its ``DeliverItem`` tail is then
        built at the first delivery, not at install: from a ``str``, a revision and bytes, that cannot fail."""
        self._bytes = data

    def deliver_tail(self) -> bytes:
        """The entry's part of a serialized ``DeliverItem`` (see :mod:`fdbroker.broker.delivery`), cached."""
        tail = self._tail
        if tail is None:
            tail = self._tail = item_tail(self.name, self.info_bytes, self.revision)
        return tail

    def pb_bytes(self) -> bytes:
        """The serialized ``pb.Entry``, cached until the entry changes."""
        cached = self._bytes
        if cached is not None:
            return cached
        m = pb.Entry(
            name=self.name,
            owner=pb.Identity(pid=self.owner.pid, uid=self.owner.uid, gid=self.owner.gid),
            labels=self.labels,
            revision=self.revision,
            create_revision=self.create_revision,
            ephemeral=self.ephemeral,
        )
        m.info.MergeFromString(self.info_bytes)
        m.create_time.FromNanoseconds(int(self.create_time * 1e9))
        if self.expire_time is not None:
            m.expire_time.FromNanoseconds(int(self.expire_time * 1e9))
        if self.lease is not None:
            self.lease.fill_pb(m.lease)
        data = self._bytes = m.SerializeToString()
        return data

    def to_pb(self) -> pb.Entry:
        """The protobuf form (a new message; the caller may keep or change it)."""
        return pb.Entry.FromString(self.pb_bytes())


@dataclass(slots=True)
class PutOptions:
    """What a depositor asked for, checked at RPC time and again when the descriptor arrives."""

    labels: dict[str, str] = field(default_factory=dict)
    ttl: float = 0.0
    ephemeral: bool = False
    replace: bool = False
    if_revision: int = 0


Discard = Callable[[int, int], None]
"""Gives up a descriptor the registry no longer holds: ``discard(fd, owner_uid)`` (never blocks)."""


class Registry:
    """Entries by name, in name order, with revisions and an event history.

    ``capacity`` bounds the number of held descriptors (the broker's RLIMIT_NOFILE less its reserve);
    ``history`` bounds the event window a watch can start from.
    """

    def __init__(
        self,
        *,
        capacity: int,
        history: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        discard: Discard = closer.discard,
    ) -> None:
        self.capacity = capacity
        self._discard = discard
        self.clock = clock  # monotonic: expiries
        self.wall = wall  # wall clock: times shown
        self._entries: dict[str, Entry] = {}
        self._names: list[str] = []  # sorted
        self._next_id = 1
        self.revision = 0
        #: Every change, in a bounded window (watchers read it; survival subscribes to it).
        self.history = History(history)
        self._per_uid: collections.Counter[int] = collections.Counter()
        self._expiring: dict[str, float] = {}

    # -- reading -------------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries.values())

    def get(self, name: str) -> Entry:
        """The entry called ``name``; :class:`NotFound` if there is none."""
        e = self._entries.get(name)
        if e is None:
            raise NotFound(f"no entry named {name!r}; see `fdbroker ls` for what is held", name=name)
        return e

    def find(self, name: str) -> Entry | None:
        return self._entries.get(name)

    def count_for_uid(self, uid: int) -> int:
        return self._per_uid[uid]

    def page(
        self,
        prefix: str = "",
        *,
        after: str = "",
        limit: int = 1000,
        match: Callable[[Entry], bool] | None = None,
    ) -> tuple[list[Entry], str]:
        """Entries whose name starts with ``prefix`` and sorts after ``after``, at most ``limit``, in name order.

        Returns the entries and the name to continue after ("" when this is the last page).
        """
        names = self._names
        start = bisect.bisect_right(names, after) if after else bisect.bisect_left(names, prefix)
        if after and after < prefix:
            start = bisect.bisect_left(names, prefix)
        out: list[Entry] = []
        entries = self._entries
        i = start
        n = len(names)
        while i < n:
            name = names[i]
            if not name.startswith(prefix):
                break
            e = entries[name]
            i += 1
            if match is None or match(e):
                out.append(e)
                if len(out) >= limit:
                    # Is there anything more? Only then hand out a continuation.
                    while i < n and names[i].startswith(prefix):
                        if match is None or match(entries[names[i]]):
                            return out, name
                        i += 1
                    return out, ""
        return out, ""

    def in_order(self) -> list[Entry]:
        """Every entry, in name order."""
        return list(map(self._entries.__getitem__, self._names))

    # -- changing ------------------------------------------------------------------------------------------------

    def check_put(self, name: str, uid: int, opts: PutOptions, *, pending: int = 0) -> Entry | None:
        """Raise the error a put of ``name`` would meet now; return the entry it would replace, if any.

        ``pending`` counts descriptors already promised (put tokens outstanding) against the capacity.
        """
        old = self._entries.get(name)
        if old is not None:
            if opts.if_revision and old.revision != opts.if_revision:
                raise FailedPrecondition(
                    f"entry {name!r} is at revision {old.revision}, not {opts.if_revision}; "
                    "stat it again and retry with the current revision",
                    name=name,
                )
            if not (opts.replace or opts.if_revision):
                raise AlreadyExists(
                    f"entry {name!r} already exists (revision {old.revision}); "
                    "put with --replace to swap its descriptor, or delete it first",
                    name=name,
                )
            if old.taking is not None:
                raise FailedPrecondition(
                    f"entry {name!r} is being taken; retry when the take is done", name=name
                )
        elif opts.if_revision:
            raise FailedPrecondition(
                f"entry {name!r} does not exist, so it cannot be at revision {opts.if_revision}", name=name
            )
        if old is None and len(self._entries) + pending >= self.capacity:
            raise ResourceExhausted(
                f"the broker holds {len(self._entries)} descriptors, its limit ({self.capacity}); "
                f"cannot store {name!r}: delete entries or raise the broker's RLIMIT_NOFILE",
                name=name,
            )
        if opts.ttl < 0:
            raise InvalidArgument(f"ttl for {name!r} must not be negative", name=name)
        return old

    def put(
        self,
        name: str,
        fd: int,
        info: pb.DescriptorInfo,
        owner: Owner,
        session_id: str,
        opts: PutOptions,
        *,
        pending: int = 0,
    ) -> Entry:
        """Store ``fd`` under ``name`` and return the entry.

        Ownership: on success the registry owns ``fd`` (and closes a replaced entry's descriptor); on failure
        (any :class:`BrokerError` from :meth:`check_put`) ``fd`` is untouched and still the caller's.
        """
        old = self.check_put(name, owner.uid, opts, pending=pending)
        now_wall = self.wall()
        revision = self.revision + 1
        entry = Entry(
            id=self._next_id,
            name=name,
            fd=fd,
            info_bytes=info.SerializeToString(),
            owner=owner,
            session_id=session_id,
            labels=dict(opts.labels),
            create_time=now_wall,
            create_revision=revision if old is None else old.create_revision,
            revision=revision,
            ephemeral=opts.ephemeral,
        )
        if opts.ttl > 0:
            entry.expires_at = self.clock() + opts.ttl
            entry.expire_time = now_wall + opts.ttl
        if old is not None:
            # The lease state (epoch, holders) belongs to the name, not the descriptor: a replaced entry keeps it.
            entry.lease = old.lease
        _prepare(entry)  # may raise: nothing has changed yet and ``fd`` is still the caller's
        # From here on nothing raises: the registry owns ``fd``.
        self.revision = revision
        self._hold(entry, old)
        self._emit(pb.Event.TYPE_PUT, entry)
        return entry

    def remove(self, name: str, *, event: int = pb.Event.TYPE_DELETE, reason: int = 0) -> Entry:
        """Remove ``name``, close its descriptor, record the event; return the removed entry."""
        entry = self._entries.pop(name)
        i = bisect.bisect_left(self._names, name)
        del self._names[i]
        self._expiring.pop(name, None)
        self.revision += 1
        entry.revision = self.revision
        entry.invalidate()
        self._let_go(entry)
        self._emit(event, entry, reason)
        return entry

    def touch(self, entry: Entry, event: int, reason: int = 0, *, lease_id: str = "", epoch: int = 0) -> int:
        """Record a change to ``entry`` that is not a put or delete (lease grant or release)."""
        self.revision += 1
        entry.revision = self.revision
        entry.invalidate()
        self._emit(event, entry, reason, lease_id=lease_id, epoch=epoch)
        return self.revision

    def due(self, now: float | None = None) -> list[Entry]:
        """Entries whose TTL has passed and that are not being taken, in name order (the caller removes them
        with event EXPIRE, after ending their leases)."""
        if not self._expiring:
            return []
        now = self.clock() if now is None else now
        out = []
        for name in sorted(n for n, t in self._expiring.items() if t <= now):
            e = self._entries.get(name)
            if e is not None and e.taking is None:
                out.append(e)
        return out

    def next_expiry(self) -> float | None:
        return min(self._expiring.values()) if self._expiring else None

    def close_all(self) -> None:
        """Give up every held descriptor (broker shutdown). No events."""
        for e in self._entries.values():
            _unslot(e)
            self._discard(e.fd, e.owner.uid)
            e.fd = -1
        self._entries.clear()
        self._names.clear()
        self._expiring.clear()
        self._per_uid.clear()

    # -- events ------------------------------------------------------------------------------------------------

    def raise_revision(self, revision: int) -> None:
        """Continue from at least ``revision`` (a successor or a restart); earlier revisions cannot be watched."""
        self.revision = max(self.revision, revision)
        self.history.raise_floor(self.revision)

    def _emit(
        self, event_type: int, entry: Entry, reason: int = 0, *, lease_id: str = "", epoch: int = 0
    ) -> None:
        wall_ns = int(self.wall() * 1e9)
        rec = (
            event_type,
            self.revision,
            entry.name,
            entry.pb_bytes(),
            reason,
            lease_id,
            epoch,
            wall_ns,
            entry.owner.uid,
        )
        self.history.append(rec)

    # -- survival ------------------------------------------------------------------------------------------------

    def install(self, entries: Sequence[Entry]) -> None:
        """Take in entries carried over from a previous broker process (:func:`.survival.carry.restore`, a
        handover), as they were, all or none: no event, no new revision (the counter is raised to theirs), ids
        assigned. In bulk: a form kept (:meth:`Entry.keep_form`) is not encoded again, names merge in at once.
        Ownership as :meth:`put`: on success the registry owns every ``fd``; on any :class:`BrokerError`
        (:class:`AlreadyExists`, :class:`ResourceExhausted`, :class:`InvalidArgument`) nothing changed.
        """
        table = self._entries
        names = [e.name for e in entries]
        if not names:
            return
        _check_room(table, names, self.capacity)
        for e in entries:
            if e._bytes is None:
                _prepare(e)  # may raise: nothing has changed yet and every ``fd`` is still the caller's
        # From here on nothing raises: the registry owns every ``fd``.
        for i, e in enumerate(entries, self._next_id):
            e.id = i
            if e.expires_at is not None:
                self._expiring[e.name] = e.expires_at
        self._next_id += len(names)
        table.update(zip(names, entries, strict=True))
        self._per_uid.update(e.owner.uid for e in entries)
        _merge(self._names, names)
        self.raise_revision(max(max(e.revision, e.create_revision) for e in entries))

    def _hold(self, entry: Entry, old: Entry | None) -> None:
        """Take ``entry`` into the tables, in place of ``old`` (whose descriptor is given up). Never raises."""
        name = entry.name
        self._next_id += 1
        if entry.expires_at is not None:
            self._expiring[name] = entry.expires_at
        else:
            self._expiring.pop(name, None)
        if old is None:
            bisect.insort(self._names, name)
        else:
            self._let_go(old)
        self._entries[name] = entry
        self._per_uid[entry.owner.uid] += 1

    def _let_go(self, e: Entry) -> None:
        """Stop counting ``e`` against its owner and give its descriptor up."""
        self._per_uid[e.owner.uid] -= 1
        if not self._per_uid[e.owner.uid]:
            del self._per_uid[e.owner.uid]
        _unslot(e)  # before the descriptor goes: the prefetch table must not send it any more
        self._discard(e.fd, e.owner.uid)
        e.fd = -1


def _unslot(e: Entry) -> None:
    """Take ``e`` out of the prefetch table: its slot's generation moves on, so the tokens issued for it stop
    matching (their redeems answer NOT_FOUND, as the registry no longer has the entry)."""
    if e.slot >= 0:
        e.slots.slot_drop(e.slot)
        e.slot, e.slots, e.tail_shown = -1, None, False


def _check_room(held: dict[str, Entry], names: list[str], capacity: int) -> None:
    """Raise the error an install of ``names`` meets: a name held or given twice, or no room for them all."""
    if len(set(names)) < len(names) or not held.keys().isdisjoint(names):
        twice = sorted({n for n in names if n in held or names.count(n) > 1})
        raise AlreadyExists(f"entries restored twice: {', '.join(twice[:5])}", name=twice[0])
    if len(held) + len(names) > capacity:
        raise ResourceExhausted(
            f"cannot restore {len(names)} entries: the broker holds {len(held)} descriptors, its limit is "
            f"{capacity}; raise RLIMIT_NOFILE or lower --reserve-fds",
            name=names[0],
        )


def _merge(names: list[str], new: list[str]) -> None:
    """Add ``new`` to the sorted ``names`` at once (bisect.insort per name moves the tail each time)."""
    k = len(names)
    names.extend(sorted(new))
    if k and new and names[k - 1] > names[k]:
        names.sort()  # timsort merges the two sorted runs


def info_kind(info: bytes) -> int:
    """The ``Kind`` in a serialized ``DescriptorInfo`` (or its first bytes), without parsing it: ``kind`` is field
    1, which protobuf writes first when it is set (an absent one is ``KIND_UNSPECIFIED``); ``KIND_OTHER`` if the
    bytes end inside it."""
    if info[:1] != b"\x08":
        return pb.KIND_UNSPECIFIED
    kind = shift = 0
    for byte in info[1:6]:
        kind |= (byte & 0x7F) << shift
        if byte < 0x80:
            return kind
        shift += 7
    return pb.KIND_OTHER


def _prepare(entry: Entry) -> None:
    """Build (and cache) every serialized form of a new entry, so nothing that later shows it can fail.

    :class:`InvalidArgument` when a field cannot be encoded (a time outside the ``Timestamp`` range: the
    request's own range checks should have refused it first).
    """
    try:
        entry.pb_bytes()
        entry.deliver_tail()
    except (ValueError, OverflowError) as err:
        entry.invalidate()
        raise InvalidArgument(f"entry {entry.name!r} cannot be encoded: {err}", name=entry.name) from None
