"""systemd readiness notification (``sd_notify``), without libsystemd.

The protocol: one datagram with ``KEY=VALUE`` lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``) sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a leading ``@`` means the abstract namespace.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def sd_notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Sends ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``.

    Returns True if the datagram was sent, False if ``NOTIFY_SOCKET`` is unset or empty, or the send failed
    (missing socket, refused, too large): the caller may log that, but readiness notification never stops a
    broker, so this never raises ``OSError``. Opens and closes its own socket: no descriptor outlives the
    call.
    """
    env = os.environ if environ is None else environ
    target = env.get("NOTIFY_SOCKET", "")
    if not target:
        return False
    address: str | bytes = target
    if target.startswith("@"):
        address = b"\0" + target[1:].encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True
