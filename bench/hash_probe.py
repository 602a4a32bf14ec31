"""How long one password verify takes with Strawgate's own hasher (argon2id, default cost).

The benchmark runs this pinned to the server's core: 1 / median is the most logins per
second that core can answer, whatever the server around the hash does. Prints one JSON
object: {"count": n, "median_s": ..., "p99_s": ...}.

    taskset -c 0 python bench/hash_probe.py --count 30
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from db.security.passwords import PasswordHasher

PASSWORD = "a long bench password 123"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=30, help="verifies to time")
    count = max(1, parser.parse_args().count)
    context = PasswordHasher().context
    stored = context.hash(PASSWORD)
    context.verify(PASSWORD, stored)  # warm-up: first-call imports and allocations
    timings: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        ok = context.verify(PASSWORD, stored)
        timings.append(time.perf_counter() - start)
        if not ok:
            raise SystemExit("the hasher refused its own hash")
    ordered = sorted(timings)
    print(
        json.dumps(
            {
                "count": count,
                "median_s": statistics.median(ordered),
                "p99_s": ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
            }
        )
    )


if __name__ == "__main__":
    main()
