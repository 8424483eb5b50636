"""Crash survival under the keeper: time from `kill -9` of the broker to serving again, and entries lost.

A real `fdbroker serve --keeper` in a temporary run directory holds N entries (the write end of one pipe, deposited
N times: N descriptors); the broker process is SIGKILLed; the clock runs from the kill until

  first RPC    a GetInfo answered by the new broker (a fresh gRPC channel per try, 2 ms apart)
  conduit get  then a Get of one entry whose descriptor arrives on the conduit (a new session)

and the new broker's List must hold all N names with their labels (lost = N - what came back). The restart's
parts come from the logs: the keeper's restart (it restarts at once after a first crash), the new broker's
restore of its entries (its own figure), its start.

The broker processes get a bytecode cache of their own (PYTHONPYCACHEPREFIX, PYTHONDONTWRITEBYTECODE unset), so a
restart imports compiled modules as an installed package does, whatever the environment says.

usage: python bench/survival_bench.py [--quick] [--sizes 1000,19900] [--rounds N]
Prints one line per figure. --quick: 1,000 entries, one round.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
PYCACHE = Path(tempfile.gettempdir()) / "fdbroker-bench-pycache"
sys.path.insert(0, str(SRC))

from fdbroker.client import Client  # noqa: E402
from fdbroker.testing import wait_until  # noqa: E402


def children(pid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(name))
            except OSError:
                continue
    return out


def wait(pred, what: str, timeout: float = 120.0, step: float = 0.002):  # type: ignore[no-untyped-def]
    """fdbroker.testing.wait_until, polling finely (the wait is what is timed)."""
    return wait_until(pred, what, timeout=timeout, interval=step)


def info_of(run_dir: Path, not_pid: int = 0):  # type: ignore[no-untyped-def]
    try:
        with Client(run_dir, timeout=2) as c:
            info = c.info()
    except Exception:
        return None
    return info if info.broker_pid != not_pid else None


def one_round(n: int, top: Path) -> dict[str, float]:
    run_dir = top / "run"
    policy = top / "policy.toml"
    policy.write_text(f"[limits]\nmax_entries_per_uid = {n + 100}\nmax_pending_tokens_per_uid = {n + 100}\n")
    log_path = top / "keeper.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("NOTIFY_SOCKET", "FDBROKER_FDSTORE", "FDBROKER_RUN_DIR", "PYTHONDONTWRITEBYTECODE"):
        env.pop(k, None)
    env["PYTHONPYCACHEPREFIX"] = str(PYCACHE)
    cmd = [
        sys.executable,
        "-m",
        "fdbroker",
        "--run-dir",
        str(run_dir),
        "serve",
        "--keeper",
        "--policy",
        str(policy),
    ]
    with open(log_path, "wb") as log:
        keeper = subprocess.Popen(cmd, stdout=log, stderr=log, env=env)
    r, w = os.pipe()
    try:
        first = wait(lambda: info_of(run_dir), "the first broker")
        with Client(run_dir) as c:
            for i in range(0, n, 5000):
                c.put_many(
                    {f"p/{j:05d}": w for j in range(i, min(n, i + 5000))}, labels={"bench": "survival"}
                )
        # Every put was sent to the keeper before its answer; let the keeper finish reading them.
        wait(lambda: _kept(keeper.pid) >= n, "the keeper holding every entry", step=0.05)
        broker = children(keeper.pid)[0]
        assert broker == first.broker_pid
        t0 = time.monotonic()
        os.kill(broker, signal.SIGKILL)
        wait(lambda: info_of(run_dir, not_pid=broker), "the new broker", step=0.005)
        t_rpc = time.monotonic() - t0
        with Client(run_dir, timeout=10) as c:
            f = c.get_fd("p/00000")
            t_get = time.monotonic() - t0
            f.close()
            names = {e.name for e in c.list() if e.labels == {"bench": "survival"}}
        lost = n - len(names & {f"p/{j:05d}" for j in range(n)})
        keeper.send_signal(signal.SIGTERM)
        keeper.wait(60)
        log = log_path.read_text(errors="replace")
        return {
            "rpc": t_rpc * 1000,
            "get": t_get * 1000,
            "lost": float(lost),
            "restore": float(re.findall(r"restored \d+ of \d+ descriptors.* in ([0-9.]+) s", log)[-1]) * 1000,
            "start": _span(log, r"broker started \(pid \d+\) with [1-9]", r"restored \d+ of \d+"),
            "keeper": _span(log, r"broker killed by SIGKILL", r"broker started \(pid \d+\) with [1-9]"),
        }
    finally:
        os.close(r)
        os.close(w)
        if keeper.poll() is None:
            keeper.kill()
            keeper.wait()


def _kept(pid: int) -> int:
    """Pipes the keeper holds (every entry is the same pipe's write end)."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("pipe:"):
                count += 1
        except OSError:
            continue
    return count


def _stamp(line: str) -> float:
    hms, ms = line.split(",")
    h, m, s = (int(x) for x in hms.split(":"))
    return h * 3600 + m * 60 + s + int(ms) / 1000


def _span(log: str, a: str, b: str) -> float:
    """Milliseconds between the last log line matching ``a`` and the next one matching ``b``."""
    stamp = re.compile(r"(\d\d:\d\d:\d\d,\d{3}) ")
    lines = log.splitlines()
    ia = max((i for i, line in enumerate(lines) if re.search(a, line)), default=-1)
    ib = next((i for i in range(ia + 1, len(lines)) if re.search(b, lines[i])), -1)
    if ia < 0 or ib < 0:
        return float("nan")
    ma, mb = stamp.search(lines[ia]), stamp.search(lines[ib])
    if not (ma and mb):
        return float("nan")
    return (_stamp(mb.group(1)) - _stamp(ma.group(1))) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sizes", default="1000,19900")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    sizes = [1000] if a.quick else [int(x) for x in a.sizes.split(",")]
    rounds = 1 if a.quick else a.rounds
    for n in sizes:
        results = []
        for _ in range(rounds):
            top = Path(tempfile.mkdtemp(prefix="fdb-sbench-", dir="/tmp"))
            try:
                results.append(one_round(n, top))
            finally:
                shutil.rmtree(top, ignore_errors=True)

        def fig(key: str, results: list[dict[str, float]] = results) -> str:
            xs = [r[key] for r in results]
            return f"{statistics.median(xs):.0f} ms [{min(xs):.0f}-{max(xs):.0f}]"

        lost = sum(int(r["lost"]) for r in results)
        print(
            f"keeper kill -9 -> first RPC, {n} entries: {fig('rpc')} (median [min-max] of {rounds})",
            flush=True,
        )
        print(f"keeper kill -9 -> conduit get, {n} entries: {fig('get')}", flush=True)
        print(f"keeper reaped the broker -> started the next, {n} entries: {fig('keeper')}", flush=True)
        print(f"keeper new broker process start -> entries restored, {n} entries: {fig('start')}", flush=True)
        print(f"keeper new broker's restore of its entries, {n} entries: {fig('restore')}", flush=True)
        print(f"keeper entries lost, {n} entries: {lost} of {n * rounds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
