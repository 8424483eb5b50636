"""The keeper: crash survival without systemd (``fdbroker serve --keeper``).

A small parent process that runs the broker as its child and keeps a copy of every stored entry, so a broker
that crashes, is OOM-killed or is ``kill -9``-ed comes back with every entry. It is deliberately tiny: no gRPC,
no protobuf, no policy, no registry — the standard library and :mod:`fdbroker.broker.closer` only — so it is far
less likely to die than the broker it keeps.

It speaks the subset of systemd's service-manager protocol that the broker's fd-store code already uses
(:mod:`fdbroker.broker.survival.fdstore`), so one mechanism serves both and is tested twice:

* The channel: for each broker it starts, the keeper makes a connected ``AF_UNIX``/``SOCK_DGRAM`` socket pair.
  The broker inherits one end (``FDBROKER_KEEPER_NOTIFY=<fd>``); the keeper's end is also bound to a random
  abstract name, given as ``NOTIFY_SOCKET`` for the eye (``/proc/net/unix``, logs). A datagram socket that is
  connected accepts datagrams from its peer only (the kernel answers anyone else ``EPERM``), so no other process —
  not another user, not root with forged ``SCM_CREDENTIALS`` — can store, remove or inject anything; only a
  process that holds the broker's end (the broker) can. Each datagram's ``SCM_CREDENTIALS`` must still name the
  broker's pid and the keeper's uid. The pair also escapes ``net.unix.max_dgram_qlen``, which a connected peer
  does not count against, so a burst of puts never waits on a short queue.
* ``FDSTORE=1`` + ``FDNAME=<name>`` + descriptors: kept under the name, with ``X_FDBROKER_ENTRY=<base64>``
  (the broker's serialized entry; systemd would ignore the key) kept beside each. ``FDSTOREREMOVE=1`` +
  ``FDNAME``: every descriptor of the name is given up. ``FDNAME`` + ``X_FDBROKER_ENTRY`` without ``FDSTORE``:
  the metadata kept with the name is replaced (a lease granted or released changes an entry without a new
  descriptor). ``READY=1``, ``STATUS=``, ``STOPPING=1`` are recorded.
* When the broker starts again, the kept descriptors are passed as fds 3.. with ``LISTEN_FDS``, ``LISTEN_PID``
  and ``LISTEN_FDNAMES`` (omitted when the names would not fit in one environment string), then
  ``FDBROKER_KEEPER_STATE=<fd>`` (fd 3 + LISTEN_FDS): a sealed memfd with one line ``NAME<TAB>META`` per fd
  3.., after a ``fdbroker-keeper-state 1`` header; then the channel (fd 4 + LISTEN_FDS).
  ``FDBROKER_KEEPER_RESTARTS`` and ``FDBROKER_KEEPER_LAST_EXIT`` say how often and why (``fdbroker status``).

Process rules (safe as a container's PID 1):

* stdio is opened on ``/dev/null`` where it is closed; every child is reaped, the broker and any orphan;
* the broker's ``oom_score_adj`` is the keeper's + 100, so the OOM killer picks the broker (which comes back)
  rather than the keeper (whose death loses every entry);
* SIGTERM, SIGINT, SIGQUIT (stop) and SIGHUP (reload) are forwarded to the broker; after a stop request the
  keeper exits with the broker's status once it ends; SIGUSR2 restarts the broker at once with every entry (an
  upgrade in place: install the new version, then ``kill -USR2`` the keeper);
* a broker that exits with status 0 on its own (SIGTERM sent to it directly, or a completed ``--takeover`` by a
  successor) ends the keeper too, with status 0;
* any other exit is a crash: the broker is started again at once the first time, then after a back-off
  (:data:`FIRST_DELAY` doubling to :data:`MAX_DELAY`), which starts over once a broker stayed up
  :data:`HEALTHY_AFTER` seconds after its ``READY=1``; a broker that exits 2 (usage) or 127 (cannot be
  executed) before it was ready is not restarted: the keeper exits with that status;
* a stop request while no broker runs (during a back-off) ends the keeper at once, status 128 + the signal.

The keeper forks while the closer's threads may exist; that is safe here because the forking thread holds the
GIL, so no other thread is inside the interpreter or the allocator, and the closer's threads only ever block in
``close(2)`` or on their own condition variable, which the child never touches. The child runs only
``dup2``/``fcntl``/``close`` and ``execve``.

Descriptor ownership: a received descriptor belongs to the keeper until a ``FDSTOREREMOVE`` (then it goes to
the closer: a descriptor's last close may block, and the keeper must never block) or the keeper's exit. A new
broker gets copies through ``execve``; the keeper keeps its own.
"""

