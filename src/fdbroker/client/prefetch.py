"""GET tokens asked for ahead (``GetRequest.prefetch``, ``BatchGetRequest.prefetch``): how many to ask for, the
ones held, when they expire, and which requests for more are in flight. No I/O; both clients use it through
:mod:`fdbroker.client.flows`.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

PREFETCH_LIMIT = 256
"""Most extra GET tokens the adaptive policy asks for per ``Get`` RPC."""

BATCH_PREFETCH_LIMIT = 64
"""Most batch tokens asked for per ``BatchGet`` RPC: each carries a pre-encoded frame of the whole batch in the
broker, so fewer of them."""

_REDEEM_MARGIN = 0.25  # a token this close to expiry is not worth a round trip


class Signal(Protocol):
    """A one-shot flag a driver can wait on: ``threading.Event`` (sync) or ``asyncio.Event`` (asyncio)."""

    def set(self) -> None: ...

    def is_set(self) -> bool: ...


def batch_key(names: Sequence[str]) -> str:
    """The key batch tokens of ``names`` are held under (``\\0`` never occurs in a name: no clash with a name)."""
    return "\0".join(names)


class Prefetch:
    """The prefetched GET tokens of one client's session, per key (a name, or a :func:`batch_key`).

    How many to ask for: ``fixed`` (not None) always; otherwise adaptive — 0 for the first get of a key, then 8,
    16, …, 256 while the key keeps being fetched within a token lifetime of the previous get. The ``Redeem`` of a
    name's last token asks for as many again (:meth:`refill`), so a name fetched in a loop pays one RPC, then
    ~120 us of client CPU per refill on the conduit (a ``Get`` RPC's refill was ~280 us).

    Concurrent gets of one key share a request for tokens in flight (:meth:`fetching`, :meth:`in_flight`)
    instead of each asking for its own. ``new_signal`` makes the flag a waiting caller waits on.
    Tokens belong to the session: :meth:`clear` them when it ends.
    """

    def __init__(self, fixed: int | None, new_signal: Callable[[], Signal]) -> None:
        self.fixed = fixed
        self._new_signal = new_signal
        self._recent: dict[str, tuple[float, int]] = {}
        self._tokens: dict[str, collections.deque[tuple[bytes, float]]] = {}
        self._fetching: dict[str, Signal] = {}

    def plan(self, key: str, token_ttl: float) -> int:
        """How many tokens to ask for with the next RPC for ``key``."""
        if self.fixed is not None:
            return self.fixed
        t = time.monotonic()
        last, n = self._recent.get(key, (0.0, 0))
        n = n + 1 if t - last < token_ttl else 0
        self._recent[key] = (t, n)
        if len(self._recent) > 4096:
            self._recent.clear()
        return 0 if n == 0 else min(PREFETCH_LIMIT, 4 << min(n, 6))

    def refill(self, key: str, token_ttl: float) -> int:
        """How many tokens the ``Redeem`` of a token just taken for ``key`` asks for (``Redeem.refill``): none while
        others are held or another request for ``key`` is in flight, else what the next RPC would ask for
        (:meth:`plan`)."""
        if self._tokens.get(key) or key in self._fetching:
            return 0
        return self.plan(key, token_ttl)

    def keep(self, key: str, response: Any, token_ttl: float) -> None:
        """Hold the ``prefetch_tokens`` of a ``GetResponse``/``BatchGetResponse`` (or of a refilled
        ``DeliverItem``) until the broker's
        ``prefetch_expire_time`` (``token_ttl`` from now where it gave none). Added to, not replacing, what is
        held: tokens another caller fetched meanwhile must not be orphaned."""
        if not response.prefetch_tokens:
            return
        ttl = token_ttl
        if response.HasField("prefetch_expire_time"):
            ttl = response.prefetch_expire_time.ToNanoseconds() / 1e9 - time.time()
        self.add(key, response.prefetch_tokens, time.monotonic() + ttl)

    def add(self, key: str, tokens: Iterable[bytes], expire: float) -> None:
        """Hold ``tokens`` for ``key`` until ``expire`` (``time.monotonic``)."""
        self._tokens.setdefault(key, collections.deque()).extend((t, expire) for t in tokens)

    def pop(self, key: str) -> bytes | None:
        """The next token for ``key`` that is not about to expire, or None (expired ones are dropped)."""
        q = self._tokens.get(key)
        t = time.monotonic()
        while q:
            tok, exp = q.popleft()
            if exp - t >= _REDEEM_MARGIN:
                return tok
        self._tokens.pop(key, None)
        return None

    def count(self, key: str) -> int:
        """Tokens held for ``key`` (expired ones included until :meth:`pop` meets them)."""
        return len(self._tokens.get(key, ()))

    def drop(self, key: str) -> None:
        """Forget the tokens of ``key`` (the entry was replaced, deleted or leased away: they are void)."""
        self._tokens.pop(key, None)

    def clear(self) -> None:
        """Forget every token (the session ended)."""
        self._tokens.clear()

    @contextlib.contextmanager
    def fetching(self, key: str, count: int) -> Iterator[None]:
        """Mark a request for ``count`` tokens of ``key`` as in flight while the block runs (nothing when
        ``count`` is 0); callers waiting in :meth:`in_flight` are woken when it ends, however it ends."""
        if not count:
            yield
            return
        done = self._new_signal()
        self._fetching[key] = done
        try:
            yield
        finally:
            if self._fetching.get(key) is done:
                del self._fetching[key]
            done.set()

    def in_flight(self, key: str) -> Signal | None:
        """The flag of a request for tokens of ``key`` in flight, or None."""
        return self._fetching.get(key)
