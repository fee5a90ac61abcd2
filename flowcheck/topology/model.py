"""The topology language: pydantic models that are both the YAML schema and the Python API.

A topology names the **brokers**, the **channels** on them (RabbitMQ exchanges and
queues, Kafka topics, Redis streams), the **services** that publish and consume,
and the **flows**: the event chains the system is expected to carry.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    GetJsonSchemaHandler,
    PrivateAttr,
    SecretStr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    StringConstraints,
    Tag,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

from flowcheck import defaults
from flowcheck.topology._types import (
    DURATION_SCHEMA,
    JSON_PATH_SCHEMA,
    Duration,
    JsonPath,
    Ratio,
    check_path,
    parse_duration,
)

Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._:/@-]*$"),
]
Scalar = str | int | float | bool


def _not_bool(value: Any) -> Any:
    # YAML reads yes/no/true/false as booleans, which pydantic would take as 1 and 0.
    if isinstance(value, bool):
        raise ValueError("expected a whole number, got a yes/no value")
    return value


Whole = Annotated[int, BeforeValidator(_not_bool)]


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_by_name=True)

    # JSON Schemas of the shorter forms a model also accepts (``_shorthand`` and
    # the like), so that editors using ``flowcheck schema`` accept them too.
    _shorthands: ClassVar[tuple[dict[str, Any], ...]] = ()

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        schema = handler(core_schema)
        return {"anyOf": [*cls._shorthands, schema]} if cls._shorthands else schema


def _shorthand(field: str) -> Any:
    """Let a plain string stand for a mapping with one key: ``billing`` -> ``{channel: billing}``."""

    def expand(cls: type, value: Any) -> Any:
        return {field: value} if isinstance(value, str) else value

    return model_validator(mode="before")(classmethod(expand))  # type: ignore[arg-type]


def _span(low: str, high: str) -> AfterValidator:
    """A duration from ``low`` to ``high``, both included."""
    lo, hi = parse_duration(low), parse_duration(high)

    def check(value: timedelta) -> timedelta:
        if not lo <= value <= hi:
            raise ValueError(f"must be from {low} to {high}")
        return value

    return AfterValidator(check)


# ---------------------------------------------------------------- brokers


class TLS(Model):
    """How a broker connection speaks TLS. File paths are read relative to the topology
    file's directory (given as validation context ``base``), else to the working directory."""

    ca_file: str | None = Field(
        None, description="CA certificates (PEM) that the server's certificate must chain to"
    )
    cert_file: str | None = Field(None, description="client certificate (PEM), for mutual TLS")
    key_file: str | None = Field(
        None, description="client private key (PEM); default: the key inside cert_file"
    )
    key_password: SecretStr | None = Field(None, description="password of an encrypted key_file")
    verify: bool = Field(
        True, description="check the server's certificate and host name (false: do not)"
    )
    server_name: str | None = Field(
        None, description="host name the server's certificate must carry, if not the URL's"
    )
    _base: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> TLS:
        context = info.context if isinstance(info.context, dict) else {}
        self._base = str(context.get("base") or os.getcwd())
        return self

    def path(self, key: Literal["ca_file", "cert_file", "key_file"]) -> str | None:
        """The file ``key`` names, made absolute."""
        value: str | None = getattr(self, key)
        return None if value is None else os.path.join(self._base, os.path.expanduser(value))


class RabbitMQ(Model):
    """A RabbitMQ broker reached over AMQP 0-9-1."""

    kind: Literal["rabbitmq"]
    url: SecretStr = SecretStr(defaults.RABBITMQ_URL)
    vhost: str | None = Field(None, description="overrides the vhost in the URL")
    tls: TLS | None = Field(None, description="CA, client certificate; with an amqps:// URL")
    tap_read_interval: Annotated[Duration, _span("1ms", "1s")] = Field(
        timedelta(milliseconds=10),
        description="least time between two of a tap's reads while messages keep coming",
        json_schema_extra={"default": "10ms"},
    )


