"""Command line: ``python -m examples.shop run|setup|teardown|names``."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence

from .config import Brokers, Fault, Settings, parse_faults
from .infra import setup, teardown
from .stats import Stats
from .system import ALL_SERVICES, Service, Shop


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.shop",
        description="The shop from topologies/shop.yaml, on real brokers. Addresses come from "
        "FLOWCHECK_RABBITMQ_URL, FLOWCHECK_KAFKA_BOOTSTRAP and FLOWCHECK_REDIS_URL.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="set up, start the services, place orders")
    run.add_argument("--orders", type=int, default=10, metavar="N", help="orders to place (10)")
    run.add_argument(
        "--poison", type=int, default=0, metavar="K", help="of which poison (billing fails)"
    )
    run.add_argument(
        "--declined", type=int, default=0, metavar="K", help="of which declined payments"
    )
    run.add_argument("--bad-address", type=int, default=0, metavar="K", help="of which unshippable")
    run.add_argument(
        "--amended",
        type=int,
        default=0,
        metavar="K",
        help="healthy orders placed twice (revision 2)",
    )
    run.add_argument(
        "--fault",
        action="append",
        default=[],
        choices=[f.value for f in Fault],
        metavar="NAME",
        help=f"inject a fault (repeatable): {', '.join(f.value for f in Fault)}",
    )
    run.add_argument("--latency-ms", type=int, default=750, help="delay of the latency fault (750)")
    run.add_argument(
        "--claim-idle-ms",
        type=int,
        default=500,
        help="a stuck shipment's first retry wait; doubles, at most 2 s (500)",
    )
    run.add_argument("--payment-backoff-ms", type=int, default=1000, help="retry backoff (1000)")
    run.add_argument(
        "--services",
        default=",".join(s.value for s in Service),
        help="comma-separated services to run (all)",
    )
    run.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once every order reached its end, or nothing happened for --idle-seconds",
    )
    run.add_argument("--idle-seconds", type=float, default=5.0)
    run.add_argument("--teardown", action="store_true", help="delete the broker objects at exit")
    for name, text in (
        ("setup", "declare exchanges, queues, topics, streams and groups"),
        ("teardown", "delete them"),
        ("names", "print shop.yaml name → broker-side name"),
    ):
        commands.add_parser(name, help=text)
    for sub in commands.choices.values():
        sub.add_argument("--prefix", default="", help="prefix for every broker-side name")
    return parser


def _print_summary(stats: Stats) -> None:
    print("counts:")
    for service, counts in stats.summary().items():
        shown = ", ".join(f"{what} {n}" for what, n in counts.items() if n)
        print(f"  {service:16} {shown or '-'}")
    for fault, order_id in stats.faults:
        print(f"  fault {fault.value}: {order_id}")


async def _run(args: argparse.Namespace, settings: Settings) -> int:
    main = asyncio.current_task()
    if main is not None:  # SIGTERM stops as cleanly as Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main.cancel)
    services = [Service(s.strip()) for s in args.services.split(",") if s.strip()]
    shop = Shop(settings, services=services or ALL_SERVICES, remove=args.teardown)
    try:
        async with shop:
            print(
                f"services running: {', '.join(sorted(shop.services))} (prefix {settings.prefix!r})"
            )
            orders = await shop.place_orders(
                args.orders,
                poison=args.poison,
                declined=args.declined,
                bad_address=args.bad_address,
                amended=args.amended,
            )
            print(f"placed {len(orders)} orders")
            if args.until_idle:
                done = await shop.run_until_idle(orders, args.idle_seconds)
                print("every order reached its end" if done else f"idle for {args.idle_seconds}s")
            else:
                print("running; Ctrl-C to stop")
                await asyncio.Event().wait()
    finally:
        _print_summary(shop.stats)
    return 0


async def _command(args: argparse.Namespace) -> int:
    settings = Settings(prefix=args.prefix)
    if args.command == "setup":
        await setup(settings)
    elif args.command == "teardown":
        await teardown(settings)
    elif args.command == "names":
        for logical, actual in settings.names.mapping().items():
            print(f"{logical} {actual}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    brokers = Brokers.from_env()
    if args.command != "run":
        return asyncio.run(_command(args))
    settings = Settings(
        brokers=brokers,
        prefix=args.prefix,
        faults=parse_faults(args.fault, latency_ms=args.latency_ms),
        claim_idle_ms=args.claim_idle_ms,
        payment_backoff_ms=args.payment_backoff_ms,
    )
    try:
        return asyncio.run(_run(args, settings))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
