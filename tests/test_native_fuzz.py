"""The native data plane against its pure-Python twin: the same random and adversarial conduit traffic, the same
answers — bytes and descriptors.

Two brokers run in this process, one with the C table of prefetched tokens (``fdbroker._native``, whose reader
serves whole ``Redeem`` frames itself) and one with the Python table (``broker/fastpath.py``), on the same fake
clock, their tokens drawn from the same seeded sequence, holding duplicates of the same descriptors. Real socket
pairs stand for the conduit connections; their reader callbacks are called by hand (a fake loop records them).
Hypothesis draws a program — gets with prefetch, batch gets, ``Redeem`` frames of good, used, foreign, mutated,
short and random tokens, hostile frames (non-minimal lengths, unknown fields, duplicates, frames split or glued,
descriptors where none belong, fatal lengths), clock jumps past expiry, replaced, deleted and leased entries,
sessions that end — and runs it on both; what every client end receives must be identical: the same bytes, and
descriptors of the same entries in the same order.

``make asan-fuzz`` runs this file against the extension built with AddressSanitizer (``FDBROKER_NATIVE_PATH``),
``FDBROKER_NATIVE_FUZZ_EXAMPLES`` sets the number of programs (default 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import re
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fdbroker import native
from fdbroker.broker import closer
from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.listener import ANCBUFSIZE, Connection
from fdbroker.broker.policy import Identity, Limits, Policy
from fdbroker.errors import BrokerError
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

NATIVE = native.load(required=os.environ.get("FDBROKER_NATIVE") == "1")
pytestmark = pytest.mark.skipif(NATIVE is None, reason="the C extension is not built (or FDBROKER_NATIVE=0)")
EXAMPLES = int(os.environ.get("FDBROKER_NATIVE_FUZZ_EXAMPLES", "200"))
NAMES = ["f/a", "f/b", "f/c", "f/d"]
SESSIONS = 3
TTL = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """What a Connection asks of its loop, recorded: the test calls the callbacks itself."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], Any]] = {}
        self.writers: dict[int, Callable[[], Any]] = {}

    def add_reader(self, fd: int, cb: Callable[[], Any]) -> None:
        self.readers[fd] = cb

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def add_writer(self, fd: int, cb: Callable[[], Any]) -> None:
        self.writers[fd] = cb

    def remove_writer(self, fd: int) -> None:
        self.writers.pop(fd, None)

    def call_later(self, delay: float, cb: Callable[[], Any]) -> Handle:
        return Handle()

    def call_soon(self, cb: Callable[..., Any], *args: Any) -> Handle:
        cb(*args)
        return Handle()


def _memfd(i: int) -> int:
    fd = os.memfd_create(f"fuzz-{i}", os.MFD_CLOEXEC)
    os.write(fd, b"%d" % i)
    return fd


