"""``fdbroker serve``: wire the broker to its two sockets and run it on one asyncio loop.

Steps, each separate: claim the run directory (one broker per directory), raise RLIMIT_NOFILE, load the policy,
bind the sockets with restrictive modes, serve, and on SIGTERM/SIGINT stop: refuse new work, end every session,
close every held descriptor, remove the sockets. SIGHUP reloads the policy file (a bad file keeps the old
policy). The service manager hears of readiness, reloads, the watchdog and status through
:class:`~fdbroker.broker.notify.Supervision`; ``--metrics-listen`` serves the metrics (:mod:`.metrics`);
``--log-format`` picks the log lines' form (:mod:`.logs`).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import grp
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from fdbroker import __version__
from fdbroker.broker import closer, fastpath, logs
from fdbroker.broker.core import Broker, BrokerConfig
from fdbroker.broker.listener import Connection, Listener, reap_errored
from fdbroker.broker.metrics import Metrics, MetricsServer, State, check_address
from fdbroker.broker.notify import Supervision, keeper_channel
from fdbroker.broker.policy import Identity, Policy
from fdbroker.broker.rundir import HANDOVER_SOCKET, RunDir
from fdbroker.broker.servicer import FdBrokerServicer, add_to_server
from fdbroker.broker.sessions import Session
from fdbroker.broker.survival import keeper
from fdbroker.broker.survival.fdstore import FdStore
from fdbroker.broker.survival.giving import HandoverServer, released
from fdbroker.broker.survival.receiving import take_over
from fdbroker.conduit.frames import MAX_FRAME_BYTES, Frame, FramedConduit
from fdbroker.errors import BrokerError, Code, InvalidArgument
from fdbroker.rundir import CONDUIT_SOCKET, CONTROL_SOCKET
from fdbroker.v1 import broker_pb2 as pb
from fdbroker.v1 import conduit_pb2 as cpb

log = logging.getLogger("fdbroker.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FdBroker"].full_name


@dataclass
class ServeOptions:
    run_dir: Path
    policy_path: Path | None = None
    socket_mode: int = 0o660
    socket_group: str | None = None
    token_ttl: float = 5.0
    reserve_fds: int = 100
    history: int = 10_000
    watch_queue: int = 4096
    max_frame_bytes: int = MAX_FRAME_BYTES
    takeover: bool = False  # receive the entries of the broker serving run_dir (docs/survival.md)
    handover_timeout: float = 30.0
    fdstore: bool = False  # keep entries in systemd's file-descriptor store (docs/survival.md)
    metrics_listen: str | None = None  # HOST:PORT or unix:PATH (docs/deploy.md, "Operating it")
    log_format: str = "text"  # or "json" (fdbroker.broker.logs)


def _socket_gid(group: str | None) -> int:
    """The gid for ``--socket-group`` (-1: leave the sockets' group alone); :class:`InvalidArgument` if unknown."""
    if group is None:
        return -1
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise InvalidArgument(
            f"--socket-group {group!r}: no such group (give a group name or a numeric gid)"
        ) from None


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number in [low, high], with an error that says so."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not low <= value <= high:  # also refuses nan and inf
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}..{high:g}")
        return value

    return parse


def _keeper_info() -> pb.KeeperInfo | None:
    """What ``GetInfo`` says of the keeper that started this process, if one did (``serve --keeper``)."""
    facts = keeper.facts() if keeper_channel() is not None else None
    if facts is None:
        return None
    return pb.KeeperInfo(pid=facts.pid, restarts=facts.restarts, last_exit=facts.last_exit)


def _metrics_address(address: str) -> None:
    """Refuse a malformed ``--metrics-listen`` before anything is claimed."""
    try:
        check_address(address)
    except ValueError as err:
        raise InvalidArgument(str(err)) from None


def _scrape(srv: BrokerServer) -> State:
    assert srv.broker is not None
    state = srv.broker.metrics_state()
    keeper_info = srv.broker.config.keeper
    state.keeper_restarts = 0 if keeper_info is None else keeper_info.restarts
    events = dict(srv.survival)
    if srv.handover is not None:
        events["handover_failed"] = srv.handover.failures
    if srv.fdstore is not None:
        events["fdstore_failed"] = srv.fdstore.failures
        state.fdstore_descriptors = len(srv.fdstore.stored)
    state.survival_events = events
    return state


