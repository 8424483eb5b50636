"""deploy/: the systemd units, the container recipe and the Kubernetes manifests say what they mean.

Static checks (every file parses; cross-references hold; every fdbroker command line in them is accepted by the
CLI's own argument parser; the example policies load) and real runs: the unit's ExecStart started as systemd
would (NOTIFY_SOCKET, LimitNOFILE), reloaded with the unit's ExecReload signal and stopped with SIGTERM; the
broker under the unit's RestrictAddressFamilies=AF_UNIX (emulated) and PrivateNetwork=yes (unshare --net); and
the sidecar Pod's three commands rehearsed on this host with the Pod's uids and modes.

YAML needs PyYAML, which is not a declared test dependency: without it the manifest tests are skipped.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fdbroker import cli
from fdbroker.broker.policy import Identity, Policy
from fdbroker.testing import wait_until

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SYSTEMD = DEPLOY / "systemd"
UNIT = SYSTEMD / "fdbroker.service"
PUT_UNIT = SYSTEMD / "fdbroker-put@.service"
PUT_SOCKET = SYSTEMD / "fdbroker-put@.socket"
HOLD_UNIT = SYSTEMD / "fdbroker-hold@.service"
PUT_DROPIN = DEPLOY / "etc" / "systemd" / "system" / "fdbroker-put@web-https.socket.d" / "listen.conf"
VERIFY_UNITS = (
    "fdbroker.service",
    "fdbroker-put@web-https.service",
    "fdbroker-put@web-https.socket",
    "fdbroker-hold@web-https.service",
)
POLICY = DEPLOY / "etc" / "fdbroker" / "policy.toml"
PUT_ENV = DEPLOY / "etc" / "fdbroker" / "put" / "web-https.env"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
K8S = DEPLOY / "kubernetes"
SIDECAR = K8S / "sidecar-pod.yaml"
DAEMONSET = K8S / "daemonset.yaml"
NOBODY = 65534
IS_ROOT = os.geteuid() == 0

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None  # type: ignore[assignment]  # the optional-import idiom: mypy types the name as the module

needs_yaml = pytest.mark.skipif(
    yaml is None, reason="PyYAML is not installed (not a declared test dependency); manifests not parsed"
)


# -- systemd unit files ---------------------------------------------------------------------------------------


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]} (systemd allows repeated keys; order kept)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = pending + raw.strip() if pending else raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert line.endswith("]"), f"{path.name}:{n}: bad section header {line!r}"
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}:{n}: key outside a section"
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9]*", key.strip()), f"{path.name}:{n}: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


def check_fdbroker_argv(argv: list[str]) -> tuple[str, Any]:
    """Parse an fdbroker command line (without the program name) with the CLI's own parser; return the verb
    and the parsed arguments. Fails the test on any option the CLI does not accept."""
    args = list(argv)
    cmd_at = args.index("--") if "--" in args else len(args)
    head = args[:cmd_at]
    verb = None
    i = 0
    while i < len(head):
        if head[i] in ("--run-dir", "--timeout"):
            i += 2
            continue
        if not head[i].startswith("-"):
            verb = head[i]
            break
        i += 1
    assert verb in cli.VERBS, f"not an fdbroker verb in {argv}"
    try:
        parsed = cli.build_parser(verb).parse_args(head)
    except SystemExit as e:  # argparse's way to refuse
        raise AssertionError(f"fdbroker rejects {shlex.join(argv)} (exit {e.code})") from None
    if verb in ("exec", "get", "lease", "take"):
        assert cmd_at < len(args) or verb != "exec", f"exec needs -- CMD: {argv}"
    return verb, parsed


def exec_start_argv(unit: dict[str, list[tuple[str, str]]]) -> list[str]:
    return shlex.split(one(unit, "Service", "ExecStart"))


def test_units_parse_and_describe_the_broker() -> None:
    unit = parse_unit(UNIT)
    assert set(unit) == {"Unit", "Service", "Install"}
    assert one(unit, "Service", "Type") == "notify"
    argv = exec_start_argv(unit)
    assert argv[:2] == ["/usr/local/bin/fdbroker", "serve"]
    verb, args = check_fdbroker_argv(argv[1:])
    assert verb == "serve"
    # RuntimeDirectory= creates exactly the run dir the broker is told to use.
    assert args.run_dir == "/run/" + one(unit, "Service", "RuntimeDirectory")
    assert args.policy == "/etc/fdbroker/policy.toml"
    mode = int(one(unit, "Service", "RuntimeDirectoryMode"), 8)
    assert not mode & 0o022, "the broker refuses a group/world-writable run dir"
    assert one(unit, "Service", "RuntimeDirectoryPreserve") == "yes"
    assert one(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert "/run/fdbroker" in one(unit, "Service", "ReadWritePaths").split()
    nofile = int(one(unit, "Service", "LimitNOFILE"))
    assert 0 < int(one(unit, "Service", "FileDescriptorStoreMax")) <= nofile
    assert nofile - args.reserve_fds > 0
    assert one(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateNetwork"):
        assert one(unit, "Service", key) == "yes", key
    assert one(unit, "Service", "ProtectSystem") == "strict"
    assert one(unit, "Service", "SystemCallFilter") == "@system-service"
    assert one(unit, "Service", "CapabilityBoundingSet") == ""
    assert "PrivateUsers" not in dict(unit["Service"]), "a user namespace would hide the callers' uids"


def env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            k, _, v = line.partition("=")
            env[k] = v
    return env


def test_put_template_deposits_the_socket_systemd_holds() -> None:
    """The deposit pair: systemd binds and holds the listener (fdbroker-put@.socket, whose activation target
    runs nothing), and fdbroker-put@.service hands that same socket (fd 3) to every broker that starts."""
    unit = parse_unit(PUT_UNIT)
    assert one(unit, "Service", "Type") == "oneshot"
    assert one(unit, "Service", "RemainAfterExit") == "yes"
    assert one(unit, "Unit", "BindsTo") == "fdbroker.service"
    afters = [a for k, v in unit["Unit"] if k == "After" for a in v.split()]
    assert {"fdbroker.service", "fdbroker-put@%i.socket"} <= set(afters)
    assert one(unit, "Unit", "Requires") == "fdbroker-put@%i.socket"
    assert one(unit, "Service", "Sockets") == "fdbroker-put@%i.socket"
    assert one(unit, "Install", "WantedBy") == "fdbroker.service"
    assert one(unit, "Install", "Also") == "fdbroker-put@%i.socket"
    assert one(unit, "Service", "EnvironmentFile") == "-/etc/fdbroker/put/%i.env"
    env = env_file(PUT_ENV)
    # The example env file is named as systemd escapes web/https.
    assert PUT_ENV.name == "web-https.env"
    cmd = one(unit, "Service", "ExecStart")
    cmd = cmd.replace("%I", "web/https")
    cmd = cmd.replace("$FDBROKER_PUT_ARGS", env["FDBROKER_PUT_ARGS"])  # unbraced: word-split, as systemd does
    argv = shlex.split(cmd)
    assert argv[0] == "/usr/local/bin/fdbroker"
    verb, args = check_fdbroker_argv(argv[1:])
    # fd 3: the first (only) socket of Sockets=; --replace: the same socket again is the same entry.
    assert (verb, args.name, args.fd, args.listen, args.replace) == ("put", "web/https", 3, None, True)
    assert args.run_dir == "/run/fdbroker"
    assert dict(args.label) == {"tier": "web"}
    # It binds nothing, so it needs nothing: the broker's own user, no capabilities, AF_UNIX only.
    broker = parse_unit(UNIT)
    assert one(unit, "Service", "User") == one(broker, "Service", "User")
    assert one(unit, "Service", "CapabilityBoundingSet") == one(unit, "Service", "AmbientCapabilities") == ""
    assert one(unit, "Service", "RestrictAddressFamilies") == "AF_UNIX"
    assert one(unit, "Service", "NoNewPrivileges") == "yes"
    # The broker's own user/group (sysusers) exists.
    sysusers = [line.split() for line in (SYSTEMD / "fdbroker.sysusers.conf").read_text().splitlines()]
    assert ["u", one(broker, "Service", "User")] in [w[:2] for w in sysusers if w and w[0][0] != "#"]

    sock = parse_unit(PUT_SOCKET)
    assert set(sock) == {"Unit", "Socket", "Install"}
    # Traffic activates only the do-nothing holder, never the deposit (which would pull in the broker).
    assert one(sock, "Socket", "Service") == "fdbroker-hold@%i.service"
    assert not [k for k, _ in sock["Socket"] if k.startswith("Listen")], (
        "addresses go in per-instance drop-ins"
    )
    assert one(sock, "Install", "WantedBy") == "sockets.target"
    hold = parse_unit(HOLD_UNIT)
    assert one(hold, "Service", "Type") == "oneshot" and one(hold, "Service", "RemainAfterExit") == "yes"
    assert one(hold, "Service", "ExecStart") == "/bin/true"
    dropin = parse_unit(PUT_DROPIN)
    assert PUT_DROPIN.parent.name == "fdbroker-put@web-https.socket.d"
    assert one(dropin, "Socket", "ListenStream") == "0.0.0.0:443"


def run_install(root: Path, fdbroker: str) -> subprocess.CompletedProcess[str]:
    """deploy/systemd/install.sh as docs/deploy.md runs it, into DESTDIR=root."""
    return subprocess.run(
        [str(SYSTEMD / "install.sh")],
        env={**os.environ, "DESTDIR": str(root), "FDBROKER": fdbroker},
        capture_output=True,
        text=True,
    )


def install_root(tmp: Path) -> Path:
    """Install as documented into DESTDIR=tmp/root, then add the example deposit (socket drop-in, env file).

    The root gets what ``systemd-analyze verify --root`` needs from an OS around our files: systemd's own
    units, /bin/kill and /bin/true, and an fdbroker program at /opt/fdbroker/bin/fdbroker (a copy of this
    checkout's console script: verify checks only that it is executable)."""
    root = tmp / "root"
    units = next(p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir())
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "usr/bin").mkdir(parents=True)
    for cmd in ("kill", "true"):
        shutil.copy(shutil.which(cmd) or f"/bin/{cmd}", root / "usr/bin" / cmd)
    (root / "bin").symlink_to("usr/bin")
    exe = shutil.which("fdbroker", path=str(Path(sys.executable).parent)) or shutil.which("fdbroker")
    if exe is None:
        pytest.skip("no fdbroker console script to install")
    (root / "opt/fdbroker/bin").mkdir(parents=True)
    shutil.copy(exe, root / "opt/fdbroker/bin/fdbroker")
    r = run_install(root, "/opt/fdbroker/bin/fdbroker")
    assert r.returncode == 0, r.stderr
    dropin = root / "etc/systemd/system" / PUT_DROPIN.parent.name
    dropin.mkdir()
    shutil.copy(PUT_DROPIN, dropin)
    shutil.copy(PUT_ENV, root / "etc/fdbroker/put")
    return root


