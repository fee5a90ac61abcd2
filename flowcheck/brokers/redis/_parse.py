"""How Redis's replies read, for the Redis adapter: no I/O.

Replies are as the adapter's connections read them: RESP2, bytes not decoded.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

from flowcheck.observations import Kind, parse_json

# FastStream's Redis envelopes (faststream.redis.parser): the field it writes, and the
# magic bytes and version that open its binary format.
FASTSTREAM_FIELD = "__data__"
FASTSTREAM_MAGIC = b"\x89BIN\r\n\x1a\n"
_V1 = struct.Struct(">HII")  # version, offsets of the header block and of the body

# Fields a dead-letter entry may carry to say why and after how many deliveries.
REASON_FIELDS = ("reason", "error", "exception")
COUNT_FIELDS = ("delivery_count", "deliveries", "attempts")


def entry_ms(entry_id: str) -> int:
    """The server's millisecond clock, from an entry id ``<ms>-<seq>``."""
    return int(entry_id.split("-", 1)[0])


def id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def read_entry(
    fields: Sequence[Any], payload_field: str, dead_letter_of: str | None
) -> tuple[bytes | None, dict[str, str], Kind, int | None, str | None, str | None]:
    """(body, headers, kind, delivery count, origin, reason) of a stream entry whose
    ``fields`` are as Redis gives them: name, value, ... (a repeated name: the last value
    counts). ``dead_letter_of``: the stream whose dead letters this stream holds.
    A FastStream envelope in a payload field ``__data__`` is unwrapped: its body is the body, its
    headers join the headers (see :func:`faststream_envelope`)."""
    body: Any = None  # an entry without the payload field has no payload
    headers: dict[str, str] = {}
    pairs = iter(fields)
    # Decoded inline, pairs taken straight from the reply: this runs for every entry.
    for k, v in zip(pairs, pairs, strict=True):
        name = k.decode("utf-8", errors="replace") if type(k) is bytes else text(k)
        if name == payload_field:
            body = v
        else:
            headers[name] = v.decode("utf-8", errors="replace") if type(v) is bytes else text(v)
    if body is not None:
        if type(body) is not bytes:
            body = str(body).encode()
        if payload_field == FASTSTREAM_FIELD:  # FastStream writes its envelope there
            unwrapped = faststream_envelope(body)
            if unwrapped is not None:
                body, inner = unwrapped
                headers.update(inner)  # the message's own headers win over the entry's fields
    if dead_letter_of is None:
        return body, headers, Kind.ROUTED, None, None, None
    reason = next((headers[f] for f in REASON_FIELDS if f in headers), None)
    count_text = next((headers[f] for f in COUNT_FIELDS if f in headers), None)
    count: int | None = None
    # Other writers' counts: str.isdigit takes "²", int() does not, nor 5000 digits.
    if (
        count_text is not None
        and count_text.isascii()
        and count_text.isdigit()
        and len(count_text) < 19
    ):
        count = int(count_text)
    return body, headers, Kind.DEAD_LETTERED, count, dead_letter_of, reason


def faststream_envelope(data: bytes) -> tuple[bytes, dict[str, str]] | None:
    """(body, headers) of a FastStream Redis envelope; None if ``data`` is not one whole.

    Binary (FastStream's default): the 8 magic bytes, then
    big-endian a 16-bit version (1), the 32-bit offsets of the header block and of the
    body, the 16-bit number of headers, each header a 16-bit length and UTF-8 key, then
    the same for its value; the body runs from its offset to the end. JSON (its older
    default): an object of exactly ``data`` (the body, as text) and ``headers``, or
    ``data`` alone. Anything else, or a header block that overruns, is not an envelope.
    """
    if data.startswith(FASTSTREAM_MAGIC):
        return _binary(data)
    if data.startswith(b"{"):
        return _json(data)
    return None


def _binary(data: bytes) -> tuple[bytes, dict[str, str]] | None:
    size = len(data)
    at = len(FASTSTREAM_MAGIC)
    if size < at + _V1.size:
        return None
    version, headers_at, body_at = _V1.unpack_from(data, at)
    # The header block comes after the fixed part and ends where the body starts.
    if version != 1 or not at + _V1.size <= headers_at <= body_at - 2 or body_at > size:
        return None
    count = data[headers_at] << 8 | data[headers_at + 1]
    at = headers_at + 2
    strings: list[str] = []  # key, value, key, value, ...
    try:
        for _ in range(2 * count):
            end = at + 2
            if end > body_at:
                return None
            end += data[at] << 8 | data[at + 1]  # a 16-bit length, big-endian
            if end > body_at:
                return None
            strings.append(data[at + 2 : end].decode())
            at = end
    except UnicodeDecodeError:  # FastStream itself reads such an entry as raw bytes
        return None
    if at != body_at:
        return None
    pairs = iter(strings)
    return data[body_at:], dict(zip(pairs, pairs, strict=True))


