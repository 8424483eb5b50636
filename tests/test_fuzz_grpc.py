"""A bounded gRPC fuzz of every RPC of ``fdbroker.v1.FdBroker``: malformed input is a clean error, never a crash.

The RPCs come from the service descriptor, so a new RPC is fuzzed without touching this file. For each one,
two tests against a fresh broker:

* ``test_rpc_fuzz_requests``: plausible requests with a few hostile fields (tests/fuzzutil.py): huge,
  negative and out-of-range Durations and Timestamps, nested and garbage page tokens, long and malformed names, odd labels
  and selectors, unknown enum values, big repeated fields, unknown fields appended; called anonymously, with a
  real session (a raw conduit of our own), a made-up one, one that has ended and an odd-looking one.
* ``test_rpc_fuzz_undecodable``: bodies that are not the request message at all (wire-level garbage, damaged
  serializations, noise), sent through a generic ``unary_unary``/``stream_stream`` with identity serializers.

Every call must end with a status other than UNKNOWN and INTERNAL (malformed input is INVALID_ARGUMENT), with
a response that parses. A request carrying an invalid Duration or Timestamp (outside the protobuf ranges) must
not succeed. A put or check-in that succeeds is completed on the conduit with a real descriptor: the broker
must answer the deposit (accepted, or refused with a clean code), and whatever it stored must not break
``List`` or ``Stat`` for anybody. After the run the broker is alive and holds no more descriptors than its
entries account for.

Scale: ``FDBROKER_FUZZ_EXAMPLES`` examples per RPC and test (default 150 for requests, a third of that for
undecodable bodies). Hypothesis draws a seed per case and the seeded generators of tests/fuzzutil.py build the
request; a failure is shrunk field by field (``Target.minimize``) and reported as the smallest request that
fails the same way, with the seed and Hypothesis' reproduction blob.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import select
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from fuzzutil import (
    FuzzContext,
    RandomChooser,
    describe_frame,
    fill_message,
    gen_wire,
    is_repeated,
    malformed_times,
    mutate,
    unknown_fields,
)
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from secutil import Control, RawConduit, new_run_dir

from fdbroker.conduit.frames import encode_frame
from fdbroker.testing import BrokerProcess, wait_until
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

EXAMPLES = int(os.environ.get("FDBROKER_FUZZ_EXAMPLES", "150"))
SERVICE = pb.DESCRIPTOR.services_by_name["FdBroker"]
METHODS = {m.name: m for m in SERVICE.methods}
BAD = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
TOKEN_TTL = 1.0
CALL_TIMEOUT = 10.0
# A lease may wait for its deadline (the broker answers DEADLINE_EXCEEDED 0.5 s before it): keep that short.
WAITING_TIMEOUT = 1.0
FIXTURE_NAMES = ("fz/a", "fz/b/c", "web/https")
# Weighted towards a real session (it reaches furthest).
SESSION_KINDS = ("real", "none", "real", "made-up", "real", "ended", "none", "odd")
HANDOFF_DEPOSITS = (pb.OPERATION_PUT, pb.OPERATION_CHECKIN)

FUZZ_SETTINGS = settings(
    deadline=None,
    database=None,
    print_blob=True,
    # No shrinking of the seed (a smaller seed is not a simpler request): Target.minimize shrinks the request.
    phases=(Phase.explicit, Phase.generate),
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
)


class Finding(AssertionError):
    """A failed check; ``kind`` says which (a smaller request must fail the same way to replace it)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class Case:
    """One call: the method, who calls, the request messages (several for a client stream) and any bytes
    appended to their serializations; or, for undecodable cases, just bodies."""

    def __init__(
        self,
        method: str,
        session: str,
        seed: int,
        messages: list[Message] | None = None,
        trailing: list[bytes] | None = None,
        raw: list[bytes] | None = None,
    ) -> None:
        self.method = method
        self.session = session
        self.seed = seed
        self.messages = messages or []
        self.trailing = trailing or [b"" for _ in self.messages]
        self.raw = raw

    @property
    def bodies(self) -> list[bytes]:
        if self.raw is not None:
            return self.raw
        return [m.SerializeToString() + t for m, t in zip(self.messages, self.trailing, strict=True)]

    @property
    def bad_times(self) -> list[str]:
        return [bad for m in self.messages for bad in malformed_times(m)]

    def replace(self, messages: list[Message] | None = None, raw: list[bytes] | None = None) -> Case:
        if raw is not None:
            return Case(self.method, self.session, self.seed, raw=raw)
        assert messages is not None
        trailing = self.trailing[: len(messages)] + [b""] * (len(messages) - len(self.trailing))
        return Case(self.method, self.session, self.seed, messages, trailing)

    def __repr__(self) -> str:
        if self.raw is not None:
            shown = ", ".join(
                b[:200].hex() + (f"...(+{len(b) - 200} bytes)" if len(b) > 200 else "") for b in self.raw
            )
            shown = f"bytes [{shown}]"
        else:
            shown = " | ".join(f"{{{describe_frame(m, 600)}}}" for m in self.messages) or "(no messages)"
            if any(self.trailing):
                shown += f" + appended {[t.hex() for t in self.trailing]}"
        return f"{self.method}(session={self.session}, {shown}) [seed {self.seed}]"


