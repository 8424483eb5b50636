"""Handoff tokens (fdbroker.broker.tokens): unit tests and a model check against a trivial reference model."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from fdbroker.broker.tokens import RETIRED_MEMORY, TOKEN_BYTES, Token, TokenBook, TokenError, short
from fdbroker.errors import Code
from fdbroker.v1 import broker_pb2 as pb

PUT, GET, TAKE, LEASE = pb.OPERATION_PUT, pb.OPERATION_GET, pb.OPERATION_TAKE, pb.OPERATION_LEASE


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_book(ttl: float = 5.0) -> tuple[TokenBook, FakeClock]:
    clock = FakeClock()
    return TokenBook(ttl, clock=clock), clock


def reason_of(book: TokenBook, token: bytes, session_id: str, ops: tuple[int, ...] = (GET,)) -> str:
    with pytest.raises(TokenError) as ei:
        book.redeem(token, session_id=session_id, operations=ops)
    return ei.value.reason


def test_issue_and_redeem_once() -> None:
    book, clock = make_book()
    tok = book.issue(operation=GET, name="web", session_id="s1", uid=1000, entry_id=7, payload={"x": 1})
    assert len(tok.token) == TOKEN_BYTES
    assert tok.expires_at == clock.now + 5.0
    assert (tok.operation, tok.name, tok.session_id, tok.uid, tok.entry_id) == (GET, "web", "s1", 1000, 7)
    assert len(book) == 1
    assert book.pending_for_uid(1000) == 1
    got = book.redeem(tok.token, session_id="s1", operations=(GET, TAKE))
    assert got is tok
    assert got.payload == {"x": 1}
    assert len(book) == 0
    assert book.pending_for_uid(1000) == 0
    # Single use: the second presentation says "already used", not "unknown".
    with pytest.raises(TokenError) as ei:
        book.redeem(tok.token, session_id="s1", operations=(GET,))
    assert ei.value.reason == "reused"
    assert ei.value.code == Code.FAILED_PRECONDITION
    assert "already used" in str(ei.value)


def test_tokens_are_distinct_and_random() -> None:
    book, _ = make_book()
    toks = {book.issue(operation=GET, name="a", session_id="s", uid=1).token for _ in range(1000)}
    assert len(toks) == 1000
    assert len(book) == 1000


def test_expiry_is_lazy_and_reported() -> None:
    book, clock = make_book(ttl=2.0)
    tok = book.issue(operation=TAKE, name="q", session_id="s1", uid=1)
    clock.now += 1.999
    assert book.peek(tok.token, session_id="s1") is tok
    clock.now += 0.001  # exactly at expires_at: expired
    with pytest.raises(TokenError) as ei:
        book.redeem(tok.token, session_id="s1", operations=(TAKE,))
    assert ei.value.reason == "expired"
    assert ei.value.name == "q"
    assert ei.value.code == Code.FAILED_PRECONDITION
    assert len(book) == 0
    # Still reported as expired afterwards.
    assert reason_of(book, tok.token, "s1", (TAKE,)) == "expired"


def test_expire_removes_in_order_across_ttls() -> None:
    book, clock = make_book(ttl=5.0)
    a = book.issue(operation=GET, name="a", session_id="s", uid=1)  # 1005
    b = book.issue(operation=GET, name="b", session_id="s", uid=1, ttl=1.0)  # 1001
    c = book.issue(operation=GET, name="c", session_id="s", uid=2, ttl=3.0)  # 1003
    assert book.next_expiry() == 1001.0
    assert book.expire() == []
    assert {t.token for t in book.expire(now=1003.0)} == {b.token, c.token}
    assert len(book) == 1
    assert book.next_expiry() == 1005.0
    assert book.pending_for_uid(2) == 0
    clock.now = 1006.0
    assert book.expire() == [a]
    assert book.next_expiry() is None
    assert reason_of(book, b.token, "s") == "expired"


def test_foreign_is_refused_and_not_consumed() -> None:
    book, _ = make_book()
    tok = book.issue(operation=GET, name="web", session_id="owner", uid=1)
    with pytest.raises(TokenError) as ei:
        book.redeem(tok.token, session_id="thief", operations=(GET,))
    assert ei.value.reason == "foreign"
    assert ei.value.code == Code.PERMISSION_DENIED
    assert "another session" in str(ei.value)
    assert book.peek(tok.token, session_id="thief") is None
    assert book.peek(tok.token, session_id="owner") is tok
    assert book.redeem(tok.token, session_id="owner", operations=(GET,)) is tok


def test_wrong_operation_is_refused_and_not_consumed() -> None:
    book, _ = make_book()
    tok = book.issue(operation=PUT, name="web", session_id="s", uid=1)
    with pytest.raises(TokenError) as ei:
        book.redeem(tok.token, session_id="s", operations=(GET, TAKE))
    assert ei.value.reason == "wrong-operation"
    assert ei.value.code == Code.FAILED_PRECONDITION
    assert "issued for put" in str(ei.value)
    assert book.redeem(tok.token, session_id="s", operations=(PUT,)) is tok


def test_unknown_and_malformed() -> None:
    book, _ = make_book()
    tok = book.issue(operation=GET, name="web", session_id="s", uid=1)
    assert reason_of(book, secrets.token_bytes(TOKEN_BYTES), "s") == "unknown"
    # Same lookup id, different secret: unknown, and the real token is untouched.
    forged = tok.token[:8] + bytes(24)
    assert reason_of(book, forged, "s") == "unknown"
    with pytest.raises(TokenError) as ei:
        book.redeem(b"short", session_id="s", operations=(GET,))
    assert ei.value.reason == "malformed"
    assert ei.value.code == Code.INVALID_ARGUMENT
    assert book.peek(b"", session_id="s") is None
    assert book.cancel(b"") is None
    assert book.cancel(forged) is None
    assert book.redeem(tok.token, session_id="s", operations=(GET,)) is tok
    # A forged token sharing the lookup id of a *redeemed* one is still "unknown", not "reused".
    assert reason_of(book, forged, "s") == "unknown"


def test_cancel_and_void_session() -> None:
    book, _ = make_book()
    t1 = book.issue(operation=GET, name="a", session_id="s1", uid=1)
    t2 = book.issue(operation=TAKE, name="b", session_id="s1", uid=1)
    t3 = book.issue(operation=GET, name="c", session_id="s2", uid=2)
    assert book.cancel(t1.token) is t1
    assert book.cancel(t1.token) is None
    assert reason_of(book, t1.token, "s1") == "unknown"
    assert book.void_session("s1") == [t2]
    assert book.void_session("s1") == []
    assert book.void_session("nobody") == []
    assert reason_of(book, t2.token, "s1", (TAKE,)) == "unknown"
    assert len(book) == 1
    assert book.pending_for_uid(1) == 0
    assert book.pending_for_uid(2) == 1
    assert book.redeem(t3.token, session_id="s2", operations=(GET,)) is t3


def test_retired_memory_is_bounded() -> None:
    book, _ = make_book()
    first = book.issue(operation=GET, name="a", session_id="s", uid=1)
    book.redeem(first.token, session_id="s", operations=(GET,))
    for _ in range(RETIRED_MEMORY):
        t = book.issue(operation=GET, name="a", session_id="s", uid=1)
        book.redeem(t.token, session_id="s", operations=(GET,))
    assert reason_of(book, first.token, "s") == "unknown"  # forgotten
    assert reason_of(book, t.token, "s") == "reused"


def test_never_logged_whole() -> None:
    book, _ = make_book()
    tok = book.issue(operation=GET, name="web", session_id="s" * 40, uid=1)
    full = tok.token.hex()
    assert short(tok.token) == full[:8] + "…"
    assert full not in repr(tok)
    assert short(tok.token) in repr(tok)
    book.redeem(tok.token, session_id="s" * 40, operations=(GET,))
    for bad_session, reason in (("s" * 40, "reused"),):
        with pytest.raises(TokenError) as ei:
            book.redeem(tok.token, session_id=bad_session, operations=(GET,))
        assert ei.value.reason == reason
        assert full not in str(ei.value)
        assert full[8:16] not in str(ei.value)


def test_bad_ttl() -> None:
    with pytest.raises(ValueError):
        TokenBook(0)
    book, _ = make_book()
    with pytest.raises(ValueError):
        book.issue(operation=GET, name="a", session_id="s", uid=1, ttl=-1)


# --- model check


@dataclass
class ModelToken:
    session: str
    op: int
    uid: int
    expires_at: float


@dataclass
class Model:
    live: dict[bytes, ModelToken] = field(default_factory=dict)
    retired: dict[bytes, str] = field(default_factory=dict)


SESSIONS = st.sampled_from(["s1", "s2", "s3"])
OPS = st.sampled_from([PUT, GET, TAKE, LEASE])


class TokenBookMachine(RuleBasedStateMachine):
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.book = TokenBook(5.0, clock=self.clock)
        self.model = Model()

    @rule(
        target=tokens,
        session=SESSIONS,
        op=OPS,
        uid=st.sampled_from([0, 1000]),
        ttl=st.sampled_from([None, 1, 2.5]),
    )
    def issue(self, session: str, op: int, uid: int, ttl: float | None) -> bytes:
        tok = self.book.issue(operation=op, name="n", session_id=session, uid=uid, ttl=ttl)
        self.model.live[tok.token] = ModelToken(
            session, op, uid, self.clock.now + (5.0 if ttl is None else ttl)
        )
        return tok.token

    @rule(target=tokens)
    def made_up(self) -> bytes:
        return secrets.token_bytes(TOKEN_BYTES)

    def _model_find(self, token: bytes) -> ModelToken | str:
        m = self.model.live.get(token)
        if m is None:
            return self.model.retired.get(token, "unknown")
        if m.expires_at <= self.clock.now:
            del self.model.live[token]
            self.model.retired[token] = "expired"
            return "expired"
        return m

    @rule(token=tokens, session=SESSIONS, ops=st.sets(OPS, min_size=1))
    def redeem(self, token: bytes, session: str, ops: set[int]) -> None:
        m = self._model_find(token)
        if isinstance(m, str):
            expected: str | None = m
        elif m.session != session:
            expected = "foreign"
        elif m.op not in ops:
            expected = "wrong-operation"
        else:
            expected = None
        try:
            got = self.book.redeem(token, session_id=session, operations=ops)
        except TokenError as e:
            assert e.reason == expected
        else:
            assert expected is None
            assert got.token == token
            del self.model.live[token]
            self.model.retired[token] = "reused"

    @rule(token=tokens, session=SESSIONS)
    def peek(self, token: bytes, session: str) -> None:
        m = self._model_find(token)
        got = self.book.peek(token, session_id=session)
        if isinstance(m, ModelToken) and m.session == session:
            assert got is not None and got.token == token
        else:
            assert got is None

    @rule(token=consumes(tokens))
    def cancel(self, token: bytes) -> None:
        got = self.book.cancel(token)
        if token in self.model.live:
            assert got is not None and got.token == token
            del self.model.live[token]
        else:
            assert got is None

    @rule(session=SESSIONS)
    def void(self, session: str) -> None:
        got = {t.token for t in self.book.void_session(session)}
        expected = {k for k, m in self.model.live.items() if m.session == session}
        assert got == expected
        for k in expected:
            del self.model.live[k]

    @rule(dt=st.sampled_from([0, 0.5, 1, 2.5, 6]))
    def tick(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def expire(self) -> None:
        got = {t.token for t in self.book.expire()}
        expected = {k for k, m in self.model.live.items() if m.expires_at <= self.clock.now}
        assert got == expected
        for k in expected:
            del self.model.live[k]
            self.model.retired[k] = "expired"

    @invariant()
    def counts_agree(self) -> None:
        assert len(self.book) == len(self.model.live)
        for uid in (0, 1000):
            assert self.book.pending_for_uid(uid) == sum(1 for m in self.model.live.values() if m.uid == uid)
        expected = min((m.expires_at for m in self.model.live.values()), default=None)
        assert self.book.next_expiry() == expected


TokenBookMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_token_book_model = TokenBookMachine.TestCase


def test_token_dataclass_fields() -> None:
    # The broker constructs and reads these by name.
    t = Token(b"x" * 32, GET, "n", "s", 1, 2, 3.0)
    assert t.payload is None
    assert (t.operation, t.name, t.session_id, t.uid, t.entry_id, t.expires_at) == (GET, "n", "s", 1, 2, 3.0)
