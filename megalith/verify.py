"""`megalith verify`: train a model under several layouts and prove each equal to one process.

Every layout trains the same model (same init seed, same global batches) with the real
optimizer step of `megalith pretrain` (data-parallel buffers and buckets, ZeRO-1/2/3 with `zero1|2|3`,
global-norm clipping, LR warm-up and decay, weight decay, loss scaling for fp16) on CPU ranks
of one pool; the reference is the same code in one process with no process group at all, in
the layout's precision. Per layout the table gives four relative differences from the
reference (tensors gathered over tp and dp, vocabulary padding dropped), and PASS when each is
below its bound (1e-5 in fp32; megalith.testing.RELATIVE_TOLERANCES for bf16 and fp16):

- losses: the per-step losses;
- norms: the per-step global gradient norms (each parameter counted once across tp, pp, dp);
- grads: each tensor's reduced gradient after the first step's backward, worst tensor. Adam is
  blind to the scale of a gradient, so a gradient counted twice would pass the other checks;
- params: the final parameter vector as a whole (max |difference| / max |parameter|). Per
  tensor this is ill-posed: some gradients are zero by mathematics (a key bias cannot change
  a softmax), and Adam turns their rounding noise into lr-sized steps in any implementation.

Adam's epsilon defaults to 1e-6 here (Megatron trains with 1e-8): an element whose gradient is
near epsilon gets an update that swings by up to lr / (4 eps) times its fp32 rounding noise —
about 1e-5 of the parameter scale at 1e-8 whatever the layout — which would drown the
comparison in the optimizer's conditioning rather than test the parallel computation.

The loss of a step is the mean over the global batch's sequences of each sequence's mean over
its loss-masked tokens (DESIGN.md: one definition of a step's loss): every micro-batch adds
its share and data-parallel ranks' shares are summed, so neither micro-batching nor
data-parallel splitting changes it. With --calculate-per-token-loss it is Megatron's other
definition, the sum over the global batch's loss tokens divided by their number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from megalith.config import Layout, ModelConfig, flag_field, parse_layout
from megalith.config.optimizer import OPTIMIZER_NAMES, OptimizerConfig
from megalith.errors import ConfigError
from megalith.models.gpt import PADDED_VOCAB_PARAMETERS, TIED_COPY_ALIASES
from megalith.models.registry import ModelSpec, get_model_spec
from megalith.parallel import comm
from megalith.parallel.layers import gather_full_parameter
from megalith.parallel.pipeline.schedules import SCHEDULES, validate_schedule_args
from megalith.parallel.pipeline.split import split_layers
from megalith.parallel.spawn import RankPool
from megalith.testing import RELATIVE_TOLERANCES, Tolerance, relative_error
from megalith.training.batch import BatchPlan
from megalith.training.loss_scaler import make_loss_scaler
from megalith.training.lr_schedule import LRSchedule
from megalith.training.step import StepPlan, StepRunner, assemble_runner, sequence_mean_loss, token_sum_loss

ALIASES = TIED_COPY_ALIASES


@dataclass(frozen=True)
class VerifySettings:
    """What every layout trains: the model, and `megalith verify`'s flags (generated from these fields)."""

    model: str
    config: ModelConfig
    steps: int = flag_field(3, "optimizer steps")
    micro_batches: int = flag_field(4, "micro-batches per step in the reference; the global batch is micro-batches x "
                                    "micro-batch-size sequences, the same for every layout")
    micro_batch_size: int = flag_field(2, "sequences per micro-batch, unless a layout's mbN token says otherwise")
    lr: float = flag_field(1e-3, "peak learning rate")
    min_lr: float = flag_field(1e-4, "learning rate at the end of the decay")
    lr_warmup_iters: int = flag_field(1, "linear warm-up iterations")
    lr_warmup_init: float = flag_field(1e-4, "learning rate at the start of the warm-up")
    lr_decay_style: str = flag_field("cosine", "decay after the warm-up",
                                     ("constant", "linear", "cosine", "inverse-square-root"))
    weight_decay: float = flag_field(0.01, "not applied to biases and norms")
    clip_grad: float = flag_field(1.0, "clip by the global gradient norm; 0 turns it off")
    adam_eps: float = flag_field(1e-6, "AdamW epsilon (at 1e-8 Adam amplifies fp32 rounding noise of near-zero "
                                 "gradients past the 1e-5 tolerance in any layout)")
    optimizer: str = flag_field("adam", "adam: decoupled weight decay (AdamW), as Megatron's adam", OPTIMIZER_NAMES)
    ddp_bucket_size: int = flag_field(20_000, "data-parallel bucket size in elements; small so that the model has "
                                      "several buckets and overlap is exercised")
    initial_loss_scale: float = flag_field(2.0**12, "fp16 layouts' dynamic loss scale at the start (large enough to "
                                           "matter, small enough not to overflow here)")
    hysteresis: int = flag_field(2, "fp16 layouts: overflows tolerated before the dynamic scale halves")
    seed: int = flag_field(1234, "seed of initialisation and data")
    schedule: str | None = flag_field(None, "pipeline schedule of every layout without a schedule token (None: "
                                      "no-pipelining at pp 1, 1f1b, interleaved-1f1b with vpp)", SCHEDULES)
    decoder_first_pipeline_num_layers: int | None = flag_field(
        None, "layers on the first pipeline stage (the rest split evenly)")
    decoder_last_pipeline_num_layers: int | None = flag_field(
        None, "layers on the last pipeline stage (the rest split evenly)")
    calculate_per_token_loss: bool = flag_field(False, "the step loss is the sum over loss tokens divided by their "
                                                "count across micro-batches and dp ranks (Megatron's flag)")

    @property
    def global_batch_size(self) -> int:
        return self.micro_batches * self.micro_batch_size

    def optimizer_config(self) -> OptimizerConfig:
        return OptimizerConfig(optimizer=self.optimizer, lr=self.lr, min_lr=self.min_lr, weight_decay=self.weight_decay,
                               adam_eps=self.adam_eps, clip_grad=self.clip_grad)

    def lr_schedule(self) -> LRSchedule:
        return LRSchedule(lr=self.lr, train_iters=self.steps, min_lr=self.min_lr,
                          lr_warmup_iters=min(self.lr_warmup_iters, self.steps), lr_warmup_init=self.lr_warmup_init,
                          lr_decay_style=self.lr_decay_style)


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    losses: list[float]
    loss_error: float
    norm_error: float
    grad_error: float
    worst_grad: str
    param_error: float
    worst_param: str
    tolerance: Tolerance = RELATIVE_TOLERANCES["fp32"]
    skipped_steps: int = 0

    @property
    def passed(self) -> bool:
        t = self.tolerance
        return (self.loss_error < t.losses and self.norm_error < t.norms and self.grad_error < t.grads
                and self.param_error < t.params)


