"""Driving a client flow by hand, step by step, with no broker: a test answers each step a flow yields, as a driver
would, and so checks the protocol decisions of :mod:`fdbroker.client.flows` deterministically."""

from __future__ import annotations

import itertools
import os
from typing import Any

from fdbroker.client import flows
from fdbroker.client.session import Welcome
from fdbroker.client.steps import EndSession, OpenSession, Pause, Run


class ByHand:
    """``ByHand(state, flow)``: ``step`` is the flow's first step; :meth:`ok` answers it (the step's result) and
    :meth:`fail` fails it (the error raised at the flow's ``yield``); each returns the next step (None once the
    flow returned: its result is ``value``). An error the flow lets out is raised by them.

    What a driver does without I/O is done here: a session is open ("s-1"; none with ``session=False``);
    ``OpenSession`` is answered with the open session, opening the next one ("s-2", …) once it ended;
    ``EndSession`` ends it (as one the broker no longer knows); ``Pause`` returns at once. ``steps`` lists every step seen, these included. :meth:`lose` ends
    the session as a closed conduit would (call it before failing the step with ``Aborted``)."""

    def __init__(self, state: flows.State, flow: Any, *, session: bool = True) -> None:
        self.state = state
        self._ids = itertools.count(1)
        self.steps: list[Any] = []
        self.value: Any = None
        if session:
            self._open()
        self.run = Run(flow)
        self.step = self._next()

    def _open(self) -> None:
        self.state.session_began(
            Welcome(f"s-{next(self._ids)}", 5.0, (os.getpid(), os.getuid(), os.getgid()))
        )

    def _next(self) -> Any:
        while True:
            step = self.run.next_step()
            if step is None:
                self.value = self.run.value
                return None
            self.steps.append(step)
            if isinstance(step, OpenSession):
                if self.state.live_id() is None:
                    self._open()
                self.run.ok(self.state.live_id())
            elif isinstance(step, EndSession):
                if self.state.live_id() == step.session_id:
                    self.state.session_ended(lost=True)
                self.run.ok(None)
            elif isinstance(step, Pause):
                self.run.ok(False)
            else:
                return step

    def ok(self, result: Any = None) -> Any:
        self.run.ok(result)
        self.step = self._next()
        return self.step

    def fail(self, error: BaseException) -> Any:
        self.run.failed(error)
        self.step = self._next()
        return self.step

    def lose(self) -> None:
        """The session's conduit closed: the broker went away."""
        self.state.session_ended(lost=True)
