"""The audit log: every access decision that moves, removes or denies a descriptor, logged once.

One record on the logger ``fdbroker.audit`` at INFO per decision, written where the decision becomes final:

============ ================================================================================================
verb         logged when
============ ================================================================================================
put          a deposit is stored (``replaced`` says it swapped a descriptor) or refused on the conduit
get          a Get/BatchGet delivers (one record per entry; a prefetch's redemptions are part of the Get that
             issued its tokens and are counted in metrics, not logged again; a refused redemption is logged); a
             Redeem's refill issued tokens (``prefetch=N via=refill``: the same decision made again on the
             conduit, once per refill)
take         the receiver acked (the entry left), the take was abandoned (not acked: the entry stays), or
             the ack was refused
delete       an entry is deleted
lease        a lease is granted (``mode``, ``epoch``, ``lease``)
release      a lease ends (``reason``: released, expired, holder_died, entry_removed, handover)
checkin      a leased descriptor is checked in (which also ends the lease), or the check-in is refused
expire       an entry's TTL ran out (who: its owner)
remove       an ephemeral entry went with its session (who: that session)
(any action) the policy denied it (``outcome=denied``, ``code``), or a quota refused it (``outcome=refused``,
             ``code=RESOURCE_EXHAUSTED``, ``quota``)
============ ================================================================================================

Every record carries who (``pid``, ``uid``, ``gid`` as the kernel gave them for the session, ``session``: the
first 6 characters of its id; ``-`` for an anonymous caller), what (``verb``, ``name``, ``kind``) and the
``outcome`` (``ok``, ``denied``, ``refused``, ``abandoned``), in the message as ``key=value`` words and, for
``--log-format json``, as keys of the line's object (:mod:`fdbroker.broker.logs`). Errors that are not access
decisions (no such entry, already exists, a lease held by someone else, a malformed request) are not audited:
the RPC metrics count them by status code.

Denials and refusals are raised where the caller's identity is known but not always its session (the policy
sees identities): a record for an identity finds its session by that identity object, which each connection's
session and every check made for it share (:meth:`SessionTable.of_identity`). Records cost nothing but a level check when ``fdbroker.audit`` is above INFO.
"""

from __future__ import annotations

import json
import logging
import re
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from fdbroker import fdinfo
from fdbroker.broker.metrics import Metrics
from fdbroker.broker.policy import Identity
from fdbroker.broker.sessions import Session, SessionTable
from fdbroker.broker.tokens import Token, operation_name
from fdbroker.errors import BrokerError
from fdbroker.v1 import broker_pb2 as pb

if TYPE_CHECKING:
    from fdbroker.broker.leasing import Holder
    from fdbroker.broker.registry import Entry

log = logging.getLogger("fdbroker.audit")

MAX_VALUE_CHARS = 256
"""A longer value (only a caller's name can be: a refused call's name is logged before anything checks it) is
cut to this many characters and marked ``…[N chars]``, so one call cannot write megabytes of log."""

E = TypeVar("E", bound=BrokerError)


class Who(NamedTuple):
    """Who a record is about, when it is not a live session: unknown parts are None."""

    pid: int | None
    uid: int | None
    gid: int | None
    session: str | None


Actor = Session | Identity | Who | None
"""A session; an identity (its session found by :meth:`SessionTable.of_identity`); :class:`Who`; None:
anonymous."""


def kind_of(e: Entry) -> str:
    """The entry's kind as ``fdinfo`` names it ("tcp-listener", "pipe", …)."""
    return fdinfo.kind_name(e.kind)


def reason_name(reason: int) -> str:
    """``pb.Event.Reason`` as a lowercase word ("holder_died"); "" for none."""
    return _REASONS.get(reason, str(reason))


_REASONS = {v: k.removeprefix("REASON_").lower() for k, v in pb.Event.Reason.items()}
_REASONS[0] = ""


