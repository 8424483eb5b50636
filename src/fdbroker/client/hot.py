"""The blocking client's ``Redeem`` step and its hot path for a repeated prefetched get, which share the lean
exchange (docs/client.md, "The blocking client's hot get").

A repeated ``get``/``get_fd`` of a name whose prefetched tokens are held is one conduit round trip, and the flow's
machinery around it (generators, the run, the steps, the driver's locks) cost more than the exchange's Python. So
``fdbroker.Client`` serves these verbs with :func:`get` (``Verb(..., hot=...)`` in :mod:`.verbs`): when the flow's
first steps are known in advance it does them itself, and hands anything unexpected to the flow, from the very
``Redeem`` it made (:func:`fdbroker.client.flows.get_resumed`), so every outcome is the verb's.

Descriptors: the caller owns what :func:`get` returns; an answer the flow does not take is closed when its run ends.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, TypeVar

from fdbroker.client import flows, session, steps
from fdbroker.client.models import OwnedFd, Received, wrap_fd
from fdbroker.conduit.errors import ConduitError
from fdbroker.conduit.frames import FramedConduit
from fdbroker.conduit.lean import TOKEN_BYTES, redeem_frame
from fdbroker.errors import BrokerError

if TYPE_CHECKING:
    from fdbroker.client.sync import Client

T = TypeVar("T")


def redeem(c: Client, step: steps.Redeem, run: steps.Run[Any]) -> Any:
    """The ``Redeem`` step: the lean path when nobody else reads the conduit and no refill is asked for
    (:func:`_redeem_lean`); else send and await."""
    with c._cond:
        conduit, sid = c._conduit, step.session
        lean = not c._reading and c._box.dead is None and len(step.token) == TOKEN_BYTES and not step.refill
        lean = lean and conduit is not None and (sid is None or c._live() == sid)
        if lean:
            c._reading = True
    if conduit is None or not lean:
        what = "redeeming a prefetched token"
        c._send_frame(steps.SendFrame(step.frame(), expect=(step.token,), what=what, session=sid), run)
        return c._await_answers(steps.AwaitAnswers((step.token,), session=sid), run)[0]
    return _redeem_lean(c, conduit, step, run)


def _redeem_lean(c: Client, conduit: FramedConduit, step: steps.Redeem, run: steps.Run[Any]) -> Any:
    """A ``Redeem`` by the caller that holds the reader's role (``c._reading``): :func:`lean_exchange`, then :func:`lean_rest`."""
    got, broken = lean_exchange(c, conduit, step.token, step.count, run.limit(c.timeout), run.expected)
    return lean_rest(c, step, run, got, broken)


def get(c: Client, name: str, fd_only: bool = False) -> Received:
    """``get`` (``get_fd`` with ``fd_only``), served here when the flow's first steps are known in advance: the
    session is open, a prefetched token for ``name`` is held (not the last one: its ``Redeem`` asks for a refill,
    which the flow does) and no other caller reads the conduit. Then the
    flow would open no session, take that token and redeem it in one exchange (:func:`lean_exchange`): this
    does the same without the flow's generators, the run and the steps. Whatever the exchange brings but the
    expected ``Deliver`` — an ``Error`` for the token, another frame first, a broken conduit, nothing in time
    — goes on in the flow itself from that ``Redeem`` (:func:`flows.get_resumed`, :func:`resume`), so every
    outcome is the verb's. Otherwise the verb's flow is driven from the start. The caller owns the returned
    descriptor (``get``: a socket, a file object or an :class:`OwnedFd`)."""
    st = c._state
    tok: bytes | None = None
    sid: str | None = None
    with c._lock:
        conduit = c._conduit
        if not c._reading and conduit is not None and c._box.dead is None:
            sid = st.live_id()
            if sid is not None and st.prefetch.count(name) > 1:  # the last one asks for more: the flow's
                tok = st.prefetch.pop(name)
                if tok is not None and len(tok) == TOKEN_BYTES:
                    c._reading = True
    if tok is None:
        return c._drive(flows.get_fd(st, name) if fd_only else flows.get(st, name))
    assert conduit is not None and sid is not None
    timeout = st.timeout
    deadline = time.monotonic() + timeout
    if len(tok) != TOKEN_BYTES:  # not one of the broker's: sent as it is, as the flow's Redeem would
        held = flows.Held(tok, sid, deadline)
        return c._resume(flows.get_resumed(st, name, held, fd_only=fd_only), held, None, set())
    expected: set[bytes] = set()
    try:
        got, broken = lean_exchange(c, conduit, tok, 1, timeout, expected)
    except BaseException:
        if expected:
            with c._cond:
                c._box.forget(expected)
        raise
    if got is None:
        held = flows.Held(tok, sid, deadline)
        flow = flows.get_resumed(st, name, held, fd_only=fd_only)
        return c._resume(flow, held, (None, broken), expected)
    st.stats["redeems"] += 1
    fd = got[0][0]
    return OwnedFd(fd) if fd_only else wrap_fd(fd, session.LazyItem(got[1]).info)


