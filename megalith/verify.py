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

The loss of a step is the mean over the global batch's sequences of each sequence's mean over
its loss-masked tokens (DESIGN.md: one definition of a step's loss): every micro-batch adds
its share, so pipeline micro-batching (and later data-parallel splitting) cannot change it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalith.config import Layout, ModelConfig
from megalith.errors import ConfigError
from megalith.models.parallel_context import ParallelContext, StageSpec
from megalith.models.registry import ModelSpec, get_model_spec
from megalith.parallel.layers import gather_full_parameter
from megalith.parallel.pipeline.actions import stage_of
from megalith.parallel.pipeline.engine import PipelineEngine
from megalith.parallel.pipeline.schedules import build_schedule, validate_schedule_args
from megalith.parallel.pipeline.split import split_layers
from megalith.parallel.rng import model_parallel_rng_tracker
from megalith.parallel.spawn import RankPool
from megalith.testing import FP32_RELATIVE_TOLERANCE, relative_error

PADDED_VOCAB_PARAMETERS = ("word_embeddings.weight", "output_layer.weight", "word_embeddings_for_head.weight")
ALIASES = {"word_embeddings_for_head.weight": "embedding.word_embeddings.weight"}  # the tied copy


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
    schedule: str | None = None  # None: no-pipelining at pp 1, 1f1b, interleaved-1f1b with vpp > 1
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None

    @property
    def global_batch_size(self) -> int:
        return self.micro_batches * self.micro_batch_size


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


@dataclass(frozen=True)
class RunPlan:
    """How one layout runs: schedule, micro-batching and every stage's layers."""

    layout: Layout
    schedule: str
    microbatches: int
    micro_batch_size: int
    stage_layers: list[list[int]]


def plan(settings: VerifySettings, layout: Layout) -> RunPlan:
    """Check a layout against the model and the batch before any rank starts; one line if it fails."""
    config = layout.apply_to(settings.config)
    config.check_parallel(layout.parallel_config())
    microbatches = layout.microbatches or settings.micro_batches
    if settings.global_batch_size % microbatches != 0:
        raise ConfigError(
            f"layout {layout}: the global batch of {settings.global_batch_size} sequences does not split into "
            f"{microbatches} micro-batches; use an mb token that divides {settings.global_batch_size}"
        )
    uneven = layout.pp > 1
    stage_layers = split_layers(
        config.num_layers, layout.pp, layout.vpp,
        settings.decoder_first_pipeline_num_layers if uneven else None,
        settings.decoder_last_pipeline_num_layers if uneven else None,
    )
    schedule = settings.schedule or default_schedule(layout.pp, layout.vpp)
    validate_schedule_args(schedule, layout.pp, layout.vpp, microbatches)
    return RunPlan(layout, schedule, microbatches, settings.global_batch_size // microbatches, stage_layers)


def default_schedule(pp: int, vpp: int) -> str:
    if pp == 1:
        return "no-pipelining"
    return "1f1b" if vpp == 1 else "interleaved-1f1b"


def global_batch(settings: VerifySettings, spec: ModelSpec, step: int) -> dict:
    """The same global batch for every layout: seeded by (seed, step); micro-batches slice it."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    return spec.make_batch(settings.config, settings.global_batch_size, generator)


def sequence_mean_loss(per_token: torch.Tensor, batch: dict, global_batch_size: int) -> torch.Tensor:
    """This micro-batch's share of the step loss: the step loss is the mean over the global
    batch's sequences of each sequence's mean over its loss-masked tokens, so neither pipeline
    micro-batching nor (later) data-parallel splitting changes it."""
    mask = batch["loss_mask"]
    per_sequence = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_sequence.sum() / global_batch_size


def train(settings: VerifySettings, layout: Layout | None = None, state=None, step_hook=None):
    """Train for settings.steps AdamW steps on this rank's stages; return (per-step losses, first
    gradients, final parameters), tensors gathered over tp. Without a layout: one process.
    `step_hook(step, StepResult)`, if given, sees every step with its recorded timeline."""
    spec = get_model_spec(settings.model)
    layout = layout or Layout()
    run = plan(settings, layout)
    config = layout.apply_to(settings.config)
    pp_rank = state.pp_rank if state is not None else 0
    tp_group = state.tp_group if state is not None else None
    ctx = ParallelContext(
        tp_group, layout.sequence_parallel, model_parallel_rng_tracker(settings.seed, state.tp_rank if state else 0),
        embedding_group=state.embedding_group if state is not None else None,
    )
    stages = len(run.stage_layers)
    chunks = []
    for chunk in range(layout.vpp):
        index = stage_of(pp_rank, chunk, layout.pp)
        chunks.append(spec.build(config, ctx, settings.seed, StageSpec(index, stages, tuple(run.stage_layers[index]))))
    params = [p for chunk in chunks for p in chunk.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, eps=settings.adam_eps)
    engine = PipelineEngine(chunks, rank=pp_rank, pp=layout.pp, pp_group=state.pp_group if state is not None else None,
                            micro_batch_size=run.micro_batch_size, dtype=config.torch_dtype,
                            record=step_hook is not None)
    actions = build_schedule(run.schedule, layout.pp, layout.vpp, run.microbatches, pp_rank)

    def loss_fn(per_token, batch):
        return sequence_mean_loss(per_token, batch, settings.global_batch_size)

    losses, first_grads = [], None
    for step in range(settings.steps):
        optimizer.zero_grad()
        data = global_batch(settings, spec, step)
        size = run.micro_batch_size

        def micro(index, data=data):
            return {key: value[index * size:(index + 1) * size] for key, value in data.items()}

        result = engine.step(actions, micro, loss_fn)
        if step_hook is not None:
            step_hook(step, result)
        for chunk in chunks:
            chunk.finish_grad_sync()
        if first_grads is None:
            first_grads = full_tensors(chunks, config.vocab_size, tp_group, grads=True)
        optimizer.step()
        losses.append(result.loss)
    return losses, first_grads, full_tensors(chunks, config.vocab_size, tp_group)


def full_tensors(chunks, vocab_size: int, tp_group, grads: bool = False) -> dict[str, torch.Tensor]:
    """This rank's parameters (or their gradients) as one process would hold them (a collective over tp)."""
    full = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            tensor = gather_full_parameter(param, tp_group, param.grad if grads else None)
            full[name] = tensor[:vocab_size] if name.endswith(PADDED_VOCAB_PARAMETERS) else tensor
    return full


def _train_on_rank(ctx, settings: VerifySettings, layout: Layout | None):
    if layout is None:
        return train(settings) if ctx.rank == 0 else None  # the reference: no process group at all
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp)
    if state.dp_rank != 0:
        return None  # the pool's other copies of the layout would only repeat the work
    result = train(settings, layout, state)
    return result if state.tp_rank == 0 else None


