"""Prometheus/OpenMetrics metrics of a broker, and the opt-in endpoint that serves them.

Built on ``prometheus_client`` (its metric types, its text and OpenMetrics encoders, content negotiation),
with a registry of the broker's own (nothing global). Two kinds of metric:

* **events**, counted or timed where they happen (RPCs and conduit frames by method and status, handoffs by
  operation and outcome, policy denials, quota refusals, lease ends, watch events, survival events);
* **state**, read from the broker when a scraper asks (:class:`StateView`): entries by kind, descriptors open
  and the limit, sessions by uid, leases held and waiting, watchers, the token book — nothing to keep in step.

The endpoint (``fdbroker serve --metrics-listen ADDRESS``; ``HOST:PORT`` or ``unix:PATH``) is a minimal HTTP/1.1
responder on the broker's own event loop, so a scrape sees one consistent moment of the broker: ``GET /metrics``
(``/`` too) answers the exposition (OpenMetrics when the scraper's ``Accept`` asks for it), anything else 404.
A request must arrive whole within :data:`REQUEST_TIMEOUT` and fit in :data:`MAX_REQUEST`; a client that does not
read its answer is dropped after the same time. It is off unless asked for: the broker never listens on a
network socket by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

log = logging.getLogger("fdbroker.metrics")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


@dataclass
class State:
    """A snapshot of what the broker holds, taken at scrape time."""

    entries_by_kind: Mapping[str, int] = field(default_factory=dict)
    capacity: int = 0
    descriptors_open: int = 0
    descriptor_limit: int = 0
    sessions_by_uid: Mapping[int, int] = field(default_factory=dict)
    leases_held: int = 0
    lease_waiters: int = 0
    watchers: int = 0
    pending_tokens: int = 0
    prefetch_tokens: int = 0
    pending_closes: int = 0
    revision: int = 0
    keeper_restarts: int = 0


class StateView(Protocol):
    """What the broker offers the metrics collector."""

    def metrics_state(self) -> State: ...


class Metrics:
    """Every metric of one broker, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.rpcs = Counter(
            "fdbroker_rpcs", "RPCs answered, by method and status code", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "fdbroker_rpc_duration_seconds",
            "Time to answer an RPC (streaming RPCs: to open the stream), by method",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.frames = Counter(
            "fdbroker_conduit_frames",
            "Conduit frames handled, by kind and outcome code",
            ["kind", "code"],
            registry=r,
        )
        self.frame_seconds = Histogram(
            "fdbroker_conduit_frame_duration_seconds",
            "Time to handle a conduit frame, by kind",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.handoffs = Counter(
            "fdbroker_handoffs",
            "Descriptors moved or refused, by operation (put, get, take, lease, checkin) and outcome",
            ["operation", "outcome"],
            registry=r,
        )
        self.denials = Counter(
            "fdbroker_policy_denials", "Calls the policy refused, by action", ["action"], registry=r
        )
        self.quota_refusals = Counter(
            "fdbroker_quota_refusals", "Calls refused RESOURCE_EXHAUSTED, by quota", ["quota"], registry=r
        )
        self.lease_ends = Counter(
            "fdbroker_lease_ends",
            "Leases that ended, by reason (released, expired, holder_died, …)",
            ["reason"],
            registry=r,
        )
        self.lease_grants = Counter("fdbroker_lease_grants", "Leases granted", registry=r)
        self.watch_events = Counter(
            "fdbroker_watch_events", "Registry events recorded for watchers", registry=r
        )
        self.watch_cutoffs = Counter(
            "fdbroker_watch_cutoffs", "Watch streams cut off for falling behind", registry=r
        )
        self.survival = Counter(
            "fdbroker_survival_events",
            "Takeover, keeper and fd-store events (handover_sent, handover_received, fdstore_restored, …)",
            ["event"],
            registry=r,
        )
        self.conduit_pauses = Counter(
            "fdbroker_conduit_read_pauses",
            "Times a uid's conduit reads were paused at its in-flight cap",
            registry=r,
        )

    def attach(self, view: StateView) -> None:
        """Read ``view`` at every scrape for the state gauges."""
        self.registry.register(_StateCollector(view))

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics encoded as the ``Accept`` header asks: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _StateCollector(Collector):
    def __init__(self, view: StateView) -> None:
        self.view = view

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self.view.metrics_state()
        by_kind = GaugeMetricFamily(
            "fdbroker_entries", "Entries held, by kind of descriptor", labels=["kind"]
        )
        for kind, n in sorted(s.entries_by_kind.items()):
            by_kind.add_metric([kind], n)
        yield by_kind
        yield GaugeMetricFamily(
            "fdbroker_entries_capacity", "Entries the broker can hold in all", value=s.capacity
        )
        yield GaugeMetricFamily(
            "fdbroker_descriptors_open", "Descriptors open in the broker process", value=s.descriptors_open
        )
        yield GaugeMetricFamily(
            "fdbroker_descriptors_limit", "The broker's RLIMIT_NOFILE (soft)", value=s.descriptor_limit
        )
        sessions = GaugeMetricFamily("fdbroker_sessions", "Live sessions, by uid", labels=["uid"])
        for uid, n in sorted(s.sessions_by_uid.items()):
            sessions.add_metric([str(uid)], n)
        yield sessions
        yield GaugeMetricFamily("fdbroker_leases_held", "Leases held", value=s.leases_held)
        yield GaugeMetricFamily("fdbroker_lease_waiters", "Lease requests queued", value=s.lease_waiters)
        yield GaugeMetricFamily("fdbroker_watchers", "Open watch streams", value=s.watchers)
        yield GaugeMetricFamily(
            "fdbroker_tokens_pending",
            "Handoff tokens for explicit operations in the book",
            value=s.pending_tokens,
        )
        yield GaugeMetricFamily(
            "fdbroker_tokens_prefetch", "Speculative (prefetch) tokens in the book", value=s.prefetch_tokens
        )
        yield GaugeMetricFamily(
            "fdbroker_closes_pending",
            "Descriptors given up and not yet closed by the closer",
            value=s.pending_closes,
        )
        yield GaugeMetricFamily("fdbroker_revision", "The registry's revision", value=s.revision)
        yield GaugeMetricFamily(
            "fdbroker_keeper_restarts", "Times the keeper restarted the broker", value=s.keeper_restarts
        )


def open_fd_count() -> int:
    """Descriptors open in this process (``/proc/self/fd``)."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the directory's own
    except OSError:
        return 0


# -- the endpoint ----------------------------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on a TCP address or a Unix socket, on the running event loop."""

    def __init__(self, metrics: Metrics, server: asyncio.Server, where: str) -> None:
        self.metrics = metrics
        self.server = server
        self.where = where

    @classmethod
    async def start(
        cls, metrics: Metrics, address: str, *, on_error: Callable[[str], None] | None = None
    ) -> MetricsServer:
        """Listen on ``address`` (``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``). ``ValueError`` for a malformed
        address; ``OSError`` if it cannot listen."""

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _serve_one(metrics, reader, writer)

        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if not path:
                raise ValueError("--metrics-listen unix:PATH needs a path")
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket of ours; anything else at PATH makes listen fail
            server = await asyncio.start_unix_server(handle, path=path)
            return cls(metrics, server, address)
        host, port = _host_port(address)
        server = await asyncio.start_server(handle, host=host, port=port)
        bound = server.sockets[0].getsockname()
        return cls(
            metrics, server, f"{bound[0]}:{bound[1]}" if host.count(":") == 0 else f"[{bound[0]}]:{bound[1]}"
        )

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(
            f"--metrics-listen {address!r}: expected HOST:PORT (e.g. 127.0.0.1:9464) or unix:PATH"
        )
    return host or "127.0.0.1", int(port)


async def _serve_one(metrics: Metrics, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        if len(head) > MAX_REQUEST:
            raise ValueError("request too large")
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        accept = ""
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "accept":
                accept = v.strip()
        if method not in ("GET", "HEAD") or path not in ("/metrics", "/"):
            body, ctype, status = b"not found: GET /metrics\n", "text/plain; charset=utf-8", "404 Not Found"
        else:
            body, ctype = metrics.exposition(accept)
            status = "200 OK"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        if method != "HEAD":
            writer.write(body)
        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
    except (
        asyncio.IncompleteReadError,
        asyncio.LimitOverrunError,
        TimeoutError,
        ValueError,
        ConnectionError,
    ):
        pass
    except Exception:  # a bug: log it, keep serving
        log.exception("metrics request failed")
    finally:
        writer.close()