def _status(srv: BrokerServer) -> str:
    """``STATUS=`` for the service manager: live counts."""
    b, rundir = srv.broker, srv.rundir
    if b is None or rundir is None:
        return "starting"
    return (
        f"serving {rundir.path}: {len(b.registry)} entries, {len(b.sessions)} sessions, "
        f"revision {b.registry.revision}"
    )


_CODE_NAMES = {int(c): c.name for c in Code}


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class BrokerServer:
    """A running broker: the gRPC server and the conduit listener on one loop."""

    def __init__(self, opts: ServeOptions) -> None:
        self.opts = opts
        self.stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self.rundir: RunDir | None = None
        self.broker: Broker | None = None
        self.grpc_server: grpc.aio.Server | None = None
        self.listener: Listener | None = None
        self.connections: set[Connection] = set()
        self.handover: HandoverServer | None = None
        self._handed_over: FramedConduit | None = None
        self.fdstore: FdStore | None = None
        self.metrics = Metrics()
        self.metrics_server: MetricsServer | None = None
        self.supervision = Supervision(lambda: _status(self), self._healthy)
        self.survival: collections.Counter[str] = collections.Counter()

    def _load_policy(self) -> Policy:
        if self.opts.policy_path is not None:
            return Policy.load(self.opts.policy_path, broker_uid=os.getuid())
        return Policy.default(broker_uid=os.getuid())

    async def start(self) -> None:
        opts = self.opts
        policy = self._load_policy()
        gid = _socket_gid(opts.socket_group)  # every option is checked before the run directory is touched
        if opts.metrics_listen is not None:
            _metrics_address(opts.metrics_listen)
        if not opts.takeover:
            self.rundir = RunDir.claim(opts.run_dir)
        nofile = raise_nofile_limit()
        capacity = max(16, nofile - opts.reserve_fds)
        Connection.fd_ceiling = nofile - opts.reserve_fds // 2  # queued deliveries keep half the reserve free
        self.broker = Broker(
            BrokerConfig(
                capacity=capacity,
                token_ttl=opts.token_ttl,
                history=opts.history,
                watch_queue=opts.watch_queue,
                max_frame_bytes=opts.max_frame_bytes,
                keeper=_keeper_info(),
            ),
            policy,
            wakeup=self._wake.set,
            metrics=self.metrics,
        )
        self.metrics.attach(self)
        self.metrics.native_stats = self.broker.tokens.spec.stats  # Redeems the C table answers itself
        loop = asyncio.get_running_loop()
        if opts.takeover:
            self.rundir = self._take_over()
        assert self.rundir is not None
        if opts.fdstore:
            self.fdstore = FdStore.open(
                self.broker.registry,
                self.rundir.path,
                continue_epochs=self.broker.continue_epochs,
                end_sessions=self.broker.end_handed_over_sessions,
            )

        old_umask = os.umask(0o177)  # no window in which a socket is more open than asked for
        try:
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                    ("grpc.max_send_message_length", 64 * 1024 * 1024),
                    ("grpc.so_reuseport", 0),
                ]
            )
            add_to_server(FdBrokerServicer(self.broker), server)
            self.health = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
            reflection.enable_server_reflection(
                (
                    SERVICE_NAME,
                    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    reflection.SERVICE_NAME,
                ),
                server,
            )
            # Both sockets are bound through the run directory's descriptor (/proc/self/fd/N/NAME), never
            # through its path: they land in the directory RunDir checked, whatever its path leads to now.
            server.add_insecure_port(f"unix:{self.rundir.address(CONTROL_SOCKET)}")
            await server.start()
            self.grpc_server = server

            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            lsock.bind(self.rundir.address(CONDUIT_SOCKET))
            lsock.listen(512)
        finally:
            os.umask(old_umask)
        for name in (CONTROL_SOCKET, CONDUIT_SOCKET):
            if gid != -1:
                os.chown(name, -1, gid, dir_fd=self.rundir.dir_fd, follow_symlinks=False)
            os.chmod(name, opts.socket_mode, dir_fd=self.rundir.dir_fd)
        self.listener = Listener(loop, lsock, self._on_connect)
        if opts.metrics_listen is not None:
            await self._serve_metrics(opts.metrics_listen, gid)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self._housekeeper = asyncio.create_task(self._housekeeping())
        broker = self.broker
        rundir = self.rundir
        self.handover = HandoverServer(
            loop,
            Path(rundir.address(HANDOVER_SOCKET)),
            broker.registry,
            broker.next_epoch,
            broker.clock,
            lambda: rundir.lock_fd,
            self._commit_handover,
            timeout=opts.handover_timeout,
        )
        log.info(
            "fdbroker %s serving: control %s, conduit %s (pid %d, capacity %d descriptors, policy %s)",
            __version__,
            self.rundir.control_path,
            self.rundir.conduit_path,
            os.getpid(),
            capacity,
            policy.source,
        )
        self.supervision.ready(f"MAINPID={os.getpid()}")

    # -- operating it (docs/deploy.md, "Operating it") -----------------------------------------------------------

    async def _serve_metrics(self, address: str, gid: int) -> None:
        """Serve the metrics on ``address``; a relative ``unix:`` path is in the run directory."""
        assert self.rundir is not None
        path = address[len("unix:") :] if address.startswith("unix:") else ""
        bind_path = self.rundir.address(path) if path and not os.path.isabs(path) else ""
        try:
            self.metrics_server = await MetricsServer.start(
                self.metrics, address, mode=self.opts.socket_mode, gid=gid, bind_path=bind_path
            )
        except OSError as err:
            raise InvalidArgument(
                f"--metrics-listen {address}: cannot listen ({err.strerror or err})"
            ) from None
        log.info(
            "metrics on %s (GET /metrics)",
            f"unix:{self.rundir.path / path}" if bind_path else self.metrics_server.where,
        )

    def metrics_state(self) -> State:
        """The broker's state and survival's, for a scrape (:class:`~fdbroker.broker.metrics.StateView`)."""
        return _scrape(self)

    def _healthy(self) -> bool:
        """The loop is turning (the caller runs on it) and housekeeping (expiries) is alive."""
        hk = getattr(self, "_housekeeper", None)
        return hk is not None and not hk.done() and not self.stopping.is_set()

    # -- survival (docs/survival.md) -----------------------------------------------------------------------------

    def _take_over(self) -> RunDir:
        assert self.broker is not None
        run_dir = self.opts.run_dir
        dir_fd = RunDir.open(run_dir)  # an unsafe run dir is refused while the old broker still serves
        try:
            t = take_over(run_dir, self.broker, timeout=self.opts.handover_timeout)
        except BaseException:
            os.close(dir_fd)
            raise
        rundir = RunDir.adopt(run_dir, dir_fd, t.lock_fd)
        self.survival["takeover"] += 1
        log.info(
            "took over %d entries from pid %d in %.3f s (revision %d)",
            t.entries,
            t.old_pid,
            t.seconds,
            t.revision,
        )
        return rundir

    def _commit_handover(self, conn: FramedConduit) -> None:
        """The successor has every entry: stop everything that could change the registry, now, then exit."""
        self._handed_over = conn
        self.survival["handover"] += 1
        if self.fdstore is not None:
            self.fdstore.detach()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        for c in list(self.connections):
            c.close()
        self.stopping.set()

    # -- conduit -------------------------------------------------------------------------------------------------

    def _on_connect(self, sock: socket.socket, identity: Identity) -> None:
        assert self.broker is not None
        broker = self.broker
        loop = asyncio.get_running_loop()
        conn = Connection(
            loop,
            sock,
            identity,
            self._on_frame,
            self._on_conn_close,
            max_frame_bytes=self.opts.max_frame_bytes,
            max_fds_in_flight=lambda: broker.limits.max_fds_in_flight_per_uid,
            on_pause=self.metrics.conduit_pauses.inc,  # no labels
            native=broker.tokens.spec if fastpath.is_native(broker.tokens.spec) else None,
        )
        try:
            session = self.broker.open_session(identity, conn)
        except BrokerError as err:
            conn.send(cpb.ConduitFrame(error=cpb.Error(code=int(err.code), message=err.message)))
            conn.close()
            return
        conn.session = session
        if conn.native is not None:
            conn.native.key = session.key  # the native reader serves this session's prefetched tokens
        if conn.closed:
            # The peer was gone before its Welcome went out (the send failed and closed the connection before it
            # had a session to end): end it now, or it would hold its uid's session quota for good.
            self.broker.end_session(session)
            return
        self.connections.add(conn)

    def _on_frame(self, conn: Connection, frame: Frame) -> None:
        """One frame for its session, timed and counted."""
        assert self.broker is not None
        s = conn.session
        if not isinstance(s, Session):
            frame.close_fds()
            return
        t0 = time.perf_counter()
        code: int = Code.INTERNAL  # unless dispatch returns: the listener logs what it raised
        try:
            code = self.broker.on_frame(s, frame)
        finally:
            kind = frame.message.WhichOneof("body") or "empty"
            self.metrics.frame(kind, _CODE_NAMES.get(code, str(code)), time.perf_counter() - t0)

    def _on_conn_close(self, conn: Connection) -> None:
        self.connections.discard(conn)
        s = conn.session
        if isinstance(s, Session) and self.broker is not None:
            self.broker.end_session(s)

    # -- housekeeping --------------------------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        assert self.broker is not None
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            reap_errored(self.connections)  # uvloop never tells a reader that its peer reset the connection
            nxt = self.broker.tick()
            delay = 1.0 if nxt is None else max(0.0, min(1.0, nxt - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay + 0.001)

    def reload_policy(self) -> None:
        """SIGHUP: reload the policy file, telling the service manager (RELOADING=1 ... READY=1, also when there
        is nothing to reload: Type=notify-reload waits for the pair after every SIGHUP)."""
        self.supervision.reloading(f"reloading the policy from {self.opts.policy_path or '(none)'}")
        try:
            if self.broker is None or self.opts.policy_path is None:
                log.info("SIGHUP: no policy file configured; nothing to reload")
                return
            self.broker.set_policy(self._load_policy())
            log.info("policy reloaded from %s", self.opts.policy_path)
        except BrokerError as err:
            log.error("policy reload failed, keeping the old policy: %s", err)
        finally:
            self.supervision.ready()

    async def stop(self) -> None:
        self.supervision.stopping()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if hasattr(self, "_housekeeper"):
            self._housekeeper.cancel()
        if self.handover is not None:
            self.handover.close()
        if self.fdstore is not None:
            self.fdstore.close()  # the store keeps the entries for the next start
        if self.listener is not None:
            self.listener.close()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=0.5)
        for conn in list(self.connections):
            conn.close()
        if self.broker is not None:
            self.broker.close()
        closer.drain(timeout=2.0)  # a lingering socket may take longer; the kernel finishes it at exit
        if self._handed_over is not None and self.rundir is not None:
            self.rundir.abandon()  # the successor holds the same lock: no unlink, no release
            self.rundir = None
            released(self._handed_over)
            log.info("fdbroker handed over and stopped")
            return
        if self.rundir is not None:
            self.rundir.release()
        log.info("fdbroker stopped")


