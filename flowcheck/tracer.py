"""The tracer: runs the taps of every broker in a topology and records what they see.

Observations go to any number of sinks: a trace file, an in-memory list that
tests can wait on, a live counter for the terminal.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from types import TracebackType

import anyio

from flowcheck.brokers import Adapter, adapter
from flowcheck.brokers.base import Sink
from flowcheck.correlate import Correlator
from flowcheck.errors import BrokerError
from flowcheck.observations import Observation
from flowcheck.topology.model import Topology

READY_WITHIN = 30.0  # seconds for a tap to start watching, its connecting included


class Memory:
    """Keeps observations in memory and lets a coroutine wait for the ones it needs."""

    def __init__(self) -> None:
        self.items: list[Observation] = []
        self._changed = anyio.Event()

    def __call__(self, obs: Observation) -> None:
        self.items.append(obs)
        # Wake every waiter, then give later waiters a fresh event to wait on.
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def wait_for(
        self, predicate: Callable[[list[Observation]], bool], within: float
    ) -> list[Observation]:
        """Return as soon as ``predicate(items)`` holds; raise TimeoutError after ``within`` s."""
        with anyio.fail_after(within):
            while True:
                changed = self._changed  # taken before the check: no change can be missed
                if predicate(self.items):
                    return self.items
                await changed.wait()


class Tracer:
    """Connect to the topology's brokers and tap its channels.

    ``async with Tracer(topology, sinks) as tracer`` returns once every tap is
    watching; leaving the block stops the taps and closes the connections.
    """

    def __init__(
        self,
        topology: Topology,
        sinks: Sequence[Sink] = (),
        *,
        channels: Sequence[str] | None = None,
        counts: Counter[str] | None = None,
    ) -> None:
        self.topology = topology
        self.sinks = list(sinks)
        self.counts: Counter[str] = Counter() if counts is None else counts  # per channel
        self.correlator = Correlator(topology)
        wanted = set(channels) if channels is not None else set(topology.channels)
        self.adapters: dict[str, Adapter] = {}
        self._wanted = wanted
        self._stack = AsyncExitStack()
        self._cancel: anyio.CancelScope | None = None

    def _sink(self, obs: Observation) -> None:
        self.counts[obs.channel] += 1
        for sink in self.sinks:
            sink(obs)

    async def __aenter__(self) -> Tracer:
        stack = self._stack
        await stack.__aenter__()
        try:
            brokers = sorted({self.topology.channels[c].broker for c in self._wanted})
            for name in brokers:
                ad = adapter(name, self.topology, self.correlator)
                await stack.enter_async_context(ad)
                self.adapters[name] = ad
            tg = await stack.enter_async_context(anyio.create_task_group())
            self._cancel = tg.cancel_scope
            stack.callback(tg.cancel_scope.cancel)  # runs before the task group exits
            for name, ad in self.adapters.items():
                ready = anyio.Event()
                mine = [c for c in ad.channels() if c in self._wanted]
                tg.start_soon(self._run_tap, ad, mine, ready)
                with anyio.move_on_after(READY_WITHIN):
                    await ready.wait()
                if not ready.is_set():
                    raise BrokerError(
                        name, f"the tap did not start watching within {READY_WITHIN:g}s"
                    )
        except BaseException:
            await stack.__aexit__(None, None, None)
            raise
        return self

    async def _run_tap(self, ad: Adapter, channels: list[str], ready: anyio.Event) -> None:
        await ad.tap(channels, self._sink, ready=ready)

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(t, e, tb)

    async def publish(
        self,
        channel: str,
        body: bytes,
        *,
        headers: dict[str, str] | None = None,
        key: str | None = None,
        routing_key: str | None = None,
    ) -> Observation:
        """Publish through the channel's broker; the PUBLISHED observation is recorded too."""
        ad = self.adapters[self.topology.channels[channel].broker]
        obs = await ad.publish(channel, body, headers=headers, key=key, routing_key=routing_key)
        self._sink(obs)
        return obs
