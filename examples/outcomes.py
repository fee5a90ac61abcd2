"""What became of each order in a threaded example system, for tests to wait on with a
deadline (shared by the Celery and Dramatiq examples)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable


class Outcomes:
    """What became of each order (shipped or stored, dead, given up, lost)."""

    def __init__(self) -> None:
        self.ends: list[tuple[str, str]] = []
        self.changed = threading.Condition()

    def end(self, order_id: str, how: str) -> None:
        with self.changed:
            self.ends.append((order_id, how))
            self.changed.notify_all()

    def of(self, order_id: str) -> list[str]:
        with self.changed:
            return [how for o, how in self.ends if o == order_id]

    def wait(self, orders: Iterable[str], timeout: float, *, ends: int = 1) -> bool:
        """Wait until each of ``orders`` has come to ``ends`` ends (2 for a duplicate)."""
        wanted = list(orders)

        def done() -> bool:
            seen = Counter(o for o, _ in self.ends)
            return all(seen[o] >= ends for o in wanted)

        with self.changed:
            return self.changed.wait_for(done, timeout)
