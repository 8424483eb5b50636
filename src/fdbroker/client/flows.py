"""Each verb's protocol, written once and without I/O, as a generator of steps (:mod:`fdbroker.client.steps`).

:class:`fdbroker.Client` and :class:`fdbroker.aio.Client` only drive these: their verbs are these functions, with
the client's :class:`State` as the first argument (their signatures and docstrings are the verbs'). What each
verb does on the wire:

* ``put``/``put_many``: ``Put`` (``BatchPut``) RPC → ``Deposit`` frame(s) with the descriptors → ``Deposited``.
* ``get``/``get_fd``/``get_many``: a prefetched token → ``Redeem`` → ``Deliver``; else ``Get`` (``BatchGet``)
  RPC, whose ``Deliver`` the broker pushes before the RPC returns; the tokens it prefetched are kept until the
  broker's ``prefetch_expire_time``.
* ``take``: ``Take`` RPC → ``Deliver`` → ``Ack`` → ``Acked`` (the entry leaves the registry only then).
* ``lease``: ``Lease`` RPC → ``Deliver``; a lease whose descriptor never arrived is released at once.
  ``keep_lease`` renews it; ``release`` (with ``return_fd``: ``Release`` RPC → ``Deposit`` → ``Deposited``, the
  check-in) ends it.
* ``delete``, ``stat``, ``list`` (paging), ``info``: one RPC each (``list`` one per page).
* ``watch``: the ``Watch`` stream, open once its first response (the header) is in.
* ``ping``: ``Ping`` → ``Pong`` on the conduit.

Descriptor ownership is stated per verb; a flow that fails after it received a descriptor closes it.

Riding through a takeover or a restart (docs/client.md, "Reconnecting"): each verb is tried again
(:func:`_retrying`), on a new session if the old one is gone, for as long as the client's timeout allows, when the
broker went away (:func:`fdbroker.client.reconnect.gone`) before the verb's change could have reached it: the
reads always; ``put`` until its ``Deposit`` is out, ``take`` until its ``Ack`` is out, ``delete`` unless its RPC
was in flight. After that point the flow finds out what happened on the new session (``_settle_*``) and answers
as if nothing had gone wrong, tries again, or raises :class:`~fdbroker.errors.OutcomeUnknown`.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple, TypeVar

from fdbroker.client.models import (
    Entry,
    Event,
    FdLike,
    Info,
    Lease,
    Listing,
    OwnedFd,
    Received,
    close_quietly,
    fileno_of,
    wrap_fd,
)
from fdbroker.client.prefetch import BATCH_PREFETCH_LIMIT, Prefetch, Signal, batch_key
from fdbroker.client.reconnect import Budget, gone
from fdbroker.client.session import (
    Answer,
    Welcome,
    close_answers,
    error_from_frame,
    error_from_rpc,
    is_cancelled,
    pong_key,
    welcome_of,
)
from fdbroker.client.steps import (
    AwaitAnswers,
    AwaitFetch,
    CallRpc,
    CallStream,
    Dial,
    EndSession,
    Flow,
    OpenSession,
    OpenStream,
    Pause,
    ReadFrame,
    Redeem,
    SendFrame,
    Within,
)
from fdbroker.client.trust import Paths, Trust, connect_failure
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import SCM_MAX_FD
from fdbroker.errors import (
    Aborted,
    BrokerError,
    Cancelled,
    DeadlineExceeded,
    NotFound,
    OutcomeUnknown,
    OutOfRange,
    Unauthenticated,
    Unavailable,
)
from fdbroker.protocol import LEASE_WAIT_MARGIN
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

T = TypeVar("T")

Delivered = tuple[int, cpb.DeliverItem]
"""A received descriptor and the ``DeliverItem`` that came with it (the caller owns the descriptor)."""


class State:
    """What one client's flows remember between calls: the open session, prefetched tokens, the lease handles not
    yet released, counters (``stats``: ``get_rpcs``, ``batch_get_rpcs``, ``redeems``, ``refills`` (redeems that
    brought more tokens); when the broker went away ``retries``, ``reconnects``, ``found_done``,
    ``found_not_done``, ``unknown``, ``rewatches``). The driver calls :meth:`session_began` and
    :meth:`session_ended`, and :meth:`saw` with every response; ``new_signal`` makes the driver's one-shot
    flags. ``timeout`` and ``reconnect`` are the client's (how long a call may take, tries
    again included; whether it tries again at all); ``closed`` is set once the client is closed."""

    def __init__(
        self,
        prefetch: int | None,
        new_signal: Callable[[], Signal],
        *,
        timeout: float = 10.0,
        reconnect: bool = True,
    ) -> None:
        self.session: Welcome | None = None
        self.live = False
        self.token_ttl = 5.0
        self.prefetch = Prefetch(prefetch, new_signal)
        self.stats: collections.Counter[str] = collections.Counter()
        self.leases: set[HeldLease] = set()
        self.timeout = timeout
        self.reconnect = reconnect
        self.closed = False
        #: A broker's control plane has answered this client: before that, no broker is no reason to wait.
        self.reached = False
        self.revision = 0
        #: Ids of the latest sessions that ended because their conduit closed or broke, or that the broker no
        #: longer knew: a call that failed on one of them failed because the broker went away.
        self.lost: collections.deque[str] = collections.deque(maxlen=64)
        self._nonces = itertools.count(1)

    def session_began(self, welcome: Welcome) -> None:
        if self.session is not None and self.session.session_id in self.lost:
            self.stats["reconnects"] += 1
        self.session = welcome
        self.live = True
        self.token_ttl = welcome.token_ttl or self.token_ttl
        self.prefetch.clear()

    def session_ended(self, lost: bool = False) -> None:
        """Tokens and leases belong to the session: the broker voided the one and released the other. ``lost``:
        it ended because the broker went away (its conduit closed or broke, or the broker no longer knew it)."""
        if lost and self.live and self.session is not None:
            self.lost.append(self.session.session_id)
        self.live = False
        self.prefetch.clear()
        for h in list(self.leases):
            h.lost.set()

    def live_id(self) -> str | None:
        """The open session's id, None if there is none (or it has ended)."""
        return self.session.session_id if self.live and self.session is not None else None

    def saw(self, response: Any) -> None:
        """Note that a broker answered, and the registry revision its response reflects (the highest seen is a
        revision no later than any change this client makes from now on: see :func:`delete`)."""
        if response is None:
            return
        self.reached = True
        header = getattr(response, "header", None)
        rev = getattr(header, "revision", 0)
        if isinstance(rev, int) and rev > self.revision:
            self.revision = rev

    def nonce(self) -> int:
        return next(self._nonces)