def plan(settings: VerifySettings, layout: Layout) -> StepPlan:
    """Check a layout against the model and the batch before any rank starts (one line if it
    fails), and plan its step as `megalith pretrain` plans one."""
    layout.check_implemented()
    layout.check_expert_axes()
    config = layout.apply_to(settings.config)
    ignored = layout.check_experts(getattr(config, "num_experts", None))  # the field is issue 21's MoE layer
    if ignored:  # a layout token that changes nothing is a mistake in verify's own grammar
        raise ConfigError(f"layout {layout}: {ignored.replace('; ignored', '')}; drop the etp token")
    layout.check_model(config)
    size = settings.global_batch_size
    micro_batch_size = settings.micro_batch_size
    if layout.microbatches:
        if size % (layout.dp * layout.microbatches) != 0:
            raise ConfigError(
                f"layout {layout}: the global batch of {size} sequences does not split into dp {layout.dp} x "
                f"{layout.microbatches} micro-batches; use an mb token that divides {size // math.gcd(size, layout.dp)}"
            )
        micro_batch_size = size // (layout.dp * layout.microbatches)
    elif settings.micro_batches % layout.dp != 0:  # verify has no --global-batch-size to suggest
        raise ConfigError(
            f"layout {layout}: the global batch of --micro-batches {settings.micro_batches} x --micro-batch-size "
            f"{micro_batch_size} sequences does not split over dp {layout.dp}; use --micro-batches that is a "
            f"multiple of {layout.dp}"
        )
    batch = BatchPlan(size, micro_batch_size, layout.dp)
    spec = get_model_spec(settings.model)
    spec.check_virtual_pipeline(layout.vpp)
    uneven = layout.pp > 1
    stage_layers = split_layers(
        config.num_layers, layout.pp, layout.vpp,
        settings.decoder_first_pipeline_num_layers if uneven else None,
        settings.decoder_last_pipeline_num_layers if uneven else None,
    )
    layout = replace(layout, schedule=layout.schedule or settings.schedule)
    validate_schedule_args(layout.pipeline_schedule, layout.pp, layout.vpp, batch.num_micro_batches)
    return StepPlan(spec, config, layout, batch, stage_layers, settings.seed, settings.ddp_bucket_size,
                    accumulate_in_fp32=config.params_dtype != "fp16",
                    calculate_per_token_loss=settings.calculate_per_token_loss)