@pytest.mark.skipif(
    not shutil.which("systemd-analyze") or not shutil.which("systemd-sysusers"),
    reason="systemd-analyze/systemd-sysusers not installed (Debian: systemd)",
)
def test_install_then_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units as shipped, after the documented install: ``systemd-analyze verify`` reports nothing.
    (tests/test_systemd.py does the same install in a booted systemd and runs the units.)"""
    root = install_root(tmp_path)
    assert os.readlink(root / "usr/local/bin/fdbroker") == "/opt/fdbroker/bin/fdbroker"
    for name in (
        "fdbroker.service",
        "fdbroker-put@.service",
        "fdbroker-put@.socket",
        "fdbroker-hold@.service",
    ):
        assert (root / "etc/systemd/system" / name).read_bytes() == (SYSTEMD / name).read_bytes(), name
    assert (root / "etc/fdbroker/policy.toml").read_bytes() == POLICY.read_bytes()
    assert re.search(r"^fdbroker:x:\d+:\d+:", (root / "etc/passwd").read_text(), re.M), "systemd-sysusers ran"
    # Installing again upgrades the units and keeps an edited policy.
    (root / "etc/fdbroker/policy.toml").write_text("# mine\n")
    r = run_install(root, "/opt/fdbroker/bin/fdbroker")
    assert r.returncode == 0 and (root / "etc/fdbroker/policy.toml").read_text() == "# mine\n", r.stderr
    r = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", f"--root={root}", *VERIFY_UNITS],
        capture_output=True,
        text=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"},
    )
    # verify exits 0 even for unknown keys; it only complains: any output is a finding.
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not out, out


def test_install_refuses_a_missing_program(tmp_path: Path) -> None:
    r = run_install(tmp_path, "/nonexistent/fdbroker")
    assert r.returncode == 1 and "is not an executable" in r.stderr, r
    assert not (tmp_path / "etc").exists(), "nothing installed"


def test_install_keeps_a_program_installed_at_the_units_path(tmp_path: Path) -> None:
    """/usr/local/bin/fdbroker that pip put there is used as it is (FDBROKER=/usr/local/bin/fdbroker), and never
    overwritten by a link to another one."""
    local = tmp_path / "usr/local/bin/fdbroker"
    other = tmp_path / "opt/fdbroker/bin/fdbroker"
    for exe in (local, other):
        exe.parent.mkdir(parents=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    r = run_install(tmp_path, "/opt/fdbroker/bin/fdbroker")
    assert r.returncode == 1 and "is not a link" in r.stderr, r
    assert local.read_text() == "#!/bin/sh\n" and not local.is_symlink()
    if shutil.which("systemd-sysusers"):
        r = run_install(tmp_path, "/usr/local/bin/fdbroker")
        assert r.returncode == 0, r.stderr
        assert local.read_text() == "#!/bin/sh\n" and not local.is_symlink()


# -- the policy examples ---------------------------------------------------------------------------------------


def check_sidecar_policy(policy: Policy) -> None:
    app = Identity(pid=1, uid=NOBODY, gid=NOBODY)
    assert policy.allows(app, "get", "web/https", owner_uid=0)
    assert policy.allows(app, "lease", "web/https", owner_uid=0)
    assert not policy.allows(app, "delete", "web/https", owner_uid=0)
    assert not policy.allows(app, "take", "web/https", owner_uid=0)
    assert not policy.allows(Identity(pid=1, uid=1234, gid=1234), "get", "web/https", owner_uid=0)
    assert policy.allows(Identity(pid=1, uid=0, gid=0), "put", "web/https", owner_uid=None)


def test_policy_example_loads() -> None:
    policy = Policy.load(POLICY, broker_uid=999)
    check_sidecar_policy(policy)
    # The example freezes web/** for everyone but root and the broker.
    assert not policy.allows(Identity(pid=1, uid=1234, gid=1234), "put", "web/new", owner_uid=None)


# -- container recipe ------------------------------------------------------------------------------------------


def containerfile_instructions() -> list[tuple[str, str]]:
    out = []
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_containerfile() -> None:
    ins = containerfile_instructions()
    # Pinned: an exact release tag (and optionally its digest), never a moving one such as 3.11-slim.
    assert ins[0][0] == "FROM" and re.fullmatch(
        r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", ins[0][1]
    )
    assert not [i for i in ins if i[0] == "ADD"], "COPY only: no ADD (of URLs or archives)"
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    users = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest) for word, rest in ins if word == "USER"]
    # Numeric (hadolint DL3066; Kubernetes' runAsNonRoot can check only a numeric image user) and not root.
    assert users and re.fullmatch(r"\d+:\d+", users[-1]), users
    assert users[-1].split(":")[0] != "0", "runs as a non-root user by default"
    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["fdbroker", "serve", "--keeper"]
    assert json.loads(dict(ins)["VOLUME"]) == ["/run/fdbroker"]
    assert "FDBROKER_RUN_DIR=/run/fdbroker" in dict(ins)["ENV"]
    health = dict(ins)["HEALTHCHECK"]
    probe = json.loads(health[health.index("CMD") + 3 :].strip())
    assert probe[0] == "fdbroker"
    assert check_fdbroker_argv(probe[1:])[0] == "status"
    # Every COPY source exists in the build context (the repository root).
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            for src in rest.split()[:-1]:
                assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    assert "pip install" in dict(ins)["RUN"] or any("pip install" in r for w, r in ins if w == "RUN")


# -- Kubernetes manifests --------------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    assert yaml is not None
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    for d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), f"{path.name}: incomplete object {d}"
    return docs


def pod_specs(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for d in docs:
        if d["kind"] == "Pod":
            specs.append(d["spec"])
        elif d["kind"] in ("DaemonSet", "Deployment", "StatefulSet"):
            specs.append(d["spec"]["template"]["spec"])
    return specs


def all_containers(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def image_entrypoint() -> list[str]:
    argv: list[str] = json.loads(dict(containerfile_instructions())["ENTRYPOINT"])
    return argv


SHELL_SEPARATORS = {
    "|",
    "||",
    "&&",
    ";",
    "&",
    "!",
    "(",
    ")",
    "if",
    "then",
    "else",
    "elif",
    "fi",
    "while",
    "do",
    "done",
}


def shell_commands(script: str) -> Iterator[list[str]]:
    """The simple commands of a shell script that start with ``fdbroker``: each line tokenized as the shell
    would (quotes respected), split at operators and ``if``/``then``/..., redirections removed; ``$variable``
    words (options chosen at run time, such as ``$takeover``) are dropped."""
    for line in script.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        tokens = iter(lex)
        cmd: list[str] = []
        cmds = [cmd]
        for t in tokens:
            if t in SHELL_SEPARATORS:
                cmd = []
                cmds.append(cmd)
            elif set(t) <= set("<>&"):  # a redirection: drop it, its target and a leading fd number
                next(tokens, None)
                if cmd and cmd[-1].isdigit():
                    cmd.pop()
            elif not t.startswith("$"):
                cmd.append(t)
        yield from (c for c in cmds if c and c[0] == "fdbroker")


def fdbroker_commands(c: dict[str, Any]) -> Iterator[list[str]]:
    """Every fdbroker command line in a container: its command/args, its probes, and the lines of shell scripts
    (``/bin/sh -c SCRIPT``) in either."""
    argv = list(c.get("command") or image_entrypoint()) + list(c.get("args", []))
    lines = [argv]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        if probe in c:
            lines.append(c[probe]["exec"]["command"])
    for line in list(lines):
        if line[:2] == ["/bin/sh", "-c"]:
            lines.extend(shell_commands(line[2]))
    for line in lines:
        if line and line[0] == "fdbroker":
            yield line[1:]


def env_of(c: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in c.get("env", [])}


def check_manifest(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    docs = load_docs(path)
    configmaps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    (spec,) = pod_specs(docs)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert spec.get("automountServiceAccountToken") is False, "no API access needed"
    for c in all_containers(spec):
        for m in c.get("volumeMounts", []):
            assert m["name"] in volumes, f"{c['name']}: mounts unknown volume {m['name']}"
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{v['name']}: no ConfigMap {v['configMap']}"
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], c["name"]
        run_dir = env_of(c).get("FDBROKER_RUN_DIR")
        assert run_dir, f"{c['name']}: FDBROKER_RUN_DIR unset"
        assert any(run_dir.startswith(m["mountPath"]) for m in c["volumeMounts"]), c["name"]
        for argv in fdbroker_commands(c):
            verb, args = check_fdbroker_argv(argv)
            if args.run_dir is not None:
                assert args.run_dir == run_dir, f"{c['name']}: --run-dir {args.run_dir} != {run_dir}"
            if verb == "serve":
                # --policy names a key of a mounted ConfigMap, and the key holds a policy that loads.
                pdir, key = os.path.split(args.policy)
                (m,) = [m for m in c["volumeMounts"] if m["mountPath"] == pdir]
                cm = configmaps[volumes[m["name"]]["configMap"]["name"]]
                assert key in cm["data"], f"ConfigMap {cm['metadata']['name']} has no key {key}"
                with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
                    f.write(cm["data"][key])
                    f.flush()
                    check_sidecar_policy(Policy.load(Path(f.name), broker_uid=10001))
    return docs, spec


def container(spec: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in all_containers(spec) if c["name"] == name]
    return c


@needs_yaml
def test_sidecar_pod_manifest() -> None:
    _, spec = check_manifest(SIDECAR)
    (vol,) = [v for v in spec["volumes"] if "emptyDir" in v]
    assert vol["emptyDir"]["medium"] == "Memory"
    broker, binder, app = (container(spec, n) for n in ("broker", "binder", "app"))
    for c in (broker, binder, app):
        assert {"name": vol["name"], "mountPath": "/run/fdbroker"} in c["volumeMounts"], c["name"]
    # Startup order: broker then binder are native sidecars (init containers that keep running), each gated
    # by a startupProbe, so the app starts only once web/https exists.
    assert [c["name"] for c in spec["initContainers"]] == ["broker", "binder"]
    for c in (broker, binder):
        assert c["restartPolicy"] == "Always" and "startupProbe" in c
    assert [c["name"] for c in spec["containers"]] == ["app"]
    serve_args = check_fdbroker_argv(next(fdbroker_commands(broker)))[1]
    # The broker's run dir is its own subdirectory of the emptyDir (whose root it would refuse).
    assert Path(serve_args.run_dir).parent == Path("/run/fdbroker")
    assert serve_args.socket_group == str(spec["securityContext"]["fsGroup"])
    puts = [check_fdbroker_argv(a)[1] for a in fdbroker_commands(binder) if "put" in a]
    assert [(p.name, p.listen) for p in puts] == [("web/https", "tcp://0.0.0.0:443")]
    # The binder is an ordinary user without capabilities: the Pod's sysctl makes :443 bindable, and the
    # policy lets that uid deposit (and check) web/https and nothing else.
    bsc = binder["securityContext"]
    assert (
        bsc["runAsNonRoot"] is True and bsc["runAsUser"] not in (0, None) and "add" not in bsc["capabilities"]
    )
    sysctls = {x["name"]: x["value"] for x in spec["securityContext"]["sysctls"]}
    assert int(sysctls["net.ipv4.ip_unprivileged_port_start"]) <= 443
    (cm,) = [d for d in load_docs(SIDECAR) if d["kind"] == "ConfigMap"]
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(cm["data"]["policy.toml"])
        f.flush()
        policy = Policy.load(Path(f.name), broker_uid=10001)
    # The binder's deposit is its own entry (the built-in rules); the app's rule reaches it.
    who = Identity(pid=1, uid=bsc["runAsUser"], gid=bsc["runAsGroup"])
    assert policy.allows(who, "put", "web/https", owner_uid=None)  # a new name
    assert policy.allows(who, "stat", "web/https", owner_uid=bsc["runAsUser"])
    app_id = Identity(pid=1, uid=NOBODY, gid=NOBODY)
    assert policy.allows(app_id, "get", "web/https", owner_uid=bsc["runAsUser"])
    assert not policy.allows(app_id, "delete", "web/https", owner_uid=bsc["runAsUser"])
    asc = app["securityContext"]
    assert asc["runAsNonRoot"] is True and asc["runAsUser"] == NOBODY and "add" not in asc["capabilities"]
    (app_cmd,) = list(fdbroker_commands(app))
    assert app_cmd[:3] == ["exec", "web/https", "--"]


@needs_yaml
def daemonset_broker() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    docs = load_docs(DAEMONSET)
    (spec,) = pod_specs(docs)
    (broker,) = spec["containers"]
    return docs, spec, broker


def test_daemonset_manifest() -> None:
    docs, spec = check_manifest(DAEMONSET)
    assert [d["kind"] for d in docs if d["kind"] == "PodDisruptionBudget"] == []
    (vol,) = [v for v in spec["volumes"] if "hostPath" in v]
    assert vol["hostPath"] == {"path": "/run/fdbroker", "type": "DirectoryOrCreate"}
    assert (
        spec["hostNetwork"] is False and spec["hostPID"] is False
    )  # the readiness probe relies on hostPID off
    assert spec["tolerations"]
    (broker,) = spec["containers"]
    assert broker["resources"]["requests"] and broker["resources"]["limits"]
    # A rollout surges: the new pod runs beside the old one (and takes its entries over) before it goes.
    (ds,) = [d for d in docs if d["kind"] == "DaemonSet"]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert broker["command"][:2] == ["/bin/sh", "-c"]
    serves = [check_fdbroker_argv(a)[1] for a in fdbroker_commands(broker) if a and a[0] == "serve"]
    (args,) = serves
    assert args.run_dir == "/run/fdbroker" and not args.takeover  # --takeover only when a broker serves there
    assert "$takeover &" in broker["command"][2] and 'takeover="--takeover"' in broker["command"][2]
    assert args.socket_group in [str(g) for g in spec["securityContext"]["supplementalGroups"]]
    statuses = [a for a in fdbroker_commands(broker) if "status" in a]
    assert len(statuses) == 3, statuses  # the script's "is a broker serving?", liveness and readiness
    for a in statuses:
        assert check_fdbroker_argv(a)[0] == "status"


# The "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards/), as the
# rules that admission enforces for it: every baseline control, then the restricted ones. No tool from the package
# registries reachable here implements it offline, so it is written out; each rule names its control.
BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD", "NET_BIND_SERVICE",
    "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}


def restricted_violations(spec: dict[str, Any], annotations: dict[str, str] | None = None) -> list[str]:
    """What keeps a pod spec from the restricted Pod Security level; empty if it passes."""
    out: list[str] = []
    psc = spec.get("securityContext") or {}
    containers = [
        *spec.get("initContainers", []),
        *spec.get("containers", []),
        *spec.get("ephemeralContainers", []),
    ]
    for key in ("hostNetwork", "hostPID", "hostIPC"):  # baseline: host namespaces
        if spec.get(key):
            out.append(f"{key}: true")
    for v in spec.get("volumes", []):
        kind = next(k for k in v if k != "name")
        if kind == "hostPath":  # baseline: HostPath volumes
            out.append(f"volume {v['name']}: hostPath")
        elif kind not in RESTRICTED_VOLUMES:  # restricted: volume types
            out.append(f"volume {v['name']}: {kind} is not an allowed volume type")
    for x in psc.get("sysctls", []):  # baseline: sysctls
        if x["name"] not in SAFE_SYSCTLS:
            out.append(f"sysctl {x['name']} is not a safe sysctl")
    for key, value in (annotations or {}).items():  # baseline: AppArmor (annotation form)
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and value == "unconfined":
            out.append(f"annotation {key}: unconfined")
    pod_nonroot = psc.get("runAsNonRoot")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    if pod_nonroot is False:
        out.append("pod runAsNonRoot: false")
    if psc.get("runAsUser") == 0:  # restricted: running as non-root user
        out.append("pod runAsUser: 0")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"pod seccompProfile {pod_seccomp}")
    for ctx in (psc, *(c.get("securityContext") or {} for c in containers)):
        if (ctx.get("windowsOptions") or {}).get("hostProcess"):  # baseline: HostProcess
            out.append("windowsOptions.hostProcess: true")
        se = ctx.get("seLinuxOptions") or {}  # baseline: SELinux
        if se.get("type", "") not in SELINUX_TYPES or se.get("user") or se.get("role"):
            out.append(f"seLinuxOptions {se}")
        if (ctx.get("appArmorProfile") or {}).get("type") == "Unconfined":  # baseline: AppArmor
            out.append("appArmorProfile: Unconfined")
    for c in containers:
        name = c["name"]
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):  # baseline: privileged containers
            out.append(f"{name}: privileged")
        caps = sc.get("capabilities") or {}
        added = set(caps.get("add", []))
        if added - BASELINE_CAPS:  # baseline: capabilities
            out.append(f"{name}: adds {sorted(added - BASELINE_CAPS)}")
        if "ALL" not in caps.get("drop", []):  # restricted: capabilities
            out.append(f"{name}: does not drop ALL capabilities")
        if added - {"NET_BIND_SERVICE"}:
            out.append(
                f"{name}: adds {sorted(added - {'NET_BIND_SERVICE'})} (only NET_BIND_SERVICE may be added)"
            )
        for port in c.get("ports", []):  # baseline: host ports
            if port.get("hostPort"):
                out.append(f"{name}: hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":  # baseline: /proc mount type
            out.append(f"{name}: procMount {sc['procMount']}")
        if sc.get("allowPrivilegeEscalation") is not False:  # restricted: privilege escalation
            out.append(f"{name}: allowPrivilegeEscalation is not false")
        nonroot = sc.get("runAsNonRoot", pod_nonroot)  # restricted: running as non-root
        if nonroot is not True:
            out.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser") == 0:  # restricted: running as non-root user
            out.append(f"{name}: runAsUser: 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)  # restricted: seccomp
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{name}: seccompProfile is {seccomp or 'unset'}, not RuntimeDefault or Localhost")
    return out


def pod_objects(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """(namespace, pod spec, pod annotations) of every Pod and pod template in ``docs``."""
    out = []
    for d in docs:
        ns = d["metadata"].get("namespace", "default")
        if d["kind"] == "Pod":
            out.append((ns, d["spec"], d["metadata"].get("annotations", {})))
        elif d["kind"] in ("DaemonSet", "Deployment", "StatefulSet", "ReplicaSet", "Job"):
            t = d["spec"]["template"]
            out.append((ns, t["spec"], t.get("metadata", {}).get("annotations", {})))
    return out


@needs_yaml
@pytest.mark.parametrize("path", [SIDECAR, DAEMONSET], ids=lambda p: p.name)
def test_pod_security_level_as_labelled(path: Path) -> None:
    """Every workload lives in a namespace its manifest declares with a Pod Security ``enforce`` label, and where
    that label says "restricted", every pod passes the restricted profile's rules."""
    docs = load_docs(path)
    levels = {
        d["metadata"]["name"]: d["metadata"].get("labels", {}).get("pod-security.kubernetes.io/enforce")
        for d in docs
        if d["kind"] == "Namespace"
    }
    for ns, spec, notes in pod_objects(docs):
        assert levels.get(ns) in ("restricted", "baseline", "privileged"), (
            f"{path.name}: namespace {ns} unlabelled"
        )
        violations = restricted_violations(spec, notes)
        if levels[ns] == "restricted":
            assert violations == [], violations
        else:
            # Labelled below restricted: say so only when it is needed (the check is not vacuous).
            assert violations, f"{path.name}: passes restricted; label namespace {ns} so"


