"""Per-rank persistent memory against ZeRO's formulas, for every sharding strategy, by precision and dp.

    .venv/bin/python benchmarks/optimizer_memory.py
    .venv/bin/python benchmarks/optimizer_memory.py --dp 1 2 4 8 --bucket-size 1000000

A GPT of a few million parameters trains one step (Adam's moments exist only after one) under
each --data-parallel-sharding-strategy (no_shard, optim = ZeRO-1, optim_grads = ZeRO-2,
optim_grads_params = ZeRO-3) at each dp, in bf16 and fp32, on a RankPool of max(dp) CPU ranks.
Each rank reports `megalith.training.memory_report.persistent_memory` (counted from the tensors'
storage: what the JSON log's first record carries), divided here by the model's parameter count
Ψ. The table shows the rank with the largest total and, beside it, the formula (bytes per
parameter, `memory_report.formula_bytes`), with d = dp:

- bf16 parameters, fp32 gradients, Adam (4 main weights + 8 moments = 12 of state):
  no_shard 2 + 4 + 12, optim 2 + 4 + 12/d, optim_grads 2 + 4/d + 12/d, optim_grads_params 18/d;
- fp32 (the parameters are their own main weights, 8 of state): 4 + 4 + 8 sharded the same way.

ZeRO-3's gathered working set (full parameters of the units in use, freed after) is not
persistent and is shown in its own column, also per parameter. Buckets (ZeRO-1/2) and units
(ZeRO-3) are padded to a multiple of dp, so a rank can hold up to dp - 1 elements per bucket or
unit above the formula.
"""

from __future__ import annotations

import argparse
import time

from megalith.config import ModelConfig, parse_layout
from megalith.models.registry import get_model_spec
from megalith.parallel.spawn import RankPool
from megalith.training.memory_report import STRATEGIES, formula_bytes, persistent_memory
from megalith.training.step import sequence_mean_loss
from megalith.verify import VerifySettings, build_runner, global_batch, plan

PARTS = ("params_bytes", "grads_bytes", "optimizer_bytes")


def formula(precision: str, strategy: str, dp: int) -> float:
    """Bytes per parameter on one rank, persistent storage only."""
    sizes = {"param_bytes": 2, "grad_bytes": 4, "state_bytes": 12} if precision == "bf16" else \
        {"param_bytes": 4, "grad_bytes": 4, "state_bytes": 8}
    return sum(formula_bytes(strategy, 1, dp, **sizes).values())


def measure(ctx, settings: VerifySettings, layout_text: str):
    """This rank's persistent memory after one training step, and the model's parameter count."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(dp=layout.dp)
    if state is None:
        return None
    runner = build_runner(settings, layout, state)
    batch_plan = plan(settings, layout).batch
    data = global_batch(settings, get_model_spec(settings.model), 0)
    runner.train_step(lambda i: {k: v[batch_plan.micro_slice(state.dp_rank, i)] for k, v in data.items()},
                      lambda out, b: sequence_mean_loss(out, b, settings.global_batch_size), 1e-3)
    params = sum(p.numel() for chunk in runner.chunks for p in chunk.parameters())
    return persistent_memory(runner), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--bucket-size", type=int, default=40_000_000, help="--ddp-bucket-size in elements")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-length", type=int, default=16, help="short: only the state's size matters")
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    args = parser.parse_args()

    config = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=8,
                         seq_length=args.seq_length, vocab_size=args.vocab_size, hidden_dropout=0.0,
                         attention_dropout=0.0)
    world = max(args.dp)
    settings = VerifySettings("gpt", config, steps=1, micro_batches=world, micro_batch_size=1,
                              ddp_bucket_size=args.bucket_size)
    began = time.perf_counter()
    rows = []
    with RankPool(world) as pool:
        for precision in args.precision:
            for dp in args.dp:
                for stage, strategy in enumerate(STRATEGIES):
                    if stage and dp == 1:
                        continue  # nothing to shard
                    layout = f"dp{dp}" + (f".zero{stage}" if stage else "") + (".bf16" if precision == "bf16" else "")
                    results = [r for r in pool.run(measure, settings, layout) if r is not None]
                    params = results[0][1]
                    per_rank = [{k: v / params for k, v in memory.items()} for memory, _ in results]
                    worst = max(per_rank, key=lambda m: sum(m[part] for part in PARTS))
                    rows.append((precision, dp, strategy, params, worst, formula(precision, strategy, dp)))

    print(f"GPT {rows[0][3] / 1e6:.2f}M parameters (hidden {args.hidden_size}, {args.num_layers} layers, vocab "
          f"{args.vocab_size}), Adam, bucket {args.bucket_size:,} elements; bytes per parameter on the rank "
          f"with the largest persistent total; {time.perf_counter() - began:.0f} s")
    header = (f"{'precision':<9} {'dp':>3} {'strategy':<18} {'params':>7} {'grads':>7} {'optim':>7} "
              f"{'total':>8} {'formula':>8} {'rel diff':>9} {'gathered':>9}")
    print(header)
    print("-" * len(header))
    for precision, dp, strategy, _, worst, expected in rows:
        total = sum(worst[part] for part in PARTS)
        print(f"{precision:<9} {dp:>3} {strategy:<18} " + " ".join(f"{worst[part]:>7.3f}" for part in PARTS)
              + f" {total:>8.4f} {expected:>8.4f} {(total - expected) / expected:>9.2e}"
              + f" {worst['gathered_peak_bytes']:>9.4f}")


if __name__ == "__main__":
    main()
