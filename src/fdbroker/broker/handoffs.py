"""Handoffs: the conduit half of every operation that moves a descriptor.

The control plane issues a token for one operation on one entry for one session (:meth:`Handoffs.issue`,
speculative ones from the uid's prefetch pool with :meth:`Handoffs.prefetch`); the descriptor then crosses the
conduit tagged with it: a ``Deposit`` frame brings one in (put, check-in), a ``Deliver`` frame takes copies out
(get, take, lease, a prefetched token redeemed: :mod:`.redeem`), an ``Ack`` confirms a take. A token that leaves
the book unredeemed (expired, voided with its session) undoes what it reserved. What a token completes or
abandons belongs to the operation that issued it: :class:`Routes` (the broker) sends it there.

Descriptor ownership: the descriptors of a ``Deposit`` frame are the broker's from the moment they arrive; each
becomes an entry's (the registry owns it) or goes to the closer before the answer is sent, on every path.
Deliveries send the registry's own descriptors (the kernel duplicates them into the receiver); the registry keeps
its copies.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from fdbroker import fdinfo
from fdbroker.broker import closer, fastpath
from fdbroker.broker.audit import Audit
from fdbroker.broker.delivery import (
    FRAME_OVERHEAD,
    deliver_frames,
    encode_deliver,
    encode_item,
    field_bytes,
    frame_from_items,
    in_frames,
)
from fdbroker.broker.leasing import check_lease_free
from fdbroker.broker.policy import Limits
from fdbroker.broker.registry import Entry, Registry
from fdbroker.broker.sessions import Session
from fdbroker.broker.tokens import Token, TokenBook, TokenError, operation_name, short
from fdbroker.conduit.frames import MAX_FRAME_BYTES, Frame
from fdbroker.errors import BrokerError, Code, Internal, NotFound, ResourceExhausted
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

OP = pb.Operation
_RESERVES_A_DESCRIPTOR = (OP.OPERATION_PUT, OP.OPERATION_CHECKIN)
_OPERATION_NAMES = {op: operation_name(op) for op in OP.values()}

Item = tuple[bytes, int, Entry]
"""One delivery: the token it is tagged with, its operation, the entry whose descriptor goes."""


class Routes(Protocol):
    """Where the conduit half of an operation completes, or is abandoned: the operation that issued the token."""

    def store(self, s: Session, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        """A PUT token's descriptor arrived: store it (ownership as :meth:`Registry.put`)."""
        ...

    def checkin(self, s: Session, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        """A CHECKIN token's descriptor arrived: make it the leased entry's (ownership as :meth:`Registry.put`)."""
        ...

    def take_done(self, s: Session, tok: Token) -> None:
        """A TAKE token was acked: the entry leaves. :class:`BrokerError` if the take cannot complete."""
        ...

    def checkin_abandoned(self, tok: Token) -> None:
        """A CHECKIN token left unredeemed."""
        ...

    def take_abandoned(self, tok: Token) -> None:
        """A TAKE token left unacked."""
        ...


@dataclass(slots=True, frozen=True)
class BatchPlan:
    """What a batch token delivers: entries by name and id, and their Deliver items after the first, encoded
    once when the tokens are issued (valid while every entry is at the recorded revision)."""

    names: tuple[str, ...]
    ids: tuple[int, ...]
    revisions: tuple[int, ...]
    rest: bytes
    first: int  # bytes of the first item's tail

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> BatchPlan:
        return cls(
            names=tuple(e.name for e in entries),
            ids=tuple(e.id for e in entries),
            revisions=tuple(e.revision for e in entries),
            rest=b"".join([encode_item(b"", OP.OPERATION_GET, e.deliver_tail()) for e in entries[1:]]),
            first=len(entries[0].deliver_tail()),
        )

    def fits(self, max_frame_bytes: int) -> bool:
        """Whether the plan's one ``Deliver`` frame fits ``max_frame_bytes`` now and after any later change of
        revisions (a revision is a varint of at most 10 bytes). A batch token's answer cannot be split (its items
        after the first carry no token), so a batch that does not fit gets no batch tokens."""
        body = field_bytes(64 + self.first) + len(self.rest) + 10 * len(self.names)
        return body + FRAME_OVERHEAD <= max_frame_bytes

    def current(self, find: Callable[[str], Entry | None], s: Session) -> list[Entry]:
        """The plan's entries, found again: NOT_FOUND if one was deleted or replaced since, FAILED_PRECONDITION if
        one is under another session's exclusive lease."""
        entries: list[Entry] = []
        for name, eid in zip(self.names, self.ids, strict=True):
            e = find(name)
            if e is None or e.id != eid:
                raise NotFound(
                    f"entry {name!r} was deleted or replaced since the batch token was issued; get the batch again",
                    name=name,
                )
            if e.lease is not None:
                check_lease_free(e, s, "get")
            entries.append(e)
        return entries

    def frame(self, token: bytes, entries: Sequence[Entry]) -> bytes:
        """The Deliver frame of ``entries`` (the plan's, found again), its first item tagged with ``token``."""
        n = len(entries)
        if tuple(e.revision for e in entries) == self.revisions:
            return frame_from_items(
                encode_item(token, OP.OPERATION_GET, entries[0].deliver_tail()) + self.rest, n
            )
        # A lease or metadata change since: same descriptors, fresh descriptions.
        return encode_deliver(
            [(token if i == 0 else b"", OP.OPERATION_GET, e.deliver_tail()) for i, e in enumerate(entries)], n
        )


def error_pb(err: BrokerError, token: bytes = b"") -> cpb.Error:
    """The conduit form of ``err``, naming ``token`` if given."""
    return cpb.Error(code=int(err.code), message=err.message, name=err.name, token=token)


def error_frame(code: Code, message: str, token: bytes = b"") -> cpb.ConduitFrame:
    return cpb.ConduitFrame(error=cpb.Error(code=int(code), message=message, token=token))


class Handoffs:
    """Tokens issued and redeemed, deliveries, the prefetch pool, and the deposits each put token reserves."""

    def __init__(
        self,
        tokens: TokenBook,
        registry: Registry,
        limits: Callable[[], Limits],
        routes: Routes,
        audit: Audit,
        *,
        clock: Callable[[], float],
        wakeup: Callable[[], None],
    ) -> None:
        #: Every frame sent fits it (:func:`delivery.in_frames`); the broker sets what its ``Welcome`` announces.
        self.max_frame_bytes = MAX_FRAME_BYTES
        self._audit = audit
        self._count = audit.metrics.handoff
        self._tokens = tokens
        self._registry = registry
        self._limits = limits
        self._routes = routes
        self._clock = clock
        self._wakeup = wakeup
        self._pending_puts: collections.Counter[int] = collections.Counter()

    # -- issuing -------------------------------------------------------------------------------------------------

    def issue(self, s: Session, op: int, name: str, entry_id: int = 0, payload: Any = None) -> Token:
        """A token for an explicit operation; RESOURCE_EXHAUSTED past the uid's pending-token quota."""
        uid = s.identity.uid
        limit = self._limits().max_pending_tokens_per_uid
        if self._tokens.pending_for_uid(uid) >= limit:
            err = ResourceExhausted(
                f"uid {uid} has {limit} handoff tokens pending, its limit; cannot hand off {name!r}: "
                "complete or let expire the handoffs in flight",
                name=name,
            )
            raise self._audit.exhausted(s, operation_name(op), "max_pending_tokens_per_uid", err)
        tok = self._tokens.issue(
            operation=op, name=name, session_id=s.id, uid=uid, entry_id=entry_id, payload=payload
        )
        if op in _RESERVES_A_DESCRIPTOR:
            self._pending_puts[uid] += 1
        self._wakeup()
        return tok

    def prefetch(
        self, s: Session, count: int, entries: Sequence[Entry], plan: BatchPlan | None = None
    ) -> tuple[list[bytes], int]:
        """Up to ``count`` speculative GET tokens, as many as the uid's prefetch pool has room for (maybe none:
        prefetching is an optimisation, and a full pool never fails the call that asked for it): of the one entry
        of ``entries``, or with ``plan`` batch tokens of all of them. Returns the tokens and their expiry on the
        wall clock in nanoseconds (what responses carry)."""
        uid = s.identity.uid
        room = self._limits().max_prefetch_tokens_per_uid - self._tokens.speculative_for_uid(uid)
        n = max(0, min(count, room))
        if not n:
            return [], 0
        slots = [fastpath.show(self._tokens.spec, e) for e in entries]
        e = entries[0]
        payload = (e.name, e.id, plan, s.id, uid)
        toks, expires_at = self._tokens.issue_prefetch(
            s.key, slots if plan is not None else slots[0], n, payload
        )
        self._wakeup()
        return toks, self._wall_ns(expires_at)

    def _wall_ns(self, expires_at: float) -> int:
        """An expiry on our clock as the wall-clock nanoseconds responses carry."""
        return int((time.time() + (expires_at - self._clock())) * 1e9)

    def handoff_pb(self, tok: Token) -> pb.Handoff:
        h = pb.Handoff(token=tok.token, operation=tok.operation, name=tok.name)  # type: ignore[arg-type]
        h.expire_time.FromNanoseconds(self._wall_ns(tok.expires_at))
        return h

    def cancel(self, tok: Token) -> None:
        """Take back a token whose operation failed before anything was reserved for it."""
        self._tokens.cancel(tok.token)

    def push(self, op: int, e: Entry) -> tuple[pb.Handoff, Item]:
        """A token for a delivery sent right now: issued and spent in the same step, so it never waits in the
        token book (and never counts as pending); it tags the Deliver item the client matches its RPC to."""
        token = self._tokens.random_token()
        h = pb.Handoff(token=token, operation=op, name=e.name)  # type: ignore[arg-type]
        return h, (token, op, e)

    def deliver(self, s: Session, items: Sequence[Item], first_extra: bytes = b"") -> None:
        """Send the entries' descriptors in Deliver frames of at most 253 items and ``max_frame_bytes``, tagged with
        their tokens (all of one operation). ``first_extra``: more serialized ``DeliverItem`` fields for the first
        item (a refill's tokens)."""
        if items:
            self._count(_OPERATION_NAMES[items[0][1]], "ok", len(items))
        tails = [(t, op, e.deliver_tail()) for t, op, e in items]
        if first_extra:
            t, op, tail = tails[0]
            tails[0] = (t, op, tail + first_extra)
        for data, a, b in deliver_frames(tails, self.max_frame_bytes):
            s.conn.send_raw(data, [e.fd for _, _, e in items[a:b]])

    # -- reservations and tokens that leave unredeemed -----------------------------------------------------------

    @property
    def pending_puts(self) -> int:
        """Descriptors announced by PUT and CHECKIN tokens not yet redeemed."""
        return sum(self._pending_puts.values())

    def pending_puts_for(self, uid: int) -> int:
        return self._pending_puts[uid]

    def pending_tokens_for(self, uid: int) -> int:
        """Explicit tokens of ``uid`` not yet redeemed (its pending-token quota counts these)."""
        return self._tokens.pending_for_uid(uid)

    def promised(self) -> int:
        """Descriptors the broker must keep room for besides its entries: deposits announced by a token, and
        descriptors given up but not yet closed (each still open in the broker's table until the closer gets
        to it)."""
        return self.pending_puts + closer.pending()

    def _unreserve_put(self, uid: int) -> None:
        self._pending_puts[uid] -= 1
        if self._pending_puts[uid] <= 0:
            del self._pending_puts[uid]

    def forget(self, tok: Token) -> None:
        """A token left the book unredeemed (expired, voided): undo what it reserved."""
        if tok.operation in _RESERVES_A_DESCRIPTOR:
            self._count(operation_name(tok.operation), "abandoned")
            self._unreserve_put(tok.uid)
        if tok.operation == OP.OPERATION_CHECKIN:
            self._routes.checkin_abandoned(tok)
        elif tok.operation == OP.OPERATION_TAKE:
            self._routes.take_abandoned(tok)

    def expire(self, now: float) -> None:
        """Drop the tokens that are due."""
        for tok in self._tokens.expire(now):
            self.forget(tok)

    def void_session(self, s: Session) -> None:
        """The session ended: every token it holds is void."""
        for tok in self._tokens.void_session(s.id, s.key):
            self.forget(tok)

    def _void(self, token: bytes, s: Session) -> None:
        tok = self._tokens.peek(token, session_id=s.id, session_key=s.key) if len(token) else None
        if tok is not None:
            self._tokens.cancel(token)
            self.forget(tok)

    # -- Deposit -------------------------------------------------------------------------------------------------

    def on_deposit(self, s: Session, frame: Frame) -> int:
        """Store each descriptor of a ``Deposit`` under its token, answer ``Deposited``, return the first error code.

        A frame whose descriptors do not match its tokens one to one is refused whole: every descriptor goes to
        the closer, every token is spent, and each token gets an ``Error`` frame naming it (one ``Error`` without
        a token if there was none).

        Ownership: the descriptors leave ``frame.fds`` at once; each becomes an entry's (the registry owns it) or
        goes to the closer, on every path, unexpected errors included.
        """
        tokens = list(frame.message.deposit.tokens)
        fds, frame.fds = frame.fds, []
        uid = s.identity.uid
        if len(tokens) != len(fds):
            closer.discard(fds, uid)
            message = (
                f"deposit frame carries {len(fds)} descriptors for {len(tokens)} tokens; all were closed"
            )
            for t in tokens:  # the tokens are spent: a half-understood frame must not be retried blindly
                self._void(t, s)
            for t in tokens or [b""]:
                s.conn.send(error_frame(Code.INVALID_ARGUMENT, message, token=t))
            return Code.INVALID_ARGUMENT
        results: list[cpb.DepositResult] = []
        waiting = collections.deque(fds)
        try:
            for t in tokens:
                results.append(self._deposit_one(s, t, waiting.popleft()))  # it owns the descriptor now
        finally:
            closer.discard(waiting, uid)  # left over only if a deposit raised: nobody took them
        # A Deposit of no tokens is answered too: by one empty Deposited.
        for a, b in in_frames([field_bytes(r.ByteSize()) for r in results], self.max_frame_bytes) or [(0, 0)]:
            s.conn.send(cpb.ConduitFrame(deposited=cpb.Deposited(results=results[a:b])))
        return next((r.error.code for r in results if r.error.code), 0)

    def _deposit_one(self, s: Session, token: bytes, fd: int) -> cpb.DepositResult:
        """Redeem a PUT or CHECKIN token and hand ``fd`` to its operation.

        Ownership: on success the registry owns ``fd``; on any failure, expected or not, ``fd`` went to the
        closer before this returns or raises. Everything that can fail about the answer is built before the
        registry takes ``fd``.
        """
        stored = False
        name = ""
        try:
            try:
                tok = self._tokens.redeem(
                    token, session_id=s.id, operations=_RESERVES_A_DESCRIPTOR, session_key=s.key
                )
            except TokenError as err:
                self._audit.refused("put", s, "", err, token=short(token))  # unrecognized: counted as a put
                return cpb.DepositResult(token=token, error=error_pb(err))
            self._unreserve_put(tok.uid)
            name = tok.name
            try:
                info = fdinfo.describe(fd)
                store = self._routes.checkin if tok.operation == OP.OPERATION_CHECKIN else self._routes.store
                entry = store(s, tok, fd, info)
                stored = True
            except (BrokerError, OSError) as exc:
                refusal = exc if isinstance(exc, BrokerError) else Internal(str(exc), name=tok.name)
                self._audit.refused(operation_name(tok.operation), s, tok.name, refusal)
                return cpb.DepositResult(token=token, name=tok.name, error=error_pb(refusal))
            self._audit.deposited(s, tok, entry, info)
            return cpb.DepositResult(
                token=token,
                name=entry.name,
                revision=entry.revision,
                entry=pb.Entry.FromString(entry.pb_bytes()),
            )
        finally:
            held = self._registry.find(name) if name else None
            if not stored and (held is None or held.fd != fd):
                closer.discard(fd, s.identity.uid)

    # -- Ack -----------------------------------------------------------------------------------------------------

    def on_ack(self, s: Session, frame: Frame) -> int:
        """Complete each acked take; answer ``Acked`` for those done, an ``Error`` naming each that is not.
        Returns the first error's code (0: none)."""
        acked: list[bytes] = []
        code = 0
        for t in frame.message.ack.tokens:
            try:
                tok = self._tokens.redeem(
                    t, session_id=s.id, operations=(OP.OPERATION_TAKE,), session_key=s.key
                )
                self._routes.take_done(s, tok)
            except BrokerError as err:
                self._audit.refused("take", s, "", err, token=short(t))
                s.conn.send(cpb.ConduitFrame(error=error_pb(err, token=t)))
                code = code or err.code
                continue
            acked.append(t)
        rev = self._registry.revision
        for a, b in in_frames([field_bytes(len(t)) for t in acked], self.max_frame_bytes, most=len(acked)):
            s.conn.send(cpb.ConduitFrame(acked=cpb.Acked(tokens=acked[a:b], revision=rev)))
        return code
