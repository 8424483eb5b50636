"""Crash survival through systemd's file-descriptor store (``sd_pid_notify_with_fds``, ``FDSTORE=1``).

With ``serve --fdstore`` every entry the broker holds is also pushed to the service manager: one datagram to
``$NOTIFY_SOCKET`` with ``FDSTORE=1``, ``FDNAME=<entry name>``, ``FDPOLL=0`` and the descriptor as
``SCM_RIGHTS``; when the entry leaves, ``FDSTOREREMOVE=1`` + ``FDNAME``. A replaced entry is removed, then stored
again. Ephemeral entries are not stored in systemd's store (their session cannot outlive the process). The registry's events drive
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

The keeper (``serve --keeper``, :mod:`.keeper`) is the same mechanism with a better memory: the broker talks to
it through the same code (the channel from :func:`fdbroker.broker.notify.notifier`), and because the keeper
keeps what it is given beside each descriptor, every ``FDSTORE`` to a keeper also carries
``X_FDBROKER_ENTRY=<base64 of the serialized Entry>``, ephemeral entries are stored too, and a lease granted or
released re-sends the entry's metadata (``FDNAME`` + ``X_FDBROKER_ENTRY``, no descriptor). At start the keeper's
records (``FDBROKER_KEEPER_STATE``) name every descriptor and carry its metadata, so nothing depends on
``fdstore.json``'s write interval, which then holds only the revision, the epoch and the rare entry whose
metadata did not fit in one message to the keeper (a descriptor without a record falls back to it). Then the ended
sessions end as after a takeover: their leases are released (``LEASE_RELEASED``, reason ``HANDOVER``) and their
ephemeral entries removed (``DELETE``, reason ``SESSION_ENDED``), after the restored revision. systemd gets no
``X_FDBROKER_ENTRY``: it would ignore the key (``service_notify_message`` looks only for the keys it knows), but
it drops a whole notification of more than ``PIPE_BUF`` (4096) bytes, descriptors included, and an entry with
labels passes that easily.

Descriptor ownership: the service manager gets copies (the kernel duplicates each entry's descriptor into it;
the registry keeps its own). Descriptors passed back at start are this process's: each becomes an entry's (the
registry owns it) or is closed at once.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fdbroker import activation
from fdbroker.broker.notify import Notifier, notifier
from fdbroker.broker.registry import Entry, Owner, Registry
from fdbroker.broker.survival import keeper, restoring
from fdbroker.broker.survival.restoring import EndSessions, Restored
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
KEEPER_MAX_MESSAGE = keeper.MAX_MESSAGE - 1024  # room for the keys around the metadata

_PUT = pb.Event.TYPE_PUT
_GONE = (pb.Event.TYPE_DELETE, pb.Event.TYPE_EXPIRE)


class FdStore:
    """The broker's side of the fd store (systemd's, or the keeper's): restore at start, then mirror every put
    and removal.

    ``continue_epochs(epoch)`` makes the broker's fencing epochs continue above ``epoch`` (called once, when a
    restore finds a recorded epoch). ``channel`` is where the datagrams go; the store closes it in
    :meth:`close` (the keeper's channel stays open: see :class:`Notifier`).
    """

    def __init__(
        self,
        registry: Registry,
        run_dir: Path,
        channel: Notifier,
        *,
        continue_epochs: Callable[[int], None],
    ) -> None:
        self.registry = registry
        self._continue_epochs = continue_epochs
        self.state_path = Path(run_dir) / STATE_FILE
        self.channel = channel
        self.keeper = channel.keeper
        self.stored: set[str] = set()
        self._in_keeper: set[str] = set()  # stored names whose metadata the keeper holds: not in fdstore.json
        self._ino: dict[str, tuple[int, int]] = {}
        self._epoch = 0
        self._written_revision = 0
        self._timer: asyncio.TimerHandle | None = None
        self._unsubscribe: Any = None
        self._closed = False
        self.failures = 0

    @classmethod
    def open(
        cls,
        registry: Registry,
        run_dir: Path,
        *,
        continue_epochs: Callable[[int], None],
        end_sessions: EndSessions,
    ) -> FdStore | None:
        """Restore what the service manager (or the keeper) passed, start mirroring, then end the sessions of
        the previous process (``end_sessions(leases)``: the leases its sessions held; every restored ephemeral
        entry goes too). None (with a warning) when there is no service manager to talk to."""
        channel = notifier()
        if channel is None:
            log.warning(
                "--fdstore: NOTIFY_SOCKET is not set (not run by systemd?); entries will not survive a crash"
            )
            return None
        store = cls(registry, run_dir, channel, continue_epochs=continue_epochs)
        records = keeper.read_state() if store.keeper else None
        restored = store.restore(activation.listen_fds(), records)
        store.attach()
        end_sessions(restored.leases)
        return store

    # -- sending -------------------------------------------------------------------------------------------------

    def _send(self, state: str, fd: int = -1) -> bool:
        try:
            self.channel.send(state, [fd] if fd >= 0 else [])
        except OSError as err:
            self.failures += 1
            log.error(
                "fd store: %r not sent to the service manager (%s)", state[:200].replace("\n", " "), err
            )
            return False
        return True

    def _store(self, e: Entry) -> None:
        name = e.name
        meta = _meta_line(e) if self.keeper else ""
        if self._send(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0{meta}", e.fd):
            self.stored.add(name)
            self._kept_meta(name, meta)
            with contextlib.suppress(OSError):
                st = os.fstat(e.fd)
                self._ino[name] = (st.st_dev, st.st_ino)

    def _unstore(self, name: str) -> None:
        self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self.stored.discard(name)
        self._in_keeper.discard(name)
        self._ino.pop(name, None)

    def _restate(self, e: Entry) -> None:
        """Tell the keeper an entry's metadata changed (no new descriptor); an empty value makes it forget what it
        had, and fdstore.json keeps the entry instead."""
        meta = _meta_line(e)
        if self._send(f"FDNAME={e.name}" + (meta or f"\n{keeper.META_KEY}=")):
            self._kept_meta(e.name, meta)

    def _kept_meta(self, name: str, meta: str) -> None:
        if meta:
            self._in_keeper.add(name)
        else:
            self._in_keeper.discard(name)

    # -- mirroring -----------------------------------------------------------------------------------------------

    def attach(self) -> None:
        """Store every held entry not yet stored, then follow the registry's events."""
        for e in list(self.registry):
            if e.name not in self.stored and self._keeps(e):
                self._store(e)
        self._unsubscribe = self.registry.history.subscribe(self._on_event)
        self.write_state()

    def detach(self) -> None:
        """Stop mirroring (the store keeps what it has)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def _keeps(self, e: Entry) -> bool:
        """Is ``e`` stored? Ephemeral entries only with a keeper: they come back only to end with their session."""
        return self.keeper or not e.ephemeral

    def _on_event(self, ev: pb.Event) -> None:
        name = ev.name
        if ev.type == _PUT:
            if name in self.stored:
                self._unstore(name)  # a replace: the store would keep both descriptors under one name
            e = self.registry.find(name)
            if e is not None and self._keeps(e):
                self._store(e)
        elif ev.type in _GONE:
            if name in self.stored:
                self._unstore(name)
        elif self.keeper and name in self.stored:  # a lease granted or released
            e = self.registry.find(name)
            if e is not None:
                self._restate(e)
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
        if not self._closed:
            self._closed = True
            self.write_state()
            self.channel.close()

    # -- state file ----------------------------------------------------------------------------------------------

    def write_state(self) -> None:
        """Write ``fdstore.json`` atomically: the revision, the epoch and every stored entry's metadata (but for
        the entries whose metadata the keeper holds)."""
        reg = self.registry
        entries: dict[str, Any] = {}
        for name in self.stored - self._in_keeper:
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
        if write_json(self.state_path, doc):
            self._written_revision = reg.revision

    def read_state(self) -> dict[str, Any]:
        """``fdstore.json`` as written, or {} (logged) when it is missing or unreadable."""
        return read_json(self.state_path)

    # -- restoring -----------------------------------------------------------------------------------------------

    def restore(
        self, passed: list[tuple[int, str]], records: Sequence[keeper.Record] | None = None
    ) -> Restored:
        """Turn the descriptors the service manager passed (``[(fd, name)]``, the caller's until now) into
        entries. ``records``: the keeper's, one per descriptor in order (names and metadata), else None.
        Descriptors that cannot be restored are closed and dropped from the store. Raises the revision and the
        fencing epochs above anything the previous process can have handed out."""
        if records is not None and len(records) != len(passed):
            log.error(
                "fd store: the keeper passed %d descriptors but %d records; restoring without its records",
                len(passed),
                len(records),
            )
            records = None
        doc = self.read_state()
        saved: dict[str, Any] = doc.get("entries", {}) if isinstance(doc.get("entries"), dict) else {}
        me = Owner(os.getpid(), os.getuid(), os.getgid())
        now = time.time()
        t0 = time.monotonic()
        out = Restored()
        drop: set[str] = set()
        again: set[str] = set()
        for i, (fd, name) in enumerate(passed):
            kept: restoring.Kept | None = None
            if records is not None:
                name = records[i].name
                kept = restoring.entry_of(records[i], name)
            why = self._restore_one(fd, name, kept, saved.get(name), me, now, out)
            if why:
                log.warning("fd store: dropped descriptor %r: %s", name, why)
                close_fds([fd])
                (again if name in self.stored else drop).add(name)
            else:
                out.entries += 1
        for name in sorted(drop):
            self._unstore(name)
        for name in sorted(again):  # FDSTOREREMOVE drops every descriptor of a name: store the kept one again
            e = self.registry.find(name)
            self._unstore(name)
            if e is not None:
                self._store(e)
        reg = self.registry
        if passed or doc:
            rev = max(int(doc.get("revision", 0) or 0), out.revision)
            reg.raise_revision(max(reg.revision, rev) + REVISION_GAP)
            epoch = max(int(doc.get("epoch", 0) or 0), out.epoch)
            self._epoch = epoch
            self._continue_epochs(epoch + FLUSH_EVERY)
        if passed:
            log.info(
                "fd store: restored %d of %d descriptors%s in %.3f s (revision continues at %d)",
                out.entries,
                len(passed),
                " with the keeper's records" if records is not None else "",
                time.monotonic() - t0,
                reg.revision,
            )
        return out

    def _restore_one(
        self,
        fd: int,
        name: str,
        kept: restoring.Kept | None,
        saved: Any,
        me: Owner,
        now: float,
        out: Restored,
    ) -> str:
        """Restore one descriptor; "" on success, else why not (the descriptor is then still the caller's)."""
        try:
            validate_name(name)
        except BrokerError as err:
            return err.message
        if self.registry.find(name) is not None:
            return "a second descriptor under the same name"
        if kept is not None:
            why = restoring.kept(self.registry, fd, kept, now, out)
        else:
            why, ino = restoring.saved(self.registry, fd, name, saved, me, now)
            if ino is not None:
                self._ino[name] = ino
        if not why:
            self.stored.add(name)
            if kept is not None:
                self._in_keeper.add(name)
        return why


def _meta_line(e: Entry) -> str:
    """``\\nX_FDBROKER_ENTRY=<base64>`` for a message to the keeper: the entry as it is now, without its lease
    holders if that is what it takes to fit in one datagram (their leases then end without an event), or nothing
    (the entry then comes back with fdstore.json's metadata)."""
    data = e.pb_bytes()
    if len(data) * 4 // 3 > KEEPER_MAX_MESSAGE:
        m = pb.Entry.FromString(data)
        m.lease.ClearField("holders")
        data = m.SerializeToString()
        if len(data) * 4 // 3 > KEEPER_MAX_MESSAGE:
            log.warning(
                "fd store: the metadata of %r is too large for the keeper; fdstore.json keeps it", e.name
            )
            return ""
        log.warning("fd store: the lease holders of %r are too many to keep; only the entry is kept", e.name)
    return f"\n{keeper.META_KEY}={base64.b64encode(data).decode()}"


def write_json(path: Path, doc: dict[str, Any]) -> bool:
    """Write ``doc`` to ``path`` atomically (temp file + rename, mode 0600); False (logged) if it could not."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, path)
    except OSError as err:
        log.error("fd store: cannot write %s (%s); metadata of new entries may not survive", path, err)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        return False
    return True


def read_json(path: Path) -> dict[str, Any]:
    """The state ``write_json`` wrote at ``path``, or {} (logged) when it is missing, unreadable or foreign."""
    try:
        with open(path) as f:
            doc = json.load(f)
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
            raise ValueError(f"unknown format {doc.get('format') if isinstance(doc, dict) else doc!r}")
        return doc
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        log.warning("fd store: ignoring %s (%s); restored entries get default metadata", path, err)
        return {}
