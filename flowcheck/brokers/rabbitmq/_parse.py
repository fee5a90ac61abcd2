"""How RabbitMQ's answers and messages read, for the RabbitMQ adapter: no I/O.

A message becomes a :class:`Reading`, which the adapter turns into an observation
(the topology's correlation rules need the adapter); a declare the broker refused
becomes the setting that differs.
"""

from __future__ import annotations

import contextvars
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, NamedTuple

from pamqp import decode as amqp_decode

from flowcheck.observations import Kind

# RabbitMQ's answer to a declare that differs from what exists. A side is "none" (not
# set), 'v' or "the value 'v' of type 't'"; values may hold spaces.
_SIDE = r"(?:(?P<{0}none>none)|the value '(?P<{0}typed>.*?)' of type '(?P<{0}type>[^']+)'|'(?P<{0}plain>.*?)')"
_INEQUIVALENT = re.compile(
    r"inequivalent arg '(?P<arg>[^']+)' for (?:queue|exchange) '.*?' in vhost '.*?': "
    rf"received {_SIDE.format('want_')} but current is {_SIDE.format('have_')}$"
)
_INT_TYPES = frozenset({"byte", "unsignedbyte", "short", "unsignedshort", "signedint"})
_INT_TYPES |= {"unsignedint", "long", "timestamp"}


class Reading(NamedTuple):
    """What a message says, as :meth:`~flowcheck.brokers.base.Adapter.observe` takes it."""

    kind: Kind
    headers: Mapping[str, Any]
    properties: Mapping[str, Any]
    routing_key: str | None
    delivery_count: int | None = None
    reason: str | None = None
    origin: str | None = None


# ------------------------------------------------------------ drift


def differing(text: str, ours: Mapping[str, Any]) -> tuple[str, Any, Any] | None:
    """(setting, ours, the broker's) from RabbitMQ's refusal ``text`` of a declare that
    differs from what exists, ``ours`` being the settings and x-arguments declared; None
    if ``text`` says something else. A side that is not set is None."""
    m = _INEQUIVALENT.search(text)
    if m is None:
        return None
    arg = m["arg"]
    want = ours.get(arg)
    return arg, want, _side(m, "have_", want)


def _side(m: re.Match[str], side: str, ours: Any) -> Any:
    """One side of an inequivalent-arg answer as a value: None where it is not set.

    The broker names the type only when the other side is not set; otherwise the
    value is read as the same kind as ``ours``, or, where it reads the same as
    ``ours`` (so differs only in type), as the kind it looks like.
    """
    if m[f"{side}none"]:
        return None
    if m[f"{side}type"] is not None:
        text, kind = m[f"{side}typed"], m[f"{side}type"]
        if kind in _INT_TYPES and re.fullmatch(r"-?\d+", text):
            return int(text)
        if kind == "bool" and text in ("true", "false"):
            return text == "true"
        return text
    text = m[f"{side}plain"]
    if isinstance(ours, bool) or (str(ours).lower() == text and text in ("true", "false")):
        return text == "true" if text in ("true", "false") else text
    if (isinstance(ours, int) or str(ours) == text) and re.fullmatch(r"-?\d+", text):
        return int(text)
    return text


# ------------------------------------------------------------ messages


def read_copy(
    props: Any,
    routing_key: str | None,
    *,
    dead_letters: bool,
    by_physical: Mapping[str, str],
    past_limit: Callable[[str | None], int | None],
    unroutable: bool = False,
) -> Reading:
    """The copy of a message a twin received, with its AMQP properties ``props``.

    ``dead_letters``: the twin's channel is where some queue's dead letters go;
    ``by_physical``: channel of each broker-side name; ``past_limit(origin)``: the
    deliveries after which ``origin`` dead-letters for its delivery limit."""
    headers: Mapping[str, Any] = props.headers or {}
    deaths = headers.get("x-death")
    kind = Kind.ROUTED
    reason = origin = None
    number: int | None = None
    if unroutable:
        kind = Kind.UNROUTABLE
        reason = "no queue of the topology is bound for this routing key"
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        latest = deaths[0]
        # delivery_count is the number of the delivery an observation stands for.
        # x-death's count counts deaths, not deliveries: back on a work queue after
        # a dead-letter round trip, this is arrival number count + 1.
        number = as_int(latest.get("count")) + 1
        if dead_letters:
            kind = Kind.DEAD_LETTERED
            reason = as_str(latest.get("reason"))
            q = as_str(latest.get("queue"))
            origin = by_physical.get(q or "", q)
            # Failed deliveries before the death, if the broker says; else unknown.
            count = headers.get("x-delivery-count")
            number = as_int(count) if count is not None else None
            if number is None and reason == "delivery_limit":
                number = past_limit(origin)
    return Reading(kind, headers, properties(props), routing_key, number, reason, origin)