class KafkaSecurity(Model):
    _base: str = PrivateAttr(default="")

    @model_validator(mode="after")
    def _resolve(self, info: ValidationInfo) -> KafkaSecurity:
        context = info.context if isinstance(info.context, dict) else {}
        self._base = str(context.get("base") or os.getcwd())
        return self

    protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    username: str | None = None
    password: SecretStr | None = None
    # The older place of tls.ca_file, tls.cert_file and tls.key_file; still read.
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _host_port(value: str) -> str:
    host, _, port = value.rpartition(":")
    if host and port.isdigit() and not 0 < int(port) < 65536:
        raise ValueError(f"{value!r} has port {port}; a port is a number from 1 to 65535")
    if (
        not host
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or any(c.isspace() for c in value)
    ):
        raise ValueError(f"{value!r} is not host:port, like 127.0.0.1:9092")
    return value


class Kafka(Model):
    """A Kafka cluster (or any broker speaking the Kafka protocol)."""

    kind: Literal["kafka"]
    bootstrap: Annotated[
        list[Annotated[str, AfterValidator(_host_port)]],
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string", "description": "host:port, comma separated"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1},
                ]
            }
        ),
    ] = Field(default_factory=lambda: [defaults.KAFKA_BOOTSTRAP], min_length=1)
    security: KafkaSecurity = KafkaSecurity()
    tls: TLS | None = Field(
        None, description="CA, client certificate; with protocol SSL or SASL_SSL"
    )
    client_id: str = "flowcheck"
    tap_fetch_wait: Annotated[Duration, _span("1ms", "10s")] = Field(
        timedelta(milliseconds=100),
        description="how long a tap's fetch waits on the broker when it has no new record",
        json_schema_extra={"default": "100ms"},  # as written in YAML, not ISO 8601
    )

    @field_validator("bootstrap", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    def tls_settings(self) -> TLS | None:
        """The TLS settings, wherever written: ``tls``, or the older ``security`` keys."""
        if self.tls is not None or not self.security.protocol.endswith("SSL"):
            return self.tls
        sec = self.security
        if sec.ca_file is None and sec.cert_file is None and sec.key_file is None:
            return None
        tls = TLS(ca_file=sec.ca_file, cert_file=sec.cert_file, key_file=sec.key_file)
        tls._base = sec._base
        return tls


class Redis(Model):
    """A Redis server, for Streams."""

    kind: Literal["redis"]
    url: SecretStr = SecretStr(defaults.REDIS_URL)
    db: Annotated[Whole, Field(ge=0)] | None = Field(
        None, description="overrides the db in the URL"
    )
    tls: TLS | None = Field(None, description="CA, client certificate; with a rediss:// URL")
    tap_read_interval: Annotated[Duration, _span("1ms", "1s")] = Field(
        timedelta(milliseconds=10),
        description="least time between two of a tap's reads while entries keep coming",
        json_schema_extra={"default": "10ms"},
    )


Broker = Annotated[RabbitMQ | Kafka | Redis, Field(discriminator="kind")]
BROKER_KINDS = ("rabbitmq", "kafka", "redis")

# ---------------------------------------------------------------- channels


_IMPORT_PATH = r"^[A-Za-z_][\w.]*[:.][A-Za-z_]\w*$"


def _import_path(value: str) -> str:
    if not re.fullmatch(_IMPORT_PATH, value):
        raise ValueError(
            f"{value!r} is not an import path; write module:Class, like shop.events:OrderPlaced"
        )
    return value


class Schema(Model):
    """A message schema: inline JSON Schema, or a pydantic model by import path."""

    json_schema: dict[str, Any] | None = Field(None, alias="json")
    model: (
        Annotated[
            str,
            AfterValidator(_import_path),
            WithJsonSchema({"type": "string", "pattern": _IMPORT_PATH}),
        ]
        | None
    ) = Field(None, description="import path of a pydantic model, like shop.events:OrderPlaced")

    @model_validator(mode="after")
    def _one(self) -> Schema:
        if (self.json_schema is None) == (self.model is None):
            raise ValueError("give exactly one of 'json' (inline JSON Schema) or 'model'")
        return self


class Binding(Model):
    """A queue's binding to an exchange; ``key`` is the routing key or pattern."""

    _expand = _shorthand("exchange")
    _shorthands = ({"type": "string", "description": "the exchange, bound with no key"},)
    exchange: str
    key: str = ""
    arguments: dict[str, Scalar] = Field(default_factory=dict)


class DeadLetterRoute(Model):
    """Where a queue's dead letters go: through a dead-letter exchange
    (x-dead-letter-exchange), or straight to a queue through the default exchange
    (x-dead-letter-exchange ""); or, with ``published_by``, where the consuming
    service publishes a message it gives up on (the broker is told nothing)."""

    _expand = _shorthand("exchange")
    _shorthands = ({"type": "string", "description": "the dead-letter exchange"},)
    exchange: str | None = Field(None, description="the dead-letter exchange")
    queue: str | None = Field(
        None, description="the dead-letter queue, reached through the default exchange"
    )
    key: str | None = Field(None, description="routing key for dead letters; default: the original")
    published_by: str | None = Field(
        None, description="the service that publishes the dead letters itself (no x-arguments)"
    )

    @model_validator(mode="after")
    def _one(self) -> DeadLetterRoute:
        if self.exchange == "":
            raise ValueError(
                "the default exchange has no channel: write 'queue: <the dead-letter queue>' "
                "for dead letters sent straight to a queue"
            )
        if (self.exchange is None) == (self.queue is None):
            raise ValueError("give exactly one of 'exchange' or 'queue'")
        if self.queue is not None and self.key is not None:
            raise ValueError(
                "'key' goes with 'exchange': a 'queue' route's key is the queue's name"
            )
        return self

    @property
    def target(self) -> str:
        """The exchange or queue dead letters are sent to."""
        return self.exchange if self.exchange is not None else self.queue or ""


class _Channel(Model):
    broker: str
    name: str | None = Field(None, description="name on the broker; default: the channel's key")
    payload_schema: Schema | None = Field(None, alias="schema")
    description: str | None = None

    # What each broker's channel is to the checker, the taps and the pytest API: asked of
    # the channel, so that code outside topology/ and brokers/ never asks for its class.

    @property
    def retry_channels(self) -> list[str]:
        """Channels a retried message passes through (delay queues, retry topics)."""
        return []

    @property
    def dead_letter_channel(self) -> str | None:
        """The channel its dead letters are written to directly (a topic's or a stream's); a
        queue's go through its dead-letter exchange (see routing.dead_letter_path)."""
        return None

    # Is a message consumed (attempted) here? An exchange only routes.
    consumed: ClassVar[bool] = True
    # Does a retried message come back routed anew, with its delivery count (RabbitMQ's
    # dead-letter round trip, x-death)?
    returns_routed: ClassVar[bool] = False
    # Do taps see acknowledgements here (Kafka commits, Redis XACK)?
    acks_visible: ClassVar[bool] = False
    # Is order kept per partition of a record key (a Kafka topic)?
    partitioned: ClassVar[bool] = False
    # Does a consumer write a record on a retry channel when an attempt fails (Kafka
    # retry topics), so that when attempts failed can be seen?
    failures_recorded: ClassVar[bool] = False

    @property
    def attempts_polled(self) -> bool:
        """Are attempts shown only by a consumer group's deliveries, polled (a Redis
        stream's pending list)? A run waits for that evidence before it may end."""
        return False

    @property
    def drops_over_limit(self) -> bool:
        """Are messages over its delivery limit lost silently (no dead-letter route)?"""
        return False

    def unseen_attempts(self, key: str) -> str:
        """Why the attempts at channel ``key`` (this one) could not be seen."""
        return f"no delivery was seen on {key!r}"


class Exchange(_Channel):
    kind: Literal["exchange"]
    type: Literal["direct", "topic", "fanout", "headers"] = "direct"
    durable: bool = True
    alternate: str | None = Field(None, description="alternate exchange for unroutable messages")

    consumed: ClassVar[bool] = False


class Queue(_Channel):
    kind: Literal["queue"]
    type: Literal["classic", "quorum"] = "classic"
    durable: bool = True
    bindings: list[Binding] = Field(default_factory=list)
    delivery_limit: Annotated[Whole, Field(ge=1)] | None = None
    ttl: Duration | None = None
    max_length: Annotated[Whole, Field(ge=1)] | None = None
    overflow: Literal["drop-head", "reject-publish", "reject-publish-dlx"] | None = None
    dead_letter: DeadLetterRoute | None = None
    retry: list[str] = Field(
        default_factory=list, description="delay queues a retried message passes"
    )
    arguments: dict[str, Scalar] = Field(default_factory=dict, description="further x-arguments")

    returns_routed: ClassVar[bool] = True

    @property
    def retry_channels(self) -> list[str]:
        return self.retry

    @property
    def drops_over_limit(self) -> bool:
        # A dead letter the service publishes itself does not stop the broker dropping.
        return self.delivery_limit is not None and (
            self.dead_letter is None or self.dead_letter.published_by is not None
        )

    def unseen_attempts(self, key: str) -> str:
        return (
            f"no delivery was seen on queue {key!r}: RabbitMQ shows deliveries only "
            "through its firehose (rabbitmqctl trace_on)"
        )


class Topic(_Channel):
    kind: Literal["topic"]
    partitions: Annotated[Whole, Field(ge=1)] = 1
    replication: Annotated[Whole, Field(ge=1)] | None = None
    key: JsonPath | None = Field(None, description="payload field producers use as record key")
    retry: list[str] = Field(default_factory=list, description="retry topics, in order")
    dead_letter: str | None = None

    acks_visible: ClassVar[bool] = True
    partitioned: ClassVar[bool] = True
    failures_recorded: ClassVar[bool] = True

    @property
    def retry_channels(self) -> list[str]:
        return self.retry

    @property
    def dead_letter_channel(self) -> str | None:
        return self.dead_letter

    def unseen_attempts(self, key: str) -> str:
        return (
            f"a Kafka topic shows attempts only as records on its retry topics, "
            f"and {key!r} declares none"
        )


class Stream(_Channel):
    kind: Literal["stream"]
    groups: list[str] = Field(default_factory=list)
    max_length: Annotated[Whole, Field(ge=1)] | None = None
    delivery_limit: Annotated[Whole, Field(ge=1)] | None = Field(
        None, description="deliveries after which consumers move an entry to dead_letter"
    )
    dead_letter: str | None = None
    payload_field: str = "payload"

    acks_visible: ClassVar[bool] = True

    @property
    def dead_letter_channel(self) -> str | None:
        return self.dead_letter

    @property
    def attempts_polled(self) -> bool:
        return bool(self.groups)

    @property
    def drops_over_limit(self) -> bool:
        return self.delivery_limit is not None and self.dead_letter is None

    def unseen_attempts(self, key: str) -> str:
        return f"no delivery was seen in the consumer-group pending list of {key!r}"


Channel = Annotated[Exchange | Queue | Topic | Stream, Field(discriminator="kind")]
CHANNEL_KINDS = {"exchange": "rabbitmq", "queue": "rabbitmq", "topic": "kafka", "stream": "redis"}

# ---------------------------------------------------------------- services


class Consume(Model):
    _expand = _shorthand("channel")
    _shorthands = ({"type": "string", "description": "the channel"},)
    channel: str
    group: str | None = Field(None, description="Kafka consumer group or Redis stream group")


class Service(Model):
    description: str | None = None
    publishes: list[str] = Field(default_factory=list)
    consumes: list[Consume] = Field(default_factory=list)


# ---------------------------------------------------------------- flows

AmqpProperty = Literal["message_id", "correlation_id", "app_id", "type", "user_id", "reply_to"]


class Correlate(Model):
    """How the messages of one chain are recognised: exactly one rule."""

    _shorthands = ({"enum": ["traceparent", "kafka_key"]}, JSON_PATH_SCHEMA)

    traceparent: Literal[True] | None = Field(None, description="W3C trace id from 'traceparent'")
    header: str | None = None
    property: AmqpProperty | None = None
    json_path: JsonPath | None = Field(None, alias="json")
    kafka_key: Literal[True] | None = None

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.startswith("$"):
                return {"json": value}
            if value in ("traceparent", "kafka_key"):
                return {value: True}
            raise ValueError(
                f"{value!r} is not a correlation rule; write traceparent, kafka_key, a payload "
                "path like $.order_id, or a mapping like {header: x-order-id}"
            )
        return value

    @model_validator(mode="after")
    def _one(self) -> Correlate:
        if len(self.model_fields_set) != 1:
            raise ValueError("give exactly one of traceparent, header, property, json or kafka_key")
        return self

    def rule(self) -> str:
        """The name of the rule in use: traceparent, header, property, json_path or kafka_key."""
        return next(iter(self.model_fields_set))


def _bound(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number or a string, got {_what(value)}")
    return value


def _what(value: Any) -> str:
    if isinstance(value, bool):
        return "a yes/no value"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "nothing (null)" if value is None else repr(value)


Bound = Annotated[int | float | str, BeforeValidator(_bound)]


class Condition(Model):
    """Tests on one header, payload field or record key; all that are given must hold."""

    eq: Any = Field(None, description="equals this value")
    ne: Any = Field(None, description="does not equal this value (an absent value included)")
    lt: Bound | None = Field(None, description="below this number, or before this string")
    lte: Bound | None = Field(None, description="at most this")
    gt: Bound | None = Field(None, description="above this")
    gte: Bound | None = Field(None, description="at least this")
    prefix: str | None = Field(None, description="a string that starts with this")
    suffix: str | None = Field(None, description="a string that ends with this")
    regex: str | None = Field(
        None, description="a string in which this regular expression finds a match"
    )
    in_: list[Any] | None = Field(
        None, alias="in", min_length=1, description="equals one of these values"
    )
    not_in: list[Any] | None = Field(
        None, description="equals none of these values (an absent value included)"
    )
    exists: bool | None = Field(None, description="is present (true) or absent (false)")
    _pattern: re.Pattern[str] | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _sound(self) -> Condition:
        given = self.model_fields_set
        if not given:
            ops = (f.alias or n for n, f in type(self).model_fields.items())
            raise ValueError(f"give at least one of {', '.join(ops)}")
        bounds = [n for n in ("lt", "lte", "gt", "gte") if n in given]
        if len({type(getattr(self, n)) is str for n in bounds}) > 1:
            raise ValueError(
                f"{' and '.join(bounds)}: compare with numbers or with strings, not both"
            )
        if self.exists is None and "exists" in given:
            raise ValueError("exists: expected true or false")
        if self.exists is False and len(given) > 1:
            raise ValueError("exists: false holds only for an absent value; give no other test")
        if self.regex is not None:
            self._pattern = re.compile(self.regex)
        return self

    @field_validator("in_", "not_in")
    @classmethod
    def _plain(cls, value: list[Any] | None) -> list[Any] | None:
        for item in value or ():
            if isinstance(item, dict | list):
                raise ValueError(f"list plain values, not {_what(item)}; use eq for one mapping")
        return value

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"{value!r} is not a regular expression: {exc}") from None
        return value

    @model_serializer(mode="wrap")
    def _given(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        # Exactly the operators given: `eq: null` is a test, not a default to leave out
        # (a given operator missing from what the handler made was left out for being null).
        data = handler(self)
        given = self.model_fields_set
        return {
            key: data.get(key)
            for name, field in type(self).model_fields.items()
            if name in given
            for key in [(field.alias or name) if info.by_alias else name]
        }

    @property
    def pattern(self) -> re.Pattern[str] | None:
        """``regex`` compiled once, when the topology is loaded."""
        return self._pattern


def _tag(value: Any) -> str:
    return "Condition" if isinstance(value, dict | Condition) else "value"


# A plain value (equality) or, written as a mapping, a Condition.
HeaderTest = Annotated[
    Annotated[Condition, Tag("Condition")] | Annotated[Scalar, Tag("value")], Discriminator(_tag)
]
PayloadTest = Annotated[
    Annotated[Condition, Tag("Condition")]
    | Annotated[Any, Tag("value"), WithJsonSchema({"not": {"type": "object"}})],
    Discriminator(_tag),
]
KeyTest = Annotated[
    Annotated[Condition, Tag("Condition")] | Annotated[str, Tag("value")], Discriminator(_tag)
]


class Compiled:
    """Where the checker keeps a match's test, compiled on first use. Not part of the
    match: equal to any other, and for its ``owner`` only (a copy compiles its own)."""

    __slots__ = ("owner", "test")

    def __init__(self) -> None:
        self.owner: object = None
        self.test: Any = None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Compiled)

    __hash__ = None  # type: ignore[assignment]


class Match(Model):
    """Which messages a step (or dead-letter rule) is about; all conditions must hold."""

    headers: dict[str, HeaderTest] = Field(default_factory=dict)
    payload: dict[JsonPath, PayloadTest] = Field(default_factory=dict)
    routing_key: str | None = Field(None, description="RabbitMQ routing key pattern (* and #)")
    key: KeyTest | None = Field(None, description="Kafka record key")
    _compiled: Compiled = PrivateAttr(default_factory=Compiled)

    @model_validator(mode="after")
    def _some(self) -> Match:
        if not self.model_fields_set:
            raise ValueError("give at least one of headers, payload, routing_key or key")
        return self


class Backoff(Model):
    """Wait between attempts: ``initial`` then times ``multiplier``, capped at ``max``."""

    _shorthands = (DURATION_SCHEMA,)

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        return {"initial": value} if isinstance(value, (str, int, float)) else value

    initial: Duration
    multiplier: Annotated[float, Field(ge=1)] = 1.0
    max: Duration | None = None
    jitter: Ratio = 0.0


class Locator(Model):
    """Where a message carries a value: one header, or one payload path."""

    _shorthands = (
        {"type": "string", "description": "a header name, or a payload path like $.retries"},
    )

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"payload": value} if value.startswith("$") else {"header": value}
        return value

    header: str | None = None
    payload: JsonPath | None = None

    @model_validator(mode="after")
    def _one(self) -> Locator:
        if (self.header is None) == (self.payload is None):
            raise ValueError("give exactly one of header or payload")
        return self