def test_restricted_rules_catch_each_violation() -> None:
    """The rule set above refuses each thing the profile forbids (a good spec, then one change at a time)."""
    good: dict[str, Any] = {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "v", "emptyDir": {}}],
        "containers": [
            {
                "name": "c",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"], "add": ["NET_BIND_SERVICE"]},
                },
            }
        ],
    }
    assert restricted_violations(good) == []
    bad = [
        ("hostPID", lambda s: s.update(hostPID=True)),
        ("hostPath", lambda s: s["volumes"].append({"name": "h", "hostPath": {"path": "/"}})),
        ("nfs", lambda s: s["volumes"].append({"name": "n", "nfs": {"server": "x", "path": "/"}})),
        ("runAsNonRoot", lambda s: s["securityContext"].pop("runAsNonRoot")),
        ("runAsUser", lambda s: s["containers"][0]["securityContext"].update(runAsUser=0)),
        ("seccomp", lambda s: s["securityContext"].pop("seccompProfile")),
        ("escalation", lambda s: s["containers"][0]["securityContext"].pop("allowPrivilegeEscalation")),
        ("drop", lambda s: s["containers"][0]["securityContext"]["capabilities"].update(drop=[])),
        ("add", lambda s: s["containers"][0]["securityContext"]["capabilities"].update(add=["CHOWN"])),
        ("privileged", lambda s: s["containers"][0]["securityContext"].update(privileged=True)),
        ("hostPort", lambda s: s["containers"][0].update(ports=[{"containerPort": 1, "hostPort": 1}])),
        ("sysctl", lambda s: s["securityContext"].update(sysctls=[{"name": "kernel.msgmax", "value": "1"}])),
    ]
    for what, change in bad:
        spec = json.loads(json.dumps(good))
        change(spec)
        assert restricted_violations(spec), f"{what} not caught"


