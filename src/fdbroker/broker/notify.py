"""systemd notification (``sd_notify``), without libsystemd: readiness here, the fd store in
:mod:`fdbroker.broker.survival.fdstore`.

The protocol: one datagram with ``KEY=VALUE`` lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``) sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a leading ``@`` means the abstract namespace
(:func:`notify_address`, the one place that reads the variable). Under the keeper (``serve --keeper``) the same
datagrams go over the socket the keeper passed as ``FDBROKER_KEEPER_NOTIFY=<fd>``, already connected to the
keeper (which accepts datagrams from that peer only): :func:`notifier` picks the channel once per process.

Descriptor ownership: a :class:`Notifier` owns its socket (:meth:`Notifier.close`), except the keeper's channel,
which the process keeps open for its whole life (made close-on-exec when it is taken over); descriptors passed
to :meth:`Notifier.send` stay the caller's (the kernel sends copies).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from array import array
from collections.abc import Mapping, Sequence

from fdbroker.broker.survival.keeper import NOTIFY_ENV

log = logging.getLogger("fdbroker.notify")

SEND_TIMEOUT = 2.0
"""How long a send may wait for room at a slow service manager before it fails (and is logged)."""


def notify_address(environ: Mapping[str, str] | None = None) -> str | bytes | None:
    """``$NOTIFY_SOCKET`` as a socket address (a leading ``@`` is the abstract namespace), or None when it is
    unset or empty."""
    target = (os.environ if environ is None else environ).get("NOTIFY_SOCKET", "")
    if not target:
        return None
    return b"\0" + target[1:].encode() if target.startswith("@") else target


class Notifier:
    """Where this process's notifications go: ``address`` (systemd's ``$NOTIFY_SOCKET``) through ``sock``, or,
    with ``address`` None, the keeper at the other end of the connected ``sock``. Close it when done (the
    keeper's channel is shared by the whole process and stays open)."""

    def __init__(self, sock: socket.socket, address: str | bytes | None, *, shared: bool = False) -> None:
        self.sock = sock
        self.address = address
        self._shared = shared
        sock.settimeout(SEND_TIMEOUT)

    @property
    def keeper(self) -> bool:
        """Whether a keeper (``serve --keeper``) listens, rather than systemd: it keeps entry metadata too."""
        return self.address is None

    def send(self, state: str, fds: Sequence[int] = ()) -> None:
        """Send one datagram with ``fds`` attached (copies; they stay the caller's). Raises ``OSError``."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        if self.address is None:
            self.sock.sendmsg([state.encode()], anc)
        else:
            self.sock.sendmsg([state.encode()], anc, 0, self.address)

    def close(self) -> None:
        """Close the socket, unless it is the process's keeper channel."""
        if not self._shared:
            self.sock.close()


_UNSET = object()
_keeper: object = _UNSET


def keeper_channel() -> Notifier | None:
    """The keeper's channel when a keeper started this process (``FDBROKER_KEEPER_NOTIFY``, consumed at the first
    call), else None."""
    global _keeper
    if _keeper is _UNSET:
        raw = os.environ.pop(NOTIFY_ENV, "")
        sock = _keeper_socket(raw) if raw else None
        _keeper = Notifier(sock, None, shared=True) if sock is not None else None
    return _keeper if isinstance(_keeper, Notifier) else None


def notifier() -> Notifier | None:
    """Where to notify now: the keeper's channel if a keeper started this process, else a new socket for
    ``$NOTIFY_SOCKET`` (the caller closes it), else None."""
    channel = keeper_channel()
    if channel is not None:
        return channel
    address = notify_address()
    if address is None:
        return None
    return Notifier(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC), address)


def _keeper_socket(raw: str) -> socket.socket | None:
    """The keeper's end as a socket, if ``raw`` names a connected AF_UNIX datagram socket; else None (logged)."""
    try:
        fd = int(raw)
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            raise ValueError("not a socket")
        sock = socket.socket(fileno=fd)
    except (OSError, ValueError) as err:
        log.error("%s=%s is not the keeper's socket (%s); ignored", NOTIFY_ENV, raw, err)
        return None
    try:
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM:
            raise ValueError("not an AF_UNIX datagram socket")
        sock.getpeername()  # connected, or OSError
    except (OSError, ValueError) as err:
        sock.detach()  # not ours to close: whatever it is, it came from our parent
        log.error("%s=%s is not the keeper's socket (%s); ignored", NOTIFY_ENV, raw, err)
        return None
    sock.set_inheritable(False)
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock


def sd_notify(state: str, *, environ: Mapping[str, str] | None = None) -> bool:
    """Sends ``state`` (e.g. ``"READY=1"``) to the service manager: the keeper, or ``$NOTIFY_SOCKET``
    (``environ``'s, if given).

    Returns True if the datagram was sent, False if there is nowhere to send it or the send failed (missing
    socket, refused, too large): the caller may log that, but readiness notification never stops a broker, so
    this never raises ``OSError``.
    """
    if environ is None:
        n = notifier()
    else:
        address = notify_address(environ)
        n = None if address is None else Notifier(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM), address)
    if n is None:
        return False
    try:
        n.send(state)
    except OSError:
        return False
    finally:
        n.close()
    return True
