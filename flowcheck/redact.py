"""Keep secrets out of messages, reports and trace files."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus, urlsplit, urlunsplit

MASK = "***"

# Header and key names whose values are credentials.
SECRET_NAME = re.compile(r"pass|secret|token|auth|credential|api[-_]?key|cookie|sasl", re.I)


def redact_url(url: str) -> str:
    """Return ``url`` with any password (also in its query) replaced by ``***``.

    User and host stay readable.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    query = _redact_query(parts.query)
    if parts.password is None:
        return url if query == parts.query else urlunsplit(parts._replace(query=query))
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_URL = re.compile(r"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]+")


def redact_text(text: str) -> str:
    """``text`` (a client library's log line, say) with the password of every URL in it
    masked."""
    return _URL.sub(lambda m: redact_url(m.group()), text)


def _redact_query(query: str) -> str:
    """Mask credential-like parameters: redis-py reads ``?password=`` as the password."""
    pairs = []
    for pair in query.split("&") if query else []:
        name, eq, _ = pair.partition("=")
        pairs.append(f"{name}={MASK}" if eq and is_secret_name(unquote_plus(name)) else pair)
    return "&".join(pairs)


@functools.lru_cache(maxsize=4096)  # header names repeat on every message
def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact_headers(headers: Mapping[str, object]) -> dict[str, object]:
    """Copy ``headers`` with the values of credential-like names masked."""
    return {k: (MASK if is_secret_name(k) else v) for k, v in headers.items()}


Segments = tuple[str | int, ...]  # a payload path, as path_segments() splits it
# Every name SECRET_NAME matches holds one of these (lower-cased).
_SECRET_HINTS = (b"pass", b"secret", b"token", b"auth", b"credential", b"api", b"cookie", b"sasl")


@dataclass(frozen=True)
class Redaction:
    """What to mask in a recorded message besides the names that look like credentials.

    ``paths``: payload paths to mask; a name segment applies to every item of a list
    on the way (``("cards", "number")`` masks the number of each card). ``headers``:
    header names to mask, lower-case. ``keep``: payload paths the topology's ``match``
    rules read, kept although their names look like credentials (a rule must see them).
    """

    paths: frozenset[Segments] = frozenset()
    headers: frozenset[str] = frozenset()
    keep: frozenset[Segments] = frozenset()
    _hint: re.Pattern[bytes] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = {str(s).lower().encode() for p in self.paths for s in p if isinstance(s, str)}
        # A key written with \u escapes would slip past a plain search: look closer then.
        hint = _any_of({*_SECRET_HINTS, b"\\u", *names})
        if any(not any(isinstance(s, str) for s in p) for p in self.paths):  # like $[0]
            hint = re.compile(b"")  # no name to look for: look through every body
        object.__setattr__(self, "_hint", hint)

    def header(self, name: str) -> bool:
        """Is ``name`` a header to mask?"""
        return is_secret_name(name) or (bool(self.headers) and name.lower() in self.headers)

    def may_hide(self, body: bytes) -> bool:
        """Might ``body`` hold something to mask? False: it certainly does not (cheap)."""
        return self._hint.search(body.lower()) is not None

    def payload(self, doc: Any) -> Any:
        """``doc`` (parsed JSON) with secrets masked, or :data:`UNCHANGED`. Raises
        RecursionError for a document too deep to walk."""
        return self._walk(doc, (), ())

    def _walk(self, doc: Any, at: Segments, names: Segments) -> Any:
        if isinstance(doc, dict):
            out: dict[Any, Any] = {}
            changed = False
            for k, v in doc.items():
                here, named = (*at, k), (*names, k)
                if (
                    here not in self.keep
                    and named not in self.keep
                    and (here in self.paths or named in self.paths or is_secret_name(str(k)))
                ):
                    out[k], changed = MASK, True
                    continue
                inner = self._walk(v, here, named)
                out[k] = v if inner is UNCHANGED else inner
                changed = changed or inner is not UNCHANGED
            return out if changed else UNCHANGED
        if isinstance(doc, list):
            items = []
            for n, v in enumerate(doc):
                here = (*at, n)
                items.append(MASK if here in self.paths else self._walk(v, here, names))
            if all(i is UNCHANGED for i in items):
                return UNCHANGED
            return [v if i is UNCHANGED else i for v, i in zip(doc, items, strict=True)]
        return UNCHANGED


def _any_of(needles: set[bytes]) -> re.Pattern[bytes]:
    """A pattern finding any of ``needles``, grouped by first byte (``p(?:ass)|s(?:ecret|asl)``):
    the regex engine then skips ahead to a possible first byte, several times faster than
    a plain alternation or a substring test per needle."""
    groups: dict[bytes, list[bytes]] = {}
    for needle in sorted(needles):
        if needle:
            groups.setdefault(needle[:1], []).append(re.escape(needle[1:]))
    return re.compile(
        b"|".join(
            re.escape(first) + b"(?:" + b"|".join(rest) + b")" for first, rest in groups.items()
        )
    )


UNCHANGED: Any = object()
PLAIN = Redaction()  # names that look like credentials only
