"""docs/leasing.md: its fencing example runs as written against a real broker."""

from __future__ import annotations

import re
from pathlib import Path

from brokerutil import run_client

DOC = Path(__file__).resolve().parents[1] / "docs" / "leasing.md"


def _example(name: str) -> str:
    m = re.search(rf"<!-- example: {name} -->\n```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert m, f"no example {name!r} in {DOC}"
    return m.group(1)


def test_fencing_example_refuses_the_stale_holder(fdbroker_broker):
    r = run_client(fdbroker_broker.run_dir, _example("fencing"))
    assert re.fullmatch(r"refused: stale epoch (\d+) < (\d+)\n", r.stdout), r.stdout
    a, b = map(int, re.findall(r"\d+", r.stdout))
    assert a < b
