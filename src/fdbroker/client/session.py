"""One session as both clients see it, without I/O: the ``Welcome`` that opens it, the answers the broker sends
on the conduit filed under their tokens until their caller takes them (:class:`Mailbox`), and how what arrives —
a gRPC status, an ``Error`` frame — becomes a :class:`~fdbroker.errors.BrokerError`.

The drivers (:mod:`fdbroker.client.sync`, :mod:`fdbroker.client.aio`) read the conduit and call
:meth:`Mailbox.file`; they differ only in how a caller waits (a condition variable, a future).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from fdbroker.client.models import close_quietly
from fdbroker.conduit.errors import ErrType
from fdbroker.errors import Aborted, BrokerError, Code, OutOfRange, Unavailable, error_for_code
from fdbroker.protocol import OLDEST_REVISION_KEY, SESSION_METADATA_KEY
from fdbroker.v1 import conduit_pb2 as cpb

if TYPE_CHECKING:
    from fdbroker.client.trust import Paths
    from fdbroker.conduit.frames import Frame

NON_FATAL = (ErrType.NO_FD, ErrType.BAD_CTRL_MESG)
"""Conduit errors reported in-band that leave the stream usable (their descriptors are already closed)."""


# -- errors ----------------------------------------------------------------------------------------------------


def error_from_rpc(err: Any, paths: Paths | None = None, name: str = "") -> BrokerError:
    """The one place a gRPC error becomes a :class:`BrokerError` (both clients use it). ``name``: the entry the
    call was about, for the message."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    details = err.details() if callable(getattr(err, "details", None)) else str(err)
    num = code.value[0] if code is not None else Code.UNKNOWN
    if num == Code.UNAVAILABLE and paths is not None:
        # gRPC's text names its resolver and subchannel states; say what a person can act on instead.
        if not paths.control.exists():
            return paths.not_running(f"{paths.control} does not exist")
        return paths.not_running(f"nothing accepts connections on {paths.control}")
    if num == Code.OUT_OF_RANGE:
        oldest = 0
        md = err.trailing_metadata() if callable(getattr(err, "trailing_metadata", None)) else None
        for k, v in md or ():
            if k == OLDEST_REVISION_KEY:
                oldest = int(v)
        return OutOfRange(details or "out of range", name=name, oldest_revision=oldest)
    return error_for_code(num, details or (code.name if code is not None else "unknown error"), name=name)


def is_cancelled(err: Any) -> bool:
    """Whether a gRPC error is CANCELLED (the call was cancelled on our side: a stream closed, a client shut)."""
    code = err.code() if callable(getattr(err, "code", None)) else None
    return code is not None and code.value[0] == Code.CANCELLED


def error_from_frame(e: cpb.Error) -> BrokerError:
    """The :class:`BrokerError` an ``Error`` frame (or a refused result in a frame) stands for."""
    return error_for_code(e.code, e.message, name=e.name)


def conduit_lost(paths: Paths, err: Exception) -> Aborted:
    """The error for a conduit that broke while reading (which ends the session)."""
    return Aborted(
        f"the conduit to the broker at {paths.run_dir} broke ({err}); nothing pending was handed over; retry "
        "(a new session is opened)"
    )


def conduit_broke(what: str, err: Exception, name: str = "") -> Aborted:
    """The error for a conduit that broke while sending (which ends the session)."""
    return Aborted(f"the conduit broke while {what}: {err}; retry (a new session is opened)", name=name)


def session_gone(what: str, name: str = "") -> Aborted:
    """The error for a step bound to a session (its tokens) that has ended, though another may be open now."""
    return Aborted(f"the session ended before {what}; nothing of it is handed over any more", name=name)


def session_unknown(paths: Paths) -> Aborted:
    """Why a session the broker answered ``UNAUTHENTICATED`` for is ended: the broker no longer knows it."""
    return Aborted(
        f"the broker at {paths.run_dir} no longer knows this session (it was replaced or restarted); "
        "nothing pending was handed over; retry (a new session is opened)"
    )


# -- opening a session -----------------------------------------------------------------------------------------


