"""What megalith's machinery costs on one process: a training step of GPTModel vs plain PyTorch.

Both models hold the same weights and see the same batch; repetitions alternate between them
(megalith, plain, megalith, ...) so drift in the machine (thermal, other load) hits both alike,
and medians ignore the odd slow step.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.models.plain_gpt import PlainGPT, load_megalith_state_dict

DEFAULT_BENCH_CONFIG = ModelConfig(
    num_layers=4, hidden_size=256, num_attention_heads=8, seq_length=256, vocab_size=8192,
    hidden_dropout=0.0, attention_dropout=0.0,
)


@dataclass
class OverheadResult:
    megalith_ms: float
    plain_ms: float
    ratio: float
    repeats: int


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor,
          labels: torch.Tensor) -> float:
    """Milliseconds of one full step: zero_grad, forward, mean loss, backward, AdamW step."""
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids, labels).mean()
    loss.backward()
    optimizer.step()
    return (time.perf_counter() - start) * 1e3


def measure_overhead(config: ModelConfig, micro_batch_size: int = 4, repeats: int = 10, warmup: int = 3,
                     seed: int = 0) -> OverheadResult:
    """Median step time of megalith's GPTModel and of PlainGPT with the same weights and batch."""
    from megalith.models.gpt import GPTModel  # imported late: the benchmark is optional tooling

    config = replace(config, hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(seed)
    megalith_model = GPTModel(config)
    plain_model = PlainGPT(config)
    load_megalith_state_dict(plain_model, megalith_model.state_dict())
    generator = torch.Generator().manual_seed(seed)
    shape = (micro_batch_size, config.seq_length)
    input_ids = torch.randint(config.vocab_size, shape, generator=generator)
    labels = torch.randint(config.vocab_size, shape, generator=generator)

    runs = []
    for model in (megalith_model, plain_model):
        model.train()
        runs.append((model, torch.optim.AdamW(model.parameters(), lr=1e-4), []))
    for i in range(warmup + repeats):
        for model, optimizer, times in runs:
            elapsed = _step(model, optimizer, input_ids, labels)
            if i >= warmup:
                times.append(elapsed)
    megalith_ms = statistics.median(runs[0][2])
    plain_ms = statistics.median(runs[1][2])
    return OverheadResult(megalith_ms, plain_ms, megalith_ms / plain_ms, repeats)


def format_overhead(result: OverheadResult, config: ModelConfig) -> str:
    """A few human-readable lines, the ratio last."""
    return "\n".join([
        f"model: {config.num_layers} layers, hidden {config.hidden_size}, {config.num_attention_heads} heads, "
        f"seq {config.seq_length}, vocab {config.vocab_size}",
        f"median step over {result.repeats} repeats (single process, {torch.get_num_threads()} threads)",
        f"  megalith GPTModel: {result.megalith_ms:.2f} ms",
        f"  plain PyTorch:     {result.plain_ms:.2f} ms",
        f"overhead ratio megalith/plain: {result.ratio:.3f}",
    ])