def deploy_tool(name: str) -> str | None:
    """A linter `make test` installs into .tools/py (Makefile: deploy-tools), else one on PATH."""
    local = ROOT / ".tools" / "py" / "bin" / name
    return str(local) if local.exists() else shutil.which(name)


@pytest.mark.skipif(
    deploy_tool("kubernetes-validate") is None, reason="kubernetes-validate not installed (make deploy-tools)"
)
def test_manifests_validate_strictly() -> None:
    """kubernetes-validate --strict: every object of every manifest against the Kubernetes API schemas,
    unknown fields refused."""
    files = sorted(K8S.glob("*.yaml"))
    r = subprocess.run(
        [str(deploy_tool("kubernetes-validate")), "--strict", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    passed = re.findall(r"passed for resource (\S+)", r.stdout + r.stderr)
    objects = sum(len(load_docs(f)) for f in files) if yaml is not None else 1
    assert len(passed) >= objects, r.stdout + r.stderr


@pytest.mark.skipif(deploy_tool("hadolint") is None, reason="hadolint not installed (make deploy-tools)")
def test_containerfile_hadolint_clean() -> None:
    r = subprocess.run([str(deploy_tool("hadolint")), str(CONTAINERFILE)], capture_output=True, text=True)
    assert r.returncode == 0 and not (r.stdout + r.stderr).strip(), r.stdout + r.stderr


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_manifests_parse_with_kustomize(tmp_path: Path) -> None:
    """kustomize (built into kubectl, offline) reads every manifest as Kubernetes objects."""
    for src in (SIDECAR, DAEMONSET):
        shutil.copy(src, tmp_path / src.name)
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - sidecar-pod.yaml\n  - daemonset.yaml\n")
    r = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    kinds = re.findall(r"^kind: (\w+)$", r.stdout, re.M)
    assert sorted(kinds) == sorted(["Namespace", "ConfigMap", "Pod", "Namespace", "ConfigMap", "DaemonSet"])


# -- real runs -------------------------------------------------------------------------------------------------


class Serve:
    """``fdbroker serve`` started as systemd would: its own NOTIFY_SOCKET, waited for READY=1."""

    def __init__(self, argv: list[str], tmp: Path, **popen: Any) -> None:
        self.notify_path = tmp / "notify.sock"
        self.log_path = tmp / "broker.log"
        ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        ns.bind(str(self.notify_path))
        os.chmod(self.notify_path, 0o666)
        self.ns = ns
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify_path), **popen.pop("env", {})}
        env.pop("FDBROKER_RUN_DIR", None)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, **popen)
        self.messages = self._wait("READY=1")

    def _wait(self, what: str) -> str:
        self.ns.settimeout(0.1)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(TimeoutError):
                msg = self.ns.recv(4096).decode()
                if what in msg:
                    return msg
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"broker never sent {what}:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.ns.close()
        return self.proc.returncode


