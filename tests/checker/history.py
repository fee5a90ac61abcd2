"""Build observation histories for checker tests, without brokers."""

from __future__ import annotations

import json
from typing import Any

from flowcheck.observations import Kind, Observation

MS = 1_000_000
START = 1_000 * MS  # recordings start here; chains begin well after


class History:
    """Observations for one flow, written like a story: ``h.at(5).routed("orders", "k1")``."""

    def __init__(self, flow: str = "f") -> None:
        self.flow = flow
        self.items: list[Observation] = []
        self.t = START

    def at(self, ms: float) -> History:
        self.t = START + int(ms * MS)
        return self

    def add(
        self,
        kind: Kind,
        channel: str,
        key: str,
        payload: dict[str, Any] | None = None,
        **fields: Any,
    ) -> Observation:
        body = json.dumps(payload if payload is not None else {"id": key})
        obs = Observation(
            kind=kind,
            broker="b",
            channel=channel,
            mono_ns=self.t,
            wall=self.t / 1e9,
            keys={self.flow: key},
            payload=body,
            **fields,
        )
        self.items.append(obs)
        self.t += MS // 10
        return obs

    def routed(
        self, channel: str, key: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> Observation:
        return self.add(Kind.ROUTED, channel, key, payload, **fields)

    def sorted(self) -> list[Observation]:
        return sorted(self.items, key=lambda o: o.mono_ns)
