"""The broker's facade: owns the tables, the sessions and housekeeping, and dispatches conduit frames.

The servicer (:mod:`.servicer`) calls one method here per RPC; the listener (:mod:`.listener`) hands each
incoming frame to :meth:`Broker.on_frame`. The work is done by the roles the broker wires together: entries
(:mod:`.entries`), handoffs (:mod:`.handoffs`), leasing (:mod:`.leasing`), watches (:mod:`.watch`). They get
the tables and callables they need as constructor arguments; nothing outside reaches into them. Everything runs
on one event loop, so nothing here locks. Errors are :class:`fdbroker.errors.BrokerError` subclasses.

Descriptor ownership: a descriptor that arrives in a ``Deposit`` frame belongs to the broker from the moment it
is received; it either becomes an entry's descriptor (the registry owns it) or goes to the closer before the
frame's answer is sent. Deliveries send the registry's own descriptor with SCM_RIGHTS (the kernel duplicates it
into the receiver); the registry keeps its copy, except after a completed take, when it gives it up.
"""

from __future__ import annotations

import collections
import logging
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fdbroker import __version__, fdinfo
from fdbroker.broker import closer
from fdbroker.broker.audit import Audit, Who
from fdbroker.broker.entries import Entries
from fdbroker.broker.handoffs import Handoffs, error_frame, error_pb
from fdbroker.broker.leasing import Leasing
from fdbroker.broker.metrics import Metrics, State, open_fd_count
from fdbroker.broker.policy import Identity, Limits, Policy
from fdbroker.broker.redeem import Redemptions
from fdbroker.broker.registry import Entry, Registry, info_kind
from fdbroker.broker.sessions import FrameSink, Session, SessionTable
from fdbroker.broker.tokens import Token, TokenBook
from fdbroker.broker.watch import Watcher, WatchHub
from fdbroker.conduit.frames import MAX_FRAME_BYTES, Frame
from fdbroker.errors import BrokerError, Code, InvalidArgument, ResourceExhausted, Unauthenticated
from fdbroker.protocol import SESSION_METADATA_KEY
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

log = logging.getLogger("fdbroker.broker")

EV = pb.Event


@dataclass
class BrokerConfig:
    """Tunables of one broker. ``capacity`` is the number of descriptors it may hold in all."""

    capacity: int
    token_ttl: float = 5.0
    history: int = 10_000
    max_frame_bytes: int = MAX_FRAME_BYTES
    watch_queue: int = 4096  # events buffered per watcher before it is cut off
    keeper: pb.KeeperInfo | None = None  # the keeper that runs this broker (serve --keeper), for GetInfo
    extra: dict[str, Any] = field(default_factory=dict)