def fdb(run_dir: Path, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **kw.pop("env", {})}
    env.pop("FDBROKER_RUN_DIR", None)
    return subprocess.run(
        [sys.executable, "-m", "fdbroker", "--run-dir", str(run_dir), *args],
        capture_output=True,
        text=True,
        env=env,
        **kw,
    )


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="fdbd-", dir="/tmp"))  # sun_path is 108 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_unit_exec_start_runs_reloads_and_stops(short_tmp: Path) -> None:
    """ExecStart as written (run dir and policy path swapped for test copies), with the unit's LimitNOFILE,
    READY=1 on NOTIFY_SOCKET; ExecReload's SIGHUP reloads and keeps it serving; SIGTERM exits 0."""
    unit = parse_unit(UNIT)
    argv = exec_start_argv(unit)
    run_dir = short_tmp / "run"
    policy = short_tmp / "policy.toml"
    shutil.copy(POLICY, policy)
    swap = {
        "/usr/local/bin/fdbroker": None,
        "/run/fdbroker": str(run_dir),
        "/etc/fdbroker/policy.toml": str(policy),
    }
    assert set(swap) <= set(argv), "ExecStart no longer has the paths this test swaps"
    cmd = [sys.executable, "-m", "fdbroker"]
    cmd += [swap.get(a, a) for a in argv[1:]]  # type: ignore[misc]
    nofile = int(one(unit, "Service", "LimitNOFILE"))
    import resource

    def limit() -> None:  # what LimitNOFILE= does: soft = hard = N (raising the hard limit needs root)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        except (ValueError, OSError):
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    broker = Serve(cmd, short_tmp, preexec_fn=limit)
    try:
        assert f"MAINPID={broker.proc.pid}" in broker.messages
        for sock in ("control.sock", "conduit.sock"):
            assert stat.S_IMODE(os.stat(run_dir / sock).st_mode) == 0o660
        st = json.loads(fdb(run_dir, "status", "--json").stdout)
        assert st["serving"] and st["broker_pid"] == broker.proc.pid
        # docs/deploy.md: capacity = RLIMIT_NOFILE - --reserve-fds (default 100).
        limits = Path(f"/proc/{broker.proc.pid}/limits").read_text()
        (soft,) = re.findall(r"^Max open files\s+(\d+)", limits, re.M)
        assert int(soft) <= nofile  # the unit's limit, or this host's hard limit if lower and not raisable
        assert st["max_entries"] == int(soft) - 100

        # ExecReload: SIGHUP to $MAINPID. A good file reloads; a bad one keeps the old policy; both keep serving.
        sig = one(unit, "Service", "ExecReload").split()[1]
        assert sig == "-HUP"
        broker.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "policy reloaded from" in broker.log(), "the reload log line")
        policy.write_text("[[rule]]\nallow = ['gett']\n")
        broker.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "policy reload failed" in broker.log(), "the failed-reload log line")
        assert broker.proc.poll() is None
        assert fdb(run_dir, "status").returncode == 0
    finally:
        code = broker.stop()
    assert code == 0, broker.log()
    assert not (run_dir / "control.sock").exists() and not (run_dir / "conduit.sock").exists()


