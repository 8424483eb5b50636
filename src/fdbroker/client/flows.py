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
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

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
    IF_OPEN,
    AwaitAnswers,
    AwaitFetch,
    CallRpc,
    CallStream,
    Dial,
    Flow,
    OpenSession,
    OpenStream,
    Pause,
    ReadFrame,
    Redeem,
    SendFrame,
)
from fdbroker.client.trust import Paths, Trust, connect_failure
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import SCM_MAX_FD
from fdbroker.errors import Aborted, BrokerError, DeadlineExceeded, NotFound, Unavailable
from fdbroker.protocol import LEASE_WAIT_MARGIN
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

Delivered = tuple[int, cpb.DeliverItem]
"""A received descriptor and the ``DeliverItem`` that came with it (the caller owns the descriptor)."""


class State:
    """What one client's flows remember between calls: the open session, prefetched tokens, the lease handles not
    yet released, counters (``stats``: ``get_rpcs``, ``batch_get_rpcs``, ``redeems``). The driver calls
    :meth:`session_began` and :meth:`session_ended`; ``new_signal`` makes the driver's one-shot flags."""

    def __init__(self, prefetch: int | None, new_signal: Callable[[], Signal]) -> None:
        self.session: Welcome | None = None
        self.token_ttl = 5.0
        self.prefetch = Prefetch(prefetch, new_signal)
        self.stats: collections.Counter[str] = collections.Counter()
        self.leases: set[HeldLease] = set()
        self._nonces = itertools.count(1)

    def session_began(self, welcome: Welcome) -> None:
        self.session = welcome
        self.token_ttl = welcome.token_ttl or self.token_ttl
        self.prefetch.clear()

    def session_ended(self) -> None:
        """Tokens and leases belong to the session: the broker voided the one and released the other."""
        self.prefetch.clear()
        for h in list(self.leases):
            h.lost.set()

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
    frame: cpb.ConduitFrame, tokens: Sequence[bytes], fds: Sequence[int] = (), *, what: str, name: str = ""
) -> Flow[list[Answer]]:
    """Send ``frame`` and await the answers to ``tokens``."""
    yield SendFrame(frame, fds, expect=tokens, what=what, name=name)
    return (yield AwaitAnswers(tokens))  # type: ignore[no-any-return]


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
    yield OpenSession()
    nonce = state.nonce()
    yield from _exchange(cpb.ConduitFrame(ping=cpb.Ping(nonce=nonce)), [pong_key(nonce)], what="pinging")


def info(state: State) -> Flow[Info]:
    """Version, counts and limits of the broker."""
    return Info.from_pb((yield CallRpc("GetInfo", pb.GetInfoRequest(), session=IF_OPEN)))


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
    stores its own duplicate); it must stay open until this returns."""
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
    caller keeps its descriptors; they must stay open until this returns."""
    pairs = list(items.items() if isinstance(items, Mapping) else items)
    fds = [fileno_of(f) for _, f in pairs]
    names = [n for n, _ in pairs]
    reqs = [
        put_request(n, labels=labels, ttl=ttl, ephemeral=ephemeral, replace=replace, if_revision=if_revision)
        for n in names
    ]
    if len(reqs) == 1:
        tokens = [(yield CallRpc("Put", reqs[0], name=names[0])).handoff.token]
    else:
        resp = yield CallRpc("BatchPut", pb.BatchPutRequest(requests=reqs))
        tokens = [h.token for h in resp.handoffs]
    for i in range(0, len(tokens), SCM_MAX_FD):
        chunk = tokens[i : i + SCM_MAX_FD]
        deposit = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=chunk))
        yield SendFrame(deposit, fds[i : i + SCM_MAX_FD], expect=chunk, what=f"depositing {names[i]!r}")
    return deposited_entries((yield AwaitAnswers(tokens)), names)


# -- get -------------------------------------------------------------------------------------------------------


Copies = tuple[list[int], Sequence[Any]]
"""Received descriptors and their ``DeliverItem``s, in order (the caller owns the descriptors; the items of a
lean answer are parsed only when read)."""


def _redeem(state: State, key: str, count: int) -> Flow[Copies | None]:
    """``count`` copies through one prefetched token for ``key``, or None when there is no usable token."""
    while (tok := state.prefetch.pop(key)) is not None:
        a = yield Redeem(tok, count)
        state.stats["redeems"] += 1
        if a.kind == "batch" and len(a.message[1]) == count:
            items, fds = a.message
            return fds, items
        if a.kind == "deliver" and count == 1:
            return [a.fd], [a.message]
        close_answers([a])
        state.prefetch.drop(key)  # replaced, deleted or leased away since: ask the control plane again
    return None


def _redeem_shared(state: State, key: str, count: int) -> Flow[Copies | None]:
    """Redeem a prefetched token for ``key``; while another caller's RPC is fetching tokens for it, wait for that
    RPC and use its tokens instead of asking for more (concurrent gets of one name share them)."""
    while True:
        got = yield from _redeem(state, key, count)
        if got is not None:
            return got
        fetching = state.prefetch.in_flight(key)
        if fetching is None:
            return None
        yield AwaitFetch(fetching)