def read_firehose(
    meta: Mapping[str, Any],
    routing_key: str,
    by_physical: Mapping[str, str],
    direct: Mapping[str, str],
    dead_letters: Collection[str] = (),
) -> tuple[str, Reading] | None:
    """(channel, reading) of a firehose message with headers ``meta`` and ``routing_key``
    ``publish.<exchange>`` or ``deliver.<queue>``: deliveries and unroutable publishes,
    and publishes straight to the ``direct`` queues (queue name -> channel), which no
    twin sees. None: not about a tapped channel, or a routed publish (the twins see it).

    ``dead_letters``: channels among the direct queues that some queue dead-letters into
    through the default exchange. The broker's re-publish there is not traced: a
    delivery from one with x-death is the only evidence of the dead letter, and is read
    as the dead letter."""
    event, _, name = routing_key.partition(".")
    routing = meta.get("routing_keys") or []
    first = as_str(routing[0]) if routing else None
    straight = event == "publish" and not name  # the default exchange's key: a queue
    key = direct.get(first or "") if straight else by_physical.get(name)
    if key is None:
        return None
    props = meta.get("properties") or {}
    headers = dict(props.get("headers") or {}) if isinstance(props, Mapping) else {}
    number: int | None = None
    reason = None
    deaths = headers.get("x-death")
    if (
        event == "deliver"
        and key in dead_letters
        and isinstance(deaths, list)
        and deaths
        and isinstance(deaths[0], Mapping)
    ):
        latest = deaths[0]
        q = as_str(latest.get("queue"))
        count = headers.get("x-delivery-count")
        mid = props.get("message_id") if isinstance(props, Mapping) else None
        return key, Reading(
            Kind.DEAD_LETTERED,
            headers,
            {"message_id": mid},
            first,
            as_int(count) if count is not None else None,
            as_str(latest.get("reason")),
            by_physical.get(q or "", q),
        )
    if event == "deliver":
        redelivered = bool(meta.get("redelivered"))
        count = headers.get("x-delivery-count")
        kind = (
            Kind.REDELIVERED
            if redelivered or (count is not None and as_int(count) > 0)
            else Kind.DELIVERED
        )
        # x-delivery-count counts earlier failed deliveries: this is delivery number
        # count + 1. Without it, a first delivery is number 1; a classic queue's
        # redelivery does not say which number it is.
        if count is not None:
            number = as_int(count) + 1
        elif kind is Kind.DELIVERED:
            number = 1
    elif event == "publish" and meta.get("routed_queues") == []:
        kind = Kind.UNROUTABLE
        reason = "NO_ROUTE"
    elif straight:
        kind = Kind.ROUTED
    else:
        return None  # publishes that were routed are already seen by the twins
    mid = props.get("message_id") if isinstance(props, Mapping) else None
    return key, Reading(kind, headers, {"message_id": mid}, first, number, reason)


def properties(p: Any) -> dict[str, Any]:
    """The AMQP properties correlation rules may read, by their topology names."""
    return {
        "message_id": p.message_id,
        "correlation_id": p.correlation_id,
        "app_id": p.app_id,
        "type": p.message_type,
        "user_id": p.user_id,
        "reply_to": p.reply_to,
    }


def reason(exc: BaseException) -> str:
    """An AMQP error's text on one line."""
    text = " ".join(str(a) for a in exc.args if a is not None) or type(exc).__name__
    return text.replace("\n", " ")


def as_int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def as_str(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return None if value is None else str(value)


# ------------------------------------------------------------ lenient decoding

# pamqp fails a whole frame on a value it cannot decode, and aiormq then drops the
# connection: the tap would lose every copy its exclusive twins held. These decode
# such values instead, but only on the tap's own connections: aiormq's tasks for a
# connection inherit the context it was opened in, and the tap marks its own. Any
# other connection in the process (a system under test, in pytest) decodes as before.
_decode_timestamp = amqp_decode.timestamp
_decode_short_str = amqp_decode.short_str
lenient: contextvars.ContextVar[bool] = contextvars.ContextVar("lenient", default=False)


def _timestamp(value: bytes) -> tuple[int, Any]:
    """An AMQP timestamp as pamqp decodes it (a datetime), or, on a tap's connection, its
    number when no datetime can hold it: past the year 9999, as a publisher writing
    microseconds sends."""
    try:
        return _decode_timestamp(value)
    except (ValueError, OverflowError, OSError):
        if not lenient.get():
            raise
        return 8, int.from_bytes(value[:8], "big")


def _short_str(value: bytes) -> tuple[int, str]:
    """A short string (message_id, correlation_id, routing key, ...) as pamqp decodes it,
    or, on a tap's connection, with replacement characters when it is not UTF-8, as a
    Go or C client may send."""
    try:
        return _decode_short_str(value)
    except UnicodeDecodeError:
        if not lenient.get():
            raise
        length = value[0]
        return length + 1, value[1 : length + 1].decode("utf-8", errors="replace")


def install_lenient() -> None:
    """Put the lenient decoders in pamqp's tables (once; a tap does so when it starts).
    They decode as pamqp does unless :data:`lenient` is set in the caller's context."""
    amqp_decode.METHODS["timestamp"] = _timestamp
    amqp_decode.TABLE_MAPPING[b"T"] = _timestamp
    amqp_decode.METHODS["shortstr"] = _short_str
