"""pytester, and the broker flags every inner test project runs with.

pytester is registered here rather than with ``pytest_plugins``, which pytest
allows only in the rootdir's conftest.
"""

from __future__ import annotations

import sys

import pytest


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("pytester"):
        config.pluginmanager.import_plugin("pytester")


@pytest.fixture
def broker_flags(rabbitmq_url: str, redis_url: str) -> list[str]:
    """The brokers of this session, as the plugin's command-line flags."""
    return [f"--flowcheck-rabbitmq-url={rabbitmq_url}", f"--flowcheck-redis-url={redis_url}"]


@pytest.fixture(autouse=True)
def _outer_test_modules_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner projects run in this process and import their own ``test_*.py``: hide this
    session's top-level test modules of the same names while they do (put back after)."""
    for name in [n for n in sys.modules if n.startswith("test_")]:
        monkeypatch.delitem(sys.modules, name)


@pytest.fixture(autouse=True)
def _inner_runs_not_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner projects print as on a developer's machine: under CI (``$CI``,
    ``$BUILD_NUMBER``) pytest stops truncating its summary, which repeats the lines
    the tests count."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("BUILD_NUMBER", raising=False)
