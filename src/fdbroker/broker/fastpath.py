"""Prefetched GET tokens and the entries they deliver: the table the native data plane serves from.

A prefetched token (``GetRequest.prefetch``, ``BatchGetRequest.prefetch``) is redeemed on the conduit without an
RPC, so its ``Redeem`` → ``Deliver`` round trip is the broker's hottest path. Those tokens live in a table of their
own, with the same rules as every token (:mod:`.tokens`: single use, bound to a session, expiring, compared in
constant time, the last 4096 retired remembered):

* a *slot* is an entry as the table sees it: its held descriptor (the registry's, borrowed), a generation that
  :meth:`~Table.slot_drop` bumps when the entry leaves (so the tokens issued for it stop matching), and its encoded
  ``DeliverItem`` tail (name, info, revision; :mod:`.delivery`), or None while it is stale or the entry is under an
  exclusive lease;
* a token is bound to a session key (:meth:`~Table.session_open`), an expiry and a *grant*: the slot(s) it delivers
  (one, or a batch of up to 253 delivered in one frame) and the Python payload handed back when it is redeemed.

Two implementations with one interface: the C extension :mod:`fdbroker._native` (which also serves whole
``Redeem`` frames itself from each connection's reader callback, see :mod:`.listener`) and :class:`Table` here,
the pure-Python twin used when the extension is not built or ``FDBROKER_NATIVE=0``. They answer identically —
tests/test_native_fuzz.py holds them to it, bytes and descriptors — so the broker behaves the same either way and
only its speed differs.

Statuses returned by ``redeem`` (the same numbers in C): :data:`OK`, :data:`MALFORMED`, :data:`UNKNOWN`,
:data:`REUSED`, :data:`EXPIRED_BEFORE` (retired as expired earlier), :data:`EXPIRED` (found expired now, and
retired), :data:`FOREIGN` (another session's; not consumed).
"""

from __future__ import annotations

import hmac
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from fdbroker import native as fdnative

TOKEN_BYTES = 32
RETIRED_MEMORY = 4096
OK, MALFORMED, UNKNOWN, REUSED, EXPIRED_BEFORE, EXPIRED, FOREIGN = range(7)
_MASK = (1 << 64) - 1


def _splitmix64(state: int) -> tuple[int, int]:
    state = (state + 0x9E3779B97F4A7C15) & _MASK
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return state, z ^ (z >> 31)


class _Grant:
    __slots__ = ("batch", "gens", "payload", "refs", "slots")

    def __init__(self, payload: Any, slots: list[int], gens: list[int], batch: bool) -> None:
        self.payload = payload
        self.slots = slots
        self.gens = gens
        self.batch = batch
        self.refs = 0


class _Tok:
    __slots__ = ("exp", "grant", "sess", "token")

    def __init__(self, token: bytes, exp: float, grant: _Grant, sess: int) -> None:
        self.token = token
        self.exp = exp
        self.grant = grant
        self.sess = sess