class Welcome(NamedTuple):
    """What the broker says when a conduit connection opens: the session id every call of the session carries
    (metadata ``fdbroker-session``), how long its tokens live, and the caller as the kernel saw it."""

    session_id: str
    token_ttl: float
    identity: tuple[int, int, int]  # pid, uid, gid


def welcome_of(frame: Frame, paths: Paths) -> Welcome:
    """The ``Welcome`` in the first frame of a conduit connection. Closes the frame's descriptors (there should be
    none). Raises the error an ``Error`` frame carries (a quota, say), or :class:`Unavailable` for anything else
    (the socket is not a broker's)."""
    frame.close_fds()
    kind = frame.message.WhichOneof("body")
    if kind == "error":
        raise error_from_frame(frame.message.error)
    if kind != "welcome":
        raise Unavailable(f"the broker sent {kind} instead of welcome; is {paths.conduit} a broker?")
    w = frame.message.welcome
    return Welcome(
        w.session_id, w.token_ttl.ToNanoseconds() / 1e9, (w.identity.pid, w.identity.uid, w.identity.gid)
    )


def session_metadata(session_id: str | None) -> list[tuple[str, str]]:
    """The gRPC metadata of a call made as ``session_id`` (none for an anonymous call)."""
    return [(SESSION_METADATA_KEY, session_id)] if session_id else []


# -- answers on the conduit ------------------------------------------------------------------------------------


class Answer(NamedTuple):
    """One answer on the conduit, filed under its token.

    ``kind`` is ``"deliver"`` (``message`` a ``DeliverItem``, ``fd`` the received descriptor), ``"batch"`` (the
    answer to a batch token: ``message`` is ``(items, fds)``, every item of its ``Deliver`` frame and their
    descriptors), ``"deposited"`` (a ``DepositResult``), ``"acked"`` (the ``Acked``), ``"pong"`` (the ``Pong``,
    filed under :func:`pong_key`) or ``"error"`` (an ``Error`` naming the token); ``fd`` is -1 except for
    deliveries. Whoever holds an ``Answer`` owns its descriptors (close them with :func:`close_answers`).
    """

    kind: str
    message: Any
    fd: int


def pong_key(nonce: int) -> bytes:
    """The key a ``Pong`` is filed under (tokens are 16+ random bytes; this cannot clash with one)."""
    return b"pong:%d" % nonce


def sort_frame(frame: Frame) -> tuple[list[tuple[bytes, Answer]], BrokerError | None]:
    """Split a received frame into answers keyed by token.

    Takes ownership of ``frame.fds``: each ``Deliver`` item's descriptor moves into its :class:`Answer`; every
    other descriptor (and all of them, if a ``Deliver`` carries a different number of descriptors than items) is
    closed. The second value is an error about the whole frame (an ``Error`` frame without a token, a ``Deliver``
    that does not add up), which ends the session: nobody could tell whose answer it was.
    """
    m = frame.message
    kind = m.WhichOneof("body")
    if kind == "deliver":
        items = m.deliver.items
        if len(items) != len(frame.fds):
            n = len(frame.fds)
            frame.close_fds()
            return [], Aborted(
                f"the broker delivered {n} descriptor(s) for {len(items)} item(s); all were closed and the "
                "session ended; retry (a new session is opened)"
            )
        fds, frame.fds = frame.fds, []
        if len(items) > 1 and not items[1].token:
            # The answer to a batch token fills its frame alone; its items after the first carry no token.
            return [(items[0].token, Answer("batch", (list(items), fds), -1))], None
        return [(item.token, Answer("deliver", item, fd)) for item, fd in zip(items, fds, strict=True)], None
    frame.close_fds()
    if kind == "deposited":
        return [(r.token, Answer("deposited", r, -1)) for r in m.deposited.results], None
    if kind == "acked":
        return [(t, Answer("acked", m.acked, -1)) for t in m.acked.tokens], None
    if kind == "pong":
        return [(pong_key(m.pong.nonce), Answer("pong", m.pong, -1))], None
    if kind == "error":
        if m.error.token:
            return [(m.error.token, Answer("error", m.error, -1))], None
        return [], error_from_frame(m.error)
    return [], None


