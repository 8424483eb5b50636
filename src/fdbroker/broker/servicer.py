"""gRPC glue: ``fdbroker.v1.FdBroker`` RPCs to :class:`fdbroker.broker.Broker` calls.

Thin on purpose: read the session from metadata, call the broker, map :class:`BrokerError` to a status in one
place (:func:`_abort`). No registry logic lives here. The handlers :func:`add_to_server` registers are the one
place every RPC is counted and timed (``fdbroker_rpcs``, ``fdbroker_rpc_duration_seconds``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from fdbroker.broker.core import Broker
from fdbroker.broker.metrics import Metrics
from fdbroker.broker.policy import Identity
from fdbroker.broker.sessions import Session
from fdbroker.errors import BrokerError, InvalidArgument, OutOfRange
from fdbroker.protocol import OLDEST_REVISION_KEY, SESSION_METADATA_KEY
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc

log = logging.getLogger("fdbroker.servicer")


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


async def _internal(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    """A bug, not the caller's fault: logged with its traceback, answered INTERNAL (never grpc's UNKNOWN)."""
    log.exception("internal error serving an RPC")
    await context.abort(grpc.StatusCode.INTERNAL, "internal error in the broker; its log has the details")


class _Undecodable:
    """What the request deserializer returns for bytes that are not the method's request message."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self, method: str) -> InvalidArgument:
        return InvalidArgument(f"the {method} request is not a valid fdbroker.v1 message: {self.reason}")


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    parse = message_class.FromString

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as err:  # DecodeError, and whatever else hostile bytes provoke
            return _Undecodable(str(err) or type(err).__name__)

    return deserialize


def _serializer(message_class: Any) -> Callable[[Any], bytes]:
    """Serialize a response; bytes pass through (Watch shares one encoded response among its watchers)."""
    serialize = message_class.SerializeToString

    def serializer(m: Any) -> bytes:
        return m if isinstance(m, bytes) else serialize(m)

    return serializer