class RetryCounter(Locator):
    """A retry counter the framework carries: ``first`` on the first attempt (or absent),
    one higher on each retry."""

    first: Annotated[Whole, Field(ge=0)] = Field(
        0, description="its value on the first attempt (an absent counter counts as this)"
    )


class RetryPolicy(Model):
    max_attempts: Annotated[Whole, Field(ge=1)] | None = Field(
        None, description="at most this many deliveries, the first one included"
    )
    attempts: Annotated[Whole, Field(ge=1)] | None = Field(
        None, description="exactly this many deliveries, the first one included"
    )
    backoff: Backoff | None = None
    counter: RetryCounter | None = Field(
        None, description="a re-published retry carries this counter: an attempt, not a duplicate"
    )
    id: Locator | None = Field(
        None, description="a re-published retry keeps this id: an attempt, not a duplicate"
    )

    @model_validator(mode="after")
    def _sound(self) -> RetryPolicy:
        if self.max_attempts is None and self.attempts is None:
            raise ValueError("give max_attempts (at most) or attempts (exactly)")
        if self.max_attempts is not None and self.attempts is not None:
            raise ValueError("give max_attempts (at most) or attempts (exactly), not both")
        if self.counter is not None and self.id is not None:
            raise ValueError("give counter or id, not both: a counter also tells duplicates apart")
        return self

    @property
    def most(self) -> int:
        """The most attempts allowed."""
        return self.attempts or self.max_attempts or 1

    @property
    def exact(self) -> bool:
        return self.attempts is not None

    def text(self) -> str:
        """The limit as the topology says it: "max_attempts 3" or "attempts 2"."""
        return f"attempts {self.attempts}" if self.exact else f"max_attempts {self.max_attempts}"