class LazyItem:
    """A ``DeliverItem`` known by its serialized body, parsed the first time a field is read: the lean path's
    answer to a single ``Redeem`` (a ``get_fd`` never reads it)."""

    __slots__ = ("_msg", "_raw")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._msg: cpb.DeliverItem | None = None

    def __getattr__(self, name: str) -> Any:
        msg = self._msg
        if msg is None:
            msg = self._msg = cpb.DeliverItem.FromString(self._raw)
        return getattr(msg, name)


class LazyItems(Sequence[Any]):
    """The items of a batch ``Deliver`` known by its serialized ``ConduitFrame``, parsed on first access (a batch
    of raw descriptors never reads them)."""

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._items: Sequence[cpb.DeliverItem] | None = None

    def _parsed(self) -> Sequence[cpb.DeliverItem]:
        if self._items is None:
            self._items = list(cpb.ConduitFrame.FromString(self._raw).deliver.items)
        return self._items

    def __len__(self) -> int:
        return len(self._parsed())

    def __getitem__(self, i: Any) -> Any:
        return self._parsed()[i]


def lean_answer(fds: list[int], raw: bytes) -> Answer:
    """The :class:`Answer` of a ``Deliver`` the lean path recognised: one descriptor and its item, or a batch."""
    if len(fds) == 1:
        return Answer("deliver", LazyItem(raw), fds[0])
    return Answer("batch", (LazyItems(raw), fds), -1)


def close_answers(answers: Iterable[Answer]) -> None:
    """Close the descriptors of answers nobody will take."""
    for a in answers:
        if a.fd >= 0:
            close_quietly(a.fd)
        if a.kind == "batch":
            for fd in a.message[1]:
                close_quietly(fd)


def issued_tokens(response: Any) -> list[bytes]:
    """The handoff tokens an RPC response issued (its ``handoff`` or ``handoffs``): the tokens the broker answers
    on the conduit — a ``Deliver`` it pushes before the RPC returns, or ``Deposited``/``Acked`` for a frame the
    caller sends. Prefetched tokens are not among them: they are answered only when redeemed."""
    fields = response.DESCRIPTOR.fields_by_name
    if "handoffs" in fields:
        return [h.token for h in response.handoffs]
    if "handoff" in fields and response.HasField("handoff"):
        return [response.handoff.token]
    return []


class Wait:
    """A caller waiting for the answers to ``tokens``. ``signal`` is the driver's (a future, or None where one
    condition variable wakes every waiter); ``error`` is set when the session ended first."""

    __slots__ = ("error", "missing", "signal", "tokens")

    def __init__(self, tokens: tuple[bytes, ...], missing: int, signal: Any) -> None:
        self.tokens = tokens
        self.missing = missing
        self.signal = signal
        self.error: BrokerError | None = None


