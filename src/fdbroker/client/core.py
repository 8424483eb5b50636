"""What the asyncio client still takes from here while it is rewritten as a driver of
:mod:`fdbroker.client.flows` (the blocking client already is): request building, status → error mapping, the
conduit answers and prefetched tokens, and the result types and trust checks (re-exported from
:mod:`fdbroker.client.models` and :mod:`fdbroker.client.trust`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from fdbroker.client.models import (
    Entry,
    Event,
    FdLike,
    Info,
    Lease,
    LeaseInfo,
    OwnedFd,
    Received,
    close_quietly,
    fileno_of,
    wrap_fd,
)
from fdbroker.client.trust import (
    TRUST_UID_ENV,
    Paths,
    Trust,
    TrustUids,
    connect_failure,
    parse_uids,
    socket_address,
)
from fdbroker.errors import (
    Aborted,
    BrokerError,
    Code,
    OutOfRange,
    error_for_code,
)
from fdbroker.protocol import OLDEST_REVISION_KEY
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

if TYPE_CHECKING:
    from fdbroker.conduit.frames import Frame

__all__ = [
    "TRUST_UID_ENV",
    "Entry",
    "Event",
    "FdLike",
    "Info",
    "Lease",
    "LeaseInfo",
    "OwnedFd",
    "Paths",
    "Received",
    "Trust",
    "TrustUids",
    "connect_failure",
    "fileno_of",
    "parse_uids",
    "socket_address",
    "wrap_fd",
]

# -- request building ------------------------------------------------------------------------------------------


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


def lease_request(name: str, ttl: float, shared: bool, wait: bool) -> pb.LeaseRequest:
    req = pb.LeaseRequest(
        name=name,
        mode=pb.LeaseState.MODE_SHARED if shared else pb.LeaseState.MODE_EXCLUSIVE,
        wait=wait,
    )
    req.ttl.FromNanoseconds(int(ttl * 1e9))
    return req


# -- errors ----------------------------------------------------------------------------------------------------


def error_from_rpc(err: Any, paths: Paths | None = None, name: str = "") -> BrokerError:
    """The one place a gRPC error becomes a :class:`BrokerError` (both clients use it)."""
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


def error_from_frame(e: cpb.Error) -> BrokerError:
    return error_for_code(e.code, e.message, name=e.name)


def now() -> float:
    return time.monotonic()


# -- conduit answers -------------------------------------------------------------------------------------------
# What both clients do with frames once read; only how they read and wait differs.


class Mail(NamedTuple):
    """One answer on the conduit, filed under its token.

    ``kind`` is ``"deliver"`` (``message`` a ``DeliverItem``, ``fd`` the received descriptor), ``"batch"`` (the
    answer to a batch token: ``message`` is ``(items, fds)``, every item of its ``Deliver`` frame and their
    descriptors), ``"deposited"`` (a ``DepositResult``), ``"acked"`` (the ``Acked``) or ``"error"`` (an ``Error``
    naming the token); ``fd`` is -1 except for deliveries. Whoever holds a ``Mail`` owns its descriptors (close
    them with :func:`close_mail`).
    """

    kind: str
    message: Any
    fd: int


def sort_frame(frame: Frame) -> tuple[list[tuple[bytes, Mail]], BrokerError | None]:
    """Split a received frame into answers keyed by token.

    Takes ownership of ``frame.fds``: each ``Deliver`` item's descriptor moves into its :class:`Mail`; every other
    descriptor (and all of them, if a ``Deliver`` carries a different number of descriptors than items) is closed.
    The second value is an error about a whole frame (an ``Error`` frame without a token), if any.
    """
    m = frame.message
    kind = m.WhichOneof("body")
    if kind == "deliver":
        items = m.deliver.items
        if len(items) != len(frame.fds):
            n = len(frame.fds)
            frame.close_fds()
            return [], Aborted(
                f"the broker delivered {n} descriptor(s) for {len(items)} item(s); all were closed"
            )
        fds, frame.fds = frame.fds, []
        if len(items) > 1 and not items[1].token:
            # The answer to a batch token fills its frame alone; its items after the first carry no token.
            return [(items[0].token, Mail("batch", (list(items), fds), -1))], None
        return [(item.token, Mail("deliver", item, fd)) for item, fd in zip(items, fds, strict=True)], None
    frame.close_fds()
    if kind == "deposited":
        return [(r.token, Mail("deposited", r, -1)) for r in m.deposited.results], None
    if kind == "acked":
        return [(t, Mail("acked", m.acked, -1)) for t in m.acked.tokens], None
    if kind == "error":
        if m.error.token:
            return [(m.error.token, Mail("error", m.error, -1))], None
        return [], error_from_frame(m.error)
    return [], None


def close_mail(mails: Iterable[Mail]) -> None:
    """Close the descriptors of deliveries nobody will take."""
    for mail in mails:
        if mail.fd >= 0:
            close_quietly(mail.fd)
        if mail.kind == "batch":
            for fd in mail.message[1]:
                close_quietly(fd)


def deliveries(mails: Sequence[Mail], names: Sequence[str]) -> list[tuple[int, cpb.DeliverItem]]:
    """Deliveries → ``(fd, item)`` in order; the caller owns the fds. If any answer is not a delivery, every fd
    received is closed and the first error is raised."""
    out: list[tuple[int, cpb.DeliverItem]] = []
    first_err: BrokerError | None = None
    for mail, name in zip(mails, names, strict=True):
        if mail.kind == "deliver":
            out.append((mail.fd, mail.message))
        elif first_err is None:
            first_err = (
                error_from_frame(mail.message)
                if mail.kind == "error"
                else Aborted(f"unexpected {mail.kind} for {name!r}", name=name)
            )
    if first_err is not None:
        close_mail(Mail("deliver", None, fd) for fd, _ in out)
        raise first_err
    return out


def deposited_entries(mails: Sequence[Mail], names: Sequence[str]) -> list[Entry]:
    """``Deposited`` results → the stored entries in order; raises the first refusal (naming its entry)."""
    out: list[Entry] = []
    first_err: BrokerError | None = None
    for mail, name in zip(mails, names, strict=True):
        if mail.kind == "deposited" and not mail.message.HasField("error"):
            out.append(Entry.from_pb(mail.message.entry))
        elif first_err is None:
            first_err = error_from_frame(mail.message.error if mail.kind == "deposited" else mail.message)
            first_err.name = first_err.name or name
    if first_err is not None:
        raise first_err
    return out


# -- prefetched GET tokens -------------------------------------------------------------------------------------

PREFETCH_LIMIT = 256
# Batch tokens each carry a pre-encoded frame of the whole batch in the broker: fewer of them.
BATCH_PREFETCH_LIMIT = 64
"""Most extra GET tokens the adaptive policy asks for per ``Get`` RPC."""

_REDEEM_MARGIN = 0.25  # a token this close to expiry is not worth a round trip


class PrefetchPolicy:
    """How many extra GET tokens to ask for with a ``Get`` of ``name``.

    ``fixed`` (not None) is always the answer. Otherwise adaptive: 0 for the first get of a name, then 8, 16, …,
    256 while the name keeps being fetched within a token lifetime of the previous get: a name fetched in a
    loop pays one RPC per 257 gets (a refill of 64 cost ~21 us per get, amortized). Both clients use it.
    """

    def __init__(self, fixed: int | None = None) -> None:
        self.fixed = fixed
        self._recent: dict[str, tuple[float, int]] = {}

    def next(self, name: str, token_ttl: float) -> int:
        if self.fixed is not None:
            return self.fixed
        t = time.monotonic()
        last, n = self._recent.get(name, (0.0, 0))
        n = n + 1 if t - last < token_ttl else 0
        self._recent[name] = (t, n)
        if len(self._recent) > 4096:
            self._recent.clear()
        return 0 if n == 0 else min(PREFETCH_LIMIT, 4 << min(n, 6))


class PrefetchedTokens:
    """GET tokens issued ahead, per name, each with its expiry (monotonic). Tokens belong to one session."""

    def __init__(self) -> None:
        self._by_name: dict[str, collections.deque[tuple[bytes, float]]] = {}

    def add(self, name: str, tokens: Iterable[bytes], expire: float) -> None:
        self._by_name.setdefault(name, collections.deque()).extend((t, expire) for t in tokens)

    def pop(self, name: str) -> bytes | None:
        """The next token for ``name`` that is not about to expire, or None."""
        q = self._by_name.get(name)
        t = time.monotonic()
        while q:
            tok, exp = q.popleft()
            if exp - t >= _REDEEM_MARGIN:
                return tok
        self._by_name.pop(name, None)
        return None

    def count(self, name: str) -> int:
        return len(self._by_name.get(name, ()))

    def drop(self, name: str) -> None:
        self._by_name.pop(name, None)

    def clear(self) -> None:
        self._by_name.clear()
