"""The optional C extension (``fdbroker._native``, from ``src/fdbroker/_native.c``) and the switch that turns it off.

The broker serves prefetched ``Redeem`` frames from it (:mod:`fdbroker.broker.fastpath`), and the clients use its
``exchange`` for their lean ``Redeem`` (:mod:`fdbroker.conduit.frames`). Both have a pure-Python path that answers
the same: used when the extension was not built (``pip install`` goes on without a compiler) or when the
environment says ``FDBROKER_NATIVE=0``. ``FDBROKER_NATIVE=1`` insists on the extension: a missing one is then an
``ImportError`` instead of a silent fallback (the test runs that check the native path use it).
"""

from __future__ import annotations

import os
from types import ModuleType


def wanted() -> bool:
    """Whether the environment allows the extension (anything but ``FDBROKER_NATIVE=0``/``no``/``false``/``off``)."""
    return os.environ.get("FDBROKER_NATIVE", "").strip().lower() not in ("0", "no", "false", "off")


def load() -> ModuleType | None:
    """The extension module, or None (not built, or turned off by ``FDBROKER_NATIVE=0``)."""
    if not wanted():
        return None
    try:
        from fdbroker import _native as mod
    except ImportError:
        if os.environ.get("FDBROKER_NATIVE", "").strip() == "1":
            raise
        return None
    loaded: ModuleType = mod
    return loaded