class Table:
    """The pure-Python table (the interface of ``fdbroker._native.Table``, without its reader).

    ``seed``: draw tokens from a fixed sequence (tests that compare the two implementations) instead of
    ``os.urandom``. The clock is ``time.monotonic`` unless :meth:`set_now` pins it.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = None if seed is None else seed & _MASK
        self._pool = b""
        self._pool_pos = 0
        self._now: float | None = None
        self._live: dict[bytes, _Tok] = {}  # lookup id (8 bytes) -> token
        self._queue: OrderedDict[bytes, _Tok] = OrderedDict()  # issue order = expiry order
        self._retired: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()
        self._sessions: dict[int, tuple[int, dict[bytes, None]]] = {}  # key -> (uid, its tokens)
        self._next_session = 0
        self._uids: dict[int, int] = {}
        self._slots: list[list[Any]] = []  # [fd, gen, live, tail]
        self._free_slots: list[int] = []

    # -- clock, randomness ---------------------------------------------------------------------------------

    def set_now(self, t: float | None) -> None:
        """Pin the clock at ``t`` (tests with a fake clock), or back to ``time.monotonic`` (None)."""
        self._now = t

    def now(self) -> float:
        return time.monotonic() if self._now is None else self._now

    def _random_token(self) -> bytes:
        if self._seed is not None:
            out = b""
            for _ in range(4):
                self._seed, x = _splitmix64(self._seed)
                out += struct.pack("<Q", x)
            return out
        if self._pool_pos + TOKEN_BYTES > len(self._pool):
            self._pool, self._pool_pos = os.urandom(4096), 0
        pos = self._pool_pos
        self._pool_pos = pos + TOKEN_BYTES
        return self._pool[pos : pos + TOKEN_BYTES]

    # -- sessions and slots --------------------------------------------------------------------------------

    def session_open(self, uid: int) -> int:
        key = self._next_session
        self._next_session += 1
        self._sessions[key] = (uid, {})
        self._uids.setdefault(uid, 0)
        return key

    def session_close(self, key: int) -> int:
        s = self._sessions.get(key)
        if s is None:
            return 0
        toks = list(s[1])
        for lookup in toks:
            self._remove(self._live[lookup], 0)
        del self._sessions[key]
        return len(toks)

    def slot_new(self, fd: int) -> int:
        if fd < 0:
            raise ValueError(f"descriptor {fd}")
        if self._free_slots:
            i = self._free_slots.pop()
            slot = self._slots[i]
            slot[0], slot[1], slot[2], slot[3] = fd, slot[1] + 1, True, None
            return i
        self._slots.append([fd, 1, True, None])
        return len(self._slots) - 1

    def _slot(self, i: int) -> list[Any]:
        if not (0 <= i < len(self._slots)) or not self._slots[i][2]:
            raise ValueError(f"no live slot {i}")
        return self._slots[i]

    def slot_tail(self, i: int, tail: bytes | None) -> None:
        self._slot(i)[3] = tail

    def slot_drop(self, i: int) -> None:
        slot = self._slot(i)
        slot[0], slot[1], slot[2], slot[3] = -1, slot[1] + 1, False, None
        self._free_slots.append(i)

    # -- tokens --------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._live)

    def count_for_uid(self, uid: int) -> int:
        return self._uids.get(uid, 0)

    def issue(
        self, key: int, slots: int | Sequence[int], count: int, expires_at: float, payload: Any
    ) -> list[bytes]:
        """``count`` tokens of session ``key`` delivering ``slots`` (one slot, or a batch), expiring at
        ``expires_at`` on the table's clock; ``payload`` comes back with each redeem."""
        s = self._sessions.get(key)
        if s is None:
            raise ValueError("no such session")
        if not 0 <= count <= 1 << 20:
            raise ValueError(f"count {count}")
        batch = not isinstance(slots, int)
        ids: list[int] = [slots] if isinstance(slots, int) else list(slots)
        if not 1 <= len(ids) <= 253:
            raise ValueError(f"a batch holds 1..253 entries, not {len(ids)}")
        gens = [self._slot(i)[1] for i in ids]
        grant = _Grant(payload, ids, gens, batch)
        uid, mine = s
        out = []
        for _ in range(count):
            while True:
                t = self._random_token()
                lookup = t[:8]
                if lookup not in self._live and lookup not in self._retired:
                    break
            tok = _Tok(t, expires_at, grant, key)
            self._live[lookup] = tok
            self._queue[lookup] = tok
            mine[lookup] = None
            grant.refs += 1
            out.append(t)
        self._uids[uid] = self._uids.get(uid, 0) + count
        return out

    def _remove(self, tok: _Tok, reason: int) -> None:
        lookup = tok.token[:8]
        del self._live[lookup]
        del self._queue[lookup]
        uid, mine = self._sessions[tok.sess]
        del mine[lookup]
        self._uids[uid] -= 1
        tok.grant.refs -= 1
        if reason:
            self._retired[lookup] = (tok.token, reason)
            if len(self._retired) > RETIRED_MEMORY:
                self._retired.popitem(last=False)

    def _find(self, token: bytes, key: int) -> tuple[int, _Tok | None, Any]:
        if len(token) != TOKEN_BYTES:
            return MALFORMED, None, None
        lookup = token[:8]
        tok = self._live.get(lookup)
        if tok is None or not hmac.compare_digest(tok.token, token):
            if tok is None:
                r = self._retired.get(lookup)
                if r is not None and hmac.compare_digest(r[0], token):
                    return (REUSED if r[1] == 1 else EXPIRED_BEFORE), None, None
            return UNKNOWN, None, None
        if tok.exp <= self.now():
            self._remove(tok, 2)
            return EXPIRED, None, tok.grant.payload
        return (OK if tok.sess == key else FOREIGN), tok, tok.grant.payload

    def redeem(self, token: bytes, key: int, consume: bool) -> tuple[int, Any]:
        """(status, payload): see the module docstring; with ``consume`` an OK token is used up."""
        status, tok, payload = self._find(token, key)
        if status == OK and consume and tok is not None:
            self._remove(tok, 1)
        return status, payload

    def cancel(self, token: bytes) -> Any:
        """Take back a live token whoever's it is (not remembered); its payload, or None."""
        tok = self._live.get(token[:8]) if len(token) == TOKEN_BYTES else None
        if tok is None or not hmac.compare_digest(tok.token, token):
            return None
        self._remove(tok, 0)
        return tok.grant.payload

    def expire(self) -> int:
        now = self.now()
        n = 0
        while self._queue:
            tok = next(iter(self._queue.values()))
            if tok.exp > now:
                break
            self._remove(tok, 2)
            n += 1
        return n

    def next_expiry(self) -> float | None:
        return next(iter(self._queue.values())).exp if self._queue else None

    def stats(self) -> dict[str, int]:
        return {"frames_served": 0, "fds_served": 0, "reads_passed": 0, "live": len(self._live)}


def show(table: Any, e: Any) -> int:
    """Put the registry entry ``e`` in ``table`` (a slot of its own, borrowing its descriptor) and, unless it is
    under an exclusive lease, its current ``DeliverItem`` tail, so the tokens issued for it are redeemed without
    Python; returns the slot. The registry withdraws the tail when the entry changes (``Entry.invalidate``) and the
    slot when it leaves (before its descriptor goes)."""
    if e.slot < 0:
        e.slots = table
        e.slot = table.slot_new(e.fd)
    if not e.tail_shown and (e.lease is None or e.lease.exclusive_holder() is None):
        table.slot_tail(e.slot, e.deliver_tail())
        e.tail_shown = True
    return int(e.slot)


def new_table(seed: int | None = None, *, native: bool | None = None) -> Any:
    """The table the broker serves prefetched tokens from: the C one when it is built and allowed
    (:func:`fdbroker.native.load`; ``native=False`` refuses it, ``native=True`` insists on it), else
    :class:`Table`."""
    mod = fdnative.load(required=native is True) if native is not False else None
    return mod.Table(seed=seed) if mod is not None else Table(seed=seed)


def is_native(table: Any) -> bool:
    """Whether ``table`` is the C one (whose connections' reads it can serve itself)."""
    return hasattr(table, "reader")
