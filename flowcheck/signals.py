"""Ctrl-C (SIGINT) and SIGTERM, for ``flowcheck record`` and ``flowcheck run`` alike.

Either ends a recording on purpose: the trace gets its end record, which says
which one (``interrupted`` for SIGINT, ``stopped`` for SIGTERM).
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
from anyio import TASK_STATUS_IGNORED
from anyio.abc import TaskStatus

from flowcheck.errors import leaf
from flowcheck.trace import Ended

T = TypeVar("T")


class Caught:
    """The first SIGINT or SIGTERM that arrived, if one did."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def ended(self) -> Ended | None:
        """How the recording ended, for its end record; None while no signal came."""
        if self.signum is None:
            return None
        return "interrupted" if self.signum == signal.SIGINT else "stopped"

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)  # as shells report it


async def watch(
    caught: Caught,
    then: Callable[[], object],
    *,
    again: Callable[[], object] | None = None,
    task_status: TaskStatus[None] = TASK_STATUS_IGNORED,
) -> None:
    """Wait for SIGINT or SIGTERM (for a task group's ``start``: watching once started),
    note it in ``caught`` and call ``then``; with ``again``, keep watching and call it
    on the next one (a second Ctrl-C: stop now)."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        task_status.started()
        async for signum in signals:
            if caught.signum is not None and again is not None:
                again()
                return
            caught.signum = signum
            then()
            if again is None:
                return


async def cancel_on_signal(caught: Caught, body: Callable[[], Awaitable[T]]) -> T | None:
    """Run ``body``; SIGINT or SIGTERM cancels it, and then this returns None."""
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(watch, caught, tg.cancel_scope.cancel)
            result = await body()
            tg.cancel_scope.cancel()
            return result
    except BaseExceptionGroup as group:
        raise leaf(group) from None
    return None
