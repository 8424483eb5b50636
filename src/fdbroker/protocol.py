"""Wire constants both sides of fdbroker agree on, defined once.

The broker (``fdbroker.broker``) and the clients (``fdbroker.client``, the CLI) import these; neither defines
its own copy. What a message looks like is in ``proto/fdbroker/v1/``; what is not in a message — metadata keys,
the lease-wait margin both sides compute the same way — is here.
"""

from __future__ import annotations

SESSION_METADATA_KEY = "fdbroker-session"
"""gRPC metadata key carrying the session id from the conduit's ``Welcome`` on every call of that session."""

OLDEST_REVISION_KEY = "fdbroker-oldest-revision"
"""Trailing metadata key of a Watch answered OUT_OF_RANGE: the oldest revision a watch can start from now."""

LEASE_WAIT_MARGIN = 0.5
"""Seconds a waiting Lease keeps between giving up and the RPC deadline (see :func:`lease_wait_reserve`); a
client adds it to the wait it asks for when it sets the deadline."""


def lease_wait_reserve(remaining: float) -> float:
    """How long before an RPC deadline a lease wait gives up: :data:`LEASE_WAIT_MARGIN`, or a quarter of the time
    left if that is less. The broker stops queueing then, so DEADLINE_EXCEEDED reaches the caller as the broker's
    answer (naming the holders) and never races a grant the caller would not see."""
    return min(LEASE_WAIT_MARGIN, remaining / 4)
