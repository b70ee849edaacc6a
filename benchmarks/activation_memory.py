"""Activations kept for backward per transformer layer, measured, beside Korthikanti et al. 2022.

    .venv/bin/python benchmarks/activation_memory.py
    .venv/bin/python benchmarks/activation_memory.py --seq-length 256 --hidden-size 256 --heads 8

Two bf16 GPT layers with dropout run forward on a RankPool of 4 CPU ranks at tp 1, 2 and 4,
without and with sequence parallelism, under no, selective and full recompute. Each rank counts
the storages autograd saves (megalith.training.activation_meter); the table shows bytes per
layer on one rank beside the paper's formula (megalith.plan.memory). docs/memory.md has the
measured table and explains the small remainder (the causal mask and the norms' statistics).
"""

from __future__ import annotations

import argparse

from megalith.config import ModelConfig
from megalith.models.registry import BUILTIN_MODELS
from megalith.parallel.spawn import RankPool
from megalith.plan.memory import activation_bytes_per_layer
from megalith.training.activation_meter import ActivationCase, measure_cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-length", type=int, default=64)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--attention-backend", default="unfused", help="unfused (the paper's) or auto (torch SDPA)")
    args = parser.parse_args()
    s, b, h, a = args.seq_length, args.micro_batch_size, args.hidden_size, args.heads
    config = ModelConfig(**{**BUILTIN_MODELS["gpt"].defaults, "num_layers": 2, "hidden_size": h,
                            "num_attention_heads": a, "seq_length": s, "params_dtype": "bf16",
                            "attention_backend": args.attention_backend, "hidden_dropout": 0.1,
                            "attention_dropout": 0.1})
    cases = [ActivationCase(tp, sp, recompute)
             for tp, sp in ((1, False), (2, False), (2, True), (4, False), (4, True))
             for recompute in (None, "selective", "full")]
    with RankPool(4) as pool:
        per_rank = pool.run(measure_cases, config, b, cases)
    measured = {}
    for rows in per_rank:
        for case, nbytes in rows:
            if nbytes is not None:
                measured[case] = max(measured.get(case, 0), nbytes)
    print(f"s={s} b={b} h={h} a={a}, bf16, dropout 0.1, attention {args.attention_backend}; bytes per layer on one rank")
    print(f"{'layout':<10} {'recompute':<10} {'measured':>12} {'formula':>12} {'ratio':>7}")
    for case in cases:
        formula = activation_bytes_per_layer(s, b, h, a, tp=case.tp, sequence_parallel=case.sequence_parallel,
                                             recompute=case.recompute,
                                             attention_scores=args.attention_backend == "unfused")
        got = measured[case]
        print(f"{case.name.split()[0]:<10} {case.recompute or '-':<10} {got:>12,.0f} {formula:>12,.0f} "
              f"{got / formula:>7.3f}")


if __name__ == "__main__":
    main()
