"""``fdbroker.Client``: the blocking client.

One gRPC channel to ``control.sock`` and, once a call needs a session, one conduit connection to
``conduit.sock``. Thread-safe: calls from several threads share the session; whichever thread is waiting reads
the conduit and files each frame under its token for the thread that asked for it.

Descriptor ownership, for every call:

* ``put``/``put_many`` never take the caller's descriptor: the broker stores its own duplicate; the caller may
  close its copy any time after the call returns.
* ``get``/``get_many``/``take``/``lease`` return new descriptors the caller owns, wrapped so they close
  themselves (a ``socket.socket``, a file object, or an :class:`OwnedFd`). ``get_fd`` returns an ``OwnedFd``
  whatever the kind.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from fdbroker.client.core import (
    BATCH_PREFETCH_LIMIT,
    Entry,
    Event,
    FdLike,
    Info,
    Lease,
    OwnedFd,
    Paths,
    PrefetchedTokens,
    PrefetchPolicy,
    Received,
    Trust,
    TrustUids,
    connect_failure,
    error_from_frame,
    error_from_rpc,
    fileno_of,
    lease_request,
    put_request,
    socket_address,
    wrap_fd,
)
from fdbroker.conduit.errors import ConduitError, ErrType
from fdbroker.conduit.frames import SCM_MAX_FD, FramedConduit
from fdbroker.errors import Aborted, BrokerError, Cancelled, DeadlineExceeded, NotFound, Unavailable
from fdbroker.protocol import LEASE_WAIT_MARGIN, SESSION_METADATA_KEY
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc
from fdbroker.v1 import conduit_pb2 as cpb

_Mail = tuple[str, Any, int]  # (kind, message, fd or -1)

_STALE_AFTER = 10.0


class Listing(list[Entry]):
    """A list of entries and the registry ``revision`` it reflects (watch from ``revision + 1``)."""

    revision: int = 0


class Client:
    """A blocking fdbroker client. Use as a context manager, or call :meth:`close`.

    ``run_dir``: the broker's run directory (default: ``FDBROKER_RUN_DIR``, else the per-user default).
    ``timeout``: seconds for each call. ``prefetch``: GET tokens to ask for on each ``get`` RPC so repeated gets
    of the same name cost one conduit round trip instead of an RPC (None: adaptive, 0 after the first get of a
    name, up to 64 while a name keeps being fetched).
    ``trust_uids``: uids (or user names) besides root and this process's own uid that may serve the run
    directory (default: ``$FDBROKER_TRUST_UID``, comma-separated). Before it sends anything, the client checks
    the run directory's owners, the conduit's ``SO_PEERCRED`` and ``control.sock``'s owner against them, and
    raises :class:`~fdbroker.errors.UntrustedBroker` otherwise (see :class:`fdbroker.client.core.Trust`).
    """

    def __init__(
        self,
        run_dir: str | Any | None = None,
        *,
        timeout: float = 10.0,
        prefetch: int | None = None,
        trust_uids: TrustUids | None = None,
    ) -> None:
        self.paths = Paths.resolve(run_dir)
        self.trust = Trust(trust_uids)
        self.timeout = timeout
        self.prefetch = prefetch
        # Opened on first use, after the trust checks: the run directory's descriptor (we connect through it)
        # and the gRPC channel.
        self._dir_fd = -1
        self._channel: grpc.Channel | None = None
        self._grpc_stub: Any = None
        self._setup_lock = threading.Lock()
        self._closed = False
        self._conduit: FramedConduit | None = None
        self._session_id: str | None = None
        self._connect_lock = threading.Lock()
        self._cond = threading.Condition()
        self._reading = False
        self._mail: dict[bytes, tuple[float, _Mail]] = {}
        self._oldest_mail = time.monotonic()
        self._dead: BrokerError | None = None
        self._prefetched = PrefetchedTokens()
        self._policy = PrefetchPolicy(prefetch)
        self.token_ttl = 5.0
        self.identity: tuple[int, int, int] | None = None

    # -- lifecycle -----------------------------------------------------------------------------------------------

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel and the conduit (which ends the session and releases its leases)."""
        with self._cond:
            for _, mail in self._mail.values():
                _close_mail(mail)
            self._mail.clear()
        if self._conduit is not None:
            self._conduit.close()
            self._conduit = None
        self._session_id = None
        with self._setup_lock:
            self._closed = True
            if self._channel is not None:
                self._channel.close()
                self._channel = self._grpc_stub = None
            if self._dir_fd >= 0:  # after the channel: it connects through the descriptor
                os.close(self._dir_fd)
                self._dir_fd = -1

    def _run_dir_fd(self) -> int:
        """The run directory's descriptor, opened (and checked) once. Call with ``_setup_lock`` held."""
        if self._closed:
            raise Cancelled("this fdbroker.Client is closed; create a new one")
        if self._dir_fd < 0:
            self._dir_fd = self.trust.open_run_dir(self.paths)
        return self._dir_fd

    @property
    def _stub(self) -> Any:
        """The ``FdBroker`` stub. The first use checks who owns ``control.sock`` before gRPC connects at all."""
        stub = self._grpc_stub
        if stub is None:
            with self._setup_lock:
                if self._grpc_stub is None:
                    dir_fd = self._run_dir_fd()
                    self.trust.check_control(self.paths, dir_fd)
                    target = socket_address(dir_fd, self.paths.control)
                    self._channel = grpc.insecure_channel(f"unix:{target}")
                    self._grpc_stub = pb_grpc.FdBrokerStub(self._channel)
                stub = self._grpc_stub
        return stub

    @property
    def session_id(self) -> str | None:
        return self._session_id

    def connect(self) -> str:
        """Open the conduit (once) and return the session id. Called implicitly by calls that need it."""
        if self._session_id is not None and self._dead is None:
            return self._session_id
        with self._connect_lock:
            if self._session_id is not None and self._dead is None:
                return self._session_id
            if self._conduit is not None:
                self._conduit.close()
            with self._setup_lock:
                address = socket_address(self._run_dir_fd(), self.paths.conduit)
            try:
                conduit = FramedConduit.connect(address, timeout=self.timeout)
            except ConduitError as err:
                raise self.paths.not_running(connect_failure(self.paths, err)) from None
            try:
                self.trust.check_peer(self.paths, conduit.peer_credentials())
                frame = conduit.recv(timeout=self.timeout)
            except ConduitError as err:
                conduit.close()
                if err.type is ErrType.TIMEOUT:
                    raise DeadlineExceeded(
                        f"the broker at {self.paths.run_dir} did not answer within {self.timeout:g}s"
                    ) from None
                raise Unavailable(f"the broker at {self.paths.run_dir} closed the conduit: {err}") from None
            except BaseException:
                conduit.close()
                raise
            frame.close_fds()
            kind = frame.message.WhichOneof("body")
            if kind == "error":
                conduit.close()
                raise error_from_frame(frame.message.error)
            if kind != "welcome":
                conduit.close()
                raise Unavailable(
                    f"the broker sent {kind} instead of welcome; is {self.paths.conduit} a broker?"
                )
            w = frame.message.welcome
            self._conduit = conduit
            self._session_id = w.session_id
            self._dead = None
            self.token_ttl = w.token_ttl.ToNanoseconds() / 1e9 or self.token_ttl
            self.identity = (w.identity.pid, w.identity.uid, w.identity.gid)
            self._prefetched.clear()
            return w.session_id

    def _md(self, session: bool) -> list[tuple[str, str]]:
        if session:
            return [(SESSION_METADATA_KEY, self.connect())]
        if self._session_id is not None and self._dead is None:
            return [(SESSION_METADATA_KEY, self._session_id)]
        return []

    def _rpc(
        self, method: Any, request: Any, *, session: bool, name: str = "", timeout: float | None = None
    ) -> Any:
        try:
            return method(request, metadata=self._md(session), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.paths, name) from None

    # -- conduit mailbox -----------------------------------------------------------------------------------------

    def _file(self, frame: Any) -> None:
        """File a received frame's items under their tokens (called with the condition held)."""
        m = frame.message
        kind = m.WhichOneof("body")
        t = time.monotonic()
        if kind == "deliver":
            items, fds = m.deliver.items, frame.fds
            n = len(items)
            if n > 1 and not items[1].token:
                # The answer to a batch token fills its frame alone: file it whole, touching no other item.
                self._mail[items[0].token] = (t, ("batch", (items, fds), -1))
            else:
                for i in range(n):
                    self._mail[items[i].token] = (t, ("deliver", items[i], fds[i]))
        elif kind == "deposited":
            frame.close_fds()
            for r in m.deposited.results:
                self._mail[r.token] = (t, ("deposited", r, -1))
        elif kind == "acked":
            frame.close_fds()
            for tok in m.acked.tokens:
                self._mail[tok] = (t, ("acked", m.acked, -1))
        elif kind == "error":
            frame.close_fds()
            if m.error.token:
                self._mail[m.error.token] = (t, ("error", m.error, -1))
            else:
                self._dead = self._dead or error_from_frame(m.error)
        else:
            frame.close_fds()
        # Deliveries nobody waits for any more (a caller that gave up) must not pile up; every answer normally
        # finds its waiter within the same call, so anything this old is an orphan.
        if self._mail and t - self._oldest_mail > _STALE_AFTER:
            self._oldest_mail = t
            for k in [k for k, (ts, _) in self._mail.items() if t - ts > _STALE_AFTER]:
                _close_mail(self._mail.pop(k)[1])

    def _wait(self, tokens: Sequence[bytes], timeout: float | None = None) -> list[_Mail]:
        """Wait until every token has its answer on the conduit; return them in order."""
        deadline = time.monotonic() + (timeout or self.timeout)
        with self._cond:
            while True:
                if all(t in self._mail for t in tokens):
                    return [self._mail.pop(t)[1] for t in tokens]
                if self._dead is not None:
                    raise self._dead
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExceeded(f"no answer on the conduit within {timeout or self.timeout}s")
                if self._reading:
                    self._cond.wait(remaining)
                    continue
                self._reading = True
                conduit = self._conduit
                self._cond.release()
                try:
                    if conduit is None:
                        raise ConduitError(ErrType.PEER_CLOSED, "conduit closed")
                    frame = conduit.recv(timeout=remaining)
                except ConduitError as err:
                    frame = None
                    if err.type != ErrType.TIMEOUT:
                        self._dead = Aborted(
                            f"the conduit to the broker at {self.paths.run_dir} broke ({err}); "
                            "nothing was handed over; retry (a new session is opened)"
                        )
                finally:
                    self._cond.acquire()
                    self._reading = False
                    self._cond.notify_all()
                if frame is not None:
                    self._file(frame)

    def _take_results(self, mails: list[_Mail], names: Sequence[str]) -> list[tuple[int, cpb.DeliverItem]]:
        """Deliveries → (fd, item); any error closes every fd received and raises the first error."""
        out: list[tuple[int, cpb.DeliverItem]] = []
        first_err: BrokerError | None = None
        for (kind, msg, fd), name in zip(mails, names, strict=True):
            if kind == "deliver":
                out.append((fd, msg))
            elif first_err is None:
                first_err = (
                    error_from_frame(msg) if kind == "error" else Aborted(f"unexpected {kind} for {name!r}")
                )
        if first_err is not None:
            for fd, _ in out:
                OwnedFd(fd).close()
            raise first_err
        return out

    # -- info ----------------------------------------------------------------------------------------------------

    def info(self) -> Info:
        """Version, counts and limits of the broker."""
        return Info.from_pb(self._rpc(self._stub.GetInfo, pb.GetInfoRequest(), session=False))

    # -- put -----------------------------------------------------------------------------------------------------

    def put(
        self,
        name: str,
        fd: FdLike,
        *,
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
        ephemeral: bool = False,
        replace: bool = False,
        if_revision: int = 0,
    ) -> Entry:
        """Deposit ``fd`` under ``name`` and return the stored entry. The caller keeps its descriptor."""
        return self.put_many(
            [(name, fd)],
            labels=labels,
            ttl=ttl,
            ephemeral=ephemeral,
            replace=replace,
            if_revision=if_revision,
        )[0]

    def put_many(
        self,
        items: Iterable[tuple[str, FdLike]] | Mapping[str, FdLike],
        *,
        labels: Mapping[str, str] | None = None,
        ttl: float | None = None,
        ephemeral: bool = False,
        replace: bool = False,
        if_revision: int = 0,
    ) -> list[Entry]:
        """Deposit many descriptors in one RPC and as few conduit messages as possible (253 per message)."""
        pairs = list(items.items() if isinstance(items, Mapping) else items)
        fds = [fileno_of(f) for _, f in pairs]
        reqs = [
            put_request(
                n, labels=labels, ttl=ttl, ephemeral=ephemeral, replace=replace, if_revision=if_revision
            )
            for n, _ in pairs
        ]
        if len(reqs) == 1:
            handoffs = [self._rpc(self._stub.Put, reqs[0], session=True, name=pairs[0][0]).handoff]
        else:
            handoffs = list(
                self._rpc(self._stub.BatchPut, pb.BatchPutRequest(requests=reqs), session=True).handoffs
            )
        tokens = [h.token for h in handoffs]
        assert self._conduit is not None
        for i in range(0, len(tokens), SCM_MAX_FD):
            chunk = tokens[i : i + SCM_MAX_FD]
            try:
                self._conduit.send(
                    cpb.ConduitFrame(deposit=cpb.Deposit(tokens=chunk)),
                    fds[i : i + SCM_MAX_FD],
                    timeout=self.timeout,
                )
            except ConduitError as err:
                raise Aborted(
                    f"the conduit broke while depositing {pairs[i][0]!r}: {err}", name=pairs[i][0]
                ) from None
        results = self._wait(tokens)
        out: list[Entry] = []
        first_err: BrokerError | None = None
        for (kind, msg, _), (name, _) in zip(results, pairs, strict=True):
            if kind == "deposited" and not msg.HasField("error"):
                out.append(Entry.from_pb(msg.entry))
            elif first_err is None:
                err_pb = msg.error if kind == "deposited" else msg
                first_err = error_from_frame(err_pb)
                first_err.name = first_err.name or name
        if first_err is not None:
            raise first_err
        return out

    # -- get -----------------------------------------------------------------------------------------------------

    def _next_prefetch(self, name: str) -> int:
        return self._policy.next(name, self.token_ttl)

    def _redeem(self, name: str) -> _Mail | None:
        """Redeem the next prefetched token filed under ``name`` (a name, or a batch key): its conduit answer,
        or None when there is no usable token (the caller then asks the control plane)."""
        tok = self._prefetched.pop(name)
        if tok is None or self._conduit is None or self._dead is not None:
            return None
        try:
            self._conduit.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[tok])), timeout=self.timeout)
        except ConduitError:
            return None
        mail = self._wait([tok])[0]
        if mail[0] not in ("deliver", "batch"):
            # replaced, deleted or leased away since the token was issued: the rest are void too
            _close_mail(mail)
            self._prefetched.drop(name)
            return None
        return mail

    def _get_raw(self, name: str) -> tuple[int, cpb.DeliverItem]:
        mail = self._redeem(name)
        if mail is not None and mail[0] == "deliver":
            return mail[2], mail[1]
        if mail is not None:
            _close_mail(mail)
        resp = self._rpc(
            self._stub.Get,
            pb.GetRequest(name=name, prefetch=self._next_prefetch(name)),
            session=True,
            name=name,
        )
        if resp.prefetch_tokens:
            # add, not replace: tokens another thread fetched meanwhile must not be orphaned
            self._prefetched.add(name, resp.prefetch_tokens, time.monotonic() + self.token_ttl)
        return self._take_results(self._wait([resp.handoffs[0].token]), [name])[0]

    def get(self, name: str) -> Received:
        """A copy of ``name``'s descriptor: a socket, a file object, or an :class:`OwnedFd`; the caller owns it."""
        fd, item = self._get_raw(name)
        return wrap_fd(fd, item.info)

    def get_fd(self, name: str) -> OwnedFd:
        """Like :meth:`get`, but always an :class:`OwnedFd`."""
        return OwnedFd(self._get_raw(name)[0])

    def get_many(self, names: Sequence[str], *, raw: bool = False) -> list[Any]:
        """Copies of many entries, in order: one BatchGet RPC, descriptors in messages of up to 253.

        A batch of at most 253 names fetched again soon after is served by a prefetched batch token: one
        conduit round trip for the whole batch, no RPC (see ``BatchGetRequest.prefetch`` in the proto).
        """
        names = list(names)
        batch = self._get_many_prefetched(names) if 0 < len(names) <= SCM_MAX_FD else None
        if batch is not None:
            items, fds = batch
            if raw:
                return [OwnedFd(fd) for fd in fds]
            return [wrap_fd(fd, item.info) for item, fd in zip(items, fds, strict=True)]
        key = "\0".join(names)  # \0 never occurs in a name: no clash with single-name keys
        prefetch = min(BATCH_PREFETCH_LIMIT, self._next_prefetch(key)) if 0 < len(names) <= SCM_MAX_FD else 0
        resp = self._rpc(
            self._stub.BatchGet, pb.BatchGetRequest(names=names, prefetch=prefetch), session=True
        )
        if resp.prefetch_tokens:
            self._prefetched.add(key, resp.prefetch_tokens, time.monotonic() + self.token_ttl)
        got = self._take_results(self._wait([h.token for h in resp.handoffs]), names)
        return [OwnedFd(fd) if raw else wrap_fd(fd, item.info) for fd, item in got]

    def _get_many_prefetched(self, names: list[str]) -> tuple[Sequence[cpb.DeliverItem], list[int]] | None:
        """Redeem a cached batch token for ``names``: (items, fds) in order, or None to ask by RPC."""
        mail = self._redeem("\0".join(names))
        if mail is None:
            return None
        kind, msg, fd = mail
        if kind == "batch" and len(msg[1]) == len(names):
            return msg  # type: ignore[no-any-return]
        if kind == "deliver" and len(names) == 1:
            return [msg], [fd]
        _close_mail(mail)
        return None

    def take(self, name: str, *, if_revision: int = 0, raw: bool = False) -> Any:
        """Move ``name``'s descriptor to the caller: the entry is gone once this returns (atomic; see the proto)."""
        resp = self._rpc(
            self._stub.Take, pb.TakeRequest(name=name, if_revision=if_revision), session=True, name=name
        )
        tok = resp.handoff.token
        fd, item = self._take_results(self._wait([tok]), [name])[0]
        try:
            assert self._conduit is not None
            try:
                self._conduit.send(cpb.ConduitFrame(ack=cpb.Ack(tokens=[tok])), timeout=self.timeout)
            except ConduitError as err:
                raise Aborted(
                    f"the conduit broke before the take of {name!r} was confirmed ({err}); the entry stays "
                    "in the broker",
                    name=name,
                ) from None
            kind, msg, _ = self._wait([tok])[0]
            if kind != "acked":
                raise error_from_frame(msg) if kind == "error" else Aborted(f"take of {name!r} not confirmed")
        except BaseException:
            OwnedFd(fd).close()
            raise
        return OwnedFd(fd) if raw else wrap_fd(fd, item.info)

    # -- delete / stat / list ------------------------------------------------------------------------------------

    def delete(self, name: str, *, if_revision: int = 0) -> int:
        """Remove ``name``; the broker closes its copy. Returns the delete's revision."""
        resp = self._rpc(
            self._stub.Delete, pb.DeleteRequest(name=name, if_revision=if_revision), session=True, name=name
        )
        self._prefetched.drop(name)
        return int(resp.header.revision)

    def stat(self, name: str) -> Entry:
        """Describe ``name``."""
        return Entry.from_pb(
            self._rpc(self._stub.Stat, pb.StatRequest(name=name), session=False, name=name).entry
        )

    def list(self, prefix: str = "", *, selector: str = "", page_size: int = 0) -> Listing:
        """Every entry under ``prefix`` (matching the label ``selector``), following pages. ``.revision`` is the
        revision of the first page."""
        out = Listing()
        token = ""
        first = True
        while True:
            resp = self._rpc(
                self._stub.List,
                pb.ListRequest(prefix=prefix, label_selector=selector, page_size=page_size, page_token=token),
                session=False,
            )
            if first:
                out.revision = resp.header.revision
                first = False
            out.extend(Entry.from_pb(e) for e in resp.entries)
            token = resp.next_page_token
            if not token:
                return out

    # -- leases --------------------------------------------------------------------------------------------------

    def lease(
        self,
        name: str,
        ttl: float,
        *,
        shared: bool = False,
        wait: float | None = None,
        keepalive: bool = True,
    ) -> LeaseHandle:
        """Lease ``name`` (exclusive unless ``shared``); ``wait``: seconds to queue for it (None: fail at once).

        Returns a :class:`LeaseHandle` (a context manager that releases on exit) holding the descriptor, the
        lease id and the fencing epoch. With ``keepalive`` a background thread renews the lease every ttl/3.
        """
        req = lease_request(name, ttl, shared, wait is not None)
        # The RPC deadline bounds the queueing: the broker gives up lease_wait_reserve() (0.5 s) before it and
        # answers DEADLINE_EXCEEDED itself, so ``wait`` + 0.5 s queues for ``wait`` seconds.
        timeout = self.timeout if wait is None else max(0.0, wait) + LEASE_WAIT_MARGIN
        resp = self._rpc(self._stub.Lease, req, session=True, name=name, timeout=timeout)
        fd, item = self._take_results(self._wait([resp.handoff.token]), [name])[0]
        lease = Lease(
            lease_id=resp.lease_id,
            name=name,
            epoch=resp.epoch,
            ttl=ttl,
            expire_time=resp.expire_time.ToNanoseconds() / 1e9,
            entry=Entry.from_pb(resp.entry),
        )
        return LeaseHandle(self, lease, wrap_fd(fd, item.info), keepalive=keepalive)

    def keepalive(self, lease_ids: Sequence[str]) -> pb.KeepAliveResponse:
        """Renew leases once; returns which were renewed and which are gone."""
        it = iter([pb.KeepAliveRequest(lease_ids=lease_ids)])
        try:
            for resp in self._stub.KeepAlive(it, metadata=self._md(True), timeout=self.timeout):
                return resp  # type: ignore[no-any-return]
        except grpc.RpcError as err:
            raise error_from_rpc(err, self.paths) from None
        raise Aborted("keep-alive stream ended without an answer")

    def release(self, lease_id: str, *, return_fd: FdLike | None = None) -> int:
        """End a lease; with ``return_fd`` hand a descriptor back as the entry's new descriptor (check-in)."""
        resp = self._rpc(
            self._stub.Release,
            pb.ReleaseRequest(lease_id=lease_id, return_descriptor=return_fd is not None),
            session=True,
        )
        if return_fd is not None:
            tok = resp.handoff.token
            assert self._conduit is not None
            try:
                self._conduit.send(
                    cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok])),
                    [fileno_of(return_fd)],
                    timeout=self.timeout,
                )
            except ConduitError as err:
                raise Aborted(f"the conduit broke while handing the descriptor back ({err})") from None
            kind, msg, _ = self._wait([tok])[0]
            if kind != "deposited" or msg.HasField("error"):
                raise error_from_frame(msg.error if kind == "deposited" else msg)
            return int(msg.revision)
        return int(resp.header.revision)

    # -- watch ---------------------------------------------------------------------------------------------------

    def watch(self, prefix: str = "", *, start_revision: int = 0) -> Watch:
        """Registry events under ``prefix`` from ``start_revision`` (0: from now). Iterate it; close it when done."""
        call = self._stub.Watch(
            pb.WatchRequest(prefix=prefix, start_revision=start_revision), metadata=self._md(False)
        )
        return Watch(call, self.paths)


