"""Operating it under a real systemd (the container of tests/test_systemd.py, booted again for this module): the
shipped unit with a drop-in that sets ``WatchdogSec=`` and adds ``--metrics-listen unix:metrics.sock``, as
docs/deploy.md ("Operating it") tells an operator to.

* the watchdog is fed (systemd's own last-ping timestamp moves), STATUS= shows the live counts;
* the metrics answer on /run/fdbroker/metrics.sock under the unit's hardening (PrivateNetwork=,
  RestrictAddressFamilies=AF_UNIX);
* journald: audit records are priority 6, ``journalctl -p warning`` shows none of them, no line repeats a
  timestamp;
* a broker that stops answering (SIGSTOP) is killed by the watchdog and restarted, its entry back from the fd
  store.

Every wait is on a condition with a generous bound; nothing asserts a duration.
"""

from __future__ import annotations

import json
import re

import pytest
from systemdutil import Machine, wait_until
from test_systemd import fdb, journal, machine, main_pid  # noqa: F401  (machine: the module's container)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

UNIT = "fdbroker.service"
DROPIN = "/etc/systemd/system/fdbroker.service.d/operating.conf"
SCRAPE = """
import socket
s = socket.socket(socket.AF_UNIX)
s.connect("/run/fdbroker/metrics.sock")
s.sendall(b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.decode().partition("\\r\\n\\r\\n")[2])
"""


def show(m: Machine, *props: str) -> dict[str, str]:
    out = m.run("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def scrape(m: Machine) -> str:
    # As root, through the socket's 0660 mode (a scraper would be in group fdbroker).
    return m.run("/opt/fdbroker/bin/python", "-c", SCRAPE).stdout


def test_watchdog_status_metrics_and_journal_priorities(machine: Machine) -> None:  # noqa: F811
    m = machine
    exec_start = next(
        line
        for line in m.run("cat", f"/etc/systemd/system/{UNIT}").stdout.splitlines()
        if line.startswith("ExecStart=")
    )
    m.run("mkdir", "-p", DROPIN.rsplit("/", 1)[0])
    dropin = f"[Service]\nWatchdogSec=3s\nExecStart=\n{exec_start} --metrics-listen unix:metrics.sock\n"
    m.run("sh", "-c", f"cat > {DROPIN} <<'EOF'\n{dropin}EOF")
    m.run("systemctl", "daemon-reload")
    m.run("systemctl", "restart", UNIT)
    assert show(m, "WatchdogUSec")["WatchdogUSec"] == "3s"

    m.run("sh", "-c", "echo held > /srv/ops.txt")
    fdb(m, "put", "ops/file", "--file", "/srv/ops.txt", check=True)
    wait_until(lambda: "1 entries" in show(m, "StatusText")["StatusText"], "STATUS= with the entry")
    status = show(m, "StatusText")["StatusText"]
    assert re.fullmatch(r"serving /run/fdbroker: \d+ entries, \d+ sessions, revision \d+", status), status

    # The watchdog is fed: systemd's record of the last ping moves on, again and again.
    stamps: set[str] = set()

    def pinged_again_and_again() -> bool:
        stamps.add(show(m, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"])
        return len(stamps) >= 3

    wait_until(pinged_again_and_again, "watchdog pings recorded by systemd")
    assert show(m, "NRestarts")["NRestarts"] == "0"

    metrics = scrape(m)
    assert 'fdbroker_entries{kind="file"} 1.0' in metrics, metrics
    assert "fdbroker_fdstore_descriptors 1.0" in metrics

    # journald: priorities from the <N> prefix; no second timestamp in the message.
    records = [
        json.loads(line)
        for line in m.run("journalctl", "-u", UNIT, "-o", "json", "--no-pager").stdout.splitlines()
    ]
    audit = [r for r in records if "fdbroker.audit: verb=put name=ops/file" in str(r.get("MESSAGE", ""))]
    assert len(audit) == 1 and audit[0]["PRIORITY"] == "6", audit
    assert audit[0]["MESSAGE"].startswith("INFO fdbroker.audit: ")
    warnings = m.run("journalctl", "-u", UNIT, "-p", "warning", "-o", "cat", "--no-pager").stdout
    assert "fdbroker.audit" not in warnings
    ours = [str(r["MESSAGE"]) for r in records if str(r.get("MESSAGE", "")).startswith(("INFO ", "WARNING "))]
    assert ours and not any(re.search(r"\d\d:\d\d:\d\d,\d{3}|fdbroker\[\d+\]", line) for line in ours)


def test_a_broker_that_stops_answering_is_restarted_by_the_watchdog(machine: Machine) -> None:  # noqa: F811
    m = machine
    if "WatchdogSec" not in m.run("cat", DROPIN, check=False).stdout:
        test_watchdog_status_metrics_and_journal_priorities(m)
    before = int(show(m, "NRestarts")["NRestarts"])
    pid = main_pid(m)
    m.run("kill", "-STOP", str(pid))
    wait_until(lambda: int(show(m, "NRestarts")["NRestarts"]) > before, "a restart after the watchdog fired")
    wait_until(
        lambda: main_pid(m) not in (0, pid) and show(m, "ActiveState")["ActiveState"] == "active",
        "the new broker active",
    )
    assert "Watchdog timeout" in m.run("journalctl", "-u", UNIT, "--no-pager").stdout
    stat = json.loads(fdb(m, "stat", "ops/file", "--json", check=True).stdout)  # back from the fd store
    assert stat["name"] == "ops/file"
    m.run("rm", DROPIN)
    m.run("systemctl", "daemon-reload")
