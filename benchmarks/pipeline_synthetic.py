"""Every megalith pipeline schedule on stages of fixed cost: measured step time beside the
analytic one and beside torch.distributed.pipelining's same schedule.

    .venv/bin/python benchmarks/pipeline_synthetic.py
    .venv/bin/python benchmarks/pipeline_synthetic.py --quick --json /tmp/synthetic.json
    .venv/bin/python benchmarks/pipeline_synthetic.py --forward-ms 20 --backward-ms 40 --pp 4 --micro-batches 8 16

Stages sleep for their cost around a tiny real computation (megalith.bench.synthetic_pipeline),
so the ranks sharing this machine's cores do not compete and the measured time is the
schedule's and the engine's. A RankPool of max(pp) ranks runs every (schedule, m) row with real
processes and real p2p, alternating megalith and torch after a warm-up step whose losses are
checked equal. Columns: measured/analytic (goal <= 1.05) and megalith/torch (goal <= 0.95). The
analytic time of zb-h1 is the simulator's for the same costs.
"""

from __future__ import annotations

import argparse
import json

from megalith.bench.synthetic_pipeline import SyntheticRun, measure
from megalith.parallel.spawn import RankPool

SCHEDULES = (("1f1b", 1), ("interleaved-1f1b", 2), ("gpipe", 1), ("zb-h1", 1), ("zb-v", 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forward-ms", type=float, default=20.0, help="one rank's forward of one micro-batch")
    parser.add_argument("--backward-ms", type=float, default=40.0, help="one rank's backward of one micro-batch")
    parser.add_argument("--wgrad-ms", type=float, default=0.0,
                        help="the weight gradient's part, apart from --backward-ms (zb-h1 defers it)")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--quick", action="store_true", help="2 timed repetitions per row instead of 5")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    runs = [SyntheticRun(name, args.pp, vpp, m, args.forward_ms, args.backward_ms, args.wgrad_ms)
            for m in args.micro_batches for name, vpp in SCHEDULES]
    with RankPool(args.pp) as pool:
        rows = next(r for r in pool.run(measure, runs, repeats) if r is not None)
    print(f"tf={args.forward_ms:g} ms, tb={args.backward_ms:g} ms, tw={args.wgrad_ms:g} ms per rank, p={args.pp}; "
          f"medians of {repeats}; zero-bubble rows have no torch column (see megalith.bench.synthetic_pipeline)")
    print(f"{'schedule':<18} {'vpp':>3} {'m':>3} {'measured':>9} {'analytic':>9} {'ratio':>6} {'torch':>9} "
          f"{'mine/torch':>10}")
    for row in rows:
        torch_ms = row["torch_ms"]
        vs = f"{row['measured_ms'] / torch_ms:>10.3f}" if torch_ms else f"{'-':>10}"
        print(f"{row['schedule']:<18} {row['vpp']:>3} {row['m']:>3} {row['measured_ms']:>9.1f} "
              f"{row['analytic_ms']:>9.1f} {row['measured_ms'] / row['analytic_ms']:>6.3f} "
              f"{(f'{torch_ms:.1f}' if torch_ms else '-'):>9} {vs}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
