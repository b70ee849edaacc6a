"""Models by name: how to build one, and what a batch for it looks like.

`megalith verify --model NAME` and `megalith pretrain --model NAME` look models up
here. `build(config, ctx, init_seed, stage)` gives one pipeline stage (StageSpec) of the model:
a module with the pipeline engine's interface (`pipeline_forward`, `pipeline_shapes`) whose
last stage returns the per-token loss `[b, s]`, and `finish_grad_sync()` for what sequence
parallelism and tied embeddings leave to be summed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.gpt import GPTModel
from megalith.models.parallel_context import ParallelContext, StageSpec

BuildModel = Callable[[ModelConfig, ParallelContext, int, StageSpec], nn.Module]
MakeBatch = Callable[[ModelConfig, int, torch.Generator], dict]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    build: BuildModel
    make_batch: MakeBatch
    defaults: dict = field(default_factory=dict)  # ModelConfig fields for small CPU runs


def gpt_batch(config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict:
    """A learnable token stream (next = 3 * token + 1 mod V, with 10% noise) and a loss mask
    that drops about 10% of the tokens, so masking is exercised and the loss can fall."""
    vocab, seq = config.vocab_size, config.seq_length
    tokens = [torch.randint(0, vocab, (batch_size,), generator=generator)]
    for _ in range(seq):
        follow = (tokens[-1] * 3 + 1) % vocab
        noise = torch.randint(0, vocab, (batch_size,), generator=generator)
        keep = torch.rand(batch_size, generator=generator) >= 0.1
        tokens.append(torch.where(keep, follow, noise))
    stream = torch.stack(tokens, dim=1)  # [b, s + 1]
    loss_mask = (torch.rand(batch_size, seq, generator=generator) >= 0.1).float()
    return {"input_ids": stream[:, :-1], "labels": stream[:, 1:], "loss_mask": loss_mask}


def _build_gpt(config: ModelConfig, ctx: ParallelContext, init_seed: int, stage: StageSpec) -> nn.Module:
    return GPTModel(config, ctx, init_seed, stage)


BUILTIN_MODELS = MappingProxyType({
    "gpt": ModelSpec(
        name="gpt",
        description="decoder-only GPT (learned or rotary positions, GQA, GELU or SwiGLU, LayerNorm or RMSNorm)",
        build=_build_gpt,
        make_batch=gpt_batch,
        defaults=dict(num_layers=8, hidden_size=64, num_attention_heads=8, seq_length=32, vocab_size=300,
                      hidden_dropout=0.0, attention_dropout=0.0),
    ),
})


def get_model_spec(name: str) -> ModelSpec:
    if name not in BUILTIN_MODELS:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(BUILTIN_MODELS)}")
    return BUILTIN_MODELS[name]
