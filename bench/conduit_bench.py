"""fdbroker.conduit against a bare socket.send_fds/recv_fds loop, interleaved, between the same two processes.

Protocol per op (as /work/shared/bench/anchors/scm_floor.py): the client sendall()s a 32-byte request,
the server answers with the descriptor(s), the client closes them. The request's first byte picks the
responder, so every variant runs over the same connection between the same two processes, round after round:

  bare-1     socket.send_fds(1 byte + 1 fd)       / socket.recv_fds(MSG_CMSG_CLOEXEC)
  conduit-1  Conduit.transfer_fd(fd, keep=True)    / Conduit.receive_fd()
  bare-253   socket.send_fds(1 byte + 253 fds)    / socket.recv_fds(MSG_CMSG_CLOEXEC)
  conduit-253 Conduit.transfer_fds(253, keep=True) / Conduit.receive_fds()

usage: python bench/conduit_bench.py [--quick] [--rounds N] [--iters N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

from fdbroker.conduit import Conduit

REQ = 32
MODES = {"bare-1": b"b", "conduit-1": b"c", "bare-253": b"B", "conduit-253": b"C"}
PAIRS = [("conduit-1", "bare-1", 1.3), ("conduit-253", "bare-253", 1.2)]


def serve(sock: socket.socket) -> None:
    c = Conduit.from_socket(sock)
    fds = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(253)]
    one = [fds[0]]
    payload = [b"x"]
    buf = bytearray(REQ)
    view = memoryview(buf)
    send_fds = socket.send_fds
    transfer_fd = c.transfer_fd
    transfer_fds = c.transfer_fds
    while True:
        got = 0
        while got < REQ:
            n = sock.recv_into(view[got:], REQ - got)
            if n == 0:
                os._exit(0)
            got += n
        m = buf[0]
        if m == 0x62:  # b
            send_fds(sock, payload, one)
        elif m == 0x63:  # c
            transfer_fd(one[0], keep=True)
        elif m == 0x42:  # B
            send_fds(sock, payload, fds)
        elif m == 0x43:  # C
            transfer_fds(fds, keep=True)
        else:
            os._exit(0)


def run_bare(sock: socket.socket, req: bytes, nfds: int, iters: int) -> float:
    sendall = sock.sendall
    recv_fds = socket.recv_fds
    flags = socket.MSG_CMSG_CLOEXEC
    close = os.close
    t0 = time.perf_counter()
    for _ in range(iters):
        sendall(req)
        _, fds, _, _ = recv_fds(sock, 1, nfds, flags)
        if len(fds) != nfds:
            raise SystemExit(f"bare: got {len(fds)} fds")
        for fd in fds:
            close(fd)
    return time.perf_counter() - t0


def run_conduit(c: Conduit, req: bytes, nfds: int, iters: int) -> float:
    sendall = c.sock.sendall
    close = os.close
    t0 = time.perf_counter()
    if nfds == 1:
        receive_fd = c.receive_fd
        for _ in range(iters):
            sendall(req)
            close(receive_fd())
    else:
        receive_fds = c.receive_fds
        for _ in range(iters):
            sendall(req)
            fds = receive_fds()
            if len(fds) != nfds:
                raise SystemExit(f"conduit: got {len(fds)} fds")
            for fd in fds:
                close(fd)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few rounds, short runs (smoke test)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None, help="single-descriptor ops per round (batch: /10)")
    a = ap.parse_args()
    rounds = a.rounds or (3 if a.quick else 9)
    iters1 = a.iters or (2000 if a.quick else 20000)
    iters253 = max(1, iters1 // 10)

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:
        ours.close()
        serve(theirs)
    theirs.close()
    c = Conduit.from_socket(ours)
    sock = c.sock
    results: dict[str, list[float]] = {m: [] for m in MODES}
    print(
        f"conduit_bench: {rounds} rounds, {iters1} ops (1 fd) / {iters253} ops (253 fds) "
        "per variant per round"
    )
    print(f"{'round':>5} {'variant':<12} {'us/op':>9} {'fds/s':>12}   ratio")
    try:
        for rnd in range(-1, rounds):  # round -1 warms up and is not reported
            row: dict[str, float] = {}
            for name, code in MODES.items():
                nfds = 253 if name.endswith("253") else 1
                n = iters253 if nfds == 253 else iters1
                if rnd < 0:
                    n = max(1, n // 10)
                req = code * REQ
                bare = name.startswith("bare")
                dt = run_bare(sock, req, nfds, n) if bare else run_conduit(c, req, nfds, n)
                row[name] = dt / n * 1e6
            if rnd < 0:
                continue
            for name in MODES:
                results[name].append(row[name])
            for ours_name, bare_name, _ in PAIRS:
                nfds = 253 if ours_name.endswith("253") else 1
                for name in (bare_name, ours_name):
                    us = row[name]
                    ratio = f"{row[ours_name] / row[bare_name]:.3f}" if name == ours_name else ""
                    print(f"{rnd:>5} {name:<12} {us:>9.2f} {nfds / us * 1e6:>12.0f}   {ratio}", flush=True)
        print("median:")
        for ours_name, bare_name, target in PAIRS:
            nfds = 253 if ours_name.endswith("253") else 1
            mo, mb = statistics.median(results[ours_name]), statistics.median(results[bare_name])
            ratios = [o / b for o, b in zip(results[ours_name], results[bare_name], strict=True)]
            mr = statistics.median(ratios)
            verdict = "ok" if mr <= target else "OVER TARGET"
            print(
                f"  {ours_name:<12} {mo:9.2f} us/op {nfds / mo * 1e6:12.0f} fds/s | "
                f"{bare_name:<9} {mb:9.2f} us/op "
                f"{nfds / mb * 1e6:12.0f} fds/s | median ratio {mr:.3f} (target <= {target}) {verdict}"
            )
    finally:
        sock.sendall(b"q" * REQ)
        c.close()
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
