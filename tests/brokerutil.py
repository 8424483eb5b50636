"""Helpers for broker tests: run Python snippets as separate client processes against a broker."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[1] / "src")


def child_env(run_dir: Path | str, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["FDBROKER_RUN_DIR"] = str(run_dir)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_client(
    run_dir: Path | str,
    code: str,
    *,
    timeout: float = 30,
    check: bool = True,
    pass_fds: tuple[int, ...] = (),
    prefix: list[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` (dedented) in a fresh Python process with FDBROKER_RUN_DIR set; return the result."""
    cmd = [*(prefix or []), sys.executable, "-c", textwrap.dedent(code)]
    r = subprocess.run(
        cmd, env=child_env(run_dir), capture_output=True, text=True, timeout=timeout, pass_fds=pass_fds
    )
    if check and r.returncode != 0:
        raise AssertionError(f"client failed ({r.returncode}):\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}")
    return r


def spawn_client(run_dir: Path | str, code: str, *, prefix: list[str] | None = None) -> subprocess.Popen[str]:
    cmd = [*(prefix or []), sys.executable, "-c", textwrap.dedent(code)]
    return subprocess.Popen(
        cmd, env=child_env(run_dir), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
