"""How the broker logs: one record per line on stderr, as text or JSON (``--log-format``), journald-aware.

* ``text``: ``2024-05-01 12:00:00,123 fdbroker[PID] INFO fdbroker.audit: verb=get name=web/https …``
* ``json``: one object per line with ``time`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, an
  audit record's fields as keys of their own (``verb``, ``name``, ``kind``, ``outcome``, ``pid``, ``uid``,
  ``gid``, ``session``, … see :mod:`fdbroker.broker.audit`), and ``exception`` (the traceback) when there is one.
  The keys do not change with where the broker runs.

Under journald, detected as systemd documents it (``$JOURNAL_STREAM`` is the ``device:inode`` of stderr, not
merely set: a child that inherited the variable but writes elsewhere is not under journald), a text line carries
no timestamp and no pid (the journal records both), and every line (each line of a traceback too) starts with
the syslog priority, ``<N>``, which journald strips and keeps as the entry's priority, so ``journalctl -p
warning`` works. A JSON line gets the same prefix.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, TextIO

FORMATS = ("text", "json")

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level (DEBUG 7, INFO 6, WARNING 4, ERROR 3, CRITICAL 2)."""
    for level in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if levelno >= level:
            return _PRIORITY[level]
    return 7


def under_journald(stream: TextIO | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Whether ``stream`` (default stderr) is connected to the journal: ``$JOURNAL_STREAM`` names its device
    and inode."""
    dev, _, ino = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat((sys.stderr if stream is None else stream).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)


_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
"""Characters a text line never carries raw (C0 but tab and newline, DEL, C1, the Unicode line separators): an
audit record quotes them itself (:func:`fdbroker.broker.audit.word`); this catches any other message."""


class TextFormatter(logging.Formatter):
    """``TIME fdbroker[PID] LEVEL LOGGER: MESSAGE``; under journald ``<N>LEVEL LOGGER: MESSAGE`` on every line."""

    def __init__(self, *, journald: bool = False) -> None:
        fmt = "%(levelname)s %(name)s: %(message)s"
        super().__init__(fmt if journald else "%(asctime)s fdbroker[%(process)d] " + fmt)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if _UNSAFE.search(text):  # no line but at "\n", no terminal escape, whatever a message carries
            text = _UNSAFE.sub(lambda m: m[0].encode("unicode_escape").decode("ascii"), text)
        if not self.journald:
            return text
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.split("\n"))


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring); under journald prefixed with ``<N>``."""

    def __init__(self, *, journald: bool = False) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        audit = getattr(record, "audit", None)
        if isinstance(audit, dict):
            for k, v in audit.items():
                obj.setdefault(k, v)
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        # ASCII: JSON leaves U+2028, U+0085 and bidi controls raw otherwise, and line readers (str.splitlines)
        # split at the first two: a caller's name could cut a record in two.
        text = json.dumps(obj, default=str)
        return f"<{syslog_priority(record.levelno)}>{text}" if self.journald else text


def configure(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None) -> logging.Handler:
    """Send every record at ``level`` and above to ``stream`` (default stderr) in format ``fmt`` ("text" or
    "json"), journald-aware; replaces the root logger's handlers. Returns the handler."""
    if fmt not in FORMATS:
        raise ValueError(f"log format {fmt!r}: expected one of {', '.join(FORMATS)}")
    stream = sys.stderr if stream is None else stream
    journald = under_journald(stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        JsonFormatter(journald=journald) if fmt == "json" else TextFormatter(journald=journald)
    )
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    # The optimizations the logging HOWTO lists: no caller lookup, thread or multiprocessing names (no format
    # of ours shows them); the pid stays (the text format shows it).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler
