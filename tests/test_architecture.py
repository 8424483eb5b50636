"""The architecture's rules, checked by parsing the source (``ast``), so they stay true.

* Data flows one way: nothing under ``fdbroker/client/`` (nor the CLI) imports ``fdbroker.broker``; the broker
  never imports ``fdbroker.client`` or ``fdbroker.cli``.
* Everything that runs inside ``fdbroker serve`` lives under ``fdbroker/broker/``: no broker-only module is left at
  the top level.
* No class is longer than :data:`MAX_CLASS_LINES` lines (the generated ``v1/`` excepted).

Imports are read from the syntax tree, wherever they are (module level, inside functions, under
``TYPE_CHECKING``), so a lazy import counts like any other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "fdbroker"
MAX_CLASS_LINES = 300


# Broker-only modules that used to sit at the top level; they live in fdbroker/broker/ now.
MOVED = [
    "broker.py",
    "registry.py",
    "tokens.py",
    "sessions.py",
    "leases.py",
    "policy.py",
    "delivery.py",
    "servicer.py",
    "server.py",
    "conduit_server.py",
    "handover.py",
    "fdstore.py",
    "notify.py",
    "watch.py",
    "closer.py",
    "keeper.py",
    "metrics.py",
]


def _modules(under: Path) -> Iterator[Path]:
    for path in sorted(under.rglob("*.py")):
        if "v1" not in path.relative_to(PACKAGE).parts:
            yield path


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from X import y`` counts as X and X.y)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def _offenders(under: Path, forbidden: tuple[str, ...]) -> list[str]:
    out = []
    for path in _modules(under):
        for name in sorted(_imports(path)):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                out.append(f"{path.relative_to(PACKAGE)} imports {name}")
    return out


def test_the_client_does_not_import_the_broker() -> None:
    assert (PACKAGE / "client").is_dir()
    assert _offenders(PACKAGE / "client", ("fdbroker.broker",)) == []


def test_the_cli_imports_the_broker_only_for_serve() -> None:
    """The CLI may load ``fdbroker.broker.server`` (the ``serve`` verb), and nothing else of the broker."""
    paths = [PACKAGE / "cli.py"] if (PACKAGE / "cli.py").exists() else list(_modules(PACKAGE / "cli"))
    bad = []
    for path in paths:
        for name in sorted(_imports(path)):
            if name.startswith("fdbroker.broker") and name not in (
                "fdbroker.broker",
                "fdbroker.broker.server",
            ):
                bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert bad == []


def test_the_broker_does_not_import_the_client_or_the_cli() -> None:
    assert _offenders(PACKAGE / "broker", ("fdbroker.client", "fdbroker.cli", "fdbroker.aio")) == []


def test_shared_modules_import_neither_side() -> None:
    """Top-level modules other than the entry points are shared by both sides: they import neither."""
    entry_points = {"__init__.py", "__main__.py", "cli.py", "aio.py", "testing.py"}
    shared = [p for p in PACKAGE.glob("*.py") if p.name not in entry_points]
    bad = []
    for path in shared:
        for name in sorted(_imports(path)):
            if name.startswith(("fdbroker.broker", "fdbroker.client", "fdbroker.cli")):
                bad.append(f"{path.name} imports {name}")
    assert bad == []


def test_broker_only_modules_are_not_left_at_the_top_level() -> None:
    assert [name for name in MOVED if (PACKAGE / name).exists()] == []


def _classes() -> Iterator[tuple[str, int]]:
    for path in _modules(PACKAGE):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                yield f"{path.relative_to(PACKAGE)}:{node.name}", node.end_lineno - node.lineno


def test_no_class_is_longer_than_the_limit() -> None:
    sizes = dict(_classes())
    too_long = {k: n for k, n in sizes.items() if n > MAX_CLASS_LINES}
    assert too_long == {}, f"classes over {MAX_CLASS_LINES} lines: split them by role"


def test_the_keeper_stays_small() -> None:
    """The keeper must be far less likely to die than the broker it keeps: it loads neither gRPC nor protobuf nor
    any broker module but the closer (checked by importing it in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, fdbroker.broker.survival.keeper; "
        "print(sorted(m for m in sys.modules if m.startswith(('grpc', 'google', 'fdbroker'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(ast.literal_eval(out))
    assert not {m for m in loaded if m.startswith(("grpc", "google"))}, loaded
    allowed = {"fdbroker", "fdbroker.broker", "fdbroker.broker.closer", "fdbroker.broker.survival"}
    assert {m for m in loaded if m.startswith("fdbroker")} <= allowed | {"fdbroker.broker.survival.keeper"}, (
        loaded
    )


def test_every_test_helper_module_is_type_checked_like_src() -> None:
    """mypy-tests.ini lists the helper modules (everything in tests/ that is not a test or conftest) under the
    strict section: a new helper left out of it would be checked only as loosely as test functions."""
    import configparser

    tests = Path(__file__).resolve().parent
    ini = configparser.ConfigParser()
    ini.read(tests.parent / "mypy-tests.ini")
    strict = next(s for s in ini.sections() if s.startswith("mypy-secutil"))
    listed = set(strict.removeprefix("mypy-").split(","))
    helpers = {p.stem for p in [*tests.glob("*.py"), *tests.glob("helpers/*.py")]}
    helpers -= {p for p in helpers if p.startswith("test_")} | {"conftest"}
    assert sorted(helpers - listed) == []
