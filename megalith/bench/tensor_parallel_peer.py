"""The tp2+SP row of benchmarks/peers.py: megalith tp2 with sequence parallelism against PyTorch's
DTensor tensor parallelism (`torch.distributed.tensor.parallel`) with sequence parallelism and
`loss_parallel`, as torchtitan applies it.

The peer is PlainGPT with megalith's initial weights on a 1-D mesh of 2 ranks. The word embedding
is vocab-sharded (RowwiseParallel, output sharded on the sequence); norms run sequence-parallel;
attention and MLP gather the sequence on entry (PrepareModuleInput), their first linears are
column-parallel, their last row-parallel with a reduce-scatter back onto the sequence. The learned
positions are a replicated table added to the sequence shard. The output layer is the tied
embedding's own DTensor, used column-parallel (logits sharded on the vocabulary), and the loss is
`loss_parallel`'s cross-entropy, the same mean token loss as megalith's step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalith.bench.harness import Case
from megalith.bench.stages import adamw, reference_model
from megalith.bench.work import Work


class PositionAdd(nn.Module):
    """x + the learned position table's first s rows (a module so SequenceParallel replicates it)."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.weight = table.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.weight[: x.shape[1]]


class TensorParallelGPT(nn.Module):
    """PlainGPT's parts in the order DTensor's plan shards them; forward gives sharded logits."""

    def __init__(self, model) -> None:
        super().__init__()
        if model.output_layer is not None or model.position_embeddings is None:
            raise NotImplementedError("the DTensor peer covers the issue's GPT: tied output, learned positions")
        self.word_embeddings, self.positions = model.word_embeddings, PositionAdd(model.position_embeddings)
        self.layers, self.final_norm = model.layers, model.final_norm

    def forward(self, input_ids: torch.Tensor):
        from torch.distributed.tensor import Replicate

        x = self.positions(self.word_embeddings(input_ids))
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x).redistribute(placements=[Replicate()])  # all-gather the sequence
        return x @ self.word_embeddings.weight.t()  # vocab-sharded table: logits Shard(-1)


def parallelize(model: TensorParallelGPT, mesh) -> TensorParallelGPT:
    """torchtitan's plan for a GPT with sequence parallelism on `mesh`."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    tp = mesh.size()
    plan = {"word_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1),
                                               use_local_output=False),
            "positions": SequenceParallel(),
            "final_norm": SequenceParallel()}
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}"
        plan.update({
            f"{prefix}.norm1": SequenceParallel(),
            f"{prefix}.attn": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"{prefix}.attn.q_proj": ColwiseParallel(),
            f"{prefix}.attn.k_proj": ColwiseParallel(),
            f"{prefix}.attn.v_proj": ColwiseParallel(),
            f"{prefix}.attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            f"{prefix}.norm2": SequenceParallel(),
            f"{prefix}.mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            f"{prefix}.mlp.fc1": ColwiseParallel(),
            f"{prefix}.mlp.fc2": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })
        block.attn.num_heads //= tp  # the local tensors hold this rank's heads
        block.attn.num_groups //= tp
    return parallelize_module(model, mesh, plan)


class DTensorSide:
    """The DTensor peer's step: loss_parallel cross-entropy over sharded logits, AdamW on DTensors."""

    def __init__(self, work: Work, mesh) -> None:
        self.work, self.model = work, parallelize(TensorParallelGPT(reference_model(work)), mesh)
        self.optimizer = adamw(self.model.parameters(), work)

    def step(self, step: int) -> float:
        from torch.distributed.tensor.parallel import loss_parallel

        batch = self.work.global_batch(step)
        self.optimizer.zero_grad(set_to_none=True)
        with loss_parallel():
            logits = self.model(batch["input_ids"])
            loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())
            loss.backward()
        self.optimizer.step()
        return float(loss.full_tensor().detach())


def build(ctx, work: Work):
    """(megalith "tp2.sp", the DTensor side) on a pool of exactly 2 (the mesh is the world)."""
    from torch.distributed.device_mesh import DeviceMesh

    state = ctx.parallel_state(tp=2, dp=1)
    if ctx.world_size != 2:
        raise ValueError(f"the DTensor peer's mesh is the whole world; run it on a pool of 2 ranks, not {ctx.world_size}")
    return work.megalith_side("tp2.sp", state), DTensorSide(work, DeviceMesh("cpu", [0, 1]))


def cases(config, quick: bool, micro_batch_size: int = 4) -> list[Case]:
    """The tp2+SP row (`quick` changes repetitions only, which the driver decides)."""
    del quick
    return [Case("tp2+SP", "dtensor", 2, build, Work(config, micro_batch_size=micro_batch_size))]
