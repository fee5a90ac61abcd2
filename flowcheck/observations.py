"""The one record every part of flowcheck speaks: what was seen, where, and when.

Brokers produce observations, the tracer writes them to trace files, the
checker reads them. An observation never holds a secret (headers and JSON payload
fields whose names look like credentials are masked, and what the topology's
``redact`` lists) nor an unbounded payload (big ones are cut, keeping their size and
hash). Correlation keys are read from the message before masking.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import time
from collections.abc import Mapping
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import msgspec

from flowcheck.redact import MASK, PLAIN, SECRET_NAME, UNCHANGED, Redaction, is_secret_name
from flowcheck.topology import path_segments

if TYPE_CHECKING:
    from flowcheck.topology.model import Topology

# Header flowcheck adds to every message it publishes.
ID_HEADER = "x-flowcheck-id"
# Marks a copy flowcheck sent again because the broker's answer to the send before it
# was lost (that copy may have been written too); the value counts the sends after the first.
RESENT_HEADER = "x-flowcheck-resent"
PAYLOAD_CAP = 16 * 1024  # bytes of payload kept in an observation
TEXT_CAP = 1024  # characters kept of a correlation key, header name or value, id or reason
HEADERS_KEPT = 100  # headers kept of one message; a header tells how many more were left out
LEFT_OUT = "x-flowcheck-left-out"


class Kind(StrEnum):
    PUBLISHED = "published"  # flowcheck published it (and the broker confirmed)
    UNROUTABLE = "unroutable"  # the broker returned it: no queue matched
    ROUTED = "routed"  # a tap saw it arrive on the channel
    DELIVERED = "delivered"  # the broker handed it to a consumer
    REDELIVERED = "redelivered"  # ... again (a retry)
    DEAD_LETTERED = "dead_lettered"  # it arrived on a dead-letter channel
    CONSUMED = "consumed"  # evidence that a consumer finished it (ack, commit, XACK)
    PENDING = "pending"  # delivered but not acknowledged, as of this observation
    TRIMMED = "trimmed"  # deleted from its stream before the consumer group ``group`` read it
    GAP = "gap"  # the tap was not watching this channel from ``at`` until ``until_ns``
    DRIFT = "drift"  # the broker's channel differs from the topology


class Observation(
    msgspec.Struct,
    frozen=True,
    omit_defaults=True,
    forbid_unknown_fields=True,
    gc=False,
):
    """One thing seen on one channel. Times: ``mono_ns`` is this process's monotonic
    clock (latency), ``wall`` is Unix time (display), ``broker_ms`` is the broker's
    own timestamp where it has one (Kafka CreateTime, Redis entry id).

    A msgspec struct, not a pydantic model: millions pass through the tracer and
    the checker, and a struct is built, encoded and decoded several times faster.
    Untracked by the garbage collector (``gc=False``): it holds only JSON data, so
    it can never be part of a reference cycle, and the collector need not rescan
    the observations that open chains keep.
    """

    kind: Kind
    broker: str
    channel: str
    mono_ns: int
    wall: float
    broker_ms: int | None = None
    # identity
    fc_id: str | None = None
    message_id: str | None = None
    trace_id: str | None = None
    keys: dict[str, str] = {}  # correlation key per flow
    # where on the broker
    routing_key: str | None = None
    kafka_key: str | None = None
    partition: int | None = None
    offset: int | None = None
    entry_id: str | None = None
    group: str | None = None
    # what
    headers: dict[str, Any] = {}
    payload: str | None = None
    size: int = 0
    sha256: str | None = None  # set when the payload was cut
    delivery_count: int | None = None  # the number of the delivery seen (1 = first)
    reason: str | None = None  # dead-letter reason, unroutable reply, gap cause
    origin: str | None = None  # for dead letters: the channel it died on
    until_ns: int | None = None  # for gaps: when watching resumed

    def replace(self, **changes: Any) -> Observation:
        """A copy with some fields changed."""
        return msgspec.structs.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready fields, defaults left out (as in a trace file)."""
        out: dict[str, Any] = msgspec.to_builtins(self)
        return out


