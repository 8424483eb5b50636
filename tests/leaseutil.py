"""Helpers for the lease and watch tests: brokers with extra options, memfds with content, event collectors."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from fdbroker.client.models import Event
from fdbroker.testing import BrokerProcess, checked_broker


def broker_with(args: Sequence[str] = ()) -> contextlib.AbstractContextManager[BrokerProcess]:
    """Like the ``fdbroker_broker`` fixture (leak check, clean exit), with extra ``fdbroker serve`` options."""
    return checked_broker(args)


def memfd(content: bytes) -> int:
    """A new memfd holding ``content`` (the caller closes it)."""
    fd = os.memfd_create("leasetest", os.MFD_CLOEXEC)
    os.write(fd, content)
    return fd


def read_all(f: Any) -> bytes:
    """The whole content of a received memfd/file (``pread`` from 0: the offset is shared with other holders)."""
    fd = f if isinstance(f, int) else f.fileno()
    return os.pread(fd, 1 << 16, 0)


class Collector:
    """Reads a watch in a thread so a test can wait for events with a (generous) timeout."""

    def __init__(self, client: Any, prefix: str = "", start_revision: int = 0) -> None:
        # From the revision the broker is at now, not "from whenever the stream reaches the broker": the put a
        # test makes right after this must be seen however late the thread's RPC arrives.
        start = start_revision or client.info().revision + 1
        self.watch = client.watch(prefix, start_revision=start)
        self.events: queue.Queue[Event | BaseException] = queue.Queue()
        self.seen: list[Event] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for ev in self.watch:
                self.events.put(ev)
        except BaseException as err:
            self.events.put(err)

    def wait_for(self, pred: Callable[[Event], bool], timeout: float = 20.0) -> Event:
        """The first event (after those already consumed) matching ``pred``; fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"no matching event within {timeout}s; saw {[_short(e) for e in self.seen]}"
                )
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if isinstance(ev, BaseException):
                raise ev
            self.seen.append(ev)
            if pred(ev):
                return ev

    def close(self) -> None:
        self.watch.close()
        self._thread.join(10)

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _short(e: Event) -> str:
    return f"{e.revision}:{e.type}:{e.name}:{e.reason}"