# -- answers → results -----------------------------------------------------------------------------------------


def deliveries(answers: Sequence[Answer], names: Sequence[str]) -> list[Delivered]:
    """Deliveries → ``(fd, item)`` in order; the caller owns the fds. If any answer is not a delivery, every fd
    received is closed and the first error is raised."""
    out: list[Delivered] = []
    first_err: BrokerError | None = None
    for a, name in zip(answers, names, strict=True):
        if a.kind == "deliver":
            out.append((a.fd, a.message))
        elif first_err is None:
            first_err = (
                error_from_frame(a.message)
                if a.kind == "error"
                else Aborted(f"unexpected {a.kind} for {name!r}", name=name)
            )
        else:
            close_answers([a])
    if first_err is not None:
        for fd, _ in out:
            close_quietly(fd)
        raise first_err
    return out


def deposited_entries(answers: Sequence[Answer], names: Sequence[str]) -> list[Entry]:
    """``Deposited`` results → the stored entries in order; raises the first refusal (naming its entry)."""
    out: list[Entry] = []
    first_err: BrokerError | None = None
    for a, name in zip(answers, names, strict=True):
        if a.kind == "deposited" and not a.message.HasField("error"):
            out.append(Entry.from_pb(a.message.entry))
        elif first_err is None:
            first_err = error_from_frame(a.message.error if a.kind == "deposited" else a.message)
            first_err.name = first_err.name or name
    if first_err is not None:
        raise first_err
    return out


def _exchange(
    frame: cpb.ConduitFrame,
    tokens: Sequence[bytes],
    fds: Sequence[int] = (),
    *,
    what: str,
    name: str = "",
    session: str | None = None,
) -> Flow[list[Answer]]:
    """Send ``frame`` and await the answers to ``tokens`` (on ``session``'s conduit, if given)."""
    yield SendFrame(frame, fds, expect=tokens, what=what, name=name, session=session)
    return (yield AwaitAnswers(tokens, session=session))  # type: ignore[no-any-return]


# -- riding through a takeover or a restart --------------------------------------------------------------------


class Attempt:
    """One try of a verb: whether it is a try ``again``, the session it calls as (``session``; None: anonymously),
    and ``ready``: whether its RPCs wait for the control channel to connect rather than fail at once while it
    cannot — on a try again as a session just opened (so the broker is there: its ``control.sock`` follows)."""

    __slots__ = ("again", "ready", "session")

    def __init__(self, again: bool) -> None:
        self.again = again
        self.session: str | None = None
        self.ready = False


class _Again:
    """What a try returns to be tried again at once (it found out that its change did not happen)."""


AGAIN: Final = _Again()


def _as(state: State, a: Attempt, *, need: bool) -> Flow[str | bool]:
    """Whom ``a`` calls as, for ``CallRpc(session=...)``: this client's session (opened if ``need``), else the
    open one if any, else anonymously (False). Recorded in ``a.session``."""
    sid = (yield OpenSession()) if need else state.live_id()
    a.session = sid or None
    a.ready = a.again and a.session is not None
    return sid or False


def _gone(state: State, a: Attempt, err: BaseException) -> bool:
    """Whether ``err``, raised by try ``a``, says the broker went away (and the client may try again)."""
    return (
        state.reconnect
        and not state.closed
        and gone(err, as_session=a.session, lost=state.lost, closed=state.closed, reached=state.reached)
    )


def _retrying(
    state: State, once: Callable[[Attempt], Flow[T | _Again]], *, budget: Budget | None = None
) -> Flow[T]:
    """Run ``once`` until it returns a result, trying again after the broker went away (:func:`_recover`) or
    when it returns :data:`AGAIN`, for as long as ``budget`` allows (None: a new one, the client's timeout from
    now, which then also bounds every step). Any other error, and the last one once the time is up, is raised."""
    if budget is None:
        budget = Budget(state.timeout, state.reconnect)
        yield Within(budget.deadline)
    again = False
    while True:
        a = Attempt(again)
        try:
            out = yield from once(a)
        except BrokerError as err:
            if not (yield from _recover(state, budget, a, err)):
                raise
            out = AGAIN
        if not isinstance(out, _Again):
            return out
        again = True
        state.stats["retries"] += 1


def _recover(state: State, budget: Budget, a: Attempt, err: BrokerError) -> Flow[bool]:
    """After ``err`` from try ``a``: False if it does not say the broker went away, or the client does not
    reconnect (the caller raises it). Otherwise get a usable session back and return True: find out with a
    ``Ping`` whether ``a``'s session still lives (a closed conduit ends it), pause (a doubling back-off), open a
    new session if ``a`` had one. Raises the last error if the budget runs out first.

    A session the broker answered ``UNAUTHENTICATED`` for is ended either way, so that the next call, of this
    caller or another, opens a new one."""
    stale = a.session
    unknown_session = isinstance(err, Unauthenticated) and gone(err, as_session=stale, lost=(), closed=False)
    if unknown_session and stale is not None and state.live_id() == stale:
        yield EndSession(stale)
    if not _gone(state, a, err):
        return False
    if stale is not None and state.live_id() == stale:
        yield from _probe(state, stale)
    while True:
        pause = budget.pause()
        if pause is None:
            raise err
        yield Pause(pause)
        if stale is None:
            return True  # an anonymous call: its gRPC channel reconnects by itself
        try:
            yield OpenSession()
        except BrokerError as again:
            if not gone(again, as_session=None, lost=(), closed=state.closed):
                raise
            err = again
            continue
        return True


def _probe(state: State, sid: str) -> Flow[None]:
    """Find out whether session ``sid`` still lives: a ``Ping`` on its conduit. A conduit that is closed or broken
    ends the session (the driver sees to that); any failure is left to the caller's budget."""
    nonce = state.nonce()
    ping = cpb.ConduitFrame(ping=cpb.Ping(nonce=nonce))
    with contextlib.suppress(BrokerError):
        yield from _exchange(ping, [pong_key(nonce)], what="checking the session", session=sid)


def _after_commit(
    state: State, budget: Budget, a: Attempt, err: BrokerError, unknown: Callable[[str], OutcomeUnknown]
) -> Flow[None]:
    """``err`` came after try ``a`` sent the message that makes its change, so the change may have happened.
    Return once a usable session is back, to find out; raise ``unknown(why)`` when the client cannot find out
    (the call timed out waiting for the answer, ran out of time reconnecting, does not reconnect, or was
    closed). Any other error (none is expected here) is raised as it is."""
    if not isinstance(err, DeadlineExceeded | Aborted | Unavailable | Cancelled | Unauthenticated):
        raise err
    why = f"no answer came in time ({err})" if isinstance(err, DeadlineExceeded) else ""
    if not why and not state.reconnect:
        why = (
            f"the broker went away ({err}); this client does not reconnect (reconnect=False) to find out more"
        )
    elif not why and (state.closed or not gone(err, as_session=a.session, lost=state.lost, closed=False)):
        why = f"the session ended ({err})"
    if not why:
        try:
            if (yield from _recover(state, budget, a, err)):
                return
        except BrokerError as last:
            why = f"the broker went away ({err}) and none answered again within the timeout ({last})"
        else:
            why = f"the session ended ({err})"
    state.stats["unknown"] += 1
    raise unknown(why) from err


