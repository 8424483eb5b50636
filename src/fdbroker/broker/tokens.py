"""Handoff tokens: issue, redeem (single use, expiry, constant-time compare), void per session.

Every descriptor that crosses the conduit is tied to a token the control plane issued for one operation on one
entry for one session. A token is :data:`TOKEN_BYTES` random bytes from :mod:`secrets`:

* the first 8 bytes are the *lookup id*, the key of the book's dictionary (so finding a token is O(1) and does
  not compare secrets in variable time);
* the whole 32 bytes are then compared with :func:`hmac.compare_digest`, so a guess that hits a lookup id
  learns nothing from timing about the remaining 24 secret bytes.

Tokens are never logged whole: use :func:`short` (first 4 bytes in hex). ``repr(Token)`` does the same.

Refusals raise :class:`TokenError` with a ``reason`` and a gRPC code number:

============== ===================== ===============================================================
reason         code                  when
============== ===================== ===============================================================
malformed      INVALID_ARGUMENT      not exactly 32 bytes
unknown        FAILED_PRECONDITION   never issued, cancelled, or voided when its session ended
reused         FAILED_PRECONDITION   already redeemed (remembered for the last 4096 redemptions)
expired        FAILED_PRECONDITION   presented after its expiry
foreign        PERMISSION_DENIED     issued to another session
wrong-operation FAILED_PRECONDITION  presented for an operation it was not issued for
============== ===================== ===============================================================

``unknown``, ``reused`` and ``expired`` are FAILED_PRECONDITION rather than NOT_FOUND: the caller's state (its
token) is stale, and the fix is the same in each case — ask the control plane for a new token.

A token presented by another session, or for the wrong operation, is refused and *not* consumed: the rightful
owner can still use it before it expires. Otherwise a session that saw a token (e.g. in a log) could destroy
another session's handoff. An expired token is removed when it is presented or by :meth:`TokenBook.expire`.

Costs: issue, redeem, peek and cancel are O(1) (dict and OrderedDict operations; expiry queues are kept per
distinct TTL, each ordered by expiry because the clock is monotonic); ``void_session`` is O(tokens of that
session); ``expire`` is O(expired tokens + distinct TTLs).

Prefetched GET tokens (speculative: they never count against the pending-token quota) live in a table of their
own, :attr:`TokenBook.spec` (:mod:`.fastpath`: the native data plane serves their ``Redeem`` frames, in C when
built); the book looks them up there too, so every refusal above reads the same whichever table a token is in.

The book is not thread-safe: the broker uses it from its one event loop.
"""

from __future__ import annotations

import hmac
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from fdbroker.broker import fastpath
from fdbroker.errors import BrokerError, Code

TOKEN_BYTES = 32
LOOKUP_BYTES = 8
DEFAULT_TTL = 5.0
# How many retired (redeemed, expired) tokens are remembered to say "already used" / "expired" instead of
# "unknown".
RETIRED_MEMORY = 4096

_OP_NAMES = {0: "unspecified", 1: "put", 2: "get", 3: "take", 4: "lease", 5: "checkin"}
_OP_GET = 2
S = TypeVar("S", bound="HasKey")


class HasKey(Protocol):
    """A session as the book sees it: an identity with a uid, and its key in the prefetch table."""

    key: int
    identity: Any


def short(token: bytes) -> str:
    """The log form of a token: its first 4 bytes in hex and an ellipsis (never the whole secret)."""
    return token[:4].hex() + "…"


def operation_name(operation: int) -> str:
    """Lowercase name of a ``broker_pb2.Operation`` value ("put", "get", ...)."""
    return _OP_NAMES.get(operation, f"operation-{operation}")


class TokenError(BrokerError):
    """A handoff token was refused. ``reason`` is one of "malformed", "unknown", "reused", "expired",
    "foreign", "wrong-operation"; ``code`` follows the table in the module docstring."""

    code = Code.FAILED_PRECONDITION

    def __init__(self, message: str, *, reason: str, name: str = "", code: Code | None = None) -> None:
        super().__init__(message, name=name, code=code)
        self.reason = reason


