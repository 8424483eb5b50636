"""What a descriptor is, read from the descriptor itself.

:func:`describe` never trusts what a client says: it asks the kernel. Per call it costs

* ``fstat`` and ``fcntl(F_GETFL)`` always;
* for sockets: the ``getsockopt(SO_DOMAIN/SO_TYPE/SO_PROTOCOL)`` that :class:`socket.socket` does when it
  adopts a descriptor, then ``SO_ACCEPTCONN`` (stream sockets), ``getsockname`` and ``getpeername`` — no
  ``dup``: the descriptor is adopted and then detached, so the caller's descriptor is never closed;
* for everything else: one ``readlink`` of ``/proc/self/fd/N``, which tells an anonymous pipe (``pipe:[ino]``)
  from a FIFO, a memfd (``/memfd:NAME (deleted)``) from a file, and names anon inodes
  (``anon_inode:[eventfd]``, ``[timerfd]``, ``[signalfd]``, ``[pidfd]``).

Ownership: the caller keeps ``fd``; :func:`describe` opens nothing that outlives the call and changes no flag
of the open file description. Errors: :class:`OSError` (``EBADF``) for a descriptor that is not open.
"""

from __future__ import annotations

import _socket
import fcntl
import os
import socket
import stat

from fdbroker.v1 import broker_pb2 as pb

_KIND_NAMES: dict[int, str] = {
    pb.KIND_UNSPECIFIED: "unspecified",
    pb.KIND_TCP_LISTENER: "tcp-listener",
    pb.KIND_TCP_STREAM: "tcp-stream",
    pb.KIND_UDP: "udp",
    pb.KIND_UNIX_LISTENER: "unix-listener",
    pb.KIND_UNIX_STREAM: "unix-stream",
    pb.KIND_UNIX_DGRAM: "unix-dgram",
    pb.KIND_SOCKET_OTHER: "socket",
    pb.KIND_FILE: "file",
    pb.KIND_DIRECTORY: "directory",
    pb.KIND_PIPE: "pipe",
    pb.KIND_FIFO: "fifo",
    pb.KIND_MEMFD: "memfd",
    pb.KIND_EVENTFD: "eventfd",
    pb.KIND_TIMERFD: "timerfd",
    pb.KIND_SIGNALFD: "signalfd",
    pb.KIND_PIDFD: "pidfd",
    pb.KIND_CHAR_DEVICE: "char-device",
    pb.KIND_OTHER: "other",
}

_ANON_KINDS: dict[str, int] = {
    "anon_inode:[eventfd]": pb.KIND_EVENTFD,
    "anon_inode:[timerfd]": pb.KIND_TIMERFD,
    "anon_inode:[signalfd]": pb.KIND_SIGNALFD,
    "anon_inode:[pidfd]": pb.KIND_PIDFD,
}

_O_PATH = getattr(os, "O_PATH", 0o10000000)
_O_SYNC = os.O_SYNC
_O_DSYNC = os.O_DSYNC
# File status flags worth showing, in display order. O_SYNC is a superset of O_DSYNC's bits and handled apart;
# O_LARGEFILE is always set on 64-bit and says nothing.
_FLAG_BITS: tuple[tuple[str, int], ...] = tuple(
    (name, bit)
    for name, bit in (
        ("O_APPEND", os.O_APPEND),
        ("O_NONBLOCK", os.O_NONBLOCK),
        ("O_DIRECT", getattr(os, "O_DIRECT", 0)),
        ("O_NOATIME", getattr(os, "O_NOATIME", 0)),
        ("O_ASYNC", getattr(os, "O_ASYNC", 0o20000)),
        ("O_PATH", _O_PATH),
    )
    if bit
)

_ACCESS: dict[int, int] = {
    os.O_RDONLY: pb.ACCESS_MODE_READ,
    os.O_WRONLY: pb.ACCESS_MODE_WRITE,
    os.O_RDWR: pb.ACCESS_MODE_READ_WRITE,
}
_ACCESS_WORD: dict[int, str] = {
    pb.ACCESS_MODE_READ: "read",
    pb.ACCESS_MODE_WRITE: "write",
    pb.ACCESS_MODE_READ_WRITE: "read-write",
}
_FAMILY_NAMES: dict[int, str] = {
    socket.AF_INET: "AF_INET",
    socket.AF_INET6: "AF_INET6",
    socket.AF_UNIX: "AF_UNIX",
}
_DELETED = " (deleted)"