def global_batch(settings: VerifySettings, spec: ModelSpec, step: int) -> dict:
    """The same global batch for every layout: seeded by (seed, step); dp ranks and micro-batches slice it."""
    generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    return spec.make_batch(settings.config, settings.global_batch_size, generator)


def build_runner(settings: VerifySettings, layout: Layout, state=None, record: bool = False) -> StepRunner:
    """This rank's part of `layout`, assembled as `megalith pretrain` assembles it (state None: one process)."""
    step = plan(settings, layout)
    scaler = make_loss_scaler(fp16=step.model.params_dtype == "fp16", loss_scale=None,
                              initial_loss_scale=settings.initial_loss_scale, hysteresis=settings.hysteresis)
    return assemble_runner(step, state, settings.optimizer_config(), scaler, record=record)


def train(settings: VerifySettings, layout: Layout | None = None, state=None, step_hook=None):
    """Train for settings.steps steps of the real optimizer (clipping, LR schedule, loss scaling,
    ZeRO-1 with `zero1`) on this rank's stages; return (per-step losses, first gradients,
    final parameters, per-step grad norms (None: skipped)), tensors gathered over tp and dp. Without a state: one
    process. `step_hook(step, StepReport)`, if given, sees every step with its recorded timeline."""
    layout = layout or Layout()
    spec = get_model_spec(settings.model)
    batch = plan(settings, layout).batch
    runner = build_runner(settings, layout, state, record=step_hook is not None)
    dp_rank = state.dp_rank if state is not None else 0
    groups = ShardGroups.of(state)
    schedule = settings.lr_schedule()

    def loss_fn(per_token, batch):
        if settings.calculate_per_token_loss:
            return token_sum_loss(per_token, batch)
        return sequence_mean_loss(per_token, batch, settings.global_batch_size)

    losses, norms, first_grads = [], [], None
    for step in range(settings.steps):
        micro = batch.micro_batches(global_batch(settings, spec, step), dp_rank)

        def probe():
            nonlocal first_grads
            if first_grads is None:
                first_grads = full_gradients(runner, settings.config.vocab_size, groups)

        report = runner.train_step(micro, loss_fn, schedule.lr_at(step), inspect_grads=probe)
        norms.append(report.outcome.grad_norm)
        if step_hook is not None:
            step_hook(step, report)
        losses.append(report.loss)
    runner.finish_param_gather()
    with runner.gathered_parameters():  # ZeRO-3: whole parameters only inside
        final = full_tensors(runner.chunks, settings.config.vocab_size, groups)
    return losses, first_grads, final, norms