@dataclass(slots=True, repr=False)
class Token:
    """One issued handoff token and what it was issued for."""

    token: bytes
    operation: int  # broker_pb2.Operation value
    name: str
    session_id: str
    uid: int
    entry_id: int  # 0 when the entry does not exist yet (PUT)
    expires_at: float  # on the book's (monotonic) clock
    payload: Any = None  # opaque per-operation data the broker attaches (e.g. put options)
    speculative: bool = False  # a prefetch token: counted in its own pool, never against explicit operations

    def __repr__(self) -> str:
        return (
            f"Token({short(self.token)} {operation_name(self.operation)} {self.name!r} "
            f"session={self.session_id[:8]}… uid={self.uid} entry={self.entry_id} "
            f"expires_at={self.expires_at:.3f})"
        )


def _expired(tok: Token) -> TokenError:
    return TokenError(
        f"handoff token {short(tok.token)} for {operation_name(tok.operation)} of {tok.name!r} "
        "has expired; ask the broker for a new one and send the frame within the token's lifetime",
        reason="expired",
        name=tok.name,
    )


def _spec_token(token: bytes, payload: tuple[Any, ...]) -> Token:
    """A prefetched token as a :class:`Token`, from the payload it was issued with (see ``issue_prefetch``)."""
    name, entry_id, plan, session_id, uid = payload
    return Token(token, _OP_GET, name, session_id, uid, entry_id, 0.0, plan, True)


