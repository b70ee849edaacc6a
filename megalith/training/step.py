"""One training step of one rank, the same code for `megalith verify` and `megalith pretrain`:
pipeline schedule -> data-parallel gradient reduction -> sequence-parallel and tied-embedding
sums -> optimizer (unscale, skip on overflow, clip, update, all-gather with ZeRO-1/2; ZeRO-3 keeps
the parameters sharded, gathered unit by unit in forward and backward).

Gradients are finalised in Megatron's order: the data-parallel reduction of every chunk's
buckets (started during backward when overlapping), then the sums over tp of the gradients
that sequence parallelism leaves partial, then the tied embedding's two copies over the
embedding group (`finish_grad_sync` of each chunk).
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from megalith.config import Layout, ModelConfig
from megalith.config.pretrain import PretrainConfig
from megalith.models.moe import set_aux_loss_scale, update_expert_biases
from megalith.models.parallel_context import ParallelContext, StageSpec
from megalith.models.registry import ModelSpec, get_model_spec
from megalith.parallel.comm import all_reduce, gradient_of, group_size
from megalith.parallel.data_parallel import DataParallelGrads, split_by_experts
from megalith.parallel.pipeline.actions import Action, Kind, stage_of
from megalith.parallel.pipeline.engine import PipelineEngine, StepResult
from megalith.parallel.pipeline.schedules import build_schedule, placement_of
from megalith.parallel.rng import model_parallel_rng_tracker
from megalith.training.batch import BatchPlan
from megalith.training.timers import Timers
from megalith.training.optimizer import LearningRates, ParallelOptimizer, StepOutcome


def sequence_mean_loss(per_token: torch.Tensor, batch: dict, global_batch_size: int) -> torch.Tensor:
    """This micro-batch's share of the step loss. The step loss is the mean over the global
    batch's sequences of each sequence's mean over its loss-masked tokens (DESIGN: one
    definition of a step's loss), so neither pipeline micro-batching nor data-parallel
    splitting changes it; data-parallel ranks' shares add up (`StepRunner` sums them)."""
    mask = batch["loss_mask"]
    per_sequence = (per_token.float() * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
    return per_sequence.sum() / global_batch_size


def token_sum_loss(per_token: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """--calculate-per-token-loss (Megatron's): this micro-batch's (sum of the per-token losses over
    its loss-masked tokens, number of those tokens). `StepRunner` divides the step's total sum by
    the total count over micro-batches and dp ranks, and so scales the gradients by 1 / count."""
    mask = batch["loss_mask"].float()
    return (per_token.float() * mask).sum(), mask.sum()


def forward_only(actions: list[Action]) -> list[Action]:
    """A schedule's forwards and the messages they need: evaluation without backward."""
    return [a for a in actions if a.kind in (Kind.FORWARD, Kind.RECV_FORWARD, Kind.SEND_FORWARD)]


@dataclass(frozen=True)
class StepPlan:
    """What one rank's training step is built from, the same for `megalith pretrain` and `megalith
    verify`: the model (its config already under the layout's precision and recompute), the
    layout, the batch split, every global stage's layers, and how gradients are bucketed."""

    spec: ModelSpec
    model: ModelConfig
    layout: Layout
    batch: BatchPlan
    stage_layers: list[list[int]]
    seed: int
    bucket_size: int
    overlap: bool = True
    accumulate_in_fp32: bool = True  # False: gradients accumulate and reduce in the parameters' dtype
    calculate_per_token_loss: bool = False  # the loss function returns (sum, tokens): token_sum_loss
    overlap_param_gather: bool = False  # ZeRO-1's all-gather waited for by the next forward, bucket by bucket

    @classmethod
    def for_pretrain(cls, config: PretrainConfig) -> "StepPlan":
        dist = config.distributed
        return cls(get_model_spec(config.training.model), config.model, config.layout, config.batch_plan(),
                   config.stage_layers(), config.training.seed,
                   # without overlap nothing is gained by splitting: one bucket, one collective (as Megatron)
                   bucket_size=config.ddp_bucket_size if dist.overlap_grad_reduce else sys.maxsize,
                   overlap=dist.overlap_grad_reduce, accumulate_in_fp32=dist.accumulate_allreduce_grads_in_fp32,
                   calculate_per_token_loss=config.training.calculate_per_token_loss,
                   overlap_param_gather=dist.overlap_param_gather)


def parallel_context(state, layout: Layout, seed: int) -> ParallelContext:
    """What the model's layers need of the layout on this rank (`state` None: one process)."""
    if state is None:
        return ParallelContext(None, layout.sequence_parallel, model_parallel_rng_tracker(seed, 0))
    return ParallelContext(state.tp_group, layout.sequence_parallel,
                           model_parallel_rng_tracker(seed, state.tp_rank, state.device, state.pp_rank),
                           device=state.device, embedding_group=state.embedding_group, pipeline_group=state.pp_group,
                           ep_group=state.ep_group, etp_group=state.etp_group, edp_group=state.edp_group)


def build_chunks(plan: StepPlan, ctx: ParallelContext, pp_rank: int) -> list[nn.Module]:
    """This pipeline rank's model chunks: chunk c is global stage c * pp + pp_rank (zb-v: stages
    pp_rank and 2 pp - 1 - pp_rank)."""
    stages, pp = len(plan.stage_layers), plan.layout.pp
    placement = placement_of(plan.layout.pipeline_schedule)
    return [plan.spec.build(plan.model, ctx, plan.seed, StageSpec(index, stages, tuple(plan.stage_layers[index])))
            for index in (stage_of(pp_rank, chunk, pp, placement) for chunk in range(plan.layout.vpp))]


def local_tied_copies(chunks: list[nn.Module]) -> list[tuple[nn.Parameter, nn.Parameter]]:
    """Under zb-v the first and the last stage are chunks of one rank: the tied embedding's two
    copies are summed here, not over the embedding group, so they stop being marked shared."""
    copies = [[p for p in chunk.parameters() if getattr(p, "shared_embedding", False)] for chunk in chunks]
    if len(chunks) != 2 or not copies[0] or not copies[1]:
        return []
    for param in copies[0] + copies[1]:
        param.shared_embedding = False
    return list(zip(copies[0], copies[1]))


def assemble_runner(plan: StepPlan, state, optimizer_config, loss_scaler, record: bool = False) -> "StepRunner":
    """This rank's chunks, data-parallel buffers, optimizer, engine and schedule, the same for
    `megalith pretrain` and `megalith verify`. `state` None: one process without groups."""
    def group(name: str):
        return getattr(state, name) if state is not None else None

    layout, ctx = plan.layout, parallel_context(state, plan.layout, plan.seed)
    pp_rank = state.pp_rank if state is not None else 0
    chunks = build_chunks(plan, ctx, pp_rank)
    # expert parameters get a buffer of their own over edp (split_by_experts); other chunks one, as before
    pairs = [split_by_experts(chunk, group("dp_group"), group("edp_group"), bucket_size=plan.bucket_size,
                              overlap=plan.overlap, accumulate_in_fp32=plan.accumulate_in_fp32,
                              shard=layout.distributed_optimizer, shard_grads=layout.sharded_gradients,
                              shard_params=layout.sharded_parameters, overlap_param_gather=plan.overlap_param_gather)
             for chunk in chunks]
    buffers, expert_buffers = [dense for dense, _ in pairs], [experts for _, experts in pairs]
    optimizer = ParallelOptimizer(buffers + [b for b in expert_buffers if b is not None], optimizer_config,
                                  tp_group=group("tp_group"), mp_group=group("mp_group"), loss_scaler=loss_scaler,
                                  etp_group=group("etp_group"), emp_group=group("emp_group"))
    placement = placement_of(layout.pipeline_schedule)
    tied = local_tied_copies(chunks) if placement == "v" else []  # after the buffers: each copy keeps its bucket
    engine = PipelineEngine(chunks, rank=pp_rank, pp=layout.pp, pp_group=group("pp_group"),
                            micro_batch_size=plan.batch.micro_batch_size, dtype=plan.model.torch_dtype,
                            device=ctx.device, record=record, placement=placement)
    def schedule(num_micro_batches: int) -> list[Action]:
        return build_schedule(layout.pipeline_schedule, layout.pp, layout.vpp, num_micro_batches, pp_rank)

    return StepRunner(chunks, buffers, engine, schedule(plan.batch.num_micro_batches), optimizer,
                      dp_group=group("dp_group"), schedule=schedule, pp_group=group("pp_group"),
                      per_token_loss=plan.calculate_per_token_loss, local_tied=tied,
                      # the sums after the reduction (over tp, the embedding group, pp for T5) need whole
                      # gradients under ZeRO-2/3; with neither tp nor pp there is nothing to sum
                      lend_full_grads=layout.tp > 1 or layout.pp > 1, expert_buffers=expert_buffers)


@dataclass(frozen=True)
class StepReport:
    loss: float  # the step's loss (mean over the global batch), the same on every rank
    outcome: StepOutcome
    pipeline: StepResult  # with the recorded timeline, when the engine records


class StepRunner:
    """Runs training steps for one rank's chunks with their buffers, engine and optimizer.

    `per_token_loss` (--calculate-per-token-loss): the loss function returns (sum, tokens) per
    micro-batch; the token count of the last stage is summed over pp (the other stages hold
    zero: Megatron's broadcast from the last stage) and dp, the gradients are scaled by its
    inverse after the dp reduction, and the step loss is the total sum over the total count."""

    def __init__(self, chunks: list[nn.Module], buffers: list[DataParallelGrads], engine: PipelineEngine,
                 actions: list[Action], optimizer: ParallelOptimizer, dp_group=None,
                 schedule: Callable[[int], list[Action]] | None = None, pp_group=None,
                 per_token_loss: bool = False, local_tied: list | None = None, lend_full_grads: bool = True,
                 expert_buffers: list | None = None) -> None:
        """`actions`: the step of the full global batch; `schedule(n)`: this rank's actions for a step of
        n micro-batches (a batch-size ramp-up changes n), built once per count. `buffers`: one per
        chunk; `expert_buffers`: per chunk, its expert parameters' buffer over edp, or None.
        `self.buffers` lists every buffer, the chunks' first (in chunk order)."""
        experts = expert_buffers or [None] * len(buffers)
        self._chunk_buffers = [[dense] + ([expert] if expert is not None else []) for dense, expert in
                               zip(buffers, experts)]
        buffers = list(buffers) + [b for b in experts if b is not None]
        self.chunks, self.buffers, self.engine = chunks, buffers, engine
        self.actions, self.optimizer, self.dp_group = actions, optimizer, dp_group
        self.pp_group, self.per_token_loss = pp_group, per_token_loss
        self.local_tied = local_tied or []  # zb-v: the tied embedding's copies, both on this rank
        self.lend_full_grads = lend_full_grads
        self._schedule = schedule
        self._actions_by_count: dict[int, list[Action]] = {}

    def chunk_buffers(self, chunk: int) -> list[DataParallelGrads]:
        """Chunk `chunk`'s buffers: its dense one, then its experts' (over edp) when it has experts."""
        return self._chunk_buffers[chunk]

    def actions_for(self, num_micro_batches: int | None) -> list[Action]:
        """The actions of a step of `num_micro_batches` micro-batches (None: the full batch's)."""
        if num_micro_batches is None:
            return self.actions
        if num_micro_batches not in self._actions_by_count:
            if self._schedule is None:
                raise ValueError(f"this runner was built for one batch size; it cannot run {num_micro_batches} "
                                 "micro-batches (build it with assemble_runner)")
            self._actions_by_count[num_micro_batches] = self._schedule(num_micro_batches)
        return self._actions_by_count[num_micro_batches]

    def _before_backward(self, chunk: int, last: bool) -> None:
        for buffer in self.chunk_buffers(chunk):
            buffer.set_last_microbatch(last)

    def finalize_grads(self) -> None:
        """dp reduction, then SP norms over tp and the tied embedding over its group (Megatron's order)."""
        for buffer in self.buffers:
            buffer.finish()
        with contextlib.ExitStack() as lent:  # ZeRO-2: whole gradients lent for these sums, shards kept
            for buffer in self.buffers if self.lend_full_grads else ():
                lent.enter_context(buffer.full_grads())
            for first, last in self.local_tied:  # what the embedding group's all-reduce sums elsewhere
                total = gradient_of(first) + gradient_of(last)
                gradient_of(first).copy_(total)
                gradient_of(last).copy_(total)
            for chunk in self.chunks:
                chunk.finish_grad_sync()

    def memory_bytes(self) -> dict[str, int]:
        """This rank's persistent bytes, counted from tensor storage: {"params_bytes", "grads_bytes",
        "optimizer_bytes", "gathered_peak_bytes"} (see ParallelOptimizer.persistent_memory_bytes)."""
        return self.optimizer.persistent_memory_bytes()

    @contextlib.contextmanager
    def gathered_parameters(self, writeback: bool = False):
        """ZeRO-3: every chunk's parameters whole inside the block (collectives over dp); read
        them only there outside forward (checkpoint save, comparisons). `writeback=True` keeps
        what the block wrote, the same on every dp rank (checkpoint load; the optimizer's fp32
        main weights are the loader's to set). A no-op otherwise."""
        with contextlib.ExitStack() as stack:
            for buffer in self.buffers:
                stack.enter_context(buffer.gathered_parameters(writeback))
            yield

    def finish_param_gather(self) -> None:
        """Wait for ZeRO-1's parameter all-gathers still in flight (--overlap-param-gather): call
        before reading the parameters outside a forward (checkpoint save, comparisons)."""
        for buffer in self.buffers:
            buffer.finish_param_gather()

    def _counting(self, loss_fn):
        """The loss function for the engine, and the tokens it counted on this rank (per-token loss)."""
        if not self.per_token_loss:
            return loss_fn, None
        tokens = torch.zeros((), dtype=torch.float64, device=self.engine.device)

        def counted(per_token, batch):
            total, count = loss_fn(per_token, batch)
            tokens.add_(count.detach().double())
            return total

        return counted, tokens

    def _per_token_total(self, loss_sum: float, tokens: torch.Tensor) -> tuple[float, float]:
        """(the step's loss sum, its token count) over pp (count from the last stage) and dp."""
        if group_size(self.pp_group) > 1:
            all_reduce(tokens, self.pp_group)  # zero on every stage but the last
        pair = torch.stack([torch.tensor(loss_sum, dtype=torch.float64, device=tokens.device), tokens])
        if group_size(self.dp_group) > 1:
            all_reduce(pair, self.dp_group)
        total, count = pair.tolist()
        return total, max(count, 1.0)  # no loss token at all: zero loss and gradients, not 0 / 0

    def forward_backward(self, get_micro_batch: Callable[[int], dict], loss_fn,
                         num_micro_batches: int | None = None) -> tuple[float, StepResult]:
        """Forward and backward over this rank's micro-batches (`num_micro_batches` of them; None: the
        full batch's count); gradients reduced and finalised."""
        self.optimizer.zero_grad()
        for chunk in self.chunks:
            chunk.train()
        engine_loss, tokens = self._counting(loss_fn)
        actions = self.actions_for(num_micro_batches)
        self._scale_moe_losses(actions, per_token=tokens is not None)
        result = self.engine.step(actions, get_micro_batch, engine_loss,
                                  loss_scale=self.optimizer.loss_scale, before_backward=self._before_backward)
        self.finalize_grads()
        if tokens is None:
            return self._sum_over_dp(result.loss), result
        total, count = self._per_token_total(result.loss, tokens)
        for buffer in self.buffers:
            buffer.scale_gradients(1.0 / count)
        return total / count, result

    def _scale_moe_losses(self, actions: list[Action], per_token: bool) -> None:
        """The MoE balancing losses' gradient weight, as Megatron's MoEAuxLossAutoScaler: each
        micro-batch's loss is its share 1/(m x dp) of the global batch (dp sums the gradients),
        times the loss scale; with --calculate-per-token-loss the later division by the step's
        tokens applies to them as to everything else (Megatron's choice too)."""
        share = 1.0 if per_token else 1.0 / (len({a.microbatch for a in actions}) * group_size(self.dp_group))
        for chunk in self.chunks:
            set_aux_loss_scale(chunk, self.optimizer.loss_scale * share)

    def _sum_over_dp(self, value: float) -> float:
        """Each dp rank's loss is its share of the global batch's mean: the sum is the step loss."""
        if group_size(self.dp_group) == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.engine.device)  # NCCL needs the device
        all_reduce(total, self.dp_group)
        return float(total)

    def train_step(self, get_micro_batch: Callable[[int], dict], loss_fn, lr: float | LearningRates,
                   inspect_grads: Callable[[], None] | None = None, timers=None,
                   num_micro_batches: int | None = None) -> StepReport:
        """forward_backward, then the optimizer: the one step of pretrain and verify.
        `inspect_grads()` runs in between (verify's probe); `timers` (pretrain's) time both halves;
        `lr` is a float, or `LearningRates` with --decoupled-lr; `num_micro_batches` is this step's
        count under a batch-size ramp-up (None: the full batch's)."""
        timers = timers or Timers(0)  # level 0: every timer a no-op
        timers("forward-backward", 1).start()
        loss, result = self.forward_backward(get_micro_batch, loss_fn, num_micro_batches)
        timers("forward-backward", 1).stop()
        if inspect_grads is not None:
            inspect_grads()
        timers("optimizer", 1).start()
        outcome = self.optimizer.step(lr)
        if not outcome.skipped:  # DeepSeek-V3's expert-bias balancing follows each update
            for chunk in self.chunks:
                update_expert_biases(chunk, [self.dp_group])
        timers("optimizer", 1).stop()
        return StepReport(loss, outcome, result)

    @torch.no_grad()
    def evaluate(self, get_micro_batch: Callable[[int], dict], loss_fn, forward_only_actions: list[Action]) -> float:
        """The loss without a backward or an update (validation)."""
        self.finish_param_gather()
        for chunk in self.chunks:
            chunk.eval()
        engine_loss, tokens = self._counting(loss_fn)
        result = self.engine.step(forward_only_actions, get_micro_batch, engine_loss)
        if tokens is None:
            return self._sum_over_dp(result.loss)
        total, count = self._per_token_total(result.loss, tokens)
        return total / count
