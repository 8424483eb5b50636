"""What an operator sees of a real broker: its metrics, scraped over HTTP (TCP and the Unix socket) and parsed
with prometheus_client's parsers after driving real operations, and its audit log, one record per access
decision with who, what and the outcome (docs/deploy.md, "Operating it").

Counters are compared before and after each step, so each assertion says what one operation must move.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opsutil import (
    Scrape,
    audit_records,
    http_get,
    matching,
    scrape,
    tcp_metrics_address,
)
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from secutil import NOBODY, Control, RawConduit, custom_broker, run_as, unprivileged_python

from fdbroker.errors import PermissionDenied, ResourceExhausted
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

LIMITS = "[limits]\nmax_entries_per_uid = 5\n"


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    p = tmp_path / "policy.toml"
    p.write_text(LIMITS)
    os.chmod(tmp_path, 0o755)
    os.chmod(p, 0o644)
    return p


class Deltas:
    """Scrape before and after a step: ``d(name, **labels)`` is how much the sample moved."""

    def __init__(self, address: Any) -> None:
        self.address = address
        self.before = scrape(address)
        self.after = self.before

    def step(self, until: Callable[[Deltas], bool] | None = None) -> Deltas:
        """Scrape again; with ``until``, again until it holds (an RPC that failed is counted when its handler
        ends, which can be just after its caller got the status)."""
        self.before = self.after
        self.after = scrape(self.address)
        deadline = time.monotonic() + 10
        while until is not None and not until(self) and time.monotonic() < deadline:
            time.sleep(0.02)
            self.after = scrape(self.address)
        return self

    def __call__(self, name: str, **labels: str) -> float:
        return self.after.value(name, **labels) - self.before.value(name, **labels)


def _drive_and_check(b: BrokerProcess, address: Any) -> None:
    d = Deltas(address)
    r, w = os.pipe()
    try:
        with b.client(prefetch=0) as c:
            for name in ("m/a", "m/b", "m/c"):
                c.put(name, w)
            d.step()
            assert d("fdbroker_rpcs_total", method="Put", code="OK") == 3
            assert d("fdbroker_conduit_frames_total", kind="deposit", code="OK") == 3
            assert d("fdbroker_handoffs_total", operation="put", outcome="ok") == 3
            assert d.after.value("fdbroker_entries", kind="pipe") == 3
            assert d.after.value("fdbroker_sessions", uid=str(os.getuid())) >= 1
            put_count = d.after.value("fdbroker_rpc_duration_seconds_count", method="Put")
            assert put_count == d.after.value("fdbroker_rpcs_total", method="Put", code="OK")

            c.get_fd("m/a").close()
            d.step()
            assert d("fdbroker_rpcs_total", method="Get", code="OK") == 1
            assert d("fdbroker_handoffs_total", operation="get", outcome="ok") == 1
            assert d("fdbroker_rpc_duration_seconds_count", method="Get") == 1

            # Anonymous get: UNAUTHENTICATED, a policy denial of "get".
            with Control(b.run_dir) as ctl, pytest.raises(grpc.RpcError) as ei:
                ctl.call("Get", pb.GetRequest(name="m/a"))
            assert ei.value.code() == grpc.StatusCode.UNAUTHENTICATED
            d.step(until=lambda d: d("fdbroker_rpcs_total", method="Get", code="UNAUTHENTICATED") > 0)
            assert d("fdbroker_policy_denials_total", action="get") == 1
            assert d("fdbroker_rpcs_total", method="Get", code="UNAUTHENTICATED") == 1

            # The uid's entry quota (5): the sixth entry is refused.
            c.put("m/d", w)
            c.put("m/e", w)
            with pytest.raises(ResourceExhausted):
                c.put("m/f", w)
            d.step(until=lambda d: d("fdbroker_rpcs_total", method="Put", code="RESOURCE_EXHAUSTED") > 0)
            assert d("fdbroker_quota_refusals_total", quota="max_entries_per_uid") == 1
            assert d("fdbroker_rpcs_total", method="Put", code="RESOURCE_EXHAUSTED") == 1

            c.take("m/b", raw=True).close()
            d.step()
            assert d("fdbroker_handoffs_total", operation="take", outcome="ok") == 1
            assert d("fdbroker_conduit_frames_total", kind="ack", code="OK") == 1
            assert d("fdbroker_rpcs_total", method="Take", code="OK") == 1

            with c.lease("m/c", ttl=30, keepalive=False):
                d.step()
                assert d.after.value("fdbroker_leases_held") == 1
                assert d("fdbroker_lease_grants_total", mode="exclusive") == 1
            d.step()
            assert d.after.value("fdbroker_leases_held") == 0
            assert d("fdbroker_lease_ends_total", reason="released") == 1

            with c.watch("m/") as watch:
                c.delete("m/a")
                ev = next(watch)
                assert ev.name == "m/a"
                d.step()
                assert d("fdbroker_watch_events_total") >= 1
                assert d.after.value("fdbroker_watchers") == 1
            assert d("fdbroker_rpcs_total", method="Delete", code="OK") == 1
            revision = c.info().revision
        final = scrape(address)
        assert final.value("fdbroker_descriptors_open") > 0
        assert final.value("fdbroker_descriptors_limit") >= final.value("fdbroker_entries_capacity")
        assert final.value("fdbroker_tokens_pending") == 0
        assert final.value("fdbroker_revision") == revision
        assert final.value("fdbroker_info", version=_version()) == 1
    finally:
        os.close(r)
        os.close(w)


def _version() -> str:
    from fdbroker import __version__

    return __version__


def test_metrics_scraped_over_tcp_move_as_operations_happen(policy: Path) -> None:
    with custom_broker(["--metrics-listen", "127.0.0.1:0", "--policy", str(policy)]) as b:
        address = tcp_metrics_address(b)
        assert address[0] == "127.0.0.1"
        _drive_and_check(b, address)
        # OpenMetrics for a scraper that asks for it, parsed with the OpenMetrics parser.
        head, body = http_get(address, accept="application/openmetrics-text; version=1.0.0")
        assert "application/openmetrics-text" in head
        names = {f.name for f in parse_openmetrics(body)}
        assert {"fdbroker_rpcs", "fdbroker_entries", "fdbroker_policy_denials"} <= names


def test_metrics_scraped_over_the_unix_socket_move_as_operations_happen(policy: Path) -> None:
    with custom_broker(
        ["--metrics-listen", "unix:metrics.sock", "--socket-mode", "0640", "--policy", str(policy)]
    ) as b:
        path = b.run_dir / "metrics.sock"
        assert (os.stat(path).st_mode & 0o777) == 0o640  # like the other sockets
        _drive_and_check(b, str(path))
    assert not path.exists()  # removed at stop


@pytest.mark.parametrize("native", ["1", "0"])
def test_repeated_prefetched_gets_are_counted_whichever_data_plane_serves_them(
    policy: Path, native: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C table answers prefetched Redeem frames without Python: its counters are folded in at each scrape,
    so ``get`` handoffs and ``redeem`` frames read the same with the extension (1) and with its Python twin (0)."""
    monkeypatch.setenv("FDBROKER_NATIVE", native)
    with custom_broker(["--metrics-listen", "127.0.0.1:0", "--policy", str(policy)]) as b:
        d = Deltas(tcp_metrics_address(b))
        r, w = os.pipe()
        try:
            with b.client() as c:  # prefetch on (the default)
                c.put("p/a", w)
                d.step()
                for _ in range(40):
                    c.get_fd("p/a").close()
                d.step()
                assert d("fdbroker_handoffs_total", operation="get", outcome="ok") == 40
                redeems = d("fdbroker_conduit_frames_total", kind="redeem", code="OK")
                assert 1 <= redeems <= 40  # one per get, less the gets answered through the RPC
                d.step()
                assert d("fdbroker_handoffs_total", operation="get", outcome="ok") == 0  # no double count
        finally:
            os.close(r)
            os.close(w)


