"""The data-parallel rows of benchmarks/peers.py: megalith dp2 against DistributedDataParallel, and
megalith dp2 with the distributed optimizer against FSDP2's `fully_shard`.

Each peer is PlainGPT with megalith's initial weights, trained the way its users write it: the
rank's contiguous block of the global batch (the rows megalith's batch plan gives the rank), one
micro-batch at a time, gradients synchronised once per step on the last micro-batch (`no_sync` /
`set_requires_gradient_sync`), each micro-batch's mean loss divided by the micro-batch count, so
with the peer's average over ranks the gradient is megalith's: that of the global mean token loss.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megalith.bench.harness import Case
from megalith.bench.stages import adamw, reference_model
from megalith.bench.work import Work

MICRO_BATCHES = 4  # per data-parallel rank per step


class DataParallelSide:
    """PlainGPT wrapped by `wrap` (DDP or FSDP2) on the dp ranks, with AdamW. `zero3` (FSDP2 only)
    shards as ZeRO-3 does: parameters freed after each block's forward and gathered again for its
    backward, gradients reduce-scattered every micro-batch (no unsharded gradient accumulates)."""

    def __init__(self, work: Work, dp_rank: int, group, peer: str, zero3: bool = False) -> None:
        model = reference_model(work)
        if peer == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.model = DistributedDataParallel(model, process_group=group)
        else:
            from torch.distributed.fsdp import fully_shard

            mesh = torch.distributed.device_mesh.DeviceMesh("cpu", list(range(work.dp)))
            for block in model.layers:  # without zero3 ZeRO-1/2-like: no re-gather in backward
                fully_shard(block, mesh=mesh, reshard_after_forward=zero3)
            self.model = fully_shard(model, mesh=mesh, reshard_after_forward=zero3)
        self.optimizer = adamw(self.model.parameters(), work)
        self.work, self.dp_rank, self.group, self.peer, self.zero3 = work, dp_rank, group, peer, zero3

    def _sync(self, last: bool):
        if self.peer == "ddp":
            return contextlib.nullcontext() if last else self.model.no_sync()
        self.model.set_requires_gradient_sync(last or self.zero3)
        return contextlib.nullcontext()

    def step(self, step: int) -> float:
        batch = self.work.global_batch(step)
        size, count = self.work.micro_batch_size, self.work.micro_batches
        start = self.dp_rank * size * count
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(1, dtype=torch.float64)
        for i in range(count):
            rows = slice(start + i * size, start + (i + 1) * size)
            with self._sync(last=i == count - 1):
                loss = self.model(batch["input_ids"][rows], batch["labels"][rows]).mean()
                (loss / count).backward()
            total += loss.detach().double()
        self.optimizer.step()
        dist.all_reduce(total, group=self.group)
        return float(total) / (count * self.work.dp)


def _build(ctx, work: Work, layout: str, peer: str, zero3: bool = False):
    """(megalith `layout`, the peer) on the dp ranks; ZeRO-3 rows give megalith --overlap-param-gather."""
    state = ctx.parallel_state(dp=2)
    group = dist.new_group([0, 1])  # every pool rank takes part in creating it
    if state is None:
        return None
    return work.megalith_side(layout, state, overlap_param_gather=zero3), DataParallelSide(work, state.dp_rank, group, peer, zero3)


def build_ddp(ctx, work: Work):
    """(megalith "dp2", DDP over 2 ranks); None on the pool's other ranks."""
    return _build(ctx, work, "dp2", "ddp")


def build_fsdp2(ctx, work: Work):
    """(megalith "dp2.zero1", FSDP2 over 2 ranks); FSDP2's mesh is the world: a pool of exactly 2."""
    return _build(ctx, work, "dp2.zero1", "fsdp2")


def cases(config, quick: bool, micro_batch_size: int = 4, micro_batches: int = MICRO_BATCHES) -> list[Case]:
    """The two data-parallel rows (`quick` changes repetitions only, which the driver decides)."""
    del quick
    work = Work(config, micro_batch_size=micro_batch_size, micro_batches=micro_batches, dp=2)
    return [Case("dp2", "ddp", 2, build_ddp, work), Case("dp2+distopt", "fsdp2", 2, build_fsdp2, work)]