def _stat_now(state: State, a: Attempt, name: str) -> Flow[pb.Entry | None]:
    """``name``'s entry as the broker has it now (None: there is none)."""
    who = yield from _as(state, a, need=False)
    try:
        resp = yield CallRpc("Stat", pb.StatRequest(name=name), session=who, name=name, ready=True)
    except NotFound:
        return None
    return resp.entry  # type: ignore[no-any-return]


def _fetch_now(state: State, a: Attempt, name: str) -> Flow[Delivered]:
    """A copy of ``name``'s descriptor (the caller owns it), fetched by RPC: no prefetched token."""
    sid = yield from _as(state, a, need=True)
    resp = yield CallRpc("Get", pb.GetRequest(name=name), session=sid, name=name, ready=True)
    return deliveries((yield AwaitAnswers([resp.handoffs[0].token], session=a.session)), [name])[0]


# -- the session -----------------------------------------------------------------------------------------------


def handshake(paths: Paths, trust: Trust) -> Flow[tuple[Any, Welcome]]:
    """Open a conduit and read its ``Welcome``, refusing a broker ``trust`` does not accept before anything is
    sent. Returns the conduit (the caller owns it) and the welcome; on failure nothing stays open."""
    try:
        conduit = yield Dial()
    except ConduitError as err:
        raise paths.not_running(connect_failure(paths, err)) from None
    try:
        trust.check_peer(paths, conduit.peer_credentials())
        welcome = welcome_of((yield ReadFrame(conduit)), paths)
    except ConduitError as err:
        conduit.close()
        if err.type is ErrType.TIMEOUT:  # it is there, and silent: not "start one"
            raise DeadlineExceeded(f"the broker at {paths.run_dir} did not answer {err.message}") from None
        raise Unavailable(f"the broker at {paths.run_dir} closed the conduit: {err}") from None
    except BaseException:
        conduit.close()
        raise
    return conduit, welcome


def ping(state: State) -> Flow[None]:
    """One ``Ping``/``Pong`` round trip on the conduit (opening the session if needed). Every frame the broker
    sent before the ``Pong`` has been filed when this returns."""

    def once(a: Attempt) -> Flow[None]:
        yield from _as(state, a, need=True)
        nonce = state.nonce()
        ping = cpb.ConduitFrame(ping=cpb.Ping(nonce=nonce))
        yield from _exchange(ping, [pong_key(nonce)], what="pinging", session=a.session)

    yield from _retrying(state, once)


def info(state: State) -> Flow[Info]:
    """Version, counts and limits of the broker."""

    def once(a: Attempt) -> Flow[Info]:
        who = yield from _as(state, a, need=False)
        return Info.from_pb((yield CallRpc("GetInfo", pb.GetInfoRequest(), session=who, ready=a.ready)))

    return (yield from _retrying(state, once))


# -- put -------------------------------------------------------------------------------------------------------


def put_request(
    name: str,
    *,
    labels: Mapping[str, str] | None,
    ttl: float | None,
    ephemeral: bool,
    replace: bool,
    if_revision: int,
) -> pb.PutRequest:
    req = pb.PutRequest(name=name, replace=replace, if_revision=if_revision)
    if labels:
        req.options.labels.update(labels)
    if ttl:
        req.options.ttl.FromNanoseconds(int(ttl * 1e9))
    req.options.ephemeral = ephemeral
    return req


def put(
    state: State,
    name: str,
    fd: FdLike,
    *,
    labels: Mapping[str, str] | None = None,
    ttl: float | None = None,
    ephemeral: bool = False,
    replace: bool = False,
    if_revision: int = 0,
) -> Flow[Entry]:
    """Deposit ``fd`` under ``name`` and return the stored entry. The caller keeps its descriptor (the broker
    stores its own duplicate); it must stay open until this returns. ``OutcomeUnknown`` if the broker went away
    after the descriptor was sent and the client could not find out whether it was stored (docs/client.md,
    "Reconnecting")."""
    entries = yield from put_many(
        state,
        [(name, fd)],
        labels=labels,
        ttl=ttl,
        ephemeral=ephemeral,
        replace=replace,
        if_revision=if_revision,
    )
    return entries[0]


class _Deposits:
    """A ``put_many`` across its tries: what to deposit, and what is known to be stored (``done``, by index)."""

    def __init__(self, names: list[str], fds: list[int], reqs: list[pb.PutRequest]) -> None:
        self.names = names
        self.fds = fds
        self.reqs = reqs
        self.done: dict[int, Entry] = {}

    def todo(self) -> list[int]:
        return [i for i in range(len(self.names)) if i not in self.done]

    def result(self) -> list[Entry] | _Again:
        return [self.done[i] for i in range(len(self.names))] if len(self.done) == len(self.names) else AGAIN


def put_many(
    state: State,
    items: Iterable[tuple[str, FdLike]] | Mapping[str, FdLike],
    *,
    labels: Mapping[str, str] | None = None,
    ttl: float | None = None,
    ephemeral: bool = False,
    replace: bool = False,
    if_revision: int = 0,
) -> Flow[list[Entry]]:
    """Deposit many descriptors in one RPC and as few conduit messages as possible (253 per message). The
    caller keeps its descriptors; they must stay open until this returns. ``OutcomeUnknown`` (naming the
    entries in doubt) as for ``put``."""
    pairs = list(items.items() if isinstance(items, Mapping) else items)
    names = [n for n, _ in pairs]
    job = _Deposits(
        names,
        [fileno_of(f) for _, f in pairs],
        [
            put_request(
                n, labels=labels, ttl=ttl, ephemeral=ephemeral, replace=replace, if_revision=if_revision
            )
            for n in names
        ],
    )
    budget = Budget(state.timeout, state.reconnect)
    yield Within(budget.deadline)
    return (yield from _retrying(state, lambda a: _deposit(state, budget, a, job), budget=budget))