def test_a_bad_metrics_address_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="--metrics-listen"):
        BrokerProcess.start(tmp_path / "run", args=["--metrics-listen", "127.0.0.1:notaport"], timeout=30)


# -- the audit log ---------------------------------------------------------------------------------------------


@pytest.fixture
def audited(policy: Path) -> Iterator[BrokerProcess]:
    args = ["--log-format", "json", "--token-ttl", "0.5", "--policy", str(policy), "--socket-mode", "0666"]
    with custom_broker(args) as b:
        yield b


def _records(b: BrokerProcess, **want: Any) -> list[dict[str, Any]]:
    return matching(audit_records(b.log()), **want)


def _one(b: BrokerProcess, **want: Any) -> dict[str, Any]:
    """The one audit record matching ``want`` (waiting briefly for it to be written), and never two."""
    found = wait_until(lambda: _records(b, **want), f"an audit record {want}")
    time.sleep(0.05)
    found = _records(b, **want)
    assert len(found) == 1, (want, found)
    return found[0]


def _who(rec: dict[str, Any], pid: int, session: str) -> None:
    assert (rec["pid"], rec["uid"], rec["gid"]) == (pid, os.getuid(), os.getgid()), rec
    assert rec["session"] == session[:6], rec
    assert rec["level"] == "INFO" and rec["logger"] == "fdbroker.audit"
    assert rec["message"].startswith(f"verb={rec['verb']} "), rec


