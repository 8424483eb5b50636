"""Read-only queries on the conduit (fdbroker.client.quick): same answers as the RPCs, no gRPC loaded."""

from __future__ import annotations

import os
import select
import socket

import pytest
from brokerutil import run_client

from fdbroker.client.quick import QuickClient
from fdbroker.conduit.frames import FramedConduit
from fdbroker.errors import InvalidArgument, NotFound
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb


def test_quick_list_pages_across_frames_and_matches_the_rpc(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            names = [f"q/{i:05d}" for i in range(3000)]  # ~3000 x 70 bytes: several 64 KiB frames
            for i in range(0, len(names), 1000):
                c.put_many([(n, w) for n in names[i : i + 1000]], labels={"set": "q"})
            rpc = c.list("q/")
            with QuickClient(fdbroker_broker.run_dir) as q:
                quick = q.list("q/")
                assert [e.name for e in quick] == [e.name for e in rpc] == names
                assert quick.revision == rpc.revision
                assert [e.name for e in q.list("q/0000")] == names[:10]
                assert q.stat("q/00042").kind == "pipe"
                assert len(q.list(selector="set=q")) == 3000
                with pytest.raises(NotFound) as nf:
                    q.stat("q/none")
                assert "q/none" in str(nf.value)
                with pytest.raises(InvalidArgument):
                    q.stat("bad//name")
                info = q.info()
                assert info.entries >= 3000 and info.caller is not None and info.caller[0] == os.getpid()
            for i in range(0, len(names)):
                c.delete(names[i])
    finally:
        os.close(r)
        os.close(w)


def test_quick_client_loads_no_grpc(fdbroker_broker):
    out = run_client(
        fdbroker_broker.run_dir,
        """
        import sys
        from fdbroker.client.quick import QuickClient
        with QuickClient() as q:
            print(len(q.list()), q.info().version)
        print("grpc" in sys.modules, "asyncio" in sys.modules)
        """,
    )
    assert out.stdout.splitlines()[-1] == "False False", out.stdout


def test_descriptor_attached_to_a_query_is_closed_and_reported(fdbroker_broker):
    r, w = os.pipe()
    try:
        with FramedConduit.connect(str(fdbroker_broker.run_dir / "conduit.sock"), timeout=5) as fc:
            fc.recv(timeout=5).close_fds()  # welcome
            fc.send(cpb.ConduitFrame(query=cpb.Query(id=7, info=pb.GetInfoRequest())), [w])
            kinds = []
            for _ in range(2):
                f = fc.recv(timeout=5)
                f.close_fds()
                kinds.append(f.message.WhichOneof("body"))
            assert sorted(kinds) == ["error", "query_result"]
        os.close(w)
        w = -1
        # The broker closes it on its closer thread, maybe after its answers went out: wait for the EOF (bounded).
        assert select.select([r], [], [], 30)[0] == [r]
        assert os.read(r, 1) == b""  # the broker kept no copy of the write end: EOF
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_cli_ls_uses_the_conduit(fdbroker_broker):
    s = socket.create_server(("127.0.0.1", 0))
    try:
        with fdbroker_broker.client() as c:
            c.put("web/x", s)
        out = run_client(
            fdbroker_broker.run_dir,
            """
            import sys
            from fdbroker.cli import main
            try:
                main(["ls"])
            except SystemExit as e:
                assert not e.code, e.code
            print("grpc" in sys.modules)
            """,
        )
        assert "web/x" in out.stdout and "tcp-listener" in out.stdout
        assert out.stdout.splitlines()[-1] == "False"
        with fdbroker_broker.client() as c:
            c.delete("web/x")
    finally:
        s.close()
