"""fdbroker.conduit: move open file descriptors between processes over an ``AF_UNIX`` socket (``SCM_RIGHTS``).

The Python counterpart of net-conduit (``toolman.org/net/conduit``), wire-compatible with it for single
descriptors, plus batches of any size, the broker's framed protocol, timeouts, peer credentials and asyncio.

* :mod:`.conduit` — :class:`Conduit` (raw mode: single descriptors and batches) and its constructors
* :mod:`.send`, :mod:`.receive` — the ``sendmsg`` / ``recvmsg`` primitives and the raw protocols
* :mod:`.frames` — length-prefixed ``ConduitFrame`` messages with descriptors: encoder, decoder,
  :class:`FramedConduit`
* :mod:`.aio` — asyncio variants
* :mod:`.errors` — :class:`ConduitError` and :class:`ErrType`

The wire protocol is specified in docs/conduit-protocol.md.
"""

from typing import TYPE_CHECKING, Any

from .conduit import Conduit, Credentials, peer_credentials
from .errors import ConduitError, ErrType
from .receive import close_fds, recv_fds_into, recv_fds_nonblocking
from .send import send_with_fds

if TYPE_CHECKING:
    from .aio import (
        AsyncFramedConduit,
        async_receive_fd,
        async_receive_fds,
        async_transfer_fd,
        async_transfer_fds,
    )
    from .frames import MAX_FRAME_BYTES, SCM_MAX_FD, Frame, FramedConduit, FrameDecoder, encode_frame

# The framed protocol needs protobuf and the asyncio variants need asyncio: both load on first use, so the raw
# net-conduit API (and the CLI's start-up) pays for neither.
_LAZY = {
    "AsyncFramedConduit": "aio",
    "async_receive_fd": "aio",
    "async_receive_fds": "aio",
    "async_transfer_fd": "aio",
    "async_transfer_fds": "aio",
    "MAX_FRAME_BYTES": "frames",
    "SCM_MAX_FD": "frames",
    "Frame": "frames",
    "FramedConduit": "frames",
    "FrameDecoder": "frames",
    "encode_frame": "frames",
}


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'fdbroker.conduit' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{mod}", __name__), name)


__all__ = [
    "MAX_FRAME_BYTES",
    "SCM_MAX_FD",
    "AsyncFramedConduit",
    "Conduit",
    "ConduitError",
    "Credentials",
    "ErrType",
    "Frame",
    "FrameDecoder",
    "FramedConduit",
    "async_receive_fd",
    "async_receive_fds",
    "async_transfer_fd",
    "async_transfer_fds",
    "close_fds",
    "encode_frame",
    "peer_credentials",
    "recv_fds_into",
    "recv_fds_nonblocking",
    "send_with_fds",
]
