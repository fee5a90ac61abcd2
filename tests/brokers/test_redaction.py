"""Secrets in payloads and named headers are masked before anything is recorded, on every
broker; correlation still reads them."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from flowcheck.brokers import Adapter
from flowcheck.cli import cli
from flowcheck.observations import Kind, encode, payload_json
from flowcheck.redact import MASK
from flowcheck.topology.model import Correlate, Redact
from flowcheck.trace import Header, Writer
from flowcheck.tracer import Memory, Tracer

from .conftest import FLOW, SECRET, Kit, of


async def test_payload_secrets_are_masked_and_still_correlate(
    kit: Kit, adapter: Adapter, tmp_path: Path
) -> None:
    await adapter.apply()
    flow = kit.topology.flows[FLOW]
    topology = kit.topology.model_copy(
        update={
            # A correlation key whose name looks like a credential keeps working.
            "flows": {
                FLOW: flow.model_copy(update={"correlate": Correlate(json_path="$.session_token")})
            },
            "redact": Redact(payload=["$.card.number", "$.lines.note"], headers=["X-Session"]),
        }
    )
    token = f"tok-{kit.prefix}"
    body = {
        "session_token": token,
        "user": "ann",
        "password": SECRET,
        "api_key": SECRET,
        "nested": {"secret": SECRET, "kept": 1},
        "items": [{"sku": "a", "auth": SECRET}],
        "card": {"number": SECRET, "brand": "visa"},
        "lines": [{"note": SECRET, "qty": 2}],
    }
    headers = {"X-Session": f"sess={SECRET}", "x-tenant": "acme"}
    memory = Memory()
    trace = tmp_path / "t.jsonl"
    with Writer(str(trace), Header(started=0.0, started_mono_ns=0)) as writer:
        async with Tracer(topology, [memory, writer.write]):
            async with kit.sender() as send:
                await send(json.dumps(body).encode(), headers)
            await memory.wait_for(
                lambda items: bool(of(items, Kind.ROUTED, kit.publish_to)), kit.within
            )
    [routed] = of(memory.items, Kind.ROUTED, kit.publish_to)
    assert routed.keys == {FLOW: token}
    assert payload_json(routed.payload) == {
        "session_token": MASK,
        "user": "ann",
        "password": MASK,
        "api_key": MASK,
        "nested": {"secret": MASK, "kept": 1},
        "items": [{"sku": "a", "auth": MASK}],
        "card": {"number": MASK, "brand": "visa"},
        "lines": [{"note": MASK, "qty": 2}],
    }
    assert routed.size == len(json.dumps(body).encode())  # of the message as sent
    assert routed.headers["X-Session"] == MASK
    assert routed.headers["x-tenant"] == "acme"
    for obs in memory.items:
        assert SECRET not in encode(obs).decode()
    assert SECRET not in trace.read_text()
    result = CliRunner().invoke(cli, ["inspect", str(trace), "--json", "--key", token])
    assert result.exit_code == 0, result.output
    assert token in result.output
    assert SECRET not in result.output
