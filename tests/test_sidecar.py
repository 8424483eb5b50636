"""Design use case 1, for real: a privileged sidecar in its own network namespace binds :443 and deposits the
listener as ``web/https``; an unprivileged app (uid 65534, no capabilities, another network namespace) gets it
from the broker and serves on it; a client inside the sidecar's namespace connects to :443 and gets the app's
answer."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from brokerutil import child_env
from secutil import NOBODY, custom_broker, run_as, unprivileged_python

POLICY = """
[[rule]]
uids = [65534]
names = ["web/*"]
allow = ["get", "lease", "stat"]
"""

SIDECAR = """
import fdbroker, os, socket, subprocess, sys
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
lsock.bind(("0.0.0.0", 443))
lsock.listen(16)
with fdbroker.Client() as c:
    e = c.put("web/https", lsock, labels={"owner": "sidecar"})
print("DEPOSITED", e.local_address, os.readlink("/proc/self/ns/net"), flush=True)
lsock.close()  # from now on only the broker (and the app) hold it
assert sys.stdin.readline().strip() == "CONNECT"
with socket.create_connection(("127.0.0.1", 443), timeout=20) as s:
    s.sendall(b"GET / from the sidecar namespace\\n")
    data = b""
    while chunk := s.recv(1024):
        data += chunk
print("ANSWER", data.decode(), flush=True)
"""

APP = """
import fdbroker, os, socket
caps = [l for l in open("/proc/self/status") if l.startswith("CapEff")][0].split()[1]
try:
    socket.create_server(("0.0.0.0", 443)).close()
    bind = "bound"
except PermissionError:
    bind = "EACCES"
with fdbroker.Client() as c:
    s = c.get("web/https")
print("SERVING", os.getuid(), caps, bind, os.readlink("/proc/self/ns/net"), s.getsockname()[1], flush=True)
conn, _ = s.accept()
req = conn.makefile("rb").readline()
conn.sendall(b"app uid %d answered: " % os.getuid() + req)
conn.close()
s.close()
"""


@pytest.mark.slow
def test_sidecar_socket_brokerage_across_network_namespaces(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, port 443, setpriv)")
    probe = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {probe.stderr.strip()}")
    nobody = unprivileged_python()
    if nobody is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    unpriv_start = Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip()

    policy = tmp_path / "policy.toml"
    policy.write_text(POLICY)
    os.chmod(tmp_path, 0o755)
    with custom_broker(["--socket-mode", "0666", "--policy", str(policy)]) as b:
        sidecar = subprocess.Popen(
            ["unshare", "--net", "--", sys.executable, "-c", textwrap.dedent(SIDECAR)],
            env=child_env(b.run_dir),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        app: subprocess.Popen[str] | None = None
        try:
            assert sidecar.stdout is not None and sidecar.stdin is not None
            line = sidecar.stdout.readline().split()
            if not line and sidecar.wait() != 0:
                err = sidecar.stderr.read() if sidecar.stderr else ""
                if "ip" in err and ("not found" in err or "No such file" in err):
                    pytest.skip(f"no ip(8) to bring up lo in the namespace: {err.strip()}")
            assert line[:2] == ["DEPOSITED", "0.0.0.0:443"], (
                line,
                sidecar.stderr.read() if sidecar.stderr else "",
            )
            sidecar_ns = line[2]
            assert sidecar_ns != os.readlink("/proc/self/ns/net")

            cmd = [*nobody[:-1], f"FDBROKER_RUN_DIR={b.run_dir}", nobody[-1], "-c", textwrap.dedent(APP)]
            app = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
            assert app.stdout is not None
            served = app.stdout.readline().split()
            assert served and served[0] == "SERVING", app.stderr.read() if app.stderr else ""
            _, uid, caps, bind, app_ns, port = served
            assert int(uid) == NOBODY and int(caps, 16) == 0  # no CAP_NET_BIND_SERVICE, no capability at all
            if int(unpriv_start) > 443:
                assert bind == "EACCES"  # it could not have bound :443 itself
            assert app_ns != sidecar_ns  # and it is not in the sidecar's network namespace
            assert port == "443"

            sidecar.stdin.write("CONNECT\n")
            sidecar.stdin.flush()
            answer = sidecar.stdout.readline()
            assert answer.startswith("ANSWER app uid 65534 answered: GET / from the sidecar namespace"), (
                answer,
                sidecar.stderr.read() if sidecar.stderr else "",
            )
            assert app.wait(20) == 0 and sidecar.wait(20) == 0

            # the app could get it but not take or delete it: the entry is still the sidecar's
            r = run_as(
                nobody,
                """
                import fdbroker
                from fdbroker.errors import PermissionDenied
                with fdbroker.Client() as c:
                    try:
                        c.delete("web/https")
                    except PermissionDenied as e:
                        print("DENIED", e)
                """,
                env={"FDBROKER_RUN_DIR": str(b.run_dir)},
            )
            assert "DENIED" in r.stdout and "web/https" in r.stdout
            with b.client() as c:
                assert c.stat("web/https").labels == {"owner": "sidecar"}
                c.delete("web/https")
        finally:
            for p in (sidecar, app):
                if p is None:
                    continue
                if p.poll() is None:
                    p.kill()
                p.wait()
                for f in (p.stdin, p.stdout, p.stderr):
                    if f:
                        f.close()