def _deposit(state: State, budget: Budget, a: Attempt, job: _Deposits) -> Flow[list[Entry] | _Again]:
    """One try of ``put_many``: the entries not yet known to be stored."""
    todo = job.todo()
    sid = yield from _as(state, a, need=True)
    asked = time.time()
    if len(todo) == 1:
        i = todo[0]
        resp = yield CallRpc("Put", job.reqs[i], session=sid, name=job.names[i], ready=a.ready)
        handoffs = [resp.handoff]
    else:
        batch = pb.BatchPutRequest(requests=[job.reqs[i] for i in todo])
        resp = yield CallRpc("BatchPut", batch, session=sid, ready=a.ready)
        handoffs = list(resp.handoffs)
    tokens = [h.token for h in handoffs]
    sent = 0
    try:
        for k in range(0, len(tokens), SCM_MAX_FD):
            chunk = tokens[k : k + SCM_MAX_FD]
            fds = [job.fds[i] for i in todo[k : k + SCM_MAX_FD]]
            deposit = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=chunk))
            what = f"depositing {job.names[todo[k]]!r}"
            yield SendFrame(deposit, fds, expect=chunk, what=what, session=a.session)
            sent = k + len(chunk)
        answers = yield AwaitAnswers(tokens, session=a.session)
    except BrokerError as err:
        if not sent:
            raise  # no descriptor went out: nothing was stored; tried again if the broker went away
        yield from _settle_deposits(state, budget, a, err, job, todo[:sent], int(resp.header.revision), asked)
        return job.result()
    entries = deposited_entries(answers, [job.names[i] for i in todo])
    job.done.update(zip(todo, entries, strict=True))
    return job.result()


def _settle_deposits(
    state: State,
    budget: Budget,
    a: Attempt,
    err: BrokerError,
    job: _Deposits,
    sent: list[int],
    token_revision: int,
    asked: float,
) -> Flow[None]:
    """The deposits of ``sent`` went out and their answers did not all come (``err``): find out, on a new session,
    which were stored (into ``job.done``) and which were not (left to do); ``OutcomeUnknown`` naming the rest."""

    def unknown(why: str, names: Sequence[str] = ()) -> OutcomeUnknown:
        names = tuple(names) or tuple(job.names[i] for i in sent)
        more = ", …" if len(names) > 3 else ""
        what = f"{names[0]!r}" if len(names) == 1 else f"{len(names)} entries ({', '.join(names[:3])}{more})"
        return OutcomeUnknown(
            f"put of {what}: outcome unknown — the descriptor was sent, then {why}; check the entry before "
            "putting it again",
            operation="put",
            names=names,
        )

    yield from _after_commit(state, budget, a, err, unknown)
    doubt: list[str] = []
    reasons: list[str] = []
    for i in sent:
        try:
            verdict = yield from _settle_put(state, budget, job.names[i], job.fds[i], token_revision, asked)
        except BrokerError as failed:
            verdict = f"asking the broker about it failed ({failed})"
        if isinstance(verdict, Entry):
            job.done[i] = verdict
            state.stats["found_done"] += 1
        elif verdict is None:
            state.stats["found_not_done"] += 1
        else:
            doubt.append(job.names[i])
            reasons.append(verdict)
    if doubt:
        state.stats["unknown"] += 1
        raise unknown(
            f"the broker went away ({err}) before it answered; after reconnecting, {reasons[0]}", doubt
        )


def _settle_put(
    state: State, budget: Budget, name: str, fd: int, token_revision: int, asked: float
) -> Flow[Entry | str | None]:
    """Whether a deposit of ``fd`` under ``name`` (its token issued at registry revision ``token_revision``,
    asked for at ``asked``, wall clock) was stored: the entry if it was, None if it was not, else why the client
    cannot tell.

    * No entry of that name: cannot tell (not stored, or stored and removed since).
    * An entry no newer than ``token_revision``: nothing changed it since the token was issued, so the deposit
      (which would have made a newer revision) was not stored.
    * An entry deposited since ``asked`` by this process (owner pid and uid), holding the very same open file
      (``st_dev``/``st_ino`` of a fresh copy, fetched with ``Get``, equal to ``fd``'s): stored.
    * Anything else: cannot tell (another deposit came after it, or it never happened)."""
    entry = yield from _retrying(state, lambda a: _stat_now(state, a, name), budget=budget)
    if entry is None:
        return f"there is no entry {name!r}: it was not stored, or it was and has been removed since"
    if entry.revision <= token_revision:
        return None
    me = state.session.identity if state.session is not None else None
    deposited = entry.create_time.ToNanoseconds() / 1e9
    if me is not None and (entry.owner.pid, entry.owner.uid) == me[:2] and deposited >= asked - 0.001:
        got, _ = yield from _retrying(state, lambda a: _fetch_now(state, a, name), budget=budget)
        try:
            theirs, ours = os.fstat(got), os.fstat(fd)
        finally:
            close_quietly(got)
        if (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino):
            return Entry.from_pb(entry)
    return f"{name!r} has changed since (revision {entry.revision}), not provably by this deposit"


# -- get -------------------------------------------------------------------------------------------------------


Copies = tuple[list[int], Sequence[Any]]
"""Received descriptors and their ``DeliverItem``s, in order (the caller owns the descriptors; the items of a
lean answer are parsed only when read)."""


def _redeem(state: State, sid: str, key: str, count: int, first: bytes | None = None) -> Flow[Copies | None]:
    """``count`` copies through one prefetched token for ``key`` (one of session ``sid``'s), or None when there is
    no usable token. ``first``: a token already taken from the prefetched ones, to redeem first. The ``Redeem``
    of a single get's last token asks for more (``Redeem.refill``, :meth:`Prefetch.refill`): a name fetched in a
    loop goes back to the control plane only when the broker issues none."""
    tok = first if first is not None else state.prefetch.pop(key)
    while tok is not None:
        refill = state.prefetch.refill(key, state.token_ttl) if count == 1 else 0
        with state.prefetch.fetching(key, refill):
            a = yield Redeem(tok, count, session=sid, refill=refill)
            state.stats["redeems"] += 1
            if a.kind == "deliver" and refill and state.live_id() == sid:
                state.prefetch.keep(key, a.message, state.token_ttl)
                state.stats["refills"] += bool(a.message.prefetch_tokens)
        if a.kind == "batch" and len(a.message[1]) == count:
            items, fds = a.message
            return fds, items
        if a.kind == "deliver" and count == 1:
            return [a.fd], [a.message]
        close_answers([a])
        state.prefetch.drop(key)  # replaced, deleted or leased away since: ask the control plane again
        tok = state.prefetch.pop(key)
    return None


