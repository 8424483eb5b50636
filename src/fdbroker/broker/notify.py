"""systemd notification (``sd_notify``), without libsystemd: readiness here, the fd store in
:mod:`fdbroker.broker.survival.fdstore`.

The protocol: one datagram with ``KEY=VALUE`` lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``) sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a leading ``@`` means the abstract namespace
(:func:`notify_address`, the one place that reads the variable).

Descriptor ownership: :func:`sd_notify` opens and closes its own socket; no descriptor outlives the call.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address (a leading ``@`` is the abstract namespace), or None when it is
    unset or empty."""
    target = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not target:
        return None
    return b"\0" + target[1:].encode() if target.startswith("@") else target


def sd_notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Sends ``state`` (e.g. ``"READY=1"``) to ``$NOTIFY_SOCKET``.

    Returns True if the datagram was sent, False if ``NOTIFY_SOCKET`` is unset or empty, or the send failed
    (missing socket, refused, too large): the caller may log that, but readiness notification never stops a
    broker, so this never raises ``OSError``. Opens and closes its own socket: no descriptor outlives the
    call.
    """
    address = notify_address(environ)
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError:
        return False
    return True
