"""A bug in the broker is INTERNAL on every RPC, unary or streaming, wherever it is raised: never gRPC's UNKNOWN
(what grpc answers for an exception nobody mapped). In process: a real grpc.aio server over a Unix socket, the
real servicer, a broker whose method raises what no caller could provoke."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.policy import Policy
from fdbroker.broker.servicer import FdBrokerServicer, add_to_server
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc


def _bug(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug in the broker")


async def _status(patch: str, call: Callable[[Any], Any]) -> tuple[grpc.StatusCode, str]:
    broker = Broker(BrokerConfig(capacity=8), Policy.default(broker_uid=0))
    setattr(broker, patch, _bug)
    server = grpc.aio.server()
    add_to_server(FdBrokerServicer(broker), server)
    path = Path(tempfile.mkdtemp(prefix="fdb-", dir="/tmp")) / "control.sock"
    server.add_insecure_port(f"unix:{path}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as ch:
            try:
                await call(pb_grpc.FdBrokerStub(ch))
            except grpc.aio.AioRpcError as err:
                return err.code(), err.details() or ""
            raise AssertionError("the call succeeded")
    finally:
        await server.stop(None)
        broker.close()


async def _watch_first(stub: Any) -> Any:
    async for r in stub.Watch(pb.WatchRequest(prefix="a/"), timeout=10):
        return r


@pytest.mark.parametrize(
    ("patch", "call"),
    [
        ("stat", lambda stub: stub.Stat(pb.StatRequest(name="a/b"), timeout=10)),
        ("watch", _watch_first),  # opening the stream
        ("stamp", _watch_first),  # its first response
    ],
    ids=["stat", "watch-open", "watch-first-response"],
)
def test_a_bug_is_internal_on_every_rpc_and_never_unknown(patch: str, call: Callable[[Any], Any]) -> None:
    with quiet_servicer_log():
        code, details = asyncio.run(_status(patch, call))
    assert code == grpc.StatusCode.INTERNAL, (code, details)
    assert "internal error in the broker" in details


@contextlib.contextmanager
def quiet_servicer_log() -> Iterator[None]:
    """The servicer logs the traceback of a bug; here it is expected."""
    log = logging.getLogger("fdbroker.servicer")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
