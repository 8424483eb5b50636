"""The broker's core: every operation, in terms of sessions and identities, independent of gRPC.

The servicer (:mod:`fdbroker.broker.servicer`) translates RPCs into calls here; the conduit server
(:mod:`fdbroker.broker.listener`) hands incoming frames to :meth:`Broker.on_frame`. Everything runs on one event
loop, so nothing here locks. Errors are :class:`fdbroker.errors.BrokerError` subclasses.

Descriptor ownership: a descriptor that arrives in a ``Deposit`` frame belongs to the broker from the moment it
is received; it either becomes an entry's descriptor (the registry owns it) or is closed before the frame's
answer is sent. Deliveries send the registry's own descriptor with SCM_RIGHTS (the kernel duplicates it into the
receiver); the registry keeps its copy, except after a completed take, when it closes it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fdbroker import __version__, fdinfo, limits
from fdbroker.broker import closer
from fdbroker.broker.delivery import encode_deliver, encode_item, encode_repeated, frame_from_items
from fdbroker.broker.leasing import EXCLUSIVE, SHARED, EpochCounter, Holder, LeaseTable, Waiter
from fdbroker.broker.policy import Identity, Limits, Policy
from fdbroker.broker.registry import Entry, Owner, PutOptions, Registry
from fdbroker.broker.sessions import FrameSink, Session, SessionTable
from fdbroker.broker.tokens import Token, TokenBook, TokenError, short
from fdbroker.broker.watch import Watcher, WatchHub
from fdbroker.conduit.frames import MAX_FRAME_BYTES, SCM_MAX_FD, Frame
from fdbroker.errors import (
    BrokerError,
    Code,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
)
from fdbroker.names import parse_label_selector, validate_labels, validate_name
from fdbroker.protocol import SESSION_METADATA_KEY, lease_wait_reserve
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

log = logging.getLogger("fdbroker.broker")

MAX_PREFETCH = 1024
MAX_BATCH_PREFETCH = 64
MAX_BATCH = 10_000

OP = pb.Operation
_LIST_ENTRIES = b"\x0a"  # ListResponse.entries = 1


@dataclass
class BrokerConfig:
    """Tunables of one broker. ``capacity`` is the number of descriptors it may hold in all."""

    capacity: int
    token_ttl: float = 5.0
    history: int = 10_000
    max_frame_bytes: int = MAX_FRAME_BYTES
    watch_queue: int = 4096  # events buffered per watcher before it is cut off
    extra: dict[str, Any] = field(default_factory=dict)


def _dur(seconds: float) -> Any:
    from google.protobuf import duration_pb2

    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class Broker:
    """Registry + tokens + sessions + policy + leases, and the operations on them."""

    def __init__(
        self,
        config: BrokerConfig,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
        wakeup: Callable[[], None] = lambda: None,
    ) -> None:
        """``wakeup`` is called whenever something new may be due before the time :meth:`tick` last returned
        (the server's housekeeping then calls :meth:`tick` again)."""
        self.config = config
        self.policy = policy
        self.clock = clock
        self.registry = Registry(capacity=config.capacity, history=config.history, clock=clock)
        self.tokens = TokenBook(config.token_ttl, clock=clock)
        self.sessions = SessionTable(max_per_uid=policy.limits.max_sessions_per_uid)
        self._epochs = EpochCounter()
        self.watches = WatchHub(self.registry, lambda: self.policy, queue_limit=config.watch_queue)
        self.leases: dict[str, Holder] = {}
        self.start_time = time.time()
        self._pending_puts: collections.Counter[int] = collections.Counter()
        self._wakeup = wakeup

    # -- what the server and survival need --------------------------------------------------------------------------

    @property
    def limits(self) -> Limits:
        """The per-uid quotas of the policy in force."""
        return self.policy.limits

    def set_policy(self, policy: Policy) -> None:
        """Put a (re)loaded policy in force: every later decision and quota uses it."""
        self.policy = policy
        self.sessions.max_per_uid = policy.limits.max_sessions_per_uid

    def next_epoch(self) -> int:
        """Draw the next fencing epoch (a handover gives it to the successor to continue above)."""
        return self._epochs.next()

    def continue_epochs(self, above: int) -> None:
        """Make every later fencing epoch higher than ``above`` (a predecessor's or a crashed broker's last one),
        still following the clock."""
        self._epochs = EpochCounter(seed=max(above, int(time.time() * 1_000_000)))

    def watch(self, identity: Identity | None, prefix: str, start_revision: int) -> Watcher:
        """A watcher of ``prefix`` (see :meth:`WatchHub.open` for its errors)."""
        return self.watches.open(identity, prefix, start_revision)

    def end_handed_over_sessions(self, leases: Sequence[tuple[str, pb.LeaseHolder]]) -> None:
        """After a handover: the predecessor's sessions did not come along, so their leases end (reason
        HANDOVER) and their ephemeral entries go (reason SESSION_ENDED)."""
        for name, held in leases:
            e = self.registry.find(name)
            if e is None:
                continue
            lt = e.lease
            if lt is None:
                lt = e.lease = LeaseTable()
            ident = Identity(held.identity.pid, held.identity.uid, held.identity.gid)
            h = Holder(
                lease_id=held.lease_id,
                name=name,
                entry_id=e.id,
                session_id="",
                identity=ident,
                mode=lt.mode or EXCLUSIVE,
                epoch=held.epoch,
                ttl=0.0,
                expires_at=self.clock(),
                expire_time=held.expire_time.ToNanoseconds() / 1e9,
            )
            lt.holders[h.lease_id] = h
            self.leases[h.lease_id] = h
            self._end_lease(h, pb.Event.REASON_HANDOVER)
        for e in sorted((e for e in self.registry if e.ephemeral), key=lambda e: e.name):
            self._remove_entry(e, pb.Event.TYPE_DELETE, pb.Event.REASON_SESSION_ENDED)

    # -- sessions ------------------------------------------------------------------------------------------------

    def open_session(self, identity: Identity, conn: FrameSink) -> Session:
        """A new conduit connection: create its session and send ``Welcome``."""
        s = self.sessions.open(identity, conn)
        w = cpb.Welcome(
            session_id=s.id,
            identity=pb.Identity(pid=identity.pid, uid=identity.uid, gid=identity.gid),
            version=__version__,
            max_frame_bytes=self.config.max_frame_bytes,
        )
        w.token_ttl.CopyFrom(_dur(self.tokens.ttl))
        conn.send(cpb.ConduitFrame(welcome=w))
        log.info("session %s… opened for pid %d uid %d", s.id[:6], identity.pid, identity.uid)
        return s

    def end_session(self, s: Session) -> None:
        """The conduit connection ended: release leases, void tokens, drop ephemeral entries, all at once.

        Leases go first, so their events say HOLDER_DIED (not RELEASED by a voided check-in token, nor
        ENTRY_REMOVED by the removal of the session's own ephemeral entry).
        """
        if not self.sessions.close(s):
            return
        for lease_id in sorted(s.leases):
            h = self.leases.get(lease_id)
            if h is not None:
                self._end_lease(h, pb.Event.REASON_HOLDER_DIED)
        for tok in self.tokens.void_session(s.id):
            self._forget_token(tok)
        for name in sorted(s.ephemeral):
            e = self.registry.find(name)
            if e is not None and e.session_id == s.id and e.ephemeral:
                self._remove_entry(e, pb.Event.TYPE_DELETE, pb.Event.REASON_SESSION_ENDED)
        log.info("session %s… (pid %d) ended", s.id[:6], s.identity.pid)

    def session_for(self, session_id: str | None) -> Session | None:
        """The session a call names (None for anonymous); :class:`Unauthenticated` for an unknown id."""
        if not session_id:
            return None
        s = self.sessions.get(session_id)
        if s is None:
            raise Unauthenticated(
                "unknown or ended session; reconnect to the conduit for a new session id "
                "(sessions end when their conduit connection closes)"
            )
        return s

    @staticmethod
    def _need_session(s: Session | None, what: str, name: str = "") -> Session:
        if s is None:
            raise Unauthenticated(
                f"{what} moves a descriptor and needs a session: connect to the conduit first and send the "
                f"session id as metadata {SESSION_METADATA_KEY!r}",
                name=name,
            )
        return s

    # -- tokens --------------------------------------------------------------------------------------------------

    def _issue(self, s: Session, op: int, name: str, entry_id: int = 0, payload: Any = None) -> Token:
        """A token for an explicit operation; RESOURCE_EXHAUSTED past the uid's pending-token quota."""
        uid = s.identity.uid
        limit = self.policy.limits.max_pending_tokens_per_uid
        if self.tokens.pending_for_uid(uid) >= limit:
            raise ResourceExhausted(
                f"uid {uid} has {limit} handoff tokens pending, its limit; cannot hand off {name!r}: "
                "complete or let expire the handoffs in flight",
                name=name,
            )
        tok = self.tokens.issue(
            operation=op, name=name, session_id=s.id, uid=uid, entry_id=entry_id, payload=payload
        )
        if op in (OP.OPERATION_PUT, OP.OPERATION_CHECKIN):
            self._pending_puts[uid] += 1
        self._wakeup()
        return tok

    def _prefetch(self, s: Session, count: int, name: str, entry_id: int, payload: Any = None) -> list[Token]:
        """Up to ``count`` speculative GET tokens, as many as the uid's prefetch pool has room for (maybe none:
        prefetching is an optimisation, and a full pool never fails the call that asked for it)."""
        uid = s.identity.uid
        room = self.policy.limits.max_prefetch_tokens_per_uid - self.tokens.speculative_for_uid(uid)
        issue = self.tokens.issue
        toks = [
            issue(
                operation=OP.OPERATION_GET,
                name=name,
                session_id=s.id,
                uid=uid,
                entry_id=entry_id,
                payload=payload,
                speculative=True,
            )
            for _ in range(max(0, min(count, room)))
        ]
        if toks:
            self._wakeup()
        return toks

    def _handoff_pb(self, tok: Token) -> pb.Handoff:
        h = pb.Handoff(token=tok.token, operation=tok.operation, name=tok.name)  # type: ignore[arg-type]
        h.expire_time.FromNanoseconds(int((time.time() + (tok.expires_at - self.clock())) * 1e9))
        return h

    def _forget_token(self, tok: Token) -> None:
        """A token left the book unredeemed (expired, voided): undo what it reserved."""
        if tok.operation in (OP.OPERATION_PUT, OP.OPERATION_CHECKIN):
            self._unreserve_put(tok.uid)
            h = self.leases.get(tok.payload) if tok.operation == OP.OPERATION_CHECKIN else None
            if h is not None and h.checkin == tok.token:  # check-in abandoned: release, entry unchanged
                self._end_lease(h, pb.Event.REASON_RELEASED)
        elif tok.operation == OP.OPERATION_TAKE:
            e = self.registry.find(tok.name)
            if e is not None and e.taking == tok.token:
                e.taking = None
                log.info("take of %r (token %s) abandoned; entry kept", tok.name, short(tok.token))

    def _unreserve_put(self, uid: int) -> None:
        self._pending_puts[uid] -= 1
        if self._pending_puts[uid] <= 0:
            del self._pending_puts[uid]

    @property
    def pending_puts(self) -> int:
        return sum(self._pending_puts.values())

    def _promised(self) -> int:
        """Descriptors the broker must keep room for besides its entries: deposits announced by a token, and
        descriptors given up but not yet closed (each still open in the broker's table until the closer gets
        to it)."""
        return self.pending_puts + closer.pending()

    # -- info ----------------------------------------------------------------------------------------------------

    def info(self, s: Session | None, identity: Identity | None) -> pb.GetInfoResponse:
        self.policy.check(identity, "info")
        lim = self.policy.limits
        r = pb.GetInfoResponse(
            version=__version__,
            entries=len(self.registry),
            sessions=len(self.sessions),
            pending_tokens=len(self.tokens),
            max_entries=self.registry.capacity,
            max_entries_per_uid=lim.max_entries_per_uid,
            max_sessions_per_uid=lim.max_sessions_per_uid,
            max_pending_tokens_per_uid=lim.max_pending_tokens_per_uid,
            broker_pid=os.getpid(),
            oldest_watch_revision=self.registry.oldest_revision,
            max_frame_bytes=self.config.max_frame_bytes,
        )
        r.token_ttl.CopyFrom(_dur(self.tokens.ttl))
        r.start_time.FromNanoseconds(int(self.start_time * 1e9))
        if identity is not None:
            r.caller.pid, r.caller.uid, r.caller.gid = identity.pid, identity.uid, identity.gid
        return r

    # -- put -----------------------------------------------------------------------------------------------------

    def _put_options(self, req: pb.PutRequest) -> PutOptions:
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

    def _check_put(self, s: Session, name: str, opts: PutOptions, extra_pending: int = 0) -> None:
        uid = s.identity.uid
        old = self.registry.find(name)
        self.policy.check(s.identity, "put", name, None if old is None else old.owner.uid)
        if old is not None and (opts.replace or opts.if_revision):  # without replace: ALREADY_EXISTS below
            self._check_lease_free(old, s, "replace")
        self.registry.check_put(name, uid, opts, pending=self._promised() + extra_pending)
        limit = self.policy.limits.max_entries_per_uid
        if (
            old is None
            and self.registry.count_for_uid(uid) + self._pending_puts[uid] + extra_pending >= limit
        ):
            raise ResourceExhausted(
                f"uid {uid} holds {self.registry.count_for_uid(uid)} entries, its limit ({limit}); "
                f"cannot store {name!r}: delete some, or raise max_entries_per_uid in the policy",
                name=name,
            )

    def put_begin(self, s: Session | None, req: pb.PutRequest) -> pb.PutResponse:
        """Check a put and issue its token; the descriptor follows in a ``Deposit`` frame."""
        s = self._need_session(s, "put", req.name)
        opts = self._put_options(req)
        self._check_put(s, req.name, opts)
        tok = self._issue(s, OP.OPERATION_PUT, req.name, payload=opts)
        return pb.PutResponse(handoff=self._handoff_pb(tok))

    def batch_put_begin(self, s: Session | None, req: pb.BatchPutRequest) -> pb.BatchPutResponse:
        s = self._need_session(s, "put")
        if len(req.requests) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} puts per batch, got {len(req.requests)}")
        seen: set[str] = set()
        planned: list[tuple[str, PutOptions]] = []
        for i, r in enumerate(req.requests):
            opts = self._put_options(r)
            if r.name in seen:
                raise InvalidArgument(f"{r.name!r} appears twice in the batch", name=r.name)
            seen.add(r.name)
            new = 0 if r.name in self.registry else 1
            self._check_put(s, r.name, opts, extra_pending=i * new)
            planned.append((r.name, opts))
        limit = self.policy.limits.max_pending_tokens_per_uid
        if self.tokens.pending_for_uid(s.identity.uid) + len(planned) > limit:
            raise ResourceExhausted(f"a batch of {len(planned)} would pass the pending-token limit ({limit})")
        toks = [self._issue(s, OP.OPERATION_PUT, name, payload=opts) for name, opts in planned]
        return pb.BatchPutResponse(handoffs=[self._handoff_pb(t) for t in toks])

    def _on_deposit(self, s: Session, frame: Frame) -> None:
        """Store each descriptor of a ``Deposit`` under its token and answer ``Deposited``.

        Ownership: the descriptors leave ``frame.fds`` at once; each becomes an entry's (the registry owns it) or
        goes to the closer, on every path, unexpected errors included.
        """
        tokens = list(frame.message.deposit.tokens)
        fds, frame.fds = frame.fds, []
        uid = s.identity.uid
        if len(tokens) != len(fds):
            closer.discard(fds, uid)
            for t in tokens:  # the tokens are spent: a half-understood frame must not be retried blindly
                self._void_token(t, s)
            s.conn.send(
                _error_frame(
                    Code.INVALID_ARGUMENT,
                    f"deposit frame carries {len(fds)} descriptors for {len(tokens)} tokens; all were closed",
                )
            )
            return
        results: list[cpb.DepositResult] = []
        waiting = collections.deque(fds)
        try:
            for t in tokens:
                results.append(self._deposit_one(s, t, waiting.popleft()))  # it owns the descriptor now
        finally:
            closer.discard(waiting, uid)  # left over only if a deposit raised: nobody took them
        s.conn.send(cpb.ConduitFrame(deposited=cpb.Deposited(results=results)))

    def _void_token(self, token: bytes, s: Session) -> None:
        tok = self.tokens.peek(token, session_id=s.id) if len(token) else None
        if tok is not None:
            self.tokens.cancel(token)
            self._forget_token(tok)

    def _deposit_one(self, s: Session, token: bytes, fd: int) -> cpb.DepositResult:
        """Redeem a PUT or CHECKIN token and store ``fd`` under its name.

        Ownership: on success the registry owns ``fd``; on any failure, expected or not, ``fd`` went to the
        closer before this returns or raises. Everything that can fail about the answer is built before the
        registry takes ``fd``.
        """
        stored = False
        name = ""
        try:
            try:
                tok = self.tokens.redeem(
                    token, session_id=s.id, operations=(OP.OPERATION_PUT, OP.OPERATION_CHECKIN)
                )
            except TokenError as err:
                log.warning("deposit refused for session %s…: %s", s.id[:6], err.message)
                return cpb.DepositResult(token=token, error=_error_pb(err))
            self._unreserve_put(tok.uid)
            name = tok.name
            try:
                info = fdinfo.describe(fd)
                if tok.operation == OP.OPERATION_CHECKIN:
                    entry = self._checkin(s, tok, fd, info)
                    stored = True
                else:
                    opts: PutOptions = tok.payload
                    self._check_put(s, tok.name, opts)
                    owner = Owner(s.identity.pid, s.identity.uid, s.identity.gid)
                    entry = self.registry.put(tok.name, fd, info, owner, s.id, opts, pending=self._promised())
                    stored = True
                    if opts.ephemeral:
                        s.ephemeral.add(tok.name)
                    self._wakeup()
            except BrokerError as err:
                return cpb.DepositResult(token=token, name=tok.name, error=_error_pb(err))
            except OSError as err:
                return cpb.DepositResult(
                    token=token,
                    name=tok.name,
                    error=cpb.Error(code=Code.INTERNAL, message=str(err), name=tok.name),
                )
            log.info("put %r (%s) by pid %d", entry.name, info.summary, s.identity.pid)
            return cpb.DepositResult(
                token=token,
                name=entry.name,
                revision=entry.revision,
                entry=pb.Entry.FromString(entry.pb_bytes()),
            )
        finally:
            held = self.registry.find(name) if name else None
            if not stored and (held is None or held.fd != fd):
                closer.discard(fd, s.identity.uid)

    # -- get / take ----------------------------------------------------------------------------------------------

    def _readable_entry(self, s: Session, name: str, action: str) -> Entry:
        validate_name(name)
        e = self.registry.get(name)
        self.policy.check(s.identity, action, name, e.owner.uid)
        self._check_lease_free(e, s, action)
        return e

    def _check_lease_free(self, e: Entry, s: Session | None, action: str) -> None:
        lt = e.lease
        if lt is None:
            return
        h = lt.exclusive_holder()
        if h is not None and (s is None or h.session_id != s.id):
            raise FailedPrecondition(
                f"cannot {action} {e.name!r}: it is under an exclusive lease held by pid {h.identity.pid} "
                f"(uid {h.identity.uid}) until {time.strftime('%H:%M:%S', time.localtime(h.expire_time))}; "
                "wait for the release, or lease it with --wait",
                name=e.name,
            )

    def _push_handoff(self, s: Session, op: int, e: Entry) -> tuple[pb.Handoff, tuple[bytes, int, Entry]]:
        """A token for a delivery sent right now: issued and spent in the same step, so it never waits in the
        token book (and never counts as pending); it tags the Deliver item the client matches its RPC to."""
        token = self.tokens.random_token()
        h = pb.Handoff(token=token, operation=op, name=e.name)  # type: ignore[arg-type]
        return h, (token, op, e)

    def get(self, s: Session | None, name: str, prefetch: int = 0) -> pb.GetResponse:
        """Hand a copy of ``name`` to the session: ``Deliver`` is sent before this returns."""
        s = self._need_session(s, "get", name)
        if prefetch > MAX_PREFETCH:
            raise InvalidArgument(f"prefetch is at most {MAX_PREFETCH}, got {prefetch}", name=name)
        e = self._readable_entry(s, name, "get")
        resp = pb.GetResponse(entry=e.to_pb())
        if prefetch:
            toks = self._prefetch(s, prefetch, name, e.id)
            if toks:
                resp.prefetch_tokens.extend([t.token for t in toks])
                resp.prefetch_expire_time.FromNanoseconds(
                    int((time.time() + (toks[0].expires_at - self.clock())) * 1e9)
                )
        h, item = self._push_handoff(s, OP.OPERATION_GET, e)
        resp.handoffs.append(h)
        self._deliver(s, [item])
        return resp

    def batch_get(self, s: Session | None, names: Sequence[str], prefetch: int = 0) -> pb.BatchGetResponse:
        s = self._need_session(s, "get")
        if len(names) > MAX_BATCH:
            raise InvalidArgument(f"at most {MAX_BATCH} names per batch, got {len(names)}")
        if prefetch > MAX_BATCH_PREFETCH:
            raise InvalidArgument(f"batch prefetch is at most {MAX_BATCH_PREFETCH}, got {prefetch}")
        entries = [self._readable_entry(s, n, "get") for n in names]
        resp = pb.BatchGetResponse(entries=[e.to_pb() for e in entries])
        if prefetch and 0 < len(entries) <= SCM_MAX_FD:
            plan = BatchPlan.of(entries)  # shared by every token of this batch
            toks = self._prefetch(s, prefetch, entries[0].name, entries[0].id, plan)
            if toks:
                resp.prefetch_tokens.extend([t.token for t in toks])
                resp.prefetch_expire_time.FromNanoseconds(
                    int((time.time() + (toks[0].expires_at - self.clock())) * 1e9)
                )
        pushes = [self._push_handoff(s, OP.OPERATION_GET, e) for e in entries]
        resp.handoffs.extend([p[0] for p in pushes])
        self._deliver(s, [p[1] for p in pushes])
        return resp

    def _redeem_batch(self, s: Session, token: bytes, plan: BatchPlan) -> None:
        """Deliver every entry of a prefetched batch in one frame, the first item tagged with ``token``."""
        find = self.registry.find
        entries: list[Entry] = []
        for name, eid in zip(plan.names, plan.ids, strict=True):
            e = find(name)
            if e is None or e.id != eid:
                raise NotFound(
                    f"entry {name!r} was deleted or replaced since the batch token was issued; get the batch again",
                    name=name,
                )
            if e.lease is not None:
                self._check_lease_free(e, s, "get")
            entries.append(e)
        n = len(entries)
        if tuple(e.revision for e in entries) == plan.revisions:
            data = frame_from_items(
                encode_item(token, OP.OPERATION_GET, entries[0].deliver_tail()) + plan.rest, n
            )
        else:  # a lease or metadata change since: same descriptors, fresh descriptions
            data = encode_deliver(
                [
                    (token if i == 0 else b"", OP.OPERATION_GET, e.deliver_tail())
                    for i, e in enumerate(entries)
                ],
                n,
            )
        s.conn.send_raw(data, [e.fd for e in entries])

    def _deliver(self, s: Session, items: Sequence[tuple[bytes, int, Entry]]) -> None:
        """Send the entries' descriptors in Deliver frames of at most 253, tagged with their tokens."""
        send = s.conn.send_raw
        for i in range(0, len(items), SCM_MAX_FD):
            chunk = items[i : i + SCM_MAX_FD]
            data = encode_deliver([(t, op, e.deliver_tail()) for t, op, e in chunk], len(chunk))
            send(data, [e.fd for _, _, e in chunk])

    def _on_redeem(self, s: Session, frame: Frame) -> None:
        ok: list[tuple[bytes, int, Entry]] = []
        for t in frame.message.redeem.tokens:
            try:
                item = self._redeem_one(s, t)
            except BrokerError as err:
                s.conn.send(cpb.ConduitFrame(error=_error_pb(err, token=t)))
                continue
            if item is not None:
                ok.append(item)
        if ok:
            self._deliver(s, ok)

    def _redeem_one(self, s: Session, t: bytes) -> tuple[bytes, int, Entry] | None:
        """Redeem one prefetched GET token: a batch token is delivered at once (None), a single one returned."""
        tok = self.tokens.redeem(t, session_id=s.id, operations=(OP.OPERATION_GET,))
        if isinstance(tok.payload, BatchPlan):
            self._redeem_batch(s, tok.token, tok.payload)
            return None
        e = self.registry.find(tok.name)
        if e is None or e.id != tok.entry_id:
            raise NotFound(
                f"entry {tok.name!r} was deleted or replaced since the token was issued; get it again",
                name=tok.name,
            )
        self._check_lease_free(e, s, "get")
        return (tok.token, OP.OPERATION_GET, e)

    def take(self, s: Session | None, name: str, if_revision: int = 0) -> pb.TakeResponse:
        """Deliver ``name`` for a move; the entry leaves only when the receiver acks the token."""
        s = self._need_session(s, "take", name)
        e = self._readable_entry(s, name, "take")
        if if_revision and e.revision != if_revision:
            raise FailedPrecondition(
                f"entry {name!r} is at revision {e.revision}, not {if_revision}; nothing was taken", name=name
            )
        if e.taking is not None:
            raise FailedPrecondition(f"entry {name!r} is already being taken; retry shortly", name=name)
        tok = self._issue(s, OP.OPERATION_TAKE, name, e.id)
        try:
            resp = pb.TakeResponse(entry=e.to_pb(), handoff=self._handoff_pb(tok))
        except BaseException:
            self.tokens.cancel(tok.token)
            raise
        # The answer is built: nothing fails between the Deliver and the RPC's return.
        e.taking = tok.token
        self._deliver(s, [(tok.token, OP.OPERATION_TAKE, e)])
        return resp

    def _on_ack(self, s: Session, frame: Frame) -> None:
        acked: list[bytes] = []
        for t in frame.message.ack.tokens:
            try:
                tok = self.tokens.redeem(t, session_id=s.id, operations=(OP.OPERATION_TAKE,))
            except TokenError as err:
                s.conn.send(cpb.ConduitFrame(error=_error_pb(err, token=t)))
                continue
            e = self.registry.find(tok.name)
            if e is None or e.id != tok.entry_id or e.taking != tok.token:
                s.conn.send(
                    cpb.ConduitFrame(
                        error=_error_pb(
                            NotFound(f"entry {tok.name!r} is gone; the take did not complete", name=tok.name),
                            token=t,
                        )
                    )
                )
                continue
            e.taking = None
            self._remove_entry(e, pb.Event.TYPE_DELETE, pb.Event.REASON_TAKEN)
            acked.append(t)
        if acked:
            s.conn.send(cpb.ConduitFrame(acked=cpb.Acked(tokens=acked, revision=self.registry.revision)))

    # -- delete / stat / list ------------------------------------------------------------------------------------

    def delete(self, s: Session | None, name: str, if_revision: int = 0) -> pb.DeleteResponse:
        validate_name(name)
        e = self.registry.get(name)
        ident = s.identity if s else None
        if ident is None:
            raise Unauthenticated(
                f"deleting {name!r} needs a session (the policy decides by the caller's uid): connect the conduit",
                name=name,
            )
        self.policy.check(ident, "delete", name, e.owner.uid)
        self._check_lease_free(e, s, "delete")
        if if_revision and e.revision != if_revision:
            raise FailedPrecondition(
                f"entry {name!r} is at revision {e.revision}, not {if_revision}; nothing was deleted",
                name=name,
            )
        if e.taking is not None:
            raise FailedPrecondition(f"entry {name!r} is being taken; retry when the take is done", name=name)
        self._remove_entry(e, pb.Event.TYPE_DELETE, 0)
        return pb.DeleteResponse()

    def stat(self, identity: Identity | None, name: str) -> pb.StatResponse:
        validate_name(name)
        e = self.registry.get(name)
        self.policy.check(identity, "stat", name, e.owner.uid)
        return pb.StatResponse(entry=e.to_pb())

    def list(self, identity: Identity | None, req: pb.ListRequest, *, max_bytes: int = 0) -> pb.ListResponse:
        """One page of entries. ``max_bytes`` (conduit queries) also ends the page before it outgrows a frame."""
        policy = self.policy
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

        entries, last = self.registry.page(req.prefix, after=after, limit=size, match=match)
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

    # -- leases --------------------------------------------------------------------------------------------------

    async def lease(self, s: Session | None, req: pb.LeaseRequest, timeout: float | None) -> pb.LeaseResponse:
        """Grant a lease (waiting FIFO if asked) and deliver the descriptor against a LEASE token.

        ``timeout``: seconds left before the RPC deadline (None: no deadline). A waiting request stops queueing
        :func:`lease_wait_reserve` before the deadline, so DEADLINE_EXCEEDED reaches the caller as the broker's
        answer (naming the holders) and never races a grant the caller would not see.
        """
        s = self._need_session(s, "lease", req.name)
        mode = req.mode or EXCLUSIVE
        if mode not in (EXCLUSIVE, SHARED):
            raise InvalidArgument(f"unknown lease mode {mode} for {req.name!r}", name=req.name)
        ttl = limits.duration(
            req.ttl,
            "lease ttl",
            minimum=limits.MIN_LEASE_TTL,
            maximum=limits.MAX_LEASE_TTL,
            name=req.name,
            optional=False,
        )
        validate_name(req.name)
        e = self.registry.get(req.name)
        self.policy.check(s.identity, "lease", req.name, e.owner.uid)
        lt = e.lease
        if lt is None:
            lt = e.lease = LeaseTable()
        if lt.grantable(mode):
            h = self._grant(s, e, lt, mode, ttl)
        elif not req.wait:
            raise FailedPrecondition(
                f"{req.name!r} is leased by {_holders_text(lt) or 'nobody, but earlier requests are queued'}; "
                "retry later, or ask with wait (--wait) to queue",
                name=req.name,
            )
        else:
            if timeout is not None:
                timeout = max(0.0, timeout - lease_wait_reserve(timeout))
            h = await self._wait_lease(s, e, lt, mode, ttl, timeout)
        # A waiter resumes one loop step after its grant: the lease may have ended meanwhile (session closed,
        # entry removed). Never hand out a lease id that is already gone.
        e2 = self.registry.find(req.name)
        if self.leases.get(h.lease_id) is not h or e2 is None:
            self._end_lease(h, pb.Event.REASON_RELEASED)
            raise NotFound(f"entry {req.name!r} went away as its lease was granted", name=req.name)
        handoff, item = self._push_handoff(s, OP.OPERATION_LEASE, e2)
        try:
            r = pb.LeaseResponse(lease_id=h.lease_id, epoch=h.epoch, entry=e2.to_pb(), handoff=handoff)
            r.expire_time.FromNanoseconds(int(h.expire_time * 1e9))
        except BaseException:
            self._end_lease(h, pb.Event.REASON_RELEASED)
            raise
        self._deliver(s, [item])
        return r

    def _grant(self, s: Session, e: Entry, lt: LeaseTable, mode: int, ttl: float) -> Holder:
        """Record a grant now (synchronously, so the queue never hands one slot out twice)."""
        h = lt.grant(
            name=e.name,
            entry_id=e.id,
            session_id=s.id,
            identity=s.identity,
            mode=mode,
            ttl=ttl,
            epochs=self._epochs,
            now=self.clock(),
            wall=time.time(),
        )
        self.leases[h.lease_id] = h
        s.leases.add(h.lease_id)
        self.registry.touch(e, pb.Event.TYPE_LEASE_GRANTED, lease_id=h.lease_id, epoch=h.epoch)
        self._wakeup()
        return h

    async def _wait_lease(
        self, s: Session, e: Entry, lt: LeaseTable, mode: int, ttl: float, timeout: float | None
    ) -> Holder:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Holder] = loop.create_future()
        name = e.name

        def grant() -> None:
            # Called by LeaseTable.pump when this waiter is at the head and fits, or when the entry is removed.
            if fut.done() or w.cancelled:
                return
            cur = self.registry.find(name)
            if cur is None or cur.lease is not lt:
                fut.set_exception(
                    NotFound(f"entry {name!r} was removed while waiting for its lease", name=name)
                )
            elif s.closed:
                fut.set_exception(Unauthenticated(f"the session ended while waiting for a lease on {name!r}"))
            else:
                fut.set_result(self._grant(s, cur, lt, mode, ttl))

        w = Waiter(session_id=s.id, mode=mode, grant=grant)
        lt.waiters.append(w)
        e.invalidate()
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except BaseException as exc:
            w.cancelled = True
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._end_lease(fut.result(), pb.Event.REASON_RELEASED)  # granted as we gave up: pass it on
            lt.pump()
            cur = self.registry.find(name)
            if cur is not None:
                cur.invalidate()
            if isinstance(exc, TimeoutError):
                raise DeadlineExceeded(
                    f"no lease on {name!r} within the deadline; held by {_holders_text(lt) or 'nobody'}, "
                    f"{sum(1 for x in lt.waiters if not x.cancelled)} other request(s) queued",
                    name=name,
                ) from None
            raise

    def keepalive(self, s: Session | None, lease_ids: Sequence[str]) -> pb.KeepAliveResponse:
        s = self._need_session(s, "keep-alive")
        r = pb.KeepAliveResponse()
        now = self.clock()
        wall = time.time()
        for lid in lease_ids:
            h = self.leases.get(lid)
            if h is None or h.session_id != s.id:
                r.gone.append(lid)
                continue
            h.expires_at = now + h.ttl
            h.expire_time = wall + h.ttl
            e = self.registry.find(h.name)
            if e is not None:
                e.invalidate()
            rn = r.renewed.add(lease_id=lid)
            rn.expire_time.FromNanoseconds(int(h.expire_time * 1e9))
        self._wakeup()
        return r

    def release(self, s: Session | None, lease_id: str, return_descriptor: bool) -> pb.ReleaseResponse:
        """End a lease. With ``return_descriptor`` (check-in) the lease stays held until the descriptor arrives
        in a ``Deposit`` frame, so the next holder gets the checked-in descriptor, never the old one; if the token
        expires or the session ends first, the lease is released with the entry unchanged.

        A plain release is allowed whatever happened to the entry meanwhile (the lease belongs to the name and
        survives a replace). A check-in is refused (FAILED_PRECONDITION, nothing changed, the lease still held)
        when the entry's descriptor was replaced since the grant: the holder would overwrite a descriptor it
        never saw.
        """
        s = self._need_session(s, "release")
        h = self.leases.get(lease_id)
        if h is None or h.session_id != s.id:
            raise NotFound(f"no lease {lease_id!r} held by this session (it may have expired)")
        r = pb.ReleaseResponse()
        if return_descriptor:
            e = self.registry.find(h.name)
            if e is None or e.id != h.entry_id:
                raise FailedPrecondition(
                    f"entry {h.name!r} was replaced since lease {lease_id[:6]}… was granted; a check-in would "
                    "overwrite a descriptor this holder never had, so nothing was changed and the lease is still "
                    "held: release without return_descriptor (or put --replace while holding the lease)",
                    name=h.name,
                )
            if h.checkin is not None:
                raise FailedPrecondition(f"lease {lease_id[:6]}… is already being checked in", name=h.name)
            tok = self._issue(s, OP.OPERATION_CHECKIN, h.name, e.id, payload=h.lease_id)
            h.checkin = tok.token
            r.handoff.CopyFrom(self._handoff_pb(tok))
            return r
        self._end_lease(h, pb.Event.REASON_RELEASED)
        return r

    def _checkin(self, s: Session, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        """The descriptor of a check-in arrived: make it the entry's descriptor, then end the lease."""
        h = self.leases.get(tok.payload)
        if h is None or h.checkin != tok.token:
            raise FailedPrecondition(
                f"the lease on {tok.name!r} ended before its descriptor was checked in (expired, released or the "
                "entry was removed); the descriptor was not stored",
                name=tok.name,
            )
        try:
            old = self.registry.find(tok.name)
            if old is None or old.id != h.entry_id:
                raise FailedPrecondition(
                    f"entry {tok.name!r} was removed or replaced during the check-in; the descriptor was not "
                    "stored",
                    name=tok.name,
                )
            opts = PutOptions(labels=dict(old.labels), replace=True, ephemeral=old.ephemeral)
            if old.expires_at is not None:
                opts.ttl = max(0.001, old.expires_at - self.clock())
            self.registry.put(tok.name, fd, info, old.owner, old.session_id, opts, pending=self._promised())
        finally:
            self._end_lease(h, pb.Event.REASON_RELEASED)
        return self.registry.get(tok.name)

    def _end_lease(self, h: Holder, reason: int) -> None:
        self.leases.pop(h.lease_id, None)
        s = self.sessions.get(h.session_id)
        if s is not None:
            s.leases.discard(h.lease_id)
        e = self.registry.find(h.name)
        if e is None or e.lease is None or e.lease.holders.pop(h.lease_id, None) is None:
            return
        self.registry.touch(e, pb.Event.TYPE_LEASE_RELEASED, reason, lease_id=h.lease_id, epoch=h.epoch)
        e.lease.pump()

    # -- removal & housekeeping ----------------------------------------------------------------------------------

    def _remove_entry(self, e: Entry, event: int, reason: int) -> None:
        """Remove an entry: its leases end first (LEASE_RELEASED, reason ENTRY_REMOVED), then its waiters fail."""
        lt = e.lease
        if lt is not None:
            for h in list(lt.holders.values()):
                self.leases.pop(h.lease_id, None)
                s = self.sessions.get(h.session_id)
                if s is not None:
                    s.leases.discard(h.lease_id)
                del lt.holders[h.lease_id]
                self.registry.touch(
                    e,
                    pb.Event.TYPE_LEASE_RELEASED,
                    pb.Event.REASON_ENTRY_REMOVED,
                    lease_id=h.lease_id,
                    epoch=h.epoch,
                )
        self.registry.remove(e.name, event=event, reason=reason)
        s = self.sessions.get(e.session_id)
        if s is not None:
            s.ephemeral.discard(e.name)
        if lt is not None:
            waiters = list(lt.waiters)
            lt.waiters.clear()
            for w in waiters:
                w.grant()  # the waiter sees the entry gone and fails with NOT_FOUND

    def tick(self) -> float | None:
        """Expire tokens, entries and leases that are due; return the next monotonic time anything is due."""
        now = self.clock()
        for tok in self.tokens.expire(now):
            self._forget_token(tok)
        for e in self.registry.due(now):
            log.info("entry %r expired", e.name)
            self._remove_entry(e, pb.Event.TYPE_EXPIRE, 0)
        for h in [h for h in self.leases.values() if h.expires_at <= now]:
            log.info("lease %s on %r expired (pid %d)", h.lease_id[:6], h.name, h.identity.pid)
            self._end_lease(h, pb.Event.REASON_EXPIRED)
        nexts = [t for t in (self.tokens.next_expiry(), self.registry.next_expiry()) if t is not None]
        if self.leases:
            nexts.append(min(h.expires_at for h in self.leases.values()))
        return min(nexts) if nexts else None

    # -- conduit frames ------------------------------------------------------------------------------------------

    def on_frame(self, s: Session, frame: Frame) -> None:
        """Dispatch one frame from a session's conduit.

        Ownership: a handler takes the descriptors it keeps out of ``frame.fds`` (and gives the rest to the
        closer); whatever is still in ``frame.fds`` when this returns or raises was not taken, and the caller
        (the connection) discards it.
        """
        kind = frame.message.WhichOneof("body")
        if kind != "deposit" and frame.fds:
            n = len(frame.fds)
            _drop_fds(s, frame)
            # Unsolicited descriptors: closed and called out; the frame itself is still served.
            s.conn.send(
                _error_frame(
                    Code.INVALID_ARGUMENT,
                    f"a {kind} frame carries no descriptors, but {n} came with it; they were closed "
                    "(descriptors travel only in deposit frames)",
                )
            )
        if kind == "deposit":
            self._on_deposit(s, frame)
        elif kind == "redeem":
            self._on_redeem(s, frame)
        elif kind == "ack":
            self._on_ack(s, frame)
        elif kind == "ping":
            s.conn.send(cpb.ConduitFrame(pong=cpb.Pong(nonce=frame.message.ping.nonce)))
        elif kind == "query":
            s.conn.send(cpb.ConduitFrame(query_result=self._query(s, frame.message.query)))
        else:
            s.conn.send(
                _error_frame(Code.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} frame from a client")
            )

    def stamp(self, response: Any) -> Any:
        """Fill a response's ``header`` (every RPC response has one, field 99): the one place it is filled."""
        response.header.revision = self.registry.revision
        return response

    def _query(self, s: Session, q: cpb.Query) -> cpb.QueryResult:
        """Answer a read-only conduit query as the RPC of the same name would, for the session's identity."""
        r = cpb.QueryResult(id=q.id)
        which = q.WhichOneof("request")
        try:
            if which == "list":
                # Room for the frame's own fields and the page token; the rest holds entries.
                r.list.CopyFrom(self.list(s.identity, q.list, max_bytes=self.config.max_frame_bytes - 1024))
                self.stamp(r.list)
            elif which == "stat":
                r.stat.CopyFrom(self.stat(s.identity, q.stat.name))
                self.stamp(r.stat)
            elif which == "info":
                r.info.CopyFrom(self.info(s, s.identity))
                self.stamp(r.info)
            else:
                raise InvalidArgument(f"unknown query {which or '(empty)'}; see Query in the proto")
        except BrokerError as err:
            r.error.CopyFrom(_error_pb(err))
        except Exception:  # a bug: still answer the query (the RPC path answers INTERNAL the same way)
            log.exception("internal error answering a conduit query")
            r.error.CopyFrom(
                cpb.Error(code=int(Code.INTERNAL), message="internal error in the broker; see its log")
            )
        return r

    def close(self) -> None:
        """Shut down: close every held descriptor."""
        self.registry.close_all()


def _holders_text(lt: LeaseTable) -> str:
    return ", ".join(
        f"pid {h.identity.pid} (uid {h.identity.uid}, {'exclusive' if h.mode == EXCLUSIVE else 'shared'}, "
        f"epoch {h.epoch})"
        for h in lt.holders.values()
    )


@dataclass(slots=True, frozen=True)
class BatchPlan:
    """What a batch token delivers: entries by name and id, and their Deliver items after the first, encoded
    once when the tokens are issued (valid while every entry is at the recorded revision)."""

    names: tuple[str, ...]
    ids: tuple[int, ...]
    revisions: tuple[int, ...]
    rest: bytes

    @classmethod
    def of(cls, entries: Sequence[Entry]) -> BatchPlan:
        return cls(
            names=tuple(e.name for e in entries),
            ids=tuple(e.id for e in entries),
            revisions=tuple(e.revision for e in entries),
            rest=b"".join([encode_item(b"", OP.OPERATION_GET, e.deliver_tail()) for e in entries[1:]]),
        )


def _error_pb(err: BrokerError, token: bytes = b"") -> cpb.Error:
    return cpb.Error(code=int(err.code), message=err.message, name=err.name, token=token)


def _drop_fds(s: Session, frame: Frame) -> None:
    """Give a frame's descriptors to the closer (they came from the session's client)."""
    fds, frame.fds = frame.fds, []
    closer.discard(fds, s.identity.uid)


def _error_frame(code: Code, message: str) -> cpb.ConduitFrame:
    return cpb.ConduitFrame(error=cpb.Error(code=int(code), message=message))


_PAGE_TOKEN_VERSION = b"\x01"


def _page_scope(prefix: str, selector: str) -> bytes:
    """8 bytes binding a page token to the listing it continues (same prefix, same selector)."""
    import hashlib

    return hashlib.blake2b(f"{prefix}\0{selector}".encode(), digest_size=8).digest()


def _encode_page_token(last: str, prefix: str, selector: str) -> str:
    """An opaque continuation: version byte, scope hash, the last name sent. Flat bytes, so decoding cannot
    recurse or allocate more than the token's own (bounded) length."""
    import base64

    raw = _PAGE_TOKEN_VERSION + _page_scope(prefix, selector) + last.encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_page_token(token: str, prefix: str, selector: str) -> str:
    import base64
    import binascii

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
