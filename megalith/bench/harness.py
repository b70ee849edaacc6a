"""Running a peer case: both sides built on the pool's ranks, losses checked, steps timed alternately
(megalith, peer, megalith, ...) after barriers, medians of the slowest rank per step."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch.distributed as dist

from megalith.bench.work import Work
from megalith.testing import FP32_RELATIVE_TOLERANCE

PEERS = ("plain", "dtensor", "ddp", "fsdp2", "pipelining", "deepspeed")


class Side(Protocol):
    def step(self, step: int) -> float:
        """One full training step on work.global_batch(step); the same loss on every rank of the side."""


@dataclass(frozen=True)
class Case:
    work_name: str
    peer: str
    ranks: int
    build: Callable
    work: Work


@dataclass(frozen=True)
class Row:
    work: str
    peer: str
    megalith_ms: float
    peer_ms: float
    ratio: float

    def to_json(self) -> dict:
        return asdict(self)


def _on_rank(ctx, case: Case, repeats: int, warmup: int):
    group = dist.new_group(list(range(case.ranks)))  # every pool rank takes part in creating it
    sides = case.build(ctx, case.work)
    if sides is None:
        return None
    losses = [[side.step(i) for i in range(warmup)] for side in sides]
    times = ([], [])
    for i in range(repeats):
        for which, side in enumerate(sides):
            dist.barrier(group=group)
            began = time.perf_counter()
            side.step(warmup + i)
            times[which].append(time.perf_counter() - began)
    return losses, times


def run_case(pool, case: Case, repeats: int, warmup: int = 2) -> Row:
    results = [r for r in pool.run(_on_rank, case, repeats, warmup) if r is not None]
    for losses, _ in results:
        ours, theirs = losses
        for a, b in zip(ours, theirs):
            if not abs(a - b) / abs(a) < FP32_RELATIVE_TOLERANCE:
                raise AssertionError(f"{case.work_name} vs {case.peer}: losses {ours} and {theirs} differ")
    slowest = [[max(step) for step in zip(*(r[1][w] for r in results))] for w in (0, 1)]
    ms = [statistics.median(t) * 1e3 if t else float("nan") for t in slowest]
    return Row(case.work_name, case.peer, ms[0], ms[1], ms[0] / ms[1])
