"""Closing descriptors that came from clients, off the event loop.

``close(2)`` can block: the last close of a TCP socket with ``SO_LINGER {1, T}`` and unsent data waits up to T
seconds; a FUSE file or a slow NFS file can wait as long as its server likes. The broker runs on one event loop,
so one such close would freeze every RPC and conduit frame. Every descriptor that a client handed the broker —
refused deposits, unsolicited descriptors, a replaced, deleted, expired or taken entry's descriptor, queued
duplicates of a delivery that never went out — is therefore given to :func:`discard`, which never blocks: a
small pool of closer threads does the ``close``.

Descriptors waiting here are still open in the broker's table, so they count in its descriptor budget: the
broker adds :func:`pending` to what it holds when it checks capacity, and the conduit stops reading from a uid
whose descriptors in flight (:func:`pending_for_uid` plus those in incomplete frames) pass its cap. The queue is
bounded by that accounting, not by refusing a descriptor already received (the broker owns it the moment the
kernel put it in its table, and the only way to give it up is to close it).

Ownership: :func:`discard` takes ownership of every descriptor it is given, whatever happens; the caller must
not use or close them afterwards.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable

__all__ = ["Closer", "default", "discard", "drain", "pending", "pending_for_uid"]

MAX_THREADS = 8
"""At most this many closes block at once; more wait in the queue (still counted as pending)."""

_BROKER = -1  # the uid recorded for descriptors no client is to blame for


class Closer:
    """A queue of descriptors to close and a pool of daemon threads that close them.

    Thread-safe. Threads are started on demand (one per queued descriptor while all are busy, up to
    ``max_threads``) and stay for the process's life, idle on a condition variable.
    """

    def __init__(self, *, max_threads: int = MAX_THREADS) -> None:
        self._max_threads = max_threads
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # closer threads wait here for work
        self._done = threading.Condition(lock)  # drain() waits here for the queue to empty
        self._queue: collections.deque[tuple[int, int]] = collections.deque()
        self._threads = 0
        self._idle = 0
        self._pending = 0  # queued + being closed
        self._per_uid: collections.Counter[int] = collections.Counter()

    def discard(self, fds: Iterable[int] | int, uid: int | None = None) -> None:
        """Close ``fds`` (one descriptor or several) on a closer thread; never blocks on the close itself.

        ``uid``: whose descriptors these are (the client that sent them or owns the entry), for the per-uid
        in-flight accounting; None when no client is to blame. Negative numbers are ignored. Takes ownership of
        every descriptor given, in all cases.
        """
        if isinstance(fds, int):
            fds = (fds,)
        who = _BROKER if uid is None else uid
        with self._cond:
            n = 0
            for fd in fds:
                if fd >= 0:
                    self._queue.append((fd, who))
                    n += 1
            if not n:
                return
            self._pending += n
            self._per_uid[who] += n
            # Wake idle threads for what they can take; start new ones for the rest (a thread may be stuck in a
            # lingering close for seconds).
            spare = min(n, self._idle)
            if spare:
                self._cond.notify(spare)
            want = min(n - spare, self._max_threads - self._threads)
            for _ in range(max(0, want)):
                self._threads += 1
                threading.Thread(target=self._run, name="fdbroker-closer", daemon=True).start()

    def pending(self) -> int:
        """Descriptors handed to :meth:`discard` and not closed yet (each still open in this process)."""
        return self._pending

    def pending_for_uid(self, uid: int) -> int:
        """Pending descriptors attributed to ``uid``."""
        return self._per_uid.get(uid, 0)

    def per_uid_counts(self) -> collections.Counter[int]:
        """The pending descriptors per uid itself (a uid is in it only while it has some: empty when nothing is
        pending), for readers that must not pay a call per look (the native reader); never to be written."""
        return self._per_uid

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until nothing is pending (tests, shutdown); False if ``timeout`` passed first."""
        with self._done:
            return self._done.wait_for(lambda: self._pending == 0, timeout)

    def _run(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._queue:
                    self._idle += 1
                    cond.wait()
                    self._idle -= 1
                fd, who = self._queue.popleft()
            try:
                os.close(fd)
            except OSError:
                pass
            with cond:
                self._pending -= 1
                left = self._per_uid[who] - 1
                if left > 0:
                    self._per_uid[who] = left
                else:
                    del self._per_uid[who]
                if self._pending == 0:
                    self._done.notify_all()


default = Closer()
"""The process's closer; the broker's modules use it through the functions below."""


def discard(fds: Iterable[int] | int, uid: int | None = None) -> None:
    """:meth:`Closer.discard` on the process's closer."""
    default.discard(fds, uid)


def pending() -> int:
    """:meth:`Closer.pending` on the process's closer."""
    return default.pending()


def pending_for_uid(uid: int) -> int:
    """:meth:`Closer.pending_for_uid` on the process's closer."""
    return default.pending_for_uid(uid)


def per_uid_counts() -> collections.Counter[int]:
    """:meth:`Closer.per_uid_counts` of the process's closer."""
    return default.per_uid_counts()


def drain(timeout: float | None = None) -> bool:
    """:meth:`Closer.drain` on the process's closer."""
    return default.drain(timeout)