class Audit:
    """Writes the audit records of one broker and counts the decisions that are also metrics (denials, quota
    refusals, refused handoffs, lease grants and ends)."""

    def __init__(self, metrics: Metrics, sessions: SessionTable) -> None:
        self.metrics = metrics
        self._sessions = sessions
        self._recorded: BrokerError | None = None  # the last error a denial or refusal was recorded for

    # -- decisions -----------------------------------------------------------------------------------------------

    @staticmethod
    def enabled() -> bool:
        """Whether records are written (``fdbroker.audit`` at INFO): for a caller with work to do for many."""
        return log.isEnabledFor(logging.INFO)

    def ok(self, verb: str, who: Actor, name: str, kind: str | Entry = "", **detail: Any) -> None:
        """A descriptor moved or left: ``verb`` on ``name`` succeeded. ``kind``: the entry (its kind is read
        only if the record is written) or a kind name."""
        if log.isEnabledFor(logging.INFO):
            self._write(verb, who, name, kind, "ok", detail)

    def deposited(self, s: Session, tok: Token, e: Entry, info: pb.DescriptorInfo) -> None:
        """A put's or a check-in's descriptor was stored under ``tok``: a handoff, counted and logged."""
        verb = operation_name(tok.operation)
        self.metrics.handoff(verb, "ok")
        if log.isEnabledFor(logging.INFO):
            if tok.operation == pb.OPERATION_CHECKIN:
                detail: dict[str, Any] = {"lease": str(tok.payload)[:6]}
            else:
                detail = {"replaced": "true" if e.create_revision != e.revision else ""}
            self._write(verb, s, e.name, fdinfo.kind_name(info.kind), "ok", detail)

    def abandoned(self, verb: str, who: Actor, name: str, kind: str | Entry = "", **detail: Any) -> None:
        """A handoff the broker had granted was not completed (a take not acked: the entry stays)."""
        self.metrics.handoff(verb, "abandoned")
        if log.isEnabledFor(logging.INFO):
            self._write(verb, who, name, kind, "abandoned", detail)

    def denied(self, who: Identity | None, action: str, name: str, err: E) -> E:
        """The policy refused ``action`` on ``name`` with ``err``: counted and logged; returns ``err`` (the
        policy's hook, and the few checks that refuse anonymous callers before the policy sees them)."""
        self._recorded = err
        self.metrics.denials.inc(action)
        if log.isEnabledFor(logging.INFO):
            self._write(action, who, name, "", "denied", {"code": err.code.name})
        return err

    def exhausted(self, who: Actor, verb: str, quota: str, err: E) -> E:
        """``verb`` refused RESOURCE_EXHAUSTED by ``quota`` (the policy's limit name, or ``capacity``): counted
        and logged; returns ``err`` for the caller to raise."""
        self._recorded = err
        self.metrics.quota_refusals.inc(quota)
        if log.isEnabledFor(logging.INFO):
            self._write(verb, who, err.name, "", "refused", {"code": err.code.name, "quota": quota})
        return err

    def refused(self, verb: str, who: Actor, name: str, err: BrokerError, **detail: Any) -> None:
        """A descriptor did not move on the conduit (a bad token, a check that failed at delivery): a refused
        handoff, counted; logged unless ``err`` was already recorded as a denial or a quota refusal."""
        self.metrics.handoff(verb, "refused")
        if err is self._recorded:
            return
        if log.isEnabledFor(logging.INFO):
            detail["code"] = err.code.name
            reason = getattr(err, "reason", "")
            if reason:
                detail["reason"] = reason
            self._write(verb, who, name or err.name, "", "refused", detail)

    # -- leases --------------------------------------------------------------------------------------------------

    def lease_granted(self, s: Session, e: Entry, h: Holder) -> None:
        mode = "exclusive" if h.mode == pb.LeaseState.MODE_EXCLUSIVE else "shared"
        self.metrics.lease_grants.inc(mode)
        if log.isEnabledFor(logging.INFO):
            detail = {"mode": mode, "epoch": h.epoch, "lease": h.lease_id[:6]}
            self._write("lease", s, e.name, e, "ok", detail)

    def lease_ended(self, h: Holder, reason: int, e: Entry | None, *, checked_in: bool = False) -> None:
        """A lease ended: counted by reason; logged (``release``) unless a check-in ended it (its own record
        says so)."""
        self.metrics.lease_ends.inc("checked_in" if checked_in else reason_name(reason))
        if checked_in or not log.isEnabledFor(logging.INFO):
            return
        who = Who(h.identity.pid, h.identity.uid, h.identity.gid, h.session_id)
        detail = {"reason": reason_name(reason), "epoch": h.epoch, "lease": h.lease_id[:6]}
        self._write("release", who, h.name, "" if e is None else e, "ok", detail)

    # -- the record ----------------------------------------------------------------------------------------------

    def _write(
        self, verb: str, who: Actor, name: str, kind: str | Entry, outcome: str, detail: dict[str, Any]
    ) -> None:
        pid = uid = gid = None
        session: str | None = None
        if isinstance(who, Session):
            (pid, uid, gid), session = who.identity, who.id
        elif isinstance(who, Who):
            pid, uid, gid, session = who
        elif who is not None:
            pid, uid, gid = who
            s = self._sessions.of_identity(who)
            session = None if s is None else s.id
        if not isinstance(kind, str):
            kind = kind_of(kind)
        record: dict[str, Any] = {"verb": verb, "name": name, "kind": kind, "outcome": outcome}
        record.update(pid=pid, uid=uid, gid=gid, session=None if session is None else session[:6])
        record.update((k, v) for k, v in detail.items() if v != "")
        if len(name) > MAX_VALUE_CHARS:
            record["name"] = clip(name)
        log.info("%s", _Words(record), extra={"audit": record})


def clip(value: str) -> str:
    """``value`` cut to :data:`MAX_VALUE_CHARS` characters and marked with its length, if it is longer."""
    if len(value) <= MAX_VALUE_CHARS:
        return value
    return f"{value[:MAX_VALUE_CHARS]}…[{len(value)} chars]"


class _Words:
    """An audit record's message, ``key=value`` words, built when (and where) the record is formatted."""

    __slots__ = ("record",)

    def __init__(self, record: dict[str, Any]) -> None:
        self.record = record

    def __str__(self) -> str:
        return " ".join(f"{k}={word(v)}" for k, v in self.record.items() if v != "")


def word(v: Any) -> str:
    """A value for a ``key=value`` word, so that one record is one line with unambiguous fields whatever a caller
    put in a name: as it is if every character is printable (no control, format — bidi, zero-width — or
    separator character) and none is a space, a quote, ``=`` or a backslash; else a JSON string literal in
    ASCII (``"a b"``, ``"\\u001b[2J"``). A plain value never starts with ``"``, so a reader tells the two
    apart by the first character. None is ``-``."""
    if v is None:
        return "-"
    s = str(v)
    if s.isprintable() and _PLAIN.fullmatch(s):
        return s
    return json.dumps(s)


_PLAIN = re.compile(r"[^ \"'=\\]+")
