"""Prometheus/OpenMetrics metrics of a broker, and the opt-in endpoint that serves them.

Built on ``prometheus_client`` (its metric types, its text and OpenMetrics encoders, content negotiation),
with a registry of the broker's own (nothing global). Two kinds of metric:

* **events**, counted or timed where they happen (RPCs and conduit frames by method and status, handoffs by
  operation and outcome, policy denials, quota refusals, lease grants and ends, watch events and cut-offs,
  conduit read pauses), kept as plain numbers (:class:`EventCounter`, :class:`EventHistogram`): they change
  and are scraped on the broker's one event loop, so they need none of the locks ``prometheus_client``'s own
  metric values take (``Counter.labels(...).inc()`` costs ~1.4 µs, a kept child's ``inc`` ~0.4 µs, a histogram
  observation ~1 µs; an increment here is one dictionary update);
* **state**, read when a scraper asks (a :class:`StateView` returns a :class:`State`): entries by kind, descriptors
  open and the limit, sessions by uid, leases held and waiting, watchers, the token book, the closer's queue, the
  revision, survival — nothing to keep in step.

docs/deploy.md ("Operating it") lists every metric with its meaning.

The endpoint (``fdbroker serve --metrics-listen ADDRESS``; ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``) is a
minimal HTTP/1.1 responder on the broker's own event loop, so a scrape sees one consistent moment of the broker:
``GET /metrics`` (``/`` too) answers the exposition (OpenMetrics when the scraper's ``Accept`` asks for it),
anything else 404. A request must arrive whole within :data:`REQUEST_TIMEOUT` and fit in :data:`MAX_REQUEST`; a
client that does not read its answer is dropped after the same time; at most :data:`MAX_CONNECTIONS` are served
at once: past that, a newcomer evicts the oldest connection whose request has not arrived yet (so idle or
slowloris connections cannot lock a scraper out), or is closed at once if every slot is answering, so the endpoint can never eat the descriptors the broker keeps in reserve. It
is off unless asked for: the broker never listens on a network socket by itself.

Descriptor ownership: the endpoint owns its listening socket and each accepted connection; :meth:`MetricsServer.close`
closes the listener and removes a Unix socket it created.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import errno
import logging
import os
import socket
import stat
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from fdbroker import __version__

log = logging.getLogger("fdbroker.metrics")

REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 8192
MAX_CONNECTIONS = 8
LATENCY_BUCKETS = (
    0.00005,
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
    # Survival (filled by the server): the keeper's restart count, and events of this process by name
    # (takeover, handover, handover_failed, fdstore_failed); fdstore_descriptors is None without an fd store.
    keeper_restarts: int = 0
    survival_events: Mapping[str, int] = field(default_factory=dict)
    fdstore_descriptors: int | None = None


class StateView(Protocol):
    """What the broker offers the metrics collector."""

    def metrics_state(self) -> State: ...


class EventCounter:
    """A counter family kept as plain numbers by label values. The broker changes its metrics on its one event
    loop only (and scrapes them there), so they need none of the lock ``prometheus_client``'s own values take on
    every change: an increment is one dictionary update."""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = ()) -> None:
        self.name = name
        self.doc = doc
        self.labels = labels
        self.values: dict[tuple[str, ...], float] = {}

    def inc(self, *labels: str, n: float = 1) -> None:
        """Add ``n`` to the series of ``labels`` (one value per label name)."""
        v = self.values
        v[labels] = v.get(labels, 0) + n

    def family(self) -> Metric:
        f = CounterMetricFamily(self.name, self.doc, labels=list(self.labels))
        for labels, value in sorted(self.values.items()):
            f.add_metric(list(labels), value)
        return f


class EventHistogram:
    """A histogram family by one label, kept as plain numbers (see :class:`EventCounter`): an observation is a
    bisection and two list updates."""

    def __init__(self, name: str, doc: str, label: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.name = name
        self.doc = doc
        self.label = label
        self.bounds = buckets
        self.series: dict[
            str, list[float]
        ] = {}  # label value -> count per bucket (the last: +Inf), then the sum

    def observe(self, label: str, value: float) -> None:
        s = self.series.get(label)
        if s is None:
            s = self.series[label] = [0.0] * (len(self.bounds) + 2)
        s[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket whose bound is >= value ("le")
        s[-1] += value

    def family(self) -> Metric:
        f = HistogramMetricFamily(self.name, self.doc, labels=[self.label])
        for label, s in sorted(self.series.items()):
            cumulative, buckets = 0.0, []
            for bound, n in zip((*self.bounds, float("inf")), s[:-1], strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), cumulative))  # type: ignore[no-untyped-call]
            f.add_metric([label], buckets, s[-1])
        return f


class Metrics:
    """Every metric of one broker, in a registry of its own. Change the event metrics on the event loop only."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.rpcs = EventCounter(
            "fdbroker_rpcs", "RPCs answered, by method and status code", ("method", "code")
        )
        self.rpc_seconds = EventHistogram(
            "fdbroker_rpc_duration_seconds",
            "Time to answer an RPC (streaming RPCs: to the first response), by method",
            "method",
        )
        self.frames = EventCounter(
            "fdbroker_conduit_frames",
            "Conduit frames handled, by kind and outcome code (the first error the frame was answered with)",
            ("kind", "code"),
        )
        self.frame_seconds = EventHistogram(
            "fdbroker_conduit_frame_duration_seconds", "Time to handle a conduit frame, by kind", "kind"
        )
        self.handoffs = EventCounter(
            "fdbroker_handoffs",
            "Descriptors moved or refused on the conduit, by operation (put, get, take, lease, checkin) and "
            "outcome (ok, refused, abandoned)",
            ("operation", "outcome"),
        )
        self.denials = EventCounter(
            "fdbroker_policy_denials", "Calls the policy refused, by action", ("action",)
        )
        self.quota_refusals = EventCounter(
            "fdbroker_quota_refusals",
            "Calls refused RESOURCE_EXHAUSTED, by quota (the policy's limit name, or capacity)",
            ("quota",),
        )
        self.lease_grants = EventCounter(
            "fdbroker_lease_grants", "Leases granted, by mode (exclusive, shared)", ("mode",)
        )
        self.lease_ends = EventCounter(
            "fdbroker_lease_ends",
            "Leases that ended, by reason (released, checked_in, expired, holder_died, entry_removed, handover)",
            ("reason",),
        )
        self.watch_events = EventCounter("fdbroker_watch_events", "Events sent on watch streams")
        self.watch_cutoffs = EventCounter(
            "fdbroker_watch_cutoffs",
            "Watch streams cut off (RESOURCE_EXHAUSTED) for falling behind or out of the history window",
        )
        self.conduit_pauses = EventCounter(
            "fdbroker_conduit_read_pauses",
            "Times a connection's reads were paused at its uid's cap on descriptors in flight",
        )
        for c in (self.watch_events, self.watch_cutoffs, self.conduit_pauses):
            c.values[()] = 0  # shown from the start: an alert on increase() needs the zero
        self.native_stats: Callable[[], Mapping[str, int]] | None = None  # see attach
        self._native_seen = (0, 0)
        self.registry.register(_EventCollector(self))

    # -- the hot paths -------------------------------------------------------------------------------------------

    def rpc(self, method: str, code: str, seconds: float) -> None:
        """One RPC answered with status ``code`` (a ``grpc.StatusCode`` name) after ``seconds``."""
        self.rpcs.inc(method, code)
        self.rpc_seconds.observe(method, seconds)

    def frame(self, kind: str, code: str, seconds: float) -> None:
        """One conduit frame of ``kind`` handled with outcome ``code`` after ``seconds``."""
        self.frames.inc(kind, code)
        self.frame_seconds.observe(kind, seconds)

    def handoff(self, operation: str, outcome: str, n: int = 1) -> None:
        """``n`` descriptors of ``operation`` with ``outcome``."""
        self.handoffs.inc(operation, outcome, n=n)

    def fold_native(self) -> None:
        """Count what the native data plane served since the last fold: each Redeem frame as a ``redeem`` frame
        answered OK, each descriptor as a ``get`` handoff. (Its frames are not timed: the histogram of
        ``redeem`` covers the frames Python answered.)"""
        if self.native_stats is None:
            return
        stats = self.native_stats()
        frames, fds = stats.get("frames_served", 0), stats.get("fds_served", 0)
        seen_frames, seen_fds = self._native_seen
        if frames > seen_frames:
            self.frames.inc("redeem", "OK", n=frames - seen_frames)
        if fds > seen_fds:
            self.handoffs.inc("get", "ok", n=fds - seen_fds)
        self._native_seen = (frames, fds)

    # -- state and exposition ------------------------------------------------------------------------------------

    def attach(self, view: StateView, native_stats: Callable[[], Mapping[str, int]] | None = None) -> None:
        """Read ``view`` at every scrape for the state gauges, and ``native_stats`` (the C table's counters of the
        Redeem frames it answers itself) for :meth:`fold_native`."""
        self.native_stats = native_stats
        self.registry.register(_StateCollector(view))

    def exposition(self, accept: str = "") -> tuple[bytes, str]:
        """The metrics encoded as the ``Accept`` header asks: (body, content type)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


class _EventCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        self.metrics.fold_native()
        for v in vars(self.metrics).values():
            if isinstance(v, (EventCounter, EventHistogram)):
                yield v.family()


class _StateCollector(Collector):
    def __init__(self, view: StateView) -> None:
        self.view = view
        self.start_time = time.time()

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        s = self.view.metrics_state()
        info = GaugeMetricFamily("fdbroker_info", "The broker's version", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        yield GaugeMetricFamily(
            "fdbroker_start_time_seconds",
            "When the broker process started (Unix time)",
            value=self.start_time,
        )
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
            "fdbroker_keeper_restarts",
            "Times the keeper restarted the broker after a crash (0 without a keeper)",
            value=s.keeper_restarts,
        )
        survival = CounterMetricFamily(
            "fdbroker_survival_events",
            "Survival events of this process: takeover (it took the entries over at start), handover (it gave "
            "them to a successor), handover_failed, fdstore_failed (a message to the fd store not sent)",
            labels=["event"],
        )
        for event in ("takeover", "handover", "handover_failed", "fdstore_failed"):
            survival.add_metric([event], s.survival_events.get(event, 0))
        yield survival
        if s.fdstore_descriptors is not None:
            yield GaugeMetricFamily(
                "fdbroker_fdstore_descriptors",
                "Entries kept in the service manager's file-descriptor store",
                value=s.fdstore_descriptors,
            )


def open_fd_count() -> int:
    """Descriptors open in this process: ``st_size`` of ``/proc/self/fd`` where the kernel reports it there
    (Linux >= 6.2; cheap with 65,000 open), else the length of its listing."""
    try:
        n = os.stat("/proc/self/fd").st_size
        return n if n > 0 else len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


# -- the endpoint ----------------------------------------------------------------------------------------------


class MetricsServer:
    """``GET /metrics`` on a TCP address or a Unix socket, on the running event loop."""

    def __init__(self, metrics: Metrics, server: asyncio.Server, where: str, path: str = "") -> None:
        self.metrics = metrics
        self.server = server
        self.where = where
        self._path = path  # the Unix socket we created ("" for TCP)
        self._ino = os.lstat(path).st_ino if path else 0

    @classmethod
    async def start(
        cls, metrics: Metrics, address: str, *, mode: int = 0o660, gid: int = -1, bind_path: str = ""
    ) -> MetricsServer:
        """Listen on ``address`` (``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``). A Unix socket is created with
        ``mode`` and group ``gid`` (-1: the broker's), with no moment in which it is more open, at ``bind_path``
        if given (the same socket reached through a safer path, e.g. the run directory's descriptor), else at
        PATH; a stale socket there is replaced, a live one is not. ``ValueError`` for a malformed address;
        ``OSError`` if it cannot listen."""
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: half the output, and nothing a dashboard uses
        busy = 0
        # Connections whose request head has not arrived yet, oldest first. At the cap, a newcomer evicts the
        # oldest of them: holding every slot with a request that never ends (slowloris; any local user can
        # reach 127.0.0.1) no longer locks the operator's scraper out, whose request arrives with its connect.
        waiting: dict[asyncio.StreamWriter, None] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal busy
            if busy >= MAX_CONNECTIONS:
                if not waiting:  # every slot is answering a request: those end within REQUEST_TIMEOUT
                    writer.close()
                    return
                oldest = next(iter(waiting))
                del waiting[oldest]
                oldest.transport.abort()  # its read ends at once (IncompleteReadError); its slot is freed then
            busy += 1
            waiting[writer] = None
            try:
                await _serve_one(metrics, reader, writer, lambda: waiting.pop(writer, None))
            finally:
                waiting.pop(writer, None)
                busy -= 1

        if address.startswith("unix:"):
            path = address[len("unix:") :]
            if not path:
                raise ValueError("--metrics-listen unix:PATH needs a path")
            where = bind_path or path
            sock = _unix_listener(where, mode, gid)
            server = await asyncio.start_unix_server(handle, sock=sock, limit=MAX_REQUEST)
            return cls(metrics, server, address, where)
        host, port = _host_port(address)
        server = await asyncio.start_server(handle, host=host, port=port, limit=MAX_REQUEST)
        bound = server.sockets[0].getsockname()
        return cls(
            metrics, server, f"{bound[0]}:{bound[1]}" if ":" not in host else f"[{bound[0]}]:{bound[1]}"
        )

    async def close(self) -> None:
        """Stop listening; remove the Unix socket if it is still the one we created."""
        self.server.close()
        if self._path:
            with contextlib.suppress(OSError):
                if os.lstat(self._path).st_ino == self._ino:
                    os.unlink(self._path)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.server.wait_closed(), 2)


def _unix_listener(path: str, mode: int, gid: int) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            if _alive(path):
                raise OSError(errno.EADDRINUSE, f"{path}: another process serves this socket")
            os.unlink(path)  # stale; anything else at PATH makes bind fail
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)  # no window in which the socket is more open than asked for
    try:
        sock.bind(path)
        if gid != -1:
            os.chown(path, -1, gid, follow_symlinks=False)
        os.chmod(path, mode)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _alive(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def check_address(address: str) -> None:
    """``ValueError`` (naming the option) unless ``address`` is ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""
    if address.startswith("unix:"):
        if address == "unix:":
            raise ValueError("--metrics-listen unix:PATH needs a path")
    else:
        _host_port(address)


def _host_port(address: str) -> tuple[str, int]:
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535 or (":" in host and "[" not in address):
        raise ValueError(
            f"--metrics-listen {address!r}: expected HOST:PORT (e.g. 127.0.0.1:9464), [V6]:PORT or unix:PATH"
        )
    return host or "127.0.0.1", int(port)


async def _serve_one(
    metrics: Metrics,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    arrived: Callable[[], object] = lambda: None,
) -> None:
    """Answer one request on the connection, then close it; ``arrived`` is called once its head is in."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
        arrived()
        lines = head.decode("latin-1").split("\r\n")
        method, _, rest = lines[0].partition(" ")
        path = rest.partition(" ")[0].partition("?")[0]
        accept = ""
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "accept":
                accept = v.strip()
        status, ctype = "200 OK", "text/plain; charset=utf-8"
        if method not in ("GET", "HEAD") or path not in ("/metrics", "/"):
            body, status = b"not found: GET /metrics\n", "404 Not Found"
        else:
            try:
                body, ctype = metrics.exposition(accept)
            except Exception:  # a bug in a collector: say so, keep serving
                log.exception("metrics: collecting failed")
                body, status = (
                    b"collecting the metrics failed; see the broker's log\n",
                    "500 Internal Server Error",
                )
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        if method != "HEAD":
            writer.write(body)
        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
        pass
    except Exception:  # a bug: log it, keep serving
        log.exception("metrics request failed")
    finally:
        writer.close()
