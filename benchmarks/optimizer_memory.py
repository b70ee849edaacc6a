"""Per-rank optimizer memory against the distributed optimizer's formula, by precision, dp and ZeRO-1.

    .venv/bin/python benchmarks/optimizer_memory.py
    .venv/bin/python benchmarks/optimizer_memory.py --dp 1 2 4 8 --bucket-size 1000000

A GPT of a few million parameters trains one step (Adam's moments exist only after one) under
dpD and dpD.zero1 in bf16 and fp32 on a RankPool of max(dp) CPU ranks; each rank reports
`ParallelOptimizer.memory_bytes()`, divided here by the model's parameter count. The table
shows the rank with the largest total and, beside it, the formula (bytes per parameter):

- bf16 parameters, fp32 gradient buffer: 2 + 4 + (4 main weights + 8 Adam) / d = 6 + 12/d with
  ZeRO-1, 18 without;
- fp32 (the parameters are their own main weights): 4 + 4 + 8/d with ZeRO-1, 16 without.

With ZeRO-1 each bucket is padded to a multiple of dp, so a rank can hold up to dp - 1 extra
elements per bucket above the formula; with the default model (4,212,224 parameters, a multiple
of 8) in one 40M-element bucket there is no padding and the match is exact. The gradient buffer
stays whole on every rank (ZeRO-1 shards the main weights and Adam's state, not gradients).
"""

from __future__ import annotations

import argparse
import time

from megalith.config import ModelConfig, parse_layout
from megalith.models.registry import get_model_spec
from megalith.parallel.spawn import RankPool
from megalith.training.step import sequence_mean_loss
from megalith.verify import VerifySettings, build_runner, global_batch, plan

PARTS = ("params", "grads", "main_params", "optimizer_state")


def formula(precision: str, dp: int, zero1: bool) -> float:
    """Bytes per parameter on one rank (Megatron's distributed-optimizer table, Adam)."""
    shards = dp if zero1 else 1
    if precision == "bf16":
        return 2 + 4 + 12 / shards
    return 4 + 4 + 8 / shards


def measure(ctx, settings: VerifySettings, layout_text: str):
    """This rank's memory_bytes() after one training step, and the model's parameter count."""
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
    return runner.optimizer.memory_bytes(), params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--bucket-size", type=int, default=40_000_000, help="--ddp-bucket-size in elements")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-length", type=int, default=16, help="short: only the state's size matters")
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
        for precision in ("bf16", "fp32"):
            for dp in args.dp:
                for zero1 in (False, True):
                    layout = f"dp{dp}" + (".zero1" if zero1 else "") + (".bf16" if precision == "bf16" else "")
                    results = [r for r in pool.run(measure, settings, layout) if r is not None]
                    params = results[0][1]
                    per_rank = [{k: v / params for k, v in memory.items()} for memory, _ in results]
                    worst = max(per_rank, key=lambda m: sum(m.values()))
                    rows.append((precision, dp, zero1, params, worst, formula(precision, dp, zero1)))

    print(f"GPT {rows[0][3] / 1e6:.2f}M parameters (hidden {args.hidden_size}, {args.num_layers} layers, vocab "
          f"{args.vocab_size}), Adam, bucket {args.bucket_size:,} elements; bytes per parameter on the rank "
          f"with the largest total; {time.perf_counter() - began:.0f} s")
    header = (f"{'precision':<9} {'dp':>3} {'zero1':>5} {'params':>7} {'grads':>7} {'main':>7} {'state':>7} "
              f"{'total':>8} {'formula':>8} {'rel diff':>9}")
    print(header)
    print("-" * len(header))
    for precision, dp, zero1, _, worst, expected in rows:
        total = sum(worst.values())
        print(f"{precision:<9} {dp:>3} {'yes' if zero1 else 'no':>5} "
              + " ".join(f"{worst[part]:>7.3f}" for part in PARTS)
              + f" {total:>8.4f} {expected:>8.4f} {(total - expected) / expected:>9.2e}")


if __name__ == "__main__":
    main()
