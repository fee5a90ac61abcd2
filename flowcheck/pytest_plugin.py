"""flowcheck's pytest plugin, registered under the ``pytest11`` entry point.

For now it only names itself in the report header; fixtures and assertions
for event flows arrive here as the tracer and checker land.
"""

from __future__ import annotations

import pytest

from flowcheck import __version__


def pytest_report_header(config: pytest.Config) -> str:
    return f"flowcheck: {__version__}"
