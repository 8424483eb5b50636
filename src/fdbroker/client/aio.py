"""``fdbroker.aio.Client``: the asyncio client, a driver of the flows in :mod:`fdbroker.client.flows`.

The same verbs, results, errors and descriptor ownership as :class:`fdbroker.Client`; only the I/O differs. One
``grpc.aio`` channel to ``control.sock`` and, once a call needs a session, one conduit connection to
``conduit.sock`` (an :class:`~fdbroker.conduit.aio.AsyncFramedConduit`).

Many tasks share one session. A reader task, started by :meth:`Client.connect` and stopped by
:meth:`Client.aclose`, reads the conduit continuously and files each answer in the session's
:class:`~fdbroker.client.session.Mailbox`, waking the task waiting for it. When the conduit breaks, every pending
call fails with :class:`~fdbroker.errors.Aborted` and the next call that needs a session opens a new one — or,
if the broker went away (a takeover, a restart), each call is tried again on a new session where that is safe
(docs/client.md, "Reconnecting").

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
import contextlib
from collections.abc import AsyncIterator, Awaitable, Generator
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import grpc
import grpc.aio

from fdbroker.client import flows, session, steps
from fdbroker.client.flows import EventStream, Granted, HeldLease, Opened
from fdbroker.client.models import Entry, Event, FdLike, Info, Lease, Listing, OwnedFd
from fdbroker.client.raw import Raw
from fdbroker.client.reconnect import CHANNEL_OPTIONS
from fdbroker.client.verbs import AsyncVerbs
from fdbroker.conduit.aio import AsyncFramedConduit
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import Frame
from fdbroker.conduit.lean import redeem_frame
from fdbroker.errors import Aborted, BrokerError, Cancelled, DeadlineExceeded
from fdbroker.v1 import broker_pb2_grpc as pb_grpc

__all__ = [
    "Client",
    "Entry",
    "Event",
    "Info",
    "Lease",
    "LeaseHandle",
    "Listing",
    "OwnedFd",
    "PendingLease",
    "Watch",
]

P = ParamSpec("P")
T = TypeVar("T")


class Client(AsyncVerbs):
    """An asyncio fdbroker client. Use ``async with Client(...) as c:``, or call :meth:`aclose`.

    The arguments are :class:`fdbroker.Client`'s: ``run_dir``, ``timeout`` (seconds for each call, tries again
    included), ``prefetch`` (GET tokens asked for ahead; concurrent gets of one name share a prefetching RPC in
    flight), ``trust_uids`` (who besides root and this process's uid may serve the run directory, checked before
    anything is sent), ``reconnect`` (ride through a takeover or a restart of the broker).

    Create and use it inside one event loop. The verbs are the flows of :mod:`fdbroker.client.flows`, driven
    here; :attr:`raw` is the low-level seam. ``stats`` counts ``get_rpcs``, ``batch_get_rpcs`` and ``redeems``.
    """

    _new_signal = asyncio.Event
    _public_name = "fdbroker.aio.Client"

    def _init_io(self) -> None:
        self._channel: grpc.aio.Channel | None = None
        self._conduit: AsyncFramedConduit | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connect_lock = asyncio.Lock()
        self._raw: Raw[Awaitable[Any]] = Raw(self._drive, self._box.pending)

    # -- the verbs: those of verbs.Verbs, and watch ---------------------------------------------------------------

    def watch(self, prefix: str = "", *, start_revision: int = 0) -> Watch:
        """Registry events under ``prefix`` from ``start_revision`` (0: from now): ``w = await c.watch(...)`` or
        ``async with c.watch(...) as w`` opens the stream (a change made after that is seen), then ``async for``
        over it; close it with :meth:`Watch.aclose`. A refusal (``OutOfRange`` naming the oldest revision, a
        quota) is raised by the first read. Call from inside the event loop."""
        return Watch(self, prefix, flows.watch(self._state, prefix, start_revision=start_revision))

    def _lease_handle(self, granting: Awaitable[Granted]) -> PendingLease:
        return PendingLease(self._hold(granting))

    async def _hold(self, granting: Awaitable[Granted]) -> LeaseHandle:
        return LeaseHandle(self, await granting)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def raw(self) -> Raw[Awaitable[Any]]:
        """The low-level seam (:class:`fdbroker.client.raw.Raw`): RPCs as this client's session, frames, tokens;
        each call returns an awaitable."""
        return self._raw

    @property
    def stub(self) -> Any:
        """The ``fdbroker.v1.FdBroker`` stub on this client's channel (created on first use, in the loop, once
        the run directory and the owner of ``control.sock`` passed the trust checks)."""
        if self._closed:
            raise Cancelled(f"this {self._public_name} is closed; create a new one")
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self._control_target(), options=CHANNEL_OPTIONS)
            self._stub = pb_grpc.FdBrokerStub(self._channel)
        return self._stub

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
        self._closed = self._state.closed = True
        for h in list(self._state.leases):
            if isinstance(h, LeaseHandle):
                await h._stop_keepalive()
        await self._end_session(Aborted("the client was closed; nothing more is handed over"))
        self._state.session = None
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()
        self._close_dir()

    async def connect(self, _deadline: float | None = None) -> str:
        """Open the conduit (once; again after it broke) and return the session id. Calls that need a session
        do it implicitly. ``Unavailable`` if no broker answers at the run directory."""
        sid = self._live()
        if sid is not None:
            return sid
        async with self._connect_lock:
            sid = self._live()
            if sid is not None:
                return sid
            if self._closed:
                raise Cancelled(f"this {self._public_name} is closed; create a new one")
            if self._conduit is not None:
                await self._end_session(self._box.dead or Aborted("the session was replaced"))
            conduit, welcome = await self._drive(flows.handshake(self.paths, self.trust), deadline=_deadline)
            self._conduit = conduit
            self._box.reset()
            self._state.session_began(welcome)
            self._reader = asyncio.get_running_loop().create_task(
                self._read(conduit), name=f"fdbroker-conduit-reader-{welcome.session_id[:6]}"
            )
            return welcome.session_id

    async def _end_session(self, why: BrokerError, *, lost: bool = False) -> None:
        """Stop the reader, close the conduit, fail every waiter with ``why``, close undelivered descriptors.
        ``lost``: the broker went away."""
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        conduit, self._conduit = self._conduit, None
        if conduit is not None:
            conduit.close()
        self._session_over(why, lost)

    def _session_over(self, why: BrokerError, lost: bool = False) -> None:
        if self._box.dead is None:
            self._wake(self._box.fail(why))
        self._state.session_ended(lost)

    @staticmethod
    def _wake(waits: list[session.Wait]) -> None:
        for w in waits:
            if w.signal is not None and not w.signal.done():
                w.signal.set_result(None)

    async def _read(self, conduit: AsyncFramedConduit) -> None:
        """The reader task: file every frame until the conduit ends, then fail whatever still waits."""
        try:
            while self._box.dead is None:
                try:
                    frame = await conduit.recv()
                except ConduitError as err:
                    if err.type in session.NON_FATAL:
                        continue
                    raise
                self._wake(self._box.file(frame))
            self._session_over(self._box.dead)  # a frame nobody could be answered by ended it
        except asyncio.CancelledError:
            raise
        except Exception as err:
            if self._conduit is conduit:
                self._session_over(session.conduit_lost(self.paths, err), lost=True)

    # -- driving flows -------------------------------------------------------------------------------------------

    async def _drive(
        self, flow: steps.Flow[T], expected: set[bytes] | None = None, deadline: float | None = None
    ) -> T:
        """Run ``flow`` to its end (see :mod:`fdbroker.client.steps`) and return its result."""
        run = steps.Run(flow, expected, deadline)
        try:
            return await steps.drive_async(run, lambda step, run: getattr(self, step.handler)(step, run))
        finally:
            self._box.forget(run.finish())

    async def _metadata(self, who: bool | str | None, run: steps.Run[Any]) -> list[tuple[str, str]]:
        sid = await self.connect(run.deadline) if who is True else steps.chosen_session(who, self._live())
        return session.session_metadata(sid)

    # An error is raised outside the ``except`` block that caught the gRPC error, so it has no __context__: the
    # gRPC error's traceback holds the call, which holds the channel, which keeps its connection to the broker
    # open after aclose() for as long as anyone keeps our error (a pytest.raises, a log record).

    async def _call_rpc(self, step: steps.CallRpc, run: steps.Run[Any]) -> Any:
        md = await self._metadata(step.session, run)
        method = getattr(self.stub, step.method)
        timeout = step.timeout or run.limit(self.timeout)
        n = self._box.rpc_started()
        resp: Any = None
        error: BrokerError | None = None
        try:
            resp = await method(step.request, metadata=md, timeout=timeout, wait_for_ready=step.ready or None)
            self._state.saw(resp)
            if md:
                run.expect(self._box, session.issued_tokens(resp))
        except grpc.RpcError as err:
            error = session.error_from_rpc(err, self.paths, step.name)
        finally:
            self._box.rpc_ended(n)
        if error is not None:
            raise error
        return resp

    async def _call_stream(self, step: steps.CallStream, run: steps.Run[Any]) -> Any:
        md = await self._metadata(step.session, run)
        call = getattr(self.stub, step.method)(metadata=md, timeout=run.limit(self.timeout))
        error: BrokerError | None = None
        resp: Any = None
        try:
            for request in step.requests:
                await call.write(request)
            await call.done_writing()
            resp = await call.read()
        except grpc.RpcError as err:
            error = session.error_from_rpc(err, self.paths)
        finally:
            call.cancel()
        del call
        if error is not None:
            raise error
        return None if resp is grpc.aio.EOF else resp

    async def _open_stream(self, step: steps.OpenStream, run: steps.Run[Any]) -> Any:
        md = await self._metadata(step.session, run)
        call = getattr(self.stub, step.method)(step.request, metadata=md, wait_for_ready=step.ready or None)
        limit = run.limit(self.timeout)
        error: BrokerError | None = None
        try:
            async with asyncio.timeout(limit):
                first = await call.read()
        except TimeoutError:
            error = DeadlineExceeded(
                f"the broker did not open the {step.method} stream within {self.timeout:g}s"
            )
        except grpc.RpcError as err:
            error = session.error_from_rpc(err, self.paths)
        except BaseException:
            call.cancel()
            raise
        if error is not None:
            call.cancel()
            raise error
        return call, None if first is grpc.aio.EOF else first

    async def _send_frame(self, step: steps.SendFrame, run: steps.Run[Any]) -> None:
        if self._box.dead is not None:
            raise self._box.dead
        self._bound(step.session, step.what, step.name)
        conduit = self._conduit
        if conduit is None:
            raise Aborted(f"no conduit while {step.what}; retry (a new session is opened)", name=step.name)
        # Expected before sending: the reader may file the answer before we await it.
        run.expect(self._box, step.expect)
        try:
            await conduit.send(step.frame, step.fds, timeout=run.limit(self.timeout))
        except ConduitError as err:
            dead = session.conduit_broke(step.what, err, step.name)
            if self._conduit is conduit:
                self._session_over(dead, lost=True)
            raise dead from None

    async def _await_answers(self, step: steps.AwaitAnswers, run: steps.Run[Any]) -> list[Any]:
        limit = run.limit(step.timeout or self.timeout)
        w = self._box.wait(step.tokens, asyncio.get_running_loop().create_future())
        try:
            self._bound(step.session, "awaiting an answer")
            if not self._box.ready(w):
                try:
                    async with asyncio.timeout(limit):
                        await w.signal
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"no answer on the conduit within {step.timeout or self.timeout:g}s"
                    ) from None
                self._box.ready(w)
        except BaseException:
            run.give_up(self._box, step.tokens)
            raise
        return run.claim(self._box, w)

    async def _redeem(self, step: steps.Redeem, run: steps.Run[Any]) -> Any:
        return await _redeem(self, step, run)

    async def _await_fetch(self, step: steps.AwaitFetch, run: steps.Run[Any]) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(run.limit(self.timeout)):
                await step.signal.wait()

    async def _pause(self, step: steps.Pause, run: steps.Run[Any]) -> bool:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(step.seconds):
                await (asyncio.Event() if step.until is None else step.until).wait()
        return step.until is not None and bool(step.until.is_set())

    async def _open_session(self, step: steps.OpenSession, run: steps.Run[Any]) -> str:
        return await self.connect(run.deadline)

    async def _end_stale(self, step: steps.EndSession, run: steps.Run[Any]) -> None:
        if self._live() == step.session_id:
            await self._end_session(session.session_unknown(self.paths), lost=True)

    async def _dial(self, step: steps.Dial, run: steps.Run[Any]) -> AsyncFramedConduit:
        return await AsyncFramedConduit.open(self._conduit_address(), timeout=run.limit(self.timeout))

    async def _read_frame(self, step: steps.ReadFrame, run: steps.Run[Any]) -> Frame:
        try:
            return await step.conduit.recv(timeout=run.limit(self.timeout))  # type: ignore[no-any-return]
        except ConduitError as err:
            if err.type is ErrType.TIMEOUT:
                raise steps.silent_for(self.timeout) from None
            raise


async def _redeem(c: Client, step: steps.Redeem, run: steps.Run[Any]) -> Any:
    """A ``Redeem`` spliced from bytes and its answer, as the reader task files it."""
    if c._box.dead is not None:
        raise c._box.dead
    c._bound(step.session, "redeeming a prefetched token")
    conduit = c._conduit
    if conduit is None:
        raise Aborted("no conduit while redeeming a prefetched token; retry (a new session is opened)")
    run.expect(c._box, (step.token,))  # before sending: the reader may file the answer first
    try:
        await conduit.send_raw(redeem_frame(step.token, step.refill), timeout=run.limit(c.timeout))
    except ConduitError as err:
        dead = session.conduit_broke("redeeming a prefetched token", err)
        if c._conduit is conduit:
            c._session_over(dead, lost=True)
        raise dead from None
    return (await c._await_answers(steps.AwaitAnswers((step.token,), session=step.session), run))[0]


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


class LeaseHandle(HeldLease):
    """A held lease (see :class:`fdbroker.client.flows.HeldLease`): ``.fd``, ``.epoch``, ``.lease_id``, ``.lost``
    (an ``asyncio.Event``). An async context manager that releases on exit; the keep-alive task stops with it."""

    client: Client

    def __init__(self, client: Client, granted: Granted) -> None:
        super().__init__(client, client._state, granted, asyncio.Event())
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        if granted.keepalive:
            keep = flows.keep_lease(client._state, self, self._stop)
            name = f"fdbroker-keepalive-{self.lease.name}"
            self._task = asyncio.get_running_loop().create_task(client._drive(keep), name=name)

    async def _stop_keepalive(self) -> None:
        self._stop.set()
        task, self._task = self._task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def release(self, *, return_fd: FdLike | None = None) -> None:
        """Release the lease (idempotent) and close the handle's descriptor. With ``return_fd``, check that
        descriptor in as the entry's new one (the caller keeps its copy)."""
        await self._stop_keepalive()
        await self.client._drive(flows.end_lease(self.client._state, self, return_fd))

    async def __aenter__(self) -> LeaseHandle:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()