class Latency(Model):
    """Latency budgets; each is a ceiling for that percentile."""

    p50: Duration | None = None
    p90: Duration | None = None
    p95: Duration | None = None
    p99: Duration | None = None
    max: Duration | None = None

    @model_validator(mode="after")
    def _some(self) -> Latency:
        if not self.model_fields_set:
            raise ValueError("give at least one of p50, p90, p95, p99 or max")
        return self


Delivery = Literal["exactly-once", "at-least-once", "at-most-once"]


class Step(Model):
    _expand = _shorthand("channel")
    _shorthands = ({"type": "string", "description": "the channel"},)
    channel: str
    name: str | None = Field(None, description="label in reports; default: the channel")
    match: Match | None = None
    count: Annotated[Whole, Field(ge=1)] = Field(1, description="messages per chain (fan-out)")
    deadline: Duration | None = Field(None, description="since the previous step")
    latency: Latency | None = Field(None, description="budget for the hop from the previous step")
    correlate: Correlate | None = Field(None, description="overrides the flow's rule here")
    retry: RetryPolicy | None = None
    delivery: Delivery | None = Field(None, description="overrides the flow's guarantee here")
    group: str | None = Field(
        None,
        description="the consumer group (of a Redis stream or a Kafka topic) this step holds "
        "to account: each message delivered to it, acknowledged once, none left pending or "
        "trimmed before it read them",
    )


