"""topologies/ledger.yaml as it describes one running ledger: its prefix and its brokers.

This reads YAML only: the ledger still knows nothing of flowcheck.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import Brokers

LEDGER_YAML = Path(__file__).resolve().parents[2] / "topologies" / "ledger.yaml"


def topology_yaml(prefix: str, brokers: Brokers) -> str:
    """The ledger's topology text for a ledger run with ``prefix`` on ``brokers``."""
    doc: dict[str, Any] = yaml.safe_load(LEDGER_YAML.read_text(encoding="utf-8"))
    if prefix:
        doc["name"] = f"{doc.get('name', 'ledger')}-{prefix.rstrip('.')}"
    for broker in doc["brokers"].values():
        if broker["kind"] == "rabbitmq":
            broker["url"] = brokers.rabbitmq_url
        elif broker["kind"] == "kafka":
            broker["bootstrap"] = brokers.kafka_bootstrap
        else:
            broker["url"] = brokers.redis_url
    for key, channel in doc["channels"].items():
        channel["name"] = prefix + key
        if "groups" in channel:
            channel["groups"] = [prefix + g for g in channel["groups"]]
    for service in doc.get("services", {}).values():
        consumes = service.get("consumes", [])
        for i, c in enumerate(consumes):
            if isinstance(c, dict) and c.get("group"):
                consumes[i] = {**c, "group": prefix + c["group"]}
    return yaml.safe_dump(doc, sort_keys=False)
