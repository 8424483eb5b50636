"""The event history: every change to the registry as a compact record, in a bounded window watchers read.

Every change gets the next revision of the registry's one counter and is recorded here, so a client can list at
revision R and watch from R + 1 with nothing missed and nothing repeated. The window keeps the last ``length``
events; revisions at or below the *floor* happened before this process's history began (a takeover or a restart
from the fd store jumps the counter), so a watch cannot start there.

Records are tuples, not ``pb.Event`` messages (a upb message with an entry copy is ~1.7 KiB; a record shares the
entry's serialized bytes); :func:`event_of` builds the message when one is needed. Holds no descriptor.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from fdbroker.errors import OutOfRange
from fdbroker.v1 import broker_pb2 as pb

Record = tuple[int, int, str, bytes, int, str, int, int, int]
"""One history event: (type, revision, name, entry bytes, reason, lease id, epoch, time ns, owner uid)."""

EventListener = Callable[[pb.Event], None]


class History:
    """The last ``length`` events, oldest first, and who is told of each new one."""

    def __init__(self, length: int) -> None:
        # A list, trimmed in chunks, not a deque: watchers bisect and slice it, and a deque indexes in O(n).
        self._records: list[Record] = []
        self._length = length
        self._floor = 0
        self._listeners: list[EventListener] = []
        #: Called with each new record before the listeners (the watch hub: cheap, no message is built for it).
        self.on_record: Callable[[Record], None] | None = None

    def append(self, rec: Record) -> None:
        """Record one event and tell :attr:`on_record` and every listener."""
        hist = self._records
        hist.append(rec)
        if len(hist) >= 2 * self._length:
            del hist[: len(hist) - self._length]
        if self.on_record is not None:
            self.on_record(rec)
        if self._listeners:
            ev = event_of(rec)  # one message, shared by every listener: they must not modify it
            for listener in list(self._listeners):
                listener(ev)

    def subscribe(self, listener: EventListener) -> Callable[[], None]:
        """Call ``listener`` with every new event; returns the unsubscribe function."""
        self._listeners.append(listener)

        def unsubscribe() -> None:
            try:
                self._listeners.remove(listener)
            except ValueError:
                pass

        return unsubscribe

    def raise_floor(self, revision: int) -> None:
        """Revisions up to ``revision`` happened before this history began."""
        self._floor = max(self._floor, revision)

    @property
    def oldest_revision(self) -> int:
        """The oldest revision a watch can start from."""
        hist = self._records
        if len(hist) >= self._length:
            return hist[len(hist) - self._length][1]
        return max(1, self._floor + 1)

    def check(self, start_revision: int) -> None:
        """:class:`OutOfRange` if events from ``start_revision`` on are no longer all in the window."""
        oldest = self.oldest_revision
        if start_revision < oldest:
            raise OutOfRange(
                f"revision {start_revision} is older than the broker's history window; "
                f"the oldest revision available is {oldest}: list again and watch from the listing's revision + 1",
                oldest_revision=oldest,
            )

    def after(self, revision: int) -> Iterator[Record]:
        """The records with a revision above ``revision``, oldest first (a live view: do not change the registry
        while iterating)."""
        hist = self._records
        if not hist or revision >= hist[-1][1]:
            return iter(())
        # Revisions are increasing but not dense (each event has its own revision); only the window counts.
        lo = bisect.bisect_right(hist, revision, lo=max(0, len(hist) - self._length), key=_revision_of)
        return (hist[i] for i in range(lo, len(hist)))

    def since(self, start_revision: int, prefix: str = "") -> list[pb.Event]:
        """Events with revision >= ``start_revision`` under ``prefix``; :class:`OutOfRange` if compacted away."""
        self.check(start_revision)
        return [event_of(r) for r in self.after(start_revision - 1) if r[2].startswith(prefix)]


def _revision_of(rec: Record) -> int:
    return rec[1]


def event_of(rec: Record) -> pb.Event:
    """The ``pb.Event`` of a history record (a new message)."""
    event_type, revision, name, entry_bytes, reason, lease_id, epoch, time_ns, _ = rec
    ev = pb.Event(
        type=event_type,  # type: ignore[arg-type]
        revision=revision,
        name=name,
        reason=reason,  # type: ignore[arg-type]
        lease_id=lease_id,
        epoch=epoch,
    )
    ev.entry.MergeFromString(entry_bytes)
    ev.time.FromNanoseconds(time_ns)
    return ev
