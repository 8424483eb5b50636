"""The optional C extension (``fdbroker._native``, from ``src/fdbroker/_native.c``) and the switch that turns it off.

The broker serves prefetched ``Redeem`` frames from it (:mod:`fdbroker.broker.fastpath`), and the clients use its
``exchange`` for their lean ``Redeem`` (:mod:`fdbroker.conduit.frames`). Both have a pure-Python path that answers
the same: used when the extension was not built (``pip install`` goes on without a compiler) or when the
environment says ``FDBROKER_NATIVE=0``. ``FDBROKER_NATIVE=1`` insists on the extension: a missing one is then an
``ImportError`` instead of a silent fallback (the test runs that check the native path use it).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType


def wanted() -> bool:
    """Whether the environment allows the extension (anything but ``FDBROKER_NATIVE=0``/``no``/``false``/``off``)."""
    return os.environ.get("FDBROKER_NATIVE", "").strip().lower() not in ("0", "no", "false", "off")


def load(*, required: bool = False) -> ModuleType | None:
    """The extension module, or None (not built, or turned off by ``FDBROKER_NATIVE=0``). ``required``: the
    caller insists (then neither applies; a missing extension is an ``ImportError``).

    ``FDBROKER_NATIVE_PATH`` names a build of the extension to load instead of the installed one (``make
    asan-fuzz`` runs the fuzz tests against one built with AddressSanitizer)."""
    if not required and not wanted():
        return None
    path = os.environ.get("FDBROKER_NATIVE_PATH")
    try:
        mod = _load_from(path) if path else importlib.import_module("fdbroker._native")
    except ImportError:
        if required or os.environ.get("FDBROKER_NATIVE", "").strip() == "1":
            raise
        return None
    return mod


def _load_from(path: str) -> ModuleType:
    mod = sys.modules.get("fdbroker._native")
    if mod is not None and getattr(mod, "__file__", None) == path:
        return mod
    spec = importlib.util.spec_from_file_location("fdbroker._native", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"FDBROKER_NATIVE_PATH={path} is not an extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["fdbroker._native"] = mod
    return mod
