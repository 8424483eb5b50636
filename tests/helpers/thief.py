"""An unprivileged client that tries, by every route we know, to obtain a descriptor it never deposited.

Run as uid 65534: ``thief.py RUN_DIR ROUNDS``. It drives the broker through raw gRPC calls and a raw conduit (so it
sees every frame and every descriptor the broker sends it), and prints one JSON report: the (st_dev, st_ino) of
every descriptor it received and of every descriptor it deposited itself, and how its requests were answered.
The test compares the two sets with the descriptors root deposited meanwhile.
"""

from __future__ import annotations

import collections
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc
from google.protobuf import duration_pb2
from secutil import Control, RawConduit

from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

MAX_SECONDS = 315_576_000_000  # the protobuf Duration maximum
TTLS = [
    (MAX_SECONDS, 999_999_999),
    (MAX_SECONDS, 0),
    (MAX_SECONDS + 1, 0),
    (2**62, 0),
    (-1, 0),
    (0, -1),
    (0, 1_000_000_000),
    (0, 999_999_999),
    (366 * 86400, 1),
    (0, 50_000_000),
]


class Thief:
    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.ctl = Control(run_dir)
        self.conduits: list[RawConduit] = []
        self.received: list[tuple[int, int]] = []
        self.deposited: list[tuple[int, int]] = []
        self.answers: collections.Counter[str] = collections.Counter()
        self.serial = 0

    # -- plumbing --------------------------------------------------------------------------------------------

    def conduit(self) -> RawConduit:
        rc = RawConduit(self.run_dir)
        self.conduits.append(rc)
        return rc

    def call(self, method: str, request: Any, rc: RawConduit | str | None) -> Any:
        session = rc.session_id if isinstance(rc, RawConduit) else rc
        try:
            r = self.ctl.call(method, request, session)
        except grpc.RpcError as err:
            self.answers[f"{method}:{err.code().name}"] += 1
            return None
        self.answers[f"{method}:OK"] += 1
        return r

    def drain(self, rc: RawConduit, timeout: float = 0.05) -> list[cpb.ConduitFrame]:
        """Every frame waiting on ``rc``; each descriptor's identity is recorded, then it is closed."""
        out: list[cpb.ConduitFrame] = []
        while True:
            try:
                f = rc.recv(timeout)
            except TimeoutError:
                return out
            except (EOFError, ConnectionError):
                return out
            except Exception as err:  # a non-fatal decoder report
                self.answers[f"frame-error:{type(err).__name__}"] += 1
                continue
            for fd in f.fds:
                st = os.fstat(fd)
                self.received.append((st.st_dev, st.st_ino))
            f.close_fds()
            self.answers[f"frame:{f.message.WhichOneof('body')}"] += 1
            out.append(f.message)

    def own_pipe(self) -> int:
        """A pipe read end of ours to deposit (its write end closed at once)."""
        r, w = os.pipe()
        os.close(w)
        st = os.fstat(r)
        self.deposited.append((st.st_dev, st.st_ino))
        return r

    def name(self) -> str:
        self.serial += 1
        return f"thief/{os.getpid()}/{self.serial}"

    def deposit(self, rc: RawConduit, token: bytes, fd: int) -> None:
        try:
            rc.send(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[token])), [fd])
        finally:
            os.close(fd)

    # -- routes ----------------------------------------------------------------------------------------------

    def bad_ttls(self, rc: RawConduit) -> None:
        for seconds, nanos in TTLS:
            name = self.name()
            req = pb.PutRequest(name=name)
            try:
                req.options.ttl.CopyFrom(duration_pb2.Duration(seconds=seconds, nanos=nanos))
            except (ValueError, OverflowError):
                continue  # not even encodable on this side
            r = self.call("Put", req, rc)
            if r is not None:
                self.deposit(rc, r.handoff.token, self.own_pipe())
            self.drain(rc)
            self.call("Take", pb.TakeRequest(name=name), rc)
            self.drain(rc)
            self.call("List", pb.ListRequest(prefix="thief/"), None)
            self.call("Delete", pb.DeleteRequest(name=name), rc)

    def replaced_and_deleted(self, rc: RawConduit) -> None:
        name = self.name()
        r = self.call("Put", pb.PutRequest(name=name), rc)
        if r is None:
            return
        self.deposit(rc, r.handoff.token, self.own_pipe())
        self.drain(rc)
        g = self.call("Get", pb.GetRequest(name=name, prefetch=8), rc)
        self.drain(rc)
        if g is None:
            return
        tokens = list(g.prefetch_tokens)
        r = self.call("Put", pb.PutRequest(name=name, replace=True), rc)
        if r is not None:
            self.deposit(rc, r.handoff.token, self.own_pipe())
            self.drain(rc)
        # Old prefetched tokens after the replace, then after a delete: never the new descriptor, never anything.
        rc.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=tokens[:4])))
        self.drain(rc)
        self.call("Delete", pb.DeleteRequest(name=name), rc)
        rc.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=tokens[4:])))
        self.drain(rc)

    def racing(self, rc: RawConduit) -> None:
        name = self.name()
        req = pb.PutRequest(name=name)
        req.options.ttl.CopyFrom(duration_pb2.Duration(nanos=random.choice([1_000_000, 20_000_000])))
        r = self.call("Put", req, rc)
        if r is None:
            return
        self.deposit(rc, r.handoff.token, self.own_pipe())
        t = self.call("Take", pb.TakeRequest(name=name), rc)
        self.call("Delete", pb.DeleteRequest(name=name), rc)
        self.call("Get", pb.GetRequest(name=name, prefetch=4), rc)
        if t is not None:
            rc.send(cpb.ConduitFrame(ack=cpb.Ack(tokens=[t.handoff.token])))
        self.drain(rc)

    def ephemeral(self) -> None:
        first = RawConduit(self.run_dir)
        name = self.name()
        req = pb.PutRequest(name=name)
        req.options.ephemeral = True
        r = self.call("Put", req, first)
        if r is not None:
            self.deposit(first, r.handoff.token, self.own_pipe())
            self.drain(first)
        g = self.call("Get", pb.GetRequest(name=name, prefetch=4), first)
        tokens = list(g.prefetch_tokens) if g is not None else []
        self.drain(first)
        old_session = first.session_id
        first.close()
        time.sleep(0.02)
        second = self.conduit()
        self.call("Get", pb.GetRequest(name=name), second)
        second.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=tokens)))  # another session's (dead) tokens
        self.call("Get", pb.GetRequest(name=name), old_session)  # the dead session's id
        self.drain(second)

    def others(self, rc: RawConduit, root_names: list[str]) -> None:
        for name in root_names:
            self.call("Get", pb.GetRequest(name=name, prefetch=4), rc)
            self.call("Take", pb.TakeRequest(name=name), rc)
            req = pb.LeaseRequest(name=name)
            req.ttl.CopyFrom(duration_pb2.Duration(seconds=1))
            self.call("Lease", req, rc)
            self.call("Delete", pb.DeleteRequest(name=name), rc)
            r = self.call("Put", pb.PutRequest(name=name, replace=True), rc)
            if r is not None:
                self.deposit(rc, r.handoff.token, self.own_pipe())
        rc.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[os.urandom(32) for _ in range(8)])))
        rc.send(cpb.ConduitFrame(ack=cpb.Ack(tokens=[os.urandom(32) for _ in range(8)])))
        self.drain(rc)

    def run(self, rounds: int) -> dict[str, Any]:
        rc = self.conduit()
        for i in range(rounds):
            root_names = [e.name for e in self.ctl.call("List", pb.ListRequest(prefix="root/")).entries]
            self.bad_ttls(rc)
            self.replaced_and_deleted(rc)
            self.racing(rc)
            self.ephemeral()
            self.others(rc, root_names)
            if i % 3 == 2:  # a fresh session now and then
                rc = self.conduit()
        time.sleep(0.1)
        for c in self.conduits:
            self.drain(c)
            c.close()
        self.ctl.close()
        return {"received": self.received, "deposited": self.deposited, "answers": dict(self.answers)}


if __name__ == "__main__":
    random.seed(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    print(json.dumps(Thief(sys.argv[1]).run(int(sys.argv[2]))))
