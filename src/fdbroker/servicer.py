"""gRPC glue: ``fdbroker.v1.FdBroker`` RPCs to :class:`fdbroker.broker.Broker` calls.

Thin on purpose: read the session from metadata, call the broker, map :class:`BrokerError` to a status in one
place (:func:`_abort`). No registry logic lives here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from fdbroker.broker import Broker
from fdbroker.errors import BrokerError, OutOfRange, ResourceExhausted
from fdbroker.policy import Identity
from fdbroker.sessions import SESSION_METADATA_KEY, Session
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger("fdbroker.servicer")

OLDEST_REVISION_KEY = "fdbroker-oldest-revision"

T = TypeVar("T")


def _session_id(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA_KEY:
            return value if isinstance(value, str) else value.decode()
    return None


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: BrokerError) -> None:
    """The one place a BrokerError becomes a gRPC status."""
    if isinstance(err, OutOfRange):
        context.set_trailing_metadata(((OLDEST_REVISION_KEY, str(err.oldest_revision)),))
    await context.abort(grpc.StatusCode[err.code.name], err.message)


class FdBrokerServicer(pb_grpc.FdBrokerServicer):  # type: ignore[misc]
    """The control-plane service."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Session | None, Identity | None]:
        s = self.broker.session_for(_session_id(context))
        return s, (s.identity if s else None)

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], T]) -> T:
        try:
            return fn()
        except BrokerError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from err

    async def _acall(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except BrokerError as err:
            await _abort(context, err)
            raise AssertionError("unreachable") from err

    async def GetInfo(self, request: pb.GetInfoRequest, context: Any) -> pb.GetInfoResponse:
        def run() -> pb.GetInfoResponse:
            s, ident = self._caller(context)
            return self.broker.info(s, ident)

        return await self._call(context, run)

    async def Put(self, request: pb.PutRequest, context: Any) -> pb.PutResponse:
        return await self._call(context, lambda: self.broker.put_begin(self._caller(context)[0], request))

    async def BatchPut(self, request: pb.BatchPutRequest, context: Any) -> pb.BatchPutResponse:
        return await self._call(
            context, lambda: self.broker.batch_put_begin(self._caller(context)[0], request)
        )

    async def Get(self, request: pb.GetRequest, context: Any) -> pb.GetResponse:
        return await self._call(
            context, lambda: self.broker.get(self._caller(context)[0], request.name, request.prefetch)
        )

    async def BatchGet(self, request: pb.BatchGetRequest, context: Any) -> pb.BatchGetResponse:
        return await self._call(
            context, lambda: self.broker.batch_get(self._caller(context)[0], request.names, request.prefetch)
        )

    async def Take(self, request: pb.TakeRequest, context: Any) -> pb.TakeResponse:
        return await self._call(
            context, lambda: self.broker.take(self._caller(context)[0], request.name, request.if_revision)
        )

    async def Delete(self, request: pb.DeleteRequest, context: Any) -> pb.DeleteResponse:
        return await self._call(
            context, lambda: self.broker.delete(self._caller(context)[0], request.name, request.if_revision)
        )

    async def Stat(self, request: pb.StatRequest, context: Any) -> pb.StatResponse:
        return await self._call(context, lambda: self.broker.stat(self._caller(context)[1], request.name))

    async def List(self, request: pb.ListRequest, context: Any) -> pb.ListResponse:
        return await self._call(context, lambda: self.broker.list(self._caller(context)[1], request))

    async def Lease(self, request: pb.LeaseRequest, context: Any) -> pb.LeaseResponse:
        return await self._acall(
            context,
            lambda: self.broker.lease(self._caller(context)[0], request, context.time_remaining()),
        )

    async def KeepAlive(
        self, request_iterator: AsyncIterator[pb.KeepAliveRequest], context: Any
    ) -> AsyncIterator[pb.KeepAliveResponse]:
        try:
            s = self._caller(context)[0]
            async for req in request_iterator:
                yield self.broker.keepalive(s, req.lease_ids)
        except BrokerError as err:
            await _abort(context, err)

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        return await self._call(
            context,
            lambda: self.broker.release(
                self._caller(context)[0], request.lease_id, request.return_descriptor
            ),
        )

    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.WatchResponse]:
        broker = self.broker
        reg = broker.registry
        queue: asyncio.Queue[pb.Event | None] = asyncio.Queue()
        limit = broker.config.watch_queue
        overflow = False
        prefix = request.prefix

        ident: Identity | None = None

        def visible(ev: pb.Event) -> bool:
            return ev.name.startswith(prefix) and broker.policy.allows(
                ident, "watch", ev.name, ev.entry.owner.uid
            )

        def listener(ev: pb.Event) -> None:
            nonlocal overflow
            if overflow or not visible(ev):
                return
            if queue.qsize() >= limit:
                # Cut off: drop what was queued (the watcher resumes from the last revision it was sent) so a
                # stalled watcher holds no events at all while it waits to be told.
                overflow = True
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)
                return
            queue.put_nowait(ev)

        try:
            _, ident = self._caller(context)
            broker.policy.check(ident, "watch")
            # Subscribe and read the history in one step of the loop: nothing can fall between them.
            start = request.start_revision
            backlog = [ev for ev in reg.history_since(start, prefix) if visible(ev)] if start else []
            unsubscribe = reg.subscribe(listener)
            header = (start - 1) if start else reg.revision
        except BrokerError as err:
            await _abort(context, err)
            return
        try:
            yield pb.WatchResponse(header_revision=header)
            last = header
            if backlog:
                last = backlog[-1].revision
                for i in range(0, len(backlog), 256):
                    yield pb.WatchResponse(events=backlog[i : i + 256])
            while True:
                ev = await queue.get()
                batch: list[pb.Event] = []
                cut_off = False
                while True:
                    if ev is None:
                        cut_off = True
                        break
                    if ev.revision > last:
                        batch.append(ev)
                        last = ev.revision
                    if queue.empty() or len(batch) >= 256:
                        break
                    ev = queue.get_nowait()
                if batch:
                    yield pb.WatchResponse(events=batch)
                if cut_off:
                    # Everything up to `last` was sent (the batch above included); nothing after it was.
                    cut = ResourceExhausted(
                        f"watcher fell more than {limit} events behind and was cut off; "
                        f"resume with start_revision={last + 1}"
                    )
                    await _abort(context, cut)
                    return
        finally:
            unsubscribe()