def test_every_access_decision_is_audited_once(audited: BrokerProcess) -> None:
    b = audited
    me = os.getpid()
    r, w = os.pipe()
    r2, w2 = os.pipe()
    try:
        with b.client(prefetch=0) as c:
            sid = c.connect()
            c.put("a/put", w)
            _who(_one(b, verb="put", name="a/put", outcome="ok", kind="pipe"), me, sid)
            c.put("a/put", r, replace=True)
            assert _one(b, verb="put", name="a/put", replaced="true")["outcome"] == "ok"
            c.get_fd("a/put").close()
            _who(_one(b, verb="get", name="a/put", outcome="ok", kind="pipe"), me, sid)
            c.put("a/m1", w)
            for f in c.get_many(["a/put", "a/m1"], raw=True):
                f.close()
            assert _one(b, verb="get", name="a/m1")["batch"] == 2
            assert len(_records(b, verb="get", name="a/put")) == 2  # the single get and the batch's

            c.delete("a/put")
            _who(_one(b, verb="delete", name="a/put", outcome="ok"), me, sid)
            c.take("a/m1", raw=True).close()
            _who(_one(b, verb="take", name="a/m1", outcome="ok", kind="pipe"), me, sid)

            c.put("a/lease", w)
            with c.lease("a/lease", ttl=30, keepalive=False):
                rec = _one(b, verb="lease", name="a/lease", outcome="ok")
                _who(rec, me, sid)
                assert rec["mode"] == "exclusive" and rec["epoch"] > 0 and len(rec["lease"]) == 6
            _who(_one(b, verb="release", name="a/lease", reason="released"), me, sid)

            # Check-in: one record (checkin) for the descriptor and the lease it ends; no separate release.
            h = c.lease("a/lease", ttl=30, keepalive=False)
            h.release(return_fd=w2)
            rec = _one(b, verb="checkin", name="a/lease", outcome="ok", kind="pipe")
            _who(rec, me, sid)
            assert rec["lease"] == h.lease_id[:6]
            assert len(_records(b, verb="release", name="a/lease")) == 1  # still only the first lease's

            # Expiry: the lease's TTL runs out (no keep-alive); the entry's TTL runs out.
            c.lease("a/lease", ttl=0.2, keepalive=False).fd.close()
            _who(_one(b, verb="release", name="a/lease", reason="expired"), me, sid)
            c.put("a/ttl", w, ttl=0.2)
            rec = _one(b, verb="expire", name="a/ttl", outcome="ok")
            _who(rec, me, sid)  # the owner's identity and session

            # Quota: the sixth entry of this uid is refused.
            for name in ("a/q1", "a/q2", "a/q3", "a/q4"):  # with a/lease: 5
                c.put(name, w)
            with pytest.raises(ResourceExhausted):
                c.put("a/q5", w)
            rec = _one(b, verb="put", name="a/q5", outcome="refused")
            _who(rec, me, sid)
            assert rec["quota"] == "max_entries_per_uid" and rec["code"] == "RESOURCE_EXHAUSTED"
            for name in ("a/q2", "a/q3", "a/q4"):
                c.delete(name)

        # A holder that dies: its lease ends (holder_died); its ephemeral entry goes with its session.
        with b.client(prefetch=0) as c2:
            sid2 = c2.connect()
            c2.put("a/eph", w, ephemeral=True)
            c2.lease("a/lease", ttl=30, keepalive=False).fd.close()
        _who(_one(b, verb="release", name="a/lease", reason="holder_died"), me, sid2)
        _who(_one(b, verb="remove", name="a/eph", reason="session_ended"), me, sid2)

        # Anonymous callers: denied, with no identity.
        with Control(b.run_dir) as ctl:
            for method, req in (
                ("Get", pb.GetRequest(name="a/q1")),
                ("Delete", pb.DeleteRequest(name="a/q1")),
            ):
                with pytest.raises(grpc.RpcError):
                    ctl.call(method, req)
        for verb in ("get", "delete"):
            rec = _one(b, verb=verb, name="a/q1", outcome="denied")
            assert rec["code"] == "UNAUTHENTICATED" and rec["pid"] is None and rec["session"] is None

        # A take never acked: the entry stays, recorded as abandoned when the token expires; a deposit with a
        # token nobody issued: refused.
        with RawConduit(b.run_dir) as raw, Control(b.run_dir) as ctl:
            ctl.call("Take", pb.TakeRequest(name="a/q1"), raw.session_id)
            raw.recv_kind("deliver")  # the copy arrives; we never ack
            rec = _one(b, verb="take", name="a/q1", outcome="abandoned")
            assert rec["session"] == raw.session_id[:6] and rec["uid"] == os.getuid()
            raw.send(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[os.urandom(32)])), [w])
            raw.recv_kind("deposited")
            rec = _one(b, verb="put", outcome="refused", code="FAILED_PRECONDITION")
            assert rec["reason"] == "unknown" and rec["session"] == raw.session_id[:6]
        with Control(b.run_dir) as ctl:
            assert "a/q1" in dict(ctl.snapshot())  # the abandoned take left it in place

        # Sessions opening and ending are DEBUG now: not in an INFO log.
        assert "opened for pid" not in b.log() and not re.search(r"\(pid \d+\) ended", b.log())
    finally:
        for fd in (r, w, r2, w2):
            os.close(fd)