def _redeem_shared(
    state: State, sid: str, key: str, count: int, first: bytes | None = None
) -> Flow[Copies | None]:
    """Redeem a prefetched token for ``key`` (``first``, if given, then the ones held); while another caller's RPC
    is fetching tokens for it, wait for that RPC and use its tokens instead of asking for more (concurrent gets of
    one name share them)."""
    while True:
        got = yield from _redeem(state, sid, key, count, first)
        first = None
        if got is not None:
            return got
        fetching = state.prefetch.in_flight(key)
        if fetching is None:
            return None
        yield AwaitFetch(fetching)


class Held(NamedTuple):
    """A get a driver began outside its flow (the blocking client's hot path, :meth:`fdbroker.Client.get_fd`):
    the prefetched ``token`` it took for the name and redeemed as session ``session``, and the call's
    ``deadline`` (``time.monotonic()``). :func:`get_resumed` goes on from that ``Redeem``, whose outcome the
    driver gives as the result of the flow's first :class:`~fdbroker.client.steps.Redeem` step (of ``token``)."""

    token: bytes
    session: str
    deadline: float


def _get_one(state: State, name: str, held: Held | None = None) -> Flow[Delivered]:
    """A copy of ``name``'s descriptor; tried again (on a new session) while the broker goes away: a get changes
    nothing. ``held``: go on from a ``Redeem`` the driver made (:class:`Held`), as this flow would have made it
    in its first try, within the deadline the call began with."""

    def once(a: Attempt) -> Flow[Delivered]:
        nonlocal held
        first: bytes | None = None
        if held is not None:
            # What _as did for the first try, before the driver's Redeem: the session was open.
            sid, first, held = held.session, held.token, None
            a.session = sid
        else:
            sid = str((yield from _as(state, a, need=True)))
        got = yield from _redeem_shared(state, sid, name, 1, first)
        if got is not None:
            return got[0][0], got[1][0]
        prefetch = state.prefetch.plan(name, state.token_ttl)
        with state.prefetch.fetching(name, prefetch):
            req = pb.GetRequest(name=name, prefetch=prefetch)
            resp = yield CallRpc("Get", req, session=sid, name=name, ready=a.ready)
            state.stats["get_rpcs"] += 1
            if state.live_id() == sid:
                state.prefetch.keep(name, resp, state.token_ttl)
        return deliveries((yield AwaitAnswers([resp.handoffs[0].token], session=sid)), [name])[0]

    budget = None
    if held is not None:
        budget = Budget(state.timeout, state.reconnect)
        budget.deadline = held.deadline
        yield Within(budget.deadline)
    return (yield from _retrying(state, once, budget=budget))


def get(state: State, name: str) -> Flow[Received]:
    """A copy of ``name``'s descriptor: a socket, a file object, or an :class:`OwnedFd`; the caller owns it."""
    fd, item = yield from _get_one(state, name)
    return wrap_fd(fd, item.info)


def get_fd(state: State, name: str) -> Flow[OwnedFd]:
    """Like ``get``, but always an :class:`OwnedFd` (the caller owns it)."""
    fd, _ = yield from _get_one(state, name)
    return OwnedFd(fd)


def get_resumed(state: State, name: str, held: Held, *, fd_only: bool) -> Flow[Received]:
    """``get`` (``get_fd`` with ``fd_only``) going on from the driver's ``Redeem`` of ``held.token``
    (:class:`Held`): what the verb does from there, to the letter — the answer taken, another token or the
    ``Get`` RPC after a refusal, a try again on a new session after the broker went away."""
    fd, item = yield from _get_one(state, name, held)
    return OwnedFd(fd) if fd_only else wrap_fd(fd, item.info)


def get_many(state: State, names: Sequence[str], *, raw: bool = False) -> Flow[list[Any]]:
    """Copies of many entries, in order: one BatchGet RPC, descriptors in messages of up to 253. The caller
    owns them (an ``OwnedFd`` each with ``raw``). All or nothing: on any error none is returned or kept open.

    A batch of at most 253 names fetched again soon after is served by a prefetched batch token (same adaptive
    policy as ``get``): one conduit round trip for the whole batch, no RPC (see ``BatchGetRequest.prefetch``).
    """
    fds, items = yield from _get_copies(state, names)
    if raw:
        return [OwnedFd(fd) for fd in fds]
    return [wrap_fd(fd, item.info) for fd, item in zip(fds, items, strict=True)]


def get_many_fds(state: State, names: Sequence[str]) -> Flow[list[int]]:
    """Like ``get_many``, in the batch form: the descriptor numbers themselves, in order, with no object per
    descriptor. The caller owns them and closes each (``os.close``). All or nothing, as ``get_many``."""
    fds, _ = yield from _get_copies(state, names)
    return fds


def _get_copies(state: State, names: Sequence[str]) -> Flow[Copies]:
    """The copies of ``get_many``; tried again (on a new session) while the broker goes away."""
    names = list(names)
    small = 0 < len(names) <= SCM_MAX_FD
    key = batch_key(names)

    def once(a: Attempt) -> Flow[Copies]:
        sid = str((yield from _as(state, a, need=True)))
        got = (yield from _redeem_shared(state, sid, key, len(names))) if small else None
        if got is not None:
            return got
        prefetch = min(BATCH_PREFETCH_LIMIT, state.prefetch.plan(key, state.token_ttl)) if small else 0
        with state.prefetch.fetching(key, prefetch):
            req = pb.BatchGetRequest(names=names, prefetch=prefetch)
            resp = yield CallRpc("BatchGet", req, session=sid, ready=a.ready)
            state.stats["batch_get_rpcs"] += 1
            if state.live_id() == sid:
                state.prefetch.keep(key, resp, state.token_ttl)
        pairs = deliveries((yield AwaitAnswers([h.token for h in resp.handoffs], session=sid)), names)
        return [fd for fd, _ in pairs], [item for _, item in pairs]

    return (yield from _retrying(state, once))


# -- take ------------------------------------------------------------------------------------------------------


def take(state: State, name: str, *, if_revision: int = 0, raw: bool = False) -> Flow[Any]:
    """Move ``name``'s descriptor to the caller (who owns it): the entry is gone once this returns. Atomic: if
    this fails before the broker confirmed, the entry stays and the received copy is closed — except with
    ``OutcomeUnknown`` (the broker went away after the confirmation was sent, and the client could not find out
    whether the take happened), which carries the received copy as ``received``: the caller owns it."""
    budget = Budget(state.timeout, state.reconnect)
    yield Within(budget.deadline)
    return (
        yield from _retrying(state, lambda a: _take(state, budget, a, name, if_revision, raw), budget=budget)
    )