class Watch(EventStream):
    """An async iterator of :class:`Event`. Await it (or enter ``async with``) to open it; ``header_revision``
    (the revision the watch starts after) is known from then. Stops (``StopAsyncIteration``) once closed. If the
    broker goes away, the stream resumes on its successor after the last event it delivered
    (:func:`fdbroker.client.flows.rewatch`)."""

    def __init__(self, client: Client, prefix: str, opening: steps.Flow[Opened]) -> None:
        super().__init__(client.paths, client._state, prefix)
        self._client = client
        self._opening: steps.Flow[Opened] | None = opening

    def __await__(self) -> Generator[Any, None, Watch]:
        return self._open().__await__()

    async def _open(self) -> Watch:
        opening, self._opening = self._opening, None
        if opening is not None:
            self._opened(await self._client._drive(opening))
        return self

    def __aiter__(self) -> AsyncIterator[Event]:
        return self

    async def _read_one(self) -> bool:
        """Read one response into the buffer; False at the end of the stream."""
        await self._open()
        if not self._readable():
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
            error = self._end(err)
            if error is None:
                return False
        if error is not None:
            if await self._client._drive(flows.rewatch(self._client._state, self, error)):
                return True
            raise error  # outside the except block: see Client._call_rpc
        if resp is grpc.aio.EOF:
            if self._ended_quietly():
                return False
            return await self._client._drive(flows.rewatch(self._client._state, self, None))
        self._accept(resp)
        return True

    async def started(self) -> int:
        """Open the watch if it is not open yet; ``header_revision``. Events after it will come."""
        await self._open()
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
        if self._opening is not None:
            self._opening.close()
            self._opening = None
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> Watch:
        return await self._open()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
