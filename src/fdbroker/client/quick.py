"""Read-only queries over the conduit, for programs that must start fast.

``import grpc`` alone costs ~80 ms here (it loads asyncio); a bare gRPC call from a fresh process ~110 ms. A
command that only lists or describes can ask on the conduit instead (``Query``/``QueryResult`` frames in the
proto): same answers, same status codes, same policy, evaluated for the kernel-verified identity of the
connection. ``fdbroker ls``, ``stat`` and ``status`` use this; everything that moves a descriptor, leases or
watches uses :class:`fdbroker.Client`.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

from fdbroker.client import flows
from fdbroker.client.models import Entry, Info, Listing
from fdbroker.client.session import error_from_frame
from fdbroker.client.steps import Dial, Run, Step, drive
from fdbroker.client.trust import Paths, Trust, TrustUids, socket_address
from fdbroker.conduit.errors import ConduitError
from fdbroker.conduit.frames import FramedConduit
from fdbroker.errors import Aborted
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

__all__ = ["Listing", "QuickClient"]


class QuickClient:
    """A conduit session used only for ``list``, ``stat`` and ``info``. Use it with ``with``, or call close().

    Trusts the broker as :class:`fdbroker.Client` does (``trust_uids``, ``$FDBROKER_TRUST_UID``), checked before
    anything is sent."""

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        trust_uids: TrustUids | None = None,
    ) -> None:
        self.paths = Paths.resolve(run_dir)
        self.trust = Trust(trust_uids)
        self.timeout = timeout
        self._ids = itertools.count(1)
        dir_fd = self.trust.open_run_dir(self.paths)
        self._address = socket_address(dir_fd, self.paths.conduit)
        try:
            # the same handshake as the full clients: the peer is checked before anything is sent
            self._conduit: FramedConduit = drive(Run(flows.handshake(self.paths, self.trust)), self._step)[0]
        finally:
            os.close(dir_fd)  # only the connection matters from here on

    def _step(self, step: Step, run: Run[Any]) -> Any:
        if isinstance(step, Dial):
            return FramedConduit.connect(self._address, timeout=self.timeout)
        return step.conduit.recv(timeout=self.timeout)  # type: ignore[union-attr]

    def close(self) -> None:
        self._conduit.close()

    def __enter__(self) -> QuickClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ask(self, q: cpb.Query) -> cpb.QueryResult:
        q.id = next(self._ids)
        try:
            self._conduit.send(cpb.ConduitFrame(query=q), timeout=self.timeout)
            while True:
                frame = self._conduit.recv(timeout=self.timeout)
                frame.close_fds()
                m = frame.message
                kind = m.WhichOneof("body")
                if kind == "query_result" and m.query_result.id == q.id:
                    r = m.query_result
                    if r.WhichOneof("result") == "error":
                        raise error_from_frame(r.error)
                    return r
                if kind == "error":
                    raise error_from_frame(m.error)
        except ConduitError as err:
            raise Aborted(f"the conduit to the broker at {self.paths.run_dir} broke: {err}") from None

    def list(self, prefix: str = "", *, selector: str = "") -> Listing:
        """Every entry under ``prefix`` matching ``selector``, following pages (each as large as a frame allows)."""
        out = Listing()
        token = ""
        first = True
        while True:
            r = self._ask(
                cpb.Query(list=pb.ListRequest(prefix=prefix, label_selector=selector, page_token=token))
            )
            if first:
                out.revision = r.list.header.revision
                first = False
            out.extend(Entry(e) for e in r.list.entries)
            token = r.list.next_page_token
            if not token:
                return out

    def stat(self, name: str) -> Entry:
        return Entry(self._ask(cpb.Query(stat=pb.StatRequest(name=name))).stat.entry)

    def info(self) -> Info:
        return Info.from_pb(self._ask(cpb.Query(info=pb.GetInfoRequest())).info)
