"""`megalith demo`: train a tiny tensor-parallel LM under several layouts, compare with one process.

Every layout trains the same model (same seed, same data, AdamW) on CPU ranks of one pool;
the reference is the same code with no process group at all. For each layout the demo reports
the largest relative difference of the per-step losses and of the final parameters
(gathered over tp) from the reference, and PASS when both are below 1e-5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megalith.config import Layout
from megalith.models.tiny_lm import TinyLM, TinyLMConfig
from megalith.parallel.comm import group_size
from megalith.parallel.spawn import RankPool
from megalith.testing import FP32_RELATIVE_TOLERANCE, relative_error


@dataclass(frozen=True)
class DemoSettings:
    model: TinyLMConfig = field(default_factory=TinyLMConfig)
    batch_size: int = 4
    steps: int = 10
    lr: float = 1e-2
    seed: int = 1234


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    losses: list[float]
    loss_error: float
    param_error: float

    @property
    def passed(self) -> bool:
        return self.loss_error < FP32_RELATIVE_TOLERANCE and self.param_error < FP32_RELATIVE_TOLERANCE


def batch(settings: DemoSettings, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A learnable stream (next = 3 * token + 1 mod V) from random starts, identical on every rank."""
    vocab, seq = settings.model.vocab_size, settings.model.seq_length
    generator = torch.Generator().manual_seed(settings.seed * 1000 + step)
    tokens = [torch.randint(0, vocab, (settings.batch_size,), generator=generator)]
    for _ in range(seq):
        tokens.append((tokens[-1] * 3 + 1) % vocab)
    stream = torch.stack(tokens)  # [s + 1, b]
    return stream[:-1], stream[1:]


def _full_parameters(model: TinyLM) -> dict[str, torch.Tensor]:
    """Every parameter as one process would hold it: shards gathered, vocab padding dropped."""
    full = {}
    for name, param in model.named_parameters():
        dim = getattr(param, "tensor_parallel_dim", None)
        tensor = param.detach()
        if dim is not None and group_size(model.tp_group) > 1:
            parts = [torch.empty_like(tensor) for _ in range(group_size(model.tp_group))]
            dist.all_gather(parts, tensor.contiguous(), group=model.tp_group)
            tensor = torch.cat(parts, dim=dim)
        if name == "embedding.weight":
            tensor = tensor[: model.config.vocab_size]
        full[name] = tensor.clone()
    return full


def train(settings: DemoSettings, tp_group=None, sequence_parallel: bool = False):
    """Train for settings.steps AdamW steps; return (losses, full parameters)."""
    torch.manual_seed(settings.seed)
    model = TinyLM(settings.model, tp_group, sequence_parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    losses = []
    for step in range(settings.steps):
        ids, labels = batch(settings, step)
        loss = model(ids, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        model.finish_grad_sync()
        optimizer.step()
        losses.append(loss.item())
    return losses, _full_parameters(model)


def _train_on_rank(ctx, settings: DemoSettings, layout: Layout | None):
    if layout is None:
        result = train(settings)  # the one-process reference: no process group involved
    else:
        state = ctx.parallel_state(tp=layout.tp)
        result = train(settings, state.tp_group, layout.sequence_parallel)
    return result if ctx.rank == 0 else None


def compare(layout: str, reference, candidate) -> LayoutResult:
    (ref_losses, ref_params), (losses, params) = reference, candidate
    loss_error = relative_error(torch.tensor(losses), torch.tensor(ref_losses))
    param_error = max(relative_error(params[name], ref_params[name]) for name in ref_params)
    return LayoutResult(layout, losses, loss_error, param_error)


def run_demo(layouts: list[Layout], settings: DemoSettings, pool: RankPool | None = None) -> list[LayoutResult]:
    """Train under each layout on a pool of max(tp) ranks and compare with the reference."""
    for layout in layouts:
        layout.parallel_config().check_model_shapes(
            hidden_size=settings.model.hidden_size,
            ffn_hidden_size=settings.model.ffn_hidden_size,
            seq_length=settings.model.seq_length,
        )
    world = max(layout.world_size for layout in layouts)
    own_pool = pool is None
    pool = pool or RankPool(world)
    try:
        if pool.world_size % world != 0:
            raise ValueError(f"a pool of {pool.world_size} ranks cannot hold a layout of {world}")
        reference = pool.run(_train_on_rank, settings, None)[0]
        return [compare(str(layout), reference, pool.run(_train_on_rank, settings, layout)[0]) for layout in layouts]
    finally:
        if own_pool:
            pool.close()


def format_table(results: list[LayoutResult]) -> str:
    header = f"{'layout':<10} {'first loss':>10} {'last loss':>10} {'loss rel diff':>14} {'param rel diff':>15}  result"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(
            f"{r.layout:<10} {r.losses[0]:>10.4f} {r.losses[-1]:>10.4f} {r.loss_error:>14.2e} "
            f"{r.param_error:>15.2e}  {'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(rows)