async def serve(opts: ServeOptions) -> int:
    """Run a broker until SIGTERM or SIGINT; return the process exit code."""
    srv = BrokerServer(opts)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, srv.stopping.set)
    loop.add_signal_handler(signal.SIGHUP, srv.reload_policy)
    try:
        await srv.start()
    except BrokerError as err:
        print(f"fdbroker serve: {err.message}", file=sys.stderr)
        await srv.stop()
        return 1
    await srv.stopping.wait()
    await srv.stop()
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``fdbroker serve`` (shared by the CLI and ``python -m fdbroker.broker.server``)."""
    from fdbroker import timespan  # durations as the rest of the CLI reads them (systemd time spans)

    parser.add_argument(
        "--policy",
        metavar="FILE",
        default=os.environ.get("FDBROKER_POLICY"),
        help="policy TOML file (env FDBROKER_POLICY; default: built-in policy, see docs/policy.md); "
        "SIGHUP reloads it",
    )
    parser.add_argument(
        "--socket-mode",
        metavar="OCTAL",
        default="0660",
        type=lambda s: int(s, 8),
        help="permission bits of control.sock and conduit.sock (default 0660: owner and group)",
    )
    parser.add_argument("--socket-group", metavar="GROUP", help="group owning the sockets (name or gid)")
    parser.add_argument(
        "--token-ttl",
        metavar="DURATION",
        type=timespan.arg_type(minimum=0.01, maximum=3600),
        default=5.0,
        help="lifetime of a handoff token, 10ms..1h (default 5s; docs/cli.md: durations)",
    )
    parser.add_argument(
        "--reserve-fds",
        metavar="N",
        type=_bounded(int, 20, 1 << 20),
        default=100,
        help="descriptors kept back from RLIMIT_NOFILE for the broker itself (default 100); "
        "the rest is the number of entries it can hold",
    )
    parser.add_argument(
        "--history",
        metavar="N",
        type=_bounded(int, 1, 10_000_000),
        default=10_000,
        help="events kept for Watch resumption (default 10000)",
    )
    parser.add_argument(
        "--watch-queue",
        metavar="N",
        type=_bounded(int, 1, 10_000_000),
        default=4096,
        help="events buffered per watcher before a watcher that falls behind is cut off with "
        "RESOURCE_EXHAUSTED (default 4096)",
    )
    parser.add_argument(
        "--takeover",
        action="store_true",
        help="take every entry over from the broker serving this run directory (upgrade without losing "
        "entries; it exits 0 once the handover is done, see docs/survival.md)",
    )
    parser.add_argument(
        "--handover-timeout",
        metavar="DURATION",
        type=timespan.arg_type(minimum=0.1, maximum=3600),
        default=30.0,
        help="how long either side of a handover waits for the other, 100ms..1h (default 30s)",
    )
    parser.add_argument(
        "--fdstore",
        action="store_true",
        default=os.environ.get("FDBROKER_FDSTORE", "") not in ("", "0", "no", "false"),
        help="keep every entry in systemd's file-descriptor store too (FDSTORE=1), and restore entries "
        "from it at start, so a crash or restart loses none (env FDBROKER_FDSTORE=1; needs NOTIFY_SOCKET "
        "and FileDescriptorStoreMax=; see docs/survival.md)",
    )
    parser.add_argument(
        "--keeper",
        action="store_true",
        help="run under a keeper: this process stays small (no gRPC), runs the broker as its child with "
        "--fdstore and keeps a copy of every entry, so a broker that crashes, is OOM-killed or kill -9ed "
        "comes back with every entry; reaps, forwards signals, restarts with back-off (SIGUSR2: restart now); "
        "fit to be a container's PID 1 (see docs/survival.md)",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("FDBROKER_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity on stderr (default info; env FDBROKER_LOG_LEVEL)",
    )
    # Operating it (docs/deploy.md): metrics, log format.
    parser.add_argument(
        "--metrics-listen",
        metavar="ADDRESS",
        default=os.environ.get("FDBROKER_METRICS_LISTEN") or None,
        help="serve Prometheus metrics (GET /metrics) on HOST:PORT (e.g. 127.0.0.1:9464) or unix:PATH (a "
        "relative PATH is in the run directory; mode and group as --socket-mode/--socket-group); "
        "default: off (env FDBROKER_METRICS_LISTEN)",
    )
    parser.add_argument(
        "--log-format",
        default=os.environ.get("FDBROKER_LOG_FORMAT", "text"),
        choices=list(logs.FORMATS),
        help="log lines as text or as one JSON object per line (default text; env FDBROKER_LOG_FORMAT); "
        "under journald without timestamps and with syslog priorities",
    )


def options_from_args(args: argparse.Namespace, run_dir: Path) -> ServeOptions:
    return ServeOptions(
        run_dir=run_dir,
        policy_path=Path(args.policy) if args.policy else None,
        socket_mode=args.socket_mode,
        socket_group=args.socket_group,
        token_ttl=args.token_ttl,
        reserve_fds=args.reserve_fds,
        history=args.history,
        watch_queue=args.watch_queue,
        takeover=args.takeover,
        handover_timeout=args.handover_timeout,
        fdstore=args.fdstore,
        metrics_listen=args.metrics_listen,
        log_format=args.log_format,
    )


def run(opts: ServeOptions, log_level: str = "info") -> int:
    """Configure logging and run the broker in the foreground; return the exit code."""
    logs.configure(log_level, opts.log_format)
    try:
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(serve(opts))
    except KeyboardInterrupt:
        return 0


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The broker's event loop: uvloop's when it is installed (a dependency on Linux x86-64 and aarch64: the
    gRPC server and the conduit both run on it, measured in docs/performance.md), the standard one otherwise or
    with ``FDBROKER_LOOP=asyncio``."""
    if os.environ.get("FDBROKER_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def main(argv: list[str] | None = None) -> int:
    """``python -m fdbroker.broker.server [--run-dir DIR] [serve options]``."""
    from fdbroker.rundir import resolve_run_dir

    parser = argparse.ArgumentParser(prog="fdbroker serve")
    parser.add_argument("--run-dir", default=None)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.keeper:
        parser.error("--keeper is `fdbroker serve --keeper` (the keeper must not load this module)")
    return run(options_from_args(args, resolve_run_dir(args.run_dir)), args.log_level)


if __name__ == "__main__":
    sys.exit(main())
