"""How Kafka's records and answers read, and where the tap stands in each partition,
for the Kafka adapter: no I/O."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from flowcheck.observations import Kind, Observation, now

# Spring retry headers hold big-endian binary integers.
BINARY_INT_HEADERS = frozenset(
    {
        "retry_topic-attempts",
        "retry_topic-backoff-timestamp",
        "kafka_dlt-original-partition",
        "kafka_dlt-original-offset",
        "kafka_dlt-original-timestamp",
    }
)


def decode_header(name: str, value: bytes | None) -> Any:
    if value is None:
        return None
    if name in BINARY_INT_HEADERS and 1 <= len(value) <= 8 and not value.isdigit():
        return int.from_bytes(value, "big", signed=True)
    return value.decode("utf-8", errors="replace")


def read_headers(headers: Any) -> dict[str, Any]:
    """A record's headers (name, bytes) as the tap reports them."""
    if not headers:
        return {}
    return {
        # Decoded inline: a call per header cost more than the decoding.
        k: v.decode("utf-8", errors="replace")
        if v is not None and k not in BINARY_INT_HEADERS
        else decode_header(k, v)
        for k, v in headers
    }


def read_dead_letter(
    headers: Mapping[str, Any], dead_letter_of: str | None, by_physical: Mapping[str, str]
) -> tuple[Kind, str | None, str | None, int | None]:
    """(kind, origin, reason, delivery count) of a record with ``headers`` on a topic that
    holds ``dead_letter_of``'s dead letters (None: not a dead-letter topic); Spring's
    headers name the original topic and the exception."""
    attempts = headers.get("retry_topic-attempts")
    count = attempts if isinstance(attempts, int) else None
    if dead_letter_of is None:
        return Kind.ROUTED, None, None, count
    original = headers.get("kafka_dlt-original-topic")
    origin = by_physical.get(str(original), dead_letter_of) if original else dead_letter_of
    reason = headers.get("kafka_dlt-exception-fqcn") or headers.get("kafka_dlt-exception-message")
    return Kind.DEAD_LETTERED, origin, reason, count


def refused(topic_errors: Any, exists_code: int, describe: Any) -> dict[str, str]:
    """The topics a CreateTopics response's ``topic_errors`` refused, with why.

    The admin client returns per-topic errors in the response instead of raising
    them; one created meanwhile by someone else (``exists_code``) is fine.
    ``describe(code)`` is the client's error class for a code.
    """
    out: dict[str, str] = {}
    for topic, code, *message in topic_errors:
        if code in (0, exists_code):
            continue
        error = describe(code)
        text = message[0] if message and message[0] else error.description
        out[topic] = f"{error.message} ({text})"
    return out


def named(exc: BaseException) -> str:
    """``Class: text``; aiokafka's own text often starts with the class name already."""
    text, kind = str(exc), type(exc).__name__
    return text if text.startswith(kind) else f"{kind}: {text}"


# ------------------------------------------------------------ where the tap stands


class Mark(NamedTuple):
    """Where the tap is in one partition."""

    next: int  # the next offset not yet observed
    ms: int  # broker time of the last record observed there (ms; the tap's start until one is)
    # The fingerprint of the record before ``next`` (at the start, the one there then);
    # None: not known.
    last: tuple[int, int, int] | None


def fingerprint(rec: Any) -> tuple[int, int, int]:
    """Tells a record from another at the same offset of a replaced log."""
    return (rec.timestamp, hash(rec.key), hash(rec.value))


class Logs:
    """Partitions whose logs the tap must check before it takes more of their records."""

    def __init__(self) -> None:
        self.suspect: set[Any] = set()  # checked even without new records
        self.missing: set[str] = set()  # topics the last health poll did not list


def judge(position: int, begin: int, end: int, same: bool | None) -> str | None:
    """Why the tap cannot read on from ``position`` (the next offset it has not observed),
    given the log's bounds now (``begin``, ``end``: first offset, next offset to write) and
    whether the record before ``position`` is still the one that was there (None: not
    known); None if it can."""
    again = f"; the tap reads it again from offset {begin}, where it now starts"
    cause = (
        ": the log was replaced or truncated (a topic re-created, a broker restarted"
        " without its data)" + again
    )
    if end < position:
        return f"the log ends at offset {end}, before the tap's position {position}{cause}"
    if begin > position:
        return (
            f"the log starts at offset {begin}, after the tap's position {position}:"
            f" records {position} to {begin - 1} were deleted before the tap read them"
            f" (retention, a replaced log); the tap reads on from offset {begin}"
        )
    if same is False:
        return (
            f"the record at offset {position - 1} is not the one that was there"
            f" (the log ends at offset {end}){cause}"
        )
    return None


class Evidence:
    """Records the tap has seen, per partition, until a group's committed offset passes them."""

    def __init__(self, groups: dict[str, list[str]]) -> None:
        self.groups = groups
        # (channel, group, partition) -> observations not yet committed, in offset order
        self.open: dict[tuple[str, str, int], list[Observation]] = {}

    def seen(self, key: str, partition: int, obs: Observation) -> None:
        for group in self.groups[key]:
            self.open.setdefault((key, group, partition), []).append(obs)

    def forget(self, key: str, partition: int) -> None:
        """Drop what is open on a partition whose log was replaced."""
        for group in self.groups.get(key, ()):
            self.open.pop((key, group, partition), None)

    def committed(self, key: str, group: str, partition: int, offset: int) -> list[Observation]:
        """Observations whose offset is below ``offset`` (the next one the group will read)."""
        pending = self.open.get((key, group, partition))
        if not pending:
            return []
        n = 0
        while n < len(pending) and (pending[n].offset or 0) < offset:
            n += 1
        done, self.open[(key, group, partition)] = pending[:n], pending[n:]
        return done


def since(started: int, ms: int) -> int:
    """When the tap stopped watching, as monotonic ns: when the broker stamped the last
    record it observed (``ms``), but not before the tap started."""
    mono, wall = now()
    return max(started, mono - max(0, int((wall * 1000 - ms) * 1e6)))
