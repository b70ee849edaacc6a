"""ParallelState: real process groups match the rank grid; bad input fails before any group."""

import pytest
import torch
import torch.distributed as dist

from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid
from megalith.parallel.spawn import RankPool
from megalith.parallel.state import ParallelState

LAYOUTS_OF_8 = [dict(tp=2, pp=2), dict(tp=4), dict(pp=8), dict(tp=2, pp=2, cp=2), dict(tp=2, pp=4)]


def group_members(ctx, layout):
    """For every group kind, the ranks that answer an all-gather over this rank's group."""
    state = ctx.parallel_state(**layout)
    members = {}
    for kind in RankGrid.GROUP_KINDS:
        group = state.groups[kind]
        if group is None:
            members[kind] = None
            continue
        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, torch.tensor([ctx.rank]), group=group)
        members[kind] = [int(t) for t in gathered]
    coords = (state.tp_rank, state.cp_rank, state.dp_rank, state.pp_rank)
    return members, coords, (state.is_first_stage, state.is_last_stage)


@pytest.mark.parametrize("layout", LAYOUTS_OF_8, ids=lambda layout: ".".join(f"{k}{v}" for k, v in layout.items()))
def test_groups_match_the_grid(rank_pools, layout):
    grid = RankGrid(8, **layout)
    for rank, (members, coords, stages) in enumerate(rank_pools(8).run(group_members, layout)):
        for kind in RankGrid.GROUP_KINDS:
            assert members[kind] == grid.group_of(kind, rank), f"rank {rank} {kind} group"
        c = grid.coords(rank)
        assert coords == (c.tp, c.cp, c.dp, c.pp)
        assert stages == (c.pp == 0, c.pp == grid.pp - 1)


def torchrun_env(ctx, launcher):
    port = str(ctx.master_port)
    if launcher == "torchrun":
        return {"RANK": str(ctx.rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(ctx.rank),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    return {"SLURM_PROCID": str(ctx.rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(ctx.rank),
            "SLURM_JOB_NODELIST": "localhost", "MASTER_PORT": port, "SLURM_JOB_ID": "42"}


def initialize_from_env(ctx, launcher):
    state = ParallelState.initialize(tp=2, env=torchrun_env(ctx, launcher), timeout_s=30)
    t = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(t, group=state.tp_group)
    result = (state.launch_env.launcher, state.tp_rank, str(state.device), state.backend, t.item())
    state.destroy()
    return result


@pytest.mark.parametrize("launcher", ["torchrun", "slurm"])
def test_initialize_from_launcher_environment(launcher):
    with RankPool(2, join_world=False) as pool:
        results = pool.run(initialize_from_env, launcher)
    assert results == [(launcher, 0, "cpu", "gloo", 3.0), (launcher, 1, "cpu", "gloo", 3.0)]


TORCHRUN_8 = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(tp=3), "does not divide world size 8"),
        (dict(tp=2, dp=3), "world size 8"),
        (dict(backend="mpi"), "unknown distributed backend 'mpi'"),
        (dict(backend="nccl"), "needs CUDA"),
        (dict(timeout_s=0), "timeout must be positive"),
    ],
)
def test_bad_input_fails_before_any_process_group(kwargs, fragment):
    if kwargs.get("backend") == "nccl" and torch.cuda.is_available():
        pytest.skip("CUDA is present, so nccl is a valid backend here")
    with pytest.raises(ConfigError, match=fragment) as info:
        ParallelState.initialize(env=TORCHRUN_8, **kwargs)
    assert "\n" not in str(info.value)
    assert not dist.is_initialized()
