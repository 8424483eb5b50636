"""A bounded conduit fuzz from an unprivileged uid, while a well-behaved client keeps working.

uid 65534 (through ``setpriv``) runs tests/helpers/conduit_fuzz_client.py against a broker whose sockets are
0666: random bytes, bad and truncated length prefixes, well-formed frames of every body kind with random
fields, bad tokens of every sort, descriptors where none belong, connections dropped at every point, and now
and then a legitimate put/get/take. Meanwhile a root client puts, gets and deletes in a loop and times each
call. At the end the broker must be alive and back where it started: no session but the good client's (none
once it closed), no pending token once they expired, the good client's entries exactly as it left them, and
its descriptors at baseline + held entries. Every anomaly the attacker saw (a descriptor it was not given, a
bad token accepted, an unanswered frame, an UNKNOWN/INTERNAL code, a refused descriptor still held) fails the
test with the frames that led to it.

Scale: ``FDBROKER_FUZZ_FRAMES`` (default 5000), ``FDBROKER_FUZZ_SEED`` to repeat a run (the seed is printed;
the attacker's choices follow it, what the broker answers in between can differ with timing).
``FDBROKER_FUZZ_GOOD_PREFETCH`` fixes the good client's GET prefetch (default: the library's adaptive one);
``FDBROKER_FUZZ_PRECLOSE`` the share of connections closed before the Welcome (default 0.03).
The good client's worst latency is reported (printed, and in the failure message), never asserted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fuzzutil import Stopwatch
from secutil import Control, custom_broker, unprivileged_python

from fdbroker.client import Client
from fdbroker.errors import BrokerError
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import broker_pb2 as pb

FRAMES = int(os.environ.get("FDBROKER_FUZZ_FRAMES", "5000"))
SEED_ENV = os.environ.get("FDBROKER_FUZZ_SEED")
PRECLOSE = os.environ.get("FDBROKER_FUZZ_PRECLOSE", "0.03")
TOKEN_TTL = 1.0
HELPER = Path(__file__).resolve().parent / "helpers" / "conduit_fuzz_client.py"
# Generous: a busy 2-core machine does about 300 frames/s with the good client running; the limit only stops a
# hung run from hanging the suite.
ATTACK_TIMEOUT = 120 + FRAMES / 50


class GoodClient(threading.Thread):
    """A well-behaved root client: put, get (checking it gets back its own descriptor), list and delete in a
    loop, each call timed. ``expected`` is what it left in the registry (name -> revision)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(name="good-client", daemon=True)
        prefetch = os.environ.get("FDBROKER_FUZZ_GOOD_PREFETCH")  # unset: the library's adaptive default
        self.client = Client(run_dir, timeout=30, prefetch=int(prefetch) if prefetch else None)
        self.r, self.w = os.pipe()
        st = os.fstat(self.r)
        self.pipe_ident = (st.st_dev, st.st_ino)
        self.watch = Stopwatch()
        # Distinct failures (the entry name left out) -> (count, first full message, seconds into the run).
        self.errors: dict[str, tuple[int, str, float]] = {}
        self.started = time.monotonic()
        self.expected: dict[str, int] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        c = self.client
        i = 0
        while not self._halt.is_set():
            name = f"good/n{i % 8}"
            op = "put"
            try:
                e = self.watch.time("put", functools.partial(c.put, name, self.r, replace=True))
                self.expected[name] = e.revision
                op = "get"
                got = self.watch.time("get", functools.partial(c.get_fd, name))
                with got:
                    st = os.fstat(got.fileno())
                    if (st.st_dev, st.st_ino) != self.pipe_ident:
                        self.error("get", name, "received a descriptor that is not the one deposited")
                if i % 10 == 0:
                    op = "list"
                    names = {x.name for x in self.watch.time("list", functools.partial(c.list, "good/"))}
                    if names != set(self.expected):
                        self.error("list", "good/", f"{sorted(names)} != {sorted(self.expected)}")
                if i % 3 == 0:
                    op = "delete"
                    self.watch.time("delete", functools.partial(c.delete, name))
                    del self.expected[name]
            except BrokerError as err:
                self.error(op, name, f"{type(err).__name__}: {err}")
            i += 1

    def error(self, op: str, name: str, text: str) -> None:
        key = f"{op}: {text.replace(name, '<name>')}"
        n, first, at = self.errors.get(key, (0, f"{op} {name}: {text}", time.monotonic() - self.started))
        self.errors[key] = (n + 1, first, at)

    def error_report(self) -> list[str]:
        return [f"{first} (x{n}, first {at:.1f}s into the run)" for n, first, at in self.errors.values()]

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    def close(self) -> None:
        self.client.close()
        os.close(self.r)
        os.close(self.w)


class FdSampler(threading.Thread):
    """Samples the broker's descriptor count every 50 ms; ``peak`` is the highest seen."""

    def __init__(self, broker: BrokerProcess) -> None:
        super().__init__(name="fd-sampler", daemon=True)
        self.broker = broker
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.05):
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, self.broker.fd_count())

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _latency(w: Stopwatch) -> str:
    return (
        f"{w.count} calls, worst {w.worst * 1000:.1f} ms ({w.worst_what}), "
        f"p99 {w.percentile(0.99) * 1000:.1f} ms, median {w.percentile(0.5) * 1000:.1f} ms"
    )


def _render_anomalies(summary: dict[str, Any]) -> list[str]:
    out = []
    for a in summary.get("anomalies", []):
        repro = "\n".join(f"        {i}. {step}" for i, step in enumerate(a["repro"], 1))
        out.append(
            f"attacker saw: {a['what']} (x{summary['anomaly_counts'][a['what']]}) at frame {a['frame']}, "
            f"connection {a['connection']}: {a['detail']}\n      frames on that connection, last one last:\n"
            f"{repro}"
        )
    return out


