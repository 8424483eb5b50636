"""End-to-end handoffs through a real broker process: put / get / take / delete / stat / list, each descriptor
kind, proven to work on the receiving side, and the broker's descriptor count checked after every test (the
``fdbroker_broker`` fixture)."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest
from brokerutil import run_client, spawn_client

from fdbroker.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)


def test_put_pipe_then_another_process_writes_through_it(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            e = c.put("pipes/audit", w)
            assert e.kind == "pipe" and e.revision > 0
        os.close(w)
        w = -1
        run_client(
            fdbroker_broker.run_dir,
            """
            import fdbroker, os
            with fdbroker.Client() as c:
                f = c.get_fd("pipes/audit")
                os.write(f.fileno(), b"hello from the other side")
                f.close()
            """,
        )
        os.set_blocking(r, False)
        assert os.read(r, 100) == b"hello from the other side"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


def test_tcp_listener_received_by_another_process_accepts(fdbroker_broker):
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    with fdbroker_broker.client() as c:
        e = c.put("web/http", lsock, labels={"tier": "web"})
        assert e.kind == "tcp-listener" and e.local_address == f"127.0.0.1:{port}" and e.listening
    lsock.close()  # only the broker holds the listener now
    child = spawn_client(
        fdbroker_broker.run_dir,
        """
        import fdbroker, socket
        with fdbroker.Client() as c:
            s = c.get("web/http")
            assert isinstance(s, socket.socket) and s.family == socket.AF_INET, s
            print("READY", flush=True)
            conn, _ = s.accept()
            conn.sendall(b"served by " + str(s.getsockname()[1]).encode())
            conn.close(); s.close()
        """,
    )
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        assert conn.recv(100) == f"served by {port}".encode()
    assert child.wait(10) == 0


def test_file_shares_offset_and_memfd_content(fdbroker_broker, tmp_path):
    p = tmp_path / "log"
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    m = os.memfd_create("cfg")
    os.write(m, b"config-bytes")
    try:
        with fdbroker_broker.client() as c:
            ef = c.put("log/audit", fd)
            em = c.put("mem/cfg", m)
            assert ef.kind == "file" and ef.path == str(p) and "O_APPEND" in ef.flags
            assert em.kind == "memfd"
            got = c.get("log/audit")
            got.write(b"via broker\n")
            got.close()
            mm = c.get("mem/cfg")
            assert os.pread(mm.fileno(), 100, 0) == b"config-bytes"
            mm.close()
        os.write(fd, b"direct\n")
        assert p.read_bytes() == b"via broker\ndirect\n"
    finally:
        os.close(fd)
        os.close(m)


def test_udp_unix_eventfd_kinds(fdbroker_broker, tmp_path):
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.bind(("127.0.0.1", 0))
    ul = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ul.bind(str(tmp_path / "x.sock"))
    ul.listen()
    ev = os.eventfd(0)
    try:
        with fdbroker_broker.client() as c:
            kinds = {e.name: e.kind for e in c.put_many([("k/udp", u), ("k/unix", ul), ("k/ev", ev)])}
            assert kinds == {"k/udp": "udp", "k/unix": "unix-listener", "k/ev": "eventfd"}
            got_ev = c.get("k/ev")
            os.eventfd_write(got_ev.fileno(), 7)
            got_ev.close()
            assert os.eventfd_read(ev) == 7
            gu = c.get("k/udp")
            assert gu.type == socket.SOCK_DGRAM
            gu.sendto(b"dgram", u.getsockname())
            gu.close()
            assert u.recv(10) == b"dgram"
    finally:
        u.close()
        ul.close()
        os.close(ev)


def test_take_moves_and_removes_entry(fdbroker_broker):
    r, w = os.pipe()
    with fdbroker_broker.client() as c:
        c.put("q/jobs", w)
        os.close(w)
        taken = c.take("q/jobs")
        with pytest.raises(NotFound):
            c.stat("q/jobs")
        os.write(taken.fileno(), b"x")
        taken.close()
    assert os.read(r, 1) == b"x"
    os.close(r)


def test_stat_list_delete_and_errors(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            for n in ["a/one", "a/two", "b/three"]:
                c.put(n, r, labels={"grp": n[0]})
            listing = c.list("a/")
            assert [e.name for e in listing] == ["a/one", "a/two"]
            assert listing.revision >= 3
            assert [e.name for e in c.list(selector="grp=b")] == ["b/three"]
            paged = c.list(page_size=1)
            assert [e.name for e in paged] == ["a/one", "a/two", "b/three"]
            with pytest.raises(AlreadyExists) as ei:
                c.put("a/one", w)
            assert "a/one" in str(ei.value)
            rev = c.stat("a/one").revision
            with pytest.raises(FailedPrecondition):
                c.put("a/one", w, if_revision=rev + 1000)
            e = c.put("a/one", w, if_revision=rev)
            assert e.kind == "pipe" and e.revision > rev
            with pytest.raises(InvalidArgument):
                c.put("bad//name", w)
            with pytest.raises(InvalidArgument):
                c.put("bad:name", w)
            with pytest.raises(NotFound) as nf:
                c.get("nope/none")
            assert "nope/none" in str(nf.value)
            c.delete("a/one")
            with pytest.raises(NotFound):
                c.delete("a/one")
            assert [e.name for e in c.list()] == ["a/two", "b/three"]
    finally:
        os.close(r)
        os.close(w)


def test_batch_get_of_300_entries_crosses_message_limit(fdbroker_broker):
    fds = [os.eventfd(i + 1) for i in range(300)]
    try:
        with fdbroker_broker.client() as c:
            names = [f"batch/e{i:03d}" for i in range(300)]
            c.put_many(list(zip(names, fds, strict=True)))
            got = c.get_many(names)
            assert len(got) == 300
            for i, g in enumerate(got):
                assert os.eventfd_read(g.fileno()) == i + 1  # each one is the right descriptor, in order
                g.close()
    finally:
        for fd in fds:
            os.close(fd)


def test_repeated_gets_use_prefetched_tokens(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client(prefetch=8) as c:
            c.put("p/x", w)
            for _ in range(20):
                g = c.get_fd("p/x")
                os.write(g.fileno(), b".")
                g.close()
            # 1 RPC brings 1 + 8 copies, and the Redeem of each last token 8 more (Redeem.refill): 20 gets =
            # 1 RPC + 19 redeems of prefetched tokens
            assert (c.stats["get_rpcs"], c.stats["redeems"], c.stats["refills"]) == (1, 19, 2)
            # replacing the entry voids the prefetched tokens: the next get must see the new descriptor
            r2, w2 = os.pipe()
            c.put("p/x", w2, replace=True)
            os.close(w2)
            g = c.get_fd("p/x")
            os.write(g.fileno(), b"!")
            g.close()
            assert os.read(r2, 10) == b"!"
            os.close(r2)
        assert os.read(r, 100) == b"." * 20
    finally:
        os.close(r)
        os.close(w)


def test_anonymous_can_list_but_not_move(fdbroker_broker):
    r, w = os.pipe()
    try:
        with fdbroker_broker.client() as c:
            c.put("anon/x", r)
        out = run_client(
            fdbroker_broker.run_dir,
            """
            import fdbroker
            from fdbroker.v1 import broker_pb2 as pb
            from fdbroker.errors import Unauthenticated
            c = fdbroker.Client()
            print([e.name for e in c.list()])
            try:
                c.raw.call("Get", pb.GetRequest(name="anon/x"), session=False)
            except Unauthenticated as e:
                print("UNAUTH", e)
            """,
        )
        assert "['anon/x']" in out.stdout and "UNAUTH" in out.stdout
    finally:
        os.close(r)
        os.close(w)


def test_unknown_session_is_unauthenticated(fdbroker_broker):
    with fdbroker_broker.client() as c:
        from fdbroker.v1 import broker_pb2 as pb

        with pytest.raises(Unauthenticated) as ei:
            c.raw.call("Get", pb.GetRequest(name="x"), session="made-up-session-id")
        assert "session" in str(ei.value)


def test_ephemeral_entries_vanish_when_the_owner_is_killed(fdbroker_broker):
    child = spawn_client(
        fdbroker_broker.run_dir,
        """
        import fdbroker, os, time
        r, w = os.pipe()
        with fdbroker.Client() as c:
            c.put("eph/mine", r, ephemeral=True)
            c.put("eph/kept", r)
            print("PUT", flush=True)
            time.sleep(60)
        """,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "PUT"
    with fdbroker_broker.client() as c:
        assert {e.name for e in c.list("eph/")} == {"eph/mine", "eph/kept"}
        child.send_signal(signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and "eph/mine" in {e.name for e in c.list("eph/")}:
            time.sleep(0.02)
        assert {e.name for e in c.list("eph/")} == {"eph/kept"}
        c.delete("eph/kept")


def test_repeated_batch_gets_use_batch_tokens_and_see_replacements(fdbroker_broker):
    fds = [os.eventfd(0) for _ in range(253)]
    names = [f"bt/e{i:03d}" for i in range(253)]
    try:
        with fdbroker_broker.client() as c:
            c.put_many(list(zip(names, fds, strict=True)))
            for _ in range(4):
                got = c.get_many(names, raw=True)
                for g in got:
                    os.eventfd_write(g.fileno(), 1)  # through the copy, into the very same eventfd
                    g.close()
            # adaptive: the first round asks for no batch token, the second for some, the rest redeem them
            assert (c.stats["batch_get_rpcs"], c.stats["redeems"]) == (2, 2)
            for i, fd in enumerate(fds):
                assert os.eventfd_read(fd) == 4, f"entry {i} was not delivered in order every round"
            # replace one entry: the batch tokens must not hand out the old descriptor
            fresh = os.eventfd(0)
            c.put(names[100], fresh, replace=True)
            got = c.get_many(names, raw=True)
            os.eventfd_write(got[100].fileno(), 7)
            for g in got:
                g.close()
            assert os.eventfd_read(fresh) == 7
            os.close(fresh)
    finally:
        for fd in fds:
            os.close(fd)


# -- every frame fits the negotiated max_frame_bytes ------------------------------------------------------------


def _deep_file() -> tuple[int, str]:
    """A file opened at a path of ~3,800 bytes (each Deliver item and each Entry carries it), open read-only."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="fdb-deep-", dir="/tmp"))
    for i in range(15):
        d = d / (f"{i:02d}" + "d" * 248)
    d.mkdir(parents=True)
    (d / "f").write_bytes(b"deep")
    return os.open(d / "f", os.O_RDONLY), str(d / "f")


