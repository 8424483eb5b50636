"""What both clients share, written once: the constructor, the verbs, the state they report.

Each verb is the flow of the same name in :mod:`fdbroker.client.flows`; :class:`Verb` makes it a method of a
driver. On :class:`fdbroker.Client` (a :class:`BlockingVerbs`) ``c.put(name, fd)`` returns the entry; on
:class:`fdbroker.aio.Client` (an :class:`AsyncVerbs`) it returns a coroutine of it. Signature and docstring are
the flow's (without its first parameter, the client's :class:`~fdbroker.client.flows.State`), so the two clients
cannot drift apart: a verb exists in both or in neither. ``lease`` (:class:`LeaseVerb`) hands its grant to the
driver's ``_lease_handle``, which makes the driver's own handle; ``watch``, whose stream is read differently by
each, is written in each driver.
"""

from __future__ import annotations

import collections
import inspect
import os
import types
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, Generic, ParamSpec, TypeVar, overload

from fdbroker.client import flows
from fdbroker.client.flows import Granted, State
from fdbroker.client.prefetch import Signal
from fdbroker.client.session import Mailbox, session_gone
from fdbroker.client.steps import Flow
from fdbroker.client.trust import Paths, Trust, TrustUids, socket_address
from fdbroker.errors import Cancelled

if TYPE_CHECKING:
    from fdbroker.client.aio import PendingLease
    from fdbroker.client.sync import LeaseHandle

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable[..., Any])


def verb_method(method: F, flow: Callable[..., Any], name: str | None = None) -> F:
    """Give a driver's ``method`` the name, documentation and signature of the ``flow`` it drives, whose first
    parameter (the client's :class:`~fdbroker.client.flows.State`) becomes ``self``."""
    sig = inspect.signature(flow)
    params = list(sig.parameters.values())
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    method.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=[self_param, *params[1:]], return_annotation=inspect.Signature.empty
    )
    method.__name__ = method.__qualname__ = name or flow.__name__
    method.__doc__ = flow.__doc__
    return method


class _Binding(Generic[P, T]):
    """A flow as a method of whichever driver it is read from: one function per driver class, made on first use;
    its result goes through the driver's method ``then`` if one is named. A driver that has the method named
    ``hot`` serves the verb with it instead (same arguments): a hot path that must do exactly what the flow does,
    and drives the flow for everything it does not do itself."""

    def __init__(self, flow: Callable[Concatenate[State, P], Flow[T]], then: str = "", hot: str = "") -> None:
        self.flow = flow
        self.then = then
        self.hot = hot
        self.name = flow.__name__
        self._methods: dict[type, Callable[..., Any]] = {}

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def _bind(self, obj: Any, objtype: Any) -> Any:
        cls = type(obj) if obj is not None else objtype
        method = self._methods.get(cls)
        if method is None:
            if not issubclass(cls, (BlockingVerbs, AsyncVerbs)):
                return self  # read from Verbs itself
            hot = getattr(cls, self.hot, None) if self.hot else None
            method = verb_method(_verb_function(self.flow, self.then, hot), self.flow, self.name)
            self._methods[cls] = method
        return method if obj is None else method.__get__(obj, cls)


def _verb_function(
    flow: Callable[..., Flow[Any]], then: str, hot: types.FunctionType | None = None
) -> Callable[..., Any]:
    """The method of a verb: what the driver's ``_drive`` makes of the flow — its result (a blocking driver) or a
    coroutine of it (an asyncio driver) — passed through the driver's method ``then`` if one is named; or the
    driver's hot path ``hot`` (its function), if it has one."""
    if hot is not None:
        # A copy of the hot path itself (verb_method gives it the verb's name, signature and documentation): no
        # wrapper frame, no packing of arguments, on the path that exists to be cheap.
        copy = types.FunctionType(
            hot.__code__, hot.__globals__, hot.__name__, hot.__defaults__, hot.__closure__
        )
        copy.__kwdefaults__ = hot.__kwdefaults__
        return copy
    if then:

        def verb(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, then)(self._drive(flow(self._state, *args, **kwargs)))

    else:

        def verb(self: Any, /, *args: Any, **kwargs: Any) -> Any:
            return self._drive(flow(self._state, *args, **kwargs))

    return verb


