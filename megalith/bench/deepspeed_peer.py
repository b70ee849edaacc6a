"""DeepSpeed against megalith: its pipeline engine at pp2 (against "pp2.1f1b") and ZeRO stage 1
at dp2 (against "dp2.zero1"), fp32, over the pool's gloo world, with torch's AdamW as the client
optimizer so that nothing is compiled.

The pipeline is a `PipelineModule` over PlainGPT's pieces as a DeepSpeed user writes one: the
word embedding as a `TiedLayerSpec` that the last stage reuses for the logits (DeepSpeed then
sums the two copies' gradients over the stages that hold them, as megalith does), the position
embedding, the layers, the final norm; partitioned uniformly, which puts megalith's layers on
each stage (checked). `train_batch` runs DeepSpeed's own 1F1B schedule over the micro-batches,
scales each micro-batch's loss by 1 / micro-batches and returns their mean.

DeepSpeed's engines take the whole torch.distributed world as theirs (`PipelineParallelGrid`
asserts that its topology covers the world; ZeRO reduces over the world unless given an mpu), so
these cases need a pool of exactly their ranks: `build` refuses a larger one.

On a CPU-only machine nothing more than `pip install deepspeed` is needed: with
`DS_ACCELERATOR=cpu` (set here when the pool runs on CPU) DeepSpeed picks its CPU accelerator,
whose communication backend falls back to gloo without Intel's oneCCL bindings, and wraps the
world the pool already started; IPEX is not needed for fp32 and torch's optimizer.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megalith.bench.harness import Case
from megalith.bench.pipelining import token_mean_cross_entropy
from megalith.bench.stages import adamw, reference_model, stage_layers
from megalith.bench.work import Work
from megalith.errors import ConfigError


def import_deepspeed(device: torch.device):
    """deepspeed, quiet, on the pool's device (its CPU accelerator on a CPU pool)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", str(device.index or 0))  # PipelineModule reads it
    import deepspeed

    if device.type == "cpu":  # its shared-memory all-reduce serves inference only: not built (C++, ~40 s)
        vars(deepspeed.ops).setdefault("__compatible_ops__", {})["deepspeed_shm_comm"] = False
    deepspeed.utils.logger.setLevel(logging.WARNING)
    deepspeed.init_distributed(dist_backend=dist.get_backend(), verbose=False)  # wraps the pool's world
    return deepspeed


def ds_config(work: Work, zero_stage: int) -> dict:
    """The same step as megalith's: fp32, no clipping, gradient accumulation over the micro-batches."""
    zero = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # every parameter sharded, as the other sides shard them
    return {
        "train_micro_batch_size_per_gpu": work.micro_batch_size,
        "gradient_accumulation_steps": work.micro_batches,
        "train_batch_size": work.global_batch_size,
        "gradient_clipping": 0.0,
        "steps_per_print": 2**31 - 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch's AdamW as the client optimizer
        "wall_clock_breakdown": False,
    }


class WordEmbedding(nn.Module):
    """The tied table: a lookup on the first stage, the logits' weight on the last."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach().clone())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def tied_logits(embedding: WordEmbedding, hidden: torch.Tensor) -> torch.Tensor:
    return hidden @ embedding.weight.t()


class AddPositions(nn.Module):
    """Learned position embeddings added to the word embeddings."""

    def __init__(self, table: nn.Embedding) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table(torch.arange(x.shape[1], device=x.device))


def pipeline_layers(work: Work) -> tuple[list, list[str]]:
    """PlainGPT as DeepSpeed pipeline layers, and each layer's role (to check the partition)."""
    from deepspeed.pipe import TiedLayerSpec

    model = reference_model(work)
    tied = not work.config.untie_embeddings_and_output_weights
    layers, roles = [TiedLayerSpec("embed", WordEmbedding, model.word_embeddings.weight)], ["embedding"]
    if model.position_embeddings is not None:
        layers.append(AddPositions(model.position_embeddings))
        roles.append("embedding")
    layers += list(model.layers)
    roles += [f"layer {i}" for i in range(len(model.layers))]
    layers.append(model.final_norm)
    roles.append("head")
    if tied:
        layers.append(TiedLayerSpec("embed", WordEmbedding, model.word_embeddings.weight, forward_fn=tied_logits))
    else:
        layers.append(model.output_layer)
    roles.append("head")
    return layers, roles


def check_partition(parts: list[int], roles: list[str], expected: list[list[int]]) -> None:
    """DeepSpeed's stages hold megalith's layers (the embedding first, the head last), or this raises."""
    for stage, layers in enumerate(expected):
        held = roles[parts[stage]:parts[stage + 1]]
        want = (["embedding"] * roles.count("embedding") if stage == 0 else []) + [f"layer {i}" for i in layers]
        want += ["head", "head"] if stage == len(expected) - 1 else []
        if held != want:
            raise RuntimeError(f"DeepSpeed's stage {stage} holds {held}, megalith's {want}")


