"""The metrics endpoint on its own: a real HTTP scrape over TCP and over a Unix socket, parsed with
prometheus_client's own parsers (the end-to-end scrape of a running broker is in test_operations.py)."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from opsutil import http_get
from prometheus_client.core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.registry import Collector

import fdbroker.broker.metrics as metrics_module
from fdbroker.broker.metrics import MAX_CONNECTIONS, Metrics, MetricsServer, State, check_address


class View:
    def metrics_state(self) -> State:
        return State(
            entries_by_kind={"tcp-listener": 2, "pipe": 1}, sessions_by_uid={0: 3, 1000: 1}, revision=7
        )


async def _scrape(
    address: str, connect_of: Callable[[MetricsServer], tuple[str, int] | str]
) -> list[tuple[str, str]]:
    m = Metrics()
    m.attach(View())
    for _ in range(3):
        m.rpc("Get", "OK", 0.002)
    srv = await MetricsServer.start(m, address)
    try:
        target = connect_of(srv)
        out = []
        for path, accept in (
            ("/metrics", ""),
            ("/metrics", "application/openmetrics-text; version=1.0.0"),
            ("/x", ""),
        ):
            out.append(await asyncio.to_thread(http_get, target, path, accept))
        return out
    finally:
        await srv.close()


def _check(results: list[tuple[str, str]]) -> None:
    (h1, text), (h2, om), (h3, _) = results
    assert h1.startswith("HTTP/1.1 200") and "text/plain" in h1
    fams = {f.name: f for f in parse_text(text)}
    assert {s.labels["kind"]: s.value for s in fams["fdbroker_entries"].samples} == {
        "tcp-listener": 2,
        "pipe": 1,
    }
    assert {s.labels["uid"]: s.value for s in fams["fdbroker_sessions"].samples} == {"0": 3, "1000": 1}
    assert [s.value for s in fams["fdbroker_rpcs"].samples if s.name == "fdbroker_rpcs_total"] == [3]
    assert h2.startswith("HTTP/1.1 200") and "openmetrics" in h2
    assert any(f.name == "fdbroker_rpc_duration_seconds" for f in parse_openmetrics(om))
    assert h3.startswith("HTTP/1.1 404")


def test_scrape_over_tcp() -> None:
    _check(asyncio.run(_scrape("127.0.0.1:0", lambda srv: srv.server.sockets[0].getsockname())))


def test_scrape_over_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "metrics.sock")
    _check(asyncio.run(_scrape(f"unix:{path}", lambda srv: path)))


@pytest.mark.parametrize("bad", ["nope", "127.0.0.1:99999", "unix:", "127.0.0.1:port"])
def test_malformed_addresses_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="metrics-listen"):
        asyncio.run(MetricsServer.start(Metrics(), bad))


def test_a_unix_socket_has_the_mode_asked_for_and_replaces_only_a_stale_one(tmp_path: Path) -> None:
    path = str(tmp_path / "metrics.sock")

    async def run() -> None:
        m = Metrics()
        m.attach(View())
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()  # a socket file nobody listens on any more: replaced
        srv = await MetricsServer.start(m, f"unix:{path}", mode=0o600)
        try:
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            with pytest.raises(OSError, match="another process serves"):
                await MetricsServer.start(m, f"unix:{path}")  # a live one is not taken over
            head, _ = await asyncio.to_thread(http_get, path)
            assert head.startswith("HTTP/1.1 200")
        finally:
            await srv.close()
        assert not os.path.exists(path)  # removed: it was ours

    asyncio.run(run())


def test_idle_connections_beyond_the_cap_are_evicted_oldest_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local user cannot hold the broker's descriptors, nor lock a scraper out, with idle scrapes: past
    MAX_CONNECTIONS a newcomer evicts the oldest connection that has not sent its request; the slot it frees
    serves the next scrape too, so one is evicted for two scrapes."""
    monkeypatch.setattr(metrics_module, "REQUEST_TIMEOUT", 600.0)  # only the eviction closes the idle ones
    path = str(tmp_path / "metrics.sock")

    async def run() -> None:
        m = Metrics()
        m.attach(View())
        srv = await MetricsServer.start(m, f"unix:{path}")
        idle = []
        try:
            for _ in range(MAX_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX)
                s.connect(path)
                idle.append(s)
            await asyncio.sleep(0.1)  # let the server accept them
            for _ in range(2):
                head, _ = await asyncio.to_thread(http_get, path)
                assert head.startswith("HTTP/1.1 200")

            def closed(s: socket.socket) -> bool:
                s.setblocking(False)
                try:
                    return s.recv(1) == b""
                except BlockingIOError:
                    return False
                except ConnectionError:
                    return True

            await asyncio.sleep(0.1)
            assert [closed(s) for s in idle] == [True] + [False] * (MAX_CONNECTIONS - 1)
        finally:
            for s in idle:
                s.close()
            await srv.close()

    asyncio.run(run())


def test_a_collector_that_fails_is_answered_500_and_the_endpoint_keeps_serving(tmp_path: Path) -> None:
    class Broken:
        def metrics_state(self) -> State:
            raise RuntimeError("bug")

    path = str(tmp_path / "metrics.sock")

    async def run() -> tuple[str, str]:
        m = Metrics()
        m.attach(Broken())
        srv = await MetricsServer.start(m, f"unix:{path}")
        try:
            first = (await asyncio.to_thread(http_get, path))[0]
            second = (await asyncio.to_thread(http_get, path))[0]
            return first, second
        finally:
            await srv.close()

    first, second = asyncio.run(run())
    assert first.startswith("HTTP/1.1 500") and second.startswith("HTTP/1.1 500")


@pytest.mark.parametrize("good", ["127.0.0.1:9464", "[::1]:9464", ":9464", "unix:/run/x.sock", "unix:m.sock"])
def test_check_address_accepts(good: str) -> None:
    check_address(good)


@pytest.mark.parametrize("bad", ["nope", "::1:9464", "unix:", "host:", "127.0.0.1:65536"])
def test_check_address_refuses(bad: str) -> None:
    with pytest.raises(ValueError, match="metrics-listen"):
        check_address(bad)


def test_event_metrics_expose_as_prometheus_clients_own_would() -> None:
    """The broker's lock-free counters and histograms give the same samples as prometheus_client's Counter and
    Histogram fed the same events (the bucket bounds inclusive, cumulative counts, +Inf, sum, count)."""
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    from fdbroker.broker.metrics import LATENCY_BUCKETS, EventCounter, EventHistogram

    ref = CollectorRegistry()
    rc = Counter("t_events", "doc", ["a", "b"], registry=ref)
    rh = Histogram("t_seconds", "doc", ["m"], buckets=LATENCY_BUCKETS, registry=ref)
    ours = CollectorRegistry()
    oc = EventCounter("t_events", "doc", ("a", "b"))
    oh = EventHistogram("t_seconds", "doc", "m")

    class Ours(Collector):
        def collect(self) -> Iterator[Metric]:
            yield oc.family()
            yield oh.family()

    ours.register(Ours())
    for i, x in enumerate([0.00005, 0.00007, 0.0001, 0.003, 0.003, 2.5, 11.0, 0.0]):
        rc.labels("x", str(i % 2)).inc()
        oc.inc("x", str(i % 2))
        rh.labels("Get" if i % 3 else "Put").observe(x)
        oh.observe("Get" if i % 3 else "Put", x)

    def samples(reg: CollectorRegistry) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        text = generate_latest(reg).decode()
        return {
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for f in parse_text(text)
            for s in f.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours) == samples(ref)
