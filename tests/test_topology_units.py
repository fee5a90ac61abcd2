"""The pure pieces of the topology language: value types, routing, env, the Python API, redaction."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flowcheck
from flowcheck.errors import Problem, TopologyError
from flowcheck.redact import MASK, is_secret_name, redact_headers, redact_url
from flowcheck.topology import (
    Binding,
    Correlate,
    DeadLetterRoute,
    DeadLetterRule,
    Exchange,
    Flow,
    Kafka,
    Latency,
    Match,
    Queue,
    RabbitMQ,
    RetryPolicy,
    Step,
    Topic,
    Topology,
    format_duration,
    parse_duration,
    parse_ratio,
    path_segments,
)
from flowcheck.topology._yaml import parse
from flowcheck.topology.routing import routes, topic_matches

ROOT = Path(__file__).resolve().parent.parent
SHOP = ROOT / "topologies" / "shop.yaml"

# Deterministic: the same examples on every run, and no example database on disk.
PROPERTY = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.too_slow],
)

# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("250ms", timedelta(milliseconds=250)),
        ("2s", timedelta(seconds=2)),
        ("1.5m", timedelta(seconds=90)),
        ("1h", timedelta(hours=1)),
        ("10us", timedelta(microseconds=10)),
        ("10µs", timedelta(microseconds=10)),
        (" 3 s ", timedelta(seconds=3)),
        ("0.5ms", timedelta(microseconds=500)),
        ("1234567.000001s", timedelta(seconds=1234567, microseconds=1)),
        ("1.0000005us", timedelta(microseconds=1)),
    ],
)
def test_parse_duration(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_passes_timedelta_through() -> None:
    assert parse_duration(timedelta(seconds=4)) == timedelta(seconds=4)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (30, "a duration needs a unit: write 30s or 30ms, not 30"),
        (1.5, "a duration needs a unit: write 1.5s or 1.5ms, not 1.5"),
        ("30", "a duration needs a unit: write 30s or 30ms"),
        ("0s", "a duration must be longer than zero"),
        ("0.0000001us", "rounds to zero; the shortest duration is 1us"),
        ("-1s", "'-1s' is not a duration; write it like 250ms, 2s, 1.5m or 1h"),
        ("fast", "'fast' is not a duration"),
        ("2 minutes", "'2 minutes' is not a duration"),
        ("1e3s", "'1e3s' is not a duration"),
        ("99999999999999999999h", "is too long to be a deadline or a budget"),
        (True, "a duration is written like 250ms, 2s or 1m"),
        (None, "a duration is written like 250ms, 2s or 1m"),
        ([1], "a duration is written like 250ms, 2s or 1m"),
        (float("nan"), "a duration is written like 250ms, 2s or 1m"),
        (float("inf"), "a duration is written like 250ms, 2s or 1m"),
    ],
)
def test_parse_duration_refuses(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_duration(value)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (timedelta(hours=2), "2h"),
        (timedelta(minutes=90), "90m"),
        (timedelta(seconds=120), "2m"),
        (timedelta(seconds=90), "90s"),
        (timedelta(seconds=1.5), "1.5s"),
        (timedelta(seconds=1), "1s"),
        (timedelta(milliseconds=250), "250ms"),
        (timedelta(microseconds=1500), "1.5ms"),
        (timedelta(microseconds=10), "0.01ms"),
        (timedelta(seconds=1234567, microseconds=1), "1234567.000001s"),
        (timedelta(hours=1_000_000), "1000000h"),
    ],
)
def test_format_duration(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


@PROPERTY
@given(st.integers(min_value=1, max_value=10**15).map(lambda us: timedelta(microseconds=us)))
def test_format_then_parse_duration_round_trips(value: timedelta) -> None:
    assert parse_duration(format_duration(value)) == value


@PROPERTY
@given(
    st.decimals(min_value="1", max_value="100000", places=3, allow_nan=False),
    st.sampled_from(["us", "ms", "s", "m", "h"]),
)
def test_parse_then_format_duration_is_stable(number: Any, unit: str) -> None:
    value = parse_duration(f"{number}{unit}")
    assert parse_duration(format_duration(value)) == value
    assert len(format_duration(value)) <= len(f"{number}{unit}") + 6


# ---------------------------------------------------------------- percentages and paths


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("99%", 0.99),
        ("0.5%", 0.005),
        (" 100 % ", 1.0),
        ("0%", 0.0),
        (0.99, 0.99),
        (1, 1.0),
        (0, 0.0),
    ],
)
def test_parse_ratio(value: Any, expected: float) -> None:
    assert parse_ratio(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (99, "99 is more than 1: write 99% for a percentage"),
        (1.5, "1.5 is more than 1: write 1.5% for a percentage"),
        ("120%", "a percentage must lie between 0% and 100%"),
        (-0.1, "a percentage must lie between 0% and 100%"),
        (250, "a percentage must lie between 0% and 100%"),
        ("-1%", "'-1%' is not a percentage; write it like 99% or 0.5%"),
        ("ninety", "'ninety' is not a percentage"),
        ("0.99", "'0.99' is not a percentage"),
        (True, "write a percentage like 99% or a fraction like 0.99"),
        (None, "write a percentage like 99% or a fraction like 0.99"),
    ],
)
def test_parse_ratio_refuses(value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_ratio(value)


@pytest.mark.parametrize(
    ("path", "segments"),
    [
        ("$.order_id", ["order_id"]),
        ("$.items[0].sku", ["items", 0, "sku"]),
        ('$["odd key"].x', ["odd key", "x"]),
        ("$.a.b-c[12]", ["a", "b-c", 12]),
    ],
)
def test_path_segments(path: str, segments: list[str | int]) -> None:
    assert list(path_segments(path)) == segments


# ---------------------------------------------------------------- RabbitMQ routing


@pytest.mark.parametrize(
    ("pattern", "key", "expected"),
    [
        ("order.placed", "order.placed", True),
        ("order.placed", "order.paid", False),
        ("order.*", "order.placed", True),
        ("order.*", "order", False),
        ("order.*", "order.placed.eu", False),
        ("*.placed", "order.placed", True),
        ("order.#", "order", True),
        ("order.#", "order.placed.eu", True),
        ("order.#", "orders.placed", False),
        ("#.eu", "order.placed.eu", True),
        ("#.eu", "eu", True),
        ("a.#.b", "a.b", True),
        ("a.#.b", "a.x.y.b", True),
        ("a.#.b", "a.x.y.c", False),
        ("a.*.b", "a.b", False),
        ("*.*", "a", False),
        ("#", "anything.at.all", True),
        ("#.#", "a.b.c", True),
        ("#.*", "", True),
        ("*", "a.b", False),
    ],
)
def test_topic_matches(pattern: str, key: str, expected: bool) -> None:
    assert topic_matches(pattern, key) is expected


def test_topic_matches_is_not_exponential() -> None:
    # Each '#' may swallow any number of words; without memoising this took minutes.
    assert not topic_matches(".".join(["#"] * 12) + ".x", ".".join(["a"] * 40))


@pytest.mark.parametrize(
    ("exchange", "binding", "key", "expected"),
    [
        ("direct", "billing", "billing", True),
        ("direct", "billing", "billing.x", False),
        ("direct", "", "", True),
        ("topic", "order.*", "order.placed", True),
        ("topic", "order.*", "refund.placed", False),
        ("fanout", "ignored", "anything", True),
        ("headers", "", "anything", True),
        ("direct", "billing", None, True),
        ("topic", "order.*", None, True),
    ],
)
def test_routes(exchange: str, binding: str, key: str | None, expected: bool) -> None:
    assert routes(exchange, binding, key) is expected


_WORD = st.text(alphabet="ab*#", max_size=2)
_KEY = st.lists(_WORD, min_size=1, max_size=6).map(".".join)


def _oracle(pattern: str, key: str) -> bool:
    """topic_matches by regular expression: '/' before every word, '*' one word, '#' any."""
    parts = {"*": "/[^/]*", "#": "(?:/[^/]*)*"}
    regex = "".join(parts.get(w, "/" + re.escape(w)) for w in pattern.split("."))
    return re.fullmatch(regex, "".join("/" + w for w in key.split("."))) is not None


@PROPERTY
@given(_KEY)
def test_a_key_matches_itself(key: str) -> None:
    assert topic_matches(key, key)


@PROPERTY
@given(_KEY)
def test_hash_matches_every_key(key: str) -> None:
    assert topic_matches("#", key)


@PROPERTY
@given(_KEY, st.data())
def test_star_stands_for_any_one_word(key: str, data: st.DataObject) -> None:
    words = key.split(".")
    i = data.draw(st.integers(min_value=0, max_value=len(words) - 1))
    assert topic_matches(".".join([*words[:i], "*", *words[i + 1 :]]), key)


@PROPERTY
@given(_KEY, _KEY)
def test_topic_matches_agrees_with_a_regex(pattern: str, key: str) -> None:
    assert topic_matches(pattern, key) is _oracle(pattern, key)


# ---------------------------------------------------------------- environment interpolation


def _value(text: str, env: dict[str, str], *path: str | int) -> tuple[Any, list[str], bool]:
    doc = parse(text, "t.yaml", env)
    node = doc.data
    for p in path:
        node = node[p]
    return node, [p.message for p in doc.problems], doc.is_secret(path)


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("x: ${A}", {"A": "one"}, "one"),
        ("x: ${A:-dflt}", {}, "dflt"),
        ("x: ${A:-dflt}", {"A": ""}, "dflt"),
        ("x: ${A:-dflt}", {"A": "set"}, "set"),
        ("x: ${A-dflt}", {}, "dflt"),
        ("x: ${A-dflt}", {"A": ""}, ""),
        ("x: ${A:-}", {}, ""),
        ("x: amqp://${U}:${P}@host/", {"U": "u", "P": "p"}, "amqp://u:p@host/"),
        ("x: ${A:-amqp://guest:guest@localhost:5672/}", {}, "amqp://guest:guest@localhost:5672/"),
    ],
)
def test_env_interpolation(text: str, env: dict[str, str], expected: str) -> None:
    value, problems, secret = _value(text, env, "x")
    assert value == expected
    assert problems == []
    assert secret  # values built from the environment are never echoed


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x: $${A}", "${A}"),
        ("x: cost $5", "cost $5"),
        ("x: a$$b", "a$b"),
        ("x: '$'", "$"),
        ("x: ${not valid}", "${not valid}"),
    ],
)
def test_env_literals(text: str, expected: str) -> None:
    value, problems, secret = _value(text, {"A": "no"}, "x")
    assert value == expected
    assert problems == []
    assert not secret


def test_env_only_in_strings() -> None:
    value, problems, _ = _value("x: [1, true, '${A}']", {"A": "2"}, "x")
    assert value == [1, True, "2"]
    assert problems == []


def test_unset_env_variable_is_a_problem() -> None:
    doc = parse("brokers:\n  r: {kind: rabbitmq, url: '${NOPE}'}\n", "t.yaml", {})
    assert [(p.line, p.column, p.message) for p in doc.problems] == [
        (
            2,
            28,
            "brokers.r.url: environment variable NOPE is not set; set it, or give a default "
            "with ${NOPE:-default}",
        )
    ]


def test_env_does_not_leak_into_messages() -> None:
    text = "brokers:\n  k: {kind: kafka, bootstrap: '${B}'}\nchannels:\n  t: {broker: k, kind: topic}\n"
    with pytest.raises(TopologyError) as info:
        flowcheck.loads(text, env={"B": "hunter2"})
    assert "hunter2" not in str(info.value)
    assert [p.message for p in info.value.problems] == [
        "brokers.k.bootstrap: '***' is not host:port, like 127.0.0.1:9092"
    ]


# ---------------------------------------------------------------- the Python API


BROKEN = """\
brokers:
  rabbit: {kind: rabbitmq}
