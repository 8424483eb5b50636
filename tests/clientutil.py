"""Both clients from one synchronous test body: ``client(kind, run_dir)`` is an ``fdbroker.Client`` ("sync") or an
``fdbroker.aio.Client`` driven from a loop thread of its own ("aio", :class:`InLoop`)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fdbroker
import fdbroker.aio


class InLoop:
    """An ``fdbroker.aio.Client`` used from synchronous test code, so one test body exercises both clients: each
    call runs in an event loop of its own thread, awaiting whatever the client returns that can be awaited."""

    def __init__(self, run_dir: Path, **kw: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.client = fdbroker.aio.Client(run_dir, **kw)

    def run(self, aw: Any) -> Any:
        async def wait() -> Any:
            return await aw

        return asyncio.run_coroutine_threadsafe(wait(), self.loop).result(30)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            result = self.run(_call(attr, args, kwargs))
            return self.run(result) if inspect.isawaitable(result) else result

        return call

    def close(self) -> None:
        self.run(self.client.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        # A grpc.aio call keeps its connection open until it is freed, and what the loop's tasks referenced may
        # sit in reference cycles: free it now, as leaving asyncio.run() would (the broker counts connections).
        gc.collect()


async def _call(fn: Any, args: Any, kwargs: Any) -> Any:
    return fn(*args, **kwargs)  # made in the loop: an asyncio object wants its loop running


@contextlib.contextmanager
def client(kind: str, run_dir: Path, **kw: Any) -> Iterator[Any]:
    c: Any = fdbroker.Client(run_dir, **kw) if kind == "sync" else InLoop(run_dir, **kw)
    try:
        yield c
    finally:
        c.close()


def next_event(c: Any, w: Any) -> Any:
    return next(w) if isinstance(c, fdbroker.Client) else c.run(w.__anext__())


def close_watch(c: Any, w: Any) -> None:
    w.close() if isinstance(c, fdbroker.Client) else c.run(w.aclose())
