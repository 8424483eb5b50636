"""Descriptor hoarding on the conduit (issue 7, section 3): one connection, or many connections of one uid, must
not be able to fill the broker's descriptor table by holding descriptors in frames that never complete.

* The decoder holds at most the descriptors of the one frame in progress: descriptors that arrive with a read in
  which no frame starts are closed and the stream is given up (property tests on :class:`FrameDecoder`).
* The hoarding attack for real, as uid 65534: a length prefix, then 1-byte sends of 253 descriptors each.
* A per-uid cap on descriptors in flight (``max_fds_in_flight_per_uid``): a uid's connections stop reading at the
  cap, other uids are served, frames already started still finish, and everything is released when the attacker
  goes.
"""

from __future__ import annotations

import itertools
import json
import os
import select
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secutil import custom_broker, new_run_dir, unprivileged_python

from fdbroker.conduit import SCM_MAX_FD, ConduitError, ErrType, Frame, FrameDecoder, encode_frame
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import conduit_pb2 as cpb

# -- the decoder's rule, as properties ---------------------------------------------------------------------------

# Never opened: the decoder only moves descriptor numbers around, and a Recorder stands in for closing them.
_fake_fds = itertools.count(1_000_000)


class Recorder:
    """A decoder's ``close`` callable that records what it is given instead of closing anything."""

    def __init__(self) -> None:
        self.closed: list[int] = []

    def __call__(self, fds: list[int]) -> None:
        self.closed.extend(fds)


messages = st.one_of(
    st.builds(lambda n: cpb.ConduitFrame(ping=cpb.Ping(nonce=n)), st.integers(0, 2**64 - 1)),
    st.builds(
        lambda toks: cpb.ConduitFrame(deposit=cpb.Deposit(tokens=toks)),
        st.lists(st.binary(min_size=1, max_size=40), max_size=5),
    ),
    st.builds(lambda text: cpb.ConduitFrame(error=cpb.Error(code=3, message=text)), st.text(max_size=200)),
)
fd_counts = st.one_of(st.integers(0, 3), st.just(SCM_MAX_FD), st.integers(0, SCM_MAX_FD))


def kernel_reads(
    length: int, cuts: set[int], sends: list[tuple[int, int, list[int]]]
) -> list[tuple[int, int, list[int]]]:
    """How ``recvmsg`` hands out a stream of ``length`` bytes: ``sends`` are the ``(start, end, fds)`` of the
    ``sendmsg`` calls that carried descriptors, ``cuts`` where the reader's buffer happened to end a read.

    As the kernel does on a Unix stream socket: a read returns the descriptors of the send whose first byte it
    reads, and ends within that send (it may begin with bytes of earlier sends). So each read gets the
    descriptors of at most one send.
    """
    cuts = {c for c in cuts if 0 < c < length}
    for start, end, _ in sorted(sends):
        read_end = min((c for c in cuts if c > start), default=length)
        if read_end > end:
            cuts.add(end)
    bounds = [0, *sorted(cuts), length]
    reads = []
    for a, b in itertools.pairwise(bounds):
        fds = [fd for start, _, send_fds in sends if a <= start < b for fd in send_fds]
        reads.append((a, b, fds))
    return reads


def feed_all(
    d: FrameDecoder, wire: bytes, reads: list[tuple[int, int, list[int]]]
) -> tuple[list[Frame], list[ConduitError], ConduitError | None, int]:
    """Feed every read; stop at a fatal error. Returns frames, non-fatal errors, the fatal error (or None) and
    the index of the read that raised it. Checks after every read that at most 253 descriptors are held."""
    frames: list[Frame] = []
    problems: list[ConduitError] = []
    for i, (a, b, fds) in enumerate(reads):
        try:
            out = d.feed(wire[a:b], fds)
        except ConduitError as err:
            assert d.pending_fds == 0
            return frames, problems, err, i
        for item in out:
            if isinstance(item, Frame):
                frames.append(item)
            else:
                problems.append(item)
        assert d.pending_fds <= SCM_MAX_FD
    return frames, problems, None, -1