def _get_one(state: State, name: str) -> Flow[Delivered]:
    got = yield from _redeem_shared(state, name, 1)
    if got is not None:
        return got[0][0], got[1][0]
    prefetch = state.prefetch.plan(name, state.token_ttl)
    with state.prefetch.fetching(name, prefetch):
        resp = yield CallRpc("Get", pb.GetRequest(name=name, prefetch=prefetch), name=name)
        state.stats["get_rpcs"] += 1
        state.prefetch.keep(name, resp, state.token_ttl)
    return deliveries((yield AwaitAnswers([resp.handoffs[0].token])), [name])[0]


def get(state: State, name: str) -> Flow[Received]:
    """A copy of ``name``'s descriptor: a socket, a file object, or an :class:`OwnedFd`; the caller owns it."""
    fd, item = yield from _get_one(state, name)
    return wrap_fd(fd, item.info)


def get_fd(state: State, name: str) -> Flow[OwnedFd]:
    """Like ``get``, but always an :class:`OwnedFd` (the caller owns it)."""
    fd, _ = yield from _get_one(state, name)
    return OwnedFd(fd)


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
    names = list(names)
    small = 0 < len(names) <= SCM_MAX_FD
    key = batch_key(names)
    got = (yield from _redeem_shared(state, key, len(names))) if small else None
    if got is None:
        prefetch = min(BATCH_PREFETCH_LIMIT, state.prefetch.plan(key, state.token_ttl)) if small else 0
        with state.prefetch.fetching(key, prefetch):
            resp = yield CallRpc("BatchGet", pb.BatchGetRequest(names=names, prefetch=prefetch))
            state.stats["batch_get_rpcs"] += 1
            state.prefetch.keep(key, resp, state.token_ttl)
        pairs = deliveries((yield AwaitAnswers([h.token for h in resp.handoffs])), names)
        got = [fd for fd, _ in pairs], [item for _, item in pairs]
    return got


def take(state: State, name: str, *, if_revision: int = 0, raw: bool = False) -> Flow[Any]:
    """Move ``name``'s descriptor to the caller (who owns it): the entry is gone once this returns. Atomic: if
    this fails before the broker confirmed, the entry stays and the received copy is closed."""
    resp = yield CallRpc("Take", pb.TakeRequest(name=name, if_revision=if_revision), name=name)
    tok = resp.handoff.token
    fd, item = deliveries((yield AwaitAnswers([tok])), [name])[0]
    try:
        ack = cpb.ConduitFrame(ack=cpb.Ack(tokens=[tok]))
        a = (yield from _exchange(ack, [tok], what=f"confirming the take of {name!r}", name=name))[0]
        if a.kind != "acked":
            raise (
                error_from_frame(a.message)
                if a.kind == "error"
                else Aborted(f"take of {name!r} not confirmed; the entry stays in the broker", name=name)
            )
    except BaseException:
        close_quietly(fd)
        raise
    return OwnedFd(fd) if raw else wrap_fd(fd, item.info)


# -- delete / stat / list --------------------------------------------------------------------------------------


def delete(state: State, name: str, *, if_revision: int = 0) -> Flow[int]:
    """Remove ``name``; the broker closes its copy. Returns the delete's revision."""
    req = pb.DeleteRequest(name=name, if_revision=if_revision)
    resp = yield CallRpc("Delete", req, name=name)
    state.prefetch.drop(name)
    return int(resp.header.revision)


def stat(state: State, name: str) -> Flow[Entry]:
    """Describe ``name``."""
    return Entry.from_pb((yield CallRpc("Stat", pb.StatRequest(name=name), session=IF_OPEN, name=name)).entry)


def list_entries(state: State, prefix: str = "", *, selector: str = "", page_size: int = 0) -> Flow[Listing]:
    """Every entry under ``prefix`` (matching the label ``selector``), following pages. ``.revision`` is the
    revision of the first page (watch from ``revision + 1`` to miss nothing)."""
    out = Listing()
    token = ""
    first = True
    while True:
        req = pb.ListRequest(prefix=prefix, label_selector=selector, page_size=page_size, page_token=token)
        resp = yield CallRpc("List", req, session=IF_OPEN)
        if first:
            out.revision, first = resp.header.revision, False
        out.extend(Entry.from_pb(e) for e in resp.entries)
        token = resp.next_page_token
        if not token:
            return out


# -- leases ----------------------------------------------------------------------------------------------------


