"""What a flow may ask a driver to do, and how a driver runs a flow.

A *flow* (:mod:`fdbroker.client.flows`) is a generator that writes one verb's protocol without doing any I/O, in
the manner of httpx's auth flows: it yields *steps* — call an RPC, send a frame, await the answers to some
tokens — and receives each step's result as the value of its ``yield`` (or, if the step failed, the exception
raised there), and it returns the verb's result. A *driver* (:class:`fdbroker.Client`,
:class:`fdbroker.aio.Client`) does the steps with its own I/O (:func:`drive`, :func:`drive_async`)::

    run = Run(flow)
    while (step := run.next_step()) is not None:
        try:
            run.ok(getattr(driver, step.handler)(step, run))    # the asyncio driver awaits this
        except BaseException as err:
            run.failed(err)
    return run.value

Each step names its driver method in ``handler``, except :class:`Within`, which :class:`Run` takes itself: from
then on every step of the run is bounded by that deadline (a driver asks :meth:`Run.limit` for each timeout).
Errors reach the flow as :class:`~fdbroker.errors.BrokerError`
(a gRPC status mapped by :func:`fdbroker.client.session.error_from_rpc`; a broken conduit as ``Aborted``; a wait
that ran out as ``DeadlineExceeded``), except for :class:`Dial` and :class:`ReadFrame`, whose ``ConduitError``
reaches the flow as it is. Cancellation (``KeyboardInterrupt``, ``asyncio.CancelledError``) is raised into the
flow too, so a flow's ``finally`` and ``except BaseException`` close what it holds on every way out.

Descriptors: whoever holds an :class:`~fdbroker.client.session.Answer` owns its descriptors; a driver closes
every answer a run expected and never took when the run ends.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Final, Generic, TypeVar

from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.v1 import conduit_pb2 as cpb

if TYPE_CHECKING:
    from fdbroker.client.session import Answer, Mailbox, Wait

T = TypeVar("T")

IF_OPEN: Final = None
"""``CallRpc(session=IF_OPEN)``: carry the session id if a session is open, else call anonymously."""


def chosen_session(session: bool | str | None, live: str | None) -> str | None:
    """The session id a step's ``session`` asks for, ``live`` being the open session's id (or None). ``True``
    is the driver's to resolve first: it may have to open the session."""
    if isinstance(session, str):
        return session
    return live if session is IF_OPEN else None


@dataclass(frozen=True, slots=True)
class CallRpc:
    """Call the unary RPC ``method`` of ``fdbroker.v1.FdBroker`` with ``request``. Result: the response.

    ``session``: True — as this client's session, opened first if needed; :data:`IF_OPEN` — as the session if
    one is open, else anonymously; False — anonymously; a string — with that session id, as given (for tests of
    foreign or made-up ids). ``name``: the entry the call is about, for error messages. ``timeout``: seconds (None:
    the client's). The tokens the response issues (``handoff``/``handoffs``) are expected by the run from the
    moment it returns, so a ``Deliver`` the broker pushed before it is kept for the run's :class:`AwaitAnswers`.
    ``ready``: wait (within the timeout) for the control channel to connect instead of failing at once with
    ``Unavailable`` while it cannot (gRPC's ``wait_for_ready``) — for a call tried again after the broker went
    away, while its successor comes up.
    """

    method: str
    request: Any
    session: bool | str | None = True
    name: str = ""
    timeout: float | None = None
    ready: bool = False
    handler: ClassVar[str] = "_call_rpc"


@dataclass(frozen=True, slots=True)
class CallStream:
    """Open the bidirectional-streaming RPC ``method``, write ``requests``, close the writing side, read one
    response, then cancel the call. Result: that response, or None if the stream ended without one."""

    method: str
    requests: Sequence[Any]
    session: bool | str | None = True
    handler: ClassVar[str] = "_call_stream"


@dataclass(frozen=True, slots=True)
class OpenStream:
    """Open the server-streaming RPC ``method`` with ``request`` and read its first response (within the
    client's timeout). Result: ``(call, first)`` — the driver's call object, to read on from, and the first
    response (None if the stream ended without one). A stream refused before its first response raises.
    ``ready`` as for :class:`CallRpc`."""

    method: str
    request: Any
    session: bool | str | None = IF_OPEN
    ready: bool = False
    handler: ClassVar[str] = "_open_stream"


