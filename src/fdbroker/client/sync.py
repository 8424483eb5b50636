"""``fdbroker.Client``: the blocking client, a driver of the flows in :mod:`fdbroker.client.flows`.

One gRPC channel to ``control.sock`` and, once a call needs a session, one conduit connection to
``conduit.sock``. Thread-safe: calls from several threads share the session; whichever thread is waiting reads
the conduit and files each frame in the session's :class:`~fdbroker.client.session.Mailbox` for the thread that
asked for it (there is no reader thread).

Descriptor ownership, for every call:

* ``put``/``put_many``/``release(return_fd=...)`` never take the caller's descriptor: the broker stores its own
  duplicate; the caller may close its copy once the call returns.
* ``get``/``get_many``/``take``/``lease`` return new descriptors the caller owns, wrapped so they close
  themselves (a ``socket.socket``, a file object, or an :class:`OwnedFd`). ``get_fd`` returns an ``OwnedFd``
  whatever the kind. A lease's descriptor is owned by its :class:`LeaseHandle` until the lease is released.
* A delivery nobody takes any more (its caller timed out, or its flow failed) is closed by the client.
"""

from __future__ import annotations

import threading
import time
from typing import Any, ParamSpec, TypeVar

import grpc

from fdbroker.client import flows, hot, session, steps
from fdbroker.client.flows import EventStream, Granted, HeldLease
from fdbroker.client.models import Entry, Event, FdLike, Info, Lease, Listing, OwnedFd
from fdbroker.client.raw import Raw
from fdbroker.client.reconnect import CHANNEL_OPTIONS
from fdbroker.client.verbs import BlockingVerbs
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import Frame, FramedConduit
from fdbroker.errors import Aborted, BrokerError, DeadlineExceeded
from fdbroker.v1 import broker_pb2_grpc as pb_grpc

__all__ = ["Client", "Entry", "Event", "Info", "Lease", "LeaseHandle", "Listing", "OwnedFd", "Watch"]

P = ParamSpec("P")
T = TypeVar("T")