class Side:
    """One broker and its connections; every call mirrors the other side's."""

    def __init__(self, use_native: bool, seed: int, held: dict[tuple[int, int], str]) -> None:
        self.clock = Clock()
        policy = Policy(
            os.getuid(), limits=Limits(max_prefetch_tokens_per_uid=24, max_pending_tokens_per_uid=32)
        )
        config = BrokerConfig(capacity=64, token_ttl=TTL, extra={"token_seed": seed, "native": use_native})
        self.broker = Broker(config, policy, clock=self.clock)
        self.broker.registry.wall = lambda: 1_700_000_000.0  # times shown in entries: the same on both sides
        self.table = self.broker.tokens.spec
        self.table.set_now(self.clock())
        self.use_native = use_native
        self.loop = FakeLoop()
        self.held = held  # (st_dev, st_ino) -> which shared descriptor
        self.slots: list[tuple[Connection, socket.socket] | None] = [None] * SESSIONS
        self.pids = 100
        self.out: list[Any] = []
        self.refilled: list[tuple[int, bytes]] = []  # (session, token) brought by a Redeem's refill
        self.aio = asyncio.new_event_loop()

    # -- sessions --------------------------------------------------------------------------------------------

    def open(self, i: int) -> None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        b.setblocking(False)
        self.pids += 1
        ident = Identity(self.pids, os.getuid(), os.getgid())
        conn = Connection(
            self.loop,  # type: ignore[arg-type]
            a,
            ident,
            lambda c, f: self.broker.on_frame(c.session, f),  # type: ignore[arg-type]
            lambda c: self.broker.end_session(c.session),  # type: ignore[arg-type]
            max_frame_bytes=65536,
            native=self.table if self.use_native else None,
        )
        assert (conn.native is not None) == self.use_native
        s = self.broker.open_session(ident, conn)
        conn.session = s
        if conn.native is not None:
            conn.native.key = s.key
        self.slots[i] = (conn, b)
        self.read(i)  # the Welcome: its session id is random, not compared

    def session(self, i: int) -> Any:
        slot = self.slots[i]
        if slot is None or slot[0].closed:
            if slot is not None:
                slot[1].close()  # the broker dropped it (a fatal frame): so do we
            self.open(i)
            slot = self.slots[i]
        assert slot is not None
        return slot[0].session

    def close(self, i: int) -> None:
        slot = self.slots[i]
        if slot is not None:
            slot[1].close()
            self.poke(i)
            self.slots[i] = None

    # -- I/O -------------------------------------------------------------------------------------------------

    def write(self, i: int, data: bytes, fds: list[int] | None = None) -> None:
        self.session(i)
        slot = self.slots[i]
        assert slot is not None
        if fds:
            socket.send_fds(slot[1], [data], fds)
        else:
            slot[1].sendall(data)
        self.poke(i)

    def poke(self, i: int) -> None:
        """Call the connection's callbacks while it has something to read or to write."""
        slot = self.slots[i]
        if slot is None:
            return
        conn = slot[0]
        for _ in range(64):
            fd = conn.sock.fileno() if not conn.closed else -1
            if fd < 0:
                return
            w = self.loop.writers.get(fd)
            if w is not None:
                w()
            r = self.loop.readers.get(fd)
            if r is None or not _readable(fd):
                return
            r()

    def read(self, i: int) -> tuple[bytes, list[str]]:
        """Everything the client end of session ``i`` has received: the bytes, and which descriptors (closed)."""
        slot = self.slots[i]
        if slot is None:
            return b"", []
        data, which = b"", []
        while True:
            try:
                chunk, anc, _, _ = slot[1].recvmsg(1 << 20, ANCBUFSIZE, socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, OSError):
                break
            if not chunk:
                break
            data += chunk
            for _, _, cdata in anc:
                for fd in struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4]):
                    st = os.fstat(fd)
                    which.append(self.held.get((st.st_dev, st.st_ino), "?"))
                    os.close(fd)
        return data, which

    def record(self, what: Any) -> None:
        self.out.append(what)

    def collect(self) -> None:
        for i in range(SESSIONS):
            self.poke(i)
            data, which = self.read(i)
            if data or which:
                # A lease's refusal names its expiry in wall-clock time: the only bytes that may differ.
                self.record((i, _stream(data, functools.partial(self._refilled, i)), which))

    def _refilled(self, i: int, token: bytes) -> None:
        self.refilled.append((i, token))

    def shut(self) -> None:
        for i in range(SESSIONS):
            slot = self.slots[i]
            if slot is not None:
                slot[1].close()
                self.poke(i)
        self.broker.close()
        self.aio.close()


def _readable(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(0))


def _frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def _redeem(tokens: list[bytes], refill: int = 0) -> bytes:
    return _frame(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=tokens, refill=refill)).SerializeToString())


