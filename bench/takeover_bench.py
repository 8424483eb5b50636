"""A takeover's freeze against a raw send_fds of as many descriptors, in the same run, in interleaved rounds.

  freeze-N  docs/survival.md's definition, measured by the old broker itself: from the handover's first frame to
            the successor's ack (its log line "installed N entries in S s (cpu C s)"). N entries, each the write
            end of a pipe (as the registry-scale run of broker_bench.py), held by a real `fdbroker serve`; each
            round a real `fdbroker serve --takeover` process takes them over and becomes the old broker of the
            next round. CPU: the old broker's frozen thread, and the successor's from HandoverBegin to its ack.
  raw-N     the floor: two processes, the sender holding N descriptors (of a pipe) sends them with
            socket.send_fds, 1 byte and 253 descriptors per sendmsg; the receiver recvmsg(MSG_CMSG_CLOEXEC)s
            until it holds N, then answers one message. Timed by the sender, first sendmsg to the answer.
  ratio-N   freeze / raw of the same round.

Targets (issue 9, section 3): freeze <= 200 ms at 19,900 entries (the broker's capacity under RLIMIT_NOFILE
20,000 with its default --reserve-fds 100) and freeze <= 2 x raw. A size the hard RLIMIT_NOFILE cannot hold
(N + 100 in both brokers) is skipped with the reason.

usage: python bench/takeover_bench.py [--quick] [--rounds N] [--sizes N,N,...]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESERVE = 100  # the broker's default --reserve-fds

RAW_RECEIVER = r"""
import os, socket, struct, sys, time
ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
ls.bind(sys.argv[1])
ls.listen(1)
print("READY", flush=True)
conn, _ = ls.accept()
while True:
    head = conn.recv(4)
    if len(head) < 4:
        os._exit(0)
    (n,) = struct.unpack(">I", head)
    conn.send(b"g")
    c0 = time.thread_time()
    got = []
    while len(got) < n:
        _, fds, _, _ = socket.recv_fds(conn, 4096, 253, socket.MSG_CMSG_CLOEXEC)
        got.extend(fds)
    conn.send(struct.pack(">d", time.thread_time() - c0))
    for fd in got:
        os.close(fd)
"""

RAW_SENDER = r"""
import os, socket, struct, sys, time
n_max = int(sys.argv[2])
r, w = os.pipe()
fds = [os.dup(w) for _ in range(n_max)]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
print("READY", flush=True)
for line in sys.stdin:
    n = int(line)
    s.sendall(struct.pack(">I", n))
    assert s.recv(1) == b"g"
    t0 = time.perf_counter()
    c0 = time.thread_time()
    for i in range(0, n, 253):
        socket.send_fds(s, [b"x"], fds[i : i + 253])
    ans = b""
    while len(ans) < 8:
        ans += s.recv(8 - len(ans))
    wall = time.perf_counter() - t0
    cpu = time.thread_time() - c0
    print(wall, cpu, struct.unpack(">d", ans)[0], flush=True)
