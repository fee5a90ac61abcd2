"""Keep secrets out of messages, reports and trace files."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

# Header and key names whose values are credentials.
SECRET_NAME = re.compile(r"pass|secret|token|auth|credential|api[-_]?key|cookie|sasl", re.I)


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``; user and host stay readable."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{parts.username or ''}:{MASK}@{host}" + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


@functools.lru_cache(maxsize=4096)  # header names repeat on every message
def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def redact_headers(headers: Mapping[str, object]) -> dict[str, object]:
    """Copy ``headers`` with the values of credential-like names masked."""
    return {k: (MASK if is_secret_name(k) else v) for k, v in headers.items()}