channels:
  orders: {broker: rabbit, kind: exchange, type: topic}
flows:
  f:
    correlate: traceparent
    steps: [order]
"""


def test_loads_raises_with_every_problem() -> None:
    with pytest.raises(TopologyError) as info:
        flowcheck.loads(BROKEN, file="inline.yaml")
    assert info.value.problems == (
        Problem(
            "inline.yaml",
            8,
            13,
            "flows.f.steps[0].channel: unknown channel 'order' (did you mean 'orders'?)",
        ),
    )
    assert str(info.value) == str(info.value.problems[0])
    assert isinstance(info.value, flowcheck.FlowcheckError)


def test_loads_never_raises_anything_else() -> None:
    texts: list[str | bytes] = [
        "",
        "\x00",
        "[",
        "a: *b",
        "- 1",
        "brokers: 5\nchannels: {}",
        b"\xff\xfe",
    ]
    for text in texts:
        with pytest.raises(TopologyError):
            flowcheck.loads(text)


def test_top_level_x_keys_are_ignored() -> None:
    text = """
x-queue: &queue {broker: rabbit, kind: queue, type: quorum}
x-note: [anything, {at: all}]
brokers: {rabbit: {kind: rabbitmq}}
channels:
  orders: {broker: rabbit, kind: exchange, type: topic}
  billing:
    <<: *queue
    bindings: [{exchange: orders, key: "#"}]