@dataclass(frozen=True)
class ShardGroups:
    """The groups a parameter is sharded over: dense ones over tp; expert ones (`expert_parallel`) over
    etp along their tensor_parallel_dim and over ep along dim 0 (each ep rank's experts, in ep-rank order)."""

    tp: object = None
    ep: object = None
    etp: object = None

    @classmethod
    def of(cls, state) -> "ShardGroups":
        return cls() if state is None else cls(state.tp_group, state.ep_group, state.etp_group)

    def gather(self, param, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """The whole tensor one process would hold (collectives over the groups that shard it)."""
        if not getattr(param, "expert_parallel", False):
            return gather_full_parameter(param, self.tp, tensor)
        whole = gather_full_parameter(param, self.etp, tensor)
        size = comm.group_size(self.ep)
        if size == 1:
            return whole
        stacked = torch.empty((size,) + tuple(whole.shape), dtype=whole.dtype, device=whole.device)
        comm.all_gather_into(stacked.view(-1), whole.contiguous().view(-1), self.ep)
        return stacked.flatten(0, 1)  # ep rank r holds experts [r E/ep, (r+1) E/ep)


def full_gradients(runner: StepRunner, vocab_size: int, groups: ShardGroups) -> dict[str, torch.Tensor]:
    """The reduced gradients as one process would hold them, unscaled (collectives over dp, tp, etp and ep)."""
    scale = runner.optimizer.loss_scale
    full = {}
    for index, chunk in enumerate(runner.chunks):
        grads = {}
        for buffer in runner.chunk_buffers(index):  # with experts: theirs too (gathered over edp)
            grads |= buffer.full_main_grads()
        for name, param in chunk.named_parameters():
            tensor = groups.gather(param, grads[name]).float() / scale
            full[name] = tensor[:vocab_size] if name.endswith(PADDED_VOCAB_PARAMETERS) else tensor
    return full


def full_tensors(chunks, vocab_size: int, groups: ShardGroups) -> dict[str, torch.Tensor]:
    """This rank's parameters as one process would hold them (collectives over tp, etp and ep)."""
    full = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            tensor = groups.gather(param).float()
            full[name] = tensor[:vocab_size] if name.endswith(PADDED_VOCAB_PARAMETERS) else tensor
    return full


def reference_config(config: ModelConfig) -> ModelConfig:
    """The reference's model: `config` on torch's own code (megalith_kernels' backend torch, explicit
    attention matmuls where a fused kernel was asked for), so that a layout running the fused
    kernels is proven against the plain implementation, not against itself."""
    from megalith.kernel_choice import resolve_kernels

    if resolve_kernels(config).plain:
        return config
    attention = "local" if config.attention_backend in ("flash", "fused", "auto") else config.attention_backend
    return replace(config, kernel_backend="torch", attention_backend=attention, cross_entropy_loss_fusion=False)


def _train_on_rank(ctx, settings: VerifySettings, layout: Layout | None, reference: bool = False):
    """Train `layout` on the ranks it needs (the others idle); with `reference`, or no layout, one
    process trains with no process group at all, in the layout's precision, on reference_config."""
    if layout is None or reference:
        if ctx.rank != 0:
            return None
        settings = replace(settings, config=reference_config(settings.config))
        return train(settings, Layout(precision=layout.precision if layout else "fp32"))
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp, ep=layout.ep,
                               etp=layout.etp)
    if state is None:
        return None  # outside this layout: idle
    result = train(settings, layout, state)
    return result if state.tp_rank == 0 and state.dp_rank == 0 else None


def merge_ranks(results: list) -> tuple:
    """One (losses, grads, params, grad norms) from the pipeline ranks' parts (each rank holds some stages)."""
    parts = [r for r in results if r is not None]
    grads, params = {}, {}
    for _, rank_grads, rank_params, _ in parts:
        grads.update(rank_grads)
        params.update(rank_params)
    return parts[0][0], grads, params, parts[0][3]