@dataclass(frozen=True, slots=True)
class SendFrame:
    """Send one conduit frame on this session's conduit, with ``fds`` attached (not closed: the caller keeps
    them). ``expect``: the tokens this frame will be answered under, expected by the run before the frame goes
    out. ``what``: what the frame does, for the ``Aborted`` raised (and the session ended) if the conduit
    breaks. ``session``: send only as that session (the one whose tokens the frame carries): ``Aborted`` if it
    has ended, even if another one is open now. Result: None."""

    frame: cpb.ConduitFrame
    fds: Sequence[int] = ()
    expect: Sequence[bytes] = ()
    what: str = "sending a frame"
    name: str = ""
    session: str | None = None
    handler: ClassVar[str] = "_send_frame"


@dataclass(frozen=True, slots=True)
class AwaitAnswers:
    """Wait until every one of ``tokens`` has its answer on the conduit (``timeout``: seconds, None: the
    client's). Result: the :class:`~fdbroker.client.session.Answer` of each, in order; the flow owns their
    descriptors. ``DeadlineExceeded`` if they do not all come in time, the session's end if it ends first;
    either way whatever arrived for them is closed. ``session``: the session the tokens belong to (answers come
    only on its conduit): its end if it has ended already, even if another one is open now."""

    tokens: Sequence[bytes]
    timeout: float | None = None
    session: str | None = None
    handler: ClassVar[str] = "_await_answers"


@dataclass(frozen=True, slots=True)
class Redeem:
    """Redeem the prefetched GET ``token`` on the conduit and wait for its answer: a ``Deliver`` of ``count``
    descriptors (1, or a batch token's batch) or an ``Error`` naming it. Result: that
    :class:`~fdbroker.client.session.Answer` (the flow owns its descriptors); failures as :class:`SendFrame` and
    :class:`AwaitAnswers`.

    The same as ``SendFrame(Redeem)`` + ``AwaitAnswers``, which a driver may do instead; the blocking driver does
    it in one exchange (:meth:`FramedConduit.exchange <fdbroker.conduit.frames.FramedConduit.exchange>`: spliced
    bytes, one receive, no protobuf parse of the expected ``Deliver``) when no other caller reads the conduit.
    ``session``: the session the token belongs to, as for :class:`SendFrame`. ``refill``: ask for that many more
    tokens of the entry on the way (``Redeem.refill``; the answer's item carries them, and a driver sends such a
    ``Redeem`` the usual way, not in the one exchange)."""

    token: bytes
    count: int = 1
    session: str | None = None
    refill: int = 0
    handler: ClassVar[str] = "_redeem"

    def frame(self) -> cpb.ConduitFrame:
        return cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[self.token], refill=self.refill))


@dataclass(frozen=True, slots=True)
class AwaitFetch:
    """Wait until ``signal`` (a :class:`~fdbroker.client.prefetch.Signal` of a request for prefetched tokens in
    flight, made by another caller) is set. Result: None."""

    signal: Any
    handler: ClassVar[str] = "_await_fetch"


@dataclass(frozen=True, slots=True)
class Pause:
    """Sleep ``seconds``, or less if ``until`` (a :class:`~fdbroker.client.prefetch.Signal`, or None) is set
    first. Result: True if ``until`` is set."""

    seconds: float
    until: Any = None
    handler: ClassVar[str] = "_pause"


@dataclass(frozen=True, slots=True)
class OpenSession:
    """Open this client's session if none is open (connecting the conduit). Result: the session id."""

    handler: ClassVar[str] = "_open_session"


@dataclass(frozen=True, slots=True)
class EndSession:
    """The broker no longer knows session ``session_id`` (it went away; a successor answered ``UNAUTHENTICATED``):
    end it if it is still this client's — close its conduit, fail the calls waiting on it, mark its leases lost —
    so that the next :class:`OpenSession` opens a new one. Nothing if it has ended already. Result: None."""

    session_id: str
    handler: ClassVar[str] = "_end_stale"


@dataclass(frozen=True, slots=True)
class Within:
    """Every later step of this run must be done by ``deadline`` (``time.monotonic()``): a driver bounds each
    step's timeout by what is left (:meth:`Run.limit`). Taken by :class:`Run` itself, never by a driver; a run
    keeps the earliest deadline it was given. Result: None."""

    deadline: float
    handler: ClassVar[str] = ""  # no driver method: Run.next_step takes it


@dataclass(frozen=True, slots=True)
class Dial:
    """Connect a new conduit to the broker's ``conduit.sock`` (through the checked run directory). Result: the
    driver's framed conduit, which the flow then owns. Raises ``ConduitError`` as it is."""

    handler: ClassVar[str] = "_dial"


@dataclass(frozen=True, slots=True)
class ReadFrame:
    """Read the next frame from ``conduit`` (a conduit :class:`Dial` returned; within the client's timeout).
    Result: the :class:`~fdbroker.conduit.frames.Frame`, whose descriptors the flow owns. Raises
    ``ConduitError`` as it is."""

    conduit: Any
    handler: ClassVar[str] = "_read_frame"