class DeadLetterRule(Model):
    """Messages matching ``when`` must end in ``channel``; no other message may."""

    when: Match
    channel: str
    step: str | None = Field(None, description="the step whose consumer gives up on them")
    reason: str | None = None
    attempts: Annotated[Whole, Field(ge=1)] | None = Field(
        None, description="deliveries before dead-lettering, the first one included"
    )


class GiveUpRule(Model):
    """Messages matching ``when`` stop at ``step`` after exactly ``attempts`` attempts, with
    no dead letter (the framework acks them, or stores an error result)."""

    when: Match
    step: str = Field(description="the step whose consumer gives up on them")
    attempts: Annotated[Whole, Field(ge=1)] = Field(
        description="deliveries before giving up, the first one included"
    )


def _field(value: Any) -> Any:
    # A payload path when it starts with $, else a header name (as ``match`` has them).
    if isinstance(value, str) and value.startswith("$"):
        return check_path(value)
    if not isinstance(value, str) or not value:
        raise ValueError("expected a payload path like $.seq or a header name")
    return value


FieldRef = Annotated[
    str,
    BeforeValidator(_field),
    WithJsonSchema(
        {
            "type": "string",
            "minLength": 1,
            "description": "a payload path like $.account, or a header name",
            "examples": ["$.account", "x-seq"],
        }
    ),
]