class Granted(NamedTuple):
    """A lease and its descriptor, before a driver wraps them in its ``LeaseHandle``."""

    lease: Lease
    fd: Received
    keepalive: bool


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
    the error is raised.
    """
    req = lease_request(name, ttl, shared, wait is not None)
    # The RPC deadline bounds the queueing: the broker gives up LEASE_WAIT_MARGIN before it and answers
    # DEADLINE_EXCEEDED itself, so ``wait`` + LEASE_WAIT_MARGIN queues for ``wait`` seconds.
    timeout = None if wait is None else max(0.0, wait) + LEASE_WAIT_MARGIN
    resp = yield CallRpc("Lease", req, name=name, timeout=timeout)
    try:
        fd, item = deliveries((yield AwaitAnswers([resp.handoff.token])), [name])[0]
    except BaseException:
        with contextlib.suppress(BrokerError):
            yield from release(state, resp.lease_id)  # granted, but we never got it: pass it on
        raise
    granted = Lease(
        lease_id=resp.lease_id,
        name=name,
        epoch=resp.epoch,
        ttl=ttl,
        expire_time=resp.expire_time.ToNanoseconds() / 1e9,
        entry=Entry.from_pb(resp.entry),
    )
    return Granted(granted, wrap_fd(fd, item.info), keepalive)


def keepalive(state: State, lease_ids: Sequence[str]) -> Flow[pb.KeepAliveResponse]:
    """Renew leases once; returns which were renewed and which are gone."""
    resp = yield CallStream("KeepAlive", [pb.KeepAliveRequest(lease_ids=list(lease_ids))])
    if resp is None:
        raise Aborted("keep-alive stream ended without an answer")
    return resp  # type: ignore[no-any-return]


def release(state: State, lease_id: str, *, return_fd: FdLike | None = None) -> Flow[int]:
    """End a lease; with ``return_fd`` hand a descriptor back as the entry's new descriptor (check-in; the caller
    keeps its copy). Returns the revision of the release (or of the check-in)."""
    req = pb.ReleaseRequest(lease_id=lease_id, return_descriptor=return_fd is not None)
    resp = yield CallRpc("Release", req)
    if return_fd is None:
        return int(resp.header.revision)
    tok = resp.handoff.token
    deposit = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok]))
    what = f"checking in lease {lease_id[:6]}…"
    a = (yield from _exchange(deposit, [tok], [fileno_of(return_fd)], what=what))[0]
    if a.kind != "deposited" or a.message.HasField("error"):
        raise error_from_frame(a.message.error if a.kind == "deposited" else a.message)
    return int(a.message.revision)


class HeldLease:
    """What both clients' ``LeaseHandle`` share: ``.fd`` (the descriptor, owned by the handle until it is
    released, which closes it), ``.epoch`` (the fencing number), ``.lease_id``, ``.lease``; ``lost`` is set once
    the lease is gone — the broker said so on a keep-alive, the keep-alive could not reach it before the TTL ran
    out, or the session it was granted in ended."""

    def __init__(self, client: Any, state: State, granted: Granted, lost: Signal) -> None:
        self.client = client
        self.lease = granted.lease
        self.fd = granted.fd
        self.epoch = granted.lease.epoch
        self.lease_id = granted.lease.lease_id
        self.lost = lost
        self._state = state
        state.leases.add(self)


def keep_lease(state: State, held: HeldLease, stop: Signal) -> Flow[None]:
    """Renew ``held`` every ttl/3 until ``stop`` is set or the lease is lost (then ``held.lost`` is set)."""
    ttl = held.lease.ttl
    # Until a renewal succeeds, the lease is good only as long as the last grant or renewal said.
    good_until = time.monotonic() + ttl
    while not (yield Pause(max(0.05, ttl / 3), stop)) and not held.lost.is_set():
        try:
            r = yield from keepalive(state, [held.lease_id])
        except BrokerError:
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
            yield from release(state, held.lease_id, return_fd=return_fd)
    except NotFound:
        pass
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
    raised by the first read of the stream."""
    req = pb.WatchRequest(prefix=prefix, start_revision=start_revision)
    try:
        call, first = yield OpenStream("Watch", req)
    except BrokerError as refused:
        return Opened(None, None, refused)
    if first is None:
        return Opened(call, None, Aborted("the watch ended before it started"))
    return Opened(call, first, None)


class EventStream:
    """What both clients' ``Watch`` share: ``header_revision`` (the revision the watch starts after), the events
    decoded in order, and how the stream ends (CANCELLED — closed by us — ends it quietly; anything else raises
    its error)."""

    def __init__(self, paths: Paths) -> None:
        self._paths = paths
        self._call: Any = None
        self._buf: collections.deque[Event] = collections.deque()
        self._refusal: BrokerError | None = None
        self._closed = False
        self.header_revision: int | None = None

    def _opened(self, opened: Opened) -> None:
        self._call, self._refusal = opened.call, opened.refusal
        if opened.first is not None:
            self._accept(opened.first)

    def _accept(self, resp: pb.WatchResponse) -> None:
        if self.header_revision is None:
            self.header_revision = resp.header_revision
        self._buf.extend(Event.from_pb(e) for e in resp.events)

    def _readable(self) -> bool:
        """Whether to read on: False once closed; raises a refusal once."""
        if self._refusal is not None:
            refusal, self._refusal = self._refusal, None
            self._closed = True
            raise refusal
        return not self._closed and self._call is not None

    def _end(self, err: Any) -> BrokerError | None:
        """End the stream after a gRPC error; the error to raise, or None if we cancelled it (a close)."""
        self._closed = True
        return None if is_cancelled(err) else error_from_rpc(err, self._paths)
