"""Keep secrets out of messages, reports and trace files."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
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