"""

FREEZE = re.compile(r"installed (\d+) entries in ([0-9.]+) s \(cpu ([0-9.]+) s\); stopping")
SUCCESSOR = re.compile(r"handover: installed (\d+) entries from pid \d+ in ([0-9.]+) s \(cpu ([0-9.]+) s\)")


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def fmt_range(xs: list[float], spec: str = ".1f") -> str:
    return f"{med(xs):{spec}} [{min(xs):{spec}}-{max(xs):{spec}}]"


class RawPair:
    """The raw floor: a sender and a receiver process over one Unix stream socket, reused for every round."""

    def __init__(self, tmp: Path, n_max: int) -> None:
        path = str(tmp / "raw.sock")
        self.receiver = subprocess.Popen(
            [sys.executable, "-c", RAW_RECEIVER, path], stdout=subprocess.PIPE, text=True
        )
        assert self.receiver.stdout is not None and self.receiver.stdout.readline().strip() == "READY"
        self.sender = subprocess.Popen(
            [sys.executable, "-c", RAW_SENDER, path, str(n_max)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.sender.stdout is not None and self.sender.stdout.readline().strip() == "READY"

    def transfer(self, n: int) -> tuple[float, float, float]:
        """Wall seconds, sender CPU seconds, receiver CPU seconds of moving ``n`` descriptors."""
        assert self.sender.stdin is not None and self.sender.stdout is not None
        self.sender.stdin.write(f"{n}\n")
        self.sender.stdin.flush()
        wall, cpu_s, cpu_r = (float(x) for x in self.sender.stdout.readline().split())
        return wall, cpu_s, cpu_r

    def close(self) -> None:
        for p in (self.sender, self.receiver):
            p.kill()
            p.wait()


def fill(broker: object, n: int) -> float:
    """Deposit the write end of one pipe ``n`` times; returns the seconds it took."""
    r, w = os.pipe()
    t0 = time.perf_counter()
    try:
        with broker.client() as c:  # type: ignore[attr-defined]
            for i in range(0, n, 2000):
                c.put_many([(f"p/{j:05d}", w) for j in range(i, min(n, i + 2000))])
    finally:
        os.close(r)
        os.close(w)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 rounds at 1,000 and 5,000 entries")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--sizes", default="")
    a = ap.parse_args()
    rounds = a.rounds or (2 if a.quick else 5)
    sizes = (
        [int(x) for x in a.sizes.split(",")]
        if a.sizes
        else ([1000, 5000] if a.quick else [1000, 10_000, 19_900])
    )

    from fdbroker.testing import BrokerProcess

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the raw pair and the brokers inherit it
    fit = [n for n in sizes if n + RESERVE <= hard]
    for n in sizes:
        if n not in fit:
            print(
                f"freeze-{n}: skipped: both brokers need RLIMIT_NOFILE >= {n + RESERVE}, the hard limit is {hard} "
                "(raise it: ulimit -Hn, prlimit, or LimitNOFILE=)"
            )
    if not fit:
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="fdb-tk-", dir="/tmp"))  # short: sun_path is 108 bytes
    policy = tmp / "policy.toml"
    policy.write_text(f"[limits]\nmax_entries_per_uid = {hard}\nmax_pending_tokens_per_uid = {hard}\n")
    args = ["--policy", str(policy)]
    raw = RawPair(tmp, max(fit))
    print(
        f"takeover of N pipe entries between two `fdbroker serve` processes vs raw send_fds of N descriptors; "
        f"{rounds} rounds, interleaved; median [min-max]; {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    results: list[str] = []
    try:
        for n in fit:
            raw.transfer(n)  # warm
            broker = BrokerProcess.start(tmp / "run", args=args, timeout=60)
            try:
                fill_s = fill(broker, n)
                print(f"  {n} entries deposited in {fill_s:.1f} s", flush=True)
                walls: dict[str, list[float]] = {k: [] for k in ("raw", "freeze", "ratio")}
                cpus: dict[str, list[float]] = {k: [] for k in ("sender", "receiver", "old", "new")}
                for rnd in range(rounds):
                    r_wall, r_cs, r_cr = raw.transfer(n)
                    nxt = BrokerProcess.start(tmp / "run", args=[*args, "--takeover"], timeout=120)
                    code = broker.proc.wait(timeout=60)
                    log_old, log_new = broker.log(), nxt.log()
                    broker.log_path.unlink(missing_ok=True)
                    broker = nxt
                    m_old = FREEZE.search(log_old)
                    m_new = SUCCESSOR.search(log_new)
                    if code != 0 or m_old is None or m_new is None or int(m_old.group(1)) != n:
                        raise SystemExit(
                            f"takeover of {n} failed (old broker exit {code}):\n{log_old[-3000:]}"
                        )
                    held = broker.held()
                    if held != n:
                        raise SystemExit(f"the successor holds {held} entries, not {n}")
                    f_wall, f_cpu = float(m_old.group(2)), float(m_old.group(3))
                    walls["raw"].append(r_wall * 1e3)
                    walls["freeze"].append(f_wall * 1e3)
                    walls["ratio"].append(f_wall / r_wall)
                    cpus["sender"].append(r_cs * 1e3)
                    cpus["receiver"].append(r_cr * 1e3)
                    cpus["old"].append(f_cpu * 1e3)
                    cpus["new"].append(float(m_new.group(3)) * 1e3)
                    print(
                        f"  round {rnd + 1}: raw-{n} {r_wall * 1e3:.1f} ms, freeze-{n} {f_wall * 1e3:.1f} ms "
                        f"(cpu old {f_cpu * 1e3:.1f} ms, successor {float(m_new.group(3)) * 1e3:.1f} ms)",
                        flush=True,
                    )
            finally:
                broker.stop()
                broker.log_path.unlink(missing_ok=True)
            target = "   target <= 200 ms" if n == 19_900 else ""
            results += [
                f"raw-{n:<6} {fmt_range(walls['raw']):>24} ms   "
                f"cpu sender {fmt_range(cpus['sender'])} ms, receiver {fmt_range(cpus['receiver'])} ms",
                f"freeze-{n:<6} {fmt_range(walls['freeze']):>21} ms   "
                f"cpu old broker {fmt_range(cpus['old'])} ms, successor {fmt_range(cpus['new'])} ms{target}",
                f"ratio-{n:<6} {fmt_range(walls['ratio'], '.2f'):>22} x    freeze / raw, same round   target <= 2.00",
            ]
        print("\n== takeover freeze vs raw send_fds, median [min-max] over rounds")
        for line in results:
            print("  " + line)
    finally:
        raw.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