class Mailbox:
    """The answers of one session, filed under their tokens until their caller takes them.

    No I/O and no locking: the sync client calls it under its condition variable, the asyncio client from its
    event loop. An answer is kept when its token is *expected* (:meth:`expect`: before sending the frame it
    answers, or as soon as the RPC that issued it returned) or, for a ``Deliver``, while an RPC that started
    before it arrived is still in flight (the broker pushes a ``Deliver`` before the RPC that asked for it
    returns; :meth:`rpc_started`, :meth:`rpc_ended`). Anything else is closed at once: nobody can claim it. So
    no delivery outlives the caller that could have taken it, whichever way that caller ends.
    """

    def __init__(self) -> None:
        #: Why the session ended (then every wait fails with it), or None while it lives.
        self.dead: BrokerError | None = None
        self._answers: dict[bytes, Answer] = {}
        self._expected: set[bytes] = set()
        self._waits: dict[bytes, Wait] = {}
        self._unclaimed: dict[bytes, int] = {}  # deliveries nobody expects yet → the newest RPC when filed
        self._rpcs = 0
        self._inflight: set[int] = set()

    def reset(self) -> None:
        """A new session begins (after :meth:`fail` emptied this one)."""
        self.dead = None

    def expect(self, tokens: Iterable[bytes]) -> None:
        """Keep the answers to ``tokens`` (including any already filed) until taken or forgotten."""
        for t in tokens:
            self._expected.add(t)
            self._unclaimed.pop(t, None)

    def wait(self, tokens: Sequence[bytes], signal: Any = None) -> Wait:
        """Expect ``tokens`` and register a caller for them; check :meth:`ready`, then :meth:`take`."""
        self.expect(tokens)
        missing = [t for t in tokens if t not in self._answers]
        w = Wait(tuple(tokens), len(missing), signal)
        for t in missing:
            self._waits[t] = w
        w.error = self.dead
        return w

    @staticmethod
    def ready(w: Wait) -> bool:
        """Whether every answer ``w`` waits for is here; raises why the session ended if it ended first."""
        if w.missing == 0:
            return True
        if w.error is not None:
            raise w.error
        return False

    def take(self, w: Wait) -> list[Answer]:
        """The answers of a ready wait, in the order of its tokens; the caller owns their descriptors."""
        out = [self._answers.pop(t) for t in w.tokens]
        self._expected.difference_update(w.tokens)
        return out

    def forget(self, tokens: Iterable[bytes]) -> None:
        """Stop expecting ``tokens``: close what arrived for them; what arrives later is closed on arrival."""
        for t in tokens:
            self._expected.discard(t)
            self._waits.pop(t, None)
            a = self._answers.pop(t, None)
            if a is not None:
                close_answers([a])

    def file(self, frame: Frame) -> list[Wait]:
        """File a received frame (owning its descriptors: each is filed or closed); returns the waits it
        completed, which the driver wakes. A frame that cannot be matched to its callers ends the session
        (:meth:`fail`; every wait is returned)."""
        answers, whole = sort_frame(frame)
        done: list[Wait] = []
        for t, a in answers:
            if t in self._expected:
                old = self._answers.get(t)
                if old is not None:
                    close_answers([old])  # a second answer to one token: keep the last
                self._answers[t] = a
                w = self._waits.pop(t, None)
                if w is not None:
                    w.missing -= 1
                    if w.missing == 0:
                        done.append(w)
            elif a.kind in ("deliver", "batch") and self._inflight:
                self._answers[t] = a
                self._unclaimed[t] = self._rpcs
            else:
                close_answers([a])
        if whole is not None:
            done.extend(self.fail(whole))
        return done

    def rpc_started(self) -> int:
        """Note an RPC in flight that may make the broker deliver; returns its number for :meth:`rpc_ended`."""
        self._rpcs += 1
        self._inflight.add(self._rpcs)
        return self._rpcs

    def rpc_ended(self, n: int) -> None:
        """The RPC ``n`` returned (its caller expected its tokens first): close deliveries filed before every
        RPC still in flight started, which nobody can claim any more."""
        self._inflight.discard(n)
        low = min(self._inflight, default=self._rpcs + 1)
        for t in [t for t, filed in self._unclaimed.items() if filed < low]:
            del self._unclaimed[t]
            close_answers([self._answers.pop(t)])

    def fail(self, why: BrokerError) -> list[Wait]:
        """The session ended: every waiting caller fails with ``why`` (returned, for the driver to wake) and every
        descriptor not yet taken is closed."""
        self.dead = why
        waits = list({id(w): w for w in self._waits.values()}.values())
        for w in waits:
            w.error = why
        self._waits.clear()
        close_answers(self._answers.values())
        self._answers.clear()
        self._expected.clear()
        self._unclaimed.clear()
        return waits

    def pending(self) -> dict[str, int]:
        """What is held now, for tests and the curious: ``answers`` filed and not taken (of them ``unclaimed``:
        deliveries waiting for their RPC to return), tokens ``expected``, callers ``waiting``."""
        return {
            "answers": len(self._answers),
            "unclaimed": len(self._unclaimed),
            "expected": len(self._expected),
            "waiting": len({id(w) for w in self._waits.values()}),
        }
