"""Model-based test of leasing: a hypothesis state machine drives ONE real broker process through several
sessions (sync clients) with puts and replaces, no-wait grants (exclusive and shared), releases, check-ins,
keep-alives, lease expiries, entry expiries, gets, takes, deletes and session deaths, and checks every answer
and the broker's lease state against a small reference model:

* who holds what (lease ids per entry, the mode), and that conflicts are refused with FAILED_PRECONDITION naming
  the holder (pid, uid);
* fencing epochs strictly increase with every grant, per entry name across deletes and re-puts (and broker-wide);
* a lease delivers the entry's current descriptor, and a check-in replaces it only if the entry was not replaced
  since the grant;
* a session's death ends its leases; removing an entry ends its leases.

Timing never decides an outcome: leases that should not expire have a TTL far beyond the run, and the rules that
test expiry wait for it (by polling the broker) inside the rule. ``derandomize`` keeps CI runs identical; set
FDBROKER_MODEL_EXAMPLES to explore more.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)
from leaseutil import memfd, read_all

from fdbroker.errors import AlreadyExists, FailedPrecondition, NotFound
from fdbroker.testing import BrokerProcess

pytestmark = pytest.mark.slow

N_SESSIONS = 3
LONG_TTL = 600.0  # never expires within a run
HOLDER = rf"pid {os.getpid()}\b.*uid {os.getuid()}\b"

_broker: BrokerProcess | None = None
_example = itertools.count()


@dataclass
class MLease:
    lease_id: str
    session: int  # slot index
    gen: int  # generation of the session in that slot (a dead session's leases are gone)
    name: str
    exclusive: bool
    epoch: int
    version: int  # descriptor version of the entry at grant time


def _wait_until(pred, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout}s")
        time.sleep(0.01)


class LeaseMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        assert _broker is not None
        self.broker = _broker
        self.prefix = f"m{next(_example)}/"
        self.names = [self.prefix + s for s in ("a", "b")]
        self.clients = [self._new_client() for _ in range(N_SESSIONS)]
        self.gens = [0] * N_SESSIONS
        self.versions = itertools.count(1)
        self.entries: dict[str, int] = {}  # name -> descriptor version (content)
        self.entry_epoch: dict[str, int] = {}  # name -> LeaseState.epoch of this incarnation
        self.max_epoch: dict[str, int] = {}  # name -> highest epoch ever granted (across incarnations)
        self.global_epoch = 0
        self.live: dict[str, MLease] = {}

    def _new_client(self):
        c = self.broker.client(prefetch=0)
        c.connect()
        return c

    # -- helpers -------------------------------------------------------------------------------------------------

    def _holders(self, name: str) -> list[MLease]:
        return [m for m in self.live.values() if m.name == name]

    def _others_exclusive(self, name: str, session: int) -> bool:
        return any(m.exclusive and m.session != session for m in self._holders(name))

    def _content(self, name: str, version: int) -> bytes:
        return f"{name}#{version}".encode()

    def _deposit(self, c, name: str, version: int, **kw) -> None:
        fd = memfd(self._content(name, version))
        try:
            c.put(name, fd, **kw)
        finally:
            os.close(fd)

    def _drop_entry(self, name: str) -> None:
        del self.entries[name]
        self.entry_epoch.pop(name, None)
        for lid in [lid for lid, m in self.live.items() if m.name == name]:
            del self.live[lid]

    def _sessions_now(self) -> int:
        return int(self.clients[0].info().sessions)

    # -- rules ---------------------------------------------------------------------------------------------------

    @initialize()
    def start(self) -> None:
        _wait_until(lambda: self._sessions_now() == N_SESSIONS, "sessions of the previous example ended")

    @rule(s=st.integers(0, N_SESSIONS - 1), i=st.integers(0, 1), replace=st.booleans())
    def put(self, s: int, i: int, replace: bool) -> None:
        name = self.names[i]
        v = next(self.versions)
        c = self.clients[s]
        if name in self.entries and not replace:
            with pytest.raises(AlreadyExists):
                self._deposit(c, name, v)
        elif name in self.entries and self._others_exclusive(name, s):
            with pytest.raises(FailedPrecondition, match=HOLDER):
                self._deposit(c, name, v, replace=True)
        else:
            self._deposit(c, name, v, replace=replace)
            if name not in self.entries:
                self.entry_epoch[name] = 0
            self.entries[name] = v  # a replace keeps the leases (they belong to the name)

    @rule(target=leases, s=st.integers(0, N_SESSIONS - 1), i=st.integers(0, 1), exclusive=st.booleans())
    def lease(self, s: int, i: int, exclusive: bool):
        name = self.names[i]
        c = self.clients[s]
        if name not in self.entries:
            with pytest.raises(NotFound):
                c.lease(name, LONG_TTL, shared=not exclusive, keepalive=False)
            return multiple()
        holders = self._holders(name)
        if holders and (exclusive or any(m.exclusive for m in holders)):
            with pytest.raises(FailedPrecondition, match=HOLDER):
                c.lease(name, LONG_TTL, shared=not exclusive, keepalive=False)
            return multiple()
        h = c.lease(name, LONG_TTL, shared=not exclusive, keepalive=False)
        try:
            assert read_all(h.fd) == self._content(name, self.entries[name])  # the current descriptor
        finally:
            h.fd.close()
        assert h.epoch > self.max_epoch.get(name, 0) and h.epoch > self.global_epoch
        self.max_epoch[name] = self.entry_epoch[name] = self.global_epoch = h.epoch
        self.live[h.lease_id] = MLease(
            h.lease_id, s, self.gens[s], name, exclusive, h.epoch, self.entries[name]
        )
        return h.lease_id

    @rule(lid=leases, via=st.integers(0, N_SESSIONS - 1))
    def release(self, lid: str, via: int) -> None:
        m = self.live.get(lid)
        if m is None or m.session != via:
            with pytest.raises(NotFound):  # gone, or not this session's
                self.clients[via].release(lid)
            return
        self.clients[via].release(lid)
        del self.live[lid]

    @rule(lid=leases)
    def checkin(self, lid: str) -> None:
        m = self.live.get(lid)
        s = m.session if m is not None else 0
        v = next(self.versions)
        name = m.name if m is not None else self.names[0]
        fd = memfd(self._content(name, v))
        try:
            if m is None:
                with pytest.raises(NotFound):
                    self.clients[s].release(lid, return_fd=fd)
            elif self.entries[m.name] != m.version:
                with pytest.raises(FailedPrecondition, match="replaced since"):
                    self.clients[s].release(lid, return_fd=fd)  # refused; the lease is still held
            else:
                self.clients[s].release(lid, return_fd=fd)
                del self.live[lid]
                self.entries[m.name] = v
        finally:
            os.close(fd)

    @rule(s=st.integers(0, N_SESSIONS - 1), data=st.data())
    def keepalive(self, s: int, data) -> None:
        ids = data.draw(st.lists(st.sampled_from(sorted(self.live) or ["none"]), max_size=3, unique=True))
        ids.append("no-such-lease")
        r = self.clients[s].keepalive(ids)
        mine = {lid for lid in ids if lid in self.live and self.live[lid].session == s}
        assert {x.lease_id for x in r.renewed} == mine
        assert set(r.gone) == set(ids) - mine

    @rule(s=st.integers(0, N_SESSIONS - 1), i=st.integers(0, 1))
    def get(self, s: int, i: int) -> None:
        name = self.names[i]
        if name not in self.entries:
            with pytest.raises(NotFound):
                self.clients[s].get(name)
        elif self._others_exclusive(name, s):
            with pytest.raises(FailedPrecondition, match=HOLDER):
                self.clients[s].get(name)
        else:
            with self.clients[s].get(name) as f:
                assert read_all(f) == self._content(name, self.entries[name])

    @rule(s=st.integers(0, N_SESSIONS - 1), i=st.integers(0, 1), take=st.booleans())
    def remove(self, s: int, i: int, take: bool) -> None:
        name = self.names[i]
        c = self.clients[s]
        op = (lambda: c.take(name, raw=True).close()) if take else (lambda: c.delete(name))
        if name not in self.entries:
            with pytest.raises(NotFound):
                op()
        elif self._others_exclusive(name, s):
            with pytest.raises(FailedPrecondition, match=HOLDER):
                op()
        else:
            op()
            self._drop_entry(name)  # its leases end with it

    @rule(s=st.integers(0, N_SESSIONS - 1))
    def session_dies(self, s: int) -> None:
        self.clients[s].close()
        other = self.clients[(s + 1) % N_SESSIONS]
        _wait_until(
            lambda: int(other.info().sessions) == N_SESSIONS - 1, "the broker ended the closed session"
        )
        for lid in [lid for lid, m in self.live.items() if m.session == s]:
            del self.live[lid]
        self.clients[s] = self._new_client()
        self.gens[s] += 1

    @precondition(lambda self: any(n in self.entries and not self._holders(n) for n in self.names))
    @rule(s=st.integers(0, N_SESSIONS - 1), data=st.data())
    def lease_expires(self, s: int, data) -> None:
        name = data.draw(
            st.sampled_from([n for n in self.names if n in self.entries and not self._holders(n)])
        )
        h = self.clients[s].lease(name, 0.2, keepalive=False)
        h.fd.close()
        assert h.epoch > self.max_epoch.get(name, 0)
        self.max_epoch[name] = self.entry_epoch[name] = self.global_epoch = h.epoch
        c = self.clients[s]
        # (stat, not keepalive: a keep-alive would renew it)
        _wait_until(lambda: h.lease_id not in {x[0] for x in c.stat(name).lease.holders}, "lease expiry")
        assert h.lease_id in c.keepalive([h.lease_id]).gone

    @precondition(lambda self: any(n in self.entries for n in self.names))
    @rule(s=st.integers(0, N_SESSIONS - 1), data=st.data())
    def entry_expires(self, s: int, data) -> None:
        name = data.draw(st.sampled_from([n for n in self.names if n in self.entries]))
        c = self.clients[s]
        if self._others_exclusive(name, s):
            return
        v = next(self.versions)
        self._deposit(c, name, v, replace=True, ttl=0.2)
        self.entries[name] = v

        def gone() -> bool:
            try:
                c.stat(name)
            except NotFound:
                return True
            return False

        _wait_until(gone, "entry expiry")
        self._drop_entry(name)

    # -- invariants ----------------------------------------------------------------------------------------------

    @invariant()
    def broker_agrees(self) -> None:
        c = self.clients[0]
        for name in self.names:
            if name not in self.entries:
                with pytest.raises(NotFound):
                    c.stat(name)
                continue
            e = c.stat(name)
            holders = self._holders(name)
            assert {h[0] for h in e.lease.holders} == {m.lease_id for m in holders}
            assert e.lease.mode == ("" if not holders else "exclusive" if holders[0].exclusive else "shared")
            assert e.lease.epoch == self.entry_epoch[name]
            assert e.lease.waiters == 0
            for h in e.lease.holders:
                assert h[1] == os.getpid() and h[2] == os.getuid()

    def teardown(self) -> None:
        for c in self.clients:
            c.close()
        with self.broker.client() as c:
            _wait_until(lambda: int(c.info().sessions) == 0, "all sessions ended")
            for name in self.names:
                try:
                    c.delete(name)
                except NotFound:
                    pass


@pytest.fixture(scope="module")
def model_broker(tmp_path_factory):
    global _broker
    import tempfile
    from pathlib import Path

    run_dir = Path(tempfile.mkdtemp(prefix="fdb-", dir="/tmp")) / "run"
    with BrokerProcess.start(run_dir) as b:
        b.settle_baseline()
        _broker = b
        try:
            yield b
            b.assert_no_leak()
            assert b.stop() == 0, b.log()[-4000:]
        finally:
            _broker = None


@pytest.mark.timeout(1800)  # room for FDBROKER_MODEL_EXAMPLES explorations; the default run takes ~10 s
def test_leases_against_reference_model(model_broker):
    n = int(os.environ.get("FDBROKER_MODEL_EXAMPLES", "12"))
    LeaseMachine.TestCase.settings = settings(
        max_examples=n,
        stateful_step_count=30,
        deadline=None,
        derandomize="FDBROKER_MODEL_EXAMPLES" not in os.environ,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )
    t0 = time.monotonic()
    LeaseMachine.TestCase().runTest()
    print(f"\n{n} examples of up to 30 steps in {time.monotonic() - t0:.1f}s")