class Broker:
    """The tables (registry, tokens, sessions, leases, watchers) and every operation on them.

    ``clock`` is the monotonic clock every expiry runs on (tests pass a fake one); ``wakeup`` is called whenever
    something new may be due before the time :meth:`tick` last returned (the server's housekeeping then calls
    :meth:`tick` again).
    """

    def __init__(
        self,
        config: BrokerConfig,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
        wakeup: Callable[[], None] = lambda: None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics if metrics is not None else Metrics()
        self._sessions = SessionTable(max_per_uid=policy.limits.max_sessions_per_uid)
        self._audit = audit = Audit(self.metrics, self._sessions)
        self._policy = policy
        policy.on_denied = audit.denied
        self._registry = reg = Registry(capacity=config.capacity, history=config.history, clock=clock)
        self._tokens = TokenBook.configured(config.token_ttl, clock, config.extra)
        self._watches = WatchHub(reg, lambda: self._policy, audit, queue_limit=config.watch_queue)
        self._handoffs = Handoffs(
            self._tokens, reg, lambda: self._policy.limits, self, audit, clock=clock, wakeup=wakeup
        )
        self._handoffs.max_frame_bytes = config.max_frame_bytes  # what Welcome announces
        self._leasing = Leasing(reg, self._handoffs, lambda: self._policy, audit, clock=clock, wakeup=wakeup)
        self._entries = Entries(
            reg, self._sessions, self._handoffs, self._leasing, lambda: self._policy, audit, wakeup=wakeup
        )
        self._redemptions = Redemptions(self._handoffs, self._tokens, reg, audit, self._entries.refill)
        self.start_time = time.time()

    # -- the tables, read-only -----------------------------------------------------------------------------------

    @property
    def registry(self) -> Registry:
        """The entries (survival gives them away or mirrors them; tests look)."""
        return self._registry

    @property
    def tokens(self) -> TokenBook:
        return self._tokens

    @property
    def sessions(self) -> SessionTable:
        return self._sessions

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def limits(self) -> Limits:
        """The per-uid quotas of the policy in force."""
        return self._policy.limits

    @property
    def pending_puts(self) -> int:
        """Descriptors announced by put and check-in tokens not yet redeemed."""
        return self._handoffs.pending_puts

    def set_policy(self, policy: Policy) -> None:
        """Put a (re)loaded policy in force: every later decision and quota uses it."""
        policy.on_denied = self._audit.denied
        self._policy = policy
        self._sessions.max_per_uid = policy.limits.max_sessions_per_uid

    def next_epoch(self) -> int:
        """Draw the next fencing epoch (a handover gives it to the successor to continue above)."""
        return self._leasing.epochs.next()

    def continue_epochs(self, above: int) -> None:
        """Make every later fencing epoch higher than ``above`` (a predecessor's or a crashed broker's last one),
        still following the clock."""
        self._leasing.epochs.continue_above(above)

    def end_handed_over_sessions(self, leases: Sequence[tuple[str, pb.LeaseHolder]]) -> None:
        """After a handover: the predecessor's sessions did not come along, so their leases end (reason
        HANDOVER) and then their ephemeral entries go (reason SESSION_ENDED)."""
        for name, held in leases:
            self._leasing.end_handed_over(name, held)
        for e in sorted((e for e in self._registry if e.ephemeral), key=lambda e: e.name):
            self._entries.remove(e, EV.TYPE_DELETE, EV.REASON_SESSION_ENDED)
            self._audit.ok("remove", Who(*e.owner, e.session_id), e.name, e, reason="session_ended")

    # -- sessions ------------------------------------------------------------------------------------------------

    def open_session(self, identity: Identity, conn: FrameSink) -> Session:
        """A new conduit connection: create its session and send ``Welcome``."""
        try:
            s = self._tokens.open_session(self._sessions.open(identity, conn))
        except ResourceExhausted as err:
            raise self._audit.exhausted(identity, "session", "max_sessions_per_uid", err) from None
        w = cpb.Welcome(
            session_id=s.id,
            identity=pb.Identity(pid=identity.pid, uid=identity.uid, gid=identity.gid),
            version=__version__,
            max_frame_bytes=self.config.max_frame_bytes,
        )
        w.token_ttl.FromNanoseconds(int(self._tokens.ttl * 1e9))
        conn.send(cpb.ConduitFrame(welcome=w))
        log.debug("session %s… opened for pid %d uid %d", s.id[:6], identity.pid, identity.uid)
        return s

    def end_session(self, s: Session) -> None:
        """The conduit connection ended: release leases, void tokens, drop ephemeral entries, all at once.

        Leases go first, so their events say HOLDER_DIED (not RELEASED by a voided check-in token, nor
        ENTRY_REMOVED by the removal of the session's own ephemeral entry).
        """
        if not self._sessions.close(s):
            return
        self._leasing.end_session(s)
        self._handoffs.void_session(s)
        for name in sorted(s.ephemeral):
            e = self._registry.find(name)
            if e is not None and e.session_id == s.id and e.ephemeral:
                self._entries.remove(e, EV.TYPE_DELETE, EV.REASON_SESSION_ENDED)
                self._audit.ok("remove", s, name, e, reason="session_ended")
        log.debug("session %s… (pid %d) ended", s.id[:6], s.identity.pid)

    def session_for(self, session_id: str | None) -> Session | None:
        """The session a call names (None for anonymous); :class:`Unauthenticated` for an unknown id."""
        if not session_id:
            return None
        s = self._sessions.get(session_id)
        if s is None:
            raise Unauthenticated(
                "unknown or ended session; reconnect to the conduit for a new session id "
                "(sessions end when their conduit connection closes)"
            )
        return s

    def _need_session(self, s: Session | None, what: str, name: str = "") -> Session:
        if s is None:
            err = Unauthenticated(
                f"{what} moves a descriptor and needs a session: connect to the conduit first and send the "
                f"session id as metadata {SESSION_METADATA_KEY!r}",
                name=name,
            )
            raise self._audit.denied(None, what, name, err)
        return s

    # -- the RPCs ------------------------------------------------------------------------------------------------

    def info(self, s: Session | None, identity: Identity | None) -> pb.GetInfoResponse:
        self._policy.check(identity, "info")
        lim = self._policy.limits
        r = pb.GetInfoResponse(
            version=__version__,
            entries=len(self._registry),
            sessions=len(self._sessions),
            pending_tokens=len(self._tokens),
            max_entries=self._registry.capacity,
            max_entries_per_uid=lim.max_entries_per_uid,
            max_sessions_per_uid=lim.max_sessions_per_uid,
            max_pending_tokens_per_uid=lim.max_pending_tokens_per_uid,
            broker_pid=os.getpid(),
            oldest_watch_revision=self._registry.history.oldest_revision,
            max_frame_bytes=self.config.max_frame_bytes,
            caller=pb.Identity(**identity._asdict()) if identity is not None else None,
            keeper=self.config.keeper,
        )
        r.token_ttl.FromNanoseconds(int(self._tokens.ttl * 1e9))
        r.start_time.FromNanoseconds(int(self.start_time * 1e9))
        return r

    def put_begin(self, s: Session | None, req: pb.PutRequest) -> pb.PutResponse:
        return self._entries.put_begin(self._need_session(s, "put", req.name), req)

    def batch_put_begin(self, s: Session | None, req: pb.BatchPutRequest) -> pb.BatchPutResponse:
        return self._entries.batch_put_begin(self._need_session(s, "put"), req)

    def get(self, s: Session | None, name: str, prefetch: int = 0) -> pb.GetResponse:
        return self._entries.get(self._need_session(s, "get", name), name, prefetch)

    def batch_get(self, s: Session | None, names: Sequence[str], prefetch: int = 0) -> pb.BatchGetResponse:
        return self._entries.batch_get(self._need_session(s, "get"), names, prefetch)

    def take(self, s: Session | None, name: str, if_revision: int = 0) -> pb.TakeResponse:
        return self._entries.take(self._need_session(s, "take", name), name, if_revision)

    def delete(self, s: Session | None, name: str, if_revision: int = 0) -> pb.DeleteResponse:
        return self._entries.delete(s, name, if_revision)

    def stat(self, identity: Identity | None, name: str) -> pb.StatResponse:
        return self._entries.stat(identity, name)

    def list(self, identity: Identity | None, req: pb.ListRequest, *, max_bytes: int = 0) -> pb.ListResponse:
        return self._entries.list(identity, req, max_bytes=max_bytes)

    async def lease(self, s: Session | None, req: pb.LeaseRequest, timeout: float | None) -> pb.LeaseResponse:
        return await self._leasing.lease(self._need_session(s, "lease", req.name), req, timeout)

    def keepalive(self, s: Session | None, lease_ids: Sequence[str]) -> pb.KeepAliveResponse:
        return self._leasing.keepalive(self._need_session(s, "keep-alive"), lease_ids)

    def release(self, s: Session | None, lease_id: str, return_descriptor: bool) -> pb.ReleaseResponse:
        return self._leasing.release(self._need_session(s, "release"), lease_id, return_descriptor)

    def watch(self, identity: Identity | None, prefix: str, start_revision: int) -> Watcher:
        """A watcher of ``prefix`` (see :meth:`WatchHub.open` for its errors)."""
        return self._watches.open(identity, prefix, start_revision)

    def stamp(self, response: Any) -> Any:
        """Fill a response's ``header`` (every RPC response has one, field 99): the one place it is filled."""
        response.header.revision = self._registry.revision
        return response

    # -- where handoffs complete (handoffs.Routes) ---------------------------------------------------------------

    def store(self, s: Session, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        return self._entries.store(s, tok, fd, info)

    def checkin(self, s: Session, tok: Token, fd: int, info: pb.DescriptorInfo) -> Entry:
        return self._leasing.checkin(tok, fd, info)

    def take_done(self, s: Session, tok: Token) -> None:
        self._entries.take_done(s, tok)

    def checkin_abandoned(self, tok: Token) -> None:
        self._leasing.checkin_abandoned(tok)

    def take_abandoned(self, tok: Token) -> None:
        self._entries.take_abandoned(tok)

    # -- housekeeping --------------------------------------------------------------------------------------------

    def tick(self) -> float | None:
        """Expire tokens, entries and leases that are due; return the next monotonic time anything is due."""
        now = self.clock()
        self._handoffs.expire(now)
        for e in self._registry.due(now):
            self._entries.remove(e, EV.TYPE_EXPIRE, 0)
            self._audit.ok("expire", Who(*e.owner, e.session_id), e.name, e)
        self._leasing.expire(now)
        nexts = [self._tokens.next_expiry(), self._registry.next_expiry(), self._leasing.next_expiry()]
        return min((t for t in nexts if t is not None), default=None)

    def close(self) -> None:
        """Shut down: give up every held descriptor."""
        self._registry.close_all()

    # -- conduit frames ------------------------------------------------------------------------------------------

    def on_frame(self, s: Session, frame: Frame) -> int:
        """Dispatch one frame from a session's conduit; return its outcome, the code of the first error it was
        answered with (0: none).

        Ownership: a handler takes the descriptors it keeps out of ``frame.fds`` (and gives the rest to the
        closer); whatever is still in ``frame.fds`` when this returns or raises was not taken, and the caller
        (the connection) discards it.
        """
        kind = frame.message.WhichOneof("body")
        code = 0
        if kind != "deposit" and frame.fds:
            n = len(frame.fds)
            fds, frame.fds = frame.fds, []
            closer.discard(fds, s.identity.uid)
            # Unsolicited descriptors: closed and called out; the frame itself is still served.
            s.conn.send(
                error_frame(
                    Code.INVALID_ARGUMENT,
                    f"a {kind} frame carries no descriptors, but {n} came with it; they were closed "
                    "(descriptors travel only in deposit frames)",
                )
            )
            code = Code.INVALID_ARGUMENT
        if kind == "deposit":
            return self._handoffs.on_deposit(s, frame)
        if kind == "redeem":
            return self._redemptions.on_redeem(s, frame) or code
        if kind == "ack":
            return self._handoffs.on_ack(s, frame) or code
        if kind == "ping":
            s.conn.send(cpb.ConduitFrame(pong=cpb.Pong(nonce=frame.message.ping.nonce)))
        elif kind == "query":
            r = answer_query(self, s, frame.message.query)
            s.conn.send(cpb.ConduitFrame(query_result=r))
            return r.error.code or code
        else:
            s.conn.send(
                error_frame(Code.INVALID_ARGUMENT, f"unexpected {kind or 'empty'} frame from a client")
            )
            return Code.INVALID_ARGUMENT
        return code

    # -- metrics -------------------------------------------------------------------------------------------------

    def metrics_state(self) -> State:
        """What the broker holds now (:class:`~fdbroker.broker.metrics.StateView`, :func:`census`)."""
        return census(self)


def census(b: Broker) -> State:
    """What ``b`` holds now, for a scrape: one pass over the entries (their kinds are in the first two bytes of
    their info), the rest from the tables' counters."""
    prefixes: collections.Counter[bytes] = collections.Counter()
    waiters = 0
    for e in b._registry:
        prefixes[e.info_bytes[:2]] += 1
        if e.lease is not None:
            waiters += sum(1 for w in e.lease.waiters if not w.cancelled)
    by_kind: collections.Counter[str] = collections.Counter()
    for prefix, n in prefixes.items():
        by_kind[fdinfo.kind_name(info_kind(prefix))] += n
    pending, prefetch = b._tokens.counts()
    return State(
        entries_by_kind=by_kind,
        capacity=b._registry.capacity,
        descriptors_open=open_fd_count(),
        descriptor_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        sessions_by_uid=b._sessions.per_uid(),
        leases_held=len(b._leasing),
        lease_waiters=waiters,
        watchers=len(b._watches),
        pending_tokens=pending,
        prefetch_tokens=prefetch,
        pending_closes=closer.pending(),
        revision=b._registry.revision,
    )


def answer_query(broker: Broker, s: Session, q: cpb.Query) -> cpb.QueryResult:
    """Answer a read-only conduit query as the RPC of the same name would, for the session's identity."""
    r = cpb.QueryResult(id=q.id)
    which = q.WhichOneof("request")
    try:
        if which == "list":
            # Room for the frame's own fields and the page token; the rest holds entries.
            max_bytes = broker.config.max_frame_bytes - 1024
            r.list.CopyFrom(broker.list(s.identity, q.list, max_bytes=max_bytes))
            broker.stamp(r.list)
        elif which == "stat":
            r.stat.CopyFrom(broker.stat(s.identity, q.stat.name))
            broker.stamp(r.stat)
        elif which == "info":
            r.info.CopyFrom(broker.info(s, s.identity))
            broker.stamp(r.info)
        else:
            raise InvalidArgument(f"unknown query {which or '(empty)'}; see Query in the proto")
    except BrokerError as err:
        r.error.CopyFrom(error_pb(err))
    except Exception:  # a bug: still answer the query (the RPC path answers INTERNAL the same way)
        log.exception("internal error answering a conduit query")
        r.error.CopyFrom(
            cpb.Error(code=int(Code.INTERNAL), message="internal error in the broker; see its log")
        )
    return r
