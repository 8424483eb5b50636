"""The keeper: crash survival without systemd (``fdbroker serve --keeper``).

A small parent process that runs the broker as its child and keeps a copy of every stored entry, so a broker
that crashes, is OOM-killed or is ``kill -9``-ed comes back with every entry. It is deliberately tiny: no gRPC,
no policy, no registry — the standard library and :mod:`fdbroker.broker.closer` only — so it is far less likely to die
than the broker it keeps.

It speaks the subset of systemd's service-manager protocol that the broker's fd-store code already uses
(:mod:`fdbroker.fdstore`), so one mechanism serves both and is tested twice:

* the child gets ``NOTIFY_SOCKET`` naming the keeper's datagram socket (abstract namespace, a random name; every
  datagram's ``SCM_CREDENTIALS`` must be the current child's pid, so no other process can store or remove
  anything);
* ``FDSTORE=1`` + ``FDNAME=<name>`` + descriptors: kept under the name (``X_FDBROKER_ENTRY=<base64>``, which
  systemd ignores, carries the entry's metadata and is kept with it); ``FDSTOREREMOVE=1`` + ``FDNAME``: every
  descriptor of the name is given up; ``READY=1``, ``STATUS=``, ``STOPPING=1`` are recorded;
* when the broker starts again, the kept descriptors are passed as fds 3.. with ``LISTEN_FDS``, ``LISTEN_PID``
  and ``LISTEN_FDNAMES`` (omitted when the names would not fit in one environment string), plus
  ``FDBROKER_KEEPER_STATE=<fd>``: a sealed memfd holding, for fd 3 + i, its name and metadata as JSON.

Process rules (safe as a container's PID 1): every child is reaped; SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1 and
SIGUSR2 are forwarded to the broker; when the broker exits on its own with status 0 (a stop the keeper asked
for, or a completed handover to a successor) the keeper exits with that status; any other exit is a crash and
the broker is started again after a back-off (:data:`FIRST_DELAY` doubling to :data:`MAX_DELAY`, reset once a
broker stays up :data:`HEALTHY_AFTER` seconds after its ``READY=1``). A stop request during the back-off ends the
keeper at once. The restart count and the last exit reason reach the broker as ``FDBROKER_KEEPER_RESTARTS`` and
``FDBROKER_KEEPER_LAST_EXIT`` (``fdbroker status`` shows them).

Descriptor ownership: a received descriptor belongs to the keeper until a ``FDSTOREREMOVE`` (then it goes to the
closer thread: a descriptor's last close may block) or until it hands it to a new broker (the child gets a copy
through exec; the keeper keeps its own).
"""

from __future__ import annotations

import array
import base64
import contextlib
import json
import logging
import os
import resource
import secrets
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from fdbroker.broker import closer

log = logging.getLogger("fdbroker.keeper")

FIRST_DELAY = 0.1
MAX_DELAY = 30.0
HEALTHY_AFTER = 10.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
STATE_ENV = "FDBROKER_KEEPER_STATE"
RESTARTS_ENV = "FDBROKER_KEEPER_RESTARTS"
LAST_EXIT_ENV = "FDBROKER_KEEPER_LAST_EXIT"
META_KEY = "X_FDBROKER_ENTRY"
MAX_ENV_STRING = 120 * 1024  # the kernel refuses one environment string over 128 KiB (MAX_ARG_STRLEN)
_DGRAM = 64 * 1024
_MAX_FDS_PER_MESSAGE = 253
_CRED = struct.Struct("3i")


@dataclass
class Kept:
    """One stored descriptor and what came with it."""

    name: str
    fd: int
    meta: str = ""  # base64 of the broker's serialized entry, as it sent it


@dataclass
class KeeperState:
    """What the keeper knows; exposed for tests and messages."""

    kept: dict[str, list[Kept]] = field(default_factory=dict)
    restarts: int = 0
    last_exit: str = ""
    status: str = ""
    ready: bool = False


