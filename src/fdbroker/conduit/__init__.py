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

from .aio import (
    AsyncFramedConduit,
    async_receive_fd,
    async_receive_fds,
    async_transfer_fd,
    async_transfer_fds,
)
from .conduit import Conduit, Credentials, peer_credentials
from .errors import ConduitError, ErrType
from .frames import MAX_FRAME_BYTES, SCM_MAX_FD, Frame, FramedConduit, FrameDecoder, encode_frame
from .receive import close_fds, recv_fds_nonblocking
from .send import send_with_fds

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
    "recv_fds_nonblocking",
    "send_with_fds",
]