class LeaseHandle:
    """A held lease: ``.fd`` (the descriptor, owned by the handle until :meth:`release`), ``.epoch``,
    ``.lease_id``. Releases on ``with`` exit; the keep-alive thread stops with it."""

    def __init__(self, client: Client, lease: Lease, fd: Received, *, keepalive: bool) -> None:
        self.client = client
        self.lease = lease
        self.fd = fd
        self.epoch = lease.epoch
        self.lease_id = lease.lease_id
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if keepalive:
            self._thread = threading.Thread(
                target=self._keepalive, name=f"fdbroker-keepalive-{lease.name}", daemon=True
            )
            self._thread.start()

    def _keepalive(self) -> None:
        interval = max(0.05, self.lease.ttl / 3)
        # Until a renewal succeeds, the lease is good only as long as the last grant or renewal said.
        good_until = time.monotonic() + self.lease.ttl
        while not self._stop.wait(interval):
            try:
                r = self.client.keepalive([self.lease_id])
            except BrokerError:
                if time.monotonic() >= good_until:
                    self.lost.set()  # the broker is unreachable and the TTL has run out: assume it is gone
                    return
                continue
            if self.lease_id in r.gone:
                self.lost.set()
                return
            good_until = time.monotonic() + self.lease.ttl

    def release(self, *, return_fd: FdLike | None = None) -> None:
        """Release the lease (idempotent) and close the handle's descriptor."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        try:
            if not self.lost.is_set():
                self.client.release(self.lease_id, return_fd=return_fd)
        except NotFound:
            pass
        finally:
            self.lost.set()
            self.fd.close()

    def __enter__(self) -> LeaseHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Watch:
    """An iterator of :class:`Event`; ``header_revision`` is known after the first ``next``."""

    def __init__(self, call: Any, paths: Paths) -> None:
        self._call = call
        self._paths = paths
        self._buf: collections.deque[Event] = collections.deque()
        self.header_revision: int | None = None

    def __iter__(self) -> Iterator[Event]:
        return self

    def __next__(self) -> Event:
        while not self._buf:
            try:
                resp = next(self._call)
            except StopIteration:
                raise
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.CANCELLED:
                    raise StopIteration from None
                raise error_from_rpc(err, self._paths) from None
            if self.header_revision is None:
                self.header_revision = resp.header_revision
            self._buf.extend(Event.from_pb(e) for e in resp.events)
        return self._buf.popleft()

    def close(self) -> None:
        self._call.cancel()

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_mail(mail: _Mail) -> None:
    """Close the descriptors of a conduit answer nobody will take."""
    kind, msg, fd = mail
    if fd >= 0:
        OwnedFd(fd).close()
    if kind == "batch":
        for f in msg[1]:
            OwnedFd(f).close()