def compare(layout: str, reference, candidate, tolerance: Tolerance = RELATIVE_TOLERANCES["fp32"]) -> LayoutResult:
    """Relative differences; a tied embedding's copy on the last stage is held to the original.
    The per-step global gradient norms are compared too (each parameter counted once)."""
    (ref_losses, ref_grads, ref_params, ref_norms), (losses, grads, params, norms) = reference, candidate
    missing = sorted(set(ref_params) - set(params))
    if missing:
        raise RuntimeError(f"layout {layout} lost parameters: {', '.join(missing)}")
    loss_error = relative_error(torch.tensor(losses), torch.tensor(ref_losses))
    skipped = sum(norm is None for norm in norms)

    def reference_of(name: str) -> str:
        return ALIASES.get(name, name)

    grad_errors = {name: relative_error(grads[name], ref_grads[reference_of(name)]) for name in grads}
    worst_grad = max(grad_errors, key=grad_errors.get)
    param_scale = max(p.abs().max().item() for p in ref_params.values())
    param_diffs = {name: (params[name] - ref_params[reference_of(name)]).abs().max().item() for name in params}
    worst_param = max(param_diffs, key=param_diffs.get)
    return LayoutResult(layout, losses, loss_error, _norm_error(norms, ref_norms), grad_errors[worst_grad], worst_grad,
                        param_diffs[worst_param] / param_scale, worst_param, tolerance, skipped)


def _norm_error(norms: list[float | None], reference: list[float | None]) -> float:
    """Relative difference of the per-step grad norms; infinite when different steps were skipped (None)."""
    if [n is None for n in norms] != [n is None for n in reference]:
        return math.inf
    kept = [(n, r) for n, r in zip(norms, reference) if n is not None]
    if not kept:
        return 0.0
    return relative_error(torch.tensor([n for n, _ in kept]), torch.tensor([r for _, r in kept]))


def check_layouts(settings: VerifySettings, layouts: list[Layout]) -> None:
    """Every layout's rules, before any rank starts."""
    get_model_spec(settings.model)
    if settings.config.params_dtype != "fp32":
        raise ConfigError(f"verify sets the precision per layout: drop --params-dtype {settings.config.params_dtype} "
                          f"and add the {settings.config.params_dtype} token to a layout (e.g. tp2.{settings.config.params_dtype})")
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
        references = {}
        results = []
        for layout in layouts:
            if layout.precision not in references:
                references[layout.precision] = pool.run(_train_on_rank, settings, layout, True)[0]
            candidate = merge_ranks(pool.run(_train_on_rank, settings, layout))
            results.append(compare(str(layout), references[layout.precision], candidate,
                                   RELATIVE_TOLERANCES[layout.precision]))
        return results
    finally:
        if own_pool:
            pool.close()


def format_table(results: list[LayoutResult]) -> str:
    header = (f"{'layout':<28} {'first loss':>10} {'last loss':>10} {'loss rel diff':>14} {'norm rel diff':>14} "
              f"{'grad rel diff':>14} {'param rel diff':>15}  result")
    rows = [header, "-" * len(header)]
    for r in results:
        verdict = "PASS"
        if not r.passed:
            verdict = f"FAIL (worst grad: {r.worst_grad}; worst param: {r.worst_param})"
        if r.skipped_steps:
            verdict += f" ({r.skipped_steps} skipped steps)"
        if r.tolerance != RELATIVE_TOLERANCES["fp32"]:
            t = r.tolerance
            verdict += f" [bounds {t.losses:.0e} {t.norms:.0e} {t.grads:.0e} {t.params:.0e}]"
        rows.append(f"{r.layout:<28} {r.losses[0]:>10.4f} {r.losses[-1]:>10.4f} {r.loss_error:>14.2e} {r.norm_error:>14.2e} "
                    f"{r.grad_error:>14.2e} {r.param_error:>15.2e}  {verdict}")
    return "\n".join(rows)


def runner_after_one_step(ctx, settings: VerifySettings, layout_text: str, lr: float = 1e-3):
    """The StepRunner of `layout_text` on this rank (None where the layout leaves it out) after one
    training step of `settings`' first global batch: what memory checks count (Adam's moments
    exist only after a step)."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(dp=layout.dp)
    if state is None:
        return None
    runner = build_runner(settings, layout, state)
    micro = plan(settings, layout).batch.micro_batches(global_batch(settings, get_model_spec(settings.model), 0),
                                                       state.dp_rank)
    runner.train_step(micro, lambda out, b: sequence_mean_loss(out, b, settings.global_batch_size), lr)
    return runner
