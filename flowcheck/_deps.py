"""Optional libraries: broker clients, imported only when a broker of that kind is used,
and bokeh for the HTML report."""

from __future__ import annotations

import importlib
from types import ModuleType

from flowcheck.errors import MissingDependency

# module to import -> extra that installs it
EXTRAS = {
    "aio_pika": "rabbitmq",
    "aiokafka": "kafka",
    "redis": "redis",
    "opentelemetry": "otel",
    "bokeh": "html",
}


def require(module: str) -> ModuleType:
    """Import an optional client or raise :class:`MissingDependency` naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        raise MissingDependency(top, EXTRAS.get(top, "all")) from exc
