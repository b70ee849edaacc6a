"""Checkpoints across ZeRO strategies: saved under any sharding strategy and dp, loaded under any
other (the files hold global tensors, whatever was sharded); bitwise resume when nothing changes.
Runs are trained, saved and resumed as in tests/test_checkpoint.py."""

from pathlib import Path

import pytest

from megalith.testing import relative_error
from megalith.training.checkpoint_format import CheckpointReader
from test_checkpoint import _train as train
from test_checkpoint import assert_continues_under, assert_resumes_bitwise

STRATEGY = "--data-parallel-sharding-strategy"
LAYOUTS = {
    "dp1": ([], 1),
    "dp2.optim": ([STRATEGY, "optim"], 2),
    "dp2.zero2": ([STRATEGY, "optim_grads"], 2),
    "dp4.zero3": ([STRATEGY, "optim_grads_params"], 4),
    "dp4.zero3.bf16": ([STRATEGY, "optim_grads_params", "--bf16"], 4),
    "tp2.dp2.zero3": (["--tensor-model-parallel-size", "2", STRATEGY, "optim_grads_params"], 4),
    "tp1.pp2": (["--pipeline-model-parallel-size", "2"], 2),
    "pp2.dp2.zero3": (["--pipeline-model-parallel-size", "2", STRATEGY, "optim_grads_params"], 4),
}


def _train(pool, layout: str, log: Path, extra: list[str]) -> list[dict]:
    return train(pool, layout, log, extra, LAYOUTS)


@pytest.mark.parametrize("layout", ["dp4.zero3", "dp2.zero2", "dp4.zero3.bf16", "pp2.dp2.zero3"])
def test_resume_under_zero_is_bitwise(rank_pools, tmp_path, layout):
    """6 iterations straight == 3, save, load under the same layout, 3 more: identical numbers."""
    assert_resumes_bitwise(rank_pools(8), tmp_path, layout, LAYOUTS)


@pytest.mark.parametrize("source, target", [
    ("dp4.zero3", "dp1"),  # sharded parameters, gradients and state -> one process
    ("dp2.optim", "dp4.zero3"),  # ZeRO-1 -> ZeRO-3 over more ranks
    ("tp2.dp2.zero3", "tp1.pp2"),  # tensor-parallel shards of ZeRO-3 shards -> pipeline stages
    ("dp2.zero2", "dp4.zero3"),
])
def test_a_checkpoint_moves_between_strategies(rank_pools, tmp_path, source, target):
    """Saved under `source` after 3 iterations, continued under `target`: the losses and norms of
    the uninterrupted `source` run, to 1e-6."""
    assert_continues_under(rank_pools(8), tmp_path, source, target, LAYOUTS)


def test_a_zero3_checkpoint_holds_the_global_tensors_of_one_process(rank_pools, tmp_path):
    """The files do not depend on the strategy: after two identical steps, zero3 dp4 writes what
    one process writes (names, shapes, values to fp32 rounding), optimizer state included."""
    pool = rank_pools(8)
    for layout in ("dp4.zero3", "dp1"):
        _train(pool, layout, tmp_path / f"{layout}.jsonl", ["--save", str(tmp_path / layout), "--exit-interval", "2"])
    sharded = CheckpointReader(str(tmp_path / "dp4.zero3" / "iter_0000002"))
    whole = CheckpointReader(str(tmp_path / "dp1" / "iter_0000002"))
    assert sharded.names() == whole.names() and any(n.startswith("optimizer/exp_avg_sq/") for n in whole.names())
    assert all(sharded.shape(n) == whole.shape(n) for n in whole.names())
    worst = max(relative_error(sharded.read(n), whole.read(n)) for n in whole.names())
    assert worst < 1e-5
    assert sharded.metadata["layout"]["zero"] == 3 and whole.metadata["layout"]["zero"] == 0