def exercise_inet_entries(run_dir: Path) -> None:
    """Deposit TCP (v4, v6) and UDP entries, get one back and accept a connection on it."""
    for name, addr in (("v4", "tcp://127.0.0.1:0"), ("v6", "tcp://[::1]:0"), ("dgram", "udp://127.0.0.1:0")):
        r = fdb(run_dir, "put", name, "--listen", addr)
        if r.returncode != 0 and name == "v6" and "address" in r.stderr.lower():
            continue  # no IPv6 on this host
        assert r.returncode == 0, r.stderr
    server = (
        "import socket; s = socket.socket(fileno=3); c = socket.create_connection(s.getsockname()); "
        "a, _ = s.accept(); c.sendall(b'ok'); print(a.recv(2).decode())"
    )
    r = fdb(run_dir, "get", "v4", "--", sys.executable, "-c", server)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr
    assert fdb(run_dir, "status").returncode == 0


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the socket() interposer")
def test_broker_needs_only_af_unix(short_tmp: Path) -> None:
    """RestrictAddressFamilies=AF_UNIX, emulated: socket()/socketpair() of any other family fail with
    EAFNOSUPPORT (what systemd's seccomp filter returns) in the broker; TCP/UDP entries still work."""
    src = short_tmp / "onlyunix.c"
    src.write_text(
        "#define _GNU_SOURCE\n#include <dlfcn.h>\n#include <errno.h>\n#include <sys/socket.h>\n"
        "int socket(int d, int t, int p) { static int (*f)(int, int, int);\n"
        '  if (!f) f = dlsym(RTLD_NEXT, "socket");\n'
        "  if (d != AF_UNIX) { errno = EAFNOSUPPORT; return -1; } return f(d, t, p); }\n"
        "int socketpair(int d, int t, int p, int v[2]) { static int (*f)(int, int, int, int *);\n"
        '  if (!f) f = dlsym(RTLD_NEXT, "socketpair");\n'
        "  if (d != AF_UNIX) { errno = EAFNOSUPPORT; return -1; } return f(d, t, p, v); }\n"
    )
    lib = short_tmp / "onlyunix.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src), "-ldl"], check=True)
    # The interposer really refuses (so a pass below means something).
    probe = "import socket\ntry:\n socket.socket()\nexcept OSError as e:\n print(e.errno)\n"
    r = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env={**os.environ, "LD_PRELOAD": str(lib)},
    )
    assert r.stdout.strip() == str(__import__("errno").EAFNOSUPPORT), r
    run_dir = short_tmp / "run"
    broker = Serve(
        [sys.executable, "-m", "fdbroker", "serve", "--run-dir", str(run_dir)],
        short_tmp,
        env={"LD_PRELOAD": str(lib)},
    )
    try:
        exercise_inet_entries(run_dir)
    finally:
        code = broker.stop()
    assert code == 0, broker.log()


@pytest.mark.skipif(not IS_ROOT or shutil.which("unshare") is None, reason="needs root and unshare(1)")
def test_broker_in_private_network_namespace(short_tmp: Path) -> None:
    """PrivateNetwork=yes: a broker in its own, empty network namespace still holds and hands out TCP
    listeners made in the host's namespace, and they still accept there."""
    run_dir = short_tmp / "run"
    broker = Serve(
        ["unshare", "--net", sys.executable, "-m", "fdbroker", "serve", "--run-dir", str(run_dir)], short_tmp
    )
    try:
        exercise_inet_entries(run_dir)
    finally:
        code = broker.stop()
    assert code == 0, broker.log()


@contextlib.contextmanager
def pod_network(sysctls: list[dict[str, str]]) -> Iterator[int]:
    """A network namespace for a rehearsed Pod (its containers share one): loopback up, the Pod's sysctls set.
    Yields the pid of a process in it (for ``nsenter -n``)."""
    holder = subprocess.Popen(["unshare", "--net", "sleep", "600"])
    try:
        wait_until(
            lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != os.readlink("/proc/self/ns/net"), "netns"
        )
        net = ["nsenter", "-t", str(holder.pid), "-n"]
        subprocess.run([*net, "ip", "link", "set", "lo", "up"], check=True)
        for x in sysctls:
            subprocess.run([*net, "sysctl", "-q", "-w", f"{x['name']}={x['value']}"], check=True)
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


@needs_yaml
@pytest.mark.skipif(
    not IS_ROOT or not all(shutil.which(t) for t in ("setpriv", "unshare", "nsenter", "ip", "sysctl")),
    reason="needs root, setpriv(1), unshare(1), nsenter(1), ip(8) and sysctl(8)",
)
def test_sidecar_pod_rehearsal(short_tmp: Path) -> None:
    """The Pod's three containers, run on this host with the Pod's identities, in one network namespace with the
    Pod's sysctls: the broker as 10001 with supplementary group fsGroup, in a subdirectory of a root-owned 1777
    directory (an emptyDir on tmpfs); the binder's script as 10002 without capabilities, binding :443 (allowed
    by the Pod's net.ipv4.ip_unprivileged_port_start, and refused without it); the app's command as 65534. The
    app serves HTTP on the binder's listener; the policy comes from the ConfigMap."""
    spec = pod_specs(load_docs(SIDECAR))[0]
    sysctls = spec["securityContext"]["sysctls"]
    with pod_network(sysctls) as netns:
        rehearse_sidecar_pod(short_tmp, netns)
    # Without the sysctl the binder's user could not bind :443: the sysctl is what makes it work.
    binder_uid = container(spec, "binder")["securityContext"]["runAsUser"]
    bind = "import socket; socket.socket().bind(('0.0.0.0', 443))"
    with pod_network([x for x in sysctls if x["name"] != "net.ipv4.ip_unprivileged_port_start"]) as bare:
        r = subprocess.run(
            ["nsenter", "-t", str(bare), "-n", "setpriv", f"--reuid={binder_uid}", f"--regid={binder_uid}",
             "--clear-groups", "--inh-caps=-all", "--bounding-set=-all", "/usr/bin/python3", "-c", bind],
            capture_output=True,
            text=True,
        )  # fmt: skip
    assert r.returncode != 0 and "PermissionError" in r.stderr, r  # bind() refused, not the exec


