"""Cross-reference and sanity checks that need the whole topology at once.

They run on the entries that validated; names of entries that failed
validation still count as defined, so one mistake is reported once.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from jsonschema import SchemaError
from jsonschema.protocols import Validator as SchemaValidator
from jsonschema.validators import Draft202012Validator, validator_for

from flowcheck import tls as _tls
from flowcheck.topology._errors import closest, suggest
from flowcheck.topology._types import format_duration
from flowcheck.topology._yaml import Document, Path, dotted
from flowcheck.topology.model import (
    CHANNEL_KINDS,
    TLS,
    Broker,
    Channel,
    Condition,
    Correlate,
    DeadLetterRule,
    Exchange,
    Flow,
    Kafka,
    Latency,
    Match,
    Queue,
    RabbitMQ,
    Redis,
    RetryPolicy,
    Schema,
    SeqOrdering,
    Service,
    Step,
    Stream,
    Topic,
)
from flowcheck.topology.routing import routes

RABBIT_REASONS = ("rejected", "expired", "maxlen", "delivery_limit")
_KAFKA_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_JSON_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")


def _operands(test: Condition) -> Iterable[tuple[tuple[str | int, ...], Any]]:
    """The values ``test`` compares for equality, with their place under it."""
    for name in ("eq", "ne"):
        if name in test.model_fields_set:
            yield (name,), getattr(test, name)
    for name, items in (("in", test.in_), ("not_in", test.not_in)):
        for i, item in enumerate(items or ()):
            yield (name, i), item


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    return repr(value)


# What a branch may hold differently from its flow.
_OVERRIDES = {"deadline", "delivery", "latency", "retry", "dead_letters"}


class Validator:
    def __init__(
        self,
        doc: Document,
        brokers: Mapping[str, Broker],
        channels: Mapping[str, Channel],
        services: Mapping[str, Service],
        flows: Mapping[str, Flow],
        names: Mapping[str, set[str]],
    ) -> None:
        self.doc = doc
        self.brokers = brokers
        self.channels = channels
        self.services = services
        self.flows = flows
        self.names = names  # every name defined per section, valid or not
        self.said: set[tuple[Path, str]] = set()

    # ------------------------------------------------------------ helpers

    def error(self, path: Path, message: str, *, key: bool = False) -> None:
        if self.once(path, message):
            self.doc.problem(path, f"{dotted(self.doc.written(path))}: {message}", key=key)

    def warn(self, path: Path, message: str) -> None:
        if self.once(path, message):
            self.doc.problem(path, f"{dotted(self.doc.written(path))}: {message}", warn=True)

    def once(self, path: Path, message: str) -> bool:
        """First time this is said here? A flow's common steps are checked per branch."""
        said = (path, message) not in self.said
        self.said.add((path, message))
        return said

    def ref(self, path: Path, section: str, name: str) -> bool:
        """Is ``name`` defined in ``section``? Report it if not."""
        if name in self.names[section]:
            return True
        what = section.rstrip("s")
        defined = self.names[section]
        hint = suggest(name, defined) or f"; declare it under '{section}'" + (
            f", or use one of {', '.join(sorted(defined))}" if 0 < len(defined) <= 10 else ""
        )
        self.error(path, f"unknown {what} {name!r}{hint}")
        return False

    def channel(
        self, path: Path, name: str, kinds: Iterable[str], broker: str | None = None
    ) -> Channel | None:
        """Resolve a channel reference that must be of one of ``kinds`` (on ``broker``)."""
        if not self.ref(path, "channels", name):
            return None
        ch = self.channels.get(name)
        if ch is None:
            return None  # defined but invalid: already reported
        kinds = tuple(kinds)
        if ch.kind not in kinds:
            self.error(
                path, f"{name!r} is {_a(ch.kind)}, but {_a(' or '.join(kinds))} is needed here"
            )
            return None
        if broker is not None and ch.broker != broker:
            if broker in self.brokers:  # an unknown broker is reported once, where it is named
                self.error(path, f"{name!r} is on broker {ch.broker!r}, not on {broker!r}")
            return None
        return ch

    # ------------------------------------------------------------ sections

    def run(self) -> None:
        for name, broker in self.brokers.items():
            self.check_broker(("brokers", name), broker)
        for name, ch in self.channels.items():
            self.check_channel(("channels", name), name, ch)
        self.check_physical_names()
        for name, svc in self.services.items():
            self.check_service(("services", name), svc)
        for name, flow in self.flows.items():
            self.check_flow(("flows", name), flow)
        used = {ch.broker for ch in self.channels.values()}
        if (
            self.names["channels"]
            and len(self.channels) == len(self.names["channels"])
            and used <= self.names["brokers"]
        ):
            # Only when every channel is valid: a broken one or a misspelt broker may be the user.
            for name in self.brokers:
                if name not in used:
                    self.warn(("brokers", name), "no channel uses this broker")

    def check_broker(self, path: Path, broker: Broker) -> None:
        if isinstance(broker, (RabbitMQ, Redis)) and (*path, "url") not in self.doc.unset:
            url = broker.url.get_secret_value()
            schemes = (
                ("amqp", "amqps") if isinstance(broker, RabbitMQ) else ("redis", "rediss", "unix")
            )
            # Never quote the URL or urllib's message: either may hold the password.
            try:
                parts = urlsplit(url)
            except ValueError:
                self.error(
                    (*path, "url"),
                    f"is not a valid URL; write it like {schemes[0]}://user:password@host:port/",
                )
                return
            try:
                bad_port = parts.port == 0
            except ValueError:  # not a number, or out of range
                bad_port = True
            if bad_port:
                self.error((*path, "url"), "has a bad port; a port is a number from 1 to 65535")
                return
            if parts.scheme not in schemes:
                self.error(
                    (*path, "url"),
                    f"scheme {parts.scheme + '://' if parts.scheme else '(none)'} is not for "
                    f"{broker.kind}; the URL starts with {' or '.join(s + '://' for s in schemes)}",
                )
            elif parts.scheme != "unix" and not parts.hostname:
                self.error((*path, "url"), "has no host name")
        if isinstance(broker, Kafka):
            self.check_kafka_security(path, broker)
        elif broker.tls is not None and (*path, "url") not in self.doc.unset:
            try:
                scheme = urlsplit(broker.url.get_secret_value()).scheme
            except ValueError:
                return  # reported above
            secure = "amqps" if isinstance(broker, RabbitMQ) else "rediss"
            if scheme != secure:
                self.error(
                    (*path, "tls"),
                    f"is set but the URL is {scheme or '(none)'}://; "
                    f"TLS is spoken with a {secure}:// URL",
                )
            else:
                self.check_tls((*path, "tls"), broker.tls)
                if own := url_tls_options(broker.url.get_secret_value(), secure):
                    self.error(
                        (*path, "tls"),
                        f"is set and so is the URL's {', '.join(own)}: tls would replace "
                        "them without a word; say it once, in tls",
                    )

    def check_kafka_security(self, path: Path, broker: Kafka) -> None:
        sec = broker.security
        spath = (*path, "security")
        if sec.protocol.startswith("SASL"):
            if sec.sasl_mechanism is None:
                self.error(spath, f"protocol {sec.protocol} needs sasl_mechanism")
            elif sec.sasl_mechanism == "OAUTHBEARER":
                self.error(
                    (*spath, "sasl_mechanism"),
                    "OAUTHBEARER needs a token provider, which flowcheck has no way to be "
                    "given; use PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512",
                )
            elif sec.username is None or sec.password is None:
                self.error(
                    spath, f"sasl_mechanism {sec.sasl_mechanism} needs username and password"
                )
        elif sec.sasl_mechanism is not None:
            self.error(
                (*spath, "sasl_mechanism"),
                f"is set but protocol is {sec.protocol}; use SASL_SSL or SASL_PLAINTEXT",
            )
        uses_tls = sec.protocol.endswith("SSL")
        old = [key for key in ("ca_file", "cert_file", "key_file") if getattr(sec, key)]
        for key in old:
            if not uses_tls:
                self.error((*spath, key), f"is set but protocol {sec.protocol} does not use TLS")
            elif broker.tls is not None:
                self.error((*spath, key), f"is set twice: here and as tls.{key}; keep tls.{key}")
        if broker.tls is not None and not uses_tls:
            self.error(
                (*path, "tls"),
                f"is set but protocol {sec.protocol} does not use TLS; use SSL or SASL_SSL",
            )
        elif uses_tls and (tls := broker.tls_settings()) is not None:
            self.check_tls((*path, "tls") if broker.tls is not None else spath, tls)

    def check_tls(self, path: Path, tls: TLS) -> None:
        """The files exist and hold what they should: a certificate, a matching key."""
        if tls.key_file is not None and tls.cert_file is None:
            self.error((*path, "key_file"), "is set without cert_file; set both")
            return
        if tls.key_password is not None and tls.cert_file is None:
            self.error((*path, "key_password"), "is set without cert_file and key_file")
            return
        try:
            _tls.context(tls)
        except _tls.TLSFileError as exc:
            self.error((*path, exc.key), str(exc))
            return
        if not tls.verify and tls.ca_file is not None:
            self.warn((*path, "ca_file"), "is not used: verify is false")

    def check_channel(self, path: Path, name: str, ch: Channel) -> None:
        if self.ref((*path, "broker"), "brokers", ch.broker):
            broker = self.brokers.get(ch.broker)
            want = CHANNEL_KINDS[ch.kind]
            if broker is not None and broker.kind != want:
                fits = [k for k, b in CHANNEL_KINDS.items() if b == broker.kind]
                self.error(
                    (*path, "kind"),
                    f"{_a(ch.kind)} lives on a {want} broker, but broker {ch.broker!r} is "
                    f"{broker.kind}; on {broker.kind} use kind {' or '.join(fits)}, "
                    f"or name a {want} broker",
                )
                return
        if ch.payload_schema is not None:
            self.check_schema((*path, "schema"), ch.payload_schema)
        if isinstance(ch, Exchange) and ch.alternate is not None:
            self.channel((*path, "alternate"), ch.alternate, ["exchange"], ch.broker)
        elif isinstance(ch, Queue):
            self.check_queue(path, ch)
        elif isinstance(ch, Topic):
            physical = ch.name or name
            if not _KAFKA_TOPIC.match(physical) or physical in (".", ".."):
                self.error(
                    (*path, "name") if ch.name else path,
                    f"{physical!r} is not a valid Kafka topic name (letters, digits, '.', '_', '-')",
                    key=not ch.name,  # the name is the key
                )
            self.check_chain(path, name, ch.retry, ch.dead_letter, "topic", ch.broker)
        elif isinstance(ch, Stream):
            self.check_chain(path, name, [], ch.dead_letter, "stream", ch.broker)
            if ch.delivery_limit is not None and ch.dead_letter is None:
                self.warn(
                    (*path, "delivery_limit"),
                    "no dead_letter stream is declared, so entries over the limit have nowhere to go",
                )
            for i, group in enumerate(ch.groups):
                if ch.groups.index(group) != i:
                    self.error((*path, "groups", i), f"group {group!r} is listed twice")

    def check_chain(
        self, path: Path, name: str, retry: list[str], dead: str | None, kind: str, broker: str
    ) -> None:
        for i, r in enumerate(retry):
            if r == name:
                self.error((*path, "retry", i), "a channel cannot be its own retry channel")
            else:
                self.channel((*path, "retry", i), r, [kind], broker)
        if dead is not None:
            if dead == name:
                self.error(
                    (*path, "dead_letter"), "a channel cannot be its own dead-letter channel"
                )
            else:
                self.channel((*path, "dead_letter"), dead, [kind], broker)

    def check_queue(self, path: Path, q: Queue) -> None:
        for i, b in enumerate(q.bindings):
            bpath = (*path, "bindings", i)
            ex = self.channel((*bpath, "exchange"), b.exchange, ["exchange"], q.broker)
            if isinstance(ex, Exchange):
                if ex.type == "headers" and not b.arguments:
                    self.error(
                        bpath,
                        f"exchange {b.exchange!r} is a headers exchange: give 'arguments' to match",
                    )
                elif ex.type == "fanout" and b.key:
                    self.warn(
                        (*bpath, "key"),
                        f"exchange {b.exchange!r} is fanout and ignores routing keys",
                    )
                elif ex.type in ("direct", "topic") and not b.key:
                    self.warn(
                        bpath,
                        "no key: only messages published with an empty routing key reach this queue",
                    )
        if q.delivery_limit is not None and q.type != "quorum":
            self.error(
                (*path, "delivery_limit"),
                "needs type: quorum; classic queues do not count deliveries",
            )
        if q.overflow == "reject-publish-dlx" and q.dead_letter is None:
            self.error((*path, "overflow"), "reject-publish-dlx needs a dead_letter route")
        if q.dead_letter is not None:
            self.check_dead_letter_route((*path, "dead_letter"), q)
        elif q.type == "quorum" and q.delivery_limit is not None:
            self.warn(
                (*path, "delivery_limit"),
                "messages over the delivery limit are dropped silently: add a dead_letter route",
            )
        for i, r in enumerate(q.retry):
            rq = self.channel((*path, "retry", i), r, ["queue"], q.broker)
            # A delay queue without a ttl is consumed by the application, which publishes
            # the message back itself (Dramatiq's <queue>.DQ); one with a ttl must lead back.
            if isinstance(rq, Queue) and rq.ttl is not None and rq.dead_letter is None:
                self.error(
                    (*path, "retry", i),
                    f"retry queue {r!r} has a ttl but no dead_letter: expired messages never come back",
                )

    def check_dead_letter_route(self, path: Path, q: Queue) -> None:
        """A queue's dead-letter route: an exchange of its broker that some queue receives
        them from, or a queue of its broker (through the default exchange); and the
        service that publishes them, when it is the service's own doing."""
        route = q.dead_letter
        assert route is not None
        if route.queue is not None:
            self.channel((*path, "queue"), route.queue, ["queue"], q.broker)
        elif route.exchange in ("default", "amq.default") and route.exchange not in self.channels:
            self.error(
                (*path, "exchange"),
                f"unknown exchange {route.exchange!r}; for dead letters sent straight to a "
                "queue through the default exchange, write 'queue: <the dead-letter queue>'",
            )
        elif route.exchange is not None:
            dl = self.channel((*path, "exchange"), route.exchange, ["exchange"], q.broker)
            if isinstance(dl, Exchange) and not self.bound_queues(route.exchange, route.key):
                self.warn(
                    path,
                    f"no queue bound to {route.exchange!r} receives these dead letters; "
                    "they will be dropped",
                )
        if route.published_by is None:
            return
        by = (*path, "published_by")
        if not self.ref(by, "services", route.published_by):
            return
        svc = self.services.get(route.published_by)
        if svc is not None and route.target not in svc.publishes:
            self.warn(
                by,
                f"service {route.published_by!r} does not list {route.target!r} in 'publishes'",
            )

    def bound_queues(self, exchange: str, key: str | None) -> list[str]:
        """Queues that a message sent to ``exchange`` with ``key`` may reach."""
        ex = self.channels.get(exchange)
        etype = ex.type if isinstance(ex, Exchange) else "headers"
        return [
            qname
            for qname, q in self.channels.items()
            if isinstance(q, Queue)
            and any(b.exchange == exchange and routes(etype, b.key, key) for b in q.bindings)
        ]

    def check_physical_names(self) -> None:
        seen: dict[tuple[str, str, str], str] = {}
        for name, ch in self.channels.items():
            space = "queue" if ch.kind == "queue" else ch.kind
            key = (ch.broker, space, ch.name or name)
            if key in seen:
                self.error(
                    ("channels", name, "name") if ch.name else ("channels", name),
                    f"{key[2]!r} is also the name of channel {seen[key]!r} on broker "
                    f"{ch.broker!r}; give one of them another 'name'",
                    key=not ch.name,
                )
            else:
                seen[key] = name

    def check_schema(self, path: Path, schema: Schema) -> None:
        if schema.json_schema is not None:
            dialect = schema.json_schema.get("$schema")
            cls: type[SchemaValidator] = Draft202012Validator
            if isinstance(dialect, str):
                cls = validator_for(schema.json_schema, default=Draft202012Validator)
            meta = cls.META_SCHEMA.get("$id") or cls.META_SCHEMA.get("id", "")
            if dialect is not None and str(dialect).rstrip("#") != meta.rstrip("#"):
                self.error(
                    (*path, "json", "$schema"),
                    f"{dialect!r} is not a JSON Schema dialect; remove '$schema' or use "
                    f"{Draft202012Validator.META_SCHEMA['$id']!r}",
                )
                return
            try:
                cls.check_schema(schema.json_schema)
            except SchemaError as exc:
                at = (*path, "json", *exc.path)
                if exc.path and exc.path[-1] == "type" and exc.validator == "anyOf":
                    hint = suggest(str(exc.instance), _JSON_TYPES)
                    self.error(
                        at,
                        f"{exc.instance!r} is not a JSON Schema type{hint}; "
                        f"use one of {', '.join(_JSON_TYPES)}",
                    )
                else:
                    self.error(at, f"not a valid JSON Schema: {exc.message}")
        elif schema.model is not None:
            module, _, attr = schema.model.replace(":", ".").rpartition(".")
            base = os.path.dirname(os.path.abspath(self.doc.file))
            sys.path[:0] = [base, os.getcwd()]
            try:
                obj = getattr(importlib.import_module(module), attr)
            except Exception as exc:  # user code: anything may happen on import
                self.error(
                    (*path, "model"),
                    f"cannot import {schema.model!r} ({type(exc).__name__}: {exc})",
                )
                return
            finally:
                del sys.path[:2]
            if not hasattr(obj, "model_json_schema"):
                self.error((*path, "model"), f"{schema.model!r} is not a pydantic model")

    def check_service(self, path: Path, svc: Service) -> None:
        for i, name in enumerate(svc.publishes):
            self.channel((*path, "publishes", i), name, ["exchange", "queue", "topic", "stream"])
        for i, c in enumerate(svc.consumes):
            cpath = (*path, "consumes", i)
            if c.channel in self.channels and self.channels[c.channel].kind == "exchange":
                self.error(
                    (*cpath, "channel"),
                    f"{c.channel!r} is an exchange; consume from a queue bound to it",
                )
                continue
            ch = self.channel((*cpath, "channel"), c.channel, ["queue", "topic", "stream"])
            if isinstance(ch, Queue) and c.group is not None:
                self.error(
                    (*cpath, "group"), "RabbitMQ queues have no consumer groups; remove 'group'"
                )
            elif isinstance(ch, Stream):
                if c.group is None:
                    if ch.groups:
                        self.warn(
                            cpath,
                            f"no group given; {c.channel!r} has groups {', '.join(ch.groups)}",
                        )
                elif c.group not in ch.groups:
                    hint = suggest(c.group, ch.groups)
                    self.error(
                        (*cpath, "group"),
                        f"stream {c.channel!r} declares no group {c.group!r}{hint}; add it to its 'groups'",
                    )

    # ------------------------------------------------------------ flows

    def check_flow(self, path: Path, flow: Flow) -> None:
        common = [(*path, "steps", i) for i in range(len(flow.steps))]
        if not flow.branches:
            self.check_line(path, path, flow, common)
            return
        taken = set(self.flows)
        for label, branch in flow.branches.items():
            bpath = (*path, "branches", label)
            if f"{path[-1]}/{label}" in taken:
                self.error(bpath, f"flow '{path[-1]}/{label}' is declared too; rename one")
            # Judged as the flow it becomes: the common steps, then the branch's.
            update: dict[str, Any] = {"steps": [*flow.steps, *branch.steps], "branches": {}}
            update.update({k: getattr(branch, k) for k in _OVERRIDES & branch.model_fields_set})
            made = flow.model_copy(update=update)
            steps = [*common, *((*bpath, "steps", j) for j in range(len(branch.steps)))]
            self.check_line(path, bpath, made, steps)

    def check_line(self, path: Path, bpath: Path, flow: Flow, step_paths: list[Path]) -> None:
        """A flow as one line of steps (``bpath``: where its branch is, or ``path``)."""
        labels: dict[str, int] = {}
        steps: list[tuple[Step, Channel | None]] = []
        for i, (step, spath) in enumerate(zip(flow.steps, step_paths, strict=True)):
            ch = self.channel((*spath, "channel"), step.channel, CHANNEL_KINDS)
            steps.append((step, ch))
            label = step.name or step.channel
            if label in labels:
                self.error(spath, f"two steps are both called {label!r}; give one a 'name'")
            labels[label] = i
            self.check_step(spath, flow, step, ch)
        own = set() if bpath == path else self.branch_keys(bpath)
        where = {k: bpath if k in own else path for k in _OVERRIDES}
        self.check_latency((*where["latency"], "latency"), flow.latency, flow.deadline, "deadline")
        if flow.retry is not None:
            self.check_retry((*where["retry"], "retry"), flow.retry.backoff)
        if flow.ordering == "per-partition-key" and not any(isinstance(c, Topic) for _, c in steps):
            self.error((*path, "ordering"), "per-partition-key needs a Kafka topic among the steps")
        if isinstance(flow.ordering, SeqOrdering):
            for i, label in enumerate(flow.ordering.at or ()):
                if label not in labels:
                    self.error(
                        (*path, "ordering", "at", i),
                        f"no step is called {label!r}{suggest(label, list(labels))}",
                    )
            if flow.ordering.per == flow.ordering.seq:
                self.error((*path, "ordering", "seq"), "'seq' and 'per' name the same field")
        for i, rule in enumerate(flow.dead_letters):
            self.check_dead_letter(
                (*where["dead_letters"], "dead_letters", i), flow, rule, steps, labels
            )
        for i, give in enumerate(flow.gives_up):
            gpath = (*path, "gives_up", i)
            self.check_match((*gpath, "when"), give.when)
            if give.step not in labels:
                self.error(
                    (*gpath, "step"), f"flow has no step {give.step!r}{suggest(give.step, labels)}"
                )
                continue
            step = flow.steps[labels[give.step]]
            policy = step.retry or flow.retry
            if policy is not None:
                self.check_attempts((*gpath, "attempts"), give.attempts, policy)
            elif give.attempts > 1:
                self.error(
                    (*gpath, "attempts"),
                    f"{give.attempts} attempts expected, but step {give.step!r} has no retry "
                    "policy: declare one with 'retry'",
                )

    def check_attempts(self, path: Path, want: int, policy: RetryPolicy) -> None:
        """An exact count of attempts (a dead letter's, a give-up's) the policy allows."""
        if policy.attempts is not None and want != policy.attempts:
            self.error(
                path,
                f"{want} attempts expected, but the retry policy gives exactly {policy.attempts}",
            )
        elif want > policy.most:
            self.error(
                path,
                f"{want} attempts expected, but the retry policy allows at most {policy.most}",
            )

    def branch_keys(self, bpath: Path) -> set[str]:
        flow = self.flows[str(bpath[1])]
        return set(flow.branches[str(bpath[3])].model_fields_set)

    def check_step(self, path: Path, flow: Flow, step: Step, ch: Channel | None) -> None:
        if step.match is not None:
            self.check_match((*path, "match"), step.match)
        if step.group is not None and ch is not None:
            if not isinstance(ch, Stream | Topic):
                self.error(
                    (*path, "group"),
                    f"{step.channel!r} is {_a(ch.kind)}; only the steps of a Redis stream or "
                    "a Kafka topic name a consumer group",
                )
            elif isinstance(ch, Stream) and step.group not in ch.groups:
                hint = suggest(step.group, ch.groups)
                self.error(
                    (*path, "group"),
                    f"stream {step.channel!r} declares no group {step.group!r}{hint}; "
                    "add it to its 'groups'",
                )
        if ch is not None:
            rule = step.correlate or flow.correlate
            self.check_correlate(path, step.channel, rule, ch, step.correlate is not None)
            if step.match is not None:
                if step.match.routing_key is not None and ch.kind not in ("exchange", "queue"):
                    self.error(
                        (*path, "match", "routing_key"), f"{step.channel!r} is not on RabbitMQ"
                    )
                if step.match.key is not None and not isinstance(ch, Topic):
                    self.error((*path, "match", "key"), f"{step.channel!r} is not a Kafka topic")
        if (
            step.deadline is not None
            and flow.deadline is not None
            and step.deadline > flow.deadline
        ):
            self.error(
                (*path, "deadline"),
                f"{format_duration(step.deadline)} is longer than the flow's deadline "
                f"{format_duration(flow.deadline)}; the chain would time out first",
            )
        self.check_latency((*path, "latency"), step.latency, step.deadline, "step deadline")
        if step.retry is not None:
            self.check_retry((*path, "retry"), step.retry.backoff)

    def check_match(self, path: Path, match: Match) -> None:
        """Operands a header or a record key could never equal."""
        for name, test in match.headers.items():
            if isinstance(test, Condition):
                for key, value in _operands(test):
                    if not isinstance(value, str | int | float):  # bool is an int
                        hint = "; for an absent header write exists: false" if value is None else ""
                        self.error(
                            (*path, "headers", name, *key),
                            f"a header holds a string, number or boolean, not {_kind(value)}{hint}",
                        )
        if isinstance(match.key, Condition):
            bounds = [(n,) for n in ("lt", "lte", "gt", "gte") if n in match.key.model_fields_set]
            for key, value in [
                *_operands(match.key),
                *((b, getattr(match.key, b[0])) for b in bounds),
            ]:
                if not isinstance(value, str):
                    self.error(
                        (*path, "key", *key),
                        f"a record key is text: compare it with a string, not {_kind(value)}",
                    )

    def check_correlate(
        self, path: Path, name: str, rule: Correlate, ch: Channel, own: bool
    ) -> None:
        where = (*path, "correlate") if own else path
        if rule.kafka_key and not isinstance(ch, Topic):
            self.error(
                where,
                f"correlation by kafka_key, but {ch.kind} {name!r} has no record key; "
                "set 'correlate' on this step",
            )
        if rule.property is not None and ch.kind not in ("exchange", "queue"):
            self.error(
                where,
                f"correlation by AMQP property {rule.property!r}, but this step is a {ch.kind}; "
                "use a header or json rule, or set 'correlate' on this step",
            )

    def check_latency(
        self, path: Path, lat: Latency | None, deadline: timedelta | None, what: str
    ) -> None:
        if lat is None:
            return
        previous: tuple[str, timedelta] | None = None
        for key in ("p50", "p90", "p95", "p99", "max"):
            value = getattr(lat, key)
            if value is None:
                continue
            if previous is not None and value < previous[1]:
                self.error(
                    (*path, key),
                    f"{format_duration(value)} is below {previous[0]} {format_duration(previous[1])}; "
                    f"a {key} budget cannot be tighter than a lower percentile's",
                )
            previous = (key, value)
            if deadline is not None and value > deadline:
                self.warn(
                    (*path, key),
                    f"{format_duration(value)} is above the {what} {format_duration(deadline)}, "
                    "which fails such chains first",
                )

    def check_retry(self, path: Path, backoff: Any) -> None:
        if backoff is not None and backoff.max is not None and backoff.max < backoff.initial:
            self.error(
                (*path, "backoff", "max"),
                f"{format_duration(backoff.max)} is below initial {format_duration(backoff.initial)}",
            )

    def check_dead_letter(
        self,
        path: Path,
        flow: Flow,
        rule: DeadLetterRule,
        steps: list[tuple[Step, Channel | None]],
        labels: dict[str, int],
    ) -> None:
        self.check_match((*path, "when"), rule.when)
        target = self.channel((*path, "channel"), rule.channel, CHANNEL_KINDS)
        if target is None:
            return
        sources = steps
        if rule.step is not None:
            if rule.step not in labels:
                # A step named by a misspelt channel is labelled with the typo: the
                # rule may name the channel as meant. Never suggest the typo for it.
                typos = {
                    label
                    for label, i in labels.items()
                    if flow.steps[i].name is None and label not in self.names["channels"]
                }
                if rule.step in self.names["channels"] and closest(rule.step, typos):
                    return  # one mistake, reported once: at the step
                hint = suggest(rule.step, [label for label in labels if label not in typos])
                self.error((*path, "step"), f"flow has no step {rule.step!r}{hint}")
                return
            sources = [steps[labels[rule.step]]]
        routed = [
            (s, c) for s, c in sources if c is not None and self.dead_letters_to(c, rule.channel)
        ]
        parked = False
        if not routed and rule.channel not in {s.channel for s in flow.steps}:
            # A parking queue: the step's consuming service publishes what it gives up on.
            routed = [
                (s, c)
                for s, c in sources
                if c is not None and self.parked_by_consumer(s.channel, rule.channel)
            ]
            parked = bool(routed)
        if not routed:
            names = ", ".join(repr(s.name or s.channel) for s, _ in sources)
            self.error(
                (*path, "channel"),
                f"no dead-letter route leads from {names} to {rule.channel!r}; "
                "declare it with 'dead_letter' on the step's channel, or list it in "
                "'publishes' of the service that consumes the step",
            )
            return
        step, src = routed[0]
        policy = step.retry or flow.retry
        if rule.attempts is not None and policy is not None:
            self.check_attempts((*path, "attempts"), rule.attempts, policy)
        limit = _dead_letter_delivery(src)
        if rule.attempts is not None and limit is not None and rule.attempts != limit:
            self.error(
                (*path, "attempts"),
                f"{rule.attempts} attempts expected, but {_limit_text(step.channel, src)} "
                f"dead-letters on delivery {limit}",
            )
        if isinstance(src, Queue) and rule.reason is not None:
            rpath = (*path, "reason")
            if parked or (src.dead_letter is not None and src.dead_letter.published_by):
                self.error(
                    rpath,
                    "the service that consumes the step publishes these dead letters "
                    "itself: the broker gives them no reason",
                )
            elif rule.reason not in RABBIT_REASONS:
                hint = suggest(rule.reason, RABBIT_REASONS)
                self.error(
                    rpath,
                    f"{rule.reason!r} is not a RabbitMQ dead-letter reason{hint}; "
                    f"use one of {', '.join(RABBIT_REASONS)}",
                )
            elif rule.reason == "delivery_limit" and src.delivery_limit is None:
                self.error(
                    rpath,
                    f"queue {step.channel!r} has no delivery_limit, so it never dead-letters for it",
                )
            elif rule.reason == "maxlen" and src.max_length is None:
                self.error(rpath, f"queue {step.channel!r} has no max_length")
            elif rule.reason == "expired" and src.ttl is None:
                self.warn(
                    rpath,
                    f"queue {step.channel!r} has no ttl; only per-message expiry can cause this",
                )

    def parked_by_consumer(self, channel: str, target: str) -> bool:
        """Does a service that consumes ``channel`` publish ``target``?"""
        return any(
            target in svc.publishes and any(c.channel == channel for c in svc.consumes)
            for svc in self.services.values()
        )

    def dead_letters_to(self, src: Channel, target: str) -> bool:
        if isinstance(src, Queue):
            route = src.dead_letter
            if route is None:
                return False
            if route.exchange is None:  # straight to a queue, through the default exchange
                return target == route.target
            return target == route.exchange or target in self.bound_queues(
                route.exchange, route.key
            )
        if isinstance(src, (Topic, Stream)):
            return src.dead_letter == target
        return False


