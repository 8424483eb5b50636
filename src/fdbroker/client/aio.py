"""``fdbroker.aio.Client``: the asyncio client.

The same verbs, results, errors and descriptor ownership as :class:`fdbroker.Client`; only the I/O differs. One
``grpc.aio`` channel to ``control.sock`` and, once a call needs a session, one conduit connection to
``conduit.sock`` (an :class:`~fdbroker.conduit.aio.AsyncFramedConduit`).

Many tasks share one session. A reader task, started by :meth:`Client.connect` and stopped by
:meth:`Client.aclose`, reads the conduit continuously and files each answer under its token: into the future of
the task waiting for that token, or — for a ``Deliver`` that the broker sends *before* the RPC that asked for it
returns — into a mailbox the task empties as soon as its RPC returns. When the conduit breaks, every pending
future fails with :class:`~fdbroker.errors.Aborted` and the next call that needs a session opens a new one.

Descriptor ownership, for every call:

* ``put``/``put_many``/``release(return_fd=...)`` never take the caller's descriptor: the broker stores its own
  duplicate; the caller may close its copy once the call returns (not before: it is sent during the call).
* ``get``/``get_many``/``take``/``lease`` return new descriptors the caller owns, wrapped so they close
  themselves (a ``socket.socket``, a file object, or an :class:`OwnedFd`). ``get_fd`` returns an ``OwnedFd``
  whatever the kind. A lease's descriptor is owned by its :class:`LeaseHandle` until the lease is released.
* A delivery nobody takes any more (its caller was cancelled or timed out, or its RPC failed after the broker
  had sent it) is closed by the client, never leaked: at once if it arrives after its caller gave up, else as
  soon as no RPC that could claim it is still in flight.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Generator, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from fdbroker.client.core import (
    BATCH_PREFETCH_LIMIT,
    Entry,
    Event,
    FdLike,
    Info,
    Lease,
    Mail,
    OwnedFd,
    Paths,
    PrefetchedTokens,
    PrefetchPolicy,
    Received,
    Trust,
    TrustUids,
    close_mail,
    connect_failure,
    deliveries,
    deposited_entries,
    error_from_frame,
    error_from_rpc,
    fileno_of,
    lease_request,
    put_request,
    socket_address,
    sort_frame,
    wrap_fd,
)
from fdbroker.client.sync import Listing
from fdbroker.conduit.aio import AsyncFramedConduit
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import SCM_MAX_FD, Frame
from fdbroker.errors import Aborted, BrokerError, Cancelled, DeadlineExceeded, NotFound, Unavailable
from fdbroker.protocol import LEASE_WAIT_MARGIN, SESSION_METADATA_KEY
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc
from fdbroker.v1 import conduit_pb2 as cpb

__all__ = ["Client", "LeaseHandle", "Listing", "Watch"]

# Errors the conduit reports in-band without breaking the stream: the descriptors concerned are already closed.
_NON_FATAL = (ErrType.NO_FD, ErrType.BAD_CTRL_MESG)


class Client:
    """An asyncio fdbroker client. Use ``async with Client(...) as c:``, or call :meth:`aclose`.

    ``run_dir``: the broker's run directory (default: ``FDBROKER_RUN_DIR``, else the per-user default).
    ``timeout``: seconds for each call. ``prefetch``: GET tokens to ask for on each ``get`` RPC so repeated gets
    of the same name cost one conduit round trip instead of an RPC (None: adaptive, as :class:`fdbroker.Client`).
    ``trust_uids``: who besides root and this process's uid may serve the run directory, checked before anything
    is sent, as :class:`fdbroker.Client` (default: ``$FDBROKER_TRUST_UID``).
    Concurrent gets of one name share a prefetching RPC in flight instead of each asking for its own tokens.

    Create and use it inside one event loop. ``stats`` counts ``get_rpcs``, ``batch_get_rpcs`` and ``redeems``
    (prefetched tokens used), for the curious and for tests.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        prefetch: int | None = None,
        trust_uids: TrustUids | None = None,
    ) -> None:
        self.paths = Paths.resolve(run_dir)
        self.trust = Trust(trust_uids)
        self.timeout = timeout
        self.prefetch = prefetch
        self.token_ttl = 5.0
        self.identity: tuple[int, int, int] | None = None
        self.stats: collections.Counter[str] = collections.Counter()
        self._dir_fd = -1  # the run directory, opened (and checked) on first use; we connect through it
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._closed = False
        # session
        self._conduit: AsyncFramedConduit | None = None
        self._reader: asyncio.Task[None] | None = None
        self._session_id: str | None = None
        self._dead: BrokerError | None = None
        self._connect_lock = asyncio.Lock()
        # answers on the conduit
        self._waiters: dict[bytes, asyncio.Future[Mail]] = {}
        self._mail: dict[bytes, tuple[int, Mail]] = {}  # token → (RPC sequence number when filed, answer)
        self._pongs: dict[int, asyncio.Future[None]] = {}
        self._nonces = itertools.count(1)
        # RPCs that may be answered by a Deliver: a mailed delivery is an orphan once none started before it
        # arrived is still in flight (they claim their tokens before leaving _claiming()).
        self._rpc_seq = 0
        self._inflight: set[int] = set()
        # prefetch
        self._policy = PrefetchPolicy(prefetch)
        self._prefetched = PrefetchedTokens()
        self._fetching: dict[str, asyncio.Future[None]] = {}
        self._leases: set[LeaseHandle] = set()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the conduit (which ends the session and releases its leases on the broker) and the channel.

        Pending calls fail with :class:`Aborted`; undelivered descriptors are closed. Lease handles stop their
        keep-alive and count as lost; each still owns (and closes on release) its descriptor. Idempotent.
        """
        self._closed = True
        for h in list(self._leases):
            await h._stop_keepalive()
        await self._drop_session(Aborted("the client was closed; nothing more is handed over"))
        self._session_id = None
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()
        if self._dir_fd >= 0:  # after the channel: it connects through the descriptor
            os.close(self._dir_fd)
            self._dir_fd = -1

    def _run_dir_fd(self) -> int:
        """The run directory's descriptor, opened (and checked: :meth:`Trust.open_run_dir`) once."""
        if self._dir_fd < 0:
            self._dir_fd = self.trust.open_run_dir(self.paths)
        return self._dir_fd

    @property
    def session_id(self) -> str | None:
        return self._session_id

    @property
    def stub(self) -> Any:
        """The ``fdbroker.v1.FdBroker`` stub on this client's channel (created on first use, in the loop, once
        the run directory and the owner of ``control.sock`` passed the trust checks)."""
        if self._closed:
            raise Cancelled("this fdbroker.aio.Client is closed; create a new one")
        if self._stub is None:
            dir_fd = self._run_dir_fd()
            self.trust.check_control(self.paths, dir_fd)
            target = socket_address(dir_fd, self.paths.control)
            self._channel = grpc.aio.insecure_channel(f"unix:{target}")
            self._stub = pb_grpc.FdBrokerStub(self._channel)
        return self._stub

    async def connect(self) -> str:
        """Open the conduit (once; again after it broke) and return the session id. Calls that need a session
        do it implicitly. ``Unavailable`` if no broker answers at the run directory."""
        if self._session_id is not None and self._dead is None:
            return self._session_id
        async with self._connect_lock:
            if self._session_id is not None and self._dead is None:
                return self._session_id
            if self._closed:
                raise Cancelled("this fdbroker.aio.Client is closed; create a new one")
            await self._drop_session(self._dead or Aborted("the session was replaced"))
            address = socket_address(self._run_dir_fd(), self.paths.conduit)
            try:
                conduit = await AsyncFramedConduit.open(address, timeout=self.timeout)
            except ConduitError as err:
                raise self.paths.not_running(connect_failure(self.paths, err)) from None
            try:
                self.trust.check_peer(self.paths, conduit.peer_credentials())
                frame = await conduit.recv(timeout=self.timeout)
            except ConduitError as err:
                conduit.close()
                if err.type is ErrType.TIMEOUT:
                    raise DeadlineExceeded(
                        f"the broker at {self.paths.run_dir} did not answer within {self.timeout:g}s"
                    ) from None
                raise Unavailable(f"the broker at {self.paths.run_dir} closed the conduit: {err}") from None
            except BaseException:
                conduit.close()
                raise
            frame.close_fds()
            kind = frame.message.WhichOneof("body")
            if kind != "welcome":
                conduit.close()
                if kind == "error":
                    raise error_from_frame(frame.message.error)
                raise Unavailable(
                    f"the broker sent {kind} instead of welcome; is {self.paths.conduit} a broker?"
                )
            w = frame.message.welcome
            self._conduit = conduit
            self._session_id = w.session_id
            self._dead = None
            self.token_ttl = w.token_ttl.ToNanoseconds() / 1e9 or self.token_ttl
            self.identity = (w.identity.pid, w.identity.uid, w.identity.gid)
            self._reader = asyncio.get_running_loop().create_task(
                self._read(conduit), name=f"fdbroker-conduit-reader-{w.session_id[:6]}"
            )
            return w.session_id

    async def _drop_session(self, why: BrokerError) -> None:
        """Stop the reader, close the conduit, fail every waiter with ``why``, close undelivered descriptors."""
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        conduit, self._conduit = self._conduit, None
        if conduit is not None:
            conduit.close()
        self._fail_pending(why)

    def _fail_pending(self, why: BrokerError) -> None:
        self._dead = why
        waiters, self._waiters = self._waiters, {}
        for fut in waiters.values():
            if not fut.done():
                fut.set_exception(why)
        pongs, self._pongs = self._pongs, {}
        for pf in pongs.values():
            if not pf.done():
                pf.set_exception(why)
        mail, self._mail = self._mail, {}
        close_mail(m for _, m in mail.values())
        self._prefetched.clear()  # tokens belong to the session
        for h in self._leases:
            h.lost.set()  # so do leases: the broker released them when the session ended

    async def _md(self, session: bool) -> list[tuple[str, str]]:
        if session:
            return [(SESSION_METADATA_KEY, await self.connect())]
        if self._session_id is not None and self._dead is None:
            return [(SESSION_METADATA_KEY, self._session_id)]
        return []

    async def _rpc(
        self, method: str, request: Any, *, session: bool, name: str = "", timeout: float | None = None
    ) -> Any:
        md = await self._md(session)
        try:
            return await getattr(self.stub, method)(request, metadata=md, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            error = error_from_rpc(err, self.paths, name)
        # Raised outside the except block, so the error has no __context__: the gRPC error's traceback holds the
        # call, which holds the channel, which keeps its connection to the broker open after aclose() for as
        # long as anyone keeps our error (a pytest.raises, a log record).
        raise error

    # -- the conduit: reader, mailbox, waiting -------------------------------------------------------------------

    async def _read(self, conduit: AsyncFramedConduit) -> None:
        """The reader task: file every frame until the conduit ends, then fail whatever still waits."""
        try:
            while True:
                try:
                    frame = await conduit.recv()
                except ConduitError as err:
                    if err.type in _NON_FATAL:
                        continue
                    raise
                self._file(frame)
                if self._dead is not None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self._conduit is conduit:
                self._fail_pending(
                    Aborted(
                        f"the conduit to the broker at {self.paths.run_dir} broke ({err}); nothing pending was "
                        "handed over; retry (a new session is opened)"
                    )
                )

    def _file(self, frame: Frame) -> None:
        """File one frame's answers (owning its descriptors: each is filed or closed)."""
        if frame.message.WhichOneof("body") == "pong":
            frame.close_fds()
            pf = self._pongs.pop(frame.message.pong.nonce, None)
            if pf is not None and not pf.done():
                pf.set_result(None)
            return
        answers, whole = sort_frame(frame)
        for token, mail in answers:
            fut = self._waiters.pop(token, None)
            if fut is not None and not fut.done():
                fut.set_result(mail)
            elif mail.kind == "deliver" and self._inflight:
                self._mail[token] = (self._rpc_seq, mail)  # its RPC has not returned yet
            else:
                close_mail([mail])  # its caller gave up
        if whole is not None:
            # An error about a frame as a whole cannot be matched to a waiter: like the sync client, end the
            # session so nobody waits for an answer that will not come.
            self._fail_pending(whole)

    @contextlib.contextmanager
    def _claiming(self) -> Iterator[None]:
        """Wrap an RPC that makes the broker send a ``Deliver``, up to and including claiming its tokens."""
        self._rpc_seq += 1
        seq = self._rpc_seq
        self._inflight.add(seq)
        try:
            yield
        finally:
            self._inflight.discard(seq)
            low = min(self._inflight, default=self._rpc_seq + 1)
            orphans = [t for t, (filed, _) in self._mail.items() if filed < low]
            close_mail(self._mail.pop(t)[1] for t in orphans)

    def _expect(self, tokens: Sequence[bytes]) -> list[asyncio.Future[Mail]]:
        """Register interest in answers for ``tokens`` (taking any already mailed). No await: call it before
        sending the frame that will be answered, or right after the RPC that issued the tokens."""
        if self._dead is not None:
            raise self._dead
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[Mail]] = []
        for t in tokens:
            fut: asyncio.Future[Mail] = loop.create_future()
            mailed = self._mail.pop(t, None)
            if mailed is not None:
                fut.set_result(mailed[1])
            else:
                self._waiters[t] = fut
            futs.append(fut)
        return futs

    def _abandon(self, tokens: Sequence[bytes], futs: Sequence[asyncio.Future[Mail]]) -> None:
        """Give up on answers: close what arrived; what arrives later is closed by the reader."""
        for t, fut in zip(tokens, futs, strict=True):
            if self._waiters.get(t) is fut:
                del self._waiters[t]
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                close_mail([fut.result()])
            elif not fut.done():
                fut.cancel()

    async def _collect(
        self, tokens: Sequence[bytes], futs: Sequence[asyncio.Future[Mail]], timeout: float | None = None
    ) -> list[Mail]:
        """Wait for every answer; in order. On error, timeout or cancellation, close whatever arrived."""
        limit = timeout or self.timeout
        try:
            _, pending = await asyncio.wait(futs, timeout=limit)
        except BaseException:
            self._abandon(tokens, futs)
            raise
        if pending:
            self._abandon(tokens, futs)
            raise DeadlineExceeded(f"no answer on the conduit within {limit:g}s")
        errors = [e for e in (f.exception() for f in futs) if e is not None]
        if errors:
            close_mail(f.result() for f in futs if f.exception() is None)
            raise errors[0]
        return [f.result() for f in futs]

    async def _send(self, message: cpb.ConduitFrame, fds: Sequence[int] = (), *, what: str) -> None:
        """Send one frame on the session's conduit; a failure ends the session (``Aborted``)."""
        conduit = self._conduit
        if self._dead is not None:
            raise self._dead
        if conduit is None:
            raise Aborted(f"no conduit while {what}; retry (a new session is opened)")
        try:
            await conduit.send(message, fds, timeout=self.timeout)
        except ConduitError as err:
            dead = Aborted(f"the conduit broke while {what}: {err}; retry (a new session is opened)")
            if self._conduit is conduit:
                self._fail_pending(dead)
            raise dead from None

    async def _exchange(
        self, tokens: Sequence[bytes], message: cpb.ConduitFrame, fds: Sequence[int] = (), *, what: str
    ) -> list[Mail]:
        futs = self._expect(tokens)
        try:
            await self._send(message, fds, what=what)
        except BaseException:
            self._abandon(tokens, futs)
            raise
        return await self._collect(tokens, futs)

    async def ping(self) -> None:
        """One ``Ping``/``Pong`` round trip on the conduit (opening the session if needed). Every frame the
        broker sent before the ``Pong`` has been filed when this returns."""
        await self.connect()
        nonce = next(self._nonces)
        pf: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pongs[nonce] = pf
        try:
            await self._send(cpb.ConduitFrame(ping=cpb.Ping(nonce=nonce)), what="pinging")
            async with asyncio.timeout(self.timeout):
                await pf
        except TimeoutError:
            raise DeadlineExceeded(f"no pong on the conduit within {self.timeout:g}s") from None
        finally:
            self._pongs.pop(nonce, None)

    # -- info ----------------------------------------------------------------------------------------------------

    async def info(self) -> Info:
        """Version, counts and limits of the broker."""
        return Info.from_pb(await self._rpc("GetInfo", pb.GetInfoRequest(), session=False))

    # -- put -----------------------------------------------------------------------------------------------------

    async def put(
        self,
        name: str,
        fd: FdLike,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
        ephemeral: bool = False,
        replace: bool = False,
        if_revision: int = 0,
    ) -> Entry:
        """Deposit ``fd`` under ``name`` and return the stored entry. The caller keeps its descriptor."""
        entries = await self.put_many(
            [(name, fd)],
            labels=labels,
            ttl=ttl,
            ephemeral=ephemeral,
            replace=replace,
            if_revision=if_revision,
        )
        return entries[0]

    async def put_many(
        self,
        items: Iterable[tuple[str, FdLike]] | Mapping[str, FdLike],
        *,
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
        ephemeral: bool = False,
        replace: bool = False,
        if_revision: int = 0,
    ) -> list[Entry]:
        """Deposit many descriptors in one RPC and as few conduit messages as possible (253 per message). The
        caller keeps its descriptors; they must stay open until this returns."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        fds = [fileno_of(f) for _, f in pairs]
        names = [n for n, _ in pairs]
        reqs = [
            put_request(
                n, labels=labels, ttl=ttl, ephemeral=ephemeral, replace=replace, if_revision=if_revision
            )
            for n in names
        ]
        if len(reqs) == 1:
            handoffs = [(await self._rpc("Put", reqs[0], session=True, name=names[0])).handoff]
        else:
            resp = await self._rpc("BatchPut", pb.BatchPutRequest(requests=reqs), session=True)
            handoffs = list(resp.handoffs)
        tokens = [h.token for h in handoffs]
        futs = self._expect(tokens)
        try:
            for i in range(0, len(tokens), SCM_MAX_FD):
                await self._send(
                    cpb.ConduitFrame(deposit=cpb.Deposit(tokens=tokens[i : i + SCM_MAX_FD])),
                    fds[i : i + SCM_MAX_FD],
                    what=f"depositing {names[i]!r}",
                )
        except BaseException:
            self._abandon(tokens, futs)
            raise
        return deposited_entries(await self._collect(tokens, futs), names)

    # -- get -----------------------------------------------------------------------------------------------------

    async def _redeem(self, key: str, count: int) -> list[tuple[int, cpb.DeliverItem]] | None:
        """``count`` copies through one prefetched token for ``key`` (a name, or a batch's names joined by
        ``\\0``), or None when there is no usable token."""
        while self._dead is None and self._conduit is not None:
            tok = self._prefetched.pop(key)
            if tok is None:
                return None
            mail = (
                await self._exchange(
                    [tok],
                    cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[tok])),
                    what="redeeming a prefetched token",
                )
            )[0]
            self.stats["redeems"] += 1
            if mail.kind == "batch" and len(mail.message[1]) == count:
                items, fds = mail.message
                return list(zip(fds, items, strict=True))
            if mail.kind == "deliver" and count == 1:
                return [(mail.fd, mail.message)]
            close_mail([mail])
            self._prefetched.drop(key)  # replaced, deleted or leased away since: ask the control plane again
        return None

    async def _shared_prefetch(self, key: str, count: int) -> list[tuple[int, cpb.DeliverItem]] | None:
        """Redeem a prefetched token for ``key``; while another task's RPC is fetching tokens for it, wait for
        that RPC and use its tokens instead of asking for more (concurrent gets of one name share them)."""
        while True:
            got = await self._redeem(key, count)
            if got is not None:
                return got
            fetching = self._fetching.get(key)
            if fetching is None:
                return None
            await asyncio.shield(fetching)

    @contextlib.contextmanager
    def _prefetching(self, key: str, prefetch: int) -> Iterator[None]:
        """Mark an RPC that fetches ``prefetch`` tokens for ``key`` as in flight (see :meth:`_shared_prefetch`)."""
        if not prefetch:
            yield
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._fetching[key] = done
        try:
            yield
        finally:
            if self._fetching.get(key) is done:
                del self._fetching[key]
            done.set_result(None)

    def _keep_prefetched(self, key: str, resp: Any) -> None:
        if resp.prefetch_tokens:
            ttl = self.token_ttl
            if resp.HasField("prefetch_expire_time"):
                ttl = resp.prefetch_expire_time.ToNanoseconds() / 1e9 - time.time()
            self._prefetched.add(key, resp.prefetch_tokens, time.monotonic() + ttl)

    async def _get_raw(self, name: str) -> tuple[int, cpb.DeliverItem]:
        got = await self._shared_prefetch(name, 1)
        if got is not None:
            return got[0]
        prefetch = self._policy.next(name, self.token_ttl)
        with self._prefetching(name, prefetch), self._claiming():
            resp = await self._rpc(
                "Get", pb.GetRequest(name=name, prefetch=prefetch), session=True, name=name
            )
            self.stats["get_rpcs"] += 1
            tok = resp.handoffs[0].token
            futs = self._expect([tok])
            self._keep_prefetched(name, resp)
        return deliveries(await self._collect([tok], futs), [name])[0]

    async def get(self, name: str) -> Received:
        """A copy of ``name``'s descriptor: a socket, a file object, or an :class:`OwnedFd`; the caller owns it."""
        fd, item = await self._get_raw(name)
        return wrap_fd(fd, item.info)

    async def get_fd(self, name: str) -> OwnedFd:
        """Like :meth:`get`, but always an :class:`OwnedFd` (the caller owns it)."""
        return OwnedFd((await self._get_raw(name))[0])

    async def get_many(self, names: Sequence[str], *, raw: bool = False) -> list[Any]:
        """Copies of many entries, in order: one BatchGet RPC, descriptors in messages of up to 253. The caller
        owns them (``OwnedFd`` each with ``raw``). All or nothing: on any error none is returned or kept open.

        A batch of at most 253 names fetched again soon after is served by a prefetched batch token (same
        adaptive policy as ``get``): one conduit round trip for the whole batch, no RPC.
        """
        names = list(names)
        small = 0 < len(names) <= SCM_MAX_FD
        key = "\0".join(names)  # \0 never occurs in a name: no clash with single-name keys
        got = await self._shared_prefetch(key, len(names)) if small else None
        if got is None:
            prefetch = min(BATCH_PREFETCH_LIMIT, self._policy.next(key, self.token_ttl)) if small else 0
            with self._prefetching(key, prefetch), self._claiming():
                resp = await self._rpc(
                    "BatchGet", pb.BatchGetRequest(names=names, prefetch=prefetch), session=True
                )
                self.stats["batch_get_rpcs"] += 1
                toks = [h.token for h in resp.handoffs]
                futs = self._expect(toks)
                self._keep_prefetched(key, resp)
            got = deliveries(await self._collect(toks, futs), names)
        return [OwnedFd(fd) if raw else wrap_fd(fd, item.info) for fd, item in got]

    async def take(self, name: str, *, if_revision: int = 0, raw: bool = False) -> Any:
        """Move ``name``'s descriptor to the caller (who owns it): the entry is gone once this returns. Atomic:
        if this fails before the broker confirmed, the entry stays and the received copy is closed."""
        with self._claiming():
            resp = await self._rpc(
                "Take", pb.TakeRequest(name=name, if_revision=if_revision), session=True, name=name
            )
            tok = resp.handoff.token
            futs = self._expect([tok])
        fd, item = deliveries(await self._collect([tok], futs), [name])[0]
        try:
            mail = (
                await self._exchange(
                    [tok],
                    cpb.ConduitFrame(ack=cpb.Ack(tokens=[tok])),
                    what=f"confirming the take of {name!r}",
                )
            )[0]
            if mail.kind != "acked":
                raise (
                    error_from_frame(mail.message)
                    if mail.kind == "error"
                    else Aborted(f"take of {name!r} not confirmed", name=name)
                )
        except BaseException:
            OwnedFd(fd).close()
            raise
        return OwnedFd(fd) if raw else wrap_fd(fd, item.info)

    # -- delete / stat / list ------------------------------------------------------------------------------------

    async def delete(self, name: str, *, if_revision: int = 0) -> int:
        """Remove ``name``; the broker closes its copy. Returns the delete's revision."""
        resp = await self._rpc(
            "Delete", pb.DeleteRequest(name=name, if_revision=if_revision), session=True, name=name
        )
        self._prefetched.drop(name)
        return int(resp.header.revision)

    async def stat(self, name: str) -> Entry:
        """Describe ``name``."""
        return Entry.from_pb(
            (await self._rpc("Stat", pb.StatRequest(name=name), session=False, name=name)).entry
        )

    async def list(self, prefix: str = "", *, selector: str = "", page_size: int = 0) -> Listing:
        """Every entry under ``prefix`` (matching the label ``selector``), following pages. ``.revision`` is the
        revision of the first page (watch from ``revision + 1`` to miss nothing)."""
        out = Listing()
        token = ""
        first = True
        while True:
            resp = await self._rpc(
                "List",
                pb.ListRequest(prefix=prefix, label_selector=selector, page_size=page_size, page_token=token),
                session=False,
            )
            if first:
                out.revision = resp.header.revision
                first = False
            out.extend(Entry.from_pb(e) for e in resp.entries)
            token = resp.next_page_token
            if not token:
                return out

    # -- leases --------------------------------------------------------------------------------------------------

    def lease(
        self,
        name: str,
        ttl: float,
        *,
        shared: bool = False,
        wait: float | None = None,
        keepalive: bool = True,
    ) -> PendingLease:
        """Lease ``name`` (exclusive unless ``shared``); ``wait``: seconds to queue for it (None: fail at once with
        ``FailedPrecondition`` if it is held).

        Use ``async with c.lease(...) as h:`` (released on exit) or ``h = await c.lease(...)`` then
        ``await h.release()``. The :class:`LeaseHandle` holds the descriptor, the lease id and the fencing epoch;
        with ``keepalive`` a task renews the lease every ttl/3 until it is released.
        """
        return PendingLease(self._lease(name, ttl, shared=shared, wait=wait, keepalive=keepalive))

    async def _lease(
        self, name: str, ttl: float, *, shared: bool, wait: float | None, keepalive: bool
    ) -> LeaseHandle:
        req = lease_request(name, ttl, shared, wait is not None)
        with self._claiming():
            # As the sync client: the RPC deadline bounds the queueing (the broker answers DEADLINE_EXCEEDED
            # itself LEASE_WAIT_MARGIN before it), so ``wait`` + LEASE_WAIT_MARGIN queues for ``wait`` seconds.
            timeout = self.timeout if wait is None else max(0.0, wait) + LEASE_WAIT_MARGIN
            resp = await self._rpc("Lease", req, session=True, name=name, timeout=timeout)
            futs = self._expect([resp.handoff.token])
        try:
            fd, item = deliveries(await self._collect([resp.handoff.token], futs), [name])[0]
        except BaseException:
            with contextlib.suppress(BrokerError):
                await self.release(resp.lease_id)  # granted, but we never got it: pass it on
            raise
        lease = Lease(
            lease_id=resp.lease_id,
            name=name,
            epoch=resp.epoch,
            ttl=ttl,
            expire_time=resp.expire_time.ToNanoseconds() / 1e9,
            entry=Entry.from_pb(resp.entry),
        )
        return LeaseHandle(self, lease, wrap_fd(fd, item.info), keepalive=keepalive)

    async def keepalive(self, lease_ids: Sequence[str]) -> pb.KeepAliveResponse:
        """Renew leases once; returns which were renewed and which are gone."""
        md = await self._md(True)
        call = self.stub.KeepAlive(metadata=md, timeout=self.timeout)
        error: BrokerError | None = None
        resp: Any = None
        try:
            await call.write(pb.KeepAliveRequest(lease_ids=lease_ids))
            await call.done_writing()
            resp = await call.read()
        except grpc.RpcError as err:
            error = error_from_rpc(err, self.paths)
        finally:
            call.cancel()
        del call
        if error is not None:
            raise error  # outside the except block: see _rpc
        if resp is grpc.aio.EOF:
            raise Aborted("keep-alive stream ended without an answer")
        return resp  # type: ignore[no-any-return]

    async def release(self, lease_id: str, *, return_fd: FdLike | None = None) -> int:
        """End a lease; with ``return_fd`` hand a descriptor back as the entry's new descriptor (check-in; the
        caller keeps its copy). Returns the revision of the release (or of the check-in)."""
        resp = await self._rpc(
            "Release",
            pb.ReleaseRequest(lease_id=lease_id, return_descriptor=return_fd is not None),
            session=True,
        )
        if return_fd is None:
            return int(resp.header.revision)
        tok = resp.handoff.token
        mail = (
            await self._exchange(
                [tok],
                cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok])),
                [fileno_of(return_fd)],
                what=f"checking in lease {lease_id[:6]}…",
            )
        )[0]
        if mail.kind != "deposited" or mail.message.HasField("error"):
            raise error_from_frame(mail.message.error if mail.kind == "deposited" else mail.message)
        return int(mail.message.revision)

    # -- watch ---------------------------------------------------------------------------------------------------

    def watch(self, prefix: str = "", *, start_revision: int = 0) -> Watch:
        """Registry events under ``prefix`` from ``start_revision`` (0: from now). ``async for`` over it; close it
        with :meth:`Watch.aclose` (or ``async with``). Call from inside the event loop."""
        md = [(SESSION_METADATA_KEY, self._session_id)] if self._session_id and self._dead is None else []
        call = self.stub.Watch(pb.WatchRequest(prefix=prefix, start_revision=start_revision), metadata=md)
        return Watch(call, self.paths)


