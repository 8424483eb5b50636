"""A stand-in broker for client tests: a gRPC ``FdBroker`` servicer and a conduit listener in this process, whose
answers a test scripts — to send what the real broker never would (a ``Deliver`` whose descriptors do not add up,
a lease whose descriptor never comes, prefetched tokens that expire long before the session's token lifetime, a
``Watch`` whose header is slow). Only the RPCs the tests use are served; the rest answer UNIMPLEMENTED.

Every descriptor it delivers is the write end of a fresh pipe, whose inode it records in ``delivered``: a test
checks that no descriptor of this process still points at one (:meth:`FakeBroker.leaked`).
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from fdbroker.conduit.errors import ConduitError
from fdbroker.conduit.frames import FramedConduit
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc
from fdbroker.v1 import conduit_pb2 as cpb


class FakeBroker(pb_grpc.FdBrokerServicer):  # type: ignore[misc]
    """Start it with ``with FakeBroker(tmp_path) as fake:``; point a client at ``fake.run_dir``. One serves a
    whole test module (its gRPC server leaves gRPC's process-wide poller behind): :meth:`reset` between tests.

    Scripts (set before the call): ``deliver_items`` (items per pushed ``Deliver``, which always carries one
    descriptor: 2 makes one that does not add up), ``deliver_lease`` (False: a granted lease's descriptor never
    comes), ``prefetch_ttl`` (seconds the prefetched tokens of a ``Get`` live, reported in
    ``prefetch_expire_time``), ``watch_delay`` (seconds before a ``Watch`` sends its header).
    Records: ``calls`` (RPC names, in order), ``redeems`` (tokens redeemed), ``refills`` (each ``Redeem``'s
    ``refill``, which it ignores), ``released`` (lease ids).
    :meth:`forget_sessions` plays a takeover: every session ends.
    """

    token_ttl = 30.0  # what the Welcome says

    def __init__(self, tmp_path: Path) -> None:
        self.run_dir = tmp_path / "run"
        self.run_dir.mkdir(mode=0o700)
        self.delivered: set[int] = set()
        self._sessions: dict[str, FramedConduit] = {}
        self._session_ids = itertools.count(1)
        self.reset()
        self._stop = threading.Event()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.run_dir / "conduit.sock"))
        self._listener.listen()
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        pb_grpc.add_FdBrokerServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"unix:{self.run_dir / 'control.sock'}")
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> FakeBroker:
        self._server.start()
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._server.stop(None)
        self._listener.shutdown(socket.SHUT_RDWR)
        self._listener.close()
        for c in list(self._sessions.values()):
            c.close()
        for t in self._threads:
            t.join(5)

    def reset(self) -> None:
        """Back to answering as the real broker does, with empty records (for the next test)."""
        self.deliver_items = 1
        self.deliver_lease = True
        self.prefetch_ttl = 30.0
        self.watch_delay = 0.0
        self.calls: list[str] = []
        self.redeems = 0
        self.refills: list[int] = []
        self.released: list[str] = []
        self._ids = itertools.count(1)

    def forget_sessions(self, *, close: bool = True) -> None:
        """Forget every session, as a successor (or a restarted broker) does: a call with an old session id is
        UNAUTHENTICATED from now on. ``close``: also close their conduits, as the old broker does when it goes."""
        sessions, self._sessions = dict(self._sessions), {}
        if close:
            for conduit in sessions.values():
                conduit.close()

    def leaked(self) -> list[int]:
        """Descriptors of this process that still point at a pipe this broker delivered."""
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.stat(f"/proc/self/fd/{fd}").st_ino in self.delivered and os.readlink(
                    f"/proc/self/fd/{fd}"
                ).startswith("pipe:"):
                    out.append(int(fd))
            except OSError:
                pass
        return out

    # -- the conduit ---------------------------------------------------------------------------------------------

    def _spawn(self, target: Any, *args: Any) -> None:
        t = threading.Thread(target=target, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            conduit = FramedConduit.from_socket(sock, timeout=10)
            sid = f"fake-session-{next(self._session_ids)}"
            welcome = cpb.Welcome(session_id=sid)
            welcome.token_ttl.FromNanoseconds(int(self.token_ttl * 1e9))
            self._sessions[sid] = conduit  # before the Welcome: the client may call right after it
            conduit.send(cpb.ConduitFrame(welcome=welcome))
            self._spawn(self._serve, conduit)

    def _serve(self, conduit: FramedConduit) -> None:
        while not self._stop.is_set():
            try:
                frame = conduit.recv(timeout=0.2)
            except ConduitError as err:
                if err.type.name == "TIMEOUT":
                    continue
                for sid, c in list(self._sessions.items()):
                    if c is conduit:
                        del self._sessions[sid]  # the session ends with its connection
                conduit.close()
                return
            frame.close_fds()
            m = frame.message
            kind = m.WhichOneof("body")
            if kind == "redeem":
                self.refills.append(
                    m.redeem.refill
                )  # asked for, never granted: a broker before Redeem.refill
                for tok in m.redeem.tokens:
                    self.redeems += 1
                    self._deliver(conduit, tok)
            elif kind == "ping":
                conduit.send(cpb.ConduitFrame(pong=cpb.Pong(nonce=m.ping.nonce)))

    def _deliver(self, conduit: FramedConduit, token: bytes, name: str = "x") -> None:
        """Push a ``Deliver`` of ``deliver_items`` items with one descriptor (a fresh pipe's write end)."""
        r, w = os.pipe()
        self.delivered.add(os.fstat(w).st_ino)
        item = cpb.DeliverItem(token=token, name=name, info=pb.DescriptorInfo(kind=pb.KIND_PIPE))
        extra = [cpb.DeliverItem(token=token + b"-%d" % i, name=name) for i in range(1, self.deliver_items)]
        try:
            conduit.send(cpb.ConduitFrame(deliver=cpb.Deliver(items=[item, *extra])), [w])
        finally:
            os.close(r)
            os.close(w)

    def _session(self, context: Any) -> FramedConduit:
        sid = dict(context.invocation_metadata()).get("fdbroker-session", "")
        conduit = self._sessions.get(sid)
        if conduit is None:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no such session")
            raise AssertionError("context.abort() returned")
        return conduit

    # -- the RPCs the tests use ----------------------------------------------------------------------------------

    def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        self.calls.append("Get")
        conduit = self._session(context)
        token = os.urandom(16)
        resp = pb.GetResponse(handoffs=[pb.Handoff(token=token, name=request.name)])
        if request.prefetch:
            resp.prefetch_tokens.extend(os.urandom(16) for _ in range(request.prefetch))
            resp.prefetch_expire_time.FromNanoseconds(int((time.time() + self.prefetch_ttl) * 1e9))
        self._deliver(conduit, token, request.name)  # before the RPC returns, as the broker does
        return resp

    def Lease(self, request: pb.LeaseRequest, context: Any) -> pb.LeaseResponse:
        self.calls.append("Lease")
        conduit = self._session(context)
        token = os.urandom(16)
        resp = pb.LeaseResponse(lease_id=f"lease-{next(self._ids)}", epoch=1)  # lease-1, lease-2, ...
        resp.handoff.token = token
        resp.entry.name = request.name
        if self.deliver_lease:
            self._deliver(conduit, token, request.name)
        return resp

    def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        self.calls.append("Release")
        self._session(context)
        self.released.append(request.lease_id)
        return pb.ReleaseResponse()

    def Watch(self, request: pb.WatchRequest, context: Any) -> Iterator[pb.WatchResponse]:
        self.calls.append("Watch")
        time.sleep(self.watch_delay)
        yield pb.WatchResponse(header_revision=7)
        while context.is_active() and not self._stop.is_set():
            time.sleep(0.05)
