"""Pipeline schedules on stages of fixed cost: megalith's engine and torch.distributed.pipelining
beside the analytic step time.

Each stage is a tiny real computation (`x * w` on a `[micro-batch, 8]` tensor, so gradients and
p2p messages are real) wrapped in a timed sleep: forward sleeps `forward_ms`, backward
`backward_ms`. A sleeping rank gives its core away, so ranks that share the 2 cores do not slow
each other down and the step time measures the schedule and the engine, not the machine. The
costs are per pipeline rank: with v chunks per rank each chunk sleeps a v-th of them, so every
schedule does the same work and only the bubble differs.

With `wgrad_ms` (tw) the weight gradient sleeps apart: right after the input gradient in a fused
backward, or in the W action of a split one (zb-h1), deferred as megalith's linears defer theirs.

Analytic step times, for p stages, m micro-batches, v chunks and per-rank costs tf, tb and tw:
1F1B and GPipe (m + p − 1)·(tf + tb + tw); interleaved 1F1B (m + (p − 1)/v)·(tf + tb + tw);
zero-bubble: the simulator's makespan for the same costs.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from megalith.parallel.pipeline.engine import PipelineEngine
from megalith.parallel.pipeline.actions import stage_of
from megalith.parallel.pipeline.schedules import build_schedule, placement_of
from megalith.parallel.pipeline.simulate import simulate
from megalith.parallel.weight_grad import accumulate_into, active_queue

WIDTH = 8  # features of the tiny tensor each stage passes on


class _Sleep(torch.autograd.Function):
    """y = x * w, forward sleeping `forward_s`, backward `backward_s` for the input gradient and
    `wgrad_s` for the weight gradient: at once (fused), or later through the split backward's
    queue, as megalith's linears do (megalith.parallel.weight_grad)."""

    @staticmethod
    def forward(ctx, x, weight, forward_s, backward_s, wgrad_s):
        ctx.save_for_backward(x, weight)
        ctx.backward_s, ctx.wgrad_s, ctx.queue = backward_s, wgrad_s, active_queue()
        time.sleep(forward_s)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        time.sleep(ctx.backward_s)

        def weight_grad():
            time.sleep(ctx.wgrad_s)
            return (grad * x).sum(0)
        if ctx.queue is None:
            return grad * weight, weight_grad(), None, None, None
        ctx.queue.append(lambda: accumulate_into(weight, weight_grad()))
        return grad * weight, None, None, None, None


class SleepStage(nn.Module):
    """One global stage: megalith's chunk protocol (`pipeline_forward`, `pipeline_shapes`) and a plain
    `forward` for torch.distributed.pipelining, both sleeping the same."""

    def __init__(self, index: int, forward_ms: float, backward_ms: float, wgrad_ms: float = 0.0) -> None:
        super().__init__()
        self.index = index
        self.weight = nn.Parameter(torch.full((WIDTH,), 1.0 + 0.01 * index))
        self.forward_s, self.backward_s, self.wgrad_s = forward_ms / 1000.0, backward_ms / 1000.0, wgrad_ms / 1000.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Sleep.apply(x, self.weight, self.forward_s, self.backward_s, self.wgrad_s)

    def pipeline_forward(self, inputs, batch):
        return (self(batch["x"] if inputs is None else inputs[0]),)

    @staticmethod
    def pipeline_shapes(micro_batch_size: int):
        return [(micro_batch_size, WIDTH)]


@dataclass(frozen=True)
class SyntheticRun:
    """One row: a schedule at p stages, v chunks per rank, m micro-batches, per-rank costs in ms."""

    schedule: str
    pp: int
    vpp: int
    microbatches: int
    forward_ms: float
    backward_ms: float
    wgrad_ms: float = 0.0  # the weight gradient's part; a fused backward costs backward_ms + wgrad_ms
    micro_batch_size: int = 2

    @property
    def analytic_ms(self) -> float:
        per_microbatch = self.forward_ms + self.backward_ms + self.wgrad_ms
        if self.schedule == "interleaved-1f1b":
            return (self.microbatches + (self.pp - 1) / self.vpp) * per_microbatch
        if self.schedule in ("1f1b", "gpipe"):
            return (self.microbatches + self.pp - 1) * per_microbatch
        actions = [build_schedule(self.schedule, self.pp, self.vpp, self.microbatches, r) for r in range(self.pp)]
        return float(simulate(actions, self.pp, self.vpp, self.microbatches, self.forward_ms / self.vpp,
                              self.backward_ms / self.vpp, wgrad_cost=self.wgrad_ms / self.vpp,
                              placement=placement_of(self.schedule)).makespan)

    def stages(self, rank: int) -> list[SleepStage]:
        """This rank's chunks: chunk c is global stage c * pp + rank (megalith's and torch's placement;
        zb-v: stages rank and 2 pp - 1 - rank)."""
        v, placement = self.vpp, placement_of(self.schedule)
        return [SleepStage(stage_of(rank, c, self.pp, placement), self.forward_ms / v, self.backward_ms / v,
                           self.wgrad_ms / v) for c in range(v)]

    def batch(self, microbatch: int) -> dict:
        return {"x": torch.full((self.micro_batch_size, WIDTH), 1.0 + microbatch)}


