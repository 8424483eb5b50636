"""The registry on its own, with real descriptors: paging, capacity, the event history and its floor."""

from __future__ import annotations

import os

import pytest

from fdbroker import fdinfo
from fdbroker.broker.registry import Entry, Owner, PutOptions, Registry
from fdbroker.errors import AlreadyExists, OutOfRange, ResourceExhausted
from fdbroker.v1 import broker_pb2 as pb

OWNER = Owner(os.getpid(), os.getuid(), os.getgid())


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield w
    os.close(r)
    os.close(w)


def put(reg: Registry, name: str, w: int, **opts: object) -> None:
    fd = os.dup(w)
    reg.put(name, fd, fdinfo.describe(fd), OWNER, "s", PutOptions(**opts))  # type: ignore[arg-type]


def test_pages_follow_name_order_and_selectors(pipe):
    reg = Registry(capacity=100)
    try:
        for i in range(25):
            put(reg, f"a/{i:02d}", pipe, labels={"odd": "yes"} if i % 2 else {})
        put(reg, "b/x", pipe)
        names, after = [], ""
        while True:
            page, after = reg.page("a/", after=after, limit=10)
            names += [e.name for e in page]
            if not after:
                break
        assert names == [f"a/{i:02d}" for i in range(25)]
        odd, more = reg.page("", limit=100, match=lambda e: e.labels.get("odd") == "yes")
        assert [e.name for e in odd] == [f"a/{i:02d}" for i in range(1, 25, 2)] and more == ""
        # the cached protobuf form is what the entry says
        e = reg.get("a/03")
        m = e.to_pb()
        assert m.name == "a/03" and m.labels["odd"] == "yes" and m.info.kind == pb.KIND_PIPE
    finally:
        reg.close_all()


def test_capacity_is_refused_without_taking_the_descriptor(pipe):
    reg = Registry(capacity=3)
    try:
        for i in range(3):
            put(reg, f"c/{i}", pipe)
        fd = os.dup(pipe)
        with pytest.raises(ResourceExhausted) as ei:
            reg.put("c/3", fd, fdinfo.describe(fd), OWNER, "s", PutOptions())
        assert "c/3" in str(ei.value)
        os.fstat(fd)  # still open: a refused put leaves the descriptor with the caller
        os.close(fd)
    finally:
        reg.close_all()


def test_history_replays_from_a_revision_and_refuses_below_its_floor(pipe):
    reg = Registry(capacity=100, history=5)
    try:
        for i in range(3):
            put(reg, f"h/{i}", pipe)
        assert [ev.name for ev in reg.history.since(2)] == ["h/1", "h/2"]
        for i in range(3, 8):
            put(reg, f"h/{i}", pipe)
        assert reg.history.oldest_revision == 4  # only the last 5 events are kept
        with pytest.raises(OutOfRange) as ei:
            reg.history.since(3)
        assert ei.value.oldest_revision == 4
        # A successor continuing at revision 1000 has no history of what came before.
        succ = Registry(capacity=100)
        succ.raise_revision(1000)
        assert succ.history.oldest_revision == 1001
        with pytest.raises(OutOfRange):
            succ.history.since(999)
        assert succ.history.since(1001) == []
    finally:
        reg.close_all()


def carried(name: str, fd: int, revision: int = 5) -> Entry:
    return Entry(
        id=0,
        name=name,
        fd=fd,
        info_bytes=fdinfo.describe(fd).SerializeToString(),
        owner=OWNER,
        session_id="",
        labels={},
        create_time=1.0,
        create_revision=revision,
        revision=revision,
    )


def test_install_takes_a_batch_all_or_none(pipe):
    gone: list[int] = []

    def discard(fd: int, uid: int) -> None:
        gone.append(fd)
        os.close(fd)

    reg = Registry(capacity=5, discard=discard)
    try:
        put(reg, "b", pipe)
        put(reg, "d", pipe)
        fds = [os.dup(pipe) for _ in range(3)]
        for bad in (
            [carried("a", fds[0]), carried("d", fds[1])],  # already held
            [carried("a", fds[0]), carried("a", fds[1])],  # twice in the batch
            [carried(n, fd) for n, fd in zip("aceg", [*fds, fds[0]], strict=True)],  # 2 + 4 > 5
        ):
            with pytest.raises((AlreadyExists, ResourceExhausted)):
                reg.install(bad)
            # nothing changed and no descriptor was taken
            assert [e.name for e in reg.in_order()] == ["b", "d"] and reg.count_for_uid(OWNER.uid) == 2
            assert gone == [] and all(os.fstat(fd) for fd in fds)
        batch = [carried("e", fds[0], 90), carried("a", fds[1], 7), carried("c", fds[2], 8)]
        batch[1].expires_at = reg.clock()
        reg.install(batch)
        # names merged into their order, ids fresh, counters raised to the highest revision, expiry tracked
        assert [e.name for e in reg.in_order()] == ["a", "b", "c", "d", "e"]
        assert reg.page("", after="b", limit=2)[0] == [reg.get("c"), reg.get("d")]
        assert len({e.id for e in reg}) == 5 and reg.count_for_uid(OWNER.uid) == 5
        assert reg.revision == 90 and reg.get("a").revision == 7
        assert reg.due(reg.clock() + 1) == [reg.get("a")]
        assert reg.get("c").to_pb().revision == 8  # its serialized forms were built
        reg.install([])
        assert len(reg) == 5
    finally:
        reg.close_all()


def test_install_keeps_a_carried_form(pipe):
    reg = Registry(capacity=4)
    try:
        e = carried("x", os.dup(pipe))
        form = pb.Entry(name="x", revision=5, create_revision=5, labels={"as": "sent"}).SerializeToString()
        e.keep_form(form)
        reg.install([e])
        assert reg.get("x").pb_bytes() == form  # not encoded again
        reg.touch(reg.get("x"), pb.Event.TYPE_LEASE_RELEASED)
        assert reg.get("x").to_pb().labels == {}  # a change builds it from the entry again
    finally:
        reg.close_all()