def _info(ctl: Control) -> pb.GetInfoResponse:
    resp: pb.GetInfoResponse = ctl.call("GetInfo", pb.GetInfoRequest())
    return resp


def _settle(fn: Any, ok: Any, timeout: float) -> Any:
    """The value of ``fn()`` once ``ok(value)``, or the last value after ``timeout`` (no exception)."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if ok(v) or time.monotonic() > deadline:
            return v
        time.sleep(0.05)


@pytest.mark.root
@pytest.mark.timeout(ATTACK_TIMEOUT + 90)
def test_conduit_fuzz_from_an_unprivileged_uid() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as uid 65534")
    prefix = unprivileged_python()
    if prefix is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    seed = int(SEED_ENV) if SEED_ENV else random.SystemRandom().randrange(2**32)
    repeat = f"FDBROKER_FUZZ_SEED={seed} FDBROKER_FUZZ_FRAMES={FRAMES} FDBROKER_FUZZ_PRECLOSE={PRECLOSE}"
    print(f"\nconduit fuzz: seed {seed}, {FRAMES} frames (repeat with {repeat})")

    problems: list[str] = []
    figures: list[str] = [f"seed {seed}, {FRAMES} frames requested"]
    with custom_broker(["--socket-mode", "0666", "--token-ttl", str(TOKEN_TTL)]) as b:
        assert b.baseline is not None
        good = GoodClient(b.run_dir)
        sampler = FdSampler(b)
        proc: subprocess.Popen[str] | None = None
        try:
            sampler.start()
            good.start()
            wait_until(lambda: good.watch.count >= 5 or good.errors, what="the good client's first calls")
            proc = subprocess.Popen(
                [*prefix, str(HELPER), str(b.run_dir), str(seed), str(FRAMES), str(TOKEN_TTL), PRECLOSE],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd="/",
            )
            try:
                out, err = proc.communicate(timeout=ATTACK_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                problems.append(f"the attacker did not finish within {ATTACK_TIMEOUT:.0f}s (broker stalled?)")
            good.stop()
        finally:
            sampler.stop()
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.communicate()
            if good.is_alive():
                good.stop()

        if b.proc.poll() is not None:
            good.close()
            pytest.fail(
                f"THE BROKER DIED during the conduit fuzz (exit {b.proc.returncode}; {repeat}); nothing after "
                f"this point was checked.\nattacker stderr:\n{err[-3000:]}\nbroker log:\n{b.log()[-6000:]}",
                pytrace=False,
            )

        summary: dict[str, Any] = {}
        lines = out.strip().splitlines()
        if proc.returncode != 0 or not lines:
            problems.append(f"the attacker failed (exit {proc.returncode}):\n{err[-4000:]}")
        else:
            summary = json.loads(lines[-1])
            assert summary["uid"] == 65534, summary["uid"]
            if summary["stopped_early"]:
                figures.append(
                    f"ATTACK STOPPED EARLY at frame {summary['frames']}: {summary['stopped_early']}"
                )
            figures.append(
                f"attacker: {summary['frames']} frames in {summary['connections']} connections "
                f"({summary['sendmsgs']} sendmsg calls) in {summary['seconds']}s; its own slowest RPC "
                f"{summary['rpc_worst_s'] * 1000:.0f} ms ({summary['rpc_worst_what']})"
            )
            problems.extend(_render_anomalies(summary))
            print("attacker stats:", json.dumps(summary["stats"], sort_keys=True))
        figures.append(f"good client: {_latency(good.watch)}")
        problems.extend(f"good client: {e}" for e in good.error_report())

        with Control(b.run_dir) as ctl:
            # While the good client is still connected its session is the only one.
            sessions = int(_settle(lambda: _info(ctl).sessions, lambda n: n == 1, 5))
            if sessions != 1:
                problems.append(f"{sessions} sessions with only the good client connected (expected 1)")
            left = _settle(
                lambda: sorted(
                    (e.name, e.revision, e.owner.uid) for e in ctl.call("List", pb.ListRequest()).entries
                ),
                lambda v: v == sorted((n, r, 0) for n, r in good.expected.items()),
                TOKEN_TTL + 5,
            )
            expected = sorted((n, r, 0) for n, r in good.expected.items())
            if left != expected:
                problems.append(
                    f"entries (name, revision, owner uid) are {left}, the good client left {expected}"
                )
            good.close()
            sessions = int(_settle(lambda: _info(ctl).sessions, lambda n: n == 0, 5))
            if sessions:
                problems.append(f"{sessions} sessions left after every client closed (expected 0)")
            pending = int(_settle(lambda: _info(ctl).pending_tokens, lambda n: n == 0, TOKEN_TTL + 5))
            if pending:
                problems.append(
                    f"{pending} tokens still pending {TOKEN_TTL + 5:.0f}s after the last client closed"
                )
            held = _info(ctl).entries
        final = b._settled(lambda n: n == b.baseline + held, 10.0)
        figures.append(
            f"broker descriptors: baseline {b.baseline}, peak {sampler.peak} during the run, "
            f"final {final} with {held} entries held (expected {b.baseline + held})"
        )
        if final != b.baseline + held:
            try:
                b.assert_no_leak(timeout=1.0)
            except AssertionError as leak:
                problems.append(str(leak))

        report = "\n".join(figures)
        print(report)
        if problems:
            pytest.fail(
                f"conduit fuzz found {len(problems)} problem(s) ({repeat}):\n\n"
                + "\n\n".join(f"- {p}" for p in problems)
                + f"\n\n{report}",
                pytrace=False,
            )