def kind_name(kind: int) -> str:
    """Short lowercase name of a ``Kind`` value for tables: "tcp-listener", "pipe", "memfd", ..."""
    return _KIND_NAMES.get(kind, "other")


def describe(fd: int) -> pb.DescriptorInfo:
    """Reads what ``fd`` is from the kernel as a ``DescriptorInfo``. The caller keeps ``fd``."""
    st = os.fstat(fd)
    mode = st.st_mode
    fl = fcntl.fcntl(fd, fcntl.F_GETFL)
    info = pb.DescriptorInfo()
    flags = _flag_names(fl)
    if flags:
        info.flags.extend(flags)
    access = pb.ACCESS_MODE_UNSPECIFIED if fl & _O_PATH else _ACCESS.get(fl & os.O_ACCMODE, 0)
    info.access_mode = access  # type: ignore[assignment]
    if stat.S_ISSOCK(mode):
        _describe_socket(fd, fl, info)
        return info
    if stat.S_ISFIFO(mode) and st.st_dev == _pipefs_dev():
        # Anonymous pipes live on the kernel's pipefs: no readlink needed.
        info.kind = pb.KIND_PIPE
        info.summary = "pipe (read end)" if access == pb.ACCESS_MODE_READ else f"pipe ({_pipe_end(access)})"
        return info
    link = _text(os.readlink(f"/proc/self/fd/{fd}"))
    fmt = stat.S_IFMT(mode)
    if fmt == stat.S_IFREG:
        if link.startswith("/memfd:") and link.endswith(_DELETED):
            name = link[7 : -len(_DELETED)]
            info.kind = pb.KIND_MEMFD
            info.path = name
            info.summary = "memfd:" + name
        else:
            info.kind = pb.KIND_FILE
            info.path = link
            info.summary = f"file {link} ({_mode_words(access, fl)})"
    elif fmt == stat.S_IFDIR:
        info.kind = pb.KIND_DIRECTORY
        info.path = link
        info.summary = "directory " + link
    elif fmt == stat.S_IFIFO:
        end = _pipe_end(access)
        if link.startswith("pipe:["):  # only if pipefs' device could not be learnt
            info.kind = pb.KIND_PIPE
            info.summary = f"pipe ({end})"
        else:
            info.kind = pb.KIND_FIFO
            info.path = link
            info.summary = f"fifo {link} ({end})"
    elif fmt == stat.S_IFCHR:
        info.kind = pb.KIND_CHAR_DEVICE
        info.path = link
        info.summary = f"char device {link} ({_mode_words(access, fl)})"
    else:
        kind = _ANON_KINDS.get(link)
        if kind is not None:
            info.kind = kind  # type: ignore[assignment]
            info.summary = _KIND_NAMES[kind]
        else:
            # Block devices, inotify, epoll, fanotify, userfaultfd, ...: say what the kernel calls it.
            info.kind = pb.KIND_OTHER
            if link.startswith("/"):
                info.path = link
            info.summary = "other " + link
    return info


_PIPEFS_DEV: int | None = None


def _pipefs_dev() -> int:
    """The device number of pipefs (where every anonymous pipe lives), learnt once from a throwaway pipe; -1
    if that fails (then pipes are told from FIFOs by readlink)."""
    global _PIPEFS_DEV
    if _PIPEFS_DEV is None:
        try:
            r, w = os.pipe()
        except OSError:  # EMFILE: try again next time
            return -1
        try:
            _PIPEFS_DEV = os.fstat(r).st_dev
        finally:
            os.close(r)
            os.close(w)
    return _PIPEFS_DEV


_FLAG_CACHE: dict[int, tuple[str, ...]] = {}


def _flag_names(fl: int) -> tuple[str, ...]:
    names = _FLAG_CACHE.get(fl)
    if names is None:
        found = [name for name, bit in _FLAG_BITS if fl & bit]
        if fl & _O_SYNC == _O_SYNC:
            found.append("O_SYNC")
        elif fl & _O_DSYNC:
            found.append("O_DSYNC")
        names = tuple(found)
        if len(_FLAG_CACHE) < 1024:  # few distinct flag words occur; bound it anyway
            _FLAG_CACHE[fl] = names
    return names


def _mode_words(access: int, fl: int) -> str:
    if fl & _O_PATH:
        return "path only"
    word = _ACCESS_WORD.get(access, "no access")
    if fl & os.O_APPEND:
        return "append" if access == pb.ACCESS_MODE_WRITE else word + ", append"
    return word


