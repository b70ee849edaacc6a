"""How long the multi-rank harness takes to start ranks, build a layout's groups, and run a call.

    .venv/bin/python benchmarks/rank_pool.py

Medians of 3 fresh pools per world size; the empty call is averaged over 20 runs.
"""

import statistics
import time

from megalith.parallel.spawn import RankPool


def noop(ctx):
    return ctx.rank


def build_tp2_pp2(ctx):
    ctx.parallel_state(tp=2, pp=2)


def main() -> None:
    for world in (4, 8):
        starts, groups, calls = [], [], []
        for _ in range(3):
            pool = RankPool(world)
            began = time.perf_counter()
            pool.start()
            starts.append(time.perf_counter() - began)
            began = time.perf_counter()
            pool.run(build_tp2_pp2)
            groups.append(time.perf_counter() - began)
            began = time.perf_counter()
            for _ in range(20):
                pool.run(noop)
            calls.append((time.perf_counter() - began) / 20)
            pool.close()
        print(
            f"{world} ranks: start {statistics.median(starts) * 1e3:.0f} ms, "
            f"tp2.pp2 groups {statistics.median(groups) * 1e3:.0f} ms, "
            f"empty call {statistics.median(calls) * 1e3:.2f} ms"
        )


if __name__ == "__main__":
    main()
