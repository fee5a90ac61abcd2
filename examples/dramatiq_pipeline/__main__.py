"""Run the pipeline on a batch of orders, for flowcheck to watch.

    python -m examples.dramatiq_pipeline --orders 10 --flaky 2 --poison 1 --fault lose=o-3

Orders are ``o-N`` (healthy), ``f-N`` (flaky) and ``p-N`` (poison); ``--fault
NAME=ORDER`` breaks one of them (lose, duplicate, too_many_retries,
no_dead_letter). Prints how each order ended; exits 1 if one did not in time.
The queues stay (for a look at the dead letters) unless ``--remove``.
"""

from __future__ import annotations

import argparse
import os
import sys

from examples.dramatiq_pipeline import Fault, Pipeline

URL = "amqp://guest:guest@127.0.0.1:5672/"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.dramatiq_pipeline")
    parser.add_argument("--url", default=os.environ.get("FLOWCHECK_RABBITMQ_URL", URL))
    parser.add_argument("--prefix", default="", help="in front of every queue name")
    parser.add_argument("--orders", type=int, default=10, help="healthy orders")
    parser.add_argument("--flaky", type=int, default=1, help="orders that fail once")
    parser.add_argument("--poison", type=int, default=1, help="orders that always fail")
    parser.add_argument("--fault", action="append", default=[], metavar="NAME=ORDER")
    parser.add_argument("--within", type=float, default=30.0, help="seconds to wait")
    parser.add_argument("--remove", action="store_true", help="delete the queues at the end")
    args = parser.parse_args(argv)
    try:
        faults = {Fault(n): o for n, _, o in (f.partition("=") for f in args.fault)}
    except ValueError as exc:
        parser.error(f"--fault: {exc}; one of {', '.join(Fault)}")
    orders = [(f"o-{n}", 10.0 + n, "healthy") for n in range(args.orders)]
    orders += [(f"f-{n}", 5.0, "flaky") for n in range(args.flaky)]
    orders += [(f"p-{n}", -1.0, "healthy") for n in range(args.poison)]
    pipeline = Pipeline(args.url, args.prefix, faults=faults)
    try:
        pipeline.start()
        for placed in orders:
            pipeline.place(*placed)
        twice = [o for f, o in faults.items() if f is Fault.DUPLICATE]
        once = [o for o, _, _ in orders if o not in twice]
        done = pipeline.outcomes.wait(once, args.within)
        done &= pipeline.outcomes.wait(twice, args.within, ends=2)
        pipeline.stop()
        for order, _, _ in orders:
            ends = ", ".join(pipeline.outcomes.of(order)) or "no end"
            print(f"{order}: {ends} ({pipeline.attempts.get(order, 0)} attempt(s) at store)")
        print(
            f"dead letters in {pipeline.store_queue}.XQ: "
            f"{pipeline.queue_depth(pipeline.store_queue + '.XQ')}"
        )
    finally:
        if args.remove:
            pipeline.close()
        else:
            pipeline.stop()
            pipeline.broker.close()
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