def _take(state: State, budget: Budget, a: Attempt, name: str, if_revision: int, raw: bool) -> Flow[Any]:
    """One try of ``take``."""
    sid = yield from _as(state, a, need=True)
    req = pb.TakeRequest(name=name, if_revision=if_revision)
    resp = yield CallRpc("Take", req, session=sid, name=name, ready=a.ready)
    tok = resp.handoff.token
    fd, item = deliveries((yield AwaitAnswers([tok], session=a.session)), [name])[0]
    acking = False
    try:
        ack = cpb.ConduitFrame(ack=cpb.Ack(tokens=[tok]))
        yield SendFrame(
            ack, expect=[tok], what=f"confirming the take of {name!r}", name=name, session=a.session
        )
        acking = True
        (answer,) = yield AwaitAnswers([tok], session=a.session)
    except BrokerError as err:
        if not acking:
            close_quietly(fd)  # not confirmed: the entry stays in the broker
            raise
        received = OwnedFd(fd) if raw else wrap_fd(fd, item.info)
        return (yield from _settle_take(state, budget, a, err, name, int(resp.entry.revision), received))
    except BaseException:
        close_quietly(fd)
        raise
    if answer.kind != "acked":
        close_quietly(fd)
        raise (
            error_from_frame(answer.message)
            if answer.kind == "error"
            else Aborted(f"take of {name!r} not confirmed; the entry stays in the broker", name=name)
        )
    return OwnedFd(fd) if raw else wrap_fd(fd, item.info)


def _settle_take(
    state: State, budget: Budget, a: Attempt, err: BrokerError, name: str, revision: int, received: Received
) -> Flow[_Again]:
    """The ``Ack`` of a take of ``name`` (at ``revision``) went out and no ``Acked`` came (``err``): find out on
    a new session whether the entry is still there, untouched. If it is, the take did not happen: the copy is
    closed and the take tried again. Otherwise ``OutcomeUnknown``, carrying the copy (``received``)."""

    def unknown(why: str) -> OutcomeUnknown:
        return OutcomeUnknown(
            f"take of {name!r}: outcome unknown — the confirmation was sent, then {why}; the descriptor received "
            "is in this error's `received` (yours to close: if the take happened it is the only copy)",
            operation="take",
            name=name,
            received=received,
        )

    try:
        yield from _after_commit(state, budget, a, err, unknown)
    except OutcomeUnknown:
        raise
    except BaseException:
        received.close()
        raise
    try:
        entry = yield from _retrying(state, lambda a: _stat_now(state, a, name), budget=budget)
    except BrokerError as failed:
        state.stats["unknown"] += 1
        raise unknown(f"the broker went away ({err}); asking it what happened failed ({failed})") from failed
    if entry is not None and entry.revision == revision:
        received.close()  # the entry is as it was when we took it: the take did not happen
        state.stats["found_not_done"] += 1
        return AGAIN
    state.stats["unknown"] += 1
    now = "there is no entry of that name" if entry is None else f"the entry is at revision {entry.revision}"
    raise unknown(f"the broker went away ({err}) before it answered; after reconnecting, {now}")


# -- delete / stat / list --------------------------------------------------------------------------------------


def delete(state: State, name: str, *, if_revision: int = 0) -> Flow[int]:
    """Remove ``name``; the broker closes its copy. Returns the delete's revision. ``OutcomeUnknown`` if the
    broker went away while the call was in flight and the client could not find out whether it happened."""
    req = pb.DeleteRequest(name=name, if_revision=if_revision)
    budget = Budget(state.timeout, state.reconnect)
    yield Within(budget.deadline)

    def once(a: Attempt) -> Flow[int | _Again]:
        before = max(state.revision, if_revision)
        sid = yield from _as(state, a, need=True)
        try:
            resp = yield CallRpc("Delete", req, session=sid, name=name, ready=a.ready)
        except (Unavailable, Cancelled) as err:
            # In flight when the connection went: it may have happened (an unknown session, UNAUTHENTICATED,
            # is refused before anything is done: tried again as it is) — unless no RPC of this client ever
            # reached the broker's control plane: then this one did not either.
            if not state.reached:
                raise
            return (yield from _settle_delete(state, budget, a, err, name, before))
        state.prefetch.drop(name)
        return int(resp.header.revision)

    return (yield from _retrying(state, once, budget=budget))


def _settle_delete(
    state: State, budget: Budget, a: Attempt, err: BrokerError, name: str, before: int
) -> Flow[_Again]:
    """A delete of ``name`` was in flight when the broker went away (``err``). The entry found on a new session
    was created at or before ``before`` (a revision no later than the delete could have happened at): it is
    the one the delete was for, still there, so the delete did not happen — try again. Else ``OutcomeUnknown``."""

    def unknown(why: str) -> OutcomeUnknown:
        return OutcomeUnknown(
            f"delete of {name!r}: outcome unknown — the call was in flight, then {why}",
            operation="delete",
            name=name,
        )

    yield from _after_commit(state, budget, a, err, unknown)
    try:
        entry = yield from _retrying(state, lambda a: _stat_now(state, a, name), budget=budget)
    except BrokerError as failed:
        state.stats["unknown"] += 1
        raise unknown(f"the broker went away ({err}); asking it what happened failed ({failed})") from failed
    if entry is not None and entry.create_revision <= before:
        state.stats["found_not_done"] += 1
        return AGAIN
    state.stats["unknown"] += 1
    now = "there is no entry of that name" if entry is None else "the entry there is a newer one"
    raise unknown(f"the broker went away ({err}); after reconnecting, {now}")


def stat(state: State, name: str) -> Flow[Entry]:
    """Describe ``name``."""

    def once(a: Attempt) -> Flow[Entry]:
        who = yield from _as(state, a, need=False)
        req = pb.StatRequest(name=name)
        return Entry.from_pb((yield CallRpc("Stat", req, session=who, name=name, ready=a.ready)).entry)

    return (yield from _retrying(state, once))


def list_entries(state: State, prefix: str = "", *, selector: str = "", page_size: int = 0) -> Flow[Listing]:
    """Every entry under ``prefix`` (matching the label ``selector``), following pages. ``.revision`` is the
    revision of the first page (watch from ``revision + 1`` to miss nothing). If the broker goes away part-way,
    the listing starts again from its first page."""

    def once(a: Attempt) -> Flow[Listing]:
        who = yield from _as(state, a, need=False)
        out = Listing()
        token = ""
        first = True
        while True:
            req = pb.ListRequest(
                prefix=prefix, label_selector=selector, page_size=page_size, page_token=token
            )
            resp = yield CallRpc("List", req, session=who, ready=a.ready)
            if first:
                out.revision, first = resp.header.revision, False
            out.extend(Entry.from_pb(e) for e in resp.entries)
            token = resp.next_page_token
            if not token:
                return out

    return (yield from _retrying(state, once))