class SeqOrdering(Model):
    """Messages of one entity arrive in increasing sequence numbers, in broker order."""

    per: FieldRef | None = Field(
        None, description="the entity (payload path or header); none: one sequence for all"
    )
    seq: FieldRef = Field(description="the sequence number (payload path or header): whole numbers")
    at: list[str] | None = Field(
        None, min_length=1, description="the step labels where it holds; default: every step"
    )


def _ordering_tag(value: Any) -> str:
    return "SeqOrdering" if isinstance(value, dict | SeqOrdering) else "name"


# One of the named orderings or, written as a mapping, ordering by a sequence field.
Ordering = Annotated[
    Annotated[Literal["none", "per-key", "per-partition-key"], Tag("name")]
    | Annotated[SeqOrdering, Tag("SeqOrdering")],
    Discriminator(_ordering_tag),
]


class Branch(Model):
    """One way a flow goes on after its common steps (a fan-out): its own steps, and the
    expectations it holds differently from the flow."""

    description: str | None = None
    steps: list[Step] = Field(min_length=1)
    deadline: Duration | None = Field(None, description="end to end; default: the flow's")
    delivery: Delivery | None = Field(None, description="default: the flow's")
    latency: Latency | None = Field(None, description="end-to-end budget; default: the flow's")
    retry: RetryPolicy | None = Field(None, description="default: the flow's")
    dead_letters: list[DeadLetterRule] | None = Field(None, description="default: the flow's")