def test_batches_of_long_names_and_big_entries_come_in_frames_that_fit(fdbroker_broker):
    """253 entries with names of 249 bytes, 16 labels of 255-byte values and a ~3.8 KiB path: their Deposited
    answer (~2 MiB) and their BatchGet's Deliver (~1 MiB) are split into frames of at most the 65536 bytes the
    broker announced. Before, the Deliver went out as one frame the client had to refuse (the session ended) and
    the Deposited was never sent (the client timed out)."""
    import shutil

    from secutil import Control, RawConduit

    from fdbroker.v1 import broker_pb2 as pb
    from fdbroker.v1 import conduit_pb2 as cpb

    fd, path = _deep_file()
    names = [f"long/{i:03d}/" + "n" * 240 for i in range(253)]
    labels = {f"k{j:02d}": "v" * 255 for j in range(16)}
    try:
        with fdbroker_broker.client(timeout=30) as c:
            assert c.raw.call("GetInfo", pb.GetInfoRequest()).max_frame_bytes == 65536
            entries = c.put_many([(n, fd) for n in names], labels=labels)
            assert [e.name for e in entries] == names
            assert all(dict(e.raw.labels) == labels and e.raw.info.path == path for e in entries)
            for _ in range(3):  # the first BatchGet, then the prefetched batch (if any was given)
                got = c.get_many_fds(names)
                try:
                    assert len(got) == 253
                    assert all(os.fstat(g).st_ino == os.fstat(fd).st_ino for g in got)
                finally:
                    for g in got:
                        os.close(g)
        # By hand: the frames themselves (RawConduit's decoder refuses any frame over 65536 bytes).
        with RawConduit(fdbroker_broker.run_dir) as rc, Control(fdbroker_broker.run_dir) as ctl:
            r = ctl.call("BatchGet", pb.BatchGetRequest(names=names), rc.session_id)
            items: list[bytes] = []
            while len(items) < 253:
                f = rc.recv()
                assert f.message.WhichOneof("body") == "deliver", f.message
                assert 4 + f.message.ByteSize() <= 4 + 65536 and len(f.fds) == len(f.message.deliver.items)
                items += [i.token for i in f.message.deliver.items]
                f.close_fds()
            assert items == [h.token for h in r.handoffs]  # in order, each under its token
            assert len(rc.queue) == 0
            # 253 prefetched single tokens redeemed in one Redeem frame: answered in frames that fit too (the native
            # data plane answers such a frame itself only when its Deliver fits one frame).
            singles = [
                bytes(ctl.call("Get", pb.GetRequest(name=n, prefetch=1), rc.session_id).prefetch_tokens[0])
                for n in names
            ]
            for _ in range(253):
                rc.recv_kind("deliver")  # the Gets' own copies
            rc.send(cpb.ConduitFrame(redeem=cpb.Redeem(tokens=singles)))
            items = []
            while len(items) < 253:
                f = rc.recv()
                assert f.message.WhichOneof("body") == "deliver", f.message
                assert 4 + f.message.ByteSize() <= 4 + 65536 and len(f.fds) == len(f.message.deliver.items)
                items += [i.token for i in f.message.deliver.items]
                f.close_fds()
            assert items == singles
            toks = [ctl.put_token(rc.session_id, n, replace=True) for n in names[:253]]
            rc.send(cpb.ConduitFrame(deposit=cpb.Deposit(tokens=toks)), [fd] * 253)
            results: list[cpb.DepositResult] = []
            frames = 0
            while len(results) < 253:
                (d, _) = rc.recv_kind("deposited")
                results += list(d.results)
                frames += 1
            assert frames > 1 and [x.token for x in results] == toks
            assert all(not x.HasField("error") and x.entry.labels == {} for x in results)
            for n in names:
                ctl.call("Delete", pb.DeleteRequest(name=n), rc.session_id)
    finally:
        os.close(fd)
        shutil.rmtree(path.split("/00")[0], ignore_errors=True)
