"""torch.distributed.pipelining against megalith's pipeline schedules (1F1B at pp2 and pp4,
interleaved 1F1B at pp2 with two chunks per rank).

The peer runs PlainGPT cut at megalith's stage boundaries (`megalith.bench.stages`) through
`PipelineStage` and the schedule users would pick, with the schedule's own loss function and
gradient scaling (`scale_grads`, the default: each micro-batch's mean loss, gradients divided
by the number of micro-batches), so its step loss is megalith's: the mean of the per-token
cross-entropy over the global batch. The embedding is tied on both sides (megalith's default):
the last stage holds a copy of the word embedding and the peer all-reduces the two copies'
gradients over the first and last rank before AdamW, as Megatron and megalith do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megalith.bench.harness import Case
from megalith.bench.stages import adamw, rank_stages, tied_parameters
from megalith.bench.work import Work

MICRO_BATCHES = 8  # per step, on both sides (the tests use fewer)


def token_mean_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The peer's loss of one micro-batch: mean per-token cross-entropy (fp32)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def last_stage_rank(pp: int, vpp: int) -> int:
    """The pipeline rank holding the last global stage (chunk c of rank r is stage c * pp + r)."""
    return (pp * vpp - 1) % pp


class PipeliningSide:
    """This rank's stages under a torch.distributed.pipelining schedule, with AdamW."""

    def __init__(self, work: Work, pp: int, vpp: int, rank: int, pp_group, embedding_group, device) -> None:
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

        self.work, self.pp, self.rank, self.pp_group, self.embedding_group = work, pp, rank, pp_group, embedding_group
        self.modules = [stage.to(device) for stage in rank_stages(work, pp, vpp, rank)]
        stages = [PipelineStage(module, module.index, pp * vpp, device, group=pp_group) for module in self.modules]
        self.first = any(m.index == 0 for m in self.modules)
        self.last = any(m.index == pp * vpp - 1 for m in self.modules)
        self.last_rank = last_stage_rank(pp, vpp)
        if vpp == 1:
            self.schedule = Schedule1F1B(stages[0], work.micro_batches, loss_fn=token_mean_cross_entropy)
        else:
            self.schedule = ScheduleInterleaved1F1B(stages, work.micro_batches, loss_fn=token_mean_cross_entropy)
        self.tied = tied_parameters(self.modules, work)
        self.optimizer = adamw((p for m in self.modules for p in m.parameters()), work)
        self.device = device

    def step(self, step: int) -> float:
        batch = self.work.global_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        args = (batch["input_ids"].to(self.device),) if self.first else ()
        target = batch["labels"].to(self.device) if self.last else None
        losses: list[torch.Tensor] = []
        self.schedule.step(*args, target=target, losses=losses if self.last else None, return_outputs=False)
        for param in self.tied:  # the two copies of the tied embedding: one gradient
            dist.all_reduce(param.grad, group=self.embedding_group)
        self.optimizer.step()
        loss = torch.stack(losses).detach().double().mean().reshape(1) if self.last else torch.zeros(1, dtype=torch.float64)
        dist.broadcast(loss, src=self.last_rank, group=self.pp_group)  # group rank = pool rank: pool's first ranks
        return float(loss)


def build(ctx, work: Work, layout: str):
    """(megalith's side, the pipelining side) on this layout's ranks; None on the pool's other ranks."""
    from megalith.config import parse_layout

    parsed = parse_layout(layout)
    state = ctx.parallel_state(pp=parsed.pp, dp=1)
    pp_group = dist.new_group(list(range(parsed.pp)))  # every pool rank takes part, in the same order
    embedding_group = dist.new_group(sorted({0, last_stage_rank(parsed.pp, parsed.vpp)}))
    if state is None:
        return None
    peer = PipeliningSide(work, parsed.pp, parsed.vpp, state.pp_rank, pp_group, embedding_group, state.device)
    return work.megalith_side(layout, state), peer


def build_pp2_1f1b(ctx, work: Work):
    return build(ctx, work, "pp2.1f1b")


def build_pp4_1f1b(ctx, work: Work):
    return build(ctx, work, "pp4.1f1b")


def build_pp2_interleaved(ctx, work: Work):
    return build(ctx, work, "pp2.vpp2.interleaved-1f1b")


def cases(config, quick: bool, micro_batch_size: int = 4, micro_batches: int = MICRO_BATCHES) -> list[Case]:
    """The three pipeline rows: pp2 and pp4 1F1B, pp2 interleaved 1F1B with 2 chunks per rank
    (`quick` changes repetitions only, which the driver decides)."""
    del quick
    work = Work(config, micro_batch_size=micro_batch_size, micro_batches=micro_batches)
    return [
        Case("pp2 1F1B", "pipelining", 2, build_pp2_1f1b, work),
        Case("pp4 1F1B", "pipelining", 4, build_pp4_1f1b, work),
        Case("pp2 interleaved 1F1B (2 chunks)", "pipelining", 2, build_pp2_interleaved, work),
    ]