class TokenBook:
    """The pending handoff tokens of a broker.

    ``ttl`` is the default lifetime in seconds; ``clock`` a monotonic clock (injectable for tests); ``spec`` the
    table of prefetched tokens (default: :func:`fastpath.new_table`, C unless ``native`` is False); ``seed`` draws
    every token from a fixed sequence (tests that compare the native and the Python data planes).
    """

    def __init__(
        self,
        ttl: float = DEFAULT_TTL,
        *,
        clock: Callable[[], float] = time.monotonic,
        spec: Any = None,
        seed: int | None = None,
        native: bool | None = None,
    ) -> None:
        if not ttl > 0:
            raise ValueError(f"token ttl must be positive, got {ttl!r}")
        self.ttl = ttl
        self._clock = clock
        #: Prefetched GET tokens (see the module docstring).
        if spec is None:
            spec = fastpath.new_table(None if seed is None else seed + 1, native=native)
        self.spec: Any = spec
        self._pinned = clock is not time.monotonic  # the table's clock must then follow ours
        self._seed = None if seed is None else fastpath.Table(seed)
        # lookup id -> (token, the key of its expiry queue)
        self._live: dict[bytes, tuple[Token, float]] = {}
        # Per distinct TTL: lookup id -> token, in issue order, hence in expiry order.
        self._queues: dict[float, OrderedDict[bytes, Token]] = {}
        self._by_session: dict[str, dict[bytes, None]] = {}
        self._by_uid: dict[int, int] = {}  # explicit tokens per uid
        # lookup id -> (whole token, reason) for recently retired tokens.
        self._retired: OrderedDict[bytes, tuple[bytes, str]] = OrderedDict()
        # Random bytes are drawn from the kernel 4 KiB at a time: one getrandom() per 128 tokens instead of one
        # per token (the per-call cost dominated batch handoffs). Same source, same quality.
        self._pool = b""
        self._pool_pos = 0

    @classmethod
    def configured(cls, ttl: float, clock: Callable[[], float], extra: dict[str, Any]) -> TokenBook:
        """A broker's book; its ``BrokerConfig.extra`` may set ``token_seed`` and ``native`` (see above)."""
        return cls(ttl, clock=clock, seed=extra.get("token_seed"), native=extra.get("native"))

    def open_session(self, s: S) -> S:
        """Give the new session ``s`` its key in :attr:`spec` (``s.key``); returns it."""
        s.key = self.spec.session_open(s.identity.uid)
        return s

    def random_token(self) -> bytes:
        """32 fresh random bytes (os.urandom, drawn in 4 KiB blocks)."""
        if self._seed is not None:
            return self._seed._random_token()
        pos = self._pool_pos
        if pos + TOKEN_BYTES > len(self._pool):
            self._pool = os.urandom(4096)
            pos = 0
        self._pool_pos = pos + TOKEN_BYTES
        return self._pool[pos : pos + TOKEN_BYTES]

    def __len__(self) -> int:
        """Tokens issued and not yet redeemed, cancelled, voided or purged (may include expired ones not yet
        purged by :meth:`expire`), prefetched ones included."""
        return len(self._live) + len(self.spec)

    def spec_now(self) -> Any:
        """The table of prefetched tokens, its clock set to ours first when ours is not ``time.monotonic``."""
        if self._pinned:
            self.spec.set_now(self._clock())
        return self.spec

    def issue_prefetch(
        self, session_key: int, slots: int | Sequence[int], count: int, payload: tuple[Any, ...]
    ) -> tuple[list[bytes], float]:
        """``count`` speculative GET tokens of the session ``session_key`` delivering ``slots`` (a slot, or the
        slots of a batch), valid for the book's ttl; ``payload`` is ``(name, entry_id, batch_plan, session_id,
        uid)`` of what they deliver. Returns the tokens and their expiry on the book's clock."""
        expires_at = self._clock() + self.ttl
        return self.spec_now().issue(session_key, slots, count, expires_at, payload), expires_at

    def issue(
        self,
        *,
        operation: int,
        name: str,
        session_id: str,
        uid: int,
        entry_id: int = 0,
        payload: Any = None,
        ttl: float | None = None,
    ) -> Token:
        """Issues a new single-use token valid for ``ttl`` seconds (default: the book's). Prefetched tokens are
        issued by :meth:`issue_prefetch` instead, and counted by :meth:`speculative_for_uid`, not
        :meth:`pending_for_uid`, so a client's prefetching can never use up the quota its explicit operations
        need."""
        if ttl is None:
            ttl = self.ttl
        elif not ttl > 0:
            raise ValueError(f"token ttl must be positive, got {ttl!r}")
        while True:
            raw = self.random_token()
            lookup = raw[:LOOKUP_BYTES]
            # A 64-bit collision is astronomically unlikely; never overwrite a live token or shadow a retired
            # one.
            if lookup not in self._live and lookup not in self._retired:
                break
        tok = Token(raw, operation, name, session_id, uid, entry_id, self._clock() + ttl, payload)
        self._live[lookup] = (tok, ttl)
        queue = self._queues.get(ttl)
        if queue is None:
            queue = self._queues[ttl] = OrderedDict()
        queue[lookup] = tok
        self._by_session.setdefault(session_id, {})[lookup] = None
        self._by_uid[uid] = self._by_uid.get(uid, 0) + 1
        return tok

    def redeem(
        self, token: bytes, *, session_id: str, operations: Collection[int], session_key: int = -1
    ) -> Token:
        """Consumes a token presented by ``session_id`` (whose key in :attr:`spec` is ``session_key``) for one of
        ``operations`` and returns it.

        Raises :class:`TokenError` (see the module docstring); a foreign or wrong-operation presentation does
        not consume the token.
        """
        tok = self._find(token, session_key)
        if tok.session_id != session_id:
            raise TokenError(
                f"handoff token {short(token)} for {operation_name(tok.operation)} of {tok.name!r} "
                "belongs to another session; a token is only valid on the conduit of the session that "
                "asked for it",
                reason="foreign",
                name=tok.name,
                code=Code.PERMISSION_DENIED,
            )
        if tok.operation not in operations:
            wanted = "/".join(operation_name(op) for op in sorted(operations)) or "nothing"
            raise TokenError(
                f"handoff token {short(token)} was issued for {operation_name(tok.operation)} "
                f"of {tok.name!r}, not for {wanted}; send it with the frame for the operation that issued it",
                reason="wrong-operation",
                name=tok.name,
            )
        if tok.speculative:
            self.spec_now().redeem(token, session_key, True)
        else:
            self._remove(tok, "reused")
        return tok

    def peek(self, token: bytes, *, session_id: str, session_key: int = -1) -> Token | None:
        """The live token if ``session_id`` (key ``session_key`` in :attr:`spec`) could redeem it now, else None.
        Does not consume it (an expired token found here is purged)."""
        try:
            tok = self._find(token, session_key)
        except TokenError:
            return None
        return tok if tok.session_id == session_id else None

    def cancel(self, token: bytes) -> Token | None:
        """Removes a live token whatever its session (the broker aborting a handoff); None if not live. A
        cancelled token presented later is "unknown"."""
        found = self._live.get(token[:LOOKUP_BYTES]) if len(token) == TOKEN_BYTES else None
        if found is None or not hmac.compare_digest(found[0].token, token):
            payload = self.spec.cancel(token) if found is None and len(token) == TOKEN_BYTES else None
            return None if payload is None else _spec_token(token, payload)
        self._remove(found[0], None)
        return found[0]

    def void_session(self, session_id: str, session_key: int = -1) -> list[Token]:
        """Removes every live token of a session (its conduit closed); returns its explicit ones (prefetched
        tokens reserve nothing: they just go)."""
        if session_key >= 0:
            self.spec.session_close(session_key)
        lookups = self._by_session.get(session_id)
        if not lookups:
            return []
        voided = [self._live[lookup][0] for lookup in lookups]
        for tok in voided:
            self._remove(tok, None)
        return voided

    def expire(self, now: float | None = None) -> list[Token]:
        """Removes the tokens whose expiry is at or before ``now`` (default: the clock); returns the explicit
        ones (prefetched tokens reserve nothing: they just go)."""
        if now is None:
            now = self._clock()
        if self._pinned:
            self.spec.set_now(now)
        self.spec.expire()
        expired: list[Token] = []
        for queue in list(self._queues.values()):
            while queue:
                tok = next(iter(queue.values()))
                if tok.expires_at > now:
                    break
                expired.append(tok)
                self._remove(tok, "expired")
        return expired

    def next_expiry(self) -> float | None:
        """The earliest expiry among live tokens (on the book's clock), or None when there are none."""
        best: float | None = self.spec.next_expiry()
        for queue in self._queues.values():
            first = next(iter(queue.values())).expires_at
            if best is None or first < best:
                best = first
        return best

    def pending_for_uid(self, uid: int) -> int:
        """Live explicit (not speculative) tokens issued to sessions of ``uid`` (for the pending-token quota)."""
        return self._by_uid.get(uid, 0)

    def counts(self) -> tuple[int, int]:  # live tokens: (explicit, speculative)
        return sum(self._by_uid.values()), len(self.spec)

    def speculative_for_uid(self, uid: int) -> int:
        """Live speculative (prefetch) tokens issued to sessions of ``uid``."""
        return int(self.spec.count_for_uid(uid))

    # -- internals

    def _find(self, token: bytes, session_key: int = -1) -> Token:
        """The live, unexpired token equal to ``token``; raises TokenError (and purges it if expired).
        ``session_key``: the presenting session's key in :attr:`spec` (a prefetched token found there is
        checked against it)."""
        if len(token) != TOKEN_BYTES:
            raise TokenError(
                f"malformed handoff token ({len(token)} bytes, expected {TOKEN_BYTES}); "
                "send the token exactly as the broker issued it",
                reason="malformed",
                code=Code.INVALID_ARGUMENT,
            )
        lookup = token[:LOOKUP_BYTES]
        found = self._live.get(lookup)
        if found is None:
            status, payload = self.spec_now().redeem(token, session_key, False)
            if status in (fastpath.OK, fastpath.FOREIGN):
                tok = _spec_token(token, payload)
                if status == fastpath.FOREIGN:
                    tok.session_id = ""  # not the presenter's, whoever's it is
                return tok
            if status == fastpath.EXPIRED:
                raise _expired(_spec_token(token, payload))
            if status in (fastpath.REUSED, fastpath.EXPIRED_BEFORE):
                what = "was already used" if status == fastpath.REUSED else "has expired"
                raise TokenError(
                    f"handoff token {short(token)} {what}; tokens are single use and short-lived: "
                    "ask the broker for a new one",
                    reason="reused" if status == fastpath.REUSED else "expired",
                )
        if found is None or not hmac.compare_digest(found[0].token, token):
            retired = self._retired.get(lookup)
            if retired is not None and found is None and hmac.compare_digest(retired[0], token):
                reason = retired[1]
                what = "was already used" if reason == "reused" else "has expired"
                raise TokenError(
                    f"handoff token {short(token)} {what}; tokens are single use and short-lived: "
                    "ask the broker for a new one",
                    reason=reason,
                )
            raise TokenError(
                f"unknown handoff token {short(token)}: never issued, cancelled, or its session ended; "
                "ask the broker for a new one",
                reason="unknown",
            )
        tok = found[0]
        if tok.expires_at <= self._clock():
            self._remove(tok, "expired")
            raise _expired(tok)
        return tok

    def _remove(self, tok: Token, remember: str | None) -> None:
        lookup = tok.token[:LOOKUP_BYTES]
        _, ttl = self._live.pop(lookup)
        queue = self._queues[ttl]
        del queue[lookup]
        if not queue:
            del self._queues[ttl]
        session = self._by_session[tok.session_id]
        del session[lookup]
        if not session:
            del self._by_session[tok.session_id]
        left = self._by_uid[tok.uid] - 1
        if left:
            self._by_uid[tok.uid] = left
        else:
            del self._by_uid[tok.uid]
        if remember is not None:
            self._retired[lookup] = (tok.token, remember)
            if len(self._retired) > RETIRED_MEMORY:
                self._retired.popitem(last=False)