def _loss(out, batch) -> torch.Tensor:
    """The sum of the last stage's output (megalith passes the chunk's tuple, torch the tensor)."""
    return (out[0] if isinstance(out, tuple) else out).sum()


def _timed_ms(step, group) -> float:
    """One step's milliseconds, between barriers of the pipeline (so the slowest rank's time)."""
    dist.barrier(group=group)
    began = time.perf_counter()
    step()
    dist.barrier(group=group)
    return (time.perf_counter() - began) * 1000.0


def megalith_step(run: SyntheticRun, state):
    """A callable running one step of `run` through megalith's PipelineEngine on this rank."""
    chunks = run.stages(state.pp_rank)
    engine = PipelineEngine(chunks, rank=state.pp_rank, pp=run.pp, pp_group=state.pp_group,
                            micro_batch_size=run.micro_batch_size, dtype=torch.float32, device=state.device,
                            placement=placement_of(run.schedule))
    actions = build_schedule(run.schedule, run.pp, run.vpp, run.microbatches, state.pp_rank)
    return lambda: engine.step(actions, run.batch, _loss).loss


def torch_step(run: SyntheticRun, rank: int, group, device):
    """A callable running one step of `run` through torch.distributed.pipelining (None when torch has
    no such schedule); it returns the step's loss on the last stage, 0 elsewhere. torch's zero-bubble
    schedules split backward through the autograd graph, which cannot separate a custom Function's
    weight gradient from its input gradient, so the sleeping stages have no fair torch zb row."""
    from torch.distributed import pipelining

    classes = {"1f1b": pipelining.Schedule1F1B, "gpipe": pipelining.ScheduleGPipe,
               "interleaved-1f1b": pipelining.ScheduleInterleaved1F1B}
    if run.schedule not in classes:
        return None
    modules = run.stages(rank)
    stages = [pipelining.PipelineStage(m, m.index, run.pp * run.vpp, device, group=group) for m in modules]
    single = run.schedule != "interleaved-1f1b"
    schedule = classes[run.schedule](stages[0] if single else stages, run.microbatches, loss_fn=_loss,
                                     scale_grads=False)
    first = any(m.index == 0 for m in modules)
    last = any(m.index == run.pp * run.vpp - 1 for m in modules)
    inputs = torch.cat([run.batch(i)["x"] for i in range(run.microbatches)])

    def step() -> float:
        losses: list[torch.Tensor] = []
        schedule.step(*((inputs,) if first else ()), target=inputs if last else None,
                      losses=losses if last else None, return_outputs=False)
        return float(sum(loss.item() for loss in losses)) if last else 0.0
    return step


def _check_losses(run: SyntheticRun, rank: int, mine: float, theirs: float) -> None:
    """Both sides computed the same step before either is timed (the last stage knows torch's loss)."""
    if rank == (run.pp * run.vpp - 1) % run.pp and abs(mine - theirs) > 1e-6 * abs(mine):
        raise AssertionError(f"{run.schedule}: megalith's loss {mine} differs from torch's {theirs}")


def measure(ctx, runs: list[SyntheticRun], repeats: int, warmup: int = 1) -> list[dict] | None:
    """On every rank of a RankPool of max(pp) ranks: each run timed on megalith and on torch,
    alternating (megalith, torch, ...) after `warmup` untimed steps of each. The first rank's rows."""
    rows = []
    for run in runs:
        state = ctx.parallel_state(pp=run.pp, dp=1)
        group = dist.new_group(list(range(run.pp)))  # torch's own group; every pool rank creates it
        if state is None:
            continue
        mine = megalith_step(run, state)
        theirs = torch_step(run, state.pp_rank, group, state.device)
        for _ in range(warmup):
            loss = mine()
            if theirs is not None:
                _check_losses(run, state.pp_rank, loss, theirs())
        mine_ms, theirs_ms = [], []
        for _ in range(repeats):
            mine_ms.append(_timed_ms(mine, state.pp_group))
            if theirs is not None:
                theirs_ms.append(_timed_ms(theirs, group))
        rows.append({"schedule": run.schedule, "pp": run.pp, "vpp": run.vpp, "m": run.microbatches,
                     "measured_ms": statistics.median(mine_ms), "analytic_ms": run.analytic_ms,
                     "torch_ms": statistics.median(theirs_ms) if theirs_ms else None})
    return rows if ctx.rank == 0 else None
