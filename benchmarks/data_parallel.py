"""Time full data-parallel training steps: overlap, bucket size and ZeRO-1 against plain dp.

    .venv/bin/python benchmarks/data_parallel.py
    .venv/bin/python benchmarks/data_parallel.py --repeats 7 --bucket-sizes 250000 1000000 40000000
    .venv/bin/python benchmarks/data_parallel.py --repeats 0 --reduction-repeats 50   # the second table only

A GPT (fp32, no dropout) trains on a RankPool of 4 CPU ranks (gloo) with StepRunner.train_step
— forward, backward, bucketed gradient reduction, optimizer, ZeRO-1's all-gather — under:
dp4 without overlap, dp4 with overlap, dp4 with overlap and ZeRO-1, each at every bucket
size; and dp1, one rank alone with one dp rank's share of the batch (per-rank compute, no
communication). Every repeat runs every variant once, in an order rotated by the repeat, so
slow drift (other jobs on the machine) hits all variants alike. Each call builds the runner,
runs one warm-up step, then times `--steps` steps; a step's time is the slowest rank's. The
table gives medians over all timed steps and the ratio to "dp4, no overlap, one bucket".
Columns split the step: forward+backward (the reduction launched during backward with
overlap), finish (waiting for the dp reduction), optimizer (ZeRO-1: with the all-gather).

Read the numbers for what this machine is. Four ranks share the CPU cores (two on the
machine this was written for), and gloo's collectives on loopback run on the same cores
as the compute: "overlap" cannot hide communication behind computation when there is no
idle core to run it on, so it saves little or nothing here (the wait leaves `finish` and
forward+backward grows by about as much) and more buckets mostly add per-collective
latency. With one bucket, overlap launches it only when backward has produced every
gradient, which is no overlap at all. dp4 against dp1 measures time-sharing (4 ranks on
2 cores: at least 2x) plus communication, not scaling. Columns are medians taken separately,
so they need not add up to ms/step. What overlap buys on real hardware (a NIC or NVLink working
while the GPU computes) is not measurable on this box; the tests prove its mechanics instead.
ZeRO-1 pays here too: gloo's reduce-scatter of a buffer is no faster than its all-reduce (4.2M
fp32 elements over 4 ranks: 28 ms against 22 ms, measured alone), and the all-gather after the
optimizer (14 ms) comes on top; on NCCL the two together cost about one all-reduce.

A second table times the gradient reduction alone (`DataParallelGrads.finish()` on the same
model's buffer, no backward, dp4): one all-reduce per parameter issued in turn (the naive
loop), one bucket per parameter (all launched, then waited), each bucket size, and one flat
buffer — DESIGN.md's "flat is 2 to 3.6 times faster than per parameter" on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass

import torch.distributed as dist

from megalith.config import Layout, ModelConfig, parse_layout
from megalith.models.registry import get_model_spec
from megalith.parallel.comm import group_size
from megalith.parallel.data_parallel import DataParallelGrads
from megalith.parallel.spawn import RankPool
from megalith.training.step import sequence_mean_loss
from megalith.verify import VerifySettings, build_runner, global_batch, plan


@dataclass(frozen=True)
class Variant:
    name: str
    layout: str  # dp1, dp4 or dp4.zero1
    overlap: bool
    bucket_size: int


def variants(bucket_sizes: list[int]) -> list[Variant]:
    found = []
    for overlap, zero1 in ((False, False), (True, False), (True, True)):
        for size in bucket_sizes:
            label = "dp4" + (", overlap" if overlap else ", no overlap") + (", zero1" if zero1 else "")
            found.append(Variant(f"{label}, bucket {size:,}", "dp4.zero1" if zero1 else "dp4", overlap, size))
    found.append(Variant("dp1 (one rank's share, alone)", "dp1", True, max(bucket_sizes)))
    return found


def time_steps(ctx, settings: VerifySettings, variant: Variant, steps: int):
    """On each rank of the variant's layout: one warm-up step, then `steps` timed ones
    (seconds: total, forward+backward, finish, optimizer); None on idle ranks."""
    layout = parse_layout(variant.layout)
    state = ctx.parallel_state(dp=layout.dp)
    if state is None:
        return None
    runner = build_runner(settings, layout, state)
    for buffer in runner.buffers:
        buffer.overlap = variant.overlap
    batch_plan = plan(settings, layout).batch
    data = global_batch(settings, get_model_spec(settings.model), 0)
    finish, optimizer_step, parts = runner.finalize_grads, runner.optimizer.step, {}

    def timed(key, fn):
        def wrapper(*args):
            began = time.perf_counter()
            result = fn(*args)
            parts[key] = time.perf_counter() - began
            return result
        return wrapper

    runner.finalize_grads = timed("finish", finish)
    runner.optimizer.step = timed("optimizer", optimizer_step)

    def micro(index):
        return {k: v[batch_plan.micro_slice(state.dp_rank, index)] for k, v in data.items()}

    def loss_fn(per_token, batch):
        return sequence_mean_loss(per_token, batch, settings.global_batch_size)

    times = []
    for step in range(steps + 1):
        if group_size(state.dp_group) > 1:
            dist.barrier(group=state.dp_group)
        began = time.perf_counter()
        runner.train_step(micro, loss_fn, 1e-4)
        total = time.perf_counter() - began
        if step > 0:
            times.append((total, total - parts["finish"] - parts["optimizer"], parts["finish"], parts["optimizer"]))
    return times


def time_reductions(ctx, settings: VerifySettings, bucket_sizes: list[int], repeats: int):
    """Seconds per reduction of the model's whole gradient over dp4, by how it is split into
    collectives; interleaved over `repeats` rounds, each preceded by a barrier."""
    state = ctx.parallel_state(dp=4)
    if state is None:
        return None
    chunk = build_runner(settings, parse_layout("dp4"), state).chunks[0]
    ways = {"per parameter, one all-reduce at a time": DataParallelGrads(chunk, state.dp_group, bucket_size=1)}
    ways["per parameter, all launched then waited"] = ways["per parameter, one all-reduce at a time"]
    total = sum(p.numel() for p in chunk.parameters())
    for size in (s for s in bucket_sizes if s < total):  # larger ones are the flat buffer
        ways[f"buckets of {size:,} elements"] = DataParallelGrads(chunk, state.dp_group, bucket_size=size)
    ways["one flat buffer"] = DataParallelGrads(chunk, state.dp_group, bucket_size=total)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, buffer in ways.items():
            dist.barrier(group=state.dp_group)
            began = time.perf_counter()
            if name.endswith("one all-reduce at a time"):
                for bucket in buffer.buckets:
                    dist.all_reduce(buffer.grad_data[bucket.start:bucket.end], group=state.dp_group)
            else:
                buffer.finish()
            times[name].append(time.perf_counter() - began)
    return {name: (len(buffer.buckets), found) for (name, buffer), found in zip(ways.items(), times.values())}


def print_reductions(per_rank: list[dict], repeats: int) -> None:
    names = list(per_rank[0])
    slowest = {name: [max(t) for t in zip(*(r[name][1] for r in per_rank))] for name in names}  # per round
    medians = {name: statistics.median(slowest[name]) * 1e3 for name in names}
    flat = medians["one flat buffer"]
    print(f"\ngradient reduction alone, dp4, {repeats} rounds (median of the slowest rank)")
    header = f"{'reduction':<44} {'collectives':>11} {'ms':>8} {'vs flat':>8}"
    print(header)
    print("-" * len(header))
    for name in names:
        print(f"{name:<44} {per_rank[0][name][0]:>11} {medians[name]:>8.1f} {medians[name] / flat:>8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all variants")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round (after 1 warm-up)")
    parser.add_argument("--bucket-sizes", type=int, nargs="+", default=[1_000_000, 40_000_000],
                        help="--ddp-bucket-size values in elements; the largest is the baseline's")
    parser.add_argument("--reduction-repeats", type=int, default=20,
                        help="rounds of the reduction-alone table (0: skip it)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-attention-heads", type=int, default=8)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=2, help="per dp rank (gradient accumulation)")
    args = parser.parse_args()

    config = ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size,
                         num_attention_heads=args.num_attention_heads, seq_length=args.seq_length,
                         vocab_size=args.vocab_size, hidden_dropout=0.0, attention_dropout=0.0)
    all_variants = variants(sorted(args.bucket_sizes))
    baseline = next(v for v in all_variants if v.layout == "dp4" and not v.overlap
                    and v.bucket_size == max(args.bucket_sizes))
    measured: dict[str, list[tuple]] = {v.name: [] for v in all_variants}
    began = time.perf_counter()
    reductions = None
    with RankPool(4) as pool:
        if args.reduction_repeats > 0:
            settings = VerifySettings("gpt", config, micro_batches=4, micro_batch_size=1)
            reductions = pool.run(time_reductions, settings, sorted(args.bucket_sizes), args.reduction_repeats)
        for repeat in range(args.repeats):
            shift = repeat % len(all_variants)
            for variant in all_variants[shift:] + all_variants[:shift]:
                dp = parse_layout(variant.layout).dp
                settings = VerifySettings("gpt", config, micro_batches=args.micro_batches * dp,
                                          micro_batch_size=args.micro_batch_size, ddp_bucket_size=variant.bucket_size)
                per_rank = [r for r in pool.run(time_steps, settings, variant, args.steps) if r is not None]
                measured[variant.name].extend(max(step) for step in zip(*per_rank))  # the slowest rank

    params = _count_parameters(config)
    if args.repeats > 0:
        print_steps(args, config, params, all_variants, baseline, measured, time.perf_counter() - began)
    if reductions is not None:
        print_reductions([r for r in reductions if r is not None], args.reduction_repeats)


def print_steps(args, config: ModelConfig, params: int, all_variants: list[Variant], baseline: Variant,
                measured: dict[str, list[tuple]], seconds: float) -> None:
    print(f"GPT {params / 1e6:.2f}M parameters (hidden {args.hidden_size}, {args.num_layers} layers, seq "
          f"{args.seq_length}, vocab {args.vocab_size}), fp32; per dp rank {args.micro_batches} micro-batches of "
          f"{args.micro_batch_size}; {args.repeats} rounds x {args.steps} steps; "
          f"{seconds:.0f} s")
    reference = statistics.median(t[0] for t in measured[baseline.name])
    header = (f"{'variant':<44} {'ms/step':>8} {'vs base':>8} {'fwd+bwd':>8} {'finish':>8} {'optim':>8}")
    print(header)
    print("-" * len(header))
    for variant in all_variants:
        columns = [statistics.median(t[i] for t in measured[variant.name]) * 1e3 for i in range(4)]
        print(f"{variant.name:<44} {columns[0]:>8.1f} {columns[0] / (reference * 1e3):>8.2f} "
              f"{columns[1]:>8.1f} {columns[2]:>8.1f} {columns[3]:>8.1f}")
    print(f"base: {baseline.name}; medians of the slowest rank's time per step; finish = waiting for the dp reduction")


def _count_parameters(config: ModelConfig) -> int:
    runner = build_runner(VerifySettings("gpt", config), Layout())
    return sum(p.numel() for chunk in runner.chunks for p in chunk.parameters())


if __name__ == "__main__":
    main()
