"""What travels between the services: orders, payments, shipments and their headers."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Self

# Stripe's well-known test cards: one is always approved, one always declined.
APPROVED_CARD = "4242424242424242"
DECLINED_CARD = "4000000000000002"

ORDER_ID_HEADER = "order_id"
TRACE_HEADERS = ("traceparent", "tracestate")  # W3C trace context, passed along untouched


class BadMessage(ValueError):
    """A payload the service cannot even parse."""


class Kind(StrEnum):
    """What should become of an order; derived from its payload, never sent."""

    OK = "ok"  # billed, paid, shipped
    POISON = "poison"  # billing fails on every delivery → billing.orders.dlq
    DECLINED = "declined"  # payment declined twice → payments-dlt
    BAD_ADDRESS = "bad-address"  # shipping fails 3 times → shipments-dead


Address = dict[str, str]


@dataclass(frozen=True, slots=True)
class Order:
    order_id: str
    customer: str
    amount: float
    card: str
    address: Address | None
    poison: bool = False
    revision: int = 1  # an amended order is placed again with revision 2
    currency: str = "EUR"
    placed_at: str = ""  # ISO-8601 UTC with milliseconds, set by checkout
    traceparent: str | None = None  # travels as a header, not in the payload

    @property
    def kind(self) -> Kind:
        if self.poison:
            return Kind.POISON
        if self.card == DECLINED_CARD:
            return Kind.DECLINED
        if self.address is None:
            return Kind.BAD_ADDRESS
        return Kind.OK

    def payload(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "revision": self.revision,
            "customer": self.customer,
            "amount": self.amount,
            "currency": self.currency,
            "card": self.card,
            "address": self.address,
            "poison": self.poison,
            "placed_at": self.placed_at,
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Self:
        try:
            address = data["address"]
            return cls(
                order_id=str(data["order_id"]),
                customer=str(data["customer"]),
                amount=float(data["amount"]),
                card=str(data["card"]),
                address=None if address is None else {str(k): str(v) for k, v in address.items()},
                poison=bool(data.get("poison", False)),
                revision=int(data.get("revision", 1)),
                currency=str(data.get("currency", "EUR")),
                placed_at=str(data.get("placed_at", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadMessage(f"not an order: {exc!r}") from exc


@dataclass(frozen=True, slots=True)
class Payment:
    order_id: str
    revision: int
    customer: str
    amount: float
    currency: str
    status: str  # "approved" or "declined"
    address: Address | None  # carried along for shipping

    def payload(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "revision": self.revision,
            "customer": self.customer,
            "amount": self.amount,
            "currency": self.currency,
            "status": self.status,
            "address": self.address,
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Self:
        try:
            address = data["address"]
            return cls(
                order_id=str(data["order_id"]),
                revision=int(data["revision"]),
                customer=str(data["customer"]),
                amount=float(data["amount"]),
                currency=str(data["currency"]),
                status=str(data["status"]),
                address=None if address is None else {str(k): str(v) for k, v in address.items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BadMessage(f"not a payment: {exc!r}") from exc


def shipment_payload(payment: Payment) -> dict[str, Any]:
    return {
        "order_id": payment.order_id,
        "revision": payment.revision,
        "customer": payment.customer,
        "amount": payment.amount,
        "address": payment.address,
    }


def encode(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def decode(body: bytes | str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadMessage(f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise BadMessage("not a JSON object")
    return data


def new_traceparent() -> str:
    """A W3C traceparent for a fresh, sampled trace (what an instrumented checkout sends)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def text(value: object) -> str:
    """A header or field value as text, whatever type the client library handed over."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def trace_context(headers: Mapping[str, object] | None) -> dict[str, str]:
    """The incoming W3C trace headers, to be sent on with whatever is published next."""
    if not headers:
        return {}
    return {k: text(headers[k]) for k in TRACE_HEADERS if headers.get(k) is not None}


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def plan_orders(
    n: int,
    *,
    poison: int = 0,
    declined: int = 0,
    bad_address: int = 0,
    amended: int = 0,
    run_id: str | None = None,
) -> list[Order]:
    """``n`` orders, the special ones spread evenly, the first always healthy.

    ``amended`` healthy orders are followed directly by a second revision with
    the same order id (a changed amount), so per-key order can be checked.
    The result is in publishing order.
    """
    specials = [Kind.POISON] * poison + [Kind.DECLINED] * declined
    specials += [Kind.BAD_ADDRESS] * bad_address
    if min(n, poison, declined, bad_address, amended) < 0:
        raise ValueError("counts cannot be negative")
    if len(specials) >= n and specials:
        raise ValueError(f"{len(specials)} special orders need at least {len(specials) + 1} orders")
    kinds = [Kind.OK] * n
    if specials:
        stride = n // (len(specials) + 1)
        for i, kind in enumerate(specials, start=1):
            kinds[i * stride] = kind
    healthy = [i for i, k in enumerate(kinds) if k is Kind.OK]
    if amended > len(healthy):
        raise ValueError(f"only {len(healthy)} healthy orders to amend, not {amended}")
    amend = set(healthy[:amended])
    run = run_id or secrets.token_hex(3)
    orders: list[Order] = []
    for i, kind in enumerate(kinds):
        order = Order(
            order_id=f"ord-{run}-{i + 1:04d}",
            customer=f"cust-{i % 7 + 1:03d}",
            amount=-1.0 if kind is Kind.POISON else round(10 + i * 1.25, 2),
            card=DECLINED_CARD if kind is Kind.DECLINED else APPROVED_CARD,
            address=None
            if kind is Kind.BAD_ADDRESS
            else {"street": f"{i + 1} Main St", "city": "Springfield"},
            poison=kind is Kind.POISON,
        )
        orders.append(order)
        if i in amend:
            orders.append(replace(order, revision=2, amount=round(order.amount + 5, 2)))
    return orders