class Client(BlockingVerbs):
    """A blocking fdbroker client. Use as a context manager, or call :meth:`close`.

    ``run_dir``: the broker's run directory (default: ``FDBROKER_RUN_DIR``, else the per-user default).
    ``timeout``: seconds for each call, tries again included. ``reconnect`` (default True): ride through a
    takeover or a restart of the broker (docs/client.md, "Reconnecting"): a call the broker went away under is
    tried again on a new session where that is safe, else it raises :class:`~fdbroker.errors.OutcomeUnknown`.
    ``prefetch``: GET tokens to ask for on each ``get`` RPC so repeated gets of a name cost one conduit round trip
    instead of an RPC (None: adaptive, 0 after the first get of a name, up to 256 while a name keeps being
    fetched); concurrent gets of one name share a request in flight.
    ``trust_uids``: uids (or user names) besides root and this process's own uid that may serve the run
    directory (default: ``$FDBROKER_TRUST_UID``, comma-separated). Before it sends anything, the client checks
    the run directory's owners, the conduit's ``SO_PEERCRED`` and ``control.sock``'s owner against them, and
    raises :class:`~fdbroker.errors.UntrustedBroker` otherwise (see :class:`fdbroker.client.trust.Trust`).

    The verbs are the flows of :mod:`fdbroker.client.flows`, driven here; :attr:`raw` is the low-level seam.
    """

    _new_signal = threading.Event
    _public_name = "fdbroker.Client"

    def _init_io(self) -> None:
        self._lock = threading.RLock()  # guards _box, _conduit, _reading, _waiting (hot.py takes it bare)
        self._cond = threading.Condition(self._lock)
        self._reading, self._waiting = False, 0  # _waiting: callers in _cond.wait (hot.wait)
        self._conduit: FramedConduit | None = None
        self._connect_lock = threading.Lock()
        self._setup_lock = threading.Lock()  # guards the channel and the run directory's descriptor
        self._channel: grpc.Channel | None = None
        self._raw: Raw[Any] = Raw(self._drive, self._pending)

    # -- the verbs: those of verbs.Verbs, and watch ---------------------------------------------------------------

    def watch(self, prefix: str = "", *, start_revision: int = 0) -> Watch:
        """Registry events under ``prefix`` from ``start_revision`` (0: from now): an iterator of :class:`Event`,
        returned once the stream is open, so a change made after this returns is seen. Close it when done. A
        refusal (``OutOfRange`` naming the oldest revision, a quota) is raised by the first ``next``."""
        w = Watch(self, prefix)
        w._opened(self._drive(flows.watch(self._state, prefix, start_revision=start_revision)))
        return w

    def _lease_handle(self, granted: Granted) -> LeaseHandle:
        return LeaseHandle(self, granted)

    # -- state -----------------------------------------------------------------------------------------------

    @property
    def raw(self) -> Raw[Any]:
        """The low-level seam (:class:`fdbroker.client.raw.Raw`): RPCs as this client's session, frames, tokens."""
        return self._raw

    @property
    def stub(self) -> Any:
        """The ``fdbroker.v1.FdBroker`` stub on this client's channel, created on first use once the run
        directory and the owner of ``control.sock`` passed the trust checks."""
        stub = self._stub
        if stub is None:
            with self._setup_lock:
                if self._stub is None:
                    self._channel = grpc.insecure_channel(self._control_target(), options=CHANNEL_OPTIONS)
                    self._stub = pb_grpc.FdBrokerStub(self._channel)
                stub = self._stub
        return stub

    def _pending(self) -> dict[str, int]:
        with self._cond:
            return self._box.pending()

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the conduit (which ends the session and releases its leases on the broker) and the channel.

        Calls still waiting fail with ``Aborted``; undelivered descriptors are closed; lease handles stop their
        keep-alive and count as lost (each still owns, and closes on release, its descriptor). Idempotent."""
        self._state.closed = True
        for h in list(self._state.leases):
            if isinstance(h, LeaseHandle):
                h._stop.set()
        self._end_session(Aborted("the client was closed; nothing more is handed over"))
        self._state.session = None
        with self._setup_lock:
            if self._channel is not None:
                self._channel.close()
                self._channel = self._stub = None
            self._close_dir()

    def connect(self, _deadline: float | None = None) -> str:
        """Open the conduit (once; again after it broke) and return the session id. Calls that need a session
        do it implicitly. ``Unavailable`` if no broker answers at the run directory."""
        sid = self._live()
        if sid is not None:
            return sid
        with self._connect_lock:
            sid = self._live()
            if sid is not None:
                return sid
            if self._conduit is not None:
                self._end_session(self._box.dead or Aborted("the session was replaced"))
            conduit, welcome = self._drive(flows.handshake(self.paths, self.trust), deadline=_deadline)
            with self._cond:
                self._conduit = conduit
                self._box.reset()
                self._state.session_began(welcome)
            return welcome.session_id

    def _end_session(self, why: BrokerError, *, lost: bool = False, only: str | None = None) -> None:
        """Close the conduit; every waiting call fails with ``why``; undelivered descriptors are closed. ``lost``:
        the broker went away. ``only``: nothing unless that is the session open now."""
        with self._cond:
            if only is not None and self._live() != only:
                return
            conduit, self._conduit = self._conduit, None
            self._session_over(why, lost)
        if conduit is not None:
            conduit.close()

    def _session_over(self, why: BrokerError, lost: bool = False) -> None:
        """Call with ``_cond`` held."""
        if self._box.dead is None:
            self._box.fail(why)
        self._state.session_ended(lost)
        self._cond.notify_all()

    # -- driving flows -------------------------------------------------------------------------------------------

    def _drive(
        self, flow: steps.Flow[T], expected: set[bytes] | None = None, deadline: float | None = None
    ) -> T:
        """Run ``flow`` to its end (see :mod:`fdbroker.client.steps`) and return its result."""
        run = steps.Run(flow, expected, deadline)
        try:
            return steps.drive(run, lambda step, run: getattr(self, step.handler)(step, run))
        finally:
            left = run.finish()
            if left:
                with self._cond:
                    self._box.forget(left)

    def _metadata(self, who: bool | str | None, run: steps.Run[Any]) -> list[tuple[str, str]]:
        return session.session_metadata(
            self.connect(run.deadline) if who is True else steps.chosen_session(who, self._live())
        )

    def _call_rpc(self, step: steps.CallRpc, run: steps.Run[Any]) -> Any:
        md = self._metadata(step.session, run)
        timeout = step.timeout or run.limit(self.timeout)
        with self._cond:
            n = self._box.rpc_started()
        resp = None
        try:
            resp = getattr(self.stub, step.method)(
                step.request, metadata=md, timeout=timeout, wait_for_ready=step.ready or None
            )
            self._state.saw(resp)
        except grpc.RpcError as err:
            raise session.error_from_rpc(err, self.paths, step.name) from None
        finally:
            with self._cond:
                if resp is not None and md:
                    run.expect(self._box, session.issued_tokens(resp))
                self._box.rpc_ended(n)
        return resp

    def _call_stream(self, step: steps.CallStream, run: steps.Run[Any]) -> Any:
        md = self._metadata(step.session, run)
        call = getattr(self.stub, step.method)(
            iter(step.requests), metadata=md, timeout=run.limit(self.timeout)
        )
        try:
            return next(call, None)
        except grpc.RpcError as err:
            raise session.error_from_rpc(err, self.paths) from None
        finally:
            call.cancel()

    def _open_stream(self, step: steps.OpenStream, run: steps.Run[Any]) -> Any:
        md = self._metadata(step.session, run)
        call = getattr(self.stub, step.method)(step.request, metadata=md, wait_for_ready=step.ready or None)
        limit = run.limit(self.timeout)
        lock = threading.Lock()
        opened = expired = False

        def expire() -> None:
            nonlocal expired
            with lock:
                if not opened:
                    expired = True
                    call.cancel()

        timer = threading.Timer(limit, expire)
        timer.start()
        try:
            first = next(call, None)
        except grpc.RpcError as err:
            if expired:
                raise DeadlineExceeded(
                    f"the broker did not open the {step.method} stream within {self.timeout:g}s"
                ) from None
            raise session.error_from_rpc(err, self.paths) from None
        finally:
            timer.cancel()
            with lock:
                opened = True
        return call, first

    def _send_frame(self, step: steps.SendFrame, run: steps.Run[Any]) -> None:
        with self._cond:
            if self._box.dead is not None:
                raise self._box.dead
            self._bound(step.session, step.what, step.name)
            conduit = self._conduit
            run.expect(self._box, step.expect)
        if conduit is None:
            raise Aborted(f"no conduit while {step.what}; retry (a new session is opened)", name=step.name)
        try:
            conduit.send(step.frame, step.fds, timeout=run.limit(self.timeout))
        except ConduitError as err:
            dead = session.conduit_broke(step.what, err, step.name)
            with self._cond:
                if self._conduit is conduit:
                    self._session_over(dead, lost=True)
            raise dead from None

    def _await_answers(self, step: steps.AwaitAnswers, run: steps.Run[Any]) -> list[Any]:
        wanted = step.timeout or self.timeout
        deadline = time.monotonic() + run.limit(wanted)
        with self._cond:
            w = self._box.wait(step.tokens)
            try:
                self._bound(step.session, "awaiting an answer")
                while not self._box.ready(w):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise DeadlineExceeded(f"no answer on the conduit within {wanted:g}s")
                    if self._reading:
                        hot.wait(self, remaining)
                    else:
                        self._read_one(remaining)
            except BaseException:
                run.give_up(self._box, step.tokens)
                raise
            return run.claim(self._box, w)

    _redeem, _get_hot, _get_fd_hot, _resume = hot.redeem, hot.get, hot.get_fd, hot.resume  # client/hot.py

    def _read_one(self, timeout: float) -> None:
        """Read one frame and file it, releasing ``_cond`` while reading (other callers wait, then re-check)."""
        self._reading = True
        conduit = self._conduit
        frame: Frame | None = None
        broken: BrokerError | None = None
        self._cond.release()
        try:
            if conduit is None:
                raise ConduitError(ErrType.PEER_CLOSED, "conduit closed")
            frame = conduit.recv(timeout=timeout)
        except ConduitError as err:
            if err.type != ErrType.TIMEOUT and err.type not in session.NON_FATAL:
                broken = session.conduit_lost(self.paths, err)
        finally:
            self._cond.acquire()
            self._reading = False
            self._cond.notify_all()
        if frame is not None:
            self._box.file(frame)
            if self._box.dead is not None and self._conduit is conduit:
                self._session_over(self._box.dead)  # a frame nobody could be answered by ended it
        if broken is not None and self._conduit is conduit:
            self._session_over(broken, lost=True)

    def _await_fetch(self, step: steps.AwaitFetch, run: steps.Run[Any]) -> None:
        step.signal.wait(run.limit(self.timeout))

    def _pause(self, step: steps.Pause, run: steps.Run[Any]) -> bool:
        return bool((step.until or threading.Event()).wait(step.seconds))

    def _open_session(self, step: steps.OpenSession, run: steps.Run[Any]) -> str:
        return self.connect(run.deadline)

    def _end_stale(self, step: steps.EndSession, run: steps.Run[Any]) -> None:
        self._end_session(session.session_unknown(self.paths), lost=True, only=step.session_id)

    def _dial(self, step: steps.Dial, run: steps.Run[Any]) -> FramedConduit:
        with self._setup_lock:
            address = self._conduit_address()
        return FramedConduit.connect(address, timeout=run.limit(self.timeout))

    def _read_frame(self, step: steps.ReadFrame, run: steps.Run[Any]) -> Frame:
        try:
            return step.conduit.recv(timeout=run.limit(self.timeout))  # type: ignore[no-any-return]
        except ConduitError as err:
            if err.type is ErrType.TIMEOUT:
                raise steps.silent_for(self.timeout) from None
            raise


class LeaseHandle(HeldLease):
    """A held lease (see :class:`fdbroker.client.flows.HeldLease`): ``.fd``, ``.epoch``, ``.lease_id``, ``.lost``
    (a ``threading.Event``). Releases on ``with`` exit; the keep-alive thread stops with it."""

    client: Client

    def __init__(self, client: Client, granted: Granted) -> None:
        super().__init__(client, client._state, granted, threading.Event())
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if granted.keepalive:
            keep = flows.keep_lease(client._state, self, self._stop)
            name = f"fdbroker-keepalive-{self.lease.name}"
            self._thread = threading.Thread(target=client._drive, args=(keep,), name=name, daemon=True)
            self._thread.start()

    def release(self, *, return_fd: FdLike | None = None) -> None:
        """Release the lease (idempotent) and close the handle's descriptor. With ``return_fd``, check that
        descriptor in as the entry's new one (the caller keeps its copy)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self.client._drive(flows.end_lease(self.client._state, self, return_fd))

    def __enter__(self) -> LeaseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Watch(EventStream):
    """An iterator of :class:`Event`; ``header_revision`` is the revision the watch starts after. Stops once
    closed (:meth:`close`, or the client's :meth:`Client.close`). If the broker goes away, the stream resumes on
    its successor after the last event it delivered (:func:`fdbroker.client.flows.rewatch`)."""

    def __init__(self, client: Client, prefix: str) -> None:
        super().__init__(client.paths, client._state, prefix)
        self._client = client

    def __iter__(self) -> Watch:
        return self

    def __next__(self) -> Event:
        while not self._buf:
            if not self._readable():
                raise StopIteration
            try:
                resp = next(self._call)
            except StopIteration:
                if self._ended_quietly() or not self._resume(None):
                    raise
                continue
            except grpc.RpcError as err:
                error = self._end(err)
                if error is None:
                    raise StopIteration from None
                if not self._resume(error):
                    raise error from None
                continue
            self._accept(resp)
        return self._buf.popleft()

    def _resume(self, error: BrokerError | None) -> bool:
        return self._client._drive(flows.rewatch(self._client._state, self, error))

    def close(self) -> None:
        """Cancel the stream (idempotent)."""
        self._closed = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
