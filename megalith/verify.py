"""`megalith verify`: train a model under several layouts and prove each equal to one process.

Every layout trains the same model (same init seed, same batches, AdamW) on CPU ranks of one
pool; the reference is the same code with no process group at all. Per layout the table gives
three relative differences from the reference (tensors gathered over tp, vocabulary padding
dropped), and PASS when all are below 1e-5:

- losses: the per-step losses;
- grads: each tensor's gradient after the first step's backward, worst tensor. Adam is blind
  to the scale of a gradient, so a gradient counted twice would pass the other two checks;
- params: the final parameter vector as a whole (max |difference| / max |parameter|). Per
  tensor this is ill-posed: some gradients are zero by mathematics (a key bias cannot change
  a softmax), and Adam turns their rounding noise into lr-sized steps in any implementation.

Adam's epsilon defaults to 1e-6 here (Megatron trains with 1e-8): an element whose gradient is
near epsilon gets an update that swings by up to lr / (4 eps) times its fp32 rounding noise —
about 1e-5 of the parameter scale at 1e-8 whatever the layout — which would drown the
comparison in the optimizer's conditioning rather than test the parallel computation.

The loss of a step is the mean over micro-batches of each micro-batch's mean over its
loss-masked tokens (DESIGN.md: one definition of a step's loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalith.config import Layout, ModelConfig
from megalith.models.parallel_context import ParallelContext
from megalith.models.registry import ModelSpec, get_model_spec
from megalith.parallel.layers import gather_full_parameter
from megalith.parallel.rng import model_parallel_rng_tracker
from megalith.parallel.spawn import RankPool
from megalith.testing import FP32_RELATIVE_TOLERANCE, relative_error

PADDED_VOCAB_PARAMETERS = ("word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class VerifySettings:
    model: str
    config: ModelConfig
    steps: int = 3
    micro_batches: int = 2
    micro_batch_size: int = 2
    lr: float = 1e-3
    adam_eps: float = 1e-6
    seed: int = 1234


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    losses: list[float]
    loss_error: float
    grad_error: float
    worst_grad: str
    param_error: float
    worst_param: str

    @property
    def passed(self) -> bool:
        return max(self.loss_error, self.grad_error, self.param_error) < FP32_RELATIVE_TOLERANCE


def masked_mean(loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token loss over the tokens the mask keeps."""
    return (loss * loss_mask).sum() / loss_mask.sum().clamp(min=1.0)


def micro_batch(settings: VerifySettings, spec: ModelSpec, step: int, index: int) -> dict:
    """The same micro-batch for every layout: seeded by (seed, step, micro-batch)."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step * 1_009 + index)
    return spec.make_batch(settings.config, settings.micro_batch_size, generator)


def train(settings: VerifySettings, layout: Layout | None = None, tp_group=None, tp_rank: int = 0):
    """Train for settings.steps AdamW steps; return (per-step losses, first gradients, final parameters)."""
    spec = get_model_spec(settings.model)
    config = settings.config if layout is None else layout.apply_to(settings.config)
    sequence_parallel = layout is not None and layout.sequence_parallel
    ctx = ParallelContext(tp_group, sequence_parallel, model_parallel_rng_tracker(settings.seed, tp_rank))
    model = spec.build(config, ctx, settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, eps=settings.adam_eps)
    losses, first_grads = [], None
    for step in range(settings.steps):
        optimizer.zero_grad()
        step_loss = 0.0
        for index in range(settings.micro_batches):
            batch = micro_batch(settings, spec, step, index)
            loss_mask = batch.pop("loss_mask")
            loss = masked_mean(model(**batch), loss_mask) / settings.micro_batches
            loss.backward()
            step_loss += loss.item()
        model.finish_grad_sync()
        if first_grads is None:
            first_grads = full_tensors(model, config.vocab_size, tp_group, grads=True)
        optimizer.step()
        losses.append(step_loss)
    return losses, first_grads, full_tensors(model, config.vocab_size, tp_group)


def full_tensors(model: torch.nn.Module, vocab_size: int, tp_group, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its gradient) as one process would hold it (a collective over tp)."""
    full = {}
    for name, param in model.named_parameters():
        tensor = gather_full_parameter(param, tp_group, param.grad if grads else None)
        full[name] = tensor[:vocab_size] if name.endswith(PADDED_VOCAB_PARAMETERS) else tensor
    return full


def _train_on_rank(ctx, settings: VerifySettings, layout: Layout | None):
    if layout is None:
        return train(settings) if ctx.rank == 0 else None  # the reference: no process group at all
    state = ctx.parallel_state(tp=layout.tp)
    if ctx.rank >= layout.world_size:
        return None  # a second copy of the layout would only repeat the work
    result = train(settings, layout, state.tp_group, state.tp_rank)
    return result if ctx.rank == 0 else None


def compare(layout: str, reference, candidate) -> LayoutResult:
    (ref_losses, ref_grads, ref_params), (losses, grads, params) = reference, candidate
    loss_error = relative_error(torch.tensor(losses), torch.tensor(ref_losses))
    grad_errors = {name: relative_error(grads[name], ref_grads[name]) for name in ref_grads}
    worst_grad = max(grad_errors, key=grad_errors.get)
    param_scale = max(p.abs().max().item() for p in ref_params.values())
    param_diffs = {name: (params[name] - ref_params[name]).abs().max().item() for name in ref_params}
    worst_param = max(param_diffs, key=param_diffs.get)
    return LayoutResult(layout, losses, loss_error, grad_errors[worst_grad], worst_grad,
                        param_diffs[worst_param] / param_scale, worst_param)


def check_layouts(settings: VerifySettings, layouts: list[Layout]) -> None:
    """Every layout's shape rules, before any rank starts."""
    for layout in layouts:
        layout.apply_to(settings.config).check_parallel(layout.parallel_config())


def run_verify(settings: VerifySettings, layouts: list[Layout], pool: RankPool | None = None) -> list[LayoutResult]:
    """Train the reference and every layout on a pool of max(world size) ranks; compare."""
    get_model_spec(settings.model)
    check_layouts(settings, layouts)
    world = max(layout.world_size for layout in layouts)
    own_pool = pool is None
    pool = pool or RankPool(world)
    try:
        if pool.world_size < world:
            raise ValueError(f"a pool of {pool.world_size} ranks cannot run a layout of {world}")
        reference = pool.run(_train_on_rank, settings, None)[0]
        return [compare(str(layout), reference, pool.run(_train_on_rank, settings, layout)[0]) for layout in layouts]
    finally:
        if own_pool:
            pool.close()


def format_table(results: list[LayoutResult]) -> str:
    header = (f"{'layout':<28} {'first loss':>10} {'last loss':>10} {'loss rel diff':>14} "
              f"{'grad rel diff':>14} {'param rel diff':>15}  result")
    rows = [header, "-" * len(header)]
    for r in results:
        verdict = "PASS"
        if not r.passed:
            verdict = f"FAIL (worst grad: {r.worst_grad}; worst param: {r.worst_param})"
        rows.append(f"{r.layout:<28} {r.losses[0]:>10.4f} {r.losses[-1]:>10.4f} {r.loss_error:>14.2e} "
                    f"{r.grad_error:>14.2e} {r.param_error:>15.2e}  {verdict}")
    return "\n".join(rows)
