"""`make bench`: runs the benchmark scripts of bench/ in order and prints their output.

usage: python bench/run.py [--quick] [NAME ...]   (NAME filters scripts by substring)
Add a script to BENCHES to have it run; each gets --quick passed through.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

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
    for script in BENCHES:
        if a.names and not any(n in script for n in a.names):
            continue
        print(f"=== {script}", flush=True)
        cmd = [sys.executable, os.path.join(HERE, script)] + (["--quick"] if a.quick else [])
        rc = subprocess.call(cmd)
        if rc != 0:
            print(f"=== {script} failed with exit code {rc}", flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
