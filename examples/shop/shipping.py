"""shipping: reads the Redis stream shipments in the consumer group shipping.

A shipment that cannot be delivered (no address) is not acked: it stays in the
group's pending entries list and is claimed again (XCLAIM, which counts as one
more delivery) once it has been idle for its backoff: claim_idle_ms after the
first delivery, doubling after each further one, at most claim_backoff_max_ms
(shop.yaml's stuck-shipment retry policy). When XPENDING says it has been
delivered shipping_delivery_limit times, it is copied to shipments-dead and
acked, in one MULTI/EXEC so that it is never both live and dead, or neither.

XAUTOCLAIM would be simpler, but it has one min-idle for all entries, so
every retry would wait the same; XPENDING gives each entry's delivery count,
hence its own wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from typing import Any, cast

from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT, StreamIdT

from .config import Fault, Settings
from .infra import connect_redis
from .messages import TRACE_HEADERS, BadMessage, decode, text
from .stats import Event, Stats, checkpoint

CONSUMER = "shipping-1"
BATCH = 50


class Undeliverable(Exception):
    """The carrier cannot take the parcel."""


def ship(shipment: Mapping[str, Any]) -> None:
    """Hand the parcel to the carrier; Undeliverable without an address."""
    if shipment.get("address") is None:
        raise Undeliverable(f"no address for order {shipment.get('order_id')}")


Entry = tuple[str, dict[str, str]]


def _entries(raw: Iterable[Any]) -> list[Entry]:
    """(id, fields) pairs from a reply; deleted entries (fields None) are skipped."""
    out: list[Entry] = []
    for entry_id, fields in raw:
        if fields is not None:
            out.append((text(entry_id), {text(k): text(v) for k, v in fields.items()}))
    return out


class Shipping:
    name = "shipping"

    def __init__(self, settings: Settings, stats: Stats) -> None:
        self.settings = settings
        self.stats = stats
        self.ready = asyncio.Event()

    async def run(self) -> None:
        # RESP2 explicitly: the reply shapes unpacked below are RESP2's.
        redis = connect_redis(self.settings, self.name, decode_responses=True, protocol=2)
        try:
            self.ready.set()
            # Block no longer than the claim interval, so stuck entries are picked up on time.
            block_ms = max(1, min(100, self.settings.claim_idle_ms))
            while True:
                checkpoint()
                for entry_id, fields in await self._reclaim(redis):
                    await self._handle(redis, entry_id, fields)
                for entry_id, fields in await self._read_new(redis, block_ms):
                    await self._handle(redis, entry_id, fields)
        finally:
            await redis.aclose()

    async def _reclaim(self, redis: Redis) -> list[Entry]:
        """Claim the pending entries whose backoff has passed; each claim is a delivery."""
        names, first = self.settings.names, self.settings.claim_idle_ms
        # IDLE: only entries that waited at least the shortest backoff are listed.
        pending = await redis.xpending_range(
            names.shipments, names.shipping_group, min="-", max="+", count=BATCH, idle=first
        )
        due: list[StreamIdT] = [
            text(p["message_id"])
            for p in pending
            if int(p["time_since_delivered"])
            >= self.settings.claim_backoff_ms(int(p["times_delivered"]))
        ]
        if not due:
            return []
        claimed = await redis.xclaim(
            names.shipments, names.shipping_group, CONSUMER, min_idle_time=first, message_ids=due
        )
        return _entries(claimed)

    async def _read_new(self, redis: Redis, block_ms: int) -> list[Entry]:
        names = self.settings.names
        reply = await redis.xreadgroup(
            names.shipping_group, CONSUMER, {names.shipments: ">"}, count=BATCH, block=block_ms
        )
        # RESP2: [[stream, [(id, fields), ...]]], or None after the block time.
        streams = cast("list[list[Any]]", reply or [])
        return [entry for _, raw in streams for entry in _entries(raw)]

    async def _handle(self, redis: Redis, entry_id: str, fields: dict[str, str]) -> None:
        names = self.settings.names
        order_id = fields.get("order_id", "")
        self.stats.record(Event.SHIPPING_RECEIVED, order_id)
        try:
            ship(decode(fields.get("payload", "")))
        except (Undeliverable, BadMessage) as exc:
            await self._failed(redis, entry_id, fields, exc)
            return
        await redis.xack(names.shipments, names.shipping_group, entry_id)
        self.stats.record(Event.SHIPPED, order_id)

    async def _failed(
        self, redis: Redis, entry_id: str, fields: dict[str, str], exc: Exception
    ) -> None:
        names = self.settings.names
        order_id = fields.get("order_id", "")
        pending = await redis.xpending_range(
            names.shipments, names.shipping_group, min=entry_id, max=entry_id, count=1
        )
        deliveries = int(pending[0]["times_delivered"]) if pending else 1
        if deliveries < self.settings.effective_shipping_limit():
            self.stats.record(Event.SHIPPING_FAILED, order_id)  # left pending
            return
        if Fault.SKIP_DEAD_LETTER in self.settings.faults:
            await redis.xack(names.shipments, names.shipping_group, entry_id)
            self.stats.fault(Fault.SKIP_DEAD_LETTER, order_id)
            return
        dead: dict[FieldT, EncodableT] = {
            "payload": fields.get("payload", ""),
            "order_id": order_id,
            "reason": f"{type(exc).__name__}: {exc}",
            "delivery_count": deliveries,
            "original_id": entry_id,
        }
        dead.update({k: fields[k] for k in TRACE_HEADERS if k in fields})
        async with redis.pipeline(transaction=True) as pipe:
            pipe.xadd(names.shipments_dead, dead)
            pipe.xack(names.shipments, names.shipping_group, entry_id)
            await pipe.execute()
        self.stats.record(Event.SHIPPING_DEAD_LETTERED, order_id)