def describe_exit(status: int) -> str:
    """``waitpid`` status in words: "exited with status 3", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Keeper:
    """Runs ``argv`` as the broker, keeps its stored descriptors, restarts it after a crash."""

    def __init__(self, argv: Sequence[str], *, environ: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        self.environ = dict(os.environ if environ is None else environ)
        self.state = KeeperState()
        self.child = 0
        self.sender = 0  # the broker whose datagrams count: the running one, or the one that just died
        self.child_started = 0.0
        self.ready_at = 0.0
        self.stopping: int | None = None  # the signal that asked us to stop
        self._failures = 0
        self._sel = selectors.DefaultSelector()
        self._address = "@fdbroker-keeper-" + secrets.token_hex(8)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(b"\0" + self._address[1:].encode())
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.sock.setblocking(False)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self.sock, selectors.EVENT_READ, "notify")
        self._sel.register(self._sig_r, selectors.EVENT_READ, "signal")

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Keep a broker running until it stops on purpose; return the exit code for the keeper's process."""
        _raise_nofile()
        old_wakeup = signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        handlers = {sig: signal.signal(sig, lambda *_: None) for sig in (*FORWARDED, signal.SIGCHLD)}
        try:
            delay_until = 0.0
            while True:
                if self.child == 0:
                    if self.stopping is not None:
                        return 128 + self.stopping
                    now = time.monotonic()
                    if now < delay_until:
                        self._poll(delay_until - now)
                        continue
                    self._start()
                self._poll(None)
                code = self._reap()
                if code is None:
                    continue
                status = code
                self._drain()
                reason = describe_exit(status)
                if self.stopping is not None or (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
                    log.info("broker %s; keeper exits", reason)
                    return (
                        os.waitstatus_to_exitcode(status)
                        if os.WIFEXITED(status)
                        else 128 + os.WTERMSIG(status)
                    )
                self.state.restarts += 1
                self.state.last_exit = reason
                healthy = self.ready_at and time.monotonic() - self.ready_at >= HEALTHY_AFTER
                self._failures = 1 if healthy else self._failures + 1
                delay = min(MAX_DELAY, FIRST_DELAY * 2 ** (self._failures - 1))
                log.warning(
                    "broker %s; restart %d in %.1fs with %d kept descriptor(s)",
                    reason,
                    self.state.restarts,
                    delay,
                    sum(len(v) for v in self.state.kept.values()),
                )
                delay_until = time.monotonic() + delay
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _poll(self, timeout: float | None) -> None:
        for key, _ in self._sel.select(timeout):
            if key.data == "notify":
                self._drain()
            else:
                self._signals()

    def _signals(self) -> None:
        try:
            data = os.read(self._sig_r, 512)
        except BlockingIOError:
            return
        for sig in data:
            if sig == signal.SIGCHLD:
                continue
            if sig in STOPS:
                self.stopping = sig
            if self.child:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.child, sig)

    def _reap(self) -> int | None:
        """Reap every exited child (PID 1 adopts orphans); the broker's wait status, or None if it still runs."""
        broker_status = None
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            if pid == self.child:
                broker_status = status
                self.child = 0
        return broker_status

    # -- starting the broker -------------------------------------------------------------------------------------

    def _start(self) -> None:
        entries = [k for kept in self.state.kept.values() for k in kept]
        state_fd = _state_memfd(entries)
        env = dict(self.environ)
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", STATE_ENV):
            env.pop(k, None)
        env["NOTIFY_SOCKET"] = self._address
        env[RESTARTS_ENV] = str(self.state.restarts)
        env[LAST_EXIT_ENV] = self.state.last_exit
        names = ":".join(k.name for k in entries)
        self.ready_at = 0.0
        self.state.ready = False
        pid = os.fork()
        if pid == 0:  # the child: only async-signal-safe work until exec (the keeper has no other threads)
            try:
                _child_exec(self.argv, env, [k.fd for k in entries], state_fd, names)
            finally:
                os._exit(127)
        os.close(state_fd)
        self.child = self.sender = pid
        self.child_started = time.monotonic()
        log.info("broker started (pid %d) with %d kept descriptor(s)", pid, len(entries))

    # -- the notify socket ---------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Read every queued datagram (after the broker died too: what it sent before dying still counts)."""
        cmsg_space = socket.CMSG_SPACE(_MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(_CRED.size)
        while True:
            try:
                data, anc, flags, _ = self.sock.recvmsg(_DGRAM, cmsg_space, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                log.error("notify socket: %s", err)
                return
            fds: list[int] = []
            pid = uid = -1
            for level, kind, payload in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(payload[: len(payload) - len(payload) % a.itemsize])
                    fds.extend(a)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid, uid, _ = _CRED.unpack_from(payload)
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or pid != self.sender or uid != os.geteuid():
                closer.discard(fds)
                log.warning("notify socket: dropped a datagram (sender pid %d, flags %#x)", pid, flags)
                continue
            self._message(data.decode(errors="replace"), fds)

    def _message(self, text: str, fds: list[int]) -> None:
        fields: dict[str, str] = {}
        for line in text.split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        name = fields.get("FDNAME", "stored")
        if fields.get("FDSTOREREMOVE") == "1":
            gone = self.state.kept.pop(name, [])
            closer.discard([k.fd for k in gone])
        if fields.get("FDSTORE") == "1" and fds:
            self.state.kept.setdefault(name, []).extend(
                Kept(name, fd, fields.get(META_KEY, "")) for fd in fds
            )
            fds = []
        closer.discard(fds)  # descriptors on any other message are not for us
        if fields.get("READY") == "1":
            self.state.ready = True
            self.ready_at = time.monotonic()
        if "STATUS" in fields:
            self.state.status = fields["STATUS"]


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _state_memfd(entries: list[Kept]) -> int:
    """A sealed memfd with ``[{"name": …, "meta": …}, …]`` for fds 3.. in order (the keeper owns it)."""
    fd = os.memfd_create("fdbroker-keeper-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        data = json.dumps([{"name": k.name, "meta": k.meta} for k in entries], separators=(",", ":")).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        import fcntl

        fcntl.fcntl(
            fd,
            fcntl.F_ADD_SEALS,
            fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL,
        )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _child_exec(argv: list[str], env: dict[str, str], fds: list[int], state_fd: int, names: str) -> None:
    """In the forked child: move ``fds`` to 3.. and the state memfd right after them, set LISTEN_*, exec.

    Moves in place (one spare descriptor at a time), not by lifting every descriptor above the range first: a
    keeper holding 19,900 descriptors under a 20,000 limit has no room for a second copy of each.
    """
    import fcntl

    sources = [*fds, state_fd]
    n = len(sources)
    pending = {fd: i for i, fd in enumerate(sources)}
    for i in range(n):
        target = 3 + i
        src = sources[i]
        del pending[src]
        if src == target:
            continue
        j = pending.get(target)
        if j is not None:  # the target holds a descriptor still to be placed: move that one out of the way
            spare = fcntl.fcntl(target, fcntl.F_DUPFD, 3 + n)
            os.close(target)
            sources[j] = spare
            del pending[target]
            pending[spare] = j
        os.dup2(src, target, inheritable=True)
    os.closerange(3 + n, _fd_ceiling())
    for fd in range(3, 3 + n):
        os.set_inheritable(fd, True)
    env["LISTEN_PID"] = str(os.getpid())
    env["LISTEN_FDS"] = str(len(fds))
    if names and len(names) <= MAX_ENV_STRING:
        env["LISTEN_FDNAMES"] = names
    env[STATE_ENV] = str(3 + len(fds))
    os.execvpe(argv[0], argv, env)


def _fd_ceiling() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def read_state(environ: dict[str, str] | None = None) -> list[dict[str, str]] | None:
    """In a broker the keeper started: the records for fds 3.. (``name``, ``meta``), or None when not run by a
    keeper. Closes the state descriptor and removes the variable."""
    env = os.environ if environ is None else environ
    raw = env.pop(STATE_ENV, "")
    if not raw:
        return None
    try:
        fd = int(raw)
    except ValueError:
        return None
    try:
        with os.fdopen(fd, "rb", closefd=True) as f:
            doc = json.loads(f.read() or b"[]")
    except (OSError, ValueError) as err:
        log.error("keeper state unreadable (%s); restored entries get default metadata", err)
        return None
    if not isinstance(doc, list):
        return None
    return [r for r in doc if isinstance(r, dict)]


def decode_meta(meta: str) -> bytes:
    """The serialized entry a broker attached to ``FDSTORE`` (b"" if none or garbled)."""
    try:
        return base64.b64decode(meta, validate=True) if meta else b""
    except ValueError:
        return b""


def main(argv: Sequence[str]) -> int:
    """Run ``argv`` under a keeper (``fdbroker serve --keeper`` execs the same serve command without
    ``--keeper``, with ``--fdstore``)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s fdbroker-keeper[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return Keeper(argv).run()
