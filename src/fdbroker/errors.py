"""The one error hierarchy of fdbroker.

Every failure the broker or the client library reports is a :class:`BrokerError` subclass named for what went
wrong. Each carries a gRPC status code *number* (so this module, and the registry that raises these errors, need
not import gRPC), a message that names the entry and says what to do, and the entry name when there is one.

The mapping to gRPC status codes lives in :func:`error_for_code` (client side) and in the servicer (server
side, via ``BrokerError.code``); the mapping to CLI exit codes lives in :mod:`fdbroker.cli.exitcodes`.
"""

from __future__ import annotations

import enum
from typing import Any


class Code(enum.IntEnum):
    """gRPC status code numbers (https://grpc.github.io/grpc/core/md_doc_statuscodes.html)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class BrokerError(Exception):
    """Base of all fdbroker errors.

    ``code`` is the gRPC status code the error travels as; ``name`` the entry concerned ("" if none).
    """

    code: Code = Code.UNKNOWN

    def __init__(self, message: str, *, name: str = "", code: Code | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, name={self.name!r}, code={self.code.name})"


class InvalidArgument(BrokerError):
    """A malformed name, label, TTL, page token or option."""

    code = Code.INVALID_ARGUMENT


class NotFound(BrokerError):
    """No entry of that name."""

    code = Code.NOT_FOUND


class AlreadyExists(BrokerError):
    """An entry of that name exists and ``replace`` was not asked for."""

    code = Code.ALREADY_EXISTS


class FailedPrecondition(BrokerError):
    """Revision mismatch, a conflicting lease, or a take in flight."""

    code = Code.FAILED_PRECONDITION


class PermissionDenied(BrokerError):
    """The policy does not allow this identity this operation on this name."""

    code = Code.PERMISSION_DENIED


class Unauthenticated(BrokerError):
    """No session, or an unknown one, for an operation that needs one."""

    code = Code.UNAUTHENTICATED


class UntrustedBroker(BrokerError):
    """The client refused what serves the run directory, before sending it anything.

    Raised when the conduit's peer (its ``SO_PEERCRED`` uid), the owner of ``control.sock``, or the owner of the
    run directory or of a directory (or symlink) above it is a uid the client does not trust, or a directory on
    the way is writable by others. A client trusts root, its own uid, and the uids it was told to trust
    (``FDBROKER_TRUST_UID``, ``Client(trust_uids=...)``); see docs/policy.md, "Run directory and who serves it".

    ``uid`` is the uid found, ``trusted`` the uids trusted (sorted), ``path`` what was checked.

    Its code is ``UNAUTHENTICATED``, not ``PERMISSION_DENIED``: nobody denied the caller anything; the other side
    failed to authenticate as a broker this client accepts. The broker never sends it (no status received maps
    back to it), and the CLI exits with its own code (``fdbroker.cli.exitcodes.UNTRUSTED``), so a script can tell
    "I refused the broker" (14) from "the broker refused me" (7).
    """

    code = Code.UNAUTHENTICATED

    def __init__(self, message: str, *, uid: int, trusted: tuple[int, ...], path: str = "") -> None:
        super().__init__(message)
        self.uid = uid
        self.trusted = trusted
        self.path = path


class ResourceExhausted(BrokerError):
    """A quota or the broker's descriptor limit was reached, or a watcher fell too far behind."""

    code = Code.RESOURCE_EXHAUSTED


class DeadlineExceeded(BrokerError):
    """A wait (lease queue, handoff) ran past its deadline."""

    code = Code.DEADLINE_EXCEEDED


class OutOfRange(BrokerError):
    """A watch start revision older than the broker's history window.

    ``oldest_revision`` is the oldest revision that can still be watched from.
    """

    code = Code.OUT_OF_RANGE

    def __init__(self, message: str, *, name: str = "", oldest_revision: int = 0) -> None:
        super().__init__(message, name=name)
        self.oldest_revision = oldest_revision


class Unavailable(BrokerError):
    """The broker is not running or not reachable at the run directory."""

    code = Code.UNAVAILABLE


class Cancelled(BrokerError):
    """The operation was cancelled."""

    code = Code.CANCELLED


class Internal(BrokerError):
    """A bug or an unexpected system error in the broker."""

    code = Code.INTERNAL


class Aborted(BrokerError):
    """A handoff that could not complete (the conduit closed mid-way); nothing changed, retry."""

    code = Code.ABORTED


class OutcomeUnknown(BrokerError):
    """A change reached the broker and then the broker went away (a takeover, a crash, a restart) — or the call ran
    out of time — before its answer came, and the client could not find out whether it happened.

    Raised by the client only (the broker never sends it; no status received maps back to it), and only for an
    operation that changes the registry once its last message is out: a put whose ``Deposit`` frame was sent, a
    take whose ``Ack`` was sent, a delete whose RPC was in flight, a check-in whose ``Deposit`` was sent. An
    operation the client can prove did not happen is retried instead, one it can prove did happen returns as if
    nothing went wrong (docs/client.md, "Reconnecting"): this error is never a plain failure for something that
    happened, nor a success for something that did not.

    ``operation`` is ``"put"``, ``"take"``, ``"delete"`` or ``"check-in"``; ``name`` the entry (the first one, for a
    batch); ``names`` every entry whose outcome is unknown. ``received``: for a take, what the broker had delivered
    (a socket, a file object or an ``OwnedFd``) — the caller owns it, and if the take did happen it is the only
    copy left; None otherwise.

    Its code is ``UNKNOWN``; the CLI exits with its own code (``fdbroker.cli.exitcodes.OUTCOME_UNKNOWN``, 15).
    """

    code = Code.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        operation: str,
        name: str = "",
        names: tuple[str, ...] = (),
        received: Any = None,
    ) -> None:
        super().__init__(message, name=name or (names[0] if names else ""))
        self.operation = operation
        self.names = names or ((name,) if name else ())
        self.received = received


_BY_CODE: dict[Code, type[BrokerError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        ResourceExhausted,
        DeadlineExceeded,
        OutOfRange,
        Unavailable,
        Cancelled,
        Internal,
        Aborted,
    )
}


def error_for_code(code: int, message: str, *, name: str = "") -> BrokerError:
    """The :class:`BrokerError` subclass for a gRPC status code number (unknown codes give ``BrokerError``)."""
    try:
        c = Code(code)
    except ValueError:
        c = Code.UNKNOWN
    cls = _BY_CODE.get(c)
    if cls is None:
        return BrokerError(message, name=name, code=c)
    return cls(message, name=name)
