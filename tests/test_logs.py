"""The broker's log lines: ``--log-format text|json``, and under journald (JOURNAL_STREAM naming stderr's
device and inode) no timestamp or pid and a ``<N>`` syslog priority on every line, so ``journalctl -p`` works.
The formatters in process, then real brokers."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from opsutil import Managed

from fdbroker.broker.logs import JsonFormatter, TextFormatter, configure, syslog_priority, under_journald
from fdbroker.testing import wait_until


def _record(
    level: int = logging.INFO, msg: str = "hello %s", args: tuple[object, ...] = ("world",)
) -> logging.LogRecord:
    return logging.LogRecord("fdbroker.test", level, __file__, 1, msg, args, None)


def test_syslog_priorities() -> None:
    levels = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)
    assert [syslog_priority(x) for x in levels] == [7, 6, 4, 3, 2]


def test_text_lines() -> None:
    line = TextFormatter().format(_record())
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d,\d{{3}} fdbroker\[{os.getpid()}\] INFO fdbroker.test: hello world",
        line,
    )
    assert (
        TextFormatter(journald=True).format(_record(logging.WARNING))
        == "<4>WARNING fdbroker.test: hello world"
    )


def test_every_line_of_a_traceback_carries_the_priority_under_journald() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = _record(logging.ERROR, "failed", ())
        rec.exc_info = sys.exc_info()
    text = TextFormatter(journald=True).format(rec)
    lines = text.split("\n")
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines), text
    assert lines[0] == "<3>ERROR fdbroker.test: failed" and lines[-1] == "<3>ValueError: boom"


def test_json_lines() -> None:
    rec = _record()
    rec.audit = {"verb": "get", "name": "web/https", "pid": 42, "session": None}
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["level"] == "INFO" and obj["logger"] == "fdbroker.test" and obj["message"] == "hello world"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", obj["time"])
    assert (obj["verb"], obj["name"], obj["pid"], obj["session"]) == ("get", "web/https", 42, None)
    try:
        raise KeyError("k")
    except KeyError:
        rec = _record(logging.ERROR)
        rec.exc_info = sys.exc_info()
    line = JsonFormatter(journald=True).format(rec)
    assert line.startswith("<3>{") and "\n" not in line
    assert "KeyError" in json.loads(line[3:])["exception"]


def test_journald_is_detected_by_device_and_inode(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w") as f, open(tmp_path / "other", "w") as g:
        st = os.fstat(f.fileno())
        mine = f"{st.st_dev}:{st.st_ino}"
        assert under_journald(f, {"JOURNAL_STREAM": mine})
        assert not under_journald(g, {"JOURNAL_STREAM": mine})  # inherited, but this stream goes elsewhere
        assert not under_journald(f, {})
        assert not under_journald(f, {"JOURNAL_STREAM": "journal"})


def test_configure_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="log format"):
        configure("info", "xml")


# -- real brokers ----------------------------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="fdb-log-", dir="/tmp"))
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _journald_env(log: Path) -> dict[str, str]:
    log.touch()
    st = os.stat(log)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


def _reload_badly(b: Managed, policy: Path) -> None:
    policy.write_text("[limits\n")
    b.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "policy reload failed" in b.log(), "the failed reload's line")


def test_under_journald_text_lines_have_priorities_and_no_timestamps(short_dir: Path) -> None:
    log = short_dir / "journal"
    policy = short_dir / "policy.toml"
    policy.write_text("")
    with Managed(short_dir / "run", ["--policy", str(policy)], env=_journald_env(log), log_path=log) as b:
        r, w = os.pipe()
        try:
            with b.client() as c:
                c.put("j/x", w)
        finally:
            os.close(r)
            os.close(w)
        wait_until(lambda: "verb=put name=j/x" in b.log(), "the audit line")
        _reload_badly(b, policy)
        lines = b.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>[A-Z]+ [a-z_.]+: ", line) for line in lines), lines
    assert any(line.startswith("<6>INFO fdbroker.server: fdbroker ") and "serving" in line for line in lines)
    assert any(line.startswith("<6>INFO fdbroker.audit: verb=put name=j/x ") for line in lines)
    assert any(line.startswith("<3>ERROR fdbroker.server: policy reload failed") for line in lines)
    assert not any(re.search(r"\d\d:\d\d:\d\d|fdbroker\[\d+\]", line) for line in lines)


def test_json_lines_from_a_real_broker_and_under_journald(short_dir: Path) -> None:
    for journald in (False, True):
        log = short_dir / f"log{journald}"
        env = _journald_env(log) if journald else {"JOURNAL_STREAM": "1:1"}  # set, but not our stderr
        with Managed(short_dir / f"run{journald}", ["--log-format", "json"], env=env, log_path=log) as b:
            r, w = os.pipe()
            try:
                with b.client() as c:
                    c.put("j/x", w)
            finally:
                os.close(r)
                os.close(w)

            def written(path: Path = b.log_path) -> bool:
                return "verb=put name=j/x" in path.read_text()

            wait_until(written, "the audit line")
            lines = b.log().splitlines()
        objs = []
        for line in lines:
            if journald:
                assert line.startswith("<6>{") or line.startswith("<4>{"), line
                line = line[3:]
            objs.append(json.loads(line))
        assert all({"time", "level", "logger", "message"} <= o.keys() for o in objs)
        put = [o for o in objs if o.get("verb") == "put"]
        assert (
            len(put) == 1
            and put[0]["name"] == "j/x"
            and put[0]["outcome"] == "ok"
            and put[0]["uid"] == os.getuid()
        )


def test_text_lines_keep_their_timestamps_when_journal_stream_is_not_stderr(short_dir: Path) -> None:
    with Managed(short_dir / "run", [], env={"JOURNAL_STREAM": "1:1"}) as b:
        lines = b.log().splitlines()
    assert lines and all(
        re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} fdbroker\[\d+\] ", line) for line in lines
    )
