"""How the Redis adapter connects and paces its reads: no I/O."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

# URL options that would change the replies flowcheck reads: it sets them itself.
REPLY_OPTIONS = frozenset({"protocol", "decode_responses", "encoding", "encoding_errors"})


def own_options(url: str) -> str:
    """``url`` without REPLY_OPTIONS in its query (redis-py lets the URL's win)."""
    base, _, query = url.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if all(k not in REPLY_OPTIONS for k, _ in pairs):
        return url
    kept = [(k, v) for k, v in pairs if k not in REPLY_OPTIONS]
    return f"{base}?{urlencode(kept)}" if kept else base


def pause(started: float, now: float, interval: float) -> float:
    """Seconds to wait before the next read, so that reads start ``interval`` apart.

    While entries keep coming, each read would bring one or two, and a read costs
    the tap far more than an entry: waiting gathers them. A read that blocked
    until its entry came started long ago, so a sparse entry is never held back;
    after a full batch the caller reads again at once, so the rate is not capped.
    The price: an entry may be observed up to ``interval`` late.
    """
    return max(0.0, started + interval - now)