def build(stream: list[tuple[cpb.ConduitFrame, int]]) -> tuple[bytes, list[int], list[list[int]]]:
    wires = [encode_frame(msg, n) for msg, n in stream]
    starts = list(itertools.accumulate((len(w) for w in wires), initial=0))
    return b"".join(wires), starts, [[next(_fake_fds) for _ in range(n)] for _, n in stream]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages, fd_counts), min_size=1, max_size=6), st.data())
def test_property_descriptors_on_first_bytes_decode_exactly(
    stream: list[tuple[cpb.ConduitFrame, int]], data: st.DataObject
) -> None:
    wire, starts, fds = build(stream)
    cuts = set(data.draw(st.lists(st.integers(1, max(1, len(wire) - 1)), max_size=12)))
    # Each frame with descriptors goes out with a sendmsg of its own, its descriptors on its first byte.
    sends = [(starts[i], starts[i + 1], fds[i]) for i in range(len(stream)) if fds[i]]
    rec = Recorder()
    d = FrameDecoder(close=rec)
    frames, problems, fatal, _ = feed_all(d, wire, kernel_reads(len(wire), cuts, sends))
    assert fatal is None and problems == []
    assert [f.message for f in frames] == [m for m, _ in stream]
    assert [f.fds for f in frames] == fds, "each frame got exactly its own descriptors, in order"
    assert rec.closed == []
    assert d.pending_bytes == 0 and d.pending_fds == 0
    frames[0].close_fds()  # a frame hands its descriptors to the decoder's close callable
    assert rec.closed == fds[0]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(messages, fd_counts), min_size=1, max_size=6), st.data())
def test_property_descriptors_on_any_other_byte_are_closed(
    stream: list[tuple[cpb.ConduitFrame, int]], data: st.DataObject
) -> None:
    wire, starts, fds = build(stream)
    # A send that starts inside frame j (not on its first byte) carries descriptors too.
    j = data.draw(st.integers(0, len(stream) - 1))
    p = data.draw(st.integers(starts[j] + 1, starts[j + 1] - 1))
    bad = [next(_fake_fds) for _ in range(data.draw(st.integers(1, SCM_MAX_FD)))]
    cuts = set(data.draw(st.lists(st.integers(1, len(wire) - 1), max_size=12)))
    sends = [(starts[i], p if i == j else starts[i + 1], fds[i]) for i in range(len(stream)) if fds[i]]
    sends.append((p, starts[j + 1], bad))
    reads = kernel_reads(len(wire), cuts, sends)
    rec = Recorder()
    d = FrameDecoder(close=rec)
    frames, problems, fatal, at = feed_all(d, wire, reads)

    given_fds = [fd for _, _, r in reads[: at + 1 if fatal else len(reads)] for fd in r]
    returned = [fd for f in frames for fd in f.fds]
    assert sorted(returned + rec.closed) == sorted(given_fds), "every descriptor is returned or closed, once"
    assert set(bad) <= set(rec.closed), "the descriptors on a byte other than a frame's first were closed"
    # Frames decoded before any fatal error are the stream's own, each with exactly its descriptors.
    assert [f.message for f in frames] == [m for m, _ in stream[: len(frames)]]
    assert [f.fds for f in frames] == fds[: len(frames)]
    a, b, _ = next(r for r in reads if r[0] <= p < r[1])
    frame_starts_in_read = any(a <= s < b for s in starts[:-1])
    if frame_starts_in_read:
        # Only possible when frame j carries no descriptors: the read that begins it glued on the bad send, so
        # the descriptors are that read's, unclaimed: reported, closed, and the stream goes on.
        assert fatal is None and any(e.type is ErrType.BAD_CTRL_MESG for e in problems)
        assert [f.message for f in frames] == [m for m, _ in stream]
    else:
        assert fatal is not None and fatal.type is ErrType.BAD_FRAME, (fatal, problems)
        assert "unsolicited" in fatal.message and "drop the connection" in fatal.message
        assert reads[at][0] == a, "the read that brought them raised"
        with pytest.raises(ConduitError):
            d.feed(b"\x00", [next(_fake_fds)])  # broken for good, and closes what it is given
        assert d.pending_fds == 0