from __future__ import annotations

import array
import binascii
import contextlib
import fcntl
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
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from fdbroker.broker import closer

log = logging.getLogger("fdbroker.keeper")

FIRST_DELAY = 0.1
MAX_DELAY = 30.0
HEALTHY_AFTER = 10.0
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RESTART = signal.SIGUSR2
FATAL_BEFORE_READY = (2, 127)  # usage error, cannot exec: restarting does not help
OOM_SCORE_BONUS = 100

STATE_ENV = "FDBROKER_KEEPER_STATE"
NOTIFY_ENV = "FDBROKER_KEEPER_NOTIFY"
RESTARTS_ENV = "FDBROKER_KEEPER_RESTARTS"
LAST_EXIT_ENV = "FDBROKER_KEEPER_LAST_EXIT"
META_KEY = "X_FDBROKER_ENTRY"
STATE_HEADER = b"fdbroker-keeper-state 1\n"
MAX_MESSAGE = 256 * 1024
"""The largest datagram the keeper accepts; a broker keeps its messages below it (an entry with 32 labels of
the longest kind is about 14 KiB in base64)."""
MAX_ENV_STRING = 120 * 1024  # the kernel refuses one environment string over 128 KiB (MAX_ARG_STRLEN)
_MAX_FDS_PER_MESSAGE = 253
_CRED = struct.Struct("3i")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


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

    def count(self) -> int:
        """Descriptors kept."""
        return sum(len(v) for v in self.kept.values())


