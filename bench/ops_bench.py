"""What operating the broker costs its hot paths: metrics, the audit log, a scrape -- measured in process, on
the broker's own code (no sockets, no gRPC), with and without each, in interleaved rounds.

  frame      a prefetched get as the server handles it (a Redeem frame of one token: dispatched, delivered to a
             sink), timed and counted as serve does, against the same with the metric calls stubbed out
  get        a Get's broker call (policy, delivery, audit), fdbroker.audit above INFO (no record) and at INFO
             (a record formatted to /dev/null)
  metrics    one Metrics.rpc / frame / handoff call
  scrape     collecting and encoding every metric with N entries held

usage: python bench/ops_bench.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable

from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.metrics import Metrics
from fdbroker.broker.policy import Identity, Limits, Policy
from fdbroker.conduit.frames import Frame
from fdbroker.errors import Code
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

CODES = {int(c): c.name for c in Code}


class Sink:
    def send(self, m: object, fds: object = ()) -> None:
        pass

    def send_raw(self, d: object, fds: object = ()) -> None:
        pass

    def close(self) -> None:
        pass


def broker(entries: int, fd: int) -> tuple[Broker, object]:
    policy = Policy(os.getuid(), limits=Limits(max_entries_per_uid=1 << 20))
    b = Broker(BrokerConfig(capacity=entries + 1000, token_ttl=3600), policy)
    s = b.open_session(Identity(os.getpid(), os.getuid(), os.getgid()), Sink())
    for i in range(entries):
        tok = b.put_begin(s, pb.PutRequest(name=f"bench/{i:06d}")).handoff.token
        b.on_frame(s, Frame(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok])), [os.dup(fd)]))
    return b, s


def per_op(fn: Callable[[], None], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=0)
    a = ap.parse_args()
    rounds = a.rounds or (3 if a.quick else 7)
    n = 1000 if a.quick else 5000
    r, w = os.pipe()
    b, s = broker(1, w)
    m = b.metrics
    devnull = open(os.devnull, "w")  # noqa: SIM115 (closed at the end)
    audit_log = logging.getLogger("fdbroker.audit")
    handler = logging.StreamHandler(devnull)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    audit_log.addHandler(handler)
    audit_log.propagate = False

    def frames(counted: bool) -> float:
        toks: list[bytes] = []
        while len(toks) < n:  # at most 1024 prefetch tokens per Get, 4096 in the uid's pool
            got = b.get(s, "bench/000000", prefetch=min(1024, n - len(toks)))  # type: ignore[arg-type]
            if not got.prefetch_tokens:
                break
            toks.extend(got.prefetch_tokens)
        fs = iter([Frame(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[t])), []) for t in toks])
        handoffs = b._handoffs  # its bound counter is stubbed too
        saved = (m.frame, handoffs._count)
        if not counted:
            m.frame = handoffs._count = lambda *a, **k: None  # type: ignore[method-assign]

        def one() -> None:  # what BrokerServer._on_frame does
            f = next(fs)
            t0 = time.perf_counter()
            code = b.on_frame(s, f)  # type: ignore[arg-type]
            m.frame(
                f.message.WhichOneof("body") or "empty", CODES.get(code, str(code)), time.perf_counter() - t0
            )

        try:
            return per_op(one, len(toks))
        finally:
            m.frame, handoffs._count = saved  # type: ignore[method-assign]

    def gets(level: int) -> float:
        audit_log.setLevel(level)
        return per_op(lambda: b.get(s, "bench/000000"), n)  # type: ignore[arg-type]

    res: dict[str, list[float]] = {
        k: [] for k in ("frame, counted", "frame, not counted", "get, no audit record", "get, audit record")
    }
    for rnd in range(rounds):
        order = [True, False] if rnd % 2 == 0 else [False, True]
        for counted in order:
            res["frame, counted" if counted else "frame, not counted"].append(frames(counted))
        for level in (logging.WARNING, logging.INFO) if rnd % 2 == 0 else (logging.INFO, logging.WARNING):
            res["get, audit record" if level == logging.INFO else "get, no audit record"].append(gets(level))
    print(f"rounds={rounds} n={n} (in process, the broker's code alone)")
    for k, v in res.items():
        print(f"  {k:24s} {statistics.median(v):7.2f} us [{min(v):.2f}-{max(v):.2f}]")
    fresh = Metrics()
    for name, fn in (
        ("Metrics.rpc", lambda: fresh.rpc("Get", "OK", 0.0005)),
        ("Metrics.frame", lambda: fresh.frame("redeem", "OK", 0.0001)),
        ("Metrics.handoff", lambda: fresh.handoff("get", "ok")),
    ):
        print(f"  {name:24s} {statistics.median(per_op(fn, 100_000) for _ in range(rounds)):7.2f} us")
    from fdbroker.broker.server import raise_nofile_limit

    room = raise_nofile_limit() - 200
    for entries in (0, min(2000, room)) if a.quick else (0, min(10_000, room)):
        big, _ = broker(entries, w) if entries else (b, s)
        big.metrics.attach(big)
        t = statistics.median(per_op(lambda big=big: big.metrics.exposition(), 20) for _ in range(rounds))  # type: ignore[misc]
        print(f"  scrape, {entries:6d} entries  {t / 1000:7.2f} ms")
        if entries:
            big.close()
    audit_log.removeHandler(handler)
    devnull.close()
    os.close(r)
    os.close(w)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