encode = msgspec.json.Encoder().encode  # one observation -> one trace line (without newline)
decode = msgspec.json.Decoder(Observation).decode  # and back; raises msgspec.DecodeError


def now() -> tuple[int, float]:
    """(monotonic ns, wall seconds) read together."""
    return time.monotonic_ns(), time.time()


def cut_payload(body: bytes, redaction: Redaction = PLAIN) -> tuple[str, int, str | None]:
    """(payload, size, sha256) of a message body: the text, secrets masked, cut at
    PAYLOAD_CAP; ``size`` and ``sha256`` are of the body as sent (identity is not changed
    by masking), the hash given only when the text was cut."""
    size = len(body)
    kept = masked_payload(body, redaction)
    if size <= PAYLOAD_CAP and len(kept) <= PAYLOAD_CAP:
        return kept.decode("utf-8", errors="replace"), size, None
    return (
        kept[:PAYLOAD_CAP].decode("utf-8", errors="replace"),
        size,
        hashlib.sha256(body).hexdigest(),
    )


def masked_payload(body: bytes, redaction: Redaction = PLAIN) -> bytes:
    """``body`` with the values of its JSON fields whose names look like credentials, and
    of ``redaction``'s paths, masked; a body that is not JSON as it is."""
    # Most bodies: no parsing. Only what is kept can show a secret, and a value is kept
    # only with its name: a big body whose kept part names none is recorded as it is.
    if not redaction.may_hide(body if len(body) <= PAYLOAD_CAP else body[:PAYLOAD_CAP]):
        return body
    try:
        masked = redaction.payload(parse_json(body))
    except (TooDeep, RecursionError):
        return MASK.encode()  # too deep to look through: it may hide anything
    except ValueError:
        return body  # not JSON
    if masked is UNCHANGED:
        return body
    try:
        return msgspec.json.encode(masked)
    except (TypeError, OverflowError):  # an integer over 64 bits, from json.loads
        return json.dumps(masked, ensure_ascii=False).encode(errors="backslashreplace")


def redaction(topology: Topology) -> Redaction:
    """The topology's ``redact`` settings, with the payload paths its rules read kept."""
    keep = {
        path_segments(path)
        for flow in topology.flows.values()
        for match in [*(s.match for s in flow.steps), *(d.when for d in flow.dead_letters)]
        if match is not None
        for path in match.payload
    }
    settings = topology.redact
    return Redaction(
        paths=frozenset(path_segments(p) for p in settings.payload),
        headers=frozenset(h.lower() for h in settings.headers),
        keep=frozenset(keep) - {path_segments(p) for p in settings.payload},
    )


def fit_text(text: str, cap: int = TEXT_CAP) -> str:
    """``text`` as a trace line can hold it: lone surrogates (which JSON escapes such as
    ``\\ud800`` make, and UTF-8 cannot encode) written as escapes, and a text longer
    than ``cap`` cut, ending in the SHA-256 of the whole, so that two texts cut alike
    stay apart. Callers test ``len(text) > cap or not text.isascii()`` first: cheap."""
    try:
        data = text.encode()
    except UnicodeEncodeError:
        data = text.encode(errors="backslashreplace")
        text = data.decode()
    if len(text) <= cap:
        return text
    return f"{text[:cap]}... ({len(text)} characters, sha256 {hashlib.sha256(data).hexdigest()})"


_PLAIN = frozenset({str, int, float, bool, type(None)})  # JSON-safe as they are


