"""Crash survival through systemd's file-descriptor store (``sd_pid_notify_with_fds``, ``FDSTORE=1``).

With ``serve --fdstore`` every entry the broker holds is also pushed to the service manager: one datagram to
``$NOTIFY_SOCKET`` with ``FDSTORE=1``, ``FDNAME=<entry name>``, ``FDPOLL=0`` and the descriptor as
``SCM_RIGHTS``; when the entry leaves, ``FDSTOREREMOVE=1`` + ``FDNAME``. A replaced entry is removed, then stored
again. Ephemeral entries are not stored (their session cannot outlive the process). The registry's events drive
it (:meth:`History.subscribe`): nothing in the broker's code paths knows about the store.

When the broker starts again (crash, ``Restart=on-failure``, ``systemctl restart``), systemd passes the stored
descriptors back as fds 3.. with ``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``, and they become entries again;
what an entry is (kind, addresses, path, mode) is read from the descriptor itself. What the store cannot carry —
owner, labels, create time, revisions, expiry — lives in ``fdstore.json`` in the run directory, rewritten
atomically (temp file + rename, mode 0600) at most every :data:`WRITE_INTERVAL` seconds while anything changed.
An entry's record is used only if it describes the same open file (``st_dev``/``st_ino`` recorded at put):
descriptors restored without a matching record get the broker's own identity as owner, no labels, no expiry.

Revisions continue above anything the crashed broker may have handed out: the counter restarts at the recorded
revision + :data:`REVISION_GAP`, and the state is written at once whenever the revision has moved
:data:`FLUSH_EVERY` (half the gap) past the last write. Fencing epochs likewise restart above the recorded
highest epoch + :data:`FLUSH_EVERY` (and follow the clock, as always).

Descriptor ownership: the service manager gets copies (the kernel duplicates each entry's descriptor into it;
the registry keeps its own). Descriptors passed back at start are this process's: each becomes an entry's (the
registry owns it) or is closed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fdbroker import activation, fdinfo
from fdbroker.broker.notify import notify_address
from fdbroker.broker.registry import Owner, Registry
from fdbroker.broker.survival.carry import restore
from fdbroker.conduit import close_fds
from fdbroker.errors import BrokerError
from fdbroker.names import validate_name
from fdbroker.v1 import broker_pb2 as pb

log = logging.getLogger("fdbroker.fdstore")

STATE_FILE = "fdstore.json"
STATE_FORMAT = 1
WRITE_INTERVAL = 0.25
REVISION_GAP = 1 << 20
FLUSH_EVERY = REVISION_GAP // 2
SEND_TIMEOUT = 2.0

_PUT = pb.Event.TYPE_PUT
_GONE = (pb.Event.TYPE_DELETE, pb.Event.TYPE_EXPIRE)


class FdStore:
    """The broker's side of the fd store: restore at start, then mirror every put and removal.

    ``continue_epochs(epoch)`` makes the broker's fencing epochs continue above ``epoch`` (called once, when a
    restore finds a recorded epoch).
    """

    def __init__(
        self,
        registry: Registry,
        run_dir: Path,
        address: str | bytes,
        *,
        continue_epochs: Callable[[int], None],
    ) -> None:
        self.registry = registry
        self._continue_epochs = continue_epochs
        self.state_path = Path(run_dir) / STATE_FILE
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(SEND_TIMEOUT)
        self.stored: set[str] = set()
        self._ino: dict[str, tuple[int, int]] = {}
        self._epoch = 0
        self._written_revision = 0
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: Any = None
        self.failures = 0

    @classmethod
    def open(
        cls, registry: Registry, run_dir: Path, *, continue_epochs: Callable[[int], None]
    ) -> FdStore | None:
        """Restore what the service manager passed, then start mirroring; None (with a warning) without
        ``$NOTIFY_SOCKET``."""
        address = notify_address()
        if address is None:
            log.warning(
                "--fdstore: NOTIFY_SOCKET is not set (not run by systemd?); entries will not survive a crash"
            )
            return None
        store = cls(registry, run_dir, address, continue_epochs=continue_epochs)
        store.restore(activation.listen_fds())
        store.attach()
        return store

    # -- sending -------------------------------------------------------------------------------------------------

    def _send(self, state: str, fd: int = -1) -> bool:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", [fd]))] if fd >= 0 else []
        try:
            self.sock.sendmsg([state.encode()], anc, 0, self.address)
        except OSError as err:
            self.failures += 1
            log.error("fd store: %r not sent to the service manager (%s)", state.replace("\n", " "), err)
            return False
        return True

    def _store(self, name: str, fd: int) -> None:
        if self._send(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", fd):
            self.stored.add(name)
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                self._ino[name] = (st.st_dev, st.st_ino)

    def _unstore(self, name: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self.stored.discard(name)
        self._ino.pop(name, None)

    # -- mirroring -----------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Store every held entry not yet stored, then follow the registry's events."""
        for e in list(self.registry):
            if e.name not in self.stored and not e.ephemeral:
                self._store(e.name, e.fd)
        self._unsubscribe = self.registry.history.subscribe(self._on_event)
        self.write_state()

    def detach(self) -> None:
        """Stop mirroring (the store keeps what it has)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _on_event(self, ev: pb.Event) -> None:
        name = ev.name
        if ev.type == _PUT:
            if name in self.stored:
                self._unstore(name)  # a replace: the store would keep both descriptors under one name
            e = self.registry.find(name)
            if e is not None and not e.ephemeral:
                self._store(name, e.fd)
        elif ev.type in _GONE and name in self.stored:
            self._unstore(name)
        if ev.epoch > self._epoch:
            self._epoch = ev.epoch
        if self.registry.revision - self._written_revision >= FLUSH_EVERY:
            self.write_state()
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.write_state()
            return
        self._timer = loop.call_later(WRITE_INTERVAL, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self.write_state()

    def close(self) -> None:
        """Write the state one last time and stop (a clean stop keeps the store for the next start)."""
        self.detach()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.sock.fileno() >= 0:
            self.write_state()
            self.sock.close()

    # -- state file ----------------------------------------------------------------------------------------------

    def write_state(self) -> None:
        """Write ``fdstore.json`` atomically: every stored entry's metadata, the revision and the epoch."""
        reg = self.registry
        entries: dict[str, Any] = {}
        for name in self.stored:
            e = reg.find(name)
            if e is None:
                continue
            entries[name] = {
                "owner": [e.owner.pid, e.owner.uid, e.owner.gid],
                "labels": e.labels,
                "create_time": e.create_time,
                "create_revision": e.create_revision,
                "revision": e.revision,
                "expire_time": e.expire_time,
                "ino": self._ino.get(name),
            }
        doc = {
            "format": STATE_FORMAT,
            "pid": os.getpid(),
            "time": time.time(),
            "revision": reg.revision,
            "epoch": self._epoch,
            "entries": entries,
        }
        tmp = self.state_path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, separators=(",", ":"))
            os.replace(tmp, self.state_path)
        except OSError as err:
            log.error(
                "fd store: cannot write %s (%s); metadata of new entries may not survive",
                self.state_path,
                err,
            )
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        self._written_revision = reg.revision

    def read_state(self) -> dict[str, Any]:
        try:
            with open(self.state_path) as f:
                doc = json.load(f)
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
            return doc
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning(
                "fd store: ignoring %s (%s); restored entries get default metadata", self.state_path, err
            )
            return {}

    # -- restoring -----------------------------------------------------------------------------------------------

    def restore(self, passed: list[tuple[int, str]]) -> int:
        """Turn the descriptors the service manager passed (``[(fd, name)]``, the caller's until now) into
        entries; return how many. Descriptors that cannot be restored are closed and dropped from the store."""
        doc = self.read_state()
        records: dict[str, Any] = doc.get("entries", {}) if isinstance(doc.get("entries"), dict) else {}
        me = Owner(os.getpid(), os.getuid(), os.getgid())
        now = time.time()
        restored = 0
        drop: set[str] = set()
        again: set[str] = set()
        for fd, name in passed:
            why = self._restore_one(fd, name, records.get(name), me, now)
            if why:
                log.warning("fd store: dropped descriptor %r: %s", name, why)
                close_fds([fd])
                (again if name in self.stored else drop).add(name)
            else:
                restored += 1
        for name in sorted(drop):
            self._unstore(name)
        for name in sorted(again):  # FDSTOREREMOVE drops every descriptor of a name: store the kept one again
            e = self.registry.find(name)
            self._unstore(name)
            if e is not None:
                self._store(name, e.fd)
        reg = self.registry
        if passed or doc:
            rev = int(doc.get("revision", 0) or 0)
            reg.raise_revision(max(reg.revision, rev) + REVISION_GAP)
            epoch = int(doc.get("epoch", 0) or 0)
            self._epoch = epoch
            self._continue_epochs(epoch + FLUSH_EVERY)
        if passed:
            log.info(
                "fd store: restored %d of %d descriptors (revision continues at %d)",
                restored,
                len(passed),
                reg.revision,
            )
        return restored

    def _restore_one(self, fd: int, name: str, rec: Any, me: Owner, now: float) -> str:
        try:
            validate_name(name)
        except BrokerError as err:
            return err.message
        if self.registry.find(name) is not None:
            return "a second descriptor under the same name"
        try:
            info = fdinfo.describe(fd)
            st = os.fstat(fd)
        except OSError as err:
            return f"cannot inspect it ({err})"
        ino = (st.st_dev, st.st_ino)
        kw: dict[str, Any] = {}
        owner = me
        if isinstance(rec, dict) and rec.get("ino") is not None and tuple(rec["ino"]) == ino:
            try:
                pid, uid, gid = (int(x) for x in rec["owner"])
                owner = Owner(pid, uid, gid)
                expire_time = rec.get("expire_time")
                if expire_time is not None:
                    expire_time = float(expire_time)
                    if expire_time <= now:
                        return "its TTL ran out while the broker was down"
                    kw["expires_in"] = expire_time - now
                    kw["expire_time"] = expire_time
                kw["labels"] = {str(k): str(v) for k, v in dict(rec.get("labels") or {}).items()}
                kw["create_time"] = float(rec["create_time"])
                kw["create_revision"] = int(rec["create_revision"])
                kw["revision"] = int(rec["revision"])
            except (KeyError, TypeError, ValueError) as err:
                log.warning("fd store: bad record for %r (%s); restoring it with default metadata", name, err)
                owner, kw = me, {}
        else:
            log.info("fd store: no metadata for %r; restored with the broker's identity as owner", name)
        try:
            restore(self.registry, name, fd, info, owner, **kw)
        except BrokerError as err:
            return err.message
        self.stored.add(name)
        self._ino[name] = ino
        return ""