"""
    topology = flowcheck.loads(text)
    billing = topology.channels["billing"]
    assert isinstance(billing, Queue)
    assert billing.type == "quorum"
    assert set(topology.channels) == {"orders", "billing"}


def test_x_keys_inside_sections_are_names() -> None:
    text = """
brokers: {rabbit: {kind: rabbitmq}}
channels:
  x-orders: {broker: rabbit, kind: exchange, type: topic}
  x-billing: {broker: rabbit, kind: queue, bindings: [{exchange: x-orders, key: "#"}]}
flows:
  f: {correlate: $.id, steps: [x-orders, x-billing], x-note: 1}
"""
    with pytest.raises(TopologyError) as info:
        flowcheck.loads(text, file="inline.yaml")
    assert [p.message for p in info.value.problems] == [
        "flows.f: unknown key 'x-note'; valid keys here: branches, correlate, dead_letters, "
        "deadline, delivery, description, error_rate, gives_up, latency, ordering, retry, steps, "
        "success_rate"
    ]


def test_load_and_check_file() -> None:
    topology = flowcheck.load(str(SHOP), env={})
    assert set(topology.flows) == {
        "order-to-shipment",
        "poison-order",
        "declined-payment",
        "stuck-shipment",
    }
    assert topology.channel_name("payments") == "payments"
    assert isinstance(topology.brokers["kafka"], Kafka)
    assert topology.brokers["kafka"].bootstrap == ["127.0.0.1:9092"]
    step = topology.flows["declined-payment"].steps[0]
    assert step.retry is not None
    assert (step.retry.max_attempts, step.retry.backoff) == (2, None)
    assert topology.flows["order-to-shipment"].success_rate == pytest.approx(0.99)
    assert topology.flows["order-to-shipment"].correlate.rule() == "json_path"
    assert topology.flows["declined-payment"].correlate.rule() == "header"

    missing, problems = flowcheck.check_file(str(ROOT / "tests/topologies/broken/empty.yaml"))
    assert missing is None
    assert [p.message for p in problems] == [
        "this file is empty; a topology needs at least 'brokers' and 'channels'"
    ]

    with pytest.raises(flowcheck.UsageError, match="no such file"):
        flowcheck.load(str(ROOT / "no-such.yaml"))


def _built() -> Topology:
    """The poison-order flow of the shop, written in Python."""
    return Topology(
        name="built",
        brokers={"rabbit": RabbitMQ(kind="rabbitmq"), "kafka": Kafka(kind="kafka")},
        channels={
            "shop.orders": Exchange(broker="rabbit", kind="exchange", type="topic"),
            "shop.dlx": Exchange(broker="rabbit", kind="exchange"),
            "billing.orders": Queue(
                broker="rabbit",
                kind="queue",
                type="quorum",
                bindings=[Binding(exchange="shop.orders", key="order.placed")],
                delivery_limit=3,
                dead_letter=DeadLetterRoute(exchange="shop.dlx", key="billing.orders"),
            ),
            "billing.orders.dlq": Queue(
                broker="rabbit",
                kind="queue",
                bindings=[Binding(exchange="shop.dlx", key="billing.orders")],
            ),
            "payments": Topic(broker="kafka", kind="topic", partitions=3, key="$.order_id"),
        },
        flows={
            "poison-order": Flow(
                correlate=Correlate(json_path="$.order_id"),
                steps=[
                    Step(channel="shop.orders", match=Match(routing_key="order.placed")),
                    Step(
                        channel="billing.orders",
                        retry=RetryPolicy(max_attempts=4),
                        latency=Latency(p50="50ms", p99="1.5s"),
                    ),
                ],
                deadline="30s",
                success_rate="99.5%",
                delivery="at-least-once",
                dead_letters=[
                    DeadLetterRule(
                        when=Match(payload={"$.poison": True}),
                        step="billing.orders",
                        channel="billing.orders.dlq",
                        reason="delivery_limit",
                        attempts=4,
                    )
                ],
            )
        },
    )


def test_topology_built_in_python() -> None:
    topology = _built()
    flow = topology.flows["poison-order"]
    assert flow.deadline == timedelta(seconds=30)
    assert flow.success_rate == pytest.approx(0.995)
    assert flow.correlate.rule() == "json_path"


def test_topology_built_in_python_round_trips_through_yaml() -> None:
    """model_dump gives YAML that validates, with no problem, to the same topology."""
    topology = _built()
    data = topology.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    text = yaml.safe_dump(data, sort_keys=False)
    again = flowcheck.loads(text)
    assert again == topology
    assert "deadline: 30s" in text
    assert "p99: 1.5s" in text


def test_match_tests_round_trip_through_yaml() -> None:
    """Exactly the operators given are dumped: `ne: null` is a test, not a default."""
    match = Match.model_validate(
        {
            "headers": {"account": {"prefix": "X-"}, "tries": 2},
            "payload": {"$.a": {"ne": None}, "$.b": {"in": [1, "b"]}, "$.c": {"eq": {"k": 1}}},
            "key": {"regex": "7$"},
        }
    )
    data = match.model_dump(mode="json", by_alias=True, exclude_defaults=True)
    assert data["payload"]["$.a"] == {"ne": None}
    assert data["payload"]["$.b"] == {"in": [1, "b"]}
    assert Match.model_validate(yaml.safe_load(yaml.safe_dump(data))) == match


def test_models_validate_on_construction() -> None:
    with pytest.raises(ValueError, match="give exactly one of traceparent"):
        Correlate(header="x", json_path="$.a")
    with pytest.raises(ValueError, match="a duration needs a unit"):
        Flow(correlate=Correlate(traceparent=True), steps=[Step(channel="x")], deadline=30)


# ---------------------------------------------------------------- never a traceback


def _outcome(text: str) -> tuple[Topology | None, tuple[Problem, ...]]:
    """The topology, or the problems: loads must raise nothing but TopologyError."""
    try:
        return flowcheck.loads(text, env={}), ()
    except TopologyError as exc:
        return None, exc.problems


_FRAGMENTS = st.sampled_from(
    [
        "brokers:",
        "channels:",
        "flows:",
        "  r: {kind: rabbitmq}",
        "  k: {kind: kafka, bootstrap: 'a:1'}",
        "  o: {broker: r, kind: exchange}",
        "  q: {broker: r, kind: queue, bindings: [o]}",
        "  f: {correlate: $.id, steps: [o, q]}",
        "    deadline: 1s",
        "&a x: *a",
        "- [",
        "{",
        "\t",
        "? [1]",
        "!!int x",
        "---",
        "'",
        "${X}",
        "<<: *a",
    ]
)


@PROPERTY
@given(st.lists(_FRAGMENTS, max_size=12).map("\n".join))
def test_any_text_gives_problems_not_exceptions(text: str) -> None:
    topology, problems = _outcome(text)
    assert topology is not None or problems
    assert all(p.line >= 1 and p.column >= 1 for p in problems)


@PROPERTY
@given(st.data())
def test_damaged_shop_gives_problems_not_exceptions(data: st.DataObject) -> None:
    lines = SHOP.read_text().splitlines()
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        i = data.draw(st.integers(min_value=0, max_value=len(lines) - 1))
        action = data.draw(st.sampled_from(["delete", "duplicate", "dedent", "garble"]))
        if action == "delete":
            del lines[i]
        elif action == "duplicate":
            lines.insert(i, lines[i])
        elif action == "dedent":
            lines[i] = lines[i][2:]
        else:
            j = data.draw(st.integers(min_value=0, max_value=max(len(lines[i]) - 1, 0)))
            ch = data.draw(st.sampled_from(list(":-[]{}&*#'\"x 0\t")))
            lines[i] = lines[i][:j] + ch + lines[i][j + 1 :]
    topology, problems = _outcome("\n".join(lines))
    assert topology is not None or problems


# ---------------------------------------------------------------- redaction


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("amqp://user:pw@host:5672/vh", f"amqp://user:{MASK}@host:5672/vh"),
        ("redis://:pw@redis:6379/0", f"redis://:{MASK}@redis:6379/0"),
        ("amqp://[::1]:5672/", "amqp://[::1]:5672/"),
        ("amqp://u:pw@[::1]:5672/", f"amqp://u:{MASK}@[::1]:5672/"),
        ("amqp://guest@host/", "amqp://guest@host/"),
        ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
        ("amqp://u:p%40ss@h/?x=1#f", f"amqp://u:{MASK}@h/?x=1#f"),
        ("amqp://u:pw@h:badport/", f"amqp://u:{MASK}@h/"),
        ("http://[::1", MASK),
        ("redis://h:6379/0?password=pw", f"redis://h:6379/0?password={MASK}"),
        (
            "redis://u:pw@h/0?socket_timeout=5&Password=pw2&db=1",
            f"redis://u:{MASK}@h/0?socket_timeout=5&Password={MASK}&db=1",
        ),
        ("amqp://h/?heartbeat=5&x-api%5Fkey=k", f"amqp://h/?heartbeat=5&x-api%5Fkey={MASK}"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


@PROPERTY
@given(
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.~!$&'()*+,;=", min_size=4, max_size=20)
)
def test_redact_url_never_shows_the_password(password: str) -> None:
    assert password not in redact_url(f"amqp://user:{password}@broker.example:5672/vhost")


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("X-Api-Key", True),
        ("api_key", True),
        ("Authorization", True),
        ("sasl_password", True),
        ("session-token", True),
        ("Cookie", True),
        ("order_id", False),
        ("traceparent", False),
        ("x-order-id", False),
    ],
)
def test_is_secret_name(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret


def test_redact_headers() -> None:
    headers = {"Authorization": "Bearer abc", "x-order-id": "42", "token": 7}
    assert redact_headers(headers) == {"Authorization": MASK, "x-order-id": "42", "token": MASK}
    assert headers["Authorization"] == "Bearer abc"  # a copy, not in place