class Verb(_Binding[P, T]):
    """A verb: the flow ``flow`` as a method of whichever driver it is read from (see the module docstring)."""

    @overload
    def __get__(self, obj: None, objtype: type) -> Callable[Concatenate[Any, P], Any]: ...

    @overload
    def __get__(self, obj: BlockingVerbs, objtype: type | None = None) -> Callable[P, T]: ...

    @overload
    def __get__(
        self, obj: AsyncVerbs, objtype: type | None = None
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self._bind(obj, objtype)


class LeaseVerb(_Binding[P, Granted]):
    """The ``lease`` verb: the grant becomes the driver's handle (``_lease_handle``): a ``LeaseHandle`` of the
    blocking client, a :class:`~fdbroker.client.aio.PendingLease` (await it, or ``async with`` it) of the
    asyncio one."""

    @overload
    def __get__(self, obj: None, objtype: type) -> Callable[Concatenate[Any, P], Any]: ...

    @overload
    def __get__(self, obj: BlockingVerbs, objtype: type | None = None) -> Callable[P, LeaseHandle]: ...

    @overload
    def __get__(self, obj: AsyncVerbs, objtype: type | None = None) -> Callable[P, PendingLease]: ...

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        return self._bind(obj, objtype)


class Verbs:
    """What both clients share: the constructor (its arguments are documented on the clients), the verbs (each
    documented on its flow in :mod:`fdbroker.client.flows`) and the state accessors. A driver subclasses
    :class:`BlockingVerbs` or :class:`AsyncVerbs`, sets ``_new_signal`` and adds the I/O."""

    _new_signal: Callable[[], Signal]
    _public_name = "fdbroker client"

    def __init__(
        self,
        run_dir: str | os.PathLike[str] | None = None,
        *,
        timeout: float = 10.0,
        prefetch: int | None = None,
        trust_uids: TrustUids | None = None,
        reconnect: bool = True,
    ) -> None:
        self.paths = Paths.resolve(run_dir)
        self.trust = Trust(trust_uids)
        self.prefetch = prefetch
        self._state = State(prefetch, self._new_signal, timeout=timeout, reconnect=reconnect)
        self._box = Mailbox()  # the session's answers on the conduit
        self._dir_fd = -1  # the run directory, opened (and checked) on first use; we connect through it
        self._stub: Any = None
        self._closed = False
        self._init_io()

    def _init_io(self) -> None:
        """Set up the driver's own state (called at the end of the constructor)."""

    @property
    def timeout(self) -> float:
        """Seconds each call may take, tries again after the broker went away included."""
        return self._state.timeout

    @timeout.setter
    def timeout(self, seconds: float) -> None:
        self._state.timeout = seconds

    @property
    def reconnect(self) -> bool:
        """Whether calls ride through a takeover or a restart of the broker (docs/client.md, "Reconnecting")."""
        return self._state.reconnect

    @reconnect.setter
    def reconnect(self, on: bool) -> None:
        self._state.reconnect = on

    @property
    def session_id(self) -> str | None:
        """The open session's id (None before the first call that needed one, and once closed)."""
        s = self._state.session
        return s.session_id if s is not None else None

    @property
    def token_ttl(self) -> float:
        """How long the broker's handoff tokens live (from the session's ``Welcome``; 5 s before one)."""
        return self._state.token_ttl

    @property
    def identity(self) -> tuple[int, int, int] | None:
        """pid, uid, gid of this process as the broker saw it when the session opened."""
        s = self._state.session
        return s.identity if s is not None else None

    @property
    def stats(self) -> collections.Counter[str]:
        """Counters (a ``collections.Counter``): ``get_rpcs``, ``batch_get_rpcs``, ``redeems`` (prefetched
        tokens used); after the broker went away ``retries`` (tries again), ``reconnects`` (new sessions),
        ``found_done`` and ``found_not_done`` (changes in doubt, found out on the new session), ``unknown``
        (``OutcomeUnknown`` raised) and
        ``rewatches`` (watch streams resumed). For the curious and for tests."""
        return self._state.stats

    def _live(self) -> str | None:
        """The session id while the session lives."""
        return self._state.live_id() if self._box.dead is None else None

    def _bound(self, session_id: str | None, what: str, name: str = "") -> None:
        """For a step bound to session ``session_id`` (its tokens): raise if that session has ended."""
        if session_id is not None and self._live() != session_id:
            raise self._box.dead or session_gone(what, name)

    def _run_dir_fd(self) -> int:
        """The run directory's descriptor, opened (and checked: :meth:`Trust.open_run_dir`) once."""
        if self._closed:
            raise Cancelled(f"this {self._public_name} is closed; create a new one")
        if self._dir_fd < 0:
            self._dir_fd = self.trust.open_run_dir(self.paths)
        return self._dir_fd

    def _control_target(self) -> str:
        """The gRPC target of ``control.sock``, once its owner passed the trust checks."""
        dir_fd = self._run_dir_fd()
        self.trust.check_control(self.paths, dir_fd)
        return f"unix:{socket_address(dir_fd, self.paths.control)}"

    def _conduit_address(self) -> str:
        return socket_address(self._run_dir_fd(), self.paths.conduit)

    def _close_dir(self) -> None:
        """Close the run directory's descriptor (after the channel: it connects through it)."""
        self._closed = True
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    info = Verb(flows.info)
    put = Verb(flows.put)
    put_many = Verb(flows.put_many)
    get = Verb(flows.get, hot="_get_hot")  # the blocking client's hot path of a prefetched get
    get_fd = Verb(flows.get_fd, hot="_get_fd_hot")
    get_many = Verb(flows.get_many)
    get_many_fds = Verb(flows.get_many_fds)
    take = Verb(flows.take)
    delete = Verb(flows.delete)
    stat = Verb(flows.stat)
    lease = LeaseVerb(flows.lease, then="_lease_handle")
    keepalive = Verb(flows.keepalive)
    release = Verb(flows.release)
    ping = Verb(flows.ping)
    list = Verb(flows.list_entries)  # last: in this class's body, `list` is the verb from here on


class BlockingVerbs(Verbs):
    """Base of a blocking driver: a verb runs its flow to the end with :meth:`_drive` and returns the result."""

    def _drive(self, flow: Flow[T], expected: set[bytes] | None = None) -> T:
        raise NotImplementedError


class AsyncVerbs(Verbs):
    """Base of an asyncio driver: a verb returns the coroutine :meth:`_drive` makes of its flow."""

    async def _drive(self, flow: Flow[T], expected: set[bytes] | None = None) -> T:
        raise NotImplementedError
