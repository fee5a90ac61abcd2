"""Payload masking without brokers: what is masked, what is kept, hashes, the setting."""

from __future__ import annotations

import hashlib
import json

import pytest

import flowcheck
from flowcheck.errors import TopologyError
from flowcheck.observations import PAYLOAD_CAP, cut_payload, redaction
from flowcheck.redact import MASK, PLAIN

TOPOLOGY = """\
brokers:
  redis: {kind: redis}
channels:
  events: {broker: redis, kind: stream}
flows:
  orders:
    correlate: $.order_id
    steps:
      - channel: events
        match: {payload: {$.auth_method: oauth}}
"""


def test_secrets_in_json_are_masked_at_any_depth() -> None:
    body = json.dumps(
        {"a": [{"b": {"Password": "x", "ok": 1}}], "token": {"deep": 1}, "n": 2}
    ).encode()
    payload, size, digest = cut_payload(body)
    assert json.loads(payload) == {"a": [{"b": {"Password": MASK, "ok": 1}}], "token": MASK, "n": 2}
    assert (size, digest) == (len(body), None)


@pytest.mark.parametrize(
    "body",
    [b"password=hunter2", b'{"order": 1}', b"", b'["tok"]', b'{"author": 1', b"\xff\xfe"],
    ids=["text", "no-secret", "empty", "array", "broken-json", "binary"],
)
def test_what_is_not_masked_stays_byte_for_byte(body: bytes) -> None:
    assert cut_payload(body)[0] == body.decode("utf-8", errors="replace")


def test_a_payload_too_deep_to_look_through_is_masked_whole() -> None:
    body = ("[" * 5000 + '{"password": "x"}' + "]" * 5000).encode()
    payload, size, digest = cut_payload(body)
    assert payload == MASK
    assert size == len(body)
    assert digest is None


def test_a_cut_payload_is_masked_and_hashed_as_sent() -> None:
    body = json.dumps({"secret": "hidden", "pad": "x" * PAYLOAD_CAP}).encode()
    payload, size, digest = cut_payload(body)
    assert "hidden" not in payload
    assert payload.startswith(f'{{"secret":"{MASK}"')
    assert (size, digest) == (len(body), hashlib.sha256(body).hexdigest())


def test_escaped_key_names_are_seen() -> None:
    payload = cut_payload(b'{"p\\u0061ssword": "hidden"}')[0]
    assert "hidden" not in payload


def test_the_setting_masks_paths_and_headers_and_keeps_what_rules_read() -> None:
    text = TOPOLOGY + "redact:\n  payload: [$.card.number, '$.items[1]']\n  headers: [X-Session]\n"
    rules = redaction(flowcheck.loads(text))
    body = json.dumps(
        {
            "auth_method": "oauth",  # a match reads it: kept
            "card": {"number": "4111", "cvc_token": "9"},
            "items": ["a", "b"],
        }
    ).encode()
    assert json.loads(cut_payload(body, rules)[0]) == {
        "auth_method": "oauth",
        "card": {"number": MASK, "cvc_token": MASK},
        "items": ["a", MASK],
    }
    assert json.loads(cut_payload(body, PLAIN)[0])["auth_method"] == MASK
    assert rules.header("x-session")
    assert rules.header("Authorization")
    assert not rules.header("x-tenant")


@pytest.mark.parametrize(
    ("setting", "where", "message"),
    [
        ("redact:\n  payload: [card.number]\n", "<string>:12:", "is not a payload path"),
        ("redact:\n  headers: ['']\n", "<string>:12:", "redact.headers"),
        ("redact:\n  payloads: [$.a]\n", "<string>:12:", "payloads"),
        ("redact: [$.a]\n", "<string>:11:", "redact"),
    ],
)
def test_a_bad_setting_is_located(setting: str, where: str, message: str) -> None:
    with pytest.raises(TopologyError) as info:
        flowcheck.loads(TOPOLOGY + setting)
    text = str(info.value)
    assert text.startswith(where), text
    assert message in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "name",
    ["PassWord", "x-SECRET", "authToken", "API-Key", "apikey", "Cookie", "sasl", "Credential"],
)
def test_every_name_that_looks_like_a_credential_is_looked_at(name: str) -> None:
    assert PLAIN.may_hide(json.dumps({name: 1}).encode())
    assert cut_payload(json.dumps({name: "hidden"}).encode())[0] == json.dumps(
        {name: MASK}, separators=(",", ":")
    )


def test_a_rule_reading_a_masked_path_is_warned_of() -> None:
    from flowcheck.topology._load import validate
    from flowcheck.topology._yaml import parse

    doc = parse(TOPOLOGY + "redact:\n  payload: [$.auth_method]\n", "<string>")
    assert validate(doc) is not None
    [warning] = doc.problems
    assert (warning.severity, warning.line) == ("warning", 10)
    assert str(warning).endswith(
        "warning: flows.orders.steps[0].match.payload: $.auth_method is masked "
        "(redact.payload), so this rule never sees its value"
    )


def test_a_path_without_names_and_a_secret_past_the_cut() -> None:
    rules = redaction(flowcheck.loads(TOPOLOGY + "redact:\n  payload: ['$[1]']\n"))
    assert json.loads(cut_payload(b'["a", "b"]', rules)[0]) == ["a", MASK]
    # Past the cut nothing is kept: the body is not even parsed, and the kept part is as sent.
    body = json.dumps({"pad": "x" * PAYLOAD_CAP, "password": "hidden"}).encode()
    payload, size, digest = cut_payload(body)
    assert payload == body[:PAYLOAD_CAP].decode()
    assert (size, digest) == (len(body), hashlib.sha256(body).hexdigest())