def rehearse_sidecar_pod(short_tmp: Path, netns: int) -> None:
    docs = load_docs(SIDECAR)
    (spec,) = pod_specs(docs)
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    broker_c, binder_c, app_c = (container(spec, n) for n in ("broker", "binder", "app"))
    fsgroup = spec["securityContext"]["fsGroup"]
    empty_dir = short_tmp / "emptydir"
    empty_dir.mkdir()
    os.chmod(empty_dir, 0o1777)
    os.chmod(short_tmp, 0o755)
    etc = short_tmp / "etc"
    etc.mkdir()
    (etc / "policy.toml").write_text(cm["data"]["policy.toml"])
    os.chmod(etc / "policy.toml", 0o644)
    port = 443  # the binder's, as in the manifest: this rehearsal has the Pod's own network namespace

    def localize(s: str) -> str:
        return s.replace("/run/fdbroker", str(empty_dir)).replace("/etc/fdbroker", str(etc))

    def as_user(c: dict[str, Any]) -> list[str]:
        sc = c["securityContext"]
        uid, gid = sc["runAsUser"], sc.get("runAsGroup", sc["runAsUser"])
        caps = "-all" + "".join(f",+{a.lower()}" for a in sc["capabilities"].get("add", []))
        return [
            "nsenter",
            "-t",
            str(netns),
            "-n",
            "setpriv",
            f"--reuid={uid}",
            f"--regid={gid}",
            f"--groups={fsgroup}",
            f"--inh-caps={caps}",
            f"--bounding-set={caps}",
            "--no-new-privs",
        ]

    # The interpreter may live where other uids cannot go (/root/.pyenv): find one that 10001 and 65534 can run
    # with this checkout importable, and put an `fdbroker` wrapper for it on the containers' PATH.
    pythonpath = f"{ROOT / 'src'}:{sysconfig.get_paths()['purelib']}"
    py = next(
        (
            cand
            for cand in dict.fromkeys([os.path.realpath(sys.executable), "/usr/bin/python3"])
            if all(
                subprocess.run(
                    [
                        "setpriv",
                        f"--reuid={uid}",
                        f"--regid={uid}",
                        "--clear-groups",
                        "env",
                        f"PYTHONPATH={pythonpath}",
                        cand,
                        "-c",
                        "import fdbroker.cli, grpc",
                    ],
                    capture_output=True,
                    cwd="/",
                ).returncode
                == 0
                for uid in (broker_c["securityContext"]["runAsUser"], NOBODY)
            )
        ),
        None,
    )
    if py is None:
        pytest.skip("no Python that other uids can run with fdbroker importable")
    bindir = short_tmp / "bin"
    bindir.mkdir()
    (bindir / "fdbroker").write_text(f'#!/bin/sh\nPYTHONPATH={pythonpath} exec {py} -m fdbroker "$@"\n')
    os.chmod(bindir / "fdbroker", 0o755)
    os.chmod(bindir, 0o755)
    path = f"{bindir}:{os.environ['PATH']}"

    def environ(c: dict[str, Any]) -> dict[str, str]:
        return {"PATH": path, **{k: localize(v) for k, v in env_of(c).items()}}

    run_dir = Path(environ(broker_c)["FDBROKER_RUN_DIR"])
    serve = [str(bindir / "fdbroker"), *image_entrypoint()[1:], *(localize(a) for a in broker_c["args"])]
    broker = Serve(as_user(broker_c) + serve, short_tmp, env=environ(broker_c), cwd="/")
    binder = app = None
    try:
        assert os.stat(run_dir).st_uid == broker_c["securityContext"]["runAsUser"]
        ctl = os.stat(run_dir / "control.sock")
        assert (stat.S_IMODE(ctl.st_mode), ctl.st_gid) == (0o660, fsgroup)

        script = [localize(a) for a in binder_c["command"]]
        binder = subprocess.Popen(
            as_user(binder_c) + script,
            env={**os.environ, **environ(binder_c)},
            cwd="/",
            stderr=subprocess.PIPE,
            text=True,
        )
        # This probe runs as root: like the Pod's clients, it trusts the broker's uid to serve the run dir.
        trust = {"FDBROKER_TRUST_UID": str(broker_c["securityContext"]["runAsUser"])}
        wait_until(
            lambda: fdb(run_dir, "stat", "web/https", env=trust).returncode == 0, "the binder's deposit"
        )

        app_argv = [py if a == "python3" else a for a in app_c["command"]]
        app = subprocess.Popen(
            as_user(app_c) + app_argv,
            env={**os.environ, **environ(app_c)},
            cwd="/",
            stderr=subprocess.PIPE,
            text=True,
        )

        get = f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:{port}/', timeout=5).read().decode(), end='')"

        def fetch() -> str | None:
            assert app.poll() is None, app.stderr.read() if app.stderr else ""
            r = subprocess.run(
                ["nsenter", "-t", str(netns), "-n", sys.executable, "-c", get], capture_output=True, text=True
            )
            return r.stdout if r.returncode == 0 else None

        assert wait_until(fetch, "the app to serve") == "served on a brokered listener\n"
        # The app's uid may not take the listener away (the ConfigMap's policy).
        r = subprocess.run(
            [*as_user(app_c), "fdbroker", "rm", "web/https"],
            env={**os.environ, **environ(app_c)},
            cwd="/",
            capture_output=True,
            text=True,
        )
        assert r.returncode == 7, r.stderr
    finally:
        for p in (app, binder):
            if p is not None and p.poll() is None:
                p.terminate()
                p.wait(30)
        code = broker.stop()
    assert binder is not None and binder.returncode == 0  # its TERM trap: a clean exit
    assert code == 0, broker.log()