def clean_headers(headers: Mapping[str, Any], redaction: Redaction = PLAIN) -> dict[str, Any]:
    """Headers made JSON-safe (bytes decoded, nested values kept) with secrets masked (names
    that look like credentials, and ``redaction``'s), and bounded: names and values cut at
    TEXT_CAP, at most HEADERS_KEPT of them."""
    if len(headers) > HEADERS_KEPT:  # a Redis entry with thousands of fields, say
        return _fewer(headers, redaction)
    extra = redaction.headers
    out: dict[str, Any] = {}
    # One pass, plain values as they are: this runs for every message a tap sees.
    for k, v in headers.items():
        name = k if type(k) is str else str(k)
        if len(name) > TEXT_CAP:  # judged whole (the secret may be past the cut), kept cut
            out[fit_text(name)] = MASK if SECRET_NAME.search(name) else _jsonable(v)
        elif is_secret_name(name) or (extra and name.lower() in extra):
            out[name] = MASK
        elif type(v) is str:
            out[name] = v if len(v) <= TEXT_CAP and v[:1] not in _JSONISH else _text(v)
        else:
            out[name] = v if type(v) in _PLAIN else _jsonable(v)
    return out


_JSONISH = frozenset("{[")  # how a header value holding a JSON object or array starts


def _text(value: str) -> str:
    """A header's text value, bounded, with secrets masked in the JSON it may hold."""
    if value[:1] in _JSONISH:
        value = _masked_json(value)
    return value if len(value) <= TEXT_CAP else fit_text(value)


def _masked_json(text: str) -> str:
    """``text`` or, when it is JSON whose objects have keys that name secrets (Kafka and
    Redis headers nest only this way), that JSON with their values masked."""
    try:
        masked = _mask(parse_json(text))
    except (TooDeep, RecursionError):
        return MASK  # too deep to look through: it may hide anything
    except ValueError:
        return text  # not JSON
    return text if masked is _UNCHANGED else msgspec.json.encode(masked).decode()


_UNCHANGED: Any = object()


def _mask(doc: Any) -> Any:
    """``doc`` with the values of secret-named keys masked, or _UNCHANGED."""
    if isinstance(doc, dict):
        out = {}
        changed = False
        for k, v in doc.items():
            if is_secret_name(k):
                out[k], changed = MASK, True
            else:
                inner = _mask(v)
                out[k] = v if inner is _UNCHANGED else inner
                changed = changed or inner is not _UNCHANGED
        return out if changed else _UNCHANGED
    if isinstance(doc, list):
        items = [_mask(v) for v in doc]
        if all(i is _UNCHANGED for i in items):
            return _UNCHANGED
        return [v if i is _UNCHANGED else i for v, i in zip(doc, items, strict=True)]
    return _UNCHANGED


def _fewer(headers: Mapping[str, Any], redaction: Redaction) -> dict[str, Any]:
    kept = dict(itertools.islice(headers.items(), HEADERS_KEPT))
    return {**clean_headers(kept, redaction), LEFT_OUT: len(headers) - len(kept)}


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _jsonable(bytes(value).decode("utf-8", errors="replace"))
    if isinstance(value, str):
        return _text(value)
    if isinstance(value, Mapping):  # an AMQP table inside a header: its secrets too
        return {
            fit_text(str(k)): MASK if is_secret_name(str(k)) else _jsonable(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (int, float, bool)):
        return value
    return str(value)  # datetimes, decimals: as text


def as_text(value: Any) -> str | None:
    """A header or property value as text (bytes decoded); None stays None."""
    if type(value) is str:  # the usual case, first
        return value
    if value is None:
        return None
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C traceparent (``00-<trace>-<span>-<flags>``), if well formed."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or parts[1] == "0" * 32:
        return None
    try:
        int(parts[1], 16)
    except ValueError:
        return None
    return parts[1]


def parse_json(text: str | bytes) -> Any:
    """JSON text parsed as :func:`json.loads` would (msgspec first: several times faster;
    the standard library for what msgspec refuses, such as NaN). Raises ValueError, also
    for a document nested too deeply to parse."""
    try:
        try:
            return _json_decode(text)
        except msgspec.DecodeError:
            return json.loads(text)
    except RecursionError:  # both parsers give up near 1000 levels
        raise TooDeep("JSON nested too deeply to parse") from None


class TooDeep(ValueError):
    """JSON nested too deeply to parse."""


_json_decode = msgspec.json.decode


def payload_json(text: str | None) -> Any:
    """The payload parsed as JSON, or None when it is not JSON."""
    if not text:
        return None
    try:
        return parse_json(text)
    except ValueError:
        return None