def test_decoder_hoarding_pattern_is_refused_at_the_first_unsolicited_batch() -> None:
    """The attack of issue 7 against the decoder alone: today it would hold 253 more per byte."""
    rec = Recorder()
    d = FrameDecoder(close=rec)
    assert d.feed(b"\x00\x00\xff\xff") == []  # a length prefix announcing 65535 bytes
    assert d.frame_remaining == 65535
    batch = [next(_fake_fds) for _ in range(SCM_MAX_FD)]
    with pytest.raises(ConduitError) as ei:
        d.feed(b"x", batch)
    assert ei.value.type is ErrType.BAD_FRAME and "unsolicited" in ei.value.message
    assert rec.closed == batch and d.pending_fds == 0 and d.pending_bytes == 0


def test_decoder_keeps_the_tail_of_one_frame_plus_the_start_of_the_next() -> None:
    rec = Recorder()
    d = FrameDecoder(close=rec)
    a = encode_frame(cpb.ConduitFrame(ping=cpb.Ping(nonce=1)), 2)
    b = encode_frame(cpb.ConduitFrame(ping=cpb.Ping(nonce=2)), 3)
    fa = [next(_fake_fds) for _ in range(2)]
    fb = [next(_fake_fds) for _ in range(3)]
    assert d.feed(a[:2], fa) == []  # inside a's length prefix
    assert d.frame_remaining == 2
    assert d.feed(a[2:5]) == []
    assert d.frame_remaining == len(a) - 5
    out = d.feed(a[5:] + b[:1], fb)  # a's tail and b's first byte, with b's descriptors
    assert [(f.message.ping.nonce, f.fds) for f in out if isinstance(f, Frame)] == [(1, fa)]
    assert d.pending_fds == 3
    out = d.feed(b[1:])
    assert [(f.message.ping.nonce, f.fds) for f in out if isinstance(f, Frame)] == [(2, fb)]
    assert rec.closed == []


def test_decoder_refuses_more_than_253_descriptors_in_one_read() -> None:
    rec = Recorder()
    d = FrameDecoder(close=rec)
    batch = [next(_fake_fds) for _ in range(SCM_MAX_FD + 1)]
    with pytest.raises(ConduitError) as ei:
        d.feed(encode_frame(cpb.ConduitFrame(ping=cpb.Ping()), 3), batch)
    assert ei.value.type is ErrType.BAD_FRAME
    assert rec.closed == batch


# -- against a real broker, as uid 65534 -------------------------------------------------------------------------

CAP_SLACK = 40  # descriptors a broker opens of its own during a test: connections, gRPC, the closer's threads


