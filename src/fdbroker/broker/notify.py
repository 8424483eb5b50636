"""systemd notification (``sd_notify``), without libsystemd: readiness, reloads, the watchdog and status here
(:class:`Supervision`), the fd store in :mod:`fdbroker.broker.survival.fdstore`.

The protocol: one datagram with ``KEY=VALUE`` lines (``READY=1``, ``STATUS=...``, ``STOPPING=1``) sent to the
``AF_UNIX`` socket named by ``$NOTIFY_SOCKET``; a leading ``@`` means the abstract namespace
(:func:`notify_address`, the one place that reads the variable). Under the keeper (``serve --keeper``) the same
datagrams go over the socket the keeper passed as ``FDBROKER_KEEPER_NOTIFY=<fd>``, already connected to the
keeper (which accepts datagrams from that peer only): :func:`notifier` picks the channel once per process.

What the broker sends, and when (:class:`Supervision`):

* ``READY=1`` + ``MAINPID`` + ``STATUS`` once both sockets accept;
* ``RELOADING=1`` + ``MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>`` when a SIGHUP reload starts, then ``READY=1`` +
  ``STATUS`` when it is done (what ``Type=notify-reload`` waits for, systemd >= 253; older versions accept it
  with ``Type=notify``; the keeper relays both);
* ``WATCHDOG=1`` every half ``$WATCHDOG_USEC`` while that is set (and ``$WATCHDOG_PID``, if set, is this
  process: under the keeper it names the keeper, and the broker sends none), from a timer on the event loop,
  only while the loop is healthy: a tick that comes later than one interval (the loop was blocked), or finds
  the broker's housekeeping dead, sends nothing, so systemd's ``WatchdogSec=`` catches a stuck broker;
* ``STATUS=`` with live counts, at most once a second and only when it changed;
* ``STOPPING=1`` when it stops.

Periodic messages never wait: a service manager that does not read loses them instead of stalling the loop.

Descriptor ownership: a :class:`Notifier` owns its socket (:meth:`Notifier.close`), except the keeper's channel,
which the process keeps open for its whole life (made close-on-exec when it is taken over); descriptors passed
to :meth:`Notifier.send` stay the caller's (the kernel sends copies).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from array import array
from collections.abc import Callable, Mapping, Sequence

from fdbroker.broker.survival.keeper import NOTIFY_ENV

log = logging.getLogger("fdbroker.notify")

SEND_TIMEOUT = 2.0
"""How long a send may wait for room at a slow service manager before it fails (and is logged)."""
STATUS_INTERVAL = 1.0
"""Seconds between looks at the live counts for ``STATUS=``."""


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

    def send(self, state: str, fds: Sequence[int] = (), *, wait: bool = True) -> None:
        """Send one datagram with ``fds`` attached (copies; they stay the caller's). Raises ``OSError``; with
        ``wait`` False, ``BlockingIOError`` at once rather than wait for room."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        if not wait:
            self.sock.settimeout(0)
        try:
            if self.address is None:
                self.sock.sendmsg([state.encode()], anc)
            else:
                self.sock.sendmsg([state.encode()], anc, 0, self.address)
        finally:
            if not wait:
                self.sock.settimeout(SEND_TIMEOUT)

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


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half ``$WATCHDOG_USEC``), or None when the service manager asks
    for none: unset, 0 or malformed, or ``$WATCHDOG_PID`` names another process."""
    env = os.environ if environ is None else environ
    usec = env.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2_000_000


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds (``MONOTONIC_USEC=`` of a reload)."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Supervision:
    """The broker's side of its service manager (systemd, or the keeper), on the running event loop: every
    method is a no-op when there is none.

    ``status()`` returns the ``STATUS=`` text (live counts); ``healthy()`` says whether the broker can still serve
    (a watchdog tick sends nothing otherwise). ``environ``: read instead of the process's (tests).
    """

    def __init__(
        self,
        status: Callable[[], str],
        healthy: Callable[[], bool],
        *,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        if environ is None:
            self._channel = notifier()
        else:
            address = notify_address(environ)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._channel = Notifier(sock, address) if address is not None else None
            if address is None:
                sock.close()
        self.enabled = self._channel is not None
        self.watchdog = watchdog_interval(environ) if self.enabled else None
        self._status = status
        self._healthy = healthy
        self._last_status = ""
        self._timers: list[asyncio.TimerHandle] = []
        self._due = 0.0

    def _send(self, state: str, *, wait: bool = True) -> None:
        if self._channel is not None:
            with contextlib.suppress(OSError):  # notification never stops a broker
                self._channel.send(state, wait=wait)

    def ready(self, *extra: str) -> None:
        """``READY=1`` with the current status (first start or a reload done), and start the timers."""
        self._last_status = self._status()
        self._send("\n".join(["READY=1", *extra, f"STATUS={self._last_status}"]))
        if self.enabled and not self._timers:
            loop = asyncio.get_running_loop()
            self._timers.append(loop.call_later(STATUS_INTERVAL, self._status_tick))
            if self.watchdog is not None:
                self._due = loop.time() + self.watchdog
                self._timers.append(loop.call_at(self._due, self._watchdog_tick))

    def reloading(self, what: str) -> None:
        """A reload starts (``READY=1`` by :meth:`ready` when it is done)."""
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}\nSTATUS={what}")

    def stopping(self) -> None:
        """``STOPPING=1``; no more timers, and the channel is closed (unless it is the keeper's, shared)."""
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self._send("STOPPING=1")
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _status_tick(self) -> None:
        loop = asyncio.get_running_loop()
        self._timers[0] = loop.call_later(STATUS_INTERVAL, self._status_tick)
        text = self._status()
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text}", wait=False)

    def _watchdog_tick(self) -> None:
        assert self.watchdog is not None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late = now - self._due
        self._due = now + self.watchdog
        self._timers[1] = loop.call_at(self._due, self._watchdog_tick)
        if late > self.watchdog:
            log.warning("the event loop ran %.2f s late; no watchdog ping this time", late)
        elif not self._healthy():
            log.error("the broker's housekeeping has stopped; no watchdog ping (systemd will act on it)")
        else:
            self._send("WATCHDOG=1", wait=False)
