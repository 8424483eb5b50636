"""Audit log injection: a caller controls the name of a refused call (checked by nobody before the refusal is
logged) and tries to forge a second record or fake fields with it, in both log formats.

The rule held here: one record is one line (by every line splitter: ``str.splitlines`` splits at U+2028, U+0085
and more, not only ``\\n``), carries no control or invisible character (no ANSI escape reaches a terminal), and
parses back to exactly the fields the broker wrote; a value longer than any valid name is clipped, so one call
cannot write megabytes of log.
"""

from __future__ import annotations

import json
import logging
import re
import unicodedata
from typing import Any

import pytest
from opsutil import audit_records
from secutil import custom_broker, run_as, unprivileged_python

from fdbroker.broker.audit import MAX_VALUE_CHARS, Audit, Who
from fdbroker.broker.logs import JsonFormatter, TextFormatter
from fdbroker.broker.metrics import Metrics
from fdbroker.broker.sessions import SessionTable
from fdbroker.testing import wait_until

HOSTILE = [
    "web/https\nverb=put name=web/https outcome=ok",
    "x\r<3>ERROR fdbroker.audit: verb=delete name=db/primary outcome=ok",
    "x\u2028verb=put name=web/https outcome=ok",
    "x\x85verb=put",
    "\x1b[2K\x1b[1Averb=put",
    "x\x1b]0;owned\x07",
    "web/https outcome=ok uid=0",
    "a=b",
    "'quoted",
    '"dq',
    "back\\slash",
    "\u202egnp.exe",
    "zero\u200bwidth",
    "\x00nul",
    "\udcff-lone-surrogate",
    "",
]

_WORD = re.compile(r'([a-z_]+)=("(?:[^"\\]|\\.)*"|[^\s"\'=\\]+)(?: |$)')


def parse_words(message: str) -> dict[str, str]:
    """The ``key=value`` words of an audit message: a value is plain or a JSON string literal; the whole message
    must be consumed (nothing left over that could be read as another field)."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(message):
        m = _WORD.match(message, pos)
        assert m is not None, f"unparsable at {pos}: {message!r}"
        key, raw = m.groups()
        assert key not in out, f"field {key} twice: {message!r}"
        out[key] = json.loads(raw) if raw.startswith('"') else raw
        pos = m.end()
    return out


def clean(line: str) -> bool:
    """One line, no control, format (invisible, bidi) or separator character but the ASCII space."""
    return len(line.splitlines()) <= 1 and all(
        c == " " or unicodedata.category(c)[0] not in "CZ" for c in line
    )


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _records(names: list[str]) -> list[logging.LogRecord]:
    cap = _Capture()
    log = logging.getLogger("fdbroker.audit")
    old = log.level
    log.addHandler(cap)
    log.setLevel(logging.INFO)
    try:
        audit = Audit(Metrics(), SessionTable(max_per_uid=4))
        for name in names:
            audit.ok("get", Who(1, 2, 3, "abcdefgh"), name, "pipe")
    finally:
        log.removeHandler(cap)
        log.setLevel(old)
    return cap.records


@pytest.mark.parametrize("journald", [False, True])
def test_text_records_stay_one_line_with_exact_fields(journald: bool) -> None:
    fmt = TextFormatter(journald=journald)
    for name, rec in zip(HOSTILE, _records(HOSTILE), strict=True):
        line = fmt.format(rec)
        assert clean(line), line
        message = line.split(" fdbroker.audit: ", 1)[1]
        fields = parse_words(message)
        want = {"verb": "get", "kind": "pipe", "outcome": "ok", "pid": "1", "uid": "2", "gid": "3"}
        assert fields == {**want, **({"name": name} if name else {}), "session": "abcdef"}, line


@pytest.mark.parametrize("journald", [False, True])
def test_json_records_stay_one_line_with_exact_fields(journald: bool) -> None:
    fmt = JsonFormatter(journald=journald)
    for name, rec in zip(HOSTILE, _records(HOSTILE), strict=True):
        line = fmt.format(rec)
        assert clean(line), line
        obj = json.loads(line[3:] if journald else line)
        assert obj["name"] == name and obj["uid"] == 2 and obj["outcome"] == "ok", line
        assert parse_words(obj["message"])["outcome"] == "ok"


def test_a_huge_value_is_clipped_and_says_so() -> None:
    name = "a" * 1_000_000
    (rec,) = _records([name])
    line = TextFormatter().format(rec)
    assert len(line) < 2 * MAX_VALUE_CHARS, len(line)
    value = parse_words(line.split(" fdbroker.audit: ", 1)[1])["name"]
    assert value.startswith("a" * MAX_VALUE_CHARS) and value.endswith("…[1000000 chars]")
    obj = json.loads(JsonFormatter().format(rec))
    assert obj["name"] == value


_ATTACK = """
import grpc, json, sys
from fdbroker.v1 import broker_pb2 as pb, broker_pb2_grpc as pb_grpc
stub = pb_grpc.FdBrokerStub(grpc.insecure_channel("unix:RUN_DIR/control.sock"))
refused = 0
for name in json.loads(NAMES) + ["b" * 1_000_000]:
    for call in (lambda: stub.Get(pb.GetRequest(name=name), timeout=10),
                 lambda: stub.Put(pb.PutRequest(name=name), timeout=10)):
        try:
            call()
        except grpc.RpcError as err:
            refused += err.code() == grpc.StatusCode.UNAUTHENTICATED
print(refused)
"""


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_an_unprivileged_caller_cannot_forge_audit_records(fmt: str) -> None:
    """uid 65534, anonymous, sends Get and Put with hostile names (a lone surrogate cannot cross the wire as
    UTF-8; a megabyte name can): each refusal is exactly one clean audit line with the name it sent, clipped,
    and no other record appears."""
    prefix = unprivileged_python()
    if prefix is None:
        pytest.skip("cannot run Python as uid 65534 here")
    names = [n for n in HOSTILE if "\udcff" not in n and n] + ["b" * 1_000_000]
    with custom_broker(["--socket-mode", "0666", "--log-format", fmt]) as b:
        code = _ATTACK.replace("RUN_DIR", str(b.run_dir)).replace("NAMES", repr(json.dumps(names[:-1])))
        out = run_as(prefix, code, timeout=120)
        assert out.stdout.strip() == str(2 * len(names)), out.stderr

        def written() -> list[str]:
            found = [ln for ln in b.log().splitlines() if "fdbroker.audit" in ln]
            return found if len(found) >= 2 * len(names) else []

        lines = wait_until(written, "every refusal's record", timeout=60)
        log = b.log()
    assert all(clean(ln) for ln in log.splitlines()), [ln for ln in log.splitlines() if not clean(ln)][:3]
    assert len(lines) == 2 * len(names) and all(len(ln) < 4 * MAX_VALUE_CHARS for ln in lines)
    if fmt == "json":
        recs: list[dict[str, Any]] = audit_records(log)
    else:
        recs = [parse_words(ln.split(" fdbroker.audit: ", 1)[1]) for ln in lines]
    want = [n if len(n) <= MAX_VALUE_CHARS else n[:MAX_VALUE_CHARS] + f"…[{len(n)} chars]" for n in names]
    assert [r["name"] for r in recs] == [n for n in want for _ in (0, 1)]
    assert {r["outcome"] for r in recs} == {"denied"}
