"""ParallelState: the process groups of one layout, passed explicitly to whatever communicates.

Built from a RankGrid once torch.distributed is up. `ParallelState.initialize` brings it up
from torchrun's or Slurm's environment; `ParallelState.from_grid` only adds the groups (the
multi-rank harness uses it to try many layouts over one world).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from megalith import device as device_helper
from megalith.errors import ConfigError
from megalith.parallel.grid import ExpertCoords, RankCoords, RankGrid
from megalith.parallel.launch_env import LaunchEnv, read_launch_env

DEFAULT_GLOO_TIMEOUT_S = 60.0
DEFAULT_NCCL_TIMEOUT_S = 600.0


def default_timeout_s(backend: str) -> float:
    """Short on CPU so a dead peer is noticed within about a minute; NCCL start-up needs longer."""
    return DEFAULT_NCCL_TIMEOUT_S if backend == "nccl" else DEFAULT_GLOO_TIMEOUT_S


def _build_groups(grid: RankGrid, rank: int, kinds: tuple[str, ...]) -> dict:
    """Create every group of every kind (a collective call), keep the ones holding `rank`."""
    mine = {}
    for kind in kinds:
        mine[kind] = None
        for ranks in grid.groups(kind):
            group = dist.new_group(ranks)  # every rank must create every group, in the same order
            if rank in ranks:
                mine[kind] = group
    return mine


# With trivial expert axes (ep 1, etp = tp) each expert group is an attention group: reuse it.
_EXPERT_ALIAS = {"ep": None, "etp": "tp", "etp_ep": "tp", "emp": "mp"}


def _expert_groups(grid: RankGrid, rank: int) -> dict:
    """The expert groups holding `rank`, created (collectively) only when the grid has expert axes;
    else none: the expert kinds then read the attention groups (`_expert_group`)."""
    built: dict = {}
    for kind in grid.EXPERT_GROUP_KINDS if grid.has_expert_axes else ():
        built[kind] = None
        for ranks in grid.expert_groups(kind):
            group = dist.new_group(ranks)  # every rank creates every group, in the same order
            if rank in ranks:
                built[kind] = group
    return built


def _expert_group(kind: str) -> property:
    def get(self):
        if kind in self.groups:
            return self.groups[kind]
        if kind == "edp":  # edp = dp x cp
            return self.groups["dp_cp"] if self.grid.cp > 1 else self.groups["dp"]
        alias = _EXPERT_ALIAS[kind]
        return self.groups[alias] if alias else None
    return property(get, doc=f"this rank's expert {kind} group (an attention group when the axes are trivial)")


def _grid_size(axis: str) -> property:
    return property(lambda self: getattr(self.grid, axis), doc=f"ranks along {axis}")


def _coordinate(axis: str) -> property:
    return property(lambda self: getattr(self.grid.coords(self.rank), axis), doc=f"this rank's {axis} coordinate")


def _group(kind: str) -> property:
    return property(lambda self: self.groups[kind], doc=f"this rank's {kind} group (None where it holds none)")


@dataclass(eq=False)
class ParallelState:
    """This rank's place in the layout and its process groups.

    Group attributes: tp_group, pp_group, dp_group, cp_group, mp_group (tp x pp), dp_cp_group,
    embedding_group (None on ranks that hold no embedding); for experts ep_group (None with ep 1),
    etp_group, edp_group, etp_ep_group and emp_group (etp x ep x pp, the expert gradient norm's).
    """

    grid: RankGrid
    rank: int
    device: torch.device
    backend: str
    groups: dict = field(repr=False)
    launch_env: LaunchEnv | None = None

    @classmethod
    def from_grid(cls, grid: RankGrid, *, backend: str | None = None, device: torch.device | None = None,
                  idle_ranks: bool = False):
        """Create the groups of `grid` over the already initialised default process group.

        With `idle_ranks`, the grid may cover only the first ranks of a larger job (a test pool
        trying a small layout): every rank takes part in creating the groups, as torch requires,
        and ranks outside the grid get None."""
        if not dist.is_initialized():
            raise ConfigError("torch.distributed is not initialised; use ParallelState.initialize(...)")
        world = dist.get_world_size()
        if world != grid.world_size and not (idle_ranks and grid.world_size < world):
            raise ConfigError(
                f"layout {grid} needs {grid.world_size} processes but the job has {world}; "
                "make the parallel sizes multiply to the number of processes"
            )
        backend = backend or dist.get_backend()
        rank = dist.get_rank()
        groups = _build_groups(grid, rank, RankGrid.GROUP_KINDS)
        groups |= _expert_groups(grid, rank)  # kept apart: one group object, one kind (the comm ledger)
        if rank >= grid.world_size:
            return None
        return cls(grid, rank, device or torch.device("cpu"), backend, groups)

    @classmethod
    def initialize(
        cls,
        tp: int = 1,
        pp: int = 1,
        cp: int = 1,
        dp: int | None = None,
        ep: int = 1,
        etp: int | None = None,
        *,
        backend: str | None = None,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> "ParallelState":
        """Join the job described by torchrun's or Slurm's environment and build the groups.

        Every argument is checked before any process group is touched.
        """
        launch = read_launch_env(os.environ if env is None else env)
        grid = RankGrid(launch.world_size, tp=tp, pp=pp, cp=cp, dp=dp, ep=ep, etp=etp)
        backend = device_helper.check_backend(backend or device_helper.default_backend())
        if timeout_s is not None and timeout_s <= 0:
            raise ConfigError(f"communication timeout must be positive, got {timeout_s} s")
        device = device_helper.device_for(backend, launch.local_rank)
        device_helper.bind_device(device)
        dist.init_process_group(
            backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=timeout_s or default_timeout_s(backend)),
        )
        state = cls.from_grid(grid, backend=backend, device=device)
        state.launch_env = launch
        return state

    def destroy(self) -> None:
        """Tear down every process group (the default one included)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # --- coordinates and groups, read off the grid and the groups dict ----------------

    tp_size, pp_size, dp_size, cp_size = (_grid_size(axis) for axis in ("tp", "pp", "dp", "cp"))
    tp_rank, pp_rank, dp_rank, cp_rank = (_coordinate(axis) for axis in ("tp", "pp", "dp", "cp"))
    tp_group, pp_group, dp_group, cp_group, mp_group, dp_cp_group, embedding_group = (
        _group(kind) for kind in ("tp", "pp", "dp", "cp", "mp", "dp_cp", "embedding"))
    ep_group, etp_group, edp_group, etp_ep_group, emp_group = (
        _expert_group(kind) for kind in RankGrid.EXPERT_GROUP_KINDS)
    ep_size, etp_size, edp_size = (_grid_size(axis) for axis in ("ep", "etp", "edp"))

    @property
    def expert_coords(self) -> ExpertCoords:
        return self.grid.expert_coords(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.expert_coords.ep

    @property
    def etp_rank(self) -> int:
        return self.expert_coords.etp

    @property
    def edp_rank(self) -> int:
        return self.expert_coords.edp

    @property
    def coords(self) -> RankCoords:
        return self.grid.coords(self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.grid.pp - 1
