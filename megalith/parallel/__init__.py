"""Parallelism building blocks: rank grid, process groups, collectives, layers, harness."""

from megalith.parallel.grid import RankCoords, RankGrid
from megalith.parallel.spawn import RankContext, RankFailedError, RankPool, run_on_ranks

__all__ = ["RankCoords", "RankGrid", "RankContext", "RankFailedError", "RankPool", "run_on_ranks"]