def add_to_server(servicer: FdBrokerServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` for every RPC of ``fdbroker.v1.FdBroker``.

    Unlike the generated ``add_FdBrokerServicer_to_server``, an undecodable request is answered
    INVALID_ARGUMENT (gRPC's own deserializer failure is UNKNOWN): the deserializer returns a marker and the
    handler refuses it before the servicer sees it. Every handler counts its RPC by status code and times it
    (a streaming RPC: to its first response) in the broker's metrics.
    """
    metrics = servicer.broker.metrics
    service = pb.DESCRIPTOR.services_by_name["FdBroker"]
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for m in service.methods:
        req_cls = getattr(pb, m.input_type.name)
        resp_cls = getattr(pb, m.output_type.name)
        fn = getattr(servicer, m.name)
        kw = {"request_deserializer": _lenient(req_cls), "response_serializer": _serializer(resp_cls)}
        if m.client_streaming and m.server_streaming:
            handler = _checked_stream_stream(m.name, fn, metrics)
            handlers[m.name] = grpc.stream_stream_rpc_method_handler(handler, **kw)
        elif m.server_streaming:
            handler = _checked_unary_stream(m.name, fn, metrics)
            handlers[m.name] = grpc.unary_stream_rpc_method_handler(handler, **kw)
        elif not m.client_streaming:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(_checked_unary(m.name, fn, metrics), **kw)
        else:  # pragma: no cover - the service has no client-streaming-only RPC
            raise TypeError(f"client-streaming RPC {m.name} is not supported")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))


def _status(context: Any, exc: BaseException) -> str:
    """The status an RPC that raised ``exc`` ended with: the code it was aborted with, else CANCELLED for a
    cancellation (the client went away), else UNKNOWN (what gRPC answers for an exception nobody mapped)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        return "CANCELLED"
    return "UNKNOWN"


def _checked_unary(
    method: str, fn: Callable[[Any, Any], Awaitable[Any]], metrics: Metrics
) -> Callable[[Any, Any], Awaitable[Any]]:
    async def handler(request: Any, context: Any) -> Any:
        t0 = time.perf_counter()
        code = "OK"
        try:
            if isinstance(request, _Undecodable):
                await _abort(context, request.error(method))
            return await fn(request, context)
        except BaseException as exc:
            code = _status(context, exc)
            raise
        finally:
            metrics.rpc(method, code, time.perf_counter() - t0)

    return handler


def _checked_unary_stream(
    method: str, fn: Callable[[Any, Any], AsyncIterator[Any]], metrics: Metrics
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def handler(request: Any, context: Any) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        first: float | None = None
        code = "OK"
        try:
            if isinstance(request, _Undecodable):
                await _abort(context, request.error(method))
            async for item in fn(request, context):
                if first is None:
                    first = time.perf_counter() - t0
                yield item
        except BaseException as exc:
            code = _status(context, exc)
            raise
        finally:
            metrics.rpc(method, code, time.perf_counter() - t0 if first is None else first)

    return handler


def _checked_stream_stream(
    method: str, fn: Callable[[Any, Any], AsyncIterator[Any]], metrics: Metrics
) -> Callable[[Any, Any], AsyncIterator[Any]]:
    async def requests(it: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in it:
            if isinstance(request, _Undecodable):
                raise request.error(method)  # a BrokerError: the servicer answers it like its own
            yield request

    async def handler(request_iterator: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        t0 = time.perf_counter()
        first: float | None = None
        code = "OK"
        try:
            async for item in fn(requests(request_iterator), context):
                if first is None:
                    first = time.perf_counter() - t0
                yield item
        except BaseException as exc:
            code = _status(context, exc)
            raise
        finally:
            metrics.rpc(method, code, time.perf_counter() - t0 if first is None else first)

    return handler


class FdBrokerServicer(pb_grpc.FdBrokerServicer):  # type: ignore[misc]
    """The control-plane service."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Session | None, Identity | None]:
        s = self.broker.session_for(_session_id(context))
        return s, (s.identity if s else None)

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], T]) -> T:
        try:
            return self.broker.stamp(fn())  # type: ignore[no-any-return]
        except BrokerError as err:
            await _abort(context, err)
        except Exception:
            await _internal(context)
        raise AssertionError("unreachable")

    async def _acall(self, context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return self.broker.stamp(await fn())  # type: ignore[no-any-return]
        except BrokerError as err:
            await _abort(context, err)
        except Exception:
            await _internal(context)
        raise AssertionError("unreachable")

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
                yield self.broker.stamp(self.broker.keepalive(s, req.lease_ids))
        except BrokerError as err:
            await _abort(context, err)
        except Exception:
            await _internal(context)

    async def Release(self, request: pb.ReleaseRequest, context: Any) -> pb.ReleaseResponse:
        return await self._call(
            context,
            lambda: self.broker.release(
                self._caller(context)[0], request.lease_id, request.return_descriptor
            ),
        )

    async def Watch(self, request: pb.WatchRequest, context: Any) -> AsyncIterator[pb.WatchResponse]:
        # Errors are mapped like every other RPC's (a bug is INTERNAL, never grpc's UNKNOWN), whether they come
        # from opening the stream, its first response or any later read.
        try:
            _, ident = self._caller(context)
            w = self.broker.watch(ident, request.prefix, request.start_revision)
        except BrokerError as err:
            await _abort(context, err)
            return
        except Exception:
            await _internal(context)
            return
        try:
            yield self.broker.stamp(pb.WatchResponse(header_revision=w.header))
            while True:
                data = w.read_encoded()
                if data is not None:
                    yield data  # type: ignore[misc]  # a serialized WatchResponse, shared (see add_to_server)
                else:
                    await w.wait()
        except BrokerError as err:
            await _abort(context, err)
        except Exception:
            await _internal(context)
        finally:
            w.close()
