"""A client that never stops asking: ``http_client_loop.py HOST PORT STATUS STOP MAX_SECONDS``.

One HTTP/1.0 GET at a time, each on a new connection, until the file STOP exists (or MAX_SECONDS passed: it
always ends by itself). Every outcome is counted: ``ok`` (a complete, correct answer), ``refused``
(ECONNREFUSED: nothing listened) and ``errors`` (anything else: reset, timeout, a wrong answer). The counts are
written to STATUS as JSON, atomically, at most every 0.1 s and once more at the end (``"done": true``).
"""

import json
import os
import socket
import sys
import time

HOST, PORT, STATUS, STOP = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
MAX_SECONDS = float(sys.argv[5])
EXPECTED = b"served on a brokered listener\n"
ok = refused = 0
errors: list[str] = []


def dump(done: bool) -> None:
    tmp = STATUS + ".tmp"
    with open(tmp, "w") as f:
        json.dump(
            {"ok": ok, "refused": refused, "errors": errors[:20], "n_errors": len(errors), "done": done}, f
        )
    os.replace(tmp, STATUS)


deadline = time.monotonic() + MAX_SECONDS
last = 0.0
while not os.path.exists(STOP) and time.monotonic() < deadline:
    try:
        with socket.create_connection((HOST, PORT), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        if data.startswith(b"HTTP/1.0 200") and data.endswith(EXPECTED):
            ok += 1
        else:
            errors.append(f"unexpected answer {data[:80]!r}")
    except ConnectionRefusedError:
        refused += 1
    except OSError as e:
        errors.append(repr(e))
    if time.monotonic() - last >= 0.1:
        dump(False)
        last = time.monotonic()
    time.sleep(0.005)
dump(True)