# -- leases ----------------------------------------------------------------------------------------------------


class Granted(NamedTuple):
    """A lease and its descriptor, before a driver wraps them in its ``LeaseHandle``; ``session``: the session it
    was granted in (it ends with it)."""

    lease: Lease
    fd: Received
    keepalive: bool
    session: str | None = None


def lease_request(name: str, ttl: float, shared: bool, wait: bool) -> pb.LeaseRequest:
    req = pb.LeaseRequest(
        name=name,
        mode=pb.LeaseState.MODE_SHARED if shared else pb.LeaseState.MODE_EXCLUSIVE,
        wait=wait,
    )
    req.ttl.FromNanoseconds(int(ttl * 1e9))
    return req


def lease(
    state: State,
    name: str,
    ttl: float,
    *,
    shared: bool = False,
    wait: float | None = None,
    keepalive: bool = True,
) -> Flow[Granted]:
    """Lease ``name`` (exclusive unless ``shared``) for ``ttl`` seconds; ``wait``: seconds to queue for it
    (None: fail at once with ``FailedPrecondition`` if it is held).

    Returns a ``LeaseHandle`` holding the descriptor (owned by the handle until it is released), the lease id
    and the fencing ``epoch``; it releases the lease on leaving a ``with`` (``async with``) block. With
    ``keepalive`` a background thread (task) renews the lease every ttl/3. The asyncio client returns an
    awaitable that is also an async context manager. A lease whose descriptor never arrived is released before
    the error is raised. A lease lives in the session it was granted in: if the broker goes away (a takeover,
    a restart), the handle's ``lost`` is set and the lease is not taken again behind the caller's back.
    """
    req = lease_request(name, ttl, shared, wait is not None)
    budget = Budget(
        state.timeout + (0.0 if wait is None else max(0.0, wait) + LEASE_WAIT_MARGIN), state.reconnect
    )
    yield Within(budget.deadline)

    def once(a: Attempt) -> Flow[Granted]:
        sid = yield from _as(state, a, need=True)
        # The RPC deadline bounds the queueing: the broker gives up LEASE_WAIT_MARGIN before it and answers
        # DEADLINE_EXCEEDED itself, so ``wait`` + LEASE_WAIT_MARGIN queues for ``wait`` seconds (less on a try
        # again: what is left of the call's time).
        timeout = None
        if wait is not None:
            timeout = max(0.0, min(wait, budget.left() - LEASE_WAIT_MARGIN)) + LEASE_WAIT_MARGIN
        resp = yield CallRpc("Lease", req, session=sid, name=name, timeout=timeout, ready=a.ready)
        try:
            fd, item = deliveries((yield AwaitAnswers([resp.handoff.token], session=a.session)), [name])[0]
        except BaseException:
            with contextlib.suppress(BrokerError):  # granted, but we never got it: pass it on
                yield from _release(state, resp.lease_id, session=sid, timeout=state.timeout)
            raise
        granted = Lease(
            lease_id=resp.lease_id,
            name=name,
            epoch=resp.epoch,
            ttl=ttl,
            expire_time=resp.expire_time.ToNanoseconds() / 1e9,
            entry=Entry.from_pb(resp.entry),
        )
        return Granted(granted, wrap_fd(fd, item.info), keepalive, a.session)

    return (yield from _retrying(state, once, budget=budget))


def keepalive(state: State, lease_ids: Sequence[str]) -> Flow[pb.KeepAliveResponse]:
    """Renew leases once; returns which were renewed and which are gone."""
    return (yield from _keepalive(state, lease_ids, session=True))


def _keepalive(state: State, lease_ids: Sequence[str], *, session: bool | str) -> Flow[pb.KeepAliveResponse]:
    req = pb.KeepAliveRequest(lease_ids=list(lease_ids))
    resp = yield CallStream("KeepAlive", [req], session=session)
    state.saw(resp)
    if resp is None:
        raise Aborted("keep-alive stream ended without an answer")
    return resp  # type: ignore[no-any-return]


def release(state: State, lease_id: str, *, return_fd: FdLike | None = None) -> Flow[int]:
    """End a lease; with ``return_fd`` hand a descriptor back as the entry's new descriptor (check-in; the caller
    keeps its copy). Returns the revision of the release (or of the check-in). Not tried again: a lease ends
    with its session. ``OutcomeUnknown`` if the broker went away after a check-in's descriptor was sent."""
    return (yield from _release(state, lease_id, return_fd=return_fd))


def _release(
    state: State,
    lease_id: str,
    *,
    return_fd: FdLike | None = None,
    session: bool | str | None = True,
    timeout: float | None = None,
) -> Flow[int]:
    req = pb.ReleaseRequest(lease_id=lease_id, return_descriptor=return_fd is not None)
    resp = yield CallRpc("Release", req, session=session, timeout=timeout)
    if return_fd is None:
        return int(resp.header.revision)
    sid = session if isinstance(session, str) else state.live_id()
    tok = resp.handoff.token
    deposit = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok]))
    what = f"checking in lease {lease_id[:6]}…"
    sent = False
    try:
        yield SendFrame(deposit, [fileno_of(return_fd)], expect=[tok], what=what, session=sid)
        sent = True
        (a,) = yield AwaitAnswers([tok], session=sid)
    except BrokerError as err:
        if sent and isinstance(err, DeadlineExceeded | Aborted | Unavailable | Cancelled | Unauthenticated):
            state.stats["unknown"] += 1
            name = resp.handoff.name
            raise OutcomeUnknown(
                f"check-in of {name!r} (lease {lease_id[:6]}…): outcome unknown — the descriptor was sent, then "
                f"{err}; the lease has ended either way: stat or get the entry to see which descriptor it holds",
                operation="check-in",
                name=name,
            ) from err
        raise
    if a.kind != "deposited" or a.message.HasField("error"):
        raise error_from_frame(a.message.error if a.kind == "deposited" else a.message)
    return int(a.message.revision)


class HeldLease:
    """What both clients' ``LeaseHandle`` share: ``.fd`` (the descriptor, owned by the handle until it is
    released, which closes it), ``.epoch`` (the fencing number), ``.lease_id``, ``.lease``; ``lost`` is set once
    the lease is gone — the broker said so on a keep-alive, the keep-alive could not reach it before the TTL ran
    out, or the session it was granted in ended (the broker went away: a takeover or a restart ends every
    lease, and the client never takes one again by itself)."""

    def __init__(self, client: Any, state: State, granted: Granted, lost: Signal) -> None:
        self.client = client
        self.lease = granted.lease
        self.fd = granted.fd
        self.epoch = granted.lease.epoch
        self.lease_id = granted.lease.lease_id
        self.session = granted.session
        self.lost = lost
        self._state = state
        state.leases.add(self)
        if granted.session is not None and state.live_id() != granted.session:
            lost.set()  # its session ended while the grant was on its way