def test_a_policy_denial_names_the_caller(policy: Path, tmp_path: Path) -> None:
    """uid 65534 may not get root's entry: denied, and the record says who asked (pid, uid, gid, session)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as uid 65534")
    nobody = unprivileged_python()
    if nobody is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    args = [
        "--log-format",
        "json",
        "--policy",
        str(policy),
        "--socket-mode",
        "0666",
        "--metrics-listen",
        "unix:m.sock",
    ]
    with custom_broker(args) as b:
        r, w = os.pipe()
        try:
            with b.client() as c:
                c.put("secret/x", w)
        finally:
            os.close(r)
            os.close(w)
        before = scrape(str(b.run_dir / "m.sock"))
        out = run_as(
            nobody,
            f"""
            import os
            from fdbroker.client import Client
            from fdbroker.errors import PermissionDenied
            with Client({str(b.run_dir)!r}) as c:
                sid = c.connect()
                try:
                    c.get_fd("secret/x")
                except PermissionDenied:
                    print(os.getpid(), sid)
            """,
        )
        pid, sid = out.stdout.split()
        rec = _one(b, verb="get", name="secret/x", outcome="denied")
        assert (rec["pid"], rec["uid"], rec["gid"], rec["session"]) == (int(pid), NOBODY, NOBODY, sid[:6])
        assert rec["code"] == PermissionDenied.code.name
        after = scrape(str(b.run_dir / "m.sock"))
        assert (
            after.value("fdbroker_policy_denials_total", action="get")
            - before.value("fdbroker_policy_denials_total", action="get")
            == 1
        )


def test_the_text_format_carries_the_same_words(tmp_path: Path) -> None:
    with custom_broker([]) as b:
        r, w = os.pipe()
        try:
            with b.client() as c:
                sid = c.connect()
                c.put("t/x", w)
        finally:
            os.close(r)
            os.close(w)
        pattern = (
            r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fdbroker\[\d+\] INFO fdbroker\.audit: "
            rf"verb=put name=t/x kind=pipe outcome=ok pid={os.getpid()} uid={os.getuid()} gid={os.getgid()} "
            rf"session={re.escape(sid[:6])}$"
        )
        wait_until(
            lambda: any(re.match(pattern, line) for line in b.log().splitlines()), "the put's text record"
        )


def test_scrape_helper_reads_absent_samples_as_zero() -> None:
    assert Scrape("").value("fdbroker_rpcs_total") == 0


# -- Kubernetes ------------------------------------------------------------------------------------------------

MANIFESTS = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


@pytest.mark.parametrize("manifest", ["sidecar-pod.yaml", "daemonset.yaml"])
def test_the_manifests_scrape_the_port_the_broker_listens_on(manifest: str) -> None:
    """Each Pod's prometheus.io annotations name the broker container's "metrics" port, which is the port of
    its FDBROKER_METRICS_LISTEN, an address serve accepts, on the Pod's IP."""
    yaml = pytest.importorskip("yaml")
    from fdbroker.broker.metrics import check_address

    pods = []
    for doc in yaml.safe_load_all((MANIFESTS / manifest).read_text()):
        if doc and doc["kind"] == "Pod":
            pods.append((doc["metadata"], doc["spec"]))
        elif doc and doc["kind"] == "DaemonSet":
            t = doc["spec"]["template"]
            pods.append((t["metadata"], t["spec"]))
    assert pods
    for meta, spec in pods:
        ann = meta["annotations"]
        assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/path"] == "/metrics"
        broker = next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == "broker")
        env = {e["name"]: e.get("value") for e in broker["env"]}
        address = env["FDBROKER_METRICS_LISTEN"]
        check_address(address)
        host, _, port = address.rpartition(":")
        assert host == "0.0.0.0" and port == ann["prometheus.io/port"]
        ports = {p["name"]: p["containerPort"] for p in broker["ports"]}
        assert ports["metrics"] == int(port)
        assert not spec.get("hostNetwork"), "the metrics port would be the node's"