Step = (
    CallRpc
    | CallStream
    | OpenStream
    | SendFrame
    | AwaitAnswers
    | Redeem
    | AwaitFetch
    | Pause
    | OpenSession
    | EndSession
    | Within
    | Dial
    | ReadFrame
)

Flow = Generator[Step, Any, T]
"""A verb's protocol: yields steps, receives their results, returns the verb's result."""


class Run(Generic[T]):
    """One flow being driven: the driver asks :meth:`next_step`, does it, and reports the outcome with :meth:`ok`
    or :meth:`failed`; once :meth:`next_step` returns None the flow's result is :attr:`value`.

    ``expected`` are the tokens whose answers this run may still claim. A run makes its own set, and the driver
    forgets what is left in it (closing any answer nobody took) when the run ends; a caller that wants answers
    to outlive one run (:class:`fdbroker.client.raw.Raw`) passes a set of its own, which is then left alone.

    ``deadline`` (``time.monotonic()``; None: none) bounds every step (:meth:`limit`); a :class:`Within` step
    brings it forward.
    """

    def __init__(
        self, flow: Flow[T], expected: set[bytes] | None = None, deadline: float | None = None
    ) -> None:
        self._flow = flow
        self._result: Any = None
        self._error: BaseException | None = None
        self.owns_expected = expected is None
        self.expected: set[bytes] = set() if expected is None else expected
        self.deadline = deadline
        self.value: T

    def next_step(self) -> Step | None:
        """The flow's next step, after handing it the last outcome; None when it has returned."""
        try:
            if self._error is not None:
                error, self._error = self._error, None
                try:
                    step = self._flow.throw(error)
                finally:
                    # The error's traceback holds this frame: no cycle through it (a gRPC call in that
                    # traceback holds its channel's connection open until the cycle is collected).
                    del error
            else:
                result, self._result = self._result, None
                step = self._flow.send(result)
            while isinstance(step, Within):
                if self.deadline is None or step.deadline < self.deadline:
                    self.deadline = step.deadline
                step = self._flow.send(None)
            return step
        except StopIteration as stop:
            self.value = stop.value
            return None

    def limit(self, seconds: float) -> float:
        """``seconds``, or what is left before the run's deadline if that is less (never below 1 ms, so that a
        step that is out of time fails with its own timeout)."""
        if self.deadline is None:
            return seconds
        return max(0.001, min(seconds, self.deadline - time.monotonic()))

    def ok(self, result: Any) -> None:
        """The last step succeeded with ``result``."""
        self._result = result

    def failed(self, error: BaseException) -> None:
        """The last step raised ``error``; the flow gets it raised at its ``yield``."""
        self._error = error

    def expect(self, box: Mailbox, tokens: Iterable[bytes]) -> None:
        """This run expects the answers to ``tokens`` (kept in ``box`` for it until taken or the run ends)."""
        tokens = list(tokens)
        self.expected.update(tokens)
        box.expect(tokens)

    def claim(self, box: Mailbox, w: Wait) -> list[Answer]:
        """Take the answers of the ready wait ``w`` from ``box``: the run owns them (and their descriptors)."""
        self.expected.difference_update(w.tokens)
        return box.take(w)

    def give_up(self, box: Mailbox, tokens: Sequence[bytes]) -> None:
        """Stop waiting for ``tokens`` (a timeout, the session's end, cancellation): what came for them is
        closed, and so is what comes later."""
        self.expected.difference_update(tokens)
        box.forget(tokens)

    def finish(self) -> set[bytes]:
        """End the run (closing the flow if it did not return); the tokens the driver must now forget."""
        self._flow.close()
        if not self.owns_expected:
            return set()
        left, self.expected = self.expected, set()
        return left


def drive(run: Run[T], do: Callable[[Step, Run[T]], Any]) -> T:
    """Run a flow to its end with the blocking step handler ``do``; its result."""
    while (step := run.next_step()) is not None:
        try:
            run.ok(do(step, run))
        except BaseException as err:  # the flow decides what it can handle; it re-raises the rest
            run.failed(err)
    return run.value


async def drive_async(run: Run[T], do: Callable[[Step, Run[T]], Awaitable[Any]]) -> T:
    """:func:`drive` for an asyncio driver, whose step handler ``do`` is awaited."""
    while (step := run.next_step()) is not None:
        try:
            run.ok(await do(step, run))
        except BaseException as err:
            run.failed(err)
    return run.value


def silent_for(timeout: float | None) -> ConduitError:
    """What a driver raises when a :class:`ReadFrame` got nothing within its timeout (the flow words it)."""
    return ConduitError(ErrType.TIMEOUT, "within the timeout" if timeout is None else f"within {timeout:g}s")