class Pod:
    """One "pod" of the DaemonSet on this host: its container's command run as PID 1 of a PID namespace of its
    own (pods do not share one), as root with every capability dropped and supplementary group 2000, as the
    manifest's securityContext says."""

    def __init__(self, name: str, script: str, env: dict[str, str], groups: list[int], tmp: Path) -> None:
        self.name = name
        self.env = env
        # runAsUser 0, capabilities drop ALL, allowPrivilegeEscalation false, supplementalGroups
        self.identity = [
            "setpriv",
            f"--groups={','.join(map(str, groups))}",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
        ]
        self.log_path = tmp / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--kill-child", *self.identity, "/bin/sh", "-c", script],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd="/",
            )
        self.pid1 = wait_until(self._child, f"{name}'s PID 1")

    def _child(self) -> int:
        assert self.proc.poll() is None, self.log()
        with contextlib.suppress(OSError):
            children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            return int(children[0]) if children else 0
        return 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def probe(self, argv: list[str]) -> bool:
        """An exec probe: ``argv`` run inside this pod's PID namespace, with the container's identity."""
        r = subprocess.run(
            ["nsenter", "-t", str(self.pid1), "-p", *self.identity, *argv],
            env=self.env,
            capture_output=True,
            text=True,
            cwd="/",
            timeout=60,
        )
        return r.returncode == 0

    def delete(self) -> int:
        """What the kubelet does when the pod is deleted: SIGTERM to the container's PID 1, then wait."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid1, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # --kill-child takes the namespace's processes along
                self.proc.wait()
        return self.proc.returncode


@needs_yaml
@pytest.mark.skipif(
    not IS_ROOT or not all(shutil.which(t) for t in ("unshare", "setpriv", "nsenter")),
    reason="needs root, unshare(1), setpriv(1) and nsenter(1)",
)
def test_daemonset_rollout_hands_entries_over(short_tmp: Path) -> None:
    """A DaemonSet rolling update on one node, rehearsed with the manifest's own container command and readiness
    probe (parsed from the YAML; /run/fdbroker and /etc/fdbroker swapped for temp dirs): pod A starts on an
    empty node and serves; entries are deposited; pod B (the surge pod) starts beside it on the same run dir,
    takes every entry over, and only then turns ready while A turns unready and idles; the controller then
    deletes A (SIGTERM) and B keeps serving every entry, listeners still accepting."""
    docs, spec, broker_c = daemonset_broker()
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap"]
    assert broker_c["securityContext"]["runAsUser"] == 0
    groups = spec["securityContext"]["supplementalGroups"]
    run_dir = short_tmp / "run"  # the hostPath (DirectoryOrCreate: root's, 0755)
    run_dir.mkdir(mode=0o755)
    etc = short_tmp / "etc"
    etc.mkdir()
    (etc / "policy.toml").write_text(cm["data"]["policy.toml"])

    def localize(s: str) -> str:
        return s.replace("/run/fdbroker", str(run_dir)).replace("/etc/fdbroker", str(etc))

    script = localize(broker_c["command"][2])
    ready = [localize(a) for a in broker_c["readinessProbe"]["exec"]["command"]]
    bindir = short_tmp / "bin"  # the image's fdbroker and python3
    bindir.mkdir()
    (bindir / "fdbroker").write_text(f'#!/bin/sh\nexec {sys.executable} -m fdbroker "$@"\n')
    (bindir / "fdbroker").chmod(0o755)
    (bindir / "python3").symlink_to(sys.executable)
    env = {
        "PATH": f"{bindir}:/usr/bin:/bin",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
        **{k: localize(v) for k, v in env_of(broker_c).items()},
    }
    pods: list[Pod] = []
    try:
        a = Pod("pod-a", script, env, groups, short_tmp)
        pods.append(a)
        wait_until(lambda: a.probe(ready), "pod A to be ready on an empty node")
        # The probe tells pods apart: run from any other PID namespace (a pod whose broker is not the one
        # serving, such as a surge pod still taking over), it fails although a broker serves.
        other_pod = subprocess.run(["unshare", "--pid", "--fork", *a.identity, *ready], env=env, cwd="/")
        assert other_pod.returncode != 0 and fdb(run_dir, "status").returncode == 0
        for name, addr in (("web/https", "tcp://127.0.0.1:0"), ("web/admin", "tcp://127.0.0.1:0")):
            r = fdb(run_dir, "put", name, "--listen", addr, "--label", "tier=web")
            assert r.returncode == 0, r.stderr
        before = json.loads(fdb(run_dir, "ls", "--json").stdout)
        rev = json.loads(fdb(run_dir, "status", "--json").stdout)["revision"]

        b = Pod("pod-b", script, env, groups, short_tmp)  # maxSurge: the new pod beside the old one
        pods.append(b)
        wait_until(lambda: b.probe(ready), "pod B to be ready (its own broker serving)", timeout=60)
        wait_until(lambda: "handed over" in a.log(), "pod A's broker to hand over")
        assert "took over 2 entries" in b.log(), b.log()
        assert not a.probe(ready), "pod A still ready after handing over"
        assert a.proc.poll() is None, "pod A's container exited (the kubelet would restart it)"
        status = json.loads(fdb(run_dir, "status", "--json").stdout)
        assert status["revision"] >= rev
        after = json.loads(fdb(run_dir, "ls", "--json").stdout)
        assert [(e["name"], e["summary"], e["labels"]) for e in after] == [
            (e["name"], e["summary"], e["labels"]) for e in before
        ]

        assert a.delete() == 0, a.log()  # the controller deletes the old pod once the new one is ready
        assert b.probe(ready)
        exercise_listener(run_dir, "web/https")
        assert len(json.loads(fdb(run_dir, "ls", "--json").stdout)) == 2
    finally:
        codes = [p.delete() for p in reversed(pods)]
    assert codes[0] == 0, pods[-1].log()  # pod B: SIGTERM forwarded, the broker stopped cleanly


def exercise_listener(run_dir: Path, name: str) -> None:
    """``fdbroker get NAME -- CMD``: CMD accepts a connection on the held listener."""
    server = (
        "import socket; s = socket.socket(fileno=3); c = socket.create_connection(s.getsockname()); "
        "a, _ = s.accept(); c.sendall(b'ok'); print(a.recv(2).decode())"
    )
    r = fdb(run_dir, "get", name, "--", sys.executable, "-c", server)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


# -- the wheel -------------------------------------------------------------------------------------------------


def checkout_copy(dest: Path) -> Path:
    """This checkout without its environments and caches (building in it would leave build/ behind)."""
    shutil.copytree(
        ROOT,
        dest,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", ".tools", "build", "dist", "*.egg-info", "__pycache__", ".*_cache"
        ),
    )
    return dest


@pytest.mark.slow
def test_wheel_ships_license_protos_and_metadata(tmp_path: Path) -> None:
    """``pip wheel --no-deps`` of this checkout: the LICENSE (Apache-2.0, as pyproject says), the .proto files,
    the classifiers, the console script and py.typed."""
    import zipfile
    from email.parser import HeaderParser

    assert (
        "Apache License" in (ROOT / "LICENSE").read_text()
        and "Version 2.0, January 2004" in (ROOT / "LICENSE").read_text()
    )
    src = checkout_copy(tmp_path / "src")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            str(src),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    (wheel,) = (tmp_path / "dist").glob("fdbroker-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = HeaderParser().parsestr(z.read(meta_name).decode())
        dist_info = meta_name.rsplit("/", 1)[0]
        assert z.read(f"{dist_info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        protos = sorted(p.name for p in (ROOT / "proto/fdbroker/v1").glob("*.proto"))
        data = f"{dist_info.removesuffix('.dist-info')}.data/data/share/fdbroker/proto/fdbroker/v1"
        assert protos and all(
            z.read(f"{data}/{p}") == (ROOT / "proto/fdbroker/v1" / p).read_bytes() for p in protos
        )
        assert "fdbroker/py.typed" in names
        assert "fdbroker = fdbroker.cli:main" in z.read(f"{dist_info}/entry_points.txt").decode().replace(
            " =", " ="
        )
    assert meta["License-Expression"] == "Apache-2.0"
    assert meta.get_all("License-File") == ["LICENSE"]
    classifiers = meta.get_all("Classifier")
    assert classifiers is not None, "no Classifier in the wheel's METADATA"
    assert "Operating System :: POSIX :: Linux" in classifiers and "Typing :: Typed" in classifiers
    assert not [c for c in classifiers if c.startswith("License ::")], (
        "PEP 639: the expression, not classifiers"
    )