def _json(data: bytes) -> tuple[bytes, dict[str, str]] | None:
    try:
        doc = parse_json(data)
    except ValueError:
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), str):
        return None
    raw = doc.get("headers", {})
    if doc.keys() - {"data", "headers"} or not isinstance(raw, dict):
        return None
    headers = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in raw.items()}
    return doc["data"].encode(), headers


Evidence = tuple[Kind, str, int, str | None]  # kind, entry id, delivery count, reason


def pending_evidence(
    pending: Mapping[str, tuple[int, str]],
    seen: MutableMapping[str, int],
    read_up_to: str,
    last_delivered: str,
) -> tuple[list[Evidence], list[str]]:
    """What one poll of a group's Pending Entries List says, and the entries it found
    acknowledged.

    ``pending``: entry id -> (times delivered, consumer); ``seen``: entry id -> deliveries
    reported so far (0: read by the tap, not yet seen pending), brought up to date;
    ``read_up_to``: the last id the tap read (entries past it wait, so that the evidence
    carries the entry's identity and is reported once); ``last_delivered``: the group's
    last-delivered-id (an entry the tap read that is neither pending nor past it was
    acknowledged)."""
    out: list[Evidence] = []
    read = id_key(read_up_to)
    for eid, (count, consumer) in pending.items():
        if id_key(eid) > read:
            continue
        if count > seen.get(eid, 0):
            kind = Kind.DELIVERED if count == 1 else Kind.REDELIVERED
            out.append((kind, eid, count, None if count == 1 else f"consumer {consumer}"))
            seen[eid] = count
    delivered = id_key(last_delivered)
    acked = [e for e in seen if e not in pending and id_key(e) <= delivered]
    for eid in acked:
        if seen[eid] == 0:  # delivered and acknowledged between two polls
            out.append((Kind.DELIVERED, eid, 1, None))
        out.append((Kind.CONSUMED, eid, max(seen[eid], 1), None))
        del seen[eid]
    return out, acked


def trimmed_unread(
    seen: Mapping[str, int], last_delivered: str, oldest: str | None, read_before: str
) -> list[str]:
    """The entries the tap read that a group never had delivered and that are gone from
    the stream (trimmed by MAXLEN or MINID, or XDEL): past the group's last-delivered-id,
    below the stream's first entry ``oldest`` (None: the stream is empty). ``oldest``
    must be read before ``last_delivered``: what was gone then and unread after is lost
    to the group. Only entries up to ``read_before``, the last one the tap had read when
    ``oldest`` was asked for, existed then: one read since may have been added after
    (to a stream that was empty then) and is no evidence of trimming."""
    delivered = id_key(last_delivered)
    first = None if oldest is None else id_key(oldest)
    known = id_key(read_before)
    return [
        eid
        for eid, count in seen.items()
        if count == 0
        and delivered < id_key(eid) <= known
        and (first is None or id_key(eid) < first)
    ]


def deleted(added: int, added_at_start: int, read: int) -> int:
    """Entries of a stream deleted (trimmed by MAXLEN or MINID, or XDEL) before the tap
    read them: ``added`` ever (XINFO's entries-added), less those added before the tap
    started, less those it read, counted just after a read that took all there was."""
    return added - added_at_start - read


def field(reply: Any, name: str) -> int | None:
    """An integer field of a raw XINFO STREAM reply (name, value, ... as bytes, which the
    tap's connections always read); None if absent."""
    if not isinstance(reply, list):
        return None
    want = name.encode()
    for i in range(0, len(reply) - 1, 2):
        if reply[i] == want:
            value = reply[i + 1]
            return value if isinstance(value, int) else None
    return None


def not_streams(wrong: Mapping[str, str]) -> str:
    keys = ", ".join(f"{name!r} holds a {kind}" for name, kind in sorted(wrong.items()))
    return f"cannot tap keys that are not streams: {keys}"


def text(value: Any) -> str:
    if type(value) is bytes:  # what the client returns, unless it was told to decode
        return value.decode("utf-8", errors="replace")
    return value if type(value) is str else str(value)
