"""The attacking side of tests/test_fuzz_conduit.py:
``python conduit_fuzz_client.py RUN_DIR SEED FRAMES TOKEN_TTL [PRECLOSE]``.

Runs as an unprivileged uid (the test starts it through ``setpriv``) and sends FRAMES hostile conduit frames,
seeded by SEED: random bytes; length prefixes with zero, oversize or truncated bodies; well-formed frames of
every body kind (server-only kinds too) with random fields; made-up, reused, foreign, expired and wrong-kind
tokens; descriptors on frames that carry none, fewer or more than ``fd_count``, on bytes in the middle of a
frame; connections closed before the Welcome, mid-frame, with a reset; and now and then a legitimate put, get,
take and ack, to check that the broker still does the right thing for a client that behaves.

It watches the broker's answers and records an *anomaly* for anything a correct broker never does: a
descriptor it was not given, a bad token accepted, a legitimate deposit not answered, a query or ping not
answered on a connection that is in sync, an UNKNOWN or INTERNAL code, a descriptor it sent and the broker
still holds after everything ended. Each anomaly carries the last frames of its connection (the reproducer).

PRECLOSE (default 0.03) is the share of connections closed before the Welcome could be read. If the uid
cannot get a session any more (20 connections in a row refused), the run stops early with a "locked out"
anomaly: nothing after that would reach the broker. Progress goes to stderr; one JSON summary line to stdout.
Exit status 0 unless the run itself broke.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import random
import select
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for fuzzutil

import grpc
from fuzzutil import (
    FuzzContext,
    RandomChooser,
    Stopwatch,
    describe_frame,
    descriptor_of,
    fill_message,
    gen_wire,
    prefix,
)

from fdbroker.conduit.frames import FrameDecoder, encode_frame
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import broker_pb2_grpc as pb_grpc
from fdbroker.v1 import conduit_pb2 as cpb

MAX_FRAME = 65536
BODY_FIELDS = list(descriptor_of(cpb.ConduitFrame).oneofs_by_name["body"].fields)
BAD_CODES = {2: "UNKNOWN", 13: "INTERNAL"}
ANSWER_TIMEOUT = 5.0
ANSWERED = ("deposit", "redeem", "ack")  # and query (QueryResult), ping (Pong): checked by id and nonce
PROBE_GRACE = 15.0  # seconds a refused descriptor may stay open (its connection may still hold it)
MAX_ANOMALIES = 300


class Dead(Exception):
    """The connection is gone (EOF, EPIPE, reset)."""


class Conn:
    """One conduit connection driven by hand, with what the fuzzer expects to hear back on it."""

    def __init__(self, fz: Fuzzer, number: int) -> None:
        self.fz = fz
        self.number = number
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(fz.conduit_path)
        self.decoder = FrameDecoder(MAX_FRAME)
        self.session = ""
        self.dead = False
        self.in_sync = True  # every byte sent so far was whole, well-formed, non-fatal frames
        self.errors_seen = 0
        self.last_error = ""
        self.answers = 0  # frames received other than Welcome and Pong
        self.log: collections.deque[str] = collections.deque(maxlen=14)
        # token -> (name, (st_dev, st_ino)) of descriptors the broker may deliver to us
        self.expect_deliver: dict[bytes, tuple[str, tuple[int, int]]] = {}
        self.delivered: dict[bytes, tuple[int, int]] = {}
        self.deposits: dict[bytes, str] = {}  # legit tokens sent, awaiting Deposited
        self.deposit_results: dict[bytes, cpb.DepositResult] = {}
        self.queries: dict[int, str] = {}
        self.pings: dict[int, str] = {}
        self.acked: set[bytes] = set()

    # -- I/O -------------------------------------------------------------------------------------------------

    def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self.dead:
            raise Dead()
        try:
            if fds:
                try:
                    n = socket.send_fds(self.sock, [data], list(fds))
                except OSError as err:
                    if err.errno != errno.ETOOMANYREFS:
                        raise
                    # The kernel's cap on this uid's descriptors in flight (RLIMIT_NOFILE): send the bytes bare.
                    self.fz.stats["ETOOMANYREFS"] += 1
                    self.fz.note(self, "(the kernel refused to attach the descriptors: ETOOMANYREFS)")
                    self.in_sync = False
                    n = 0
                self.fz.fds_sent += len(fds)
                if n < len(data):
                    self.sock.sendall(data[n:])
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError, ConnectionRefusedError) as err:
            self.dead = True
            raise Dead() from err
        self.fz.sendmsgs += 1

    def pump(self, timeout: float = 0.0) -> bool:
        """Read what is there (waiting up to ``timeout`` for the first bytes); False on EOF."""
        if self.dead:
            return False
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.0, deadline - time.monotonic())
            if not readable(self.sock.fileno(), left):
                return True
            try:
                data, fds, _flags, _ = socket.recv_fds(
                    self.sock, MAX_FRAME + 4, 253, socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT
                )
            except (BlockingIOError, InterruptedError):
                return True
            except (ConnectionResetError, OSError):
                data, fds = b"", []
            if not data:
                for fd in fds:
                    self.fz.anomaly(
                        "descriptor with EOF", f"fd {fd_target(fd)} arrived with end of stream", self
                    )
                    os.close(fd)
                self.dead = True
                return False
            for item in self.decoder.feed(data, fds):
                if isinstance(item, Exception):
                    self.fz.anomaly("broker sent a bad frame", str(item), self)
                    continue
                self.on_frame(item.message, item.fds)
            timeout = 0.0
            deadline = time.monotonic()

    def wait(self, cond: Any, timeout: float = ANSWER_TIMEOUT) -> bool:
        deadline = time.monotonic() + timeout
        while not cond():
            left = deadline - time.monotonic()
            if left <= 0 or self.dead:
                return bool(cond())
            if not self.pump(min(left, 0.5)):
                return bool(cond())
        return True

    def on_frame(self, m: cpb.ConduitFrame, fds: list[int]) -> None:
        fz = self.fz
        kind = m.WhichOneof("body")
        fz.stats[f"recv:{kind}"] += 1
        if kind not in ("welcome", "pong"):
            self.answers += 1
        try:
            if kind == "deliver":
                items = list(m.deliver.items)
                for i, fd in enumerate(fds):
                    item = items[i] if i < len(items) else None
                    tok = item.token if item is not None else b""
                    exp = self.expect_deliver.get(tok) if tok else None
                    st = os.fstat(fd)
                    if exp is None:
                        fz.anomaly(
                            "descriptor never asked for",
                            f"Deliver item {describe_frame(item) if item else '(none)'} "
                            f"brought {fd_target(fd)}",
                            self,
                        )
                    elif (st.st_dev, st.st_ino) != exp[1]:
                        fz.anomaly(
                            "wrong descriptor delivered",
                            f"Deliver of {exp[0]!r} brought {fd_target(fd)}, not the one deposited",
                            self,
                        )
                    else:
                        self.delivered[tok] = exp[1]
                return
            if fds:
                fz.anomaly("descriptor on a frame without items", f"{kind} frame brought {len(fds)}", self)
            if kind == "welcome":
                if self.session:
                    fz.anomaly("second welcome", describe_frame(m), self)
                self.session = m.welcome.session_id
                if m.welcome.identity.uid != os.getuid():
                    fz.anomaly("welcome names another uid", describe_frame(m), self)
            elif kind == "deposited":
                for r in m.deposited.results:
                    code = r.error.code if r.HasField("error") else 0
                    fz.stats[f"deposit-result:{code}"] += 1
                    legit = self.deposits.pop(r.token, None)
                    if legit is not None:
                        self.deposit_results[r.token] = r
                    elif not r.HasField("error"):
                        fz.anomaly(
                            "bad token accepted",
                            f"a deposit with token {r.token.hex()[:16]}… was accepted",
                            self,
                        )
                    if code in BAD_CODES:
                        fz.anomaly(f"deposit answered {BAD_CODES[code]}", describe_frame(r), self)
            elif kind == "error":
                self.errors_seen += 1
                self.last_error = f"{m.error.code}: {m.error.message}"
                fz.stats[f"error:{m.error.code}"] += 1
                if m.error.code in BAD_CODES:
                    fz.anomaly(f"error frame {BAD_CODES[m.error.code]}", describe_frame(m), self)
                if m.error.token in self.deposits:
                    r = cpb.DepositResult(token=m.error.token)
                    r.error.CopyFrom(m.error)
                    self.deposit_results[m.error.token] = r
                    del self.deposits[m.error.token]
            elif kind == "pong":
                self.pings.pop(m.pong.nonce, None)
            elif kind == "query_result":
                self.queries.pop(m.query_result.id, None)
                if m.query_result.HasField("error") and m.query_result.error.code in BAD_CODES:
                    fz.anomaly(
                        f"query answered {BAD_CODES[m.query_result.error.code]}",
                        describe_frame(m.query_result.error),
                        self,
                    )
            elif kind == "acked":
                self.acked.update(m.acked.tokens)
            else:
                fz.anomaly("unexpected frame from the broker", describe_frame(m), self)
        finally:
            for fd in fds:
                os.close(fd)

    def close(self, how: str = "close") -> None:
        if how == "rst":
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()
        self.decoder.close()
        self.dead = True


def readable(fd: int, timeout: float) -> bool:
    """poll(2), not select(2): descriptor numbers can pass 1024 here."""
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(timeout * 1000))


def fd_target(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "?"


class Fuzzer:
    def __init__(self, run_dir: str, seed: int, frames: int, ttl: float, preclose: float = 0.03) -> None:
        self.run_dir = run_dir
        self.conduit_path = os.path.join(run_dir, "conduit.sock")
        self.seed = seed
        self.frames = frames
        self.ttl = ttl
        self.preclose = preclose  # share of connections closed before the Welcome could be read
        self.refused_in_a_row = 0
        self.last_refusal = ""
        self.stopped_early = ""
        self.rng = random.Random(seed)
        self.ch = RandomChooser(self.rng)
        self.ctx = FuzzContext()
        self.stats: collections.Counter[str] = collections.Counter()
        self.anomalies: list[dict[str, Any]] = []
        self.anomaly_counts: collections.Counter[str] = collections.Counter()
        self.sent = 0
        self.sendmsgs = 0
        self.fds_sent = 0
        self.conns = 0
        self.serial = 0
        self.channel = grpc.insecure_channel(f"unix://{os.path.join(run_dir, 'control.sock')}")
        self.stub = pb_grpc.FdBrokerStub(self.channel)
        self.rpc_watch = Stopwatch()
        # Token pools for misuse.
        self.used_tokens: collections.deque[bytes] = collections.deque(maxlen=64)
        self.fresh_unused: collections.deque[tuple[float, bytes]] = collections.deque(maxlen=256)
        self.foreign_tokens: collections.deque[bytes] = collections.deque(maxlen=64)
        self.get_tokens: collections.deque[bytes] = collections.deque(maxlen=64)
        self.probes: list[tuple[int, str, float]] = []  # read end, what, when sent
        self.side: Conn | None = None

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def anomaly(self, what: str, detail: str, conn: Conn | None = None) -> None:
        self.anomaly_counts[what] += 1
        if self.anomaly_counts[what] <= 5 and len(self.anomalies) < MAX_ANOMALIES:
            self.anomalies.append(
                {
                    "what": what,
                    "detail": detail,
                    "frame": self.sent,
                    "connection": conn.number if conn else None,
                    "repro": list(conn.log) if conn else [],
                }
            )

    def note(self, conn: Conn, text: str) -> None:
        conn.log.append(text if len(text) < 400 else text[:400] + "…")

    def pool_tokens(self) -> list[bytes]:
        now = time.monotonic()
        expired = [t for at, t in self.fresh_unused if now - at > self.ttl + 0.5]
        return [*self.used_tokens, *expired, *self.foreign_tokens, *self.get_tokens]

    # -- descriptors to send ---------------------------------------------------------------------------------

    def some_fds(self, n: int) -> list[int]:
        """``n`` descriptors to attach (ours to close after sending). Some are the write ends of probe pipes:
        the read end sees EOF once the broker closed its copy too."""
        fds: list[int] = []
        for _ in range(n):
            k = self.rng.randrange(6)
            if k == 0 and len(self.probes) < 200:
                r, w = os.pipe()
                self.probes.append((r, f"probe sent at frame {self.sent}", time.monotonic()))
                fds.append(w)
            elif k == 1:
                a, b = socket.socketpair()
                fds.append(a.detach())
                b.close()
            elif k == 2:
                fds.append(os.eventfd(0))
            elif k == 3:
                fds.append(os.memfd_create("fuzz"))
            else:
                fds.append(os.open("/dev/null", os.O_RDONLY))
        return fds

    def check_probes(self, final: bool = False) -> None:
        """Probes whose read end sees EOF are done with. One still open after PROBE_GRACE seconds (or at the
        end, when every connection is closed) is a descriptor the broker refused and kept."""
        deadline = time.monotonic() + (5.0 if final else 0.0)
        now = time.monotonic()
        while True:
            left: list[tuple[int, str, float]] = []
            for r, what, at in self.probes:
                if readable(r, 0) and os.read(r, 1) == b"":
                    os.close(r)
                elif not final and now - at > PROBE_GRACE:
                    self.anomaly(
                        "broker kept a descriptor it refused", f"{what}: still open {PROBE_GRACE}s later"
                    )
                    os.close(r)
                else:
                    left.append((r, what, at))
            self.probes = left
            if not self.probes or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if final:
            for r, what, _ in self.probes:
                self.anomaly("broker kept a descriptor it refused", f"{what}: never closed by the broker")
                os.close(r)
            self.probes = []

    # -- frames ----------------------------------------------------------------------------------------------

    def random_frame(self) -> cpb.ConduitFrame:
        m = cpb.ConduitFrame()
        self.ctx.tokens = self.pool_tokens()
        f = self.ch.choice(BODY_FIELDS)
        fill_message(self.ch, self.ctx, getattr(m, f.name), depth=2)
        getattr(m, f.name).SetInParent()
        return m

    def encode(self, m: cpb.ConduitFrame, fd_count: int) -> bytes:
        m.fd_count = fd_count
        body = m.SerializeToString()
        if len(body) > MAX_FRAME:
            m.ClearField(m.WhichOneof("body"))
            m.ping.nonce = 1
            body = m.SerializeToString()
        return prefix(len(body)) + body

    def send_frame(self, c: Conn, m: cpb.ConduitFrame, nfds: int, fd_count: int | None = None) -> None:
        """Send ``m`` claiming ``fd_count`` descriptors with ``nfds`` attached. A frame the broker must answer
        (on a connection still in sync, descriptors as claimed) is checked, behind a Ping barrier: frames are
        served in order, so once the Pong is in, its answer must be too."""
        fd_count = nfds if fd_count is None else fd_count
        fds = self.some_fds(nfds)
        check = False
        try:
            data = self.encode(m, fd_count)
            kind = m.WhichOneof("body")
            self.note(c, f"frame fd_count={fd_count} +{nfds} fds: {describe_frame(m)}")
            if fd_count > 253:
                c.in_sync = False
            elif c.in_sync and fd_count == nfds:
                if kind == "query" and nfds == 0:
                    c.queries[m.query.id] = describe_frame(m)
                    check = True
                elif kind == "ping" and nfds == 0:
                    c.pings[m.ping.nonce] = describe_frame(m)
                elif kind in ANSWERED:
                    # The protocol promises an answer to these (docs/conduit-protocol.md §3.5); a Redeem or an
                    # Ack answers per token, so one with no token has nothing to answer.
                    check = kind == "deposit" or bool(getattr(m, kind).tokens)
                    check = check and self.rng.random() < 0.5
            before = c.answers
            c.send(data, fds)
        finally:
            for fd in fds:
                os.close(fd)
        if check:
            c.pump(0)
            if (c.answers == before or c.queries) and self.barrier(c):
                if c.queries:
                    for qid, what in c.queries.items():
                        self.anomaly("query not answered", f"no QueryResult for id {qid}: {what}", c)
                    c.queries.clear()
                elif c.answers == before:
                    self.anomaly("frame not answered", f"no answer to {describe_frame(m)}", c)

    def barrier(self, c: Conn) -> bool:
        """Ping and wait for the Pong: True when it came (everything sent before was served), False when the
        connection went away first. A live connection that does not answer is an anomaly."""
        if c.dead:
            return False
        nonce = self.rng.getrandbits(64) | 1
        c.pings[nonce] = "barrier"
        try:
            c.send(encode_frame(cpb.ConduitFrame(ping=cpb.Ping(nonce=nonce))))
        except Dead:
            return False
        c.wait(lambda: nonce not in c.pings)
        if nonce in c.pings:
            del c.pings[nonce]
            if not c.dead:
                self.anomaly(
                    "ping not answered", f"no Pong within {ANSWER_TIMEOUT}s on an in-sync connection", c
                )
            elif c.in_sync and c.errors_seen == 0:
                self.anomaly("dropped without an error", "EOF on an in-sync connection, no Error frame", c)
            return False
        for _, what in list(c.pings.items()):
            self.anomaly("ping not answered", what, c)
        c.pings.clear()
        return True

    # -- actions ---------------------------------------------------------------------------------------------

    def act_random_bytes(self, c: Conn) -> None:
        data = self.rng.randbytes(self.rng.randint(1, 300))
        self.note(c, f"raw bytes {data[:40].hex()}… ({len(data)} bytes)")
        c.in_sync = False
        nfds = self.rng.choice((0, 0, 0, 1, 3))
        fds = self.some_fds(nfds)
        try:
            c.send(data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def act_bad_length(self, c: Conn) -> None:
        n = self.rng.choice((0, MAX_FRAME + 1, 2**31, 2**32 - 1, self.rng.randint(MAX_FRAME + 1, 2**32 - 1)))
        data = prefix(n) + self.rng.randbytes(self.rng.randint(0, 64))
        self.note(c, f"length prefix {n} + {len(data) - 4} bytes")
        c.in_sync = False
        nfds = self.rng.choice((0, 1, 2))
        fds = self.some_fds(nfds)
        try:
            c.send(data, fds)
        finally:
            for fd in fds:
                os.close(fd)

    def act_truncated(self, c: Conn) -> None:
        m = self.random_frame()
        nfds = self.rng.choice((0, 1))
        data = self.encode(m, nfds)
        cut = self.rng.randint(1, len(data) - 1) if len(data) > 1 else 1
        self.note(c, f"first {cut} of {len(data)} bytes of {describe_frame(m)} +{nfds} fds")
        c.in_sync = False
        fds = self.some_fds(nfds)
        try:
            c.send(data[:cut], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def act_wire_body(self, c: Conn) -> None:
        body = gen_wire(self.ch, descriptor_of(cpb.ConduitFrame)) or b"\x00"
        body = body[:MAX_FRAME]
        self.note(c, f"wire-level body {body[:60].hex()} ({len(body)} bytes)")
        c.in_sync = False  # may parse, may be fatal
        c.send(prefix(len(body)) + body)

    def act_frame(self, c: Conn) -> None:
        m = self.random_frame()
        r = self.rng.random()
        if r < 0.7:
            nfds, fd_count = 0, 0
        elif r < 0.8:
            nfds = self.rng.randint(1, 3)
            fd_count = nfds
        elif r < 0.9:
            nfds = self.rng.randint(0, 3)
            fd_count = self.rng.randint(0, 4)
        elif r < 0.97:
            nfds = self.rng.randint(0, 2)
            fd_count = self.rng.choice((253, 254, 255, 1000, 2**32 - 1))
        else:
            nfds = fd_count = 253
        self.send_frame(c, m, nfds, fd_count)

    def act_deposit_bad_token(self, c: Conn) -> None:
        pool = self.pool_tokens()
        kinds = ["made-up", "empty", "short"]
        if self.used_tokens:
            kinds.append("reused")
        if self.foreign_tokens:
            kinds.append("foreign")
        if self.get_tokens:
            kinds.append("get-token")
        if any(time.monotonic() - at > self.ttl + 0.5 for at, _ in self.fresh_unused):
            kinds.append("expired")
        tokens: list[bytes] = []
        for _ in range(self.rng.choice((1, 1, 1, 2, 3))):
            k = self.rng.choice(kinds)
            if k == "made-up":
                tokens.append(self.rng.randbytes(32))
            elif k == "empty":
                tokens.append(b"")
            elif k == "short":
                tokens.append(self.rng.randbytes(self.rng.randint(1, 31)))
            elif k == "reused":
                tokens.append(self.rng.choice(self.used_tokens))
            elif k == "foreign":
                tokens.append(self.rng.choice(self.foreign_tokens))
            elif k == "get-token":
                tokens.append(self.rng.choice(self.get_tokens))
            else:
                old = [t for at, t in self.fresh_unused if time.monotonic() - at > self.ttl + 0.5]
                tokens.append(self.rng.choice(old or pool or [b"x"]))
            self.stats[f"bad-token:{k}"] += 1
        n = len(tokens)
        nfds = n if self.rng.random() < 0.8 else self.rng.randint(0, n + 2)
        self.send_frame(c, cpb.ConduitFrame(deposit=cpb.Deposit(tokens=tokens)), nfds, nfds)

    def act_unsolicited(self, c: Conn) -> None:
        kind = self.rng.choice(("ping", "query", "ack", "redeem", "pong", "welcome", "acked"))
        m = cpb.ConduitFrame()
        if kind == "ping":
            m.ping.nonce = self.rng.getrandbits(64)
        elif kind == "query":
            m.query.id = self.rng.getrandbits(64)
            m.query.info.SetInParent()
        else:
            getattr(m, kind).SetInParent()
        nfds = self.rng.randint(1, 4)
        fd_count = self.rng.choice((0, nfds, nfds - 1, nfds + 1))
        self.send_frame(c, m, nfds, max(0, fd_count))

    def act_fds_mid_frame(self, c: Conn) -> None:
        """Descriptors on bytes that are not a frame's first; sometimes many small sends (hoarding)."""
        m = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[self.rng.randbytes(32)]))
        data = self.encode(m, 1)
        c.in_sync = False
        if self.rng.random() < 0.3:
            # Hoarding: a prefix for a big frame, then 1-byte sends each with descriptors.
            n = self.rng.randint(1000, MAX_FRAME)
            sends = self.rng.randint(2, 8)
            per = self.rng.choice((1, 16, 64))
            self.note(c, f"prefix {n}, then {sends} one-byte sends with {per} fds each")
            c.send(prefix(n))
            for _ in range(sends):
                fd = os.open("/dev/null", os.O_RDONLY)
                dups = [fd] + [os.dup(fd) for _ in range(per - 1)]
                try:
                    c.send(b"\x0a", dups)
                finally:
                    for d in dups:
                        os.close(d)
            return
        cut = self.rng.randint(1, len(data) - 1)
        self.note(c, f"{describe_frame(m)}: first {cut} bytes bare, rest with 1 fd")
        c.send(data[:cut])
        fds = self.some_fds(1)
        try:
            c.send(data[cut:], fds)
        finally:
            for fd in fds:
                os.close(fd)

    def act_ping(self, c: Conn) -> None:
        m = cpb.ConduitFrame(ping=cpb.Ping(nonce=self.rng.getrandbits(64)))
        self.send_frame(c, m, 0)

    def act_query(self, c: Conn) -> None:
        m = cpb.ConduitFrame()
        q = m.query
        q.id = self.rng.getrandbits(64)
        self.ctx.tokens = self.pool_tokens()
        fill_message(self.ch, self.ctx, q, depth=3)
        q.id = q.id or 1
        self.send_frame(c, m, 0)

    # -- legitimate flows, as a well-behaved client would do them ---------------------------------------------

    def rpc(self, method: str, req: Any, session: str) -> Any:
        md = [("fdbroker-session", session)] if session else []
        try:
            resp = self.rpc_watch.time(
                method, lambda: getattr(self.stub, method)(req, metadata=md, timeout=10)
            )
        except grpc.RpcError as err:
            code = err.code()
            self.stats[f"rpc:{method}:{code.name}"] += 1
            if code.value[0] in BAD_CODES:
                self.anomaly(f"{method} RPC answered {code.name}", f"{describe_frame(req)}: {err.details()}")
            return None
        self.stats[f"rpc:{method}:OK"] += 1
        return resp

    def act_legit(self, c: Conn) -> None:
        if not c.in_sync or not c.session or c.dead:
            return self.act_ping(c)
        self.serial += 1
        name = f"fz/{self.seed % 100000}/{self.serial}"
        opts = pb.EntryOptions(ephemeral=True)
        if self.rng.random() < 0.4:
            opts = pb.EntryOptions()
            opts.ttl.FromMilliseconds(self.rng.randint(200, 1500))
        resp = self.rpc("Put", pb.PutRequest(name=name, options=opts), c.session)
        if resp is None:
            return None
        tok = bytes(resp.handoff.token)
        if self.rng.random() < 0.15:
            self.fresh_unused.append((time.monotonic(), tok))  # never deposited: expires, then misused
            self.note(c, f"Put {name} -> token kept unused")
            return None
        fd = os.memfd_create(f"fz-{self.serial}")
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        c.deposits[tok] = name
        self.note(c, f"legit Put {name} ({describe_frame(opts)}) + Deposit with its token and a memfd")
        try:
            c.send(encode_frame(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[tok])), 1), [fd])
        finally:
            os.close(fd)
        if not c.wait(lambda: tok not in c.deposits):
            if not c.dead:
                self.anomaly("legit deposit not answered", f"no Deposited for {name} in {ANSWER_TIMEOUT}s", c)
            return None
        r = c.deposit_results.pop(tok, None)
        if r is None or r.HasField("error"):
            self.anomaly(
                "legit deposit refused", describe_frame(r) if r is not None else "(connection lost)", c
            )
            return None
        self.used_tokens.append(tok)
        self.stats["legit-put"] += 1
        roll = self.rng.random()
        if roll < 0.4:
            self.legit_get(c, name, ident)
        elif roll < 0.6:
            self.legit_take(c, name, ident)
        elif roll < 0.75:
            self.note(c, f"legit Delete {name}")
            self.rpc("Delete", pb.DeleteRequest(name=name), c.session)
        return None

    def legit_get(self, c: Conn, name: str, ident: tuple[int, int]) -> None:
        prefetch = self.rng.choice((0, 0, 1, 3))
        self.note(c, f"legit Get {name} prefetch={prefetch}")
        # The Deliver is sent before the RPC returns, but this process reads it only after: the token is known.
        resp = self.rpc("Get", pb.GetRequest(name=name, prefetch=prefetch), c.session)
        if resp is None:
            return
        tok = bytes(resp.handoffs[0].token)
        c.expect_deliver[tok] = (name, ident)
        for t in resp.prefetch_tokens:
            c.expect_deliver[bytes(t)] = (name, ident)
            self.get_tokens.append(bytes(t))
        if not c.wait(lambda: tok in c.delivered) and not c.dead:
            self.anomaly("legit get not delivered", f"no Deliver for Get {name}", c)
        if resp.prefetch_tokens and self.rng.random() < 0.5:
            t = bytes(resp.prefetch_tokens[0])
            self.note(c, f"legit Redeem of a prefetched token of {name}")
            c.send(encode_frame(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=[t]))))
            if not c.wait(lambda: t in c.delivered) and not c.dead:
                self.anomaly("legit redeem not delivered", f"no Deliver for a prefetched token of {name}", c)

    def legit_take(self, c: Conn, name: str, ident: tuple[int, int]) -> None:
        self.note(c, f"legit Take {name}")
        resp = self.rpc("Take", pb.TakeRequest(name=name), c.session)
        if resp is None:
            return
        tok = bytes(resp.handoff.token)
        c.expect_deliver[tok] = (name, ident)
        # The Deliver was sent before the RPC answered; it may be read only now.
        if not c.wait(lambda: tok in c.delivered) and not c.dead:
            self.anomaly("legit take not delivered", f"no Deliver for Take {name}", c)
            return
        if self.rng.random() < 0.8:
            self.note(c, f"legit Ack of the take of {name}")
            c.send(encode_frame(cpb.ConduitFrame(ack=cpb.Ack(tokens=[tok]))))
            if not c.wait(lambda: tok in c.acked) and not c.dead:
                self.anomaly("legit ack not acked", f"no Acked for Take {name}", c)
            else:
                self.used_tokens.append(tok)

    def refresh_foreign(self) -> None:
        """A PUT token of another session of ours (never deposited there): presented here, it is foreign."""
        if self.side is None or self.side.dead:
            self.side = self.open_conn(allow_preclose=False)
            if self.side is None:
                return
        self.side.pump(0)
        self.serial += 1
        resp = self.rpc("Put", pb.PutRequest(name=f"fz/side/{self.serial}"), self.side.session)
        if resp is not None:
            self.foreign_tokens.append(bytes(resp.handoff.token))

    # -- connections -----------------------------------------------------------------------------------------

    def open_conn(self, allow_preclose: bool = True) -> Conn | None:
        self.conns += 1
        try:
            c = Conn(self, self.conns)
        except OSError as err:
            self.stats[f"connect-failed:{err.errno}"] += 1
            time.sleep(0.01)
            return None
        if allow_preclose and self.rng.random() < self.preclose:
            # Gone before the broker could even say Welcome.
            self.note(c, "connect, close before reading the Welcome")
            self.stats["closed-before-welcome"] += 1
            c.close(self.rng.choice(("close", "rst")))
            return None
        if not c.wait(lambda: bool(c.session) or c.errors_seen > 0, 10.0) or not c.session:
            self.stats["no-welcome"] += 1
            self.refused_in_a_row += 1
            self.last_refusal = c.last_error or "(no Welcome and no Error within 10 s)"
            c.close()
            return None
        self.refused_in_a_row = 0
        return c

    def end_conn(self, c: Conn) -> None:
        how = self.rng.choice(("clean", "clean", "clean", "abrupt", "rst", "midframe", "shutdown"))
        self.stats[f"end:{how}"] += 1
        if how == "clean" and not c.dead:
            c.pump(0)
            if c.in_sync and self.barrier(c):
                for qid, what in c.queries.items():
                    self.anomaly("query not answered", f"no QueryResult for id {qid}: {what}", c)
        elif how == "midframe" and not c.dead:
            m = self.random_frame()
            data = self.encode(m, 1)
            fds = self.some_fds(1)
            with contextlib.suppress(Dead):
                c.send(data[: max(1, len(data) // 2)], fds)
            for fd in fds:
                os.close(fd)
        elif how == "shutdown" and not c.dead:
            with contextlib.suppress(OSError):
                c.sock.shutdown(socket.SHUT_WR)
            c.wait(lambda: c.dead, 5.0)
            if not c.dead:
                self.anomaly("no EOF after shutdown", "the broker kept a half-closed connection open", c)
        c.close("rst" if how == "rst" else "close")

    def run(self) -> dict[str, Any]:
        t0 = time.monotonic()
        weights = {
            self.act_random_bytes: 6,
            self.act_bad_length: 4,
            self.act_truncated: 5,
            self.act_wire_body: 4,
            self.act_frame: 34,
            self.act_deposit_bad_token: 16,
            self.act_unsolicited: 8,
            self.act_fds_mid_frame: 4,
            self.act_ping: 5,
            self.act_query: 6,
            self.act_legit: 4,
        }
        actions, w = list(weights), list(weights.values())
        next_report = 5000
        next_foreign = 0
        while self.sent < self.frames:
            if self.sent >= next_foreign:
                self.refresh_foreign()
                next_foreign = self.sent + 200
            c = self.open_conn()
            if c is None:
                self.sent += 1  # the connect itself was the frame
                if self.refused_in_a_row >= 20:
                    self.stopped_early = (
                        f"uid {os.getuid()} is locked out: {self.refused_in_a_row} connections in a row got no "
                        f"session ({self.last_refusal})"
                    )
                    self.anomaly("locked out", self.stopped_early)
                    break
                continue
            budget = self.rng.choice((1, 2, 3, 5, 8, 13, 30))
            for _ in range(budget):
                if self.sent >= self.frames or c.dead:
                    break
                act = self.rng.choices(actions, w)[0]
                self.stats[f"act:{act.__name__[4:]}"] += 1
                self.sent += 1
                try:
                    act(c)
                    c.pump(0)
                except Dead:
                    self.stats["dead-during-action"] += 1
                    break
            self.end_conn(c)
            if len(self.probes) > 50:
                self.check_probes()
            if self.sent >= next_report:
                print(
                    f"conduit fuzz: {self.sent} frames, {self.conns} connections, "
                    f"{sum(self.anomaly_counts.values())} anomalies, {time.monotonic() - t0:.0f}s",
                    file=sys.stderr,
                    flush=True,
                )
                next_report += 5000
        if self.side is not None:
            self.side.pump(0)
            self.side.close()
        self.check_probes(final=True)
        self.channel.close()
        return {
            "seed": self.seed,
            "frames": self.sent,
            "stopped_early": self.stopped_early,
            "sendmsgs": self.sendmsgs,
            "fds_sent": self.fds_sent,
            "connections": self.conns,
            "seconds": round(time.monotonic() - t0, 2),
            "uid": os.getuid(),
            "rpc_worst_s": round(self.rpc_watch.worst, 4),
            "rpc_worst_what": self.rpc_watch.worst_what,
            "stats": dict(sorted(self.stats.items())),
            "anomaly_counts": dict(self.anomaly_counts),
            "anomalies": self.anomalies,
        }


def main() -> None:
    run_dir, seed, frames, ttl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    preclose = float(sys.argv[5]) if len(sys.argv) > 5 else 0.03
    print(json.dumps(Fuzzer(run_dir, seed, frames, ttl, preclose).run()), flush=True)


if __name__ == "__main__":
    main()
