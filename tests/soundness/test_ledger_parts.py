"""The ledger's parts that need no broker: names, plans and its topology text."""

from __future__ import annotations

from collections import Counter

import pytest
import yaml

from examples.ledger import Brokers, Kind, Names, plan_txs
from examples.ledger.topology import LEDGER_YAML, topology_yaml
from flowcheck.topology import loads


def test_names_cover_every_channel_and_group_of_ledger_yaml() -> None:
    topology = yaml.safe_load(LEDGER_YAML.read_text())
    wanted = set(topology["channels"])
    for service in topology["services"].values():
        wanted |= {c["group"] for c in service.get("consumes", []) if isinstance(c, dict)}
    mapping = Names.for_prefix("t-1.").mapping()
    # ledger.settled-v2 exists on the broker only: the mis-route fault publishes there.
    assert set(mapping) - wanted == {"ledger.settled-v2"}
    assert wanted <= set(mapping)
    assert all(actual == f"t-1.{name}" for name, actual in mapping.items())


def test_topology_text_names_the_prefixed_objects() -> None:
    brokers = Brokers("amqp://guest:guest@rabbit:5672/", "kafka:9092", "redis://redis:6379/0")
    topology = loads(topology_yaml("t-1.", brokers))
    assert topology.channel_name("ledger.posted") == "t-1.ledger.posted"
    assert topology.services["settler"].consumes[0].group == "t-1.settler"
    assert set(topology.flows) == {"posting", "settlement", "audit", "notify"}


def test_plan_spreads_accounts_and_keeps_each_accounts_last_transaction_healthy() -> None:
    txs = plan_txs(24, seed=5, run_id="r", accounts=6, rejected=2, held=2)
    assert len({tx.tx_id for tx in txs}) == 24
    assert Counter(tx.kind for tx in txs) == {Kind.OK: 20, Kind.REJECTED: 2, Kind.HELD: 2}
    assert set(Counter(tx.account for tx in txs).values()) == {4}
    for account in {tx.account for tx in txs}:
        mine = [tx for tx in txs if tx.account == account]
        assert [tx.seq for tx in mine] == list(range(1, len(mine) + 1))
        assert mine[-1].kind is Kind.OK
    assert txs == plan_txs(24, seed=5, run_id="r", accounts=6, rejected=2, held=2)
    assert txs != plan_txs(24, seed=6, run_id="r", accounts=6, rejected=2, held=2)
    with pytest.raises(ValueError, match="cannot spread"):
        plan_txs(6, seed=1, run_id="r", accounts=6, rejected=1)
