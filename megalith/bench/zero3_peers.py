"""The ZeRO-3 rows of benchmarks/peers.py: megalith's `dp2.zero3` against torch FSDP2 `fully_shard`
(per-block units, reshard_after_forward=True) and against DeepSpeed ZeRO stage 3, on 2 ranks.

All three shard parameters, gradients and optimizer state over the dp ranks, gather each unit's
parameters for its forward and again for its backward, and reduce-scatter each micro-batch's
gradients into the shard (megalith and DeepSpeed by design; FSDP2 because its side syncs every
micro-batch, as a ZeRO-3 user who wants sharded gradients must). The peers' sides are those of the
FSDP2 and DeepSpeed ZeRO-1 rows (`data_parallel_peers`, `deepspeed_peer`) in their ZeRO-3 mode.
megalith runs with --overlap-param-gather (the next unit's all-gather started during this one's
compute), as the peers prefetch by default.
"""

from __future__ import annotations

from megalith.bench.data_parallel_peers import MICRO_BATCHES, _build
from megalith.bench.harness import Case
from megalith.bench.work import Work

WORK_NAME = "dp2 ZeRO-3"
LAYOUT = "dp2.zero3"


def build_fsdp2(ctx, work: Work):
    """(megalith LAYOUT, FSDP2 ZeRO-3 over 2 ranks); FSDP2's mesh is the world: a pool of exactly 2."""
    return _build(ctx, work, LAYOUT, "fsdp2", zero3=True)


def build_deepspeed(ctx, work: Work):
    """(megalith LAYOUT, DeepSpeed ZeRO stage 3 at dp2) on a pool of exactly 2."""
    from megalith.bench.deepspeed_peer import DeepSpeedZeroSide, _deepspeed_world, import_deepspeed

    _deepspeed_world(ctx, 2)
    state = ctx.parallel_state(dp=2)
    deepspeed = import_deepspeed(state.device)
    return work.megalith_side(LAYOUT, state, overlap_param_gather=True), DeepSpeedZeroSide(deepspeed, work, state.dp_rank, stage=3)


def cases(config, quick: bool, micro_batch_size: int = 4, micro_batches: int = MICRO_BATCHES,
          deepspeed: bool = True) -> list[Case]:
    """The FSDP2 row, and the DeepSpeed row when `deepspeed` (it is installed); `quick` is the driver's."""
    del quick
    work = Work(config, micro_batch_size=micro_batch_size, micro_batches=micro_batches, dp=2)
    rows = [Case(WORK_NAME, "fsdp2", 2, build_fsdp2, work)]
    return rows + ([Case(WORK_NAME, "deepspeed", 2, build_deepspeed, work)] if deepspeed else [])
