"""Entries: put, get, take, delete, stat and list, the control-plane half of each, and the one way an entry leaves.

Each operation checks the name, the policy (against the session's kernel-verified identity) and the entry's lease
state, then either answers at once (stat, list, delete) or hands the descriptor's part to :mod:`.handoffs`: a put
issues a token and stores the descriptor when its ``Deposit`` arrives (:meth:`Entries.store`); a get delivers at
once; a take delivers and removes the entry only when the receiver acks (:meth:`Entries.take_done`).

Descriptor ownership: the registry owns every entry's descriptor. :meth:`Entries.remove` is the one way an entry
leaves (delete, completed take, expiry, its session's end): its leases end first, then the registry gives the
descriptor to the closer.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Sequence

from fdbroker import limits
from fdbroker.broker.access import check_put, entry_for
from fdbroker.broker.audit import Audit, Who
from fdbroker.broker.delivery import encode_repeated
from fdbroker.broker.handoffs import BatchPlan, Handoffs
from fdbroker.broker.leasing import Leasing, check_lease_free
from fdbroker.broker.policy import Identity, Policy
from fdbroker.broker.redeem import Refilled
from fdbroker.broker.registry import Entry, Owner, PutOptions, Registry
from fdbroker.broker.sessions import Session, SessionTable
from fdbroker.broker.tokens import Token, short
from fdbroker.conduit.frames import SCM_MAX_FD
from fdbroker.errors import (
    BrokerError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from fdbroker.names import parse_label_selector, validate_labels, validate_name
from fdbroker.v1 import broker_pb2 as pb

OP = pb.Operation
EV = pb.Event
_LIST_ENTRIES = b"\x0a"  # ListResponse.entries = 1


class Entries:
    """The operations on entries. ``policy()`` is the policy in force; ``wakeup()`` tells housekeeping that a
    new expiry may be due sooner than it thought."""

    def __init__(
        self,
        registry: Registry,
        sessions: SessionTable,
        handoffs: Handoffs,
        leasing: Leasing,
        policy: Callable[[], Policy],
        audit: Audit,
        *,
        wakeup: Callable[[], None],
    ) -> None:
        self._audit = audit
        self._registry = registry
        self._sessions = sessions
        self._handoffs = handoffs
        self._leasing = leasing
        self._policy = policy
        self._wakeup = wakeup

    # -- put -----------------------------------------------------------------------------------------------------

    def _check_put(self, s: Session, name: str, opts: PutOptions, extra_pending: int = 0) -> None:
        uid = s.identity.uid
        old = self._registry.find(name)
        check_put(self._policy(), s.identity, name, old)
        if old is not None and (opts.replace or opts.if_revision):  # without replace: ALREADY_EXISTS below
            check_lease_free(old, s, "replace")
        try:
            self._registry.check_put(name, uid, opts, pending=self._handoffs.promised() + extra_pending)
        except ResourceExhausted as err:
            raise self._audit.exhausted(s, "put", "capacity", err) from None
        limit = self._policy().limits.max_entries_per_uid
        held = self._registry.count_for_uid(uid)
        if old is None and held + self._handoffs.pending_puts_for(uid) + extra_pending >= limit:
            full = ResourceExhausted(
                f"uid {uid} holds {held} entries, its limit ({limit}); "
                f"cannot store {name!r}: delete some, or raise max_entries_per_uid in the policy",
                name=name,
            )
            raise self._audit.exhausted(s, "put", "max_entries_per_uid", full)

    def put_begin(self, s: Session, req: pb.PutRequest) -> pb.PutResponse:
        """Check a put and issue its token; the descriptor follows in a ``Deposit`` frame."""
        opts = _put_options(req)
        self._check_put(s, req.name, opts)
        tok = self._handoffs.issue(s, OP.OPERATION_PUT, req.name, payload=opts)
        return pb.PutResponse(handoff=self._handoffs.handoff_pb(tok))

    def batch_put_begin(self, s: Session, req: pb.BatchPutRequest) -> pb.BatchPutResponse:
        if len(req.requests) > limits.MAX_BATCH:
            raise InvalidArgument(f"at most {limits.MAX_BATCH} puts per batch, got {len(req.requests)}")
        seen: set[str] = set()
        planned: list[tuple[str, PutOptions]] = []
        for i, r in enumerate(req.requests):
            opts = _put_options(r)
            if r.name in seen:
                raise InvalidArgument(f"{r.name!r} appears twice in the batch", name=r.name)
            seen.add(r.name)
            new = 0 if r.name in self._registry else 1
            self._check_put(s, r.name, opts, extra_pending=i * new)
            planned.append((r.name, opts))
        limit = self._policy().limits.max_pending_tokens_per_uid
        if self._handoffs.pending_tokens_for(s.identity.uid) + len(planned) > limit:
            err = ResourceExhausted(f"a batch of {len(planned)} would pass the pending-token limit ({limit})")
            raise self._audit.exhausted(s, "put", "max_pending_tokens_per_uid", err)
        toks = [self._handoffs.issue(s, OP.OPERATION_PUT, name, payload=opts) for name, opts in planned]
        return pb.BatchPutResponse(handoffs=[self._handoffs.handoff_pb(t) for t in toks])

    def store(self, s: Session, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        """A put's descriptor arrived with its (redeemed) token: check the put again and store it.

        Ownership: on success the registry owns ``fd``; on a :class:`BrokerError` it is still the caller's.
        """
        opts: PutOptions = tok.payload
        self._check_put(s, tok.name, opts)
        owner = Owner(s.identity.pid, s.identity.uid, s.identity.gid)
        entry = self._registry.put(tok.name, fd, info, owner, s.id, opts, pending=self._handoffs.promised())
        if opts.ephemeral:
            s.ephemeral.add(tok.name)
        self._wakeup()
        return entry

    # -- get / take ----------------------------------------------------------------------------------------------

    def _readable(self, s: Session, name: str, action: str) -> Entry:
        e = entry_for(self._policy(), self._registry, s.identity, action, name)
        check_lease_free(e, s, action)
        return e

    def get(self, s: Session, name: str, prefetch: int = 0) -> pb.GetResponse:
        """Hand a copy of ``name`` to the session: ``Deliver`` is sent before this returns."""
        if prefetch > limits.MAX_PREFETCH:
            raise InvalidArgument(f"prefetch is at most {limits.MAX_PREFETCH}, got {prefetch}", name=name)
        e = self._readable(s, name, "get")
        resp = pb.GetResponse(entry=e.to_pb())
        if prefetch:
            toks, expire_ns = self._handoffs.prefetch(s, prefetch, [e])
            if toks:
                resp.prefetch_tokens.extend(toks)
                resp.prefetch_expire_time.FromNanoseconds(expire_ns)
        h, item = self._handoffs.push(OP.OPERATION_GET, e)
        resp.handoffs.append(h)
        self._handoffs.deliver(s, [item])
        self._audit.ok("get", s, name, e, prefetch=len(resp.prefetch_tokens) or "")
        return resp

    def refill(self, s: Session, e: Entry, count: int) -> Refilled:
        """``Redeem.refill``: up to ``count`` (1..MAX_PREFETCH) more prefetched tokens of ``e``, whose descriptor the
        ``Redeem`` delivers, decided again as :meth:`get` decides its ``prefetch`` — the policy for ``get`` on the
        name (a denial is audited and counted as the RPC's), the lease, the uid's pool — and audited as that
        ``get`` would be, once per refill that issued tokens (their redemptions are counted, not logged). A
        refusal issues none: the tokens and their expiry (wall clock, ns), or ``([], 0)``."""
        try:
            found = self._readable(s, e.name, "get")
        except BrokerError:
            return [], 0
        if (
            found is not e
        ):  # replaced since the token was redeemed: cannot happen on one thread, but never guess
            return [], 0
        toks, expire_ns = self._handoffs.prefetch(s, count, [e])
        if toks:
            self._audit.ok("get", s, e.name, e, prefetch=len(toks), via="refill")
        return toks, expire_ns

    def batch_get(self, s: Session, names: Sequence[str], prefetch: int = 0) -> pb.BatchGetResponse:
        if len(names) > limits.MAX_BATCH:
            raise InvalidArgument(f"at most {limits.MAX_BATCH} names per batch, got {len(names)}")
        if prefetch > limits.MAX_BATCH_PREFETCH:
            raise InvalidArgument(f"batch prefetch is at most {limits.MAX_BATCH_PREFETCH}, got {prefetch}")
        entries = [self._readable(s, n, "get") for n in names]
        resp = pb.BatchGetResponse(entries=[e.to_pb() for e in entries])
        plan = BatchPlan.of(entries) if prefetch and 0 < len(entries) <= SCM_MAX_FD else None
        if plan is not None and plan.fits(
            self._handoffs.max_frame_bytes
        ):  # shared by every token of this batch
            toks, expire_ns = self._handoffs.prefetch(s, prefetch, entries, plan)
            if toks:
                resp.prefetch_tokens.extend(toks)
                resp.prefetch_expire_time.FromNanoseconds(expire_ns)
        pushes = [self._handoffs.push(OP.OPERATION_GET, e) for e in entries]
        resp.handoffs.extend([p[0] for p in pushes])
        self._handoffs.deliver(s, [p[1] for p in pushes])
        if self._audit.enabled():
            for e in entries:
                self._audit.ok("get", s, e.name, e, batch=len(entries))
        return resp

    def take(self, s: Session, name: str, if_revision: int = 0) -> pb.TakeResponse:
        """Deliver ``name`` for a move; the entry leaves only when the receiver acks the token."""
        e = self._readable(s, name, "take")
        if if_revision and e.revision != if_revision:
            raise FailedPrecondition(
                f"entry {name!r} is at revision {e.revision}, not {if_revision}; nothing was taken", name=name
            )
        if e.taking is not None:
            raise FailedPrecondition(f"entry {name!r} is already being taken; retry shortly", name=name)
        tok = self._handoffs.issue(s, OP.OPERATION_TAKE, name, e.id)
        try:
            resp = pb.TakeResponse(entry=e.to_pb(), handoff=self._handoffs.handoff_pb(tok))
        except BaseException:
            self._handoffs.cancel(tok)
            raise
        # The answer is built: nothing fails between the Deliver and the RPC's return.
        e.taking = tok.token
        self._handoffs.deliver(s, [(tok.token, OP.OPERATION_TAKE, e)])
        return resp

    def take_done(self, s: Session, tok: Token) -> None:
        """The receiver acked a take: the entry leaves (DELETE, reason TAKEN). :class:`NotFound` if it is gone."""
        e = self._registry.find(tok.name)
        if e is None or e.id != tok.entry_id or e.taking != tok.token:
            raise NotFound(f"entry {tok.name!r} is gone; the take did not complete", name=tok.name)
        e.taking = None
        self.remove(e, EV.TYPE_DELETE, EV.REASON_TAKEN)
        self._audit.ok("take", s, tok.name, e)

    def take_abandoned(self, tok: Token) -> None:
        """A take's token left unacked (the receiver got a copy but did not confirm): the entry stays."""
        e = self._registry.find(tok.name)
        if e is not None and e.taking == tok.token:
            e.taking = None
            who = self._sessions.get(tok.session_id) or Who(None, tok.uid, None, tok.session_id)
            self._audit.abandoned("take", who, tok.name, e, token=short(tok.token))

    # -- delete / stat / list ------------------------------------------------------------------------------------

    def delete(self, s: Session | None, name: str, if_revision: int = 0) -> pb.DeleteResponse:
        validate_name(name)
        if s is None:
            err = Unauthenticated(
                f"deleting {name!r} needs a session (the policy decides by the caller's uid): connect the conduit",
                name=name,
            )
            raise self._audit.denied(None, "delete", name, err)
        e = entry_for(self._policy(), self._registry, s.identity, "delete", name)
        check_lease_free(e, s, "delete")
        if if_revision and e.revision != if_revision:
            raise FailedPrecondition(
                f"entry {name!r} is at revision {e.revision}, not {if_revision}; nothing was deleted",
                name=name,
            )
        if e.taking is not None:
            raise FailedPrecondition(f"entry {name!r} is being taken; retry when the take is done", name=name)
        self.remove(e, EV.TYPE_DELETE, 0)
        self._audit.ok("delete", s, name, e)
        return pb.DeleteResponse()

    def stat(self, identity: Identity | None, name: str) -> pb.StatResponse:
        e = entry_for(self._policy(), self._registry, identity, "stat", name)
        return pb.StatResponse(entry=e.to_pb())

    def list(self, identity: Identity | None, req: pb.ListRequest, *, max_bytes: int = 0) -> pb.ListResponse:
        """One page of entries. ``max_bytes`` (conduit queries) also ends the page before it outgrows a frame."""
        policy = self._policy()
        policy.check(identity, "list")
        size = limits.page_size(req.page_size)
        after = ""
        if req.page_token:
            after = _decode_page_token(req.page_token, req.prefix, req.label_selector)
        sel = parse_label_selector(req.label_selector) if req.label_selector else None

        def match(e: Entry) -> bool:
            # Entries the caller may not list are skipped, not refused: a listing shows what it may see.
            if not policy.allows(identity, "list", e.name, e.owner.uid):
                return False
            return sel is None or sel.matches(e.labels)

        entries, last = self._registry.page(req.prefix, after=after, limit=size, match=match)
        blobs = [e.pb_bytes() for e in entries]
        if max_bytes:
            total = 0
            for i, b in enumerate(blobs):
                total += len(b) + 4
                if total > max_bytes and i:
                    entries, blobs, last = entries[:i], blobs[:i], entries[i - 1].name
                    break
        # Spliced from each entry's cached bytes and parsed once: 19,900 to_pb() + extend() copies cost ~5x more.
        resp = pb.ListResponse.FromString(encode_repeated(_LIST_ENTRIES, blobs))
        if last:
            resp.next_page_token = _encode_page_token(last, req.prefix, req.label_selector)
        return resp

    # -- removal -------------------------------------------------------------------------------------------------

    def remove(self, e: Entry, event: int, reason: int) -> None:
        """Remove an entry, the one way any entry leaves: its leases end first (LEASE_RELEASED, reason
        ENTRY_REMOVED), then the entry goes (``event``, ``reason``), then requests queued for its lease fail."""
        waiters = self._leasing.end_entry(e)
        self._registry.remove(e.name, event=event, reason=reason)
        s = self._sessions.get(e.session_id)
        if s is not None:
            s.ephemeral.discard(e.name)
        for w in waiters:
            w.grant()  # the waiter sees the entry gone and fails with NOT_FOUND


def _put_options(req: pb.PutRequest) -> PutOptions:
    validate_name(req.name)
    try:
        validate_labels(req.options.labels)
    except InvalidArgument as err:  # name the entry: a batch may carry many
        raise InvalidArgument(f"labels of {req.name!r}: {err.message}", name=req.name) from None
    ttl = limits.duration(
        req.options.ttl,
        "entry ttl",
        minimum=limits.MIN_ENTRY_TTL,
        maximum=limits.MAX_ENTRY_TTL,
        name=req.name,
    )
    return PutOptions(
        labels=dict(req.options.labels),
        ttl=ttl,
        ephemeral=req.options.ephemeral,
        replace=req.replace,
        if_revision=req.if_revision,
    )


_PAGE_TOKEN_VERSION = b"\x01"


def _page_scope(prefix: str, selector: str) -> bytes:
    """8 bytes binding a page token to the listing it continues (same prefix, same selector)."""
    return hashlib.blake2b(f"{prefix}\0{selector}".encode(), digest_size=8).digest()


def _encode_page_token(last: str, prefix: str, selector: str) -> str:
    """An opaque continuation: version byte, scope hash, the last name sent. Flat bytes, so decoding cannot
    recurse or allocate more than the token's own (bounded) length."""
    raw = _PAGE_TOKEN_VERSION + _page_scope(prefix, selector) + last.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, prefix: str, selector: str) -> str:
    bad = InvalidArgument(
        "invalid page_token: pass the next_page_token of the previous response unchanged, with the same prefix "
        "and label selector"
    )
    if len(token) > limits.MAX_PAGE_TOKEN:
        raise bad
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        last = raw[9:].decode()
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise bad from None
    if raw[:1] != _PAGE_TOKEN_VERSION or raw[1:9] != _page_scope(prefix, selector) or not last:
        raise bad
    return last