class Program:
    """Runs one drawn program on both sides, step by step, and checks they agree after every step."""

    def __init__(self, sides: list[Side], shared: dict[str, int]) -> None:
        self.sides = sides
        self.shared = shared  # name -> a descriptor both brokers got duplicates of
        self.pool: list[tuple[int, bytes]] = []  # (session, prefetched token), in issue order
        self.step = 0

    def both(self, fn: Callable[[Side], Any]) -> None:
        for side in self.sides:
            try:
                got = fn(side)
            except BrokerError as err:
                got = (type(err).__name__, _wall(err.message.encode()))
            side.record(_plain(got))
            side.collect()
        a, b = (s.out for s in self.sides)
        assert a == b, f"step {self.step}: the native and the Python data planes differ"
        self.step += 1

    def tokens_of(self, resp: Any, i: int) -> None:
        if isinstance(resp, (pb.GetResponse, pb.BatchGetResponse)):
            self.pool.extend((i, t) for t in resp.prefetch_tokens)

    def run(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind == "get":
            _, i, n, prefetch = op
            name = NAMES[n]
            resps: list[Any] = []

            def get(side: Side) -> Any:
                r = side.broker.get(side.session(i), name, prefetch)
                resps.append(r)
                return r

            self.both(get)
            if resps:
                self.tokens_of(resps[0], i)
        elif kind == "batch":
            _, i, ns, prefetch = op
            names = [NAMES[n] for n in ns]
            resps = []

            def batch(side: Side) -> Any:
                r = side.broker.batch_get(side.session(i), names, prefetch)
                resps.append(r)
                return r

            self.both(batch)
            if resps:
                self.tokens_of(resps[0], i)
        elif kind == "redeem":
            _, i, picks, glue = op
            toks = [self.pick(p) for p in picks]
            data = _redeem(toks) if glue == "one" else b"".join(_redeem([t]) for t in toks)
            self.both(lambda side: side.write(i, data))
        elif kind == "refill":
            _, i, picks, refill = op
            data = _redeem([self.pick(p) for p in picks], refill)
            self.both(lambda side: side.write(i, data))
            self.pool.extend(self.sides[0].refilled)
            for side in self.sides:
                side.refilled.clear()
        elif kind == "raw":
            _, i, data, with_fd = op
            if with_fd:
                self.both(lambda side: side.write(i, data, [self.shared[NAMES[0]]]))
            else:
                self.both(lambda side: side.write(i, data))
        elif kind == "split":
            _, i, p, cut = op
            data = _redeem([self.pick(p)])
            cut = min(cut, len(data) - 1)
            self.both(lambda side: side.write(i, data[:cut]))
            self.both(lambda side: side.write(i, data[cut:]))
        elif kind == "advance":
            _, secs = op

            def advance(side: Side) -> None:
                side.clock.now += secs
                side.table.set_now(side.clock())
                side.broker.tick()

            self.both(advance)
        elif kind == "replace":
            _, i, n = op
            self.both(lambda side: self.put(side, i, NAMES[n]))
        elif kind == "delete":
            _, i, n = op
            self.both(lambda side: side.broker.delete(side.session(i), NAMES[n]))
        elif kind == "lease":
            _, i, n = op

            def lease(side: Side) -> Any:
                req = pb.LeaseRequest(name=NAMES[n], mode=pb.LeaseState.MODE_EXCLUSIVE)
                req.ttl.FromNanoseconds(int(30e9))
                r = side.aio.run_until_complete(side.broker.lease(side.session(i), req, None))
                return "granted" if r.epoch else "no epoch"  # epochs follow the wall clock

            self.both(lease)
        elif kind == "close":
            _, i = op
            self.both(lambda side: side.close(i))
        else:  # pragma: no cover
            raise AssertionError(op)

    def pick(self, p: tuple[Any, ...]) -> bytes:
        kind, k = p[0], int(p[1])
        if kind == "pool" and self.pool:
            return self.pool[k % len(self.pool)][1]
        if kind == "mutate" and self.pool:
            t = bytearray(self.pool[k % len(self.pool)][1])
            t[p[2] % 32] ^= 1 << (p[2] % 8)
            return bytes(t)
        if kind == "lookup" and self.pool:  # the right lookup id, the wrong secret
            return self.pool[k % len(self.pool)][1][:8] + bytes(24)
        if kind == "short":
            return bytes(p[1] % 40)
        return bytes(p[1] % 256 for _ in range(32))

    def put(self, side: Side, i: int, name: str) -> Any:
        s = side.session(i)
        tok = side.broker.put_begin(s, pb.PutRequest(name=name, replace=True)).handoff.token
        frame = cpb.ConduitFrame(fd_count=1, deposit=cpb.Deposit(tokens=[tok])).SerializeToString()
        side.write(i, _frame(frame), [self.shared[name]])
        return None


def _plain(x: Any) -> Any:
    """A response without what is random or read from the wall clock: the prefetch expiry, lease ids and
    times."""
    if hasattr(x, "SerializeToString"):
        fields = x.DESCRIPTOR.fields_by_name
        if "prefetch_expire_time" in fields:
            x.ClearField("prefetch_expire_time")
        for e in [x.entry] if "entry" in fields else list(x.entries) if "entries" in fields else []:
            e.ClearField("lease")
        return type(x).__name__, x.SerializeToString(deterministic=True)
    return x


def _stream(data: bytes, refilled: Callable[[bytes], None]) -> bytes:
    """The frames a client received, with the lease state of the entries a ``Deposited`` carries taken out (its
    lease id is random) and the expiry of a refill's tokens (wall clock); every other frame byte for byte. The
    tokens a refill brought go to ``refilled``."""
    out, p = [], 0
    while p + 4 <= len(data):
        n = int.from_bytes(data[p : p + 4], "big")
        body = data[p + 4 : p + 4 + n]
        p += 4 + n
        m = cpb.ConduitFrame.FromString(body)
        if m.WhichOneof("body") == "deposited":
            for r in m.deposited.results:
                r.entry.ClearField("lease")
            body = m.SerializeToString(deterministic=True)
        elif m.WhichOneof("body") == "deliver" and any(it.prefetch_tokens for it in m.deliver.items):
            for it in m.deliver.items:
                for t in it.prefetch_tokens:
                    refilled(t)
                it.ClearField("prefetch_expire_time")
            body = m.SerializeToString(deterministic=True)
        out.append(_wall(body))
    out.append(data[p:])
    return b"|".join(out)


def _wall(text: bytes) -> bytes:
    """Lease epochs and expiry times follow the wall clock: read at different moments on the two sides."""
    return re.sub(rb"until \d\d:\d\d:\d\d", b"until HH:MM:SS", re.sub(rb"epoch \d+", b"epoch N", text))


# -- the programs ------------------------------------------------------------------------------------------------

session = st.integers(0, SESSIONS - 1)
name = st.integers(0, len(NAMES) - 1)
token_pick = st.one_of(
    st.tuples(st.just("pool"), st.integers(0, 1000)),
    st.tuples(st.just("pool"), st.integers(0, 1000)),
    st.tuples(st.just("mutate"), st.integers(0, 1000), st.integers(0, 255)),
    st.tuples(st.just("lookup"), st.integers(0, 1000)),
    st.tuples(st.just("short"), st.integers(0, 64)),
    st.tuples(st.just("random"), st.integers(0, 255)),
)
hostile = st.one_of(
    st.binary(max_size=48),
    st.just(_frame(b"\x32\xa2\x00" + b"\x0a\x20" + b"\x01" * 32)),  # a non-minimal length
    st.just(_frame(b"\x08\x00\x32\x22\x0a\x20" + b"\x02" * 32)),  # fd_count = 0 spelled out
    st.just(_frame(b"\x32\x22\x0a\x20" + b"\x03" * 32 + b"\x98\x01\x01")),  # an unknown field after
    st.just(_frame(b"\x32\x00")),  # a Redeem of no token
    st.just(_frame(b"\x32\x24\x10\x08\x0a\x20" + b"\x05" * 32)),  # a refill before the token
    st.just(
        _frame(b"\x32\x2d\x0a\x20" + b"\x06" * 32 + b"\x10\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01")
    ),  # refill 2**64-1
    st.just(_frame(b"\x52\x02\x08\x07")),  # a Ping
    st.just(b"\x00\x00\x00\x00"),  # length 0: fatal
    st.just(b"\xff\xff\xff\xff"),  # too long: fatal
    st.just(_frame(b"\x32\x22\x0a\x20" + b"\x04" * 32)[:20]),  # a partial frame
)
ops = st.one_of(
    st.tuples(st.just("get"), session, name, st.sampled_from([0, 1, 3, 8])),
    st.tuples(st.just("get"), session, name, st.sampled_from([2, 5])),
    st.tuples(
        st.just("batch"),
        session,
        st.lists(name, min_size=1, max_size=4, unique=True),
        st.sampled_from([0, 1, 2]),
    ),
    st.tuples(
        st.just("redeem"),
        session,
        st.lists(token_pick, min_size=1, max_size=4),
        st.sampled_from(["one", "many"]),
    ),
    st.tuples(st.just("redeem"), session, st.lists(token_pick, min_size=1, max_size=2), st.just("one")),
    st.tuples(
        st.just("refill"),
        session,
        st.lists(token_pick, min_size=1, max_size=3),
        st.sampled_from([1, 2, 8, 1024, 1025, 2**32 - 1]),
    ),
    st.tuples(st.just("raw"), session, hostile, st.booleans()),
    st.tuples(st.just("split"), session, token_pick, st.integers(1, 39)),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 6.0])),
    st.tuples(st.just("replace"), session, name),
    st.tuples(st.just("delete"), session, name),
    st.tuples(st.just("lease"), session, name),
    st.tuples(st.just("close"), session),
)


