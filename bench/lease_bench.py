"""Leases and watch, against a real broker, next to the floor they sit on (a bare gRPC unary call, same run).

  lease+release, 1 client        Client.lease(exclusive) then release, sequentially: round trips/s
  lease+release, 16 processes    16 processes contending for one exclusive lease (wait=True): grants/s
  hand-over latency              holder releases -> the queued waiter's Lease call returns (another process):
                                 time from the release RPC's start to the waiter holding the lease
  watch fan-out                  one writer replaces an entry N times; 1 and 16 watcher processes each count
                                 the N events: events/s delivered (sum over watchers) and time to the last event
  writer vs idle watchers        put+delete pairs with 0 and with 200 watch streams open that never read (anonymous,
                                 another process): the writer's ops/s and the broker's CPU per op, and the ratio

usage: python bench/lease_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _contender(run_dir: str, seconds: float, q: multiprocessing.Queue) -> None:
    from fdbroker import Client

    n = 0
    with Client(run_dir) as c:
        c.connect()
        q.put("ready")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            with c.lease("bench/lock", ttl=10, wait=30, keepalive=False):
                n += 1
    q.put(n)


def _waiter(run_dir: str, q: multiprocessing.Queue) -> None:
    from fdbroker import Client

    with Client(run_dir) as c:
        c.connect()
        q.put(("ready", 0.0))
        h = c.lease("bench/handover", ttl=10, wait=30, keepalive=False)
        q.put(("granted", time.monotonic()))  # CLOCK_MONOTONIC is system-wide: comparable across processes
        h.release()


def _watcher(run_dir: str, n: int, q: multiprocessing.Queue) -> None:
    from fdbroker import Client

    with Client(run_dir) as c:
        w = c.watch("bench/w")
        q.put(("ready", 0.0))
        for seen, _ in enumerate(w, start=1):
            if seen >= n:
                break
        q.put(("done", time.monotonic()))
        w.close()


def _idle_watchers(run_dir: str, n: int, q: multiprocessing.Queue) -> None:
    """Open ``n`` Watch streams on the whole registry and never read them (until told to stop)."""
    import grpc

    from fdbroker.v1 import broker_pb2 as pb
    from fdbroker.v1 import broker_pb2_grpc as pb_grpc

    ch = grpc.insecure_channel(f"unix://{run_dir}/control.sock")
    stub = pb_grpc.FdBrokerStub(ch)
    calls = [stub.Watch(pb.WatchRequest()) for _ in range(n)]
    for c in calls:
        next(c)  # the header: the stream is open on the broker; from now on nobody reads
    q.put("ready")
    q.get()
    for c in calls:
        c.cancel()
    ch.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _writer_round(c, w: int, pid: int, n: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    cpu0 = _cpu_seconds(pid)
    t0 = time.perf_counter()
    for i in range(n):
        c.put(f"bench/iw/{i}", w)
        c.delete(f"bench/iw/{i}")
    dt = time.perf_counter() - t0
    return 2 * n / dt, (_cpu_seconds(pid) - cpu0) / (2 * n) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    rounds = 2 if a.quick else 5
    tmp = Path(tempfile.mkdtemp(prefix="fdb-lbench-", dir="/tmp"))
    from fdbroker.testing import BrokerProcess

    policy = tmp / "policy.toml"
    policy.write_text("[limits]\nmax_anonymous_watchers = 256\n")
    broker = BrokerProcess.start(tmp / "run", args=["--log-level", "warning", "--policy", str(policy)])
    ctx = multiprocessing.get_context("spawn")
    run_dir = str(broker.run_dir)
    try:
        from fdbroker import Client

        r, w = os.pipe()
        c = Client(run_dir)
        for n in ("bench/lock", "bench/handover", "bench/w", "bench/seq"):
            c.put(n, w)

        # -- floor: a bare GetInfo unary call from the same client ---------------------------------------------
        floor = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(200):
                c.info()
            floor.append((time.perf_counter() - t0) / 200 * 1e6)

        # -- lease + release, one client -----------------------------------------------------------------------
        seq = []
        n_seq = 50 if a.quick else 300
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(n_seq):
                c.lease("bench/seq", ttl=10, keepalive=False).release()
            seq.append(n_seq / (time.perf_counter() - t0))
        print(f"unary GetInfo floor           {statistics.median(floor):8.0f} us/call")
        print(
            f"lease+release, 1 client       {statistics.median(seq):8.0f} round trips/s "
            f"[{min(seq):.0f}-{max(seq):.0f}]  ({1e6 / statistics.median(seq):.0f} us each: a Lease RPC with a "
            "Deliver frame + a Release RPC)"
        )

        # -- 16 contending processes ---------------------------------------------------------------------------
        secs = 1.5 if a.quick else 4.0
        q: multiprocessing.Queue = ctx.Queue()
        ps = [ctx.Process(target=_contender, args=(run_dir, secs, q)) for _ in range(16)]
        for p in ps:
            p.start()
        for _ in ps:
            assert q.get(timeout=60) == "ready"
        total = sum(q.get(timeout=120) for _ in ps)
        for p in ps:
            p.join()
        print(
            f"lease+release, 16 processes   {total / secs:8.0f} grants/s (exclusive, FIFO queue, {secs:.1f} s)"
        )

        # -- hand-over latency ---------------------------------------------------------------------------------
        lat = []
        for _ in range(5 if a.quick else 20):
            h = c.lease("bench/handover", ttl=10, keepalive=False)
            q2: multiprocessing.Queue = ctx.Queue()
            p = ctx.Process(target=_waiter, args=(run_dir, q2))
            p.start()
            assert q2.get(timeout=60)[0] == "ready"
            deadline = time.monotonic() + 10
            while c.stat("bench/handover").lease.waiters < 1 and time.monotonic() < deadline:
                time.sleep(0.002)
            t0 = time.monotonic()
            h.release()
            kind, t1 = q2.get(timeout=60)
            assert kind == "granted"
            lat.append((t1 - t0) * 1e6)
            p.join()
        print(
            f"hand-over latency             {statistics.median(lat):8.0f} us median "
            f"[{min(lat):.0f}-{max(lat):.0f}] (release RPC start -> waiter's Lease returned, {len(lat)} runs)"
        )

        # -- watch fan-out -------------------------------------------------------------------------------------
        n_ev = 300 if a.quick else 2000
        for watchers in (1, 16):
            q3: multiprocessing.Queue = ctx.Queue()
            ps = [ctx.Process(target=_watcher, args=(run_dir, n_ev, q3)) for _ in range(watchers)]
            for p in ps:
                p.start()
            for _ in ps:
                assert q3.get(timeout=60)[0] == "ready"
            time.sleep(0.3)  # let every watch stream be registered
            t0 = time.monotonic()
            for _ in range(n_ev):
                c.put("bench/w", w, replace=True)
            t_put = time.monotonic() - t0
            ends = [q3.get(timeout=120)[1] for _ in ps]
            for p in ps:
                p.join()
            t_all = max(ends) - t0
            print(
                f"watch fan-out, {watchers:2} watcher(s)    {n_ev * watchers / t_all:8.0f} events/s delivered "
                f"({n_ev} puts in {t_put:.2f} s; last watcher saw event {n_ev} after {t_all:.2f} s)"
            )

        # -- the writer next to watch streams that never read ---------------------------------------------------
        n_w = 150 if a.quick else 1000
        alone = [_writer_round(c, w, broker.pid, n_w) for _ in range(2)]
        q4: multiprocessing.Queue = ctx.Queue()
        idle = ctx.Process(target=_idle_watchers, args=(run_dir, 200, q4))
        idle.start()
        assert q4.get(timeout=120) == "ready"
        crowded = [_writer_round(c, w, broker.pid, n_w) for _ in range(2)]
        q4.put("stop")
        idle.join()
        a_ops, a_cpu = max(alone)
        c_ops, c_cpu = max(crowded)
        print(
            f"writer, no watchers           {a_ops:8.0f} ops/s  (broker CPU {a_cpu:.0f} us/op; put or delete)"
        )
        print(
            f"writer, 200 idle watchers     {c_ops:8.0f} ops/s  (broker CPU {c_cpu:.0f} us/op)  "
            f"ratio {c_ops / a_ops:.2f} of the throughput alone"
        )
        c.close()
        os.close(r)
        os.close(w)
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
