"""What a model needs to know about the layout it runs in, bundled so it is passed once."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megalith.parallel import comm
from megalith.parallel.rng import TP_LOCAL, TP_SHARED, RNGStatesTracker


@dataclass
class ParallelContext:
    """The tensor-parallel group (None: one process), sequence parallelism, RNG streams, device, and the
    record of which implementation runs each piece (see with_kernels)."""

    tp_group: object = None
    sequence_parallel: bool = False
    rng_tracker: RNGStatesTracker | None = None
    device: torch.device | None = None
    embedding_group: object = None  # first + last pipeline stage: sums the tied embedding's gradients
    pipeline_group: object = None  # every stage (T5 sums its tables shared between stages over it)
    kernels: object = None  # megalith.kernel_choice.KernelChoice (None: resolved from the config for `device`)
    ep_group: object = None  # expert parallelism: ranks holding different experts (None: ep 1)
    etp_group: object = None  # tensor parallelism inside an expert (None: one rank; = tp_group unless etp is set)
    edp_group: object = None  # the experts' data parallelism (their gradients are summed over it)

    @property
    def ep_size(self) -> int:
        return comm.group_size(self.ep_group)

    @property
    def ep_rank(self) -> int:
        return comm.group_rank(self.ep_group)

    @property
    def etp_size(self) -> int:
        return comm.group_size(self.etp_group)

    @property
    def etp_rank(self) -> int:
        return comm.group_rank(self.etp_group)

    @property
    def tp_size(self) -> int:
        return comm.group_size(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return comm.group_rank(self.tp_group)

    @property
    def hidden_stream(self) -> str:
        """Dropout on hidden states: the same mask on every tp rank unless each holds its own tokens."""
        return TP_LOCAL if self.sequence_parallel else TP_SHARED


@dataclass(frozen=True)
class StageSpec:
    """Which part of a model this module is: global pipeline stage `index` of `count`, holding
    the global layers `layers` (None: all of them)."""

    index: int = 0
    count: int = 1
    layers: tuple[int, ...] | None = None

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.count - 1


def with_kernels(config, ctx: ParallelContext | None) -> ParallelContext:
    """`ctx` (a new default one when None) carrying the kernel record for `config`, resolved once per model."""
    from dataclasses import replace

    from megalith.kernel_choice import kernels_of

    ctx = ctx or ParallelContext()
    return ctx if ctx.kernels is not None else replace(ctx, kernels=kernels_of(config, ctx))