class PendingLease:
    """What :meth:`Client.lease` returns: await it for a :class:`LeaseHandle`, or use it with ``async with``
    (the handle is released on exit)."""

    def __init__(self, acquire: Any) -> None:
        self._acquire = acquire
        self._handle: LeaseHandle | None = None

    def __await__(self) -> Generator[Any, None, LeaseHandle]:
        return self._acquire.__await__()  # type: ignore[no-any-return]

    async def __aenter__(self) -> LeaseHandle:
        self._handle = await self._acquire
        return self._handle

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._handle is not None:
            await self._handle.release()


class LeaseHandle:
    """A held lease: ``.fd`` (the descriptor, owned by the handle until :meth:`release`, which closes it),
    ``.epoch`` (the fencing number), ``.lease_id``. ``lost`` is set when the lease is gone: the broker said so
    on a keep-alive, or the session it was granted in ended (conduit broke, client closed). An async context
    manager that releases on exit; the keep-alive task stops with it."""

    def __init__(self, client: Client, lease: Lease, fd: Received, *, keepalive: bool) -> None:
        self.client = client
        self.lease = lease
        self.fd = fd
        self.epoch = lease.epoch
        self.lease_id = lease.lease_id
        self.lost = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if keepalive:
            self._task = asyncio.get_running_loop().create_task(
                self._keepalive(), name=f"fdbroker-keepalive-{lease.name}"
            )
        client._leases.add(self)

    async def _keepalive(self) -> None:
        interval = max(0.05, self.lease.ttl / 3)
        while True:
            await asyncio.sleep(interval)
            if self.lost.is_set():
                return
            try:
                r = await self.client.keepalive([self.lease_id])
            except BrokerError:
                continue  # a blip: the next round may get through before the lease runs out
            if self.lease_id in r.gone:
                self.lost.set()
                return

    async def _stop_keepalive(self) -> None:
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def release(self, *, return_fd: FdLike | None = None) -> None:
        """Release the lease (idempotent) and close the handle's descriptor. With ``return_fd``, check that
        descriptor in as the entry's new one (the caller keeps its copy)."""
        await self._stop_keepalive()
        try:
            if not self.lost.is_set():
                await self.client.release(self.lease_id, return_fd=return_fd)
        except NotFound:
            pass
        finally:
            self.lost.set()
            self.fd.close()
            self.client._leases.discard(self)

    async def __aenter__(self) -> LeaseHandle:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Watch:
    """An async iterator of :class:`Event`. ``header_revision`` (the revision the watch starts after) is known
    after :meth:`started` or the first event. Stops (``StopAsyncIteration``) once closed."""

    def __init__(self, call: Any, paths: Paths) -> None:
        self._call = call
        self._paths = paths
        self._buf: collections.deque[Event] = collections.deque()
        self._closed = False
        self.header_revision: int | None = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def _read_one(self) -> bool:
        """Read one response into the buffer; False at the end of the stream."""
        if self._closed:
            return False
        error: BrokerError | None = None
        try:
            resp = await self._call.read()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return False  # the call was cancelled (aclose, or the client's channel closed), not this task
        except grpc.RpcError as err:
            self._closed = True
            if err.code() == grpc.StatusCode.CANCELLED:
                return False
            error = error_from_rpc(err, self._paths)
        if error is not None:
            raise error  # outside the except block: see Client._rpc
        if resp is grpc.aio.EOF:
            return False
        if self.header_revision is None:
            self.header_revision = resp.header_revision
        self._buf.extend(Event.from_pb(e) for e in resp.events)
        return True

    async def started(self) -> int:
        """Wait until the broker has set the watch up; return ``header_revision``. Events after it will come."""
        while self.header_revision is None:
            if not await self._read_one():
                raise Aborted("the watch ended before it started")
        return self.header_revision

    async def __anext__(self) -> Event:
        while not self._buf:
            if not await self._read_one():
                raise StopAsyncIteration
        return self._buf.popleft()

    async def aclose(self) -> None:
        """Cancel the stream (idempotent)."""
        self._closed = True
        self._call.cancel()

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