@contextlib.contextmanager
def _two_brokers(seed: int) -> Any:
    fds = {n: _memfd(i) for i, n in enumerate(NAMES)}
    held = {(os.fstat(fd).st_dev, os.fstat(fd).st_ino): n for n, fd in fds.items()}
    sides = [Side(True, seed, held), Side(False, seed, held)]
    prog = Program(sides, fds)
    try:
        for n in NAMES:

            def put(side: Side, n: str = n) -> Any:
                return prog.put(side, 0, n)

            prog.both(put)
        yield prog
    finally:
        for side in sides:
            side.shut()
        for fd in fds.values():
            os.close(fd)
        closer.drain(5)  # the brokers' descriptors and sockets are closed off their (absent) loop


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(seed=st.integers(0, 2**32), program=st.lists(ops, min_size=1, max_size=40))
# Found by `make asan-fuzz`: a natively served Redeem, then part of a frame, then descriptors inside it — the
# decoder's error named absolute stream offsets, which do not count the bytes the native reader answered.
@example(
    seed=0,
    program=[
        ("get", 0, 0, 1),
        ("redeem", 0, [("pool", 0)], "one"),
        ("raw", 0, b'\x00\x00\x00$2"\n ' + b"\x04" * 12, False),
        ("raw", 0, b"\x00\x00\x00\x022\x00", True),
    ],
)
def test_native_and_python_data_planes_answer_identically(seed: int, program: list[tuple[Any, ...]]) -> None:
    with _two_brokers(seed) as prog:
        for op in program:
            prog.run(op)
        # And they end in the same state: tokens live, per uid, and what the native reader served itself.
        a, b = (side.broker for side in prog.sides)
        assert len(a.tokens) == len(b.tokens)
        assert a.tokens.speculative_for_uid(os.getuid()) == b.tokens.speculative_for_uid(os.getuid())