def keep_lease(state: State, held: HeldLease, stop: Signal) -> Flow[None]:
    """Renew ``held`` every ttl/3 until ``stop`` is set or the lease is lost (then ``held.lost`` is set)."""
    ttl = held.lease.ttl
    # Until a renewal succeeds, the lease is good only as long as the last grant or renewal said.
    good_until = time.monotonic() + ttl
    sid = held.session
    while not (yield Pause(max(0.05, ttl / 3), stop)) and not held.lost.is_set():
        if sid is not None and state.live_id() != sid:
            held.lost.set()  # the session it was granted in has ended, and the lease with it
            return
        try:
            r = yield from _keepalive(state, [held.lease_id], session=sid or True)
        except BrokerError as err:
            if sid is not None and gone(err, as_session=sid, lost=state.lost, closed=state.closed):
                if isinstance(err, Unauthenticated):
                    held.lost.set()  # the broker does not know the session: a successor, or a restart
                    if state.live_id() == sid:
                        yield EndSession(sid)
                    return
                yield from _probe(state, sid)  # a closed conduit ends the session: lost at the next round
            if time.monotonic() >= good_until:
                held.lost.set()  # the broker is unreachable and the TTL has run out: assume it is gone
                return
            continue  # a blip: the next round may get through before the lease runs out
        if held.lease_id in r.gone:
            held.lost.set()
            return
        good_until = time.monotonic() + ttl


def end_lease(state: State, held: HeldLease, return_fd: FdLike | None = None) -> Flow[None]:
    """Release ``held`` unless it is already gone (idempotent), then close its descriptor; with ``return_fd``
    check that descriptor in as the entry's new one (the caller keeps its copy)."""
    try:
        if not held.lost.is_set():
            yield from _release(state, held.lease_id, return_fd=return_fd, session=held.session or True)
    except NotFound:
        pass
    except Unauthenticated:
        if held.session is None:
            raise  # its session is over, and the lease with it
    finally:
        held.lost.set()
        held.fd.close()
        state.leases.discard(held)


# -- watch -----------------------------------------------------------------------------------------------------


class Opened(NamedTuple):
    """A watch stream as opened: the driver's call and its first response, or why the broker refused it."""

    call: Any
    first: Any
    refusal: BrokerError | None


def watch(state: State, prefix: str = "", *, start_revision: int = 0) -> Flow[Opened]:
    """Registry events under ``prefix`` from ``start_revision`` (0: from now), open once the broker answered: a
    change made after this returns is seen. A refusal (``OUT_OF_RANGE`` with the oldest revision, a quota) is
    raised by the first read of the stream. If the broker goes away, the stream resumes on its successor after
    the last event it delivered (:func:`rewatch`)."""
    req = pb.WatchRequest(prefix=prefix, start_revision=start_revision)

    def once(a: Attempt) -> Flow[Opened]:
        who = yield from _as(state, a, need=False)
        call, first = yield OpenStream("Watch", req, session=who, ready=a.ready)
        state.saw(first)
        if first is None:
            return Opened(call, None, Aborted("the watch ended before it started"))
        return Opened(call, first, None)

    try:
        return (yield from _retrying(state, once))
    except BrokerError as refused:
        return Opened(None, None, refused)


def rewatch(state: State, stream: EventStream, err: BrokerError | None) -> Flow[bool]:
    """``stream`` ended — with ``err``, or (None) without an error — though nobody closed it. If that says the
    broker went away and the client reconnects: open it again from the revision after the last one it delivered
    (on the new session, within the client's timeout) and return True. Its events go on with nothing missed
    and nothing repeated — or, if the broker's history no longer reaches back that far (after a restart; after a
    takeover whose last revision the watch had not seen), its next read raises ``OutOfRange`` naming the oldest
    revision: list, then watch again. False: it is not resumed (the caller raises ``err``)."""
    if not state.reconnect or state.closed:
        return False
    if err is not None and not gone(err, as_session=None, lost=(), closed=state.closed):
        return False
    start = stream.revision + 1
    opened = yield from watch(state, stream.prefix, start_revision=start)
    if isinstance(opened.refusal, OutOfRange):
        r = opened.refusal
        why = OutOfRange(
            f"the watch of {stream.prefix!r} cannot resume at revision {start} after the broker went away; "
            f"{r.message}",
            oldest_revision=r.oldest_revision,
        )
        opened = Opened(None, None, why)
    stream._reopened(opened)
    state.stats["rewatches"] += 1
    return True


class EventStream:
    """What both clients' ``Watch`` share: ``header_revision`` (the revision the watch starts after), the events
    decoded in order, ``revision`` (the last revision it delivered: where it resumes after the broker went
    away), and how the stream ends (closed — by us, or with the client — ends it quietly; anything else raises
    its error, unless :func:`rewatch` resumes it)."""

    def __init__(self, paths: Paths, state: State, prefix: str = "") -> None:
        self._paths = paths
        self._state = state
        self.prefix = prefix
        self._call: Any = None
        self._buf: collections.deque[Event] = collections.deque()
        self._refusal: BrokerError | None = None
        self._closed = False
        self.header_revision: int | None = None
        self.revision = 0

    def _opened(self, opened: Opened) -> None:
        self._call, self._refusal = opened.call, opened.refusal
        if opened.first is not None:
            self._accept(opened.first)

    def _reopened(self, opened: Opened) -> None:
        """The stream again, from :func:`rewatch`."""
        self._closed = False
        self._opened(opened)

    def _accept(self, resp: pb.WatchResponse) -> None:
        if self.header_revision is None:
            self.header_revision = resp.header_revision
        self.revision = max(self.revision, resp.header_revision)
        for e in resp.events:
            self._buf.append(Event.from_pb(e))
            self.revision = max(self.revision, e.revision)

    def _readable(self) -> bool:
        """Whether to read on: False once closed; raises a refusal once."""
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            self._closed = True
            raise refusal
        return not self._closed and self._call is not None

    def _end(self, err: Any) -> BrokerError | None:
        """End the stream after a gRPC error; the error (None if it was cancelled because we closed it, or the
        client: a quiet end)."""
        ours = self._closed or self._state.closed
        self._closed = True
        return None if ours and is_cancelled(err) else error_from_rpc(err, self._paths)

    def _ended_quietly(self) -> bool:
        """The stream ended without an error; whether that is the end (a close) rather than the broker leaving."""
        ours = self._closed or self._state.closed
        self._closed = True
        return ours
