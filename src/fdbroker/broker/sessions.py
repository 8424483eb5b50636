"""Sessions: one per conduit connection, identified by the kernel (SO_PEERCRED), named by a secret id.

A session lives exactly as long as its conduit connection. Its id (>= 128 bits from :mod:`secrets`) is what a
client sends as gRPC metadata to say "these calls are mine"; the broker evaluates policy against the identity the
kernel gave for the connection, never against anything the client claims.
"""

from __future__ import annotations

import collections
import secrets
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fdbroker.broker.policy import Identity
from fdbroker.errors import ResourceExhausted
from fdbroker.v1 import conduit_pb2 as cpb

SESSION_ID_BYTES = 18  # 144 bits; url-safe base64 gives 24 characters


class FrameSink(Protocol):
    """Where frames for a session go (the broker side of its conduit connection)."""

    def send(self, message: cpb.ConduitFrame, fds: Sequence[int] = ()) -> None: ...

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None: ...

    def close(self) -> None: ...


@dataclass(eq=False)
class Session:
    """A live conduit connection and what hangs off it."""

    id: str
    identity: Identity
    conn: FrameSink
    created: float = field(default_factory=time.time)
    ephemeral: set[str] = field(default_factory=set)
    closed: bool = False
    key: int = -1  # its key in the prefetch table (fastpath), set by the broker when it opens

    def describe(self) -> str:
        i = self.identity
        return f"pid {i.pid} uid {i.uid}"


class SessionTable:
    """Live sessions by id, with a per-uid quota."""

    def __init__(self, *, max_per_uid: int) -> None:
        self.max_per_uid = max_per_uid
        self._by_id: dict[str, Session] = {}
        self._by_identity: dict[int, Session] = {}  # id() of a session's Identity (one object per connection)
        self._per_uid: collections.Counter[int] = collections.Counter()

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._by_id.values()))

    def open(self, identity: Identity, conn: FrameSink) -> Session:
        """Create a session for a new connection; :class:`ResourceExhausted` past the uid's quota."""
        if self._per_uid[identity.uid] >= self.max_per_uid:
            raise ResourceExhausted(
                f"uid {identity.uid} already has {self._per_uid[identity.uid]} sessions, its limit; "
                "close idle clients or raise max_sessions_per_uid in the policy"
            )
        sid = secrets.token_urlsafe(SESSION_ID_BYTES)
        s = Session(id=sid, identity=identity, conn=conn)
        self._by_id[sid] = s
        self._by_identity[id(identity)] = s
        self._per_uid[identity.uid] += 1
        return s

    def per_uid(self) -> dict[int, int]:
        """Live sessions by uid."""
        return dict(self._per_uid)

    def get(self, session_id: str) -> Session | None:
        return self._by_id.get(session_id)

    def of_identity(self, identity: Identity) -> Session | None:
        """The live session whose identity is this very object (each connection's credentials are one object
        the session and every check made for it share), or None."""
        s = self._by_identity.get(id(identity))
        return s if s is not None and s.identity is identity else None

    def close(self, session: Session) -> bool:
        """Forget ``session``; False if it was already gone."""
        if self._by_id.pop(session.id, None) is None:
            return False
        session.closed = True
        self._by_identity.pop(id(session.identity), None)
        self._per_uid[session.identity.uid] -= 1
        if not self._per_uid[session.identity.uid]:
            del self._per_uid[session.identity.uid]
        return True
