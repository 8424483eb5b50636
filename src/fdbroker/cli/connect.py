"""How a verb reaches the broker: the run directory of this invocation, then a client for it.

A missing run directory is refused here, before the client (and gRPC) is imported. The verbs that only read
(``ls``, ``stat``, ``status``) use :func:`quick`, which asks on the conduit and loads no gRPC at all.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fdbroker.client import Client
    from fdbroker.client.quick import QuickClient


def run_dir(args: argparse.Namespace) -> str:
    """The run directory (``--run-dir``, else ``$FDBROKER_RUN_DIR``, else the default); raises
    :class:`~fdbroker.errors.Unavailable` saying how to start a broker when it does not exist."""
    from fdbroker.rundir import resolve_run_dir

    path = resolve_run_dir(args.run_dir)
    if not os.path.isdir(path):
        from fdbroker.errors import Unavailable

        raise Unavailable(
            f"no broker at {path} (the directory does not exist); start one with "
            f"`fdbroker serve --run-dir {path}` or point --run-dir / FDBROKER_RUN_DIR at a running one"
        )
    return str(path)


def client(args: argparse.Namespace) -> Client:
    """The gRPC client, for the verbs that move descriptors, lease or watch."""
    path = run_dir(args)
    from fdbroker.client import Client

    return Client(path, timeout=args.timeout)


def quick(args: argparse.Namespace) -> QuickClient:
    """The conduit-only client, for the read-only verbs: the command starts without loading gRPC."""
    path = run_dir(args)
    from fdbroker.client.quick import QuickClient

    return QuickClient(path, timeout=args.timeout)
