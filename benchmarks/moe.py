"""MoE benchmark (issue 21, item 7): the alltoall dispatcher's bytes against the formula, an MoE GPT's step time
against a dense GPT of the same active parameters, and --moe-grouped-gemm against the loop over experts.

    .venv/bin/python benchmarks/moe.py                      # all three, CPU
    .venv/bin/python benchmarks/moe.py --quick --json out.json
    .venv/bin/python benchmarks/moe.py --device cuda --dtype bf16 --skip-bytes

(a) runs on a RankPool of 2 CPU ranks (gloo) as ep2: the comm ledger's all_to_all bytes per rank and per
direction equal top-k x tokens x h x bytes per element (megalith/bench/moe_bench.py says what 'per direction'
and the local share mean). (b) and (c) run in this process: medians of alternating runs, and ratios. Read
the times for what the machine is: on a shared 2-core CPU the MoE step pays the router, the permutation and
the per-expert GEMMs on small matrices, which a dense GEMM of the same FLOPs does not; _grouped_mm on a CPU
is a loop inside torch too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megalith.bench.moe_bench import (alltoall_bytes_on_rank, summarize_bytes, time_grouped_against_loop,  # noqa: E402
                                      time_moe_against_dense)


def measure_bytes(pool=None, **config_options) -> dict:
    """(a) on `pool` (None: a fresh RankPool of 2, closed afterwards)."""
    from megalith.parallel.spawn import RankPool

    own = pool is None
    pool = pool or RankPool(2, call_timeout_s=240)
    try:
        return summarize_bytes(pool.run(alltoall_bytes_on_rank, **config_options))
    finally:
        if own:
            pool.close()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write every number here")
    parser.add_argument("--device", default="cpu", help="(b) and (c): cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="(b) and (c)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side (default 10; --quick 3)")
    parser.add_argument("--skip-bytes", action="store_true", help="leave out (a), the 2-rank byte count")
    args = parser.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    sizes = (dict(hidden=32, layers=1, experts=4, moe_ffn=32, seq=16, batch=2) if args.quick else
             dict(hidden=256, layers=2, experts=8, moe_ffn=512, seq=256, batch=4))
    expert_sizes = (dict(hidden=32, experts=4, ffn=32, rows=128) if args.quick else
                    dict(hidden=256, experts=8, ffn=512, rows=4096))
    report: dict = {}
    if not args.skip_bytes:
        report["alltoall bytes"] = measure_bytes(hidden=32 if args.quick else 64)
    common = dict(steps=steps, device=args.device, dtype=args.dtype)
    report["moe vs dense"] = time_moe_against_dense(**sizes, **common)
    report["moe (grouped gemm) vs dense"] = time_moe_against_dense(**sizes, grouped=True, **common)
    report["grouped gemm vs loop"] = time_grouped_against_loop(**expert_sizes, **common)
    for section, numbers in report.items():
        print(f"== {section}")
        for key, value in numbers.items():
            print(f"  {key}: {value:.3f}" if isinstance(value, float) else f"  {key}: {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