class Flow(Model):
    description: str | None = None
    correlate: Correlate
    steps: list[Step] = Field(
        default_factory=list, description="the common steps; may be empty when branches are given"
    )
    branches: dict[Name, Branch] = Field(
        default_factory=dict,
        description="fan-out: each branch goes on from the common steps and is judged as "
        "its own flow, named flow/branch",
    )
    deadline: Duration | None = Field(None, description="end to end, first step to last")
    ordering: Ordering = Field(
        "none", description="none, per-key, per-partition-key, or by a sequence field"
    )
    retry: RetryPolicy | None = None
    dead_letters: list[DeadLetterRule] = Field(default_factory=list)
    gives_up: list[GiveUpRule] = Field(
        default_factory=list, description="which messages a step gives up on, with no dead letter"
    )
    delivery: Delivery = "exactly-once"
    latency: Latency | None = Field(None, description="end-to-end budget")
    success_rate: Ratio | None = Field(None, description="at least this share of chains complete")
    error_rate: Ratio | None = Field(None, description="at most this share of chains fail")
    # The flow a branch was made from (topology.transform.branched); None for a declared one.
    _branch_of: str | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _some_steps(self) -> Flow:
        if not self.steps and not self.branches:
            raise ValueError("give steps, branches, or both")
        return self

    @property
    def branch_of(self) -> str | None:
        """The declared flow this one is a branch of (its name is flow/branch)."""
        return self._branch_of