def test_the_native_reader_serves_a_prefetched_get_itself() -> None:
    """A sanity check that the comparison compares something: the native side answers Redeem frames itself."""
    with _two_brokers(7) as prog:
        prog.run(("get", 0, 0, 8))
        for k in range(5):
            prog.run(("redeem", 0, [("pool", k)], "one"))
        prog.run(("batch", 0, [0, 1, 2], 2))
        prog.run(("redeem", 0, [("pool", len(prog.pool) - 1)], "one"))
        native_side = prog.sides[0]
        stats = native_side.table.stats()
        assert stats["frames_served"] == 6 and stats["fds_served"] == 8, stats


def test_a_refill_brings_the_same_tokens_on_both_planes_and_the_native_reader_serves_them() -> None:
    """A ``Redeem`` with ``refill`` is read by Python on both sides (the native reader serves only frames of
    nothing but tokens); the tokens it brings are then redeemed in C, and both sides agree throughout."""
    with _two_brokers(11) as prog:
        prog.run(("get", 0, 0, 1))
        prog.run(("refill", 0, [("pool", 0)], 8))
        assert len(prog.pool) == 1 + 8
        served = prog.sides[0].table.stats()["frames_served"]
        for k in range(1, 9):
            prog.run(("redeem", 0, [("pool", k)], "one"))
        assert prog.sides[0].table.stats()["frames_served"] == served + 8
        prog.run(("refill", 0, [("pool", 1)], 1025))  # out of range: refused, nothing spent
        prog.run(("refill", 0, [("pool", 0)], 2**32 - 1))
        assert len(prog.pool) == 9