def _pipe_end(access: int) -> str:
    if access == pb.ACCESS_MODE_READ:
        return "read end"
    if access == pb.ACCESS_MODE_WRITE:
        return "write end"
    return "read-write"


def _describe_socket(fd: int, fl: int, info: pb.DescriptorInfo) -> None:
    # Adopt the caller's descriptor without dup and detach it in `finally`, so it is never closed here. The C
    # type (_socket.socket) is used because socket.socket's enum-converting properties cost more than the
    # syscalls.
    sock = _socket.socket(fileno=fd)
    try:
        if _socket.getdefaulttimeout() is not None and not fl & os.O_NONBLOCK:
            # _socket.socket() made the shared open file description non-blocking because a process-wide
            # default timeout is set; put the caller's flags back.
            fcntl.fcntl(fd, fcntl.F_SETFL, fl)
        family = sock.family
        stype = sock.type
        proto = sock.proto
        streamy = stype in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
        listening = bool(streamy and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
        local = _format_address(family, _sockname(sock))
        peer = "" if listening else _format_address(family, _peername(sock))
    finally:
        sock.detach()
    info.family = _FAMILY_NAMES.get(family) or _enum_name(family, "AF_")
    info.local_address = local
    info.peer_address = peer
    info.listening = listening
    inet = family in (socket.AF_INET, socket.AF_INET6)
    if inet and stype == socket.SOCK_STREAM and proto in (0, socket.IPPROTO_TCP):
        kind, word = (
            (pb.KIND_TCP_LISTENER, "tcp listener") if listening else (pb.KIND_TCP_STREAM, "tcp stream")
        )
    elif inet and stype == socket.SOCK_DGRAM and proto in (0, socket.IPPROTO_UDP):
        kind, word = pb.KIND_UDP, "udp"
    elif family == socket.AF_UNIX and streamy:
        kind, word = (
            (pb.KIND_UNIX_LISTENER, "unix listener") if listening else (pb.KIND_UNIX_STREAM, "unix stream")
        )
        if stype == socket.SOCK_SEQPACKET:
            word += " (seqpacket)"
    elif family == socket.AF_UNIX and stype == socket.SOCK_DGRAM:
        kind, word = pb.KIND_UNIX_DGRAM, "unix dgram"
    else:
        kind, word = pb.KIND_SOCKET_OTHER, f"socket {info.family}/{_enum_name(stype, 'SOCK_')}"
    info.kind = kind
    if local and peer:
        info.summary = f"{word} {local} -> {peer}"
    elif local:
        info.summary = f"{word} {local}"
    elif peer:
        info.summary = f"{word} (unbound) -> {peer}"
    else:
        info.summary = f"{word} (unbound)"


def _text(name: str) -> str:
    """A path as the kernel gave it (bytes decoded with ``surrogateescape``), as valid UTF-8 text: bytes that are
    not UTF-8 become ``\\xNN`` (a protobuf string must be UTF-8; ``/tmp/f\\xff`` still says which file)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _sockname(sock: _socket.socket) -> object:
    try:
        return sock.getsockname()
    except OSError:
        return None


def _peername(sock: _socket.socket) -> object:
    try:
        return sock.getpeername()
    except OSError:  # ENOTCONN
        return None


def _format_address(family: int, addr: object) -> str:
    """``127.0.0.1:8080``, ``[::1]:443``, a Unix path, ``@abstract``; "" for none or an unbound address."""
    if addr is None:
        return ""
    if family == socket.AF_INET or family == socket.AF_INET6:
        if not isinstance(addr, tuple):
            return ""
        host, port = addr[0], addr[1]
        if port == 0 and host in ("0.0.0.0", "::"):
            return ""
        return f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
    if family == socket.AF_UNIX:
        if isinstance(addr, bytes):
            if addr.startswith(b"\0"):
                return "@" + addr[1:].decode("utf-8", "backslashreplace")
            return addr.decode("utf-8", "backslashreplace")
        return _text(str(addr))
    if isinstance(addr, tuple):
        # e.g. netlink (port id, groups); all zero means unbound.
        return ":".join(str(a) for a in addr) if any(addr) else ""
    return "" if addr in ("", b"") else str(addr)


def _enum_name(value: int, prefix: str) -> str:
    # socket.AddressFamily / SocketKind are IntEnums; unknown values fall back to the number.
    try:
        if prefix == "AF_":
            return socket.AddressFamily(value).name
        return socket.SocketKind(value).name
    except ValueError:
        return f"{prefix}{value}"