@pytest.fixture(scope="module")
def nobody_python() -> list[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root to run the attacker as uid 65534")
    cmd = unprivileged_python()
    if cmd is None:
        pytest.skip("cannot run a Python with fdbroker importable as uid 65534")
    return cmd


class Attacker:
    """A Python program run as uid 65534 that reports JSON lines and waits for a word on stdin between steps."""

    def __init__(self, prefix: list[str], code: str, run_dir: Path) -> None:
        cmd = [*prefix[:-1], f"RUN={run_dir}", prefix[-1], "-c", ATTACK_LIB + code]
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/"
        )

    def line(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        text = self.proc.stdout.readline()
        if not text:
            assert self.proc.stderr is not None
            raise AssertionError(f"attacker exited ({self.proc.wait()}): {self.proc.stderr.read()}")
        report: dict[str, object] = json.loads(text)
        return report

    def report_ready(self, timeout: float = 0.01) -> bool:
        """Is a report line waiting to be read (waits up to ``timeout`` seconds)?"""
        assert self.proc.stdout is not None
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def say(self, word: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def finish(self) -> None:
        if self.proc.poll() is None:
            try:
                self.say("exit")
            except BrokenPipeError:
                pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


ATTACK_LIB = """
import json, os, select, socket, struct, sys
from fdbroker.conduit.frames import FrameDecoder, encode_frame
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

def report(**kw):
    print(json.dumps(kw), flush=True)

def wait_word():
    return sys.stdin.readline().strip()

class Conn:
    def __init__(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(os.environ["RUN"] + "/conduit.sock")
        self.dec = FrameDecoder()
        self.queue = []
        self.eof = False
        assert self.next(30).WhichOneof("body") == "welcome"

    def next(self, timeout):
        # the next frame from the broker; None at EOF or after timeout seconds
        while not self.queue and not self.eof:
            if not select.select([self.sock], [], [], timeout)[0]:
                return None
            try:
                data, fds, _, _ = socket.recv_fds(self.sock, 1 << 17, 253)
            except ConnectionResetError:
                data, fds = b"", []
            for fd in fds:
                os.close(fd)
            if not data:
                self.eof = True
                break
            for item in self.dec.feed(data):
                if isinstance(item, Exception):
                    raise item
                self.queue.append(item.message)
        return self.queue.pop(0) if self.queue else None

r, w = os.pipe()
FDS = [w] + [os.dup(w) for _ in range(252)]   # 253 descriptors: the most one sendmsg carries
"""

HOARD = """
c = Conn()
c.sock.sendall(struct.pack(">I", 65536))    # a frame of 64 KiB begins ...
sent, err = 0, None
for _ in range(80):                          # ... and 80 x 253 descriptors follow, one byte at a time
    try:
        socket.send_fds(c.sock, [b"x"], FDS)
        sent += 1
    except OSError as e:
        err = e.errno
        break
errors, eof = [], False
while True:
    f = c.next(20)
    if f is None:
        eof = c.eof
        break
    if f.WhichOneof("body") == "error":
        errors.append([f.error.code, f.error.message])
report(sent=sent, errno=err, errors=errors, eof=eof)
wait_word()
"""


def put_get_delete(broker: BrokerProcess, name: str) -> None:
    r, w = os.pipe()
    try:
        with broker.client() as c:
            c.put(name, w)
            c.get_fd(name).close()
            c.delete(name)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.slow
def test_hoarding_attack_is_cut_off_and_others_are_served(nobody_python: list[str]) -> None:
    # On main the decoder kept every batch of the incomplete frame: the broker's table filled up to its
    # RLIMIT_NOFILE (recvmsg then failed with MSG_CTRUNC), and the attacker was never cut off.
    with custom_broker(["--socket-mode", "0666"], run_dir=new_run_dir()) as b:
        assert b.baseline is not None
        base = b.baseline
        peak = base
        done = threading.Event()
        served: list[str] = []
        failures: list[BaseException] = []

        def other_client() -> None:  # another uid's puts and gets, all through the attack
            i = 0
            while not done.is_set():
                try:
                    put_get_delete(b, f"hoard/other{i}")
                except BaseException as exc:  # reported below, with the rest
                    failures.append(exc)
                    return
                served.append(f"hoard/other{i}")
                i += 1

        other = threading.Thread(target=other_client)
        other.start()
        attacker = Attacker(nobody_python, HOARD, b.run_dir)
        try:
            while attacker.proc.poll() is None and not attacker.report_ready():
                peak = max(peak, b.fd_count())
            rep = attacker.line()
            peak = max(peak, b.fd_count())
            put_get_delete(b, "hoard/after")  # and with the attacker still there
        finally:
            done.set()
            other.join()
            attacker.finish()
        assert not failures and served, (failures, len(served))
        # The connection was dropped with a clear error after at most two batches.
        assert rep["eof"] is True, rep
        errors = rep["errors"]
        assert isinstance(errors, list) and errors, rep
        code, message = errors[-1]
        assert code == 3 and "unsolicited" in message and "drop the connection" in message, errors
        # At most one frame's descriptors were ever held (plus what the broker opens of its own).
        assert peak <= base + 2 * SCM_MAX_FD + CAP_SLACK, (peak, base)
        wait_until(lambda: b.fd_count() == base, what="the broker back at its baseline")
        assert "unsolicited" in b.log()


HOLD = """
conns = [Conn() for _ in range(int(os.environ["CONNS"]))]
msg = cpb.ConduitFrame(deposit=cpb.Deposit(tokens=[bytes([i % 256]) * 32 for i in range(253)]))
wire = encode_frame(msg, 253)
for c in conns:                             # each connection starts a frame with 253 descriptors ...
    socket.send_fds(c.sock, [wire[:10]], FDS)
report(held=len(conns))
if wait_word() == "finish":                 # ... and, if told, finishes it
    for c in conns:
        c.sock.sendall(wire[10:])
    answers = []
    for c in conns:
        f = c.next(60)
        answers.append(None if f is None else f.WhichOneof("body"))
    report(answers=answers)
    wait_word()
"""


@pytest.mark.slow
@pytest.mark.parametrize("finish", [True, False], ids=["frames-finished", "attacker-hangs-up"])
def test_per_uid_cap_pauses_a_uids_connections(
    nobody_python: list[str], tmp_path: Path, finish: bool
) -> None:
    # On main nothing capped a uid: four connections pinned 4 x 253 descriptors.
    cap = 300
    policy = tmp_path / "policy.toml"
    policy.write_text(f"[limits]\nmax_fds_in_flight_per_uid = {cap}\n")
    conns = 4
    args = ["--socket-mode", "0666", "--policy", str(policy)]
    with custom_broker(args, run_dir=new_run_dir()) as b:
        assert b.baseline is not None
        base = b.baseline
        attacker = Attacker([*nobody_python[:-1], f"CONNS={conns}", nobody_python[-1]], HOLD, b.run_dir)
        try:
            assert attacker.line() == {"held": conns}
            # Reads go on while the uid is below its cap: the first two frames in progress are taken in ...
            wait_until(lambda: b.fd_count() >= base + 2 * SCM_MAX_FD, what="two frames held")
            wait_until(lambda: "pausing reads" in b.log(), what="the uid's connections paused")
            # ... another uid is served meanwhile ...
            put_get_delete(b, "cap/other")
            # ... and the rest waits in the kernel, not in the broker's table.
            held = b.fd_count()
            assert held <= base + cap + 2 * SCM_MAX_FD + CAP_SLACK, (held, base)
            assert held < base + 3 * SCM_MAX_FD, (held, base)
            if finish:
                # Frames already started still finish at the cap (no deadlock), and then the others are read.
                attacker.say("finish")
                rep = attacker.line()
                assert rep["answers"] == ["deposited"] * conns, rep  # every made-up token refused
        finally:
            attacker.finish()
        wait_until(lambda: b.fd_count() == base, what="the broker back at its baseline")


def test_policy_limit_is_loaded_and_range_checked(tmp_path: Path) -> None:
    from fdbroker.broker.policy import Limits, Policy, PolicyError

    assert Limits().max_fds_in_flight_per_uid == 1024
    f = tmp_path / "p.toml"
    f.write_text("[limits]\nmax_fds_in_flight_per_uid = 300\n")
    assert Policy.load(f, broker_uid=0).limits.max_fds_in_flight_per_uid == 300
    f.write_text("[limits]\nmax_fds_in_flight_per_uid = 0\n")
    with pytest.raises(PolicyError, match="max_fds_in_flight_per_uid must be a positive integer"):
        Policy.load(f, broker_uid=0)