def merge_ranks(results: list) -> tuple:
    """One (losses, grads, params) from the pipeline ranks' parts (each rank holds some stages)."""
    parts = [r for r in results if r is not None]
    grads, params = {}, {}
    for _, rank_grads, rank_params in parts:
        grads.update(rank_grads)
        params.update(rank_params)
    return parts[0][0], grads, params


def compare(layout: str, reference, candidate) -> LayoutResult:
    """Relative differences; a tied embedding's copy on the last stage is held to the original."""
    (ref_losses, ref_grads, ref_params), (losses, grads, params) = reference, candidate
    missing = sorted(set(ref_params) - set(params))
    if missing:
        raise RuntimeError(f"layout {layout} lost parameters: {', '.join(missing)}")
    loss_error = relative_error(torch.tensor(losses), torch.tensor(ref_losses))

    def reference_of(name: str) -> str:
        return ALIASES.get(name, name)

    grad_errors = {name: relative_error(grads[name], ref_grads[reference_of(name)]) for name in grads}
    worst_grad = max(grad_errors, key=grad_errors.get)
    param_scale = max(p.abs().max().item() for p in ref_params.values())
    param_diffs = {name: (params[name] - ref_params[reference_of(name)]).abs().max().item() for name in params}
    worst_param = max(param_diffs, key=param_diffs.get)
    return LayoutResult(layout, losses, loss_error, grad_errors[worst_grad], worst_grad,
                        param_diffs[worst_param] / param_scale, worst_param)


def check_layouts(settings: VerifySettings, layouts: list[Layout]) -> None:
    """Every layout's rules, before any rank starts."""
    get_model_spec(settings.model)
    for layout in layouts:
        plan(settings, layout)


def run_verify(settings: VerifySettings, layouts: list[Layout], pool: RankPool | None = None) -> list[LayoutResult]:
    """Train the reference and every layout on a pool of max(world size) ranks; compare."""
    check_layouts(settings, layouts)
    world = max(layout.world_size for layout in layouts)
    own_pool = pool is None
    pool = pool or RankPool(world)
    try:
        if pool.world_size < world:
            raise ValueError(f"a pool of {pool.world_size} ranks cannot run a layout of {world}")
        reference = pool.run(_train_on_rank, settings, None)[0]
        return [compare(str(layout), reference, merge_ranks(pool.run(_train_on_rank, settings, layout)))
                for layout in layouts]
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