def describe_exit(status: int) -> str:
    """``waitpid`` status in words: "exited with status 3", "killed by SIGKILL"."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return f"killed by {name}" + (" (core dumped)" if os.WCOREDUMP(status) else "")
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


def exit_code(status: int) -> int:
    """A ``waitpid`` status as a process exit code: the status, or 128 + the signal."""
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


class _Channel:
    """The notify channel to one broker: the keeper's end (bound, connected) and the broker's (until it is
    passed on). Owns both sockets."""

    def __init__(self) -> None:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self.name = "@fdbroker-keeper-" + secrets.token_hex(8)
            mine.bind(b"\0" + self.name[1:].encode())
            mine.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            mine.setblocking(False)
            with contextlib.suppress(OSError):  # more room for a burst of puts (capped by wmem_max)
                theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        except BaseException:
            mine.close()
            theirs.close()
            raise
        self.sock = mine
        self.theirs: socket.socket | None = theirs
        self.pid = 0  # the broker at the other end, once forked

    def give_away(self) -> None:
        """The broker has its copy of our peer (forked): close ours, so only the broker can send."""
        if self.theirs is not None:
            self.theirs.close()
            self.theirs = None

    def close(self) -> None:
        self.give_away()
        self.sock.close()


class Keeper:
    """Runs ``argv`` as the broker, keeps its stored descriptors, restarts it after a crash.

    ``once``: arguments of ``argv`` for the first broker only, dropped once one became ready (``--takeover``: a
    broker the keeper restarts has nothing to take over, the keeper holds the entries).
    """

    def __init__(
        self, argv: Sequence[str], *, once: Sequence[str] = (), environ: Mapping[str, str] | None = None
    ) -> None:
        self.argv = list(argv)
        self._once = set(once)
        self.environ = dict(os.environ if environ is None else environ)
        self.state = KeeperState()
        self.child = 0
        self.ready_at = 0.0
        self.stopping: int | None = None  # the signal that asked us to stop
        self.restart_requested = False
        self._failures = 0
        self._start_at = 0.0
        self._oom_before: int | None = None
        self._channel: _Channel | None = None
        self._buf = bytearray(MAX_MESSAGE)
        self._sel = selectors.DefaultSelector()
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._sig_r, selectors.EVENT_READ, None)

    # -- the loop ------------------------------------------------------------------------------------------------

    def run(self) -> int:
        """Keep a broker running until it stops on purpose; return the exit code for the keeper's process."""
        _ensure_stdio()
        _raise_nofile()
        old_wakeup = signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        handled = (*FORWARDED, RESTART, signal.SIGCHLD)
        handlers = {sig: signal.signal(sig, _noop) for sig in handled}
        try:
            return self._loop()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, h in handlers.items():
                signal.signal(sig, h)
            self._close_channel()

    def _loop(self) -> int:
        while True:
            if self.child == 0:
                if self.stopping is not None:
                    log.info("stopped by %s while no broker ran", signal.Signals(self.stopping).name)
                    return 128 + self.stopping
                wait = self._start_at - time.monotonic()
                if wait > 0 and not self.restart_requested:
                    self._poll(wait)
                    self._reap()  # orphans may exit while we wait
                    continue
                self.restart_requested = False
                if not self._start():
                    self._back_off("could not be started")
                    continue
            self._poll(None)
            status = self._reap()
            if status is None:
                continue
            self._drain()
            self._close_channel()
            code = self._ended(status)
            if code is not None:
                return code

    def _ended(self, status: int) -> int | None:
        """The broker exited with ``status``: the keeper's exit code, or None to start it again."""
        reason = describe_exit(status)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and self._oom_killed():
            reason += " (out of memory)"
        if self.stopping is not None:
            log.info("broker %s after a stop request; keeper exits", reason)
            return exit_code(status)
        if self.restart_requested:
            self.state.restarts += 1
            self.state.last_exit = f"restarted on request ({reason})"
            self._failures = 0
            self._start_at = 0.0
            log.info(
                "broker %s; restarting it as asked with %d kept descriptor(s)", reason, self.state.count()
            )
            return None
        if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            log.info("broker %s on its own (stopped, or handed over to a successor); keeper exits", reason)
            return 0
        if not self.state.ready and os.WIFEXITED(status) and os.WEXITSTATUS(status) in FATAL_BEFORE_READY:
            log.error("broker %s before it was ready; restarting would not help, keeper exits", reason)
            return os.WEXITSTATUS(status)
        self.state.restarts += 1
        self.state.last_exit = reason
        healthy = self.ready_at > 0 and time.monotonic() - self.ready_at >= HEALTHY_AFTER
        if healthy:
            self._failures = 0
        self._back_off(reason)
        return None

    def _back_off(self, reason: str) -> None:
        self._failures += 1
        doublings = min(self._failures - 2, 30)  # 0.1 s * 2**30 is far past MAX_DELAY already
        delay = 0.0 if self._failures == 1 else min(MAX_DELAY, FIRST_DELAY * 2**doublings)
        self._start_at = time.monotonic() + delay
        log.warning(
            "broker %s; restart %d in %.1fs with %d kept descriptor(s)",
            reason,
            self.state.restarts,
            delay,
            self.state.count(),
        )

    def _poll(self, timeout: float | None) -> None:
        for key, _ in self._sel.select(timeout):
            if key.fileobj == self._sig_r:
                self._signals()
            else:
                self._drain()

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
            elif sig == RESTART:
                self.restart_requested = True
                sig = signal.SIGTERM  # a clean stop; _ended starts the next broker at once
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

    def _oom_killed(self) -> bool:
        after = _oom_kills()
        return self._oom_before is not None and after is not None and after > self._oom_before

    # -- starting the broker -------------------------------------------------------------------------------------

    def _start(self) -> bool:
        """Start a broker with every kept descriptor; False (logged) if the system refused."""
        entries = [k for kept in self.state.kept.values() for k in kept]
        state_fd = -1
        try:
            channel = self._channel = _Channel()
            self._sel.register(channel.sock, selectors.EVENT_READ, None)
            state_fd = _state_memfd(entries)
            assert channel.theirs is not None
            env = self._child_env(entries, channel.name)
            self._oom_before = _oom_kills()
            pid = os.fork()
        except OSError as err:
            log.error("cannot start the broker: %s", err)
            if state_fd >= 0:
                os.close(state_fd)
            self._close_channel()
            return False
        if pid == 0:  # the child: see the module docstring for why this is safe after a fork
            _child_exec(self.argv, env, [k.fd for k in entries], state_fd, channel.theirs.fileno())
        os.close(state_fd)
        channel.give_away()
        channel.pid = self.child = pid
        self.ready_at = 0.0
        self.state.ready = False
        log.info("broker started (pid %d) with %d kept descriptor(s)", pid, len(entries))
        return True

    def _child_env(self, entries: list[Kept], notify_name: str) -> dict[str, str]:
        env = dict(self.environ)
        for k in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", STATE_ENV, NOTIFY_ENV):
            env.pop(k, None)
        env["NOTIFY_SOCKET"] = notify_name
        env[RESTARTS_ENV] = str(self.state.restarts)
        env[LAST_EXIT_ENV] = self.state.last_exit
        n = len(entries)
        env["LISTEN_FDS"] = str(n)
        names = ":".join(k.name for k in entries)
        if names and len(names) <= MAX_ENV_STRING:
            env["LISTEN_FDNAMES"] = names
        env[STATE_ENV] = str(3 + n)
        env[NOTIFY_ENV] = str(4 + n)
        return env  # LISTEN_PID is the child's own pid: set after the fork

    def _close_channel(self) -> None:
        if self._channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(self._channel.sock)
            self._channel.close()
            self._channel = None

    # -- the notify channel --------------------------------------------------------------------------------------

    def _drain(self) -> None:
        """Read every queued datagram (also after the broker died: what it sent before dying counts)."""
        if self._channel is None:
            return
        sock = self._channel.sock
        sender = self._channel.pid
        cmsg_space = socket.CMSG_SPACE(_MAX_FDS_PER_MESSAGE * 4) + socket.CMSG_SPACE(_CRED.size)
        while True:
            try:
                n, anc, flags, _ = sock.recvmsg_into([self._buf], cmsg_space, socket.MSG_CMSG_CLOEXEC)
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
            if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC) or pid != sender or uid != os.geteuid():
                closer.discard(fds)
                log.warning(
                    "notify socket: dropped a datagram (%d bytes, %d descriptors, sender pid %d uid %d, "
                    "flags %#x)",
                    n,
                    len(fds),
                    pid,
                    uid,
                    flags,
                )
                continue
            self._message(self._buf[:n].decode("ascii", errors="replace"), fds)

    def _message(self, text: str, fds: list[int]) -> None:
        """Apply one datagram (systemd's rules: FDSTOREREMOVE wins over FDSTORE). Takes ``fds``."""
        fields: dict[str, str] = {}
        for line in text.split("\n"):
            key, sep, value = line.partition("=")
            if sep:
                fields[key] = value
        name = fields.get("FDNAME", "stored")
        meta = fields.get(META_KEY)
        if fields.get("FDSTOREREMOVE") == "1":
            closer.discard([k.fd for k in self.state.kept.pop(name, [])])
        elif fields.get("FDSTORE") == "1" and fds:
            if _valid_fdname(name):
                self.state.kept.setdefault(name, []).extend(Kept(name, fd, meta or "") for fd in fds)
                fds = []
            else:
                log.warning(
                    "notify socket: FDSTORE with an invalid FDNAME %r; descriptors closed", name[:300]
                )
        elif meta is not None and "FDNAME" in fields:
            for k in self.state.kept.get(name, ()):
                k.meta = meta
        closer.discard(fds)  # descriptors on any other message are not for us
        if fields.get("READY") == "1":
            self.state.ready = True
            self.ready_at = time.monotonic()
            if self._once:
                self.argv = [a for a in self.argv if a not in self._once]
                self._once = set()
        if "STATUS" in fields:
            self.state.status = fields["STATUS"]
        self._relay(fields)

    def _relay(self, fields: dict[str, str]) -> None:
        """Pass the broker's state changes on to the keeper's own service manager, if it has one (podman
        --sdnotify, a supervisor, a test): the keeper is the service's main process, so READY=1 is its to say.
        The fd-store messages stay here: keeping descriptors is what the keeper is for."""
        target = self.environ.get("NOTIFY_SOCKET", "")
        if not target:
            return
        lines = [f"{k}={fields[k]}" for k in _RELAYED if k in fields]
        if not lines:
            return
        address: str | bytes = b"\0" + target[1:].encode() if target.startswith("@") else target
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode(), address)
        except OSError as err:
            log.debug("relaying %s to NOTIFY_SOCKET failed: %s", lines, err)


