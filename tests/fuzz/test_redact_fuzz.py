"""Payload masking, fed hostile bodies: never raises, and a secret never survives it."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from flowcheck.observations import PAYLOAD_CAP, cut_payload
from flowcheck.redact import Redaction

from .conftest import FUZZ, bounded

SENTINEL = "S3NT1NEL-value"
SECRET_NAMES = ["password", "Api_Key", "x-auth", "sessionToken", "SECRET", "cookie", "Pass"]
PLAIN = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=10)
)
# Documents in which every secret-named key holds the sentinel (or a structure around it).
DOC = st.recursive(
    PLAIN,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.text(alphabet="abcdefghij_", max_size=6).filter(lambda k: "pass" not in k),
            inner,
            max_size=4,
        ),
        st.builds(
            lambda name, value, rest: {**rest, name: value},
            st.sampled_from(SECRET_NAMES),
            st.sampled_from([SENTINEL, [SENTINEL], {"x": SENTINEL}]),
            st.dictionaries(st.sampled_from(["a", "b"]), inner, max_size=2),
        ),
    ),
    max_leaves=25,
)


@FUZZ
@given(DOC, st.booleans(), st.integers(0, 1))
def test_no_secret_survives(doc: Any, ascii_only: bool, pad: int) -> None:
    body = json.dumps(doc, ensure_ascii=ascii_only).encode()
    if pad:  # past the cut: masked before it is cut
        body = json.dumps({"pad": "x" * PAYLOAD_CAP, "doc": doc}, ensure_ascii=ascii_only).encode()
    with bounded():
        payload, size, _ = cut_payload(body)
    assert SENTINEL not in payload
    assert size == len(body)


@FUZZ
@given(st.binary(max_size=2000), st.lists(st.text(max_size=6), max_size=3))
def test_any_body(body: bytes, names: list[str]) -> None:
    rules = Redaction(paths=frozenset((n,) for n in names))
    with bounded():
        payload, size, _ = cut_payload(body, rules)
    assert size == len(body)
    assert isinstance(payload, str)
