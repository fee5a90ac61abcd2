"""Fuzzing: hostile input to the parts that read files users and other systems write.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default; quick, every run) and
``long`` (thousands of examples each; run by hand, see docs/running.md).
"""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hypothesis import HealthCheck, settings

_COMMON: dict[str, Any] = {
    "deadline": None,  # bounded below, with a margin a loaded CI host needs
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    "derandomize": False,  # the long profile explores; ci replays a fixed set (below)
    "print_blob": True,
}
# CI runs the same examples every time: a test suite must be deterministic, and what the
# long profile finds is kept as a regression test (tests/fuzz/test_found.py).
settings.register_profile("ci", max_examples=60, **{**_COMMON, "derandomize": True})
settings.register_profile("long", max_examples=1500, **_COMMON)
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
FUZZ = settings.get_profile(PROFILE if PROFILE in ("ci", "long") else "ci")

MAX_SECONDS = 5.0  # one input, read or rendered; real ones take milliseconds
MAX_BYTES = 64 * 1024 * 1024  # peak memory one input may take


@contextmanager
def bounded() -> Iterator[None]:
    """Fail when the block takes longer than MAX_SECONDS or allocates more than MAX_BYTES."""
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    tracemalloc.reset_peak()
    start = time.monotonic()
    try:
        yield
    finally:
        took = time.monotonic() - start
        peak = tracemalloc.get_traced_memory()[1]
        if not tracing:
            tracemalloc.stop()
    assert took < MAX_SECONDS, f"took {took:.1f}s"
    assert peak < MAX_BYTES, f"peak memory {peak / 1e6:.0f} MB"


def clean(error: BaseException, one_line: bool = True) -> None:
    """``error`` must be one flowcheck meant to raise, with a message a user can read."""
    from flowcheck.errors import FlowcheckError

    assert isinstance(error, FlowcheckError), f"{type(error).__name__}: {error}"
    text = str(error)
    assert text.strip(), "an empty message"
    assert "Traceback" not in text
    if one_line:
        assert "\n" not in text, text


Check = Callable[[BaseException], None]
