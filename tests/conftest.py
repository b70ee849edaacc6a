"""Shared fixtures: one pool of ranks per world size for the whole session (starting ranks is slow)."""

import os

import pytest
import torch

from megalith.parallel.spawn import RankPool


# Triton kernels run on a CPU only under the interpreter; it must be chosen before triton is
# imported. On a CUDA machine (scripts/gpu_check.sh) they compile for the GPU instead.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run the full layout matrices, not the sample")


def pytest_collection_modifyitems(config, items):
    """Without --full, leave out (deselect, not skip) the tests marked full."""
    if config.getoption("--full"):
        return
    kept = [item for item in items if item.get_closest_marker("full") is None]
    if len(kept) < len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in kept])
        items[:] = kept


@pytest.fixture(scope="session")
def rank_pools():
    """pools(n) -> a RankPool of n ranks, started on first use and reused by every test."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        if world_size not in pools:
            pools[world_size] = RankPool(world_size, call_timeout_s=240)
        return pools[world_size]

    yield get
    for pool in pools.values():
        pool.close()