def test_a_native_send_the_socket_does_not_take_is_queued_in_order() -> None:
    """With the client not reading, the native reader's Deliver frames go to the connection's queue (with
    duplicates of the descriptors) once the socket is full, and arrive whole and in order when it reads."""
    with _two_brokers(11) as prog:
        prog.run(("get", 0, 0, 8))
        for side in prog.sides:
            conn, _ = side.slots[0]
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        big = [("pool", k) for k in range(8)]
        prog.run(("redeem", 0, big, "many"))
        assert prog.sides[0].out == prog.sides[1].out


# -- the client's half: the extension's exchange against conduit/lean.py's ----------------------------------------

answer = st.one_of(
    st.binary(max_size=64),
    st.builds(
        lambda n, tail, tok, extra: _deliver(n, tok, tail) + extra,
        st.integers(1, 3),
        st.binary(max_size=40),
        st.sampled_from(["ours", "other", "none"]),
        st.sampled_from([b"", b"\x00", b"\x00\x00\x00\x02\x52\x00"]),
    ),
)
TOKEN = bytes(range(32))


def _deliver(n: int, which: str, tail: bytes) -> bytes:
    tok = TOKEN if which == "ours" else bytes(32) if which == "other" else b""
    items = []
    for i in range(n):
        item = cpb.DeliverItem(token=tok if i == 0 else b"", operation=pb.OPERATION_GET, name="x", revision=i)
        items.append(item)
    body = cpb.ConduitFrame(fd_count=n, deliver=cpb.Deliver(items=items)).SerializeToString() + tail
    return _frame(body)


def _exchange(impl: str, reply: bytes, nfds: int, count: int) -> Any:
    from fdbroker.conduit import lean

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.setblocking(False)
    fds = [_memfd(100 + k) for k in range(nfds)]
    try:
        if fds:
            socket.send_fds(b, [reply or b"\x00"], fds)
        elif reply:
            b.sendall(reply)
        buf = bytearray(65540)
        data = lean.redeem_frame(TOKEN)
        if impl == "c":
            assert NATIVE is not None
            got = NATIVE.exchange(a.fileno(), data, TOKEN, count, buf, 0.005)
        else:
            got = lean.exchange(a, data, TOKEN, count, buf, 0.005)
        assert b.recv(100) == data  # the Redeem went out whole
        if got is None or len(got) != 2:
            if (
                got is not None and len(got) == 3 and got[0] >= 0
            ):  # a read for the decoder: close what it brought
                n, anc, flags = got
                for _, _, cdata in anc:
                    for fd in struct.unpack(f"{len(cdata) // 4}i", cdata[: len(cdata) // 4 * 4]):
                        os.close(fd)
                return ("read", n, bytes(buf[:n]), [(lv, ty, len(cd)) for lv, ty, cd in anc], flags)
            return got
        got_fds, body = got
        which = [os.read(fd, 8) for fd in got_fds]
        for fd in got_fds:
            os.close(fd)
        return ("deliver", which, body)
    finally:
        for fd in fds:
            os.close(fd)
        a.close()
        b.close()


@settings(max_examples=EXAMPLES * 2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reply=answer, nfds=st.integers(0, 3), count=st.integers(1, 3))
def test_native_and_python_exchanges_recognise_the_same_answers(reply: bytes, nfds: int, count: int) -> None:
    assert _exchange("c", reply, nfds, count) == _exchange("py", reply, nfds, count)
