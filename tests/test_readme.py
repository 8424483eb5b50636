"""The README's Python examples run as written (against a real broker)."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_two_commands_first():
    head = "\n".join(README.read_text().splitlines()[:20])
    assert "make run" in head and "make test" in head


def test_readme_python_examples_run(fdbroker_broker, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2
    monkeypatch.setenv("FDBROKER_RUN_DIR", str(fdbroker_broker.run_dir))
    ns: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # the README is ours
    got = ns["got"]
    assert isinstance(got, list) and len(got) == 300
    # close what the examples left open (they are examples, not leak tests)
    for fd in [ns["r"], ns["w2"], *got]:  # the sent "fds" were closed by the transfer (keep=False)
        os.close(fd)
    ns["a"].close()  # type: ignore[attr-defined]
    ns["b"].close()  # type: ignore[attr-defined]
