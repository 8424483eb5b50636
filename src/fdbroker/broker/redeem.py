"""Redeem frames: prefetched GET tokens redeemed on the conduit, and the refills they ask for on the way.

A single token delivers its entry's descriptor (answered together with the frame's other single tokens); a batch
token its batch's, in a frame of its own; each token that fails an ``Error`` naming it. ``Redeem.refill`` asks for
more tokens of the first token's entry: the broker decides as the Get RPC decides its ``prefetch`` (the route it is
given, :meth:`fdbroker.broker.entries.Entries.refill`) and puts them in that token's ``DeliverItem``
(docs/conduit-protocol.md §3.5.1). The native data plane answers the frames of nothing but tokens that all deliver
now (``fastpath.py``, ``_native.c``); everything else comes here, and answers the same.

Descriptor ownership: deliveries send the registry's own descriptors (the kernel duplicates them into the
receiver); the registry keeps its copies. A ``Redeem`` carries none.
"""

from __future__ import annotations

from collections.abc import Callable

from fdbroker import limits
from fdbroker.broker import fastpath
from fdbroker.broker.audit import Audit
from fdbroker.broker.delivery import FRAME_OVERHEAD, field_bytes
from fdbroker.broker.handoffs import BatchPlan, Handoffs, Item, error_pb
from fdbroker.broker.leasing import check_lease_free
from fdbroker.broker.registry import Entry, Registry
from fdbroker.broker.sessions import Session
from fdbroker.broker.tokens import TokenBook, short
from fdbroker.conduit.frames import Frame
from fdbroker.errors import BrokerError, Code, InvalidArgument, NotFound
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

OP = pb.Operation
_TOKEN_FIELD = 2 + 32  # a 32-byte token as a length-delimited field: key, length, bytes
_EXPIRE_FIELD = 24  # DeliverItem.prefetch_expire_time: a Timestamp of two varints, keyed, at most

Refilled = tuple[list[bytes], int]
"""Prefetched tokens issued and their expiry on the wall clock in nanoseconds (``([], 0)``: none)."""

RefillRoute = Callable[[Session, Entry, int], Refilled]
"""Where a refill is decided: a ``Redeem`` that delivers the entry asks for up to that many more prefetched tokens
of it; decide as the Get RPC with ``prefetch`` would (policy, lease, the uid's pool) and issue them; none when
refused."""


class Redemptions:
    """The ``Redeem`` frames of every session: tokens from ``tokens``, entries from ``registry``, deliveries and the
    prefetch pool through ``handoffs``, refills decided by ``refill``."""

    def __init__(
        self, handoffs: Handoffs, tokens: TokenBook, registry: Registry, audit: Audit, refill: RefillRoute
    ) -> None:
        self._handoffs = handoffs
        self._tokens = tokens
        self._registry = registry
        self._audit = audit
        self._count = audit.metrics.handoff
        self._refill_route = refill

    def on_redeem(self, s: Session, frame: Frame) -> int:
        """Deliver every prefetched GET token of a ``Redeem`` frame; an ``Error`` naming each bad one. Returns the
        first error's code (0: none). With ``refill``, the first token's item carries the tokens issued
        (:meth:`_refill`); a ``refill`` out of range refuses the frame before any token is spent."""
        redeem = frame.message.redeem
        refill = redeem.refill
        if refill > limits.MAX_PREFETCH:
            err = InvalidArgument(
                f"refill is at most {limits.MAX_PREFETCH}, got {refill}; no token of the frame was spent"
            )
            for t in redeem.tokens:
                s.conn.send(cpb.ConduitFrame(error=error_pb(err, token=t)))
            return Code.INVALID_ARGUMENT
        ok: list[Item] = []
        code = 0
        extra = b""
        for i, t in enumerate(redeem.tokens):
            try:
                item = self._redeem_one(s, t)
            except BrokerError as err:
                self._audit.refused("get", s, "", err, token=short(t))
                s.conn.send(cpb.ConduitFrame(error=error_pb(err, token=t)))
                code = code or err.code
                continue
            if item is not None:
                if i == 0 and refill:
                    extra = self._refill(s, item[2], refill)
                ok.append(item)
        if ok:
            self._handoffs.deliver(s, ok, extra)
        return code

    def _refill(self, s: Session, e: Entry, count: int) -> bytes:
        """Up to ``count`` new prefetched tokens of ``e`` (as many as the policy, the pool and the answer's frame
        allow: maybe none), as the serialized ``DeliverItem`` fields that carry them."""
        room = (
            self._handoffs.max_frame_bytes
            - FRAME_OVERHEAD
            - field_bytes(64 + len(e.deliver_tail()))
            - _EXPIRE_FIELD
        )
        count = min(count, room // _TOKEN_FIELD)
        if count <= 0:
            return b""
        toks, expire_ns = self._refill_route(s, e, count)
        if not toks:
            return b""
        item = cpb.DeliverItem(prefetch_tokens=toks)
        item.prefetch_expire_time.FromNanoseconds(expire_ns)
        return item.SerializeToString()

    def _redeem_one(self, s: Session, t: bytes) -> Item | None:
        """Redeem one prefetched GET token: a batch token is delivered at once (None), a single one returned
        (and its entry shown to the prefetch table again: :func:`fastpath.show`)."""
        tok = self._tokens.redeem(t, session_id=s.id, operations=(OP.OPERATION_GET,), session_key=s.key)
        if isinstance(tok.payload, BatchPlan):
            self._redeem_batch(s, tok.token, tok.payload)
            return None
        e = self._registry.find(tok.name)
        if e is None or e.id != tok.entry_id:
            raise NotFound(
                f"entry {tok.name!r} was deleted or replaced since the token was issued; get it again",
                name=tok.name,
            )
        check_lease_free(e, s, "get")
        fastpath.show(self._tokens.spec, e)
        return (tok.token, OP.OPERATION_GET, e)

    def _redeem_batch(self, s: Session, token: bytes, plan: BatchPlan) -> None:
        """Deliver every entry of a prefetched batch in one frame, the first item tagged with ``token``."""
        entries = plan.current(self._registry.find, s)
        s.conn.send_raw(plan.frame(token, entries), [e.fd for e in entries])
        self._count("get", "ok", len(entries))
        for e in entries:
            fastpath.show(self._tokens.spec, e)
