"""The pytest plugin end to end: small test projects run with pytester on the real brokers.

Each test writes a project (tests/plugin/project.py), runs pytest on it (in-process,
or in a subprocess for pytest-xdist) and checks outcomes and output.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from flowcheck.trace import Reader

from . import project

PASSING = """
    import asyncio

    import pytest

    from conftest import fail_job
    from flowcheck.testing import Flowcheck

    pytestmark = pytest.mark.asyncio


    async def test_chain_completes_and_checks(flowcheck: Flowcheck) -> None:
        assert flowcheck.deadline == 3.0  # flowcheck_deadline in the ini file
        for n in range(5):
            obs = await flowcheck.publish(
                "orders", {"order_id": f"o-{n}"}, routing_key="order.placed"
            )
            assert obs.keys == {"order-billed": f"o-{n}"}
        chain = flowcheck.chain("order-billed", "o-4")
        assert (await chain.reaches("billing")).channel == "billing"
        await chain.completes(within="2s")
        verdict = await flowcheck.check("order-billed")
        assert verdict.passed
        # An exchange and its queue are one routing instant: some samples are <= 0.
        latency = flowcheck.latency("order-billed", "billing")
        assert latency.count + latency.left_out == 5
        await flowcheck.never_published("billing", key="o-99", within="100ms")


    async def test_dead_lettered_after_exactly_three_attempts(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("jobs", {"job_id": "j-1", "poison": True})
        await fail_job(flowcheck, "j-1", deliveries=3, reason="no such customer")
        chain = flowcheck.chain("job-done", "j-1")
        dead = await chain.dead_lettered("jobs.dead", reason="customer", attempts=3)
        assert dead.kind == "dead_lettered"
        await flowcheck.check("job-done")


    @pytest.mark.asyncio(loop_scope="module")
    async def test_in_a_module_scoped_loop(flowcheck: Flowcheck) -> None:
        assert asyncio.get_running_loop() is flowcheck._task.get_loop()
        await flowcheck.publish("orders", {"order_id": "o-1"}, routing_key="order.placed")
        await flowcheck.chain("order-billed", "o-1").completes()
"""

ANYIO = """
    import pytest

    from flowcheck.testing import Flowcheck


    @pytest.fixture
    def anyio_backend() -> str:
        return "asyncio"


    @pytest.mark.anyio
    async def test_under_anyio(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("orders", {"order_id": "o-1"}, routing_key="order.placed")
        await flowcheck.chain("order-billed", "o-1").completes()
        await flowcheck.check()
"""


def test_passing_tests_pass_under_pytest_asyncio_and_anyio(
    pytester: pytest.Pytester, broker_flags: list[str]
) -> None:
    project.make(
        pytester,
        "flowcheck_isolate = true\nflowcheck_deadline = 3s\n",
        test_asyncio=PASSING,
        test_anyio=ANYIO,
    )
    traces = pytester.path / "traces"
    result = pytester.runpytest(*broker_flags, f"--flowcheck-trace-dir={traces}")
    result.assert_outcomes(passed=4)
    assert list(traces.iterdir()) == []  # written while the tests ran, deleted as they passed
    result.stdout.fnmatch_lines(
        [
            "*= flowcheck =*",
            "4 test(s) used flowcheck (topology plugin-test): 4 passed, 0 failed; "
            "10 assertion(s) on 2 flow(s)",
            "  job-done      3 assertion(s), 0 failed, 1 chain(s) seen",
            "  order-billed  7 assertion(s), 0 failed, 7 chain(s) seen",
        ]
    )


def test_auto_mode(pytester: pytest.Pytester, broker_flags: list[str]) -> None:
    project.make(
        pytester,
        "asyncio_mode = auto\nflowcheck_isolate = true\n",
        test_auto="""
            from flowcheck.testing import Flowcheck

            async def test_auto(flowcheck: Flowcheck) -> None:
                await flowcheck.publish("orders", {"order_id": "o-1"}, routing_key="order.placed")
                await flowcheck.chain("order-billed", "o-1").completes()
        """,
    )
    pytester.runpytest(*broker_flags).assert_outcomes(passed=1)


FAILING = """
    import pytest

    from conftest import fail_job
    from flowcheck.testing import Flowcheck

    pytestmark = pytest.mark.asyncio
    ORDER = {"order_id": "o-1"}


    async def test_lost(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("orders", ORDER, routing_key="order.misplaced")
        await flowcheck.check("order-billed", within="300ms")


    async def test_too_many_attempts(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("jobs", {"job_id": "j-1", "poison": True})
        await fail_job(flowcheck, "j-1", deliveries=3, reason="no such customer")
        await flowcheck.chain("job-done", "j-1").dead_lettered(attempts=2, within="5s")


    async def test_wrong_reason(flowcheck: Flowcheck) -> None:
        await flowcheck.publish("jobs", {"job_id": "j-1", "poison": True})
        await fail_job(flowcheck, "j-1", deliveries=3, reason="no such customer")
        await flowcheck.chain("job-done", "j-1").dead_lettered(reason="timeout", within="300ms")


    async def test_no_latency_yet(flowcheck: Flowcheck) -> None:
        assert flowcheck.latency("order-billed").p99 < "1s"


    async def test_a_named_flow_saw_nothing(flowcheck: Flowcheck) -> None:
        await flowcheck.check("job-done", within="100ms")
"""


def test_failing_assertions_say_what_happened(
    pytester: pytest.Pytester, broker_flags: list[str]
) -> None:
    project.make(pytester, "flowcheck_isolate = true\n", test_failing=FAILING)
    traces = pytester.path / "traces"
    result = pytester.runpytest(*broker_flags, f"--flowcheck-trace-dir={traces}")
    result.assert_outcomes(failed=5)
    result.stdout.fnmatch_lines(
        [
            "E * flow check failed: order-billed (1 chain(s), 0 succeeded, 1 failed)",
            "E *gave up after 300ms with 1 chain(s) still open; they count as lost",
            "E *failed check chains: 0 of 1 decided chains succeeded*",
            "E *key o-1:",
            "E *lost: timed out after 'orders': no 'billing' within 2s",
            "E *x *expected *billing *never came, timed_out",
        ],
        consecutive=False,
    )
    result.stdout.fnmatch_lines(
        ["E * job-done 'j-1' was not dead-lettered after 2 attempt(s)", "E *it took 3 attempt(s)"]
    )
    result.stdout.fnmatch_lines(
        [
            "E * job-done 'j-1' was not dead-lettered with reason containing 'timeout'",
            "E *the dead letter's reason is 'no such customer'",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E * order-billed: no latency samples for 'end-to-end' yet: no chain has completed*"]
    )
    result.stdout.fnmatch_lines(
        ["E *flow 'job-done': no chain was seen (nothing published or routed to its steps)"]
    )
    # Every failed test's trace is kept, its path printed under the failure and listed.
    kept = sorted(traces.iterdir())
    assert len(kept) == 5
    for trace in kept:
        result.stdout.fnmatch_lines([f"trace kept: {trace}", f"  flowcheck inspect {trace}"])
    result.stdout.fnmatch_lines(["traces of failed tests (flowcheck inspect FILE):"])
    lost = next(t for t in kept if "lost" in t.name)
    inspect = pytester.run(sys.executable, "-m", "flowcheck", "inspect", str(lost))
    assert inspect.ret == 0
    inspect.stdout.fnmatch_lines(["order-billed key o-1*"])


def test_an_unreachable_broker_is_one_error(
    pytester: pytest.Pytester, broker_flags: list[str]
) -> None:
    project.make(
        pytester,
        test_three="""
            import pytest

            @pytest.mark.parametrize("n", [1, 2, 3])
            @pytest.mark.asyncio
            async def test_needs_rabbitmq(flowcheck, n):
                pass
        """,
    )
    down = "amqp://guest:s3cret@127.0.0.1:1/"
    flags = [f for f in broker_flags if "rabbitmq" not in f]
    result = pytester.runpytest(*flags, f"--flowcheck-rabbitmq-url={down}", "-ra")
    result.assert_outcomes(errors=1, skipped=2)
    out = result.stdout.str()
    assert "s3cret" not in out
    assert "Traceback" not in out
    assert out.count("Start RabbitMQ there") == 1
    result.stdout.fnmatch_lines(
        [
            "flowcheck: rabbit: cannot reach RabbitMQ at amqp://guest:***@127.0.0.1:1/ "
            "(*) (address from --flowcheck-rabbitmq-url)",
            "Start RabbitMQ there, or point flowcheck at a running one: "
            "--flowcheck-rabbitmq-url=..., flowcheck_rabbitmq_url in the ini file, "
            "or $FLOWCHECK_RABBITMQ_URL.",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "setup problems:",
            "  flowcheck: rabbit: cannot reach RabbitMQ at *(1 error(s), 2 test(s) skipped)",
        ]
    )


def test_an_invalid_topology_is_one_error(pytester: pytest.Pytester) -> None:
    project.make(
        pytester,
        test_two="""
            import pytest

            pytestmark = pytest.mark.asyncio

            async def test_one(flowcheck): pass
            async def test_two(flowcheck): pass
        """,
    )
    broken = "brokers:\n  rabbit: {kind: rabbitmq}\nchannels:\n  q: {broker: rabit, kind: queue}\n"
    (pytester.path / "orders.yaml").write_text(broken)
    result = pytester.runpytest("-ra")
    result.assert_outcomes(errors=1, skipped=1)
    result.stdout.fnmatch_lines(
        [
            "flowcheck: the topology is invalid (1 problem(s)):",
            "  *orders.yaml:4:15: channels.q.broker: unknown broker 'rabit' "
            "(did you mean 'rabbit'?)",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "SKIPPED [[]1] *: flowcheck: the topology is invalid (1 problem(s)) "
            "(reported once, as the error in test_two.py::test_one)"
        ]
    )


def test_settings_and_header(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOWCHECK_KAFKA_BOOTSTRAP", "kafka-1:9092")
    project.make(
        pytester,
        "flowcheck_deadline = 3s\nflowcheck_redis_url = redis://:hush@cache:6379/1\n",
    )
    result = pytester.runpytest("--flowcheck-rabbitmq-url=amqp://u:pw-xyz@mq:5672/", "--co")
    result.stdout.fnmatch_lines(
        [
            f"flowcheck: *, topology {pytester.path / 'orders.yaml'} (from flowcheck_topology "
            "in tox.ini), deadline 3s, settle from the taps, isolate off, traces in pytest's "
            "temporary directory",
            "flowcheck brokers: kafka kafka-1:9092 (from FLOWCHECK_KAFKA_BOOTSTRAP), "
            "rabbitmq amqp://u:***@mq:5672/ (from --flowcheck-rabbitmq-url), "
            "redis redis://:***@cache:6379/1 (from flowcheck_redis_url in tox.ini)",
        ]
    )
    assert "hush" not in result.stdout.str()
    assert "pw-xyz" not in result.stdout.str()
    bad = pytester.runpytest("--flowcheck-deadline=5", "--co")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--flowcheck-deadline: a duration needs a unit: write 5s or 5ms*"])
    for flag, shown in (("0", "0s"), ("0ms", "0s"), ("250ms", "250ms")):
        settle = pytester.runpytest(f"--flowcheck-settle={flag}", "--co")
        settle.stdout.fnmatch_lines([f"flowcheck: *, deadline 3s, settle {shown}, isolate off*"])
    allowed = pytester.runpytest("--flowcheck-allow-unjudged", "--co")
    allowed.stdout.fnmatch_lines(["flowcheck: *, isolate off, unjudged expectations allowed, *"])
    assert "unjudged" not in result.stdout.str()
    bad = pytester.runpytest("--flowcheck-settle=soon", "--co")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--flowcheck-settle: 'soon' is not a duration*"])


def test_marker_and_topology_fixture(pytester: pytest.Pytester, broker_flags: list[str]) -> None:
    project.make(
        pytester,
        "flowcheck_isolate = true\n",
        test_marker="""
            import pytest

            from flowcheck.errors import FlowcheckError
            from flowcheck.testing import Flowcheck

            pytestmark = [pytest.mark.asyncio, pytest.mark.flowcheck(deadline="300ms")]


            @pytest.mark.flowcheck(flows="order-billed", settle="250ms")
            async def test_flows_limit_the_taps(flowcheck: Flowcheck) -> None:
                assert flowcheck.deadline == 0.3  # from the module's marker
                assert flowcheck.settle_for("order-billed") == 0.25
                assert flowcheck.channels == ["billing", "orders"]
                assert flowcheck.brokers == ["rabbit"]  # Redis is not even contacted
                with pytest.raises(FlowcheckError, match="'audit' is not watched in this test"):
                    await flowcheck.never_published("audit", within="1s")


            @pytest.mark.flowcheck("sub/other.yaml", isolate=False)
            async def test_topology_from_the_marker(flowcheck: Flowcheck) -> None:
                assert flowcheck.topology.name == "other"
                assert flowcheck.prefix == ""
                assert flowcheck.name("events") == flowcheck.source.channel_name("events")


            @pytest.mark.flowcheck(bogus=1)
            async def test_unknown_argument(flowcheck: Flowcheck) -> None:
                pass


            def test_not_async(flowcheck: Flowcheck) -> None:
                pass
        """,
    )
    # Not isolated, so nothing the broker would keep: a stream without groups is not created.
    other = f"""
        name: other
        brokers: {{redis: {{kind: redis}}}}
        channels: {{events: {{broker: redis, kind: stream, name: {pytester.path.name}-events}}}}
        flows: {{seen: {{correlate: $.id, steps: [events]}}}}
    """
    (pytester.path / "sub").mkdir()
    (pytester.path / "sub" / "other.yaml").write_text(textwrap.dedent(other))
    result = pytester.runpytest(*broker_flags)
    result.assert_outcomes(passed=2, errors=2)
    result.stdout.fnmatch_lines(
        [
            "flowcheck: @pytest.mark.flowcheck: unknown argument(s) bogus; it takes "
            "topology, flows, isolate, apply, deadline, settle"
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "flowcheck: test_not_async is not an async test run by pytest-asyncio or anyio;*",
        ]
    )


def test_a_mistake_in_a_test_reads_as_one(
    pytester: pytest.Pytester, broker_flags: list[str]
) -> None:
    """A name the topology lacks, or a duration that is not one, fails on the test's own
    line with what to write instead: no trace through flowcheck's code."""
    project.make(
        pytester,
        test_mistakes="""
            import pytest

            from flowcheck.testing import Flowcheck

            pytestmark = pytest.mark.asyncio


            async def test_unknown_flow(flowcheck: Flowcheck) -> None:
                await flowcheck.chain("order-shipped", "o-1").completes(within="1s")


            async def test_unknown_broker(flowcheck: Flowcheck) -> None:
                flowcheck.address("kafka")


            async def test_unknown_channel(flowcheck: Flowcheck) -> None:
                await flowcheck.publish("refunds", {"order_id": "o-1"})


            async def test_not_a_duration(flowcheck: Flowcheck) -> None:
                await flowcheck.chain("order-billed", "o-1").completes(within="2 seconds")


            async def test_no_samples(flowcheck: Flowcheck) -> None:
                assert flowcheck.latency("order-billed").p99 < "1s"


            @pytest.mark.flowcheck(deadline="soon")
            async def test_marker_deadline(flowcheck: Flowcheck) -> None:
                pass
        """,
    )
    result = pytester.runpytest(*broker_flags)
    result.assert_outcomes(failed=5, errors=1)
    result.stdout.fnmatch_lines(
        [
            "E * unknown flow 'order-shipped'; the topology has 'order-billed', 'job-done'",
            "test_mistakes.py:9: FlowcheckError",
        ]
    )
    result.stdout.fnmatch_lines(
        ["E *no broker 'kafka' in the topology; it has [[]'rabbit', 'redis'[]]*"]
    )
    result.stdout.fnmatch_lines(["E *no channel 'refunds' in the topology*"])
    result.stdout.fnmatch_lines(
        ["E * within='2 seconds': '2 seconds' is not a duration; write it like 250ms*"]
    )
    result.stdout.fnmatch_lines(["E * no latency samples for 'end-to-end' yet*"])
    result.stdout.fnmatch_lines(
        ["flowcheck: deadline='soon': 'soon' is not a duration; write it like 250ms*"]
    )
    shown = result.stdout.str()
    assert "flowcheck/testing/" not in shown
    assert "flowcheck/topology/" not in shown
    assert "flowcheck/pytest_plugin.py" not in shown


def test_topology_built_in_a_fixture(pytester: pytest.Pytester, broker_flags: list[str]) -> None:
    project.make(
        pytester,
        test_fixture=f"""
            import pytest

            import flowcheck
            from flowcheck.testing import Flowcheck

            @pytest.fixture
            def flowcheck_topology() -> flowcheck.Topology:
                return flowcheck.loads({project.TOPOLOGY.replace("plugin-test", "built")!r})

            @pytest.mark.asyncio
            async def test_built(flowcheck: Flowcheck) -> None:
                assert flowcheck.topology.name == "built"
        """,
    )
    (pytester.path / "orders.yaml").unlink()  # the setting would fail: the fixture wins
    pytester.runpytest(*broker_flags).assert_outcomes(passed=1)


XDIST = """
    import os
    from pathlib import Path

    import pytest

    from flowcheck.testing import Flowcheck

    pytestmark = pytest.mark.asyncio


    @pytest.mark.parametrize("n", range(4))
    async def test_same_keys_everywhere(flowcheck: Flowcheck, n: int) -> None:
        (Path(os.environ["PREFIXES"]) / flowcheck.prefix).touch()
        for key in ("k-1", "k-2", "k-3"):
            await flowcheck.publish("orders", {"order_id": key}, routing_key="order.placed")
        await flowcheck.check("order-billed")  # a worker sharing channels would duplicate them
        assert flowcheck.seen_keys("order-billed") == ["k-1", "k-2", "k-3"]


    @pytest.mark.parametrize("n", range(3))
    @pytest.mark.flowcheck("down.yaml")
    async def test_broker_down(flowcheck: Flowcheck, n: int) -> None:
        pass
"""


def test_xdist_workers_do_not_interfere(
    pytester: pytest.Pytester, rabbitmq_url: str, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Addresses in the topologies, not flags: flags would apply to down.yaml too.
    urls = project.TOPOLOGY.replace(
        "{kind: rabbitmq}", f"{{kind: rabbitmq, url: '{rabbitmq_url}'}}"
    )
    urls = urls.replace("{kind: redis}", f"{{kind: redis, url: '{redis_url}'}}")
    down = project.TOPOLOGY.replace(
        "{kind: rabbitmq}", "{kind: rabbitmq, url: 'amqp://guest:guest@127.0.0.1:1/'}"
    ).replace("{kind: redis}", f"{{kind: redis, url: '{redis_url}'}}")
    project.make(pytester, "flowcheck_isolate = true\n", test_xdist=XDIST)
    (pytester.path / "orders.yaml").write_text(urls)
    (pytester.path / "down.yaml").write_text(down)
    prefixes = pytester.path / "prefixes"
    prefixes.mkdir()
    monkeypatch.setenv("PREFIXES", str(prefixes))
    result = pytester.runpytest_subprocess("-n", "2", "-ra")
    result.assert_outcomes(passed=4, errors=1, skipped=2)
    names = [p.name for p in prefixes.iterdir()]
    assert len(names) == 4  # one prefix per test, each naming its worker
    assert {n.split("-")[-2] for n in names} == {"gw0", "gw1"}
    result.stdout.fnmatch_lines(
        ["4 test(s) used flowcheck (topology plugin-test): 4 passed, 0 failed*"]
    )
    # The broker that is down: one error for the whole run, whichever worker met it first.
    assert result.stdout.str().count("Start RabbitMQ there") == 1
    result.stdout.fnmatch_lines(
        ["  flowcheck: rabbit: cannot reach RabbitMQ at *(1 error(s), 2 test(s) skipped)"]
    )


def test_the_trace_dir_setting_is_relative_to_the_ini_file(
    pytester: pytest.Pytester, broker_flags: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    project.make(
        pytester,
        "flowcheck_trace_dir = reports/traces\n",
        test_trace="""
            import pytest

            @pytest.mark.asyncio
            async def test_fails(flowcheck):
                assert flowcheck.trace.parent == flowcheck.trace.parent.resolve()
                assert False, "on purpose"
        """,
    )
    sub = pytester.path / "elsewhere"
    sub.mkdir()
    monkeypatch.chdir(sub)
    result = pytester.runpytest(*broker_flags, str(pytester.path))
    result.assert_outcomes(failed=1)
    (trace,) = Path(pytester.path / "reports" / "traces").iterdir()
    assert trace.name.startswith("test-fails-")
    # The kept trace ends with its end record: `flowcheck check` judges it as it was.
    reader = Reader(str(trace))
    assert list(reader) == []
    assert reader.end is not None
    assert reader.end.ended == "stopped"
