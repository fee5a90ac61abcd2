"""Which chains are open, followed cheaply while a recording runs, for its drain.

A recorder asked to stop waits until every chain open then has settled. Until the
stop it needs only which chains are open and their observations: per flow and key,
a list, opened and closed on the checker's own clock (a chain closes once an
observation comes past its window). At the stop those chains are built, from their
observations, into a checker that follows them (``Checker(judge=False)``) and is
fed from then on: it answers ``settled`` as a checker fed all along would.

Keeping a list per open chain, not a chain of a dozen containers, is what makes it
cheap: the garbage collector's passes over the open chains cost the recorder more
than feeding them did.
"""

from __future__ import annotations

import gc
import heapq
import itertools

from flowcheck.checker._engine import Checker
from flowcheck.observations import Kind, Observation
from flowcheck.topology.model import Topology

_GAP, _DRIFT = Kind.GAP, Kind.DRIFT


class OpenChains:
    """Feed observations as the taps see them; :meth:`stop` when the stop is asked, then
    :meth:`advance` and :meth:`settled` while draining."""

    def __init__(self, topology: Topology, *, start_ns: int) -> None:
        self.checker = Checker(topology, start_ns=start_ns, judge=False)
        self.checker.advance(start_ns)  # builds its flows; no chain is open yet
        # flow -> key -> the observations of its open chain, in feed order
        self.open: dict[str, dict[str, list[Observation]]] = {
            name: {} for name in self.checker.flows
        }
        self.watching = {
            ch: [(state.name, state.window_ns) for state, _ in on]
            for ch, on in self.checker.by_channel.items()
        }
        self.expiry: list[tuple[int, int, str, str]] = []  # (due, seq, flow, key)
        self.seq = itertools.count()
        self.now = start_ns
        self.stopped = False

    def feed(self, obs: Observation) -> None:
        if self.stopped:
            self.checker.feed(obs)
            return
        at = obs.mono_ns
        if at > self.now:  # as the checker: past a chain's window, it closes
            self.now = at
            expiry = self.expiry
            while expiry and expiry[0][0] < at:
                _, _, closed, old = heapq.heappop(expiry)
                del self.open[closed][old]
        kind = obs.kind
        if kind is _GAP or kind is _DRIFT:
            return
        watching = self.watching.get(obs.channel)
        if watching is None:
            return
        keys = obs.keys
        for flow, window in watching:
            key = keys.get(flow)
            if key is None:
                continue
            opened = self.open[flow]
            seen = opened.get(key)
            if seen is None:
                opened[key] = [obs]
                heapq.heappush(self.expiry, (at + window, next(self.seq), flow, key))
            else:
                seen.append(obs)

    def stop(self, at_ns: int) -> None:
        """The stop is asked: build the open chains; chains first seen from now on are
        not followed."""
        checker = self.checker
        collecting = gc.isenabled()
        gc.disable()  # building the chains allocates only what they keep: no cycle to find
        try:
            for flow, opened in self.open.items():
                state = checker.flows[flow]
                route = state.route
                for key, seen in opened.items():
                    for obs in seen:
                        state.feed(obs, key, route[obs.channel])
        finally:
            if collecting:
                gc.enable()
        checker.now = max(checker.now, self.now)
        checker.next_expiry = min(
            [s.expiry[0][0] for s in checker.states if s.expiry], default=checker.now
        )
        checker.stop_ns = at_ns
        self.open = {}
        self.expiry = []
        self.stopped = True

    def advance(self, now_ns: int) -> None:
        """Let time pass (after :meth:`stop`): chains whose window is over close."""
        self.checker.advance(now_ns)

    def settled(self) -> bool:
        """Has every chain still open reached its end (its last step or its dead letter)?"""
        checker = self.checker
        return all(
            checker.settled(name, key) for name, st in checker.flows.items() for key in st.chains
        )