def get_fd(c: Client, name: str) -> OwnedFd:
    """``get_fd``: :func:`get` with ``fd_only``."""
    return get(c, name, True)  # type: ignore[return-value]


def resume(
    c: Client,
    flow: steps.Flow[T],
    held: flows.Held,
    outcome: tuple[None, BrokerError | None] | None,
    expected: set[bytes],
) -> T:
    """Drive ``flow``, which begins with the ``Redeem`` of ``held.token`` that :func:`get` made:
    ``outcome`` is what :func:`lean_exchange` returned for it (None: it was not made; the step does it), the
    token already expected in ``expected`` if its answer is to be awaited."""
    run = steps.Run(flow)
    run.expected.update(expected)
    first = [outcome]

    def do(step: steps.Step, run: steps.Run[T]) -> Any:
        if first and isinstance(step, steps.Redeem) and step.token is held.token:
            out = first.pop()
            if out is not None:
                return lean_rest(c, step, run, *out)
        return getattr(c, step.handler)(step, run)

    try:
        return steps.drive(run, do)
    finally:
        left = run.finish()
        if left:
            with c._cond:
                c._box.forget(left)


def lean_exchange(
    c: Client, conduit: FramedConduit, token: bytes, count: int, timeout: float, expected: set[bytes]
) -> tuple[tuple[list[int], bytes] | None, BrokerError | None]:
    """The ``Redeem`` of ``token`` by the caller that holds the reader's role (``c._reading``, given back here):
    spliced from bytes, sent, and its ``Deliver`` recognised in the one read that follows
    (:meth:`FramedConduit.exchange`), without the mailbox. Returns ``(fds, body)`` when it was (the caller owns
    ``fds``), else None and, if the conduit broke, the error (the session is over then). When the read brought
    anything else it was decoded into the conduit's queue, which only the reader files: the token is expected
    (in the mailbox, and added to ``expected``, the caller's to forget) before the role is given back, and its
    answer is to be awaited as usual (:func:`lean_rest`)."""
    got: tuple[list[int], bytes] | None = None
    broken: BrokerError | None = None
    try:
        got = conduit.exchange(redeem_frame(token), token, count, timeout)
    except ConduitError as err:
        broken = session.conduit_broke("redeeming a prefetched token", err)
    finally:
        with c._lock:
            if got is None:
                expected.add(token)
                c._box.expect((token,))
            c._reading = False
            if broken is not None and c._conduit is conduit:
                c._session_over(broken, lost=True)
            if c._waiting:
                c._cond.notify_all()
    return got, broken


def lean_rest(
    c: Client,
    step: steps.Redeem,
    run: steps.Run[Any],
    got: tuple[list[int], bytes] | None,
    broken: BrokerError | None,
) -> Any:
    """The ``Redeem`` step's result after :func:`lean_exchange`: its error, the recognised answer, or the answer
    awaited in the mailbox."""
    if broken is not None:
        raise broken
    if got is not None:
        return session.lean_answer(*got)
    return c._await_answers(steps.AwaitAnswers((step.token,), session=step.session), run)[0]


def wait(c: Client, seconds: float) -> None:
    """Wait on ``c._cond`` (held) for up to ``seconds``, counted in ``c._waiting``: the hot path gives the reader's
    role back without ``notify_all`` (Python code) when nobody waits."""
    c._waiting += 1
    try:
        c._cond.wait(seconds)
    finally:
        c._waiting -= 1
