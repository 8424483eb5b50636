"""The low-level seam of both clients, public: issue an RPC as the client's session, send a conduit frame with
descriptors, await the answers to tokens — or drive a flow of your own, written with the steps of
:mod:`fdbroker.client.steps`. For protocol tests, and for people who build their own clients or try a protocol
change before the verbs have it. Every client has one, as ``client.raw``; with :class:`fdbroker.aio.Client` each
call returns an awaitable::

    from fdbroker.v1 import broker_pb2 as pb

    with fdbroker.Client() as c:
        resp = c.raw.call("Get", pb.GetRequest(name="web/https", prefetch=4))
        kind, item, fd = c.raw.await_answers([resp.handoffs[0].token])[0]   # "deliver": fd is yours to close
        spare = list(resp.prefetch_tokens)                                    # each good for one Redeem

    async with fdbroker.aio.Client() as c:
        resp = await c.raw.call("Take", pb.TakeRequest(name="job/1"))
        ...

What is kept for you: the answers to the tokens a :meth:`Raw.call` response issued (its ``handoff``/``handoffs``:
the ``Deliver`` the broker pushes before the RPC returns, or the ``Deposited`` of the deposit you then send) and
to the tokens given as ``expect`` to :meth:`Raw.send`, until :meth:`Raw.await_answers` takes them or the session
ends (the client closes, the conduit breaks), which closes their descriptors. A :meth:`Raw.run` flow keeps only
its own, until it ends. Errors are the verbs': :class:`~fdbroker.errors.BrokerError` subclasses.

The wire is described in ``docs/conduit-protocol.md`` and ``proto/fdbroker/v1/``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from fdbroker.client.steps import AwaitAnswers, CallRpc, Flow, SendFrame, Step
from fdbroker.v1 import conduit_pb2 as cpb

R = TypeVar("R")


def _one(step: Step) -> Flow[Any]:
    return (yield step)


class Raw(Generic[R]):
    """A client's low-level seam; ``R`` is what its calls return: the result itself (:class:`fdbroker.Client`)
    or an awaitable of it (:class:`fdbroker.aio.Client`). Made by the client (``client.raw``)."""

    def __init__(
        self, drive: Callable[[Flow[Any], set[bytes] | None], R], pending: Callable[[], dict[str, int]]
    ) -> None:
        self._drive = drive
        self._pending = pending
        self._expected: set[bytes] = set()

    def call(
        self,
        method: str,
        request: Any,
        *,
        session: bool | str | None = True,
        name: str = "",
        timeout: float | None = None,
    ) -> R:
        """Call the unary RPC ``method`` of ``fdbroker.v1.FdBroker`` (``"Get"``, ``"Put"``, …) with ``request``;
        the response. ``session``: True — as the client's session, opened first if needed; None — as the
        session if one is open, else anonymously; False — anonymously; a string — with that session id, as
        given (to see what the broker does with a foreign or made-up one). ``name``: the entry, for error
        messages; ``timeout``: seconds (None: the client's). The answers to the tokens the response issues are
        kept for :meth:`await_answers`."""
        step = CallRpc(method, request, session=session, name=name, timeout=timeout)
        return self._drive(_one(step), self._expected)

    def send(self, frame: cpb.ConduitFrame, fds: Sequence[int] = (), *, expect: Sequence[bytes] = ()) -> R:
        """Send ``frame`` on the session's conduit with ``fds`` attached (at most 253; not closed — the caller
        keeps them). ``expect``: tokens the frame will be answered under, kept for :meth:`await_answers`. A
        conduit that breaks ends the session (``Aborted``). There must be a session: call ``connect()`` first."""
        return self._drive(
            _one(SendFrame(frame, fds, expect=expect, what="sending a raw frame")), self._expected
        )

    def await_answers(self, tokens: Sequence[bytes], *, timeout: float | None = None) -> R:
        """Wait for the answer to each of ``tokens`` (issued by :meth:`call`, or expected by :meth:`send`); a list
        of :class:`~fdbroker.client.session.Answer` ``(kind, message, fd)`` in order, whose descriptors the
        caller owns. ``DeadlineExceeded`` after ``timeout`` seconds (None: the client's); then, or if the
        session ends first, whatever arrived for them is closed."""
        return self._drive(_one(AwaitAnswers(tokens, timeout)), self._expected)

    def run(self, flow: Flow[Any]) -> R:
        """Drive ``flow`` (a generator of steps, see :mod:`fdbroker.client.steps`) as this client's verbs are
        driven, and return its result. Answers it expected and did not take are closed when it ends."""
        return self._drive(flow, None)

    def pending(self) -> dict[str, int]:
        """What the client holds for callers now: ``answers`` filed and not taken (``unclaimed`` of them:
        deliveries whose RPC has not returned), tokens ``expected``, callers ``waiting``. All zero when no call
        is in progress and nothing is kept for :meth:`await_answers`."""
        return self._pending()