# What a broker tells its service manager that the keeper's own manager should hear too.
_RELAYED = ("READY", "RELOADING", "MONOTONIC_USEC", "STOPPING", "STATUS", "ERRNO")


def _noop(*_: object) -> None:
    """The handler of every signal the keeper waits for (the wakeup descriptor tells the loop)."""


def _valid_fdname(name: str) -> bool:
    """systemd's ``fdname_is_valid``: 1-255 printable ASCII characters, no ``:``."""
    return 0 < len(name) <= 255 and all(" " <= c <= "~" and c != ":" for c in name)


def _ensure_stdio() -> None:
    """Open /dev/null on any of 0, 1, 2 that is closed, so no kept descriptor lands there."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)


def _raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _oom_kills() -> int | None:
    """The OOM kills counted in this process's memory cgroup (cgroup v2 ``memory.events``, which counts the
    cgroups below too, or v1 ``memory.oom_control``), or None where neither can be read."""
    v2 = v1 = None
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0":
                    v2 = path
                elif "memory" in controllers.split(","):
                    v1 = path
    except (OSError, ValueError):
        return None
    files = []
    if v2 is not None:
        files.append(f"/sys/fs/cgroup{v2.rstrip('/')}/memory.events")
    if v1 is not None:
        files.append(f"/sys/fs/cgroup/memory{v1.rstrip('/')}/memory.oom_control")
    for name in files:
        try:
            with open(name) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def _state_memfd(entries: list[Kept]) -> int:
    """A sealed memfd with the header and ``NAME<TAB>META`` for fds 3.. in order (the caller owns it)."""
    fd = os.memfd_create("fdbroker-keeper-state", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        data = STATE_HEADER + "".join(f"{k.name}\t{k.meta}\n" for k in entries).encode("ascii", "replace")
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _child_exec(argv: list[str], env: dict[str, str], fds: list[int], state_fd: int, notify_fd: int) -> None:
    """In the forked child: move ``fds`` to 3.., the state memfd and the channel right after them, exec ``argv``.
    Never returns: on any failure it says why on stderr and exits 127.

    Moves in place (a spare descriptor only for a source that sits on a later target), never by lifting every
    descriptor above the range first: a keeper holding 19,900 descriptors under a 20,000 limit has no room for a
    second copy of each. Each source outside the range is closed once placed, so the table never grows by more
    than the spares in use.
    """
    try:
        signal.set_wakeup_fd(-1)
        for sig in (*FORWARDED, RESTART, signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
            signal.signal(sig, signal.SIG_DFL)
        sources = [*fds, state_fd, notify_fd]
        n = len(sources)
        end = 3 + n
        pending = {fd: i for i, fd in enumerate(sources)}
        for i in range(n):
            target = 3 + i
            src = sources[i]
            del pending[src]
            if src == target:
                os.set_inheritable(target, True)
                continue
            j = pending.get(target)
            if (
                j is not None
            ):  # the target holds a descriptor still to be placed: move that one out of the way
                spare = fcntl.fcntl(target, fcntl.F_DUPFD_CLOEXEC, end)
                sources[j] = spare
                del pending[target]
                pending[spare] = j
            os.dup2(src, target, inheritable=True)
            if src >= end:
                os.close(src)
        os.closerange(end, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        _prefer_as_oom_victim()
        env["LISTEN_PID"] = str(os.getpid())
        os.execvpe(argv[0], argv, env)
    except BaseException as err:  # the child must never return into the keeper's loop
        with contextlib.suppress(BaseException):
            os.write(2, f"fdbroker keeper: cannot run {argv[0] if argv else '?'}: {err}\n".encode())
    os._exit(127)


def _prefer_as_oom_victim() -> None:
    """Raise this (the broker's) ``oom_score_adj`` by :data:`OOM_SCORE_BONUS` over the keeper's: when memory runs
    out, the OOM killer takes the broker, which comes back with every entry, and not the keeper, whose death loses
    them. (Raising is allowed without privilege; the keeper is smaller anyway.)"""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/oom_score_adj", "r+") as f:
        adj = min(1000, int(f.read()) + OOM_SCORE_BONUS)
        f.seek(0)
        f.write(str(adj))


# -- the broker's side -------------------------------------------------------------------------------------------


class Record(NamedTuple):
    """What the keeper passed for one descriptor: its name and the metadata kept with it (base64, may be "")."""

    name: str
    meta: str


@dataclass(frozen=True)
class Facts:
    """What a broker knows about the keeper that started it (``fdbroker status``)."""

    pid: int
    restarts: int
    last_exit: str


def facts(environ: MutableMapping[str, str] | None = None) -> Facts | None:
    """In a broker the keeper started: the keeper's pid (our parent), restart count and last exit reason; None
    without a keeper. Removes the variables."""
    env = os.environ if environ is None else environ
    raw = env.pop(RESTARTS_ENV, None)
    last = env.pop(LAST_EXIT_ENV, "")
    if raw is None:
        return None
    try:
        restarts = max(0, int(raw))
    except ValueError:
        restarts = 0
    return Facts(pid=os.getppid(), restarts=restarts, last_exit=last[:1000])


def read_state(environ: MutableMapping[str, str] | None = None) -> list[Record] | None:
    """In a broker the keeper started: the records for fds 3.. in order, or None when not run by a keeper (or the
    state is unreadable, logged). Accepts only a sealed memfd; closes it and removes the variable."""
    env = os.environ if environ is None else environ
    raw = env.pop(STATE_ENV, "")
    if not raw:
        return None
    try:
        fd = int(raw)
        if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & _SEALS != _SEALS:
            raise ValueError("not a sealed memfd")
    except (OSError, ValueError) as err:
        log.error("%s=%s is not the keeper's state (%s); ignored", STATE_ENV, raw, err)
        return None
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    except OSError as err:
        log.error("keeper state unreadable (%s); restored entries get default metadata", err)
        return None
    finally:
        os.close(fd)
    if not data.startswith(STATE_HEADER):
        log.error("keeper state in an unknown format; restored entries get default metadata")
        return None
    lines = data[len(STATE_HEADER) :].decode("ascii", errors="replace").splitlines()
    return [Record(*line.partition("\t")[::2]) for line in lines]


def decode_meta(meta: str) -> bytes:
    """The serialized entry a broker attached to ``FDSTORE`` (b"" if none or garbled)."""
    try:
        return binascii.a2b_base64(meta, strict_mode=True) if meta else b""
    except (binascii.Error, ValueError):
        return b""


def main(argv: Sequence[str], *, once: Sequence[str] = ()) -> int:
    """Run ``argv`` under a keeper (``fdbroker serve --keeper`` runs the same serve command without
    ``--keeper``, with ``--fdstore``; ``once``: see :class:`Keeper`)."""
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s fdbroker-keeper[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    return Keeper(argv, once=once).run()