class DeepSpeedPipelineSide:
    """DeepSpeed's PipelineEngine (its 1F1B train schedule) over this rank's stage."""

    def __init__(self, deepspeed, work: Work, pp: int) -> None:
        from deepspeed.pipe import PipelineModule
        from deepspeed.runtime.pipe.topology import PipeDataParallelTopology

        layers, roles = pipeline_layers(work)
        with contextlib.redirect_stdout(io.StringIO()):  # its partition report
            module = PipelineModule(layers, topology=PipeDataParallelTopology(num_pp=pp, num_dp=1),
                                    loss_fn=token_mean_cross_entropy, partition_method="uniform")
        check_partition(module.parts, roles, stage_layers(work, pp))
        self.engine, _, _, _ = deepspeed.initialize(model=module, optimizer=adamw(module.parameters(), work),
                                                    config=ds_config(work, zero_stage=0))
        self.work = work

    def step(self, step: int) -> float:
        batch = self.work.global_batch(step)
        size = self.work.micro_batch_size
        micro = iter([(batch["input_ids"][i:i + size], batch["labels"][i:i + size])
                      for i in range(0, self.work.global_batch_size, size)])
        return float(self.engine.train_batch(data_iter=micro))  # broadcast to every stage by DeepSpeed


class DeepSpeedZeroSide:
    """PlainGPT under DeepSpeed's engine with ZeRO stage `stage` (1 or 3) over the world (the dp ranks).

    Stage 3 gathers a module's own parameters around its forward; PlainGPT's tied logits read the
    word embedding's weight in the root module's forward, so the weight is registered as an
    external parameter of the root (DeepSpeed's documented way; its fetch on attribute access
    would find it too). Every parameter is partitioned (`stage3_param_persistence_threshold` 0):
    DeepSpeed's default keeps those under 100k elements whole on every rank, at this model's
    hidden 256 all but the MLP and embedding weights, which is not the sharding the peers do."""

    def __init__(self, deepspeed, work: Work, dp_rank: int, stage: int = 1) -> None:
        from deepspeed.utils import groups

        groups.mpu = None  # a pipeline engine built earlier in this process left its grid here, for every engine
        model = reference_model(work)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=adamw(model.parameters(), work),
                                                    config=ds_config(work, zero_stage=stage))
        if stage == 3 and model.output_layer is None:
            deepspeed.zero.register_external_parameter(model, model.word_embeddings.weight)
        self.work, self.dp_rank = work, dp_rank

    def step(self, step: int) -> float:
        batch = self.work.global_batch(step)
        size, count = self.work.micro_batch_size, self.work.micro_batches
        start = self.dp_rank * size * count
        total = torch.zeros(1, dtype=torch.float64)
        for i in range(count):
            rows = slice(start + i * size, start + (i + 1) * size)
            loss = self.engine(batch["input_ids"][rows], batch["labels"][rows]).mean()
            self.engine.backward(loss)  # DeepSpeed scales by 1 / micro-batches
            self.engine.step()  # the optimizer steps at the accumulation boundary only
            total += loss.detach().double()
        dist.all_reduce(total)
        return float(total) / (count * self.work.dp)


def _deepspeed_world(ctx, case_ranks: int) -> None:
    if ctx.world_size != case_ranks:
        raise ConfigError(f"DeepSpeed's engines take the whole torch.distributed world; run this case on a pool of "
                          f"exactly {case_ranks} ranks, not {ctx.world_size}")


def build_pipeline(ctx, work: Work):
    """(megalith "pp2.1f1b", DeepSpeed's pipeline engine at pp2) on a pool of 2."""
    _deepspeed_world(ctx, 2)
    state = ctx.parallel_state(pp=2, dp=1)
    deepspeed = import_deepspeed(state.device)
    return work.megalith_side("pp2.1f1b", state), DeepSpeedPipelineSide(deepspeed, work, pp=2)


def build_zero1(ctx, work: Work):
    """(megalith "dp2.zero1", DeepSpeed ZeRO stage 1 at dp2) on a pool of 2."""
    _deepspeed_world(ctx, 2)
    state = ctx.parallel_state(dp=2)
    deepspeed = import_deepspeed(state.device)
    return work.megalith_side("dp2.zero1", state), DeepSpeedZeroSide(deepspeed, work, state.dp_rank)


def cases(config, quick: bool, micro_batch_size: int = 4, micro_batches: int = 8,
          dp_micro_batches: int = 1) -> list[Case]:
    """DeepSpeed's two rows (each needs a pool of exactly 2 ranks; `quick` is the driver's business)."""
    del quick
    return [
        Case("pp2 1F1B", "deepspeed", 2, build_pipeline,
             Work(config, micro_batch_size=micro_batch_size, micro_batches=micro_batches)),
        Case("dp2+distopt", "deepspeed", 2, build_zero1,
             Work(config, micro_batch_size=micro_batch_size, micro_batches=dp_micro_batches, dp=2)),
    ]
