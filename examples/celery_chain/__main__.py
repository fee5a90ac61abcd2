"""Run the chain on a batch of orders, for flowcheck to watch.

    python -m examples.celery_chain --orders 10 --flaky 2 --poison 1 --fault lose=o-3

Orders are ``o-N`` (healthy), ``f-N`` (flaky) and ``p-N`` (poison); ``--fault
NAME=ORDER`` breaks one of them (lose, duplicate, too_many_retries,
no_dead_letter). Prints how each order ended; exits 1 if one did not in time.
The queues stay (for a look at the dead letters) unless ``--remove``.
"""

from __future__ import annotations

import argparse
import os
import sys

from examples.celery_chain import Chain, Fault

URL = "amqp://guest:guest@127.0.0.1:5672/"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.celery_chain")
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
    chain = Chain(args.url, args.prefix, faults=faults)
    try:
        with chain.running():
            for placed in orders:
                chain.place(*placed)
            twice = [o for f, o in faults.items() if f is Fault.DUPLICATE]
            once = [o for o, _, _ in orders if o not in twice]
            done = chain.outcomes.wait(once, args.within)
            done &= chain.outcomes.wait(twice, args.within, ends=2)
        for order, _, _ in orders:
            ends = ", ".join(chain.outcomes.of(order)) or "no end"
            print(f"{order}: {ends} ({chain.attempts.get(order, 0)} attempt(s) at charge)")
        print(f"dead letters in {chain.dead_queue}: {chain.queue_depth(chain.dead_queue)}")
    finally:
        if args.remove:
            chain.close()
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
