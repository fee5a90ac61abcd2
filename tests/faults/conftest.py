"""Fixtures of the fault suite: a cell per fault, on a broker the fault may break."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest
import pytest_asyncio

from flowcheck.brokers import adapter
from flowcheck.devkafka import LocalKafka
from flowcheck.topology import loads

from .kit import FAULTS, Cell, Fault


@pytest.fixture(params=FAULTS, ids=str)
def fault(request: pytest.FixtureRequest) -> Fault:
    f: Fault = request.param
    return f


@pytest_asyncio.fixture
async def cell(fault: Fault, unique: str, rabbitmq_url: str, redis_url: str) -> AsyncIterator[Cell]:
    if fault.broker == "kafka":  # a broker of the cell's own: the session's serves the others
        local = await anyio.to_thread.run_sync(LocalKafka().start)
        made = Cell("kafka", local.bootstrap, unique, kafka=local)
        try:
            yield made
        finally:
            for broker in (local, *made.restarted):
                await anyio.to_thread.run_sync(broker.stop)
        return
    url = rabbitmq_url if fault.broker == "rabbitmq" else redis_url
    made = Cell(fault.broker, url, unique)
    try:
        yield made
    finally:
        with anyio.CancelScope(shield=True):
            async with adapter("x", loads(made.topology())) as ad:
                await ad.delete(["a", "b"])
