"""Transactions: what travels through the ledger, and how a run's transactions are planned."""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Self

TX_ID = "tx_id"  # the header (Kafka) and entry field (Redis) that carry the transaction id
NO_CURRENCY = "XXX"  # ISO 4217's "no currency": the poster rejects it on every attempt


class BadMessage(ValueError):
    """A payload the service cannot even parse."""


class Kind(StrEnum):
    """What should become of a transaction; derived from its payload, never sent."""

    OK = "ok"  # posted, settled, audited and notified
    REJECTED = "rejected"  # no currency: retried through ledger.tx-retry, then ledger.tx-dlt
    HELD = "held"  # a legal hold: the settler fails it 3 times, then ledger.posted-dead


@dataclass(frozen=True, slots=True)
class Tx:
    tx_id: str
    account: str  # the Kafka record key: one account's transactions stay in order
    seq: int  # the transaction's number within its account, from 1
    amount: int  # cents
    currency: str = "EUR"
    hold: bool = False

    @property
    def kind(self) -> Kind:
        if self.currency == NO_CURRENCY:
            return Kind.REJECTED
        if self.hold:
            return Kind.HELD
        return Kind.OK

    def payload(self) -> dict[str, Any]:
        return {
            "tx_id": self.tx_id,
            "account": self.account,
            "seq": self.seq,
            "amount": self.amount,
            "currency": self.currency,
            "hold": self.hold,
        }

    @classmethod
    def from_payload(cls, data: Mapping[str, Any]) -> Self:
        try:
            return cls(
                tx_id=str(data["tx_id"]),
                account=str(data["account"]),
                seq=int(data["seq"]),
                amount=int(data["amount"]),
                currency=str(data["currency"]),
                hold=bool(data.get("hold", False)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadMessage(f"not a transaction: {exc!r}") from exc


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


def text(value: object) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def plan_txs(
    n: int,
    *,
    seed: int,
    run_id: str,
    accounts: int = 6,
    rejected: int = 0,
    held: int = 0,
) -> list[Tx]:
    """``n`` transactions over ``accounts`` accounts, in publishing order.

    ``seed`` chooses which account each goes to and which ones are rejected or
    held (never an account's last transaction: faults that need a later
    transaction of the same account, or none, choose among the healthy ones).
    """
    if n < accounts or rejected + held > n - accounts:
        raise ValueError(
            f"{n} transactions cannot spread {rejected + held} bad ones over {accounts} accounts"
        )
    rng = random.Random(seed)
    owners = [i % accounts for i in range(n)]
    rng.shuffle(owners)
    seqs: dict[int, int] = {}
    last = {a: max(i for i, o in enumerate(owners) if o == a) for a in range(accounts)}
    candidates = [i for i in range(n) if i not in last.values()]
    bad = rng.sample(candidates, rejected + held)
    kinds = dict.fromkeys(bad[:rejected], Kind.REJECTED) | dict.fromkeys(bad[rejected:], Kind.HELD)
    txs = []
    for i, owner in enumerate(owners):
        seqs[owner] = seqs.get(owner, 0) + 1
        kind = kinds.get(i, Kind.OK)
        txs.append(
            Tx(
                tx_id=f"tx-{run_id}-{i + 1:03d}",
                account=f"acct-{run_id}-{owner + 1}",
                seq=seqs[owner],
                amount=rng.randrange(100, 100_000),
                currency=NO_CURRENCY if kind is Kind.REJECTED else "EUR",
                hold=kind is Kind.HELD,
            )
        )
    return txs