def _dead_letter_delivery(ch: Channel) -> int | None:
    """The delivery on which the broker (or the stream convention) dead-letters, if known.

    A quorum queue's x-delivery-limit counts failed deliveries allowed, so it
    dead-letters on delivery limit + 1; a stream's delivery_limit is the count itself.
    """
    if isinstance(ch, Queue) and ch.delivery_limit is not None:
        return ch.delivery_limit + 1
    if isinstance(ch, Stream) and ch.delivery_limit is not None:
        return ch.delivery_limit
    return None


def _limit_text(name: str, ch: Channel) -> str:
    return f"{ch.kind} {name!r} with delivery_limit {getattr(ch, 'delivery_limit', None)}"


def _a(kind: str) -> str:
    return ("an " if kind[:1] in "aeiou" else "a ") + kind


# TLS settings a URL's query can carry: aiormq's for amqps://, redis-py's (ssl_*) for rediss://.
_AMQPS_TLS = frozenset({"cafile", "capath", "cadata", "certfile", "keyfile", "no_verify_ssl"})


def url_tls_options(url: str, scheme: str) -> list[str]:
    """The TLS options in ``url``'s query, which a ``tls`` mapping would override."""
    try:
        pairs = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    except ValueError:
        return []
    names = dict.fromkeys(k for k, _ in pairs)
    if scheme == "amqps":
        return [k for k in names if k in _AMQPS_TLS]
    return [k for k in names if k.startswith("ssl_")]
