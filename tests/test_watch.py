"""Watch through a real broker: list-then-watch under concurrent writers misses and repeats nothing, resume after
reconnect, the history window (OUT_OF_RANGE with the oldest revision), the slow-consumer cut-off with bounded
broker memory, and lease events with their lease id, epoch and reason."""

from __future__ import annotations

import itertools
import os
import re
import signal
import time

import pytest
from brokerutil import spawn_client
from leaseutil import Collector, broker_with, memfd

from fdbroker.errors import OutOfRange, ResourceExhausted


def _put(c, name: str, content: bytes = b"x", **kw):
    fd = memfd(content)
    try:
        return c.put(name, fd, **kw)
    finally:
        os.close(fd)


def _state(entries) -> dict[str, tuple[int, int, tuple[str, ...]]]:
    return {e.name: (e.revision, e.lease.epoch, tuple(h[0] for h in e.lease.holders)) for e in entries}


WRITER = """
import fdbroker, os, random
from fdbroker.errors import BrokerError
rnd = random.Random({seed})
fd = os.memfd_create("w")
with fdbroker.Client() as c:
    for i in range({ops}):
        name = "lw/%d/%d" % ({seed}, rnd.randrange(4))
        op = rnd.random()
        try:
            if op < 0.45:
                c.put(name, fd, replace=True, labels={{"i": str(i)}})
            elif op < 0.6:
                c.delete(name)
            else:
                with c.lease(name, ttl=5, shared=rnd.random() < 0.5, keepalive=False):
                    pass
        except BrokerError:
            pass  # not found, or leased by a sibling: fine, the broker decides
os.close(fd)
"""


@pytest.mark.slow
def test_list_then_watch_under_concurrent_writers_misses_and_repeats_nothing(fdbroker_broker):
    writers = [spawn_client(fdbroker_broker.run_dir, WRITER.format(seed=i, ops=120)) for i in range(4)]
    try:
        with fdbroker_broker.client() as c:
            deadline = time.monotonic() + 60
            while c.info().revision < 40 and time.monotonic() < deadline:  # list in the middle of it
                time.sleep(0.01)
            listing = c.list("lw/")
            state = _state(listing)
            with Collector(c, "lw/", start_revision=listing.revision + 1) as col:
                for w in writers:
                    _, err = w.communicate(timeout=120)
                    assert w.returncode == 0, err
                final = c.info().revision
                assert final > listing.revision, "the writers were done before the listing"
                revs: list[int] = []
                while not revs or revs[-1] < final:
                    ev = col.wait_for(lambda e: True)
                    revs.append(ev.revision)
                    if ev.type in ("delete", "expire"):
                        del state[ev.name]
                    else:
                        state.update(_state([ev.entry]))
            # Every change is under lw/, so the revisions after the listing are exactly R+1 .. final.
            assert revs == list(range(listing.revision + 1, final + 1))
            assert state == _state(c.list("lw/"))
            print(f"\nlisted at {listing.revision} mid-stream, then applied {len(revs)} events up to {final}")
            for e in c.list("lw/"):
                c.delete(e.name)
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.communicate()


def test_resume_after_reconnect_from_last_revision_plus_one(fdbroker_broker):
    with fdbroker_broker.client() as c:
        with fdbroker_broker.client() as w, Collector(w, "rs/") as col:
            for i in range(5):
                _put(c, f"rs/{i}")
            seen = [col.wait_for(lambda e: True) for _ in range(5)]
        last = seen[-1].revision  # the watcher (and its client) went away here
        for i in range(5):
            c.delete(f"rs/{i}")
        _put(c, "other/x")  # not under the prefix
        c.delete("other/x")
        with fdbroker_broker.client() as w:
            watch = w.watch("rs/", start_revision=last + 1)
            try:
                got = list(itertools.islice(watch, 5))
                assert watch.header_revision == last
            finally:
                watch.close()
        assert [(e.type, e.name) for e in got] == [("delete", f"rs/{i}") for i in range(5)]
        assert [e.revision for e in got] == list(range(last + 1, last + 6))


