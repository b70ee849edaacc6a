"""megalith beside the frameworks users would pick instead, on the same work (issue 17).

    .venv/bin/python benchmarks/peers.py --quick --json /tmp/peers.json

Each row times one training step (forward, backward, AdamW) of the same GPT with the same weights
and batches under megalith and under one peer, alternating repetitions (megalith, peer, megalith,
...) after warm-up steps whose losses must agree (fp32, relative 1e-5) before any time counts.
Medians of the slowest rank per step; ratio = megalith / peer. Rows today: plain PyTorch on one
process, DTensor tensor parallelism with sequence parallelism and loss_parallel (tp2+SP),
DistributedDataParallel (dp2), FSDP2 `fully_shard` (dp2 with the distributed
optimizer), torch.distributed.pipelining (pp2 and pp4 1F1B, pp2 interleaved with 2 chunks) and
DeepSpeed (pipeline engine pp2, ZeRO-1 dp2, skipped with one line when it is not installed), and
megalith's ZeRO-3 (dp2) against FSDP2 with reshard_after_forward and DeepSpeed ZeRO stage 3.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import torch

from megalith.bench import data_parallel_peers, pipelining, plain_peer, tensor_parallel_peer, zero3_peers
from megalith.bench.harness import run_case
from megalith.config import ModelConfig
from megalith.parallel.spawn import RankPool

# the work: 4 layers, hidden 256, 8 heads, seq 256, vocab 8192, micro-batch 4, fp32
REAL = ModelConfig(num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=256, vocab_size=8192,
                   hidden_dropout=0.0, attention_dropout=0.0)
TINY = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                   hidden_dropout=0.0, attention_dropout=0.0)
SCALING_GOAL = 0.65  # megalith tp2+SP step / megalith's own one-process step (77% efficiency on 2 cores)
GOALS = {"plain": 1.05, "dtensor": 0.75, "ddp": 1.0, "fsdp2": 1.0, "pipelining": 0.95, "deepspeed": 0.8}


def all_cases(config, quick: bool, peers: set[str] | None, work: str | None = None):
    """Every row's case, in table order; a peer whose framework is missing is left out with one line.
    `work` keeps only the rows whose work name contains it (e.g. "ZeRO-3")."""
    cases = []
    for module in (plain_peer, tensor_parallel_peer, data_parallel_peers, pipelining):
        cases += module.cases(config, quick)
    has_deepspeed = importlib.util.find_spec("deepspeed") is not None
    if not has_deepspeed:
        print("deepspeed rows skipped: DeepSpeed is not installed (pip install -e '.[bench]')", file=sys.stderr)
    else:
        from megalith.bench import deepspeed_peer

        cases += deepspeed_peer.cases(config, quick)
    cases += zero3_peers.cases(config, quick, deepspeed=has_deepspeed)
    return [c for c in cases if (peers is None or c.peer in peers) and (work is None or work in c.work_name)]


def table(rows) -> str:
    lines = [f"{'work':34} {'peer':11} {'megalith ms':>12} {'peer ms':>10} {'ratio':>7} {'goal':>6}  met"]
    for r in rows:
        goal = GOALS[r.peer]
        lines.append(f"{r.work:34} {r.peer:11} {r.megalith_ms:12.1f} {r.peer_ms:10.1f} {r.ratio:7.3f} "
                     f"{goal:6.2f}  {'yes' if r.ratio <= goal else 'no'}")
    return "\n".join(lines)


def scaling_line(rows) -> str | None:
    """megalith's tp2+SP step against its own one-process step, when both rows ran."""
    by_work = {r.work: r for r in rows}
    if "one process" not in by_work or "tp2+SP" not in by_work:
        return None
    ratio = by_work["tp2+SP"].megalith_ms / by_work["one process"].megalith_ms
    return (f"scaling: megalith tp2+SP / one process = {ratio:.3f} (goal <= {SCALING_GOAL}: "
            f"{'met' if ratio <= SCALING_GOAL else 'not met'})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions per row instead of 10 (same sizes)")
    parser.add_argument("--repeats", type=int, default=None, help="repetitions per row (overrides --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps whose losses are checked first")
    parser.add_argument("--json", metavar="PATH", help="write the rows as a JSON list")
    parser.add_argument("--peers", help="comma-separated peers to run, e.g. plain,pipelining")
    parser.add_argument("--work", help='only the rows whose work name contains this, e.g. "ZeRO-3"')
    parser.add_argument("--tiny", action="store_true", help="a tiny model, for a smoke test (times mean nothing)")
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 10)
    peers = set(args.peers.split(",")) if args.peers else None
    unknown = (peers or set()) - set(GOALS)
    if unknown:
        parser.error(f"unknown peer(s) {sorted(unknown)}: choose from {', '.join(GOALS)}")
    torch.set_num_threads(1)
    cases = all_cases(TINY if args.tiny else REAL, args.quick, peers, args.work)
    if not cases:
        parser.error(f"no row has peer in {sorted(peers or GOALS)} and work containing {args.work!r}")
    rows, pools = [], {}
    try:
        for case in cases:
            pool = pools.setdefault(case.ranks, RankPool(case.ranks, call_timeout_s=1800))
            rows.append(run_case(pool, case, repeats, warmup=args.warmup))
            print(table(rows[-1:]).splitlines()[1], flush=True)
    finally:
        for pool in pools.values():
            pool.close()
    print(table(rows))
    scaling = scaling_line(rows)
    if scaling:
        print(scaling)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([r.to_json() for r in rows], handle, indent=1)


if __name__ == "__main__":
    main()
