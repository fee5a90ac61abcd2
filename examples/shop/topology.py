"""topologies/shop.yaml as it describes one running shop: its prefix and its brokers.

The topology names channels as the shop does without a prefix; a shop started
with a prefix (tests run one each) has other broker-side names, so the
topology that watches it sets each channel's ``name`` and each consumer group
accordingly. This reads YAML only: the shop still knows nothing of flowcheck.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .config import Brokers, broker_name

SHOP_YAML = Path(__file__).resolve().parents[2] / "topologies" / "shop.yaml"


def topology_yaml(prefix: str, brokers: Brokers) -> str:
    """The shop's topology text for a shop run with ``prefix`` on ``brokers``."""
    doc: dict[str, Any] = yaml.safe_load(SHOP_YAML.read_text(encoding="utf-8"))
    doc["name"] = f"{doc.get('name', 'shop')}{'-' + prefix.rstrip('.') if prefix else ''}"
    for broker in doc["brokers"].values():
        if broker["kind"] == "rabbitmq":
            broker["url"] = brokers.rabbitmq_url
        elif broker["kind"] == "kafka":
            broker["bootstrap"] = brokers.kafka_bootstrap
        else:
            broker["url"] = brokers.redis_url
    for key, channel in doc["channels"].items():
        channel["name"] = broker_name(key, prefix)
        if "groups" in channel:
            channel["groups"] = [broker_name(g, prefix) for g in channel["groups"]]
    for service in doc.get("services", {}).values():
        consumes = service.get("consumes", [])
        for i, c in enumerate(consumes):
            if isinstance(c, dict) and c.get("group"):
                consumes[i] = {**c, "group": broker_name(c["group"], prefix)}
    return yaml.safe_dump(doc, sort_keys=False)