def test_start_revision_older_than_history_is_out_of_range_with_oldest():
    with broker_with(["--history", "50"]) as b, b.client() as c:
        for i in range(120):
            _put(c, f"h/{i % 5}", replace=True)
        info = c.info()
        assert info.oldest_watch_revision == info.revision - 49
        watch = c.watch("h/", start_revision=1)
        try:
            with pytest.raises(OutOfRange) as ei:
                next(watch)
        finally:
            watch.close()
        err = ei.value
        assert err.oldest_revision == info.oldest_watch_revision
        assert f"oldest revision available is {err.oldest_revision}" in str(err)
        watch = c.watch("h/", start_revision=err.oldest_revision)
        try:
            got = list(itertools.islice(watch, 50))
        finally:
            watch.close()
        assert [e.revision for e in got] == list(range(err.oldest_revision, info.revision + 1))
        for i in range(5):
            c.delete(f"h/{i}")


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for ln in f:
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_slow_consumer_is_cut_off_with_resume_revision_and_broker_memory_stays_bounded():
    """A watcher that stops reading while ~25 MB of events go by: the broker's memory grows by far less (without
    the cut-off it grows by ~55 MB), and the watcher, when it reads again, gets what was already on its way, then
    RESOURCE_EXHAUSTED saying where to resume; the resume revision then is outside the history window."""
    labels = {f"k{i:02d}": "v" * 250 for i in range(32)}  # ~8.5 kB per event
    with broker_with(["--history", "50", "--watch-queue", "32"]) as b, b.client() as c, b.client() as w:
        fd = memfd(b"x")
        try:
            watch = w.watch("big/")
            c.put("big/0", fd, labels=labels)
            first = next(watch)
            before = _rss_mib(b.pid)
            for _ in range(600):  # 3000 events
                c.put_many([(f"big/{k}", fd) for k in range(5)], labels=labels, replace=True)
            grown = _rss_mib(b.pid) - before
        finally:
            os.close(fd)
        last = first.revision
        with pytest.raises(ResourceExhausted) as ei:
            for ev in watch:
                assert ev.revision == last + 1  # nothing skipped before the cut
                last = ev.revision
        watch.close()
        msg = str(ei.value)
        assert "fell more than 32 events behind and was cut off" in msg
        m = re.search(r"resume with start_revision=(\d+)", msg)
        assert m and int(m.group(1)) == last + 1
        assert last < c.info().revision  # it was cut off, not drained
        print(
            f"\nwatcher read {last - first.revision} events before the cut; broker RSS grew {grown:.1f} MiB"
        )
        assert grown < 25, f"broker RSS grew {grown:.1f} MiB for a stalled watcher"
        resumed = w.watch("big/", start_revision=last + 1)
        try:
            with pytest.raises(OutOfRange):
                next(resumed)
        finally:
            resumed.close()
        for k in range(5):
            c.delete(f"big/{k}")


def test_lease_events_carry_lease_id_epoch_and_reason(fdbroker_broker):
    with fdbroker_broker.client() as c, Collector(c, "le/") as col:
        _put(c, "le/res")
        col.wait_for(lambda e: e.type == "put")
        with c.lease("le/res", ttl=5, keepalive=False) as h:
            ev = col.wait_for(lambda e: True)
            assert (ev.type, ev.lease_id, ev.epoch) == ("lease_granted", h.lease_id, h.epoch)
            assert ev.entry.lease.mode == "exclusive" and ev.entry.lease.epoch == h.epoch
            assert ev.entry.lease.holders[0][0] == h.lease_id
        ev = col.wait_for(lambda e: True)
        assert (ev.type, ev.reason, ev.lease_id, ev.epoch) == (
            "lease_released",
            "released",
            h.lease_id,
            h.epoch,
        )
        assert ev.entry.lease.mode == "" and ev.entry.lease.epoch == h.epoch

        h2 = c.lease("le/res", ttl=0.2, keepalive=False)
        col.wait_for(lambda e: e.type == "lease_granted")
        ev = col.wait_for(lambda e: True)
        assert (ev.type, ev.reason, ev.lease_id, ev.epoch) == (
            "lease_released",
            "expired",
            h2.lease_id,
            h2.epoch,
        )
        h2.release()

        child = spawn_client(
            fdbroker_broker.run_dir,
            """
            import fdbroker, time
            c = fdbroker.Client()
            h = c.lease("le/res", ttl=600, keepalive=False)
            print(h.lease_id, h.epoch, flush=True)
            time.sleep(600)
            """,
        )
        try:
            assert child.stdout is not None
            lease_id, epoch = child.stdout.readline().split()
            os.kill(child.pid, signal.SIGKILL)
            ev = col.wait_for(lambda e: e.type == "lease_released")
            assert (ev.reason, ev.lease_id, ev.epoch) == ("holder_died", lease_id, int(epoch))
        finally:
            child.kill()
            child.communicate()

        h3 = c.lease("le/res", ttl=5, keepalive=False)
        c.delete("le/res")
        ev = col.wait_for(lambda e: e.type == "lease_released")
        assert (ev.reason, ev.lease_id, ev.epoch) == ("entry_removed", h3.lease_id, h3.epoch)
        assert col.wait_for(lambda e: True).type == "delete"
        h3.release()
