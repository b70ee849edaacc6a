"""Counting the activations autograd keeps for backward, to compare them with the paper's formulas.

`SavedTensorMeter` hooks `torch.autograd.graph.saved_tensors_hooks` over a region and records
every distinct storage that a saved tensor lives in: views of one storage (q, k and v of the fused
qkv projection, a transposed weight) count once, at the storage's full size, because that is what
stays allocated. Parameters are not activations: their storages are left out.

`layer_activation_bytes` runs a block of transformer layers forward once, as training would (same
dropout, recompute and sequence parallelism), and returns the bytes kept per layer on this rank.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch

from megalith.config import ModelConfig
from megalith.models.parallel_context import ParallelContext
from megalith.models.transformer import TransformerBlock, TransformerLayer
from megalith.parallel.layers import normal_init
from megalith.parallel.rng import model_parallel_rng_tracker


class SavedTensorMeter:
    """The storages saved for backward inside `counting()`, by address, with their sizes."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self.storages: dict[int, int] = {}

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        if address not in self._excluded:
            self.storages[address] = storage.nbytes()
        return tensor

    @contextlib.contextmanager
    def counting(self) -> Iterator[SavedTensorMeter]:
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor):
            yield self

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())


def layer_activation_bytes(config: ModelConfig, ctx: ParallelContext, micro_batch_size: int,
                           seed: int = 1234) -> float:
    """Bytes kept for backward per transformer layer on this rank: `config.num_layers` GPT layers
    (causal self-attention) run forward in training mode on a `[s, b, h]` input (`[s/tp, b, h]`
    under sequence parallelism), divided by the layer count."""
    torch.manual_seed(seed)
    if ctx.rng_tracker is None:  # a copy: the caller's context stays as it was
        ctx = replace(ctx, rng_tracker=model_parallel_rng_tracker(seed, ctx.tp_rank, device=ctx.device or "cpu"))
    init = normal_init(config.init_method_std)
    layers = {i: TransformerLayer(config, ctx, init, init, layer_index=i) for i in range(config.num_layers)}
    block = TransformerBlock(config, ctx, layers, final_norm=False).train()
    tokens = config.seq_length // (ctx.tp_size if ctx.sequence_parallel else 1)
    x = torch.randn(tokens, micro_batch_size, config.hidden_size, dtype=config.torch_dtype,
                    device=ctx.device, requires_grad=True)
    meter = SavedTensorMeter(exclude=block.parameters())
    with meter.counting():
        out = block(x)
    out.float().sum().backward()  # the graph is whole: the hooks took nothing from backward
    return meter.bytes / config.num_layers


@dataclass(frozen=True)
class ActivationCase:
    """One layout of the comparison: tp size, sequence parallelism, recompute granularity."""

    tp: int
    sequence_parallel: bool = False
    recompute: str | None = None

    @property
    def name(self) -> str:
        return f"tp{self.tp}{'.sp' if self.sequence_parallel else ''}" + (f" {self.recompute}" if self.recompute else "")


def measure_cases(rank_ctx, base: ModelConfig, micro_batch_size: int, cases: list[ActivationCase]) -> list | None:
    """On every rank of a RankPool: each case's bytes per layer on this rank (None where the rank
    is outside the case's tp group), as [(case, bytes)]. Every rank walks the cases in one order
    (group creation is collective)."""
    results = []
    for case in cases:
        state = rank_ctx.parallel_state(tp=case.tp, dp=1)
        if state is None:
            results.append((case, None))
            continue
        extra = {"recompute_method": "uniform", "recompute_num_layers": 1} if case.recompute == "full" else {}
        config = replace(base, recompute_granularity=case.recompute, **extra)
        ctx = ParallelContext(tp_group=state.tp_group, sequence_parallel=case.sequence_parallel, device=state.device)
        results.append((case, layer_activation_bytes(config, ctx, micro_batch_size)))
    return results