class Gate(Model):
    """How the verdict gates: what may pass."""

    allow_unjudged: bool = Field(
        False, description="pass even when a declared expectation could not be judged"
    )


class Redact(Model):
    """Secrets to mask in what flowcheck records (trace files, reports), besides the header
    names and JSON payload fields whose names look like credentials, which always are."""

    payload: list[JsonPath] = Field(
        default_factory=list, description="payload paths to mask, like $.card.number"
    )
    headers: list[Annotated[str, StringConstraints(min_length=1)]] = Field(
        default_factory=list, description="header names to mask, in any case"
    )


class Topology(Model):
    """A whole topology file."""

    # Top-level x- keys are ignored by the loader (YAML anchors to share); editors too.
    model_config = ConfigDict(json_schema_extra={"patternProperties": {"^x-": {}}})

    version: Literal[1] = 1
    name: str | None = None
    brokers: dict[Name, Broker]
    channels: dict[Name, Channel]
    services: dict[Name, Service] = Field(default_factory=dict)
    flows: dict[Name, Flow] = Field(default_factory=dict)
    gate: Gate = Field(default_factory=Gate)
    redact: Redact = Field(default_factory=Redact)

    def tap_late(self, channel: str) -> tuple[timedelta, str] | None:
        """How late a tap may see a message on ``channel``, and the setting that makes it so;
        None for a channel the topology does not declare."""
        ch = self.channels.get(channel)
        if ch is None:
            return None
        broker = self.brokers.get(ch.broker)
        if isinstance(broker, Kafka):
            # A broker that holds a fetch until its wait ends (the bundled one does) hands
            # a record over that late; Kafka answers as soon as one arrives.
            return broker.tap_fetch_wait, f"broker {ch.broker!r}: tap_fetch_wait"
        if isinstance(broker, Redis | RabbitMQ):
            return broker.tap_read_interval, f"broker {ch.broker!r}: tap_read_interval"
        return None

    def channel_name(self, key: str) -> str:
        """The channel's name on its broker."""
        return self.channels[key].name or key