def request_class(m: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(m.input_type)


def response_class(m: MethodDescriptor) -> type[Message]:
    return message_factory.GetMessageClass(m.output_type)


# Hypothesis draws a seed; fuzzutil's generators build the request from the seed. Hypothesis'
# own choice sequences explore nested protobuf poorly (measured: not one out-of-range TTL in 200 Put requests),
# while the seeded generators reach the hostile values by design; Target.minimize then shrinks a failing
# request field by field.


@st.composite
def request_cases(draw: Any, method: str, ctx: FuzzContext) -> Case:
    seed = draw(st.integers(0, 2**64 - 1))
    ch = RandomChooser(random.Random(seed))
    session = ch.choice(SESSION_KINDS)
    m = METHODS[method]
    n = ch.integer(0, 3) if m.client_streaming else 1
    messages = [fill_message(ch, ctx, request_class(m)(), depth=3) for _ in range(n)]
    trailing = [unknown_fields(ch) if ch.chance(0.1) else b"" for _ in messages]
    return Case(method, session, seed, messages, trailing)


@st.composite
def undecodable_cases(draw: Any, method: str) -> Case:
    seed = draw(st.integers(0, 2**64 - 1))
    ch = RandomChooser(random.Random(seed))
    session = ch.choice(SESSION_KINDS)
    m = METHODS[method]
    bodies = []
    for _ in range(ch.integer(1, 3) if m.client_streaming else 1):
        kind = ch.integer(0, 2)
        if kind == 0:
            body = gen_wire(ch, m.input_type)
        elif kind == 1:
            valid = fill_message(ch, FuzzContext(names=list(FIXTURE_NAMES)), request_class(m)(), depth=2)
            body = mutate(ch, valid.SerializeToString() or b"\x08\x01")
        else:
            body = ch.rng.randbytes(ch.integer(1, 200))
        bodies.append(body)
    return Case(method, session, seed, raw=bodies)


def _reductions(case: Case) -> Iterator[Case]:
    """Smaller versions of ``case``: a message or field dropped, a repeated item or map key removed, a chunk of
    raw bytes cut; biggest steps first."""
    if case.raw is not None:
        for i, body in enumerate(case.raw):
            n = len(body) // 2
            while n >= 1:
                for start in range(0, len(body), n):
                    smaller = body[:start] + body[start + n :]
                    if smaller != body:
                        yield case.replace(raw=[*case.raw[:i], smaller, *case.raw[i + 1 :]])
                n //= 2
        return
    msgs = case.messages
    if METHODS[case.method].client_streaming:
        for i in range(len(msgs)):
            yield case.replace(messages=msgs[:i] + msgs[i + 1 :])
    if any(case.trailing):
        yield Case(case.method, case.session, case.seed, msgs)
    for i, m in enumerate(msgs):
        for smaller_msg in _smaller_messages(m):
            yield case.replace(messages=[*msgs[:i], smaller_msg, *msgs[i + 1 :]])


def _smaller_messages(msg: Message) -> Iterator[Message]:
    for f, _ in msg.ListFields():
        cut = type(msg)()
        cut.CopyFrom(msg)
        cut.ClearField(f.name)
        yield cut
    for f, value in msg.ListFields():
        repeated = is_repeated(f)
        is_map = f.message_type is not None and f.message_type.GetOptions().map_entry
        if is_map:
            for key in list(value):
                cut = type(msg)()
                cut.CopyFrom(msg)
                del getattr(cut, f.name)[key]
                yield cut
        elif repeated and len(value) > 1:
            for i in range(len(value)):
                cut = type(msg)()
                cut.CopyFrom(msg)
                del getattr(cut, f.name)[i]
                yield cut
        if f.message_type is not None and not is_map:
            items = list(value) if repeated else [value]
            for i, item in enumerate(items):
                for smaller in _smaller_messages(item):
                    cut = type(msg)()
                    cut.CopyFrom(msg)
                    target = getattr(cut, f.name)[i] if repeated else getattr(cut, f.name)
                    target.CopyFrom(smaller)
                    yield cut


class Target:
    """A broker for one test, a session of our own on a raw conduit, a few entries to aim at, and the checks
    that run after each call. A broker left broken (``List`` failing, or dead) is replaced before the next
    case, so no case is blamed for what an earlier one did; a case that broke it without failing its own
    checks is reported."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.last_case: Case | None = None
        self.quiet = False  # while minimizing: breakage is expected, do not report it again
        self.granted: set[str] = set()  # lease ids our session got from a case
        self._start()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def _start(self) -> None:
        self.broker = BrokerProcess.start(new_run_dir(), args=["--token-ttl", str(TOKEN_TTL)])
        self.broker.settle_baseline()
        run_dir = self.broker.run_dir
        self.channel = grpc.insecure_channel(f"unix://{run_dir / 'control.sock'}")
        self.ctl = Control(run_dir)
        self.conduit = RawConduit(run_dir)
        with RawConduit(run_dir) as gone:
            self.ended_session = gone.session_id
        wait_until(lambda: self.info().sessions == 1, what="the ended session to end")
        for name in FIXTURE_NAMES:
            self._put(name)
        lease = self.ctl.call(
            "Lease", pb.LeaseRequest(name="fz/b/c", ttl={"seconds": 3600}), self.conduit.session_id
        )
        self.drain()
        page = self.ctl.call("List", pb.ListRequest(page_size=1))
        self.ctx = FuzzContext(
            names=[*FIXTURE_NAMES, "fz/missing"],
            lease_ids=[lease.lease_id],
            page_tokens=[page.next_page_token],
        )
        # Our channel and conduit are open now: the broker's count is its baseline, + 2, + what it holds.
        assert self.broker.baseline is not None
        self.own_fds = self.broker._settled(lambda n: True) - self.broker.baseline - self.info().entries

    def _stop(self) -> None:
        self.channel.close()
        self.ctl.close()
        self.conduit.close()
        self.broker.stop()
        with contextlib.suppress(OSError):
            self.broker.log_path.unlink()

    def close(self) -> None:
        self._stop()

    def restart(self, why: str) -> None:
        if not self.quiet:
            self.problems.append(
                f"the broker was left broken ({why}) after {self.last_case!r}, which passed its own checks; "
                f"its log ended:\n{self.broker.log()[-3000:]}"
            )
        self._stop()
        self._start()

    # -- helpers ---------------------------------------------------------------------------------------------

    def info(self) -> pb.GetInfoResponse:
        resp: pb.GetInfoResponse = self.ctl.call("GetInfo", pb.GetInfoRequest())
        return resp

    def _put(self, name: str) -> None:
        tok = self.ctl.put_token(self.conduit.session_id, name, replace=True)
        results = self.deposit([tok])
        assert results and not results[0].HasField("error"), f"fixture put of {name} failed: {results}"

    def drain(self, timeout: float = 0.0) -> list[cpb.ConduitFrame]:
        """Frames waiting on our conduit (their descriptors closed)."""
        out: list[cpb.ConduitFrame] = []
        while True:
            if not self.conduit.queue:
                ready, _, _ = select.select([self.conduit.sock], [], [], timeout)
                if not ready:
                    return out
            try:
                f = self.conduit.recv(timeout=1.0)
            except (TimeoutError, EOFError, ConnectionResetError):
                return out
            f.close_fds()
            out.append(f.message)
            timeout = 0.0

    def deposit(self, tokens: list[bytes]) -> list[cpb.DepositResult] | None:
        """Deposit /dev/null for each token; the broker's results, or None if it never answered."""
        fds = [os.open("/dev/null", os.O_RDONLY) for _ in tokens]
        try:
            frame = encode_frame(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=tokens)), len(fds))
            self.conduit.send_raw(frame, fds)
        finally:
            for fd in fds:
                os.close(fd)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            for f in self.drain(timeout=0.2):
                if f.WhichOneof("body") == "deposited":
                    return list(f.deposited.results)
                if f.WhichOneof("body") == "error" and not f.error.token:
                    return [cpb.DepositResult(error=f.error)]
        return None

    def metadata(self, kind: str) -> list[tuple[str, str]]:
        session = {
            "none": None,
            "real": self.conduit.session_id,
            "made-up": secrets.token_urlsafe(18),
            "ended": self.ended_session,
            "odd": "x" * 900 + " !\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~",
        }[kind]
        return [("fdbroker-session", session)] if session else []

    # -- one call --------------------------------------------------------------------------------------------

    def invoke(self, case: Case) -> tuple[grpc.StatusCode, str, list[bytes]]:
        m = METHODS[case.method]
        path = f"/{SERVICE.full_name}/{m.name}"
        md = self.metadata(case.session)
        waits = m.server_streaming or "Lease" in m.name
        timeout = WAITING_TIMEOUT if waits else CALL_TIMEOUT
        ident: Any = None  # no (de)serializers: bytes go as they are
        bodies = case.bodies
        try:
            if m.client_streaming and m.server_streaming:
                call = self.channel.stream_stream(path, ident, ident)
                return grpc.StatusCode.OK, "", list(call(iter(bodies), metadata=md, timeout=timeout))
            if m.client_streaming:
                call = self.channel.stream_unary(path, ident, ident)
                return grpc.StatusCode.OK, "", [call(iter(bodies), metadata=md, timeout=timeout)]
            if m.server_streaming:
                stream = self.channel.unary_stream(path, ident, ident)(
                    bodies[0], metadata=md, timeout=timeout
                )
                try:
                    first = next(stream, None)  # an endless stream (Watch): its first answer says enough
                finally:
                    stream.cancel()
                return grpc.StatusCode.OK, "", [first] if first is not None else []
            call = self.channel.unary_unary(path, ident, ident)
            return grpc.StatusCode.OK, "", [call(bodies[0], metadata=md, timeout=timeout)]
        except grpc.RpcError as err:
            code = err.code()
            if code == grpc.StatusCode.CANCELLED and m.server_streaming:
                return grpc.StatusCode.OK, "", []
            return code, err.details() or "", []

    def check(self, case: Case) -> None:
        """Run ``case`` and its checks; on a failure, shrink the request and report the smallest that fails
        the same way."""
        self.ensure_healthy()
        try:
            self.run_case(case)
        except Finding as finding:
            note(f"failing case: {case!r}")
            small = self.minimize(case, finding.kind)
            raise Finding(
                finding.kind, f"{finding.detail}\n  smallest request that fails this way: {small!r}"
            ) from None
        self.last_case = case

    def run_case(self, case: Case) -> None:
        m = METHODS[case.method]
        code, details, responses = self.invoke(case)
        if code in BAD:
            raise Finding(f"answered {code.name}", f"{case.method}: {details[:1500]}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not (m.server_streaming or "Lease" in m.name):
            raise Finding("stalled", f"{case.method} did not answer within {CALL_TIMEOUT}s")
        for f in self.drain():
            if f.WhichOneof("body") == "error" and f.error.code in (2, 13):
                raise Finding("conduit error frame", describe_frame(f))
        if code != grpc.StatusCode.OK:
            return
        parsed = []
        for r in responses:
            msg = response_class(m)()
            try:
                msg.ParseFromString(r)
            except DecodeError as err:
                raise Finding("unparsable response", f"{case.method}: {err}") from None
            parsed.append(msg)
        if case.session == "real":  # leases granted now are released before the next case
            self.granted.update(lid for r in parsed for lid in _lease_ids(r))
        # What a client does next goes first: what it does to the broker matters more than the acceptance.
        if case.session == "real":
            self.complete_handoffs(case, parsed)
        self.check_readable()
        if case.bad_times:
            raise Finding(
                "accepted an invalid time", f"{case.method} answered OK to {', '.join(case.bad_times)}"
            )

    def complete_handoffs(self, case: Case, responses: list[Message]) -> None:
        """Deposit a real descriptor for every PUT/CHECKIN token the call issued, as a client would."""
        tokens = [bytes(h.token) for r in responses for h in _handoffs(r) if h.operation in HANDOFF_DEPOSITS]
        if not tokens:
            return
        results = self.deposit(tokens[:253])
        if results is None:
            raise Finding(
                "deposit never answered",
                f"{case.method} issued {len(tokens)} token(s); the Deposit of their descriptors got no answer "
                f"(broker log: {_last_error(self.broker.log())})",
            )
        for r in results:
            if r.error.code in (2, 13):
                raise Finding("deposit answered UNKNOWN/INTERNAL", describe_frame(r))
        for name in [r.name for r in results if not r.HasField("error") and r.name]:
            try:
                self.ctl.call("Stat", pb.StatRequest(name=name))
            except grpc.RpcError as err:
                if err.code() not in BAD:  # NOT_FOUND: a short TTL already expired it
                    continue
                raise Finding(
                    "stored entry breaks Stat", f"{name!r}: Stat answers {err.code().name}: {err.details()}"
                ) from None

    def check_readable(self) -> None:
        """List (every page, anonymously) still works for everybody."""
        token = ""
        for _ in range(1000):
            try:
                page = self.ctl.call("List", pb.ListRequest(page_token=token))
            except grpc.RpcError as err:
                raise Finding("List breaks", f"List now answers {err.code().name}: {err.details()}") from None
            token = page.next_page_token
            if not token:
                return

    def ensure_healthy(self) -> None:
        """Before a case: the broker alive and listing, our session live, the fixture entries there, nothing
        else stored (an earlier case's entries deleted)."""
        if self.broker.proc.poll() is not None:
            self.restart(f"it exited with {self.broker.proc.returncode}")
            return
        try:
            entries = self.ctl.call("List", pb.ListRequest()).entries
            self.ctl.call("GetInfo", pb.GetInfoRequest(), self.conduit.session_id)
        except grpc.RpcError as err:
            self.restart(f"{err.code().name}: {err.details()}")
            return
        for lid in self.granted - set(self.ctx.lease_ids):
            with contextlib.suppress(grpc.RpcError):
                self.ctl.call("Release", pb.ReleaseRequest(lease_id=lid), self.conduit.session_id)
        self.granted.clear()
        self.drain()
        names = {e.name for e in entries}
        for name in names - set(FIXTURE_NAMES):
            with contextlib.suppress(grpc.RpcError):
                self.ctl.call("Delete", pb.DeleteRequest(name=name), self.conduit.session_id)
        for name in set(FIXTURE_NAMES) - names:
            with contextlib.suppress(grpc.RpcError, AssertionError):
                self._put(name)
        self.drain()

    def minimize(self, case: Case, kind: str, budget: int = 150, seconds: float = 20.0) -> Case:
        """Greedy shrinking: keep any smaller request that still fails with ``kind`` (bounded in tries and
        time: a case that breaks the broker costs a restart per try)."""
        self.quiet = True
        deadline = time.monotonic() + seconds
        try:
            best = case
            progress = True
            while progress and budget > 0:
                progress = False
                for smaller in _reductions(best):
                    budget -= 1
                    if budget < 0 or time.monotonic() > deadline:
                        budget = 0
                        break
                    self.ensure_healthy()
                    try:
                        self.run_case(smaller)
                    except Finding as f:
                        if f.kind == kind:
                            best, progress = smaller, True
                            break
            self.ensure_healthy()
            return best
        finally:
            self.quiet = False

    def assert_no_growth(self) -> None:
        """The broker's descriptors: its baseline, our two connections, one per entry; nothing more."""
        assert self.broker.proc.poll() is None, f"the broker died:\n{self.broker.log()[-4000:]}"
        assert self.broker.baseline is not None
        held = self.info().entries
        want = self.broker.baseline + self.own_fds + held
        n = self.broker._settled(lambda n: n == want, 10.0)
        assert n == want, (
            f"the broker holds {n} descriptors, expected {want} "
            f"(baseline {self.broker.baseline} + our {self.own_fds} connections + {held} entries)"
        )


def _last_error(log: str) -> str:
    lines = [ln for ln in log.splitlines() if ln and not ln.startswith((" ", "Traceback"))]
    errors = [ln for ln in lines if "Error" in ln or "ERROR" in ln]
    return (errors[-1] if errors else "nothing logged")[-400:]


def _lease_ids(msg: Message) -> list[str]:
    """Every ``lease_id`` string anywhere in ``msg``."""
    out: list[str] = []
    for f, value in msg.ListFields():
        if f.name == "lease_id" and isinstance(value, str):
            out.append(value)
        elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
            for v in value if is_repeated(f) else [value]:
                out.extend(_lease_ids(v))
    return out


def _handoffs(msg: Message) -> list[pb.Handoff]:
    """Every Handoff anywhere in ``msg``."""
    if isinstance(msg, pb.Handoff):
        return [msg]
    out: list[pb.Handoff] = []
    for f, value in msg.ListFields():
        if f.message_type is None or f.message_type.GetOptions().map_entry:
            continue
        for v in value if is_repeated(f) else [value]:
            out.extend(_handoffs(v))
    return out


@pytest.fixture
def target() -> Iterator[Target]:
    t = Target()
    try:
        yield t
    finally:
        t.close()


def _run(target: Target, strategy: st.SearchStrategy[Case], examples: int) -> None:
    @settings(FUZZ_SETTINGS, max_examples=examples)
    @given(case=strategy)
    def fuzz(case: Case) -> None:
        target.check(case)

    try:
        fuzz()
    finally:
        assert not target.problems, "\n\n".join(target.problems)
    target.assert_no_growth()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rpc_fuzz_requests(target: Target, method: str) -> None:
    _run(target, request_cases(method, target.ctx), EXAMPLES)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_rpc_fuzz_undecodable(target: Target, method: str) -> None:
    _run(target, undecodable_cases(method), max(10, EXAMPLES // 3))
