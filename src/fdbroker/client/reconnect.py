"""When a call is tried again after the broker went away, and for how long — the policy, without I/O.

The broker goes away for a moment when it is replaced (``serve --takeover``) or restarted (``serve --keeper``,
systemd's fd store): its sessions end, its conduit connections close, its gRPC server stops, and the successor
knows none of the old session ids. The flows (:mod:`fdbroker.client.flows`) decide per verb what is safe to try
again; this module says which errors mean "the broker went away" (:func:`gone`), how long a call may keep
trying (:class:`Budget`: the client's timeout from the moment the call began) and how long to pause between
tries (a doubling back-off with jitter). docs/client.md, "Reconnecting", is the reference.
"""

from __future__ import annotations

import random
import time
from collections.abc import Container

from fdbroker.errors import (
    Aborted,
    BrokerError,
    Cancelled,
    OutcomeUnknown,
    Unauthenticated,
    Unavailable,
    UntrustedBroker,
)

FIRST_PAUSE = 0.01
"""Seconds before the first try again; doubled after each (with jitter: 50-100 % of it)."""

MAX_PAUSE = 0.2
"""The longest pause between two tries."""

CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 200),
)
"""gRPC channel options of both clients: try to reconnect to a replaced or restarted broker's ``control.sock``
every 50 to 200 ms, not gRPC's default of 1 s growing to 120 s (connecting to a Unix socket costs next to
nothing). Not ``grpc.min_reconnect_backoff_ms``: gRPC takes it as the least time a connection attempt is given
(default 20 s), and a broker busy for longer than that would be reported as gone."""


class Budget:
    """One call's time to try again in: ``seconds`` from now (the client's timeout, plus a lease's ``wait``).
    ``enabled`` False (``Client(reconnect=False)``): no try again at all."""

    def __init__(self, seconds: float, enabled: bool) -> None:
        self.deadline = time.monotonic() + seconds
        self.enabled = enabled
        self.tries = 0

    def left(self) -> float:
        """Seconds left before the deadline (negative once past it)."""
        return self.deadline - time.monotonic()

    def pause(self) -> float | None:
        """How long to wait before the next try, or None when there is no time left for one (or retrying is
        off). Counts the try."""
        left = self.left()
        if not self.enabled or left < 0.01:
            return None
        pause = min(MAX_PAUSE, FIRST_PAUSE * (1 << min(self.tries, 16))) * random.uniform(0.5, 1.0)
        self.tries += 1
        return min(pause, left / 2)


def gone(
    err: BaseException, *, as_session: str | None, lost: Container[str], closed: bool, reached: bool = True
) -> bool:
    """Whether ``err``, raised by a call made as session ``as_session`` (None: anonymously), says the broker went
    away — not that it refused something:

    * ``Unavailable``: nothing accepts connections on the run directory's sockets, or the connection broke — once
      a broker's control plane has answered this client (``reached``; before that, no broker is no broker: said
      at once);
    * ``Cancelled`` while this client is open: the broker stopped with the call in flight;
    * ``Unauthenticated`` for a call that carried a session id: the broker does not know the session — a
      successor, or a restart (an anonymous call refused by the policy is a refusal; so is
      ``UntrustedBroker``, the client's own refusal of whatever now serves the run directory);
    * ``Aborted`` on a session whose conduit closed or broke (``lost``: the ids of such sessions).
    """
    if isinstance(err, OutcomeUnknown | UntrustedBroker) or not isinstance(err, BrokerError):
        return False
    if isinstance(err, Unavailable):
        return reached
    if isinstance(err, Cancelled):
        return not closed
    if isinstance(err, Unauthenticated):
        return as_session is not None
    if isinstance(err, Aborted):
        return as_session is not None and as_session in lost
    return False
