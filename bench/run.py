"""`make bench`: runs the benchmark scripts of bench/ in order and prints their output.

usage: python bench/run.py [--quick] [NAME ...]   (NAME filters scripts by substring)
Add a script to BENCHES to have it run; each gets --quick passed through, and $FDBROKER_BENCH_GOALS: a file to
append its goal lines to, which this prints last.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
BENCHES = [
    "conduit_bench.py",
    "broker_bench.py",
    "lease_bench.py",
    "takeover_bench.py",
    "survival_bench.py",
    "ops_bench.py",
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    ap.add_argument("names", nargs="*", help="run only scripts whose name contains one of these")
    a = ap.parse_args()
    failed = 0
    fd, goals = tempfile.mkstemp(prefix="fdb-goals-", suffix=".txt")
    os.close(fd)
    env = dict(os.environ, FDBROKER_BENCH_GOALS=goals)
    for script in BENCHES:
        if a.names and not any(n in script for n in a.names):
            continue
        print(f"=== {script}", flush=True)
        cmd = [sys.executable, os.path.join(HERE, script)] + (["--quick"] if a.quick else [])
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            print(f"=== {script} failed with exit code {rc}", flush=True)
            failed += 1
    with open(goals) as f:
        lines = f.read().splitlines()
    os.unlink(goals)
    if lines:
        # The goals of issue 11, one line each, last: `P<n> <measure> <median> [<min>-<max>] target <op><v> ok|MISS`.
        print("=== goals", flush=True)
        for line in lines:
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
