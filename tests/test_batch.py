"""Batch arithmetic: every sample of a global batch goes to exactly one rank and micro-batch."""

from __future__ import annotations

import pytest

from megalith.errors import ConfigError
from megalith.training.batch import BatchPlan


def test_sizes_and_slices_of_one_plan():
    plan = BatchPlan(global_batch_size=12, micro_batch_size=2, data_parallel_size=2)
    assert plan.num_micro_batches == 3
    assert plan.local_batch_size == 6
    assert plan.local_slice(0) == slice(0, 6)
    assert plan.local_slice(1) == slice(6, 12)
    assert [plan.micro_slice(0, m) for m in range(3)] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert [plan.micro_slice(1, m) for m in range(3)] == [slice(6, 8), slice(8, 10), slice(10, 12)]


@pytest.mark.parametrize(
    "G,mbs,dp",
    [(1, 1, 1), (8, 1, 1), (8, 8, 1), (8, 2, 4), (12, 3, 2), (24, 2, 3), (32, 4, 8), (30, 5, 3), (64, 1, 64)],
)
def test_micro_slices_cover_the_global_batch_exactly_once_in_rank_major_order(G, mbs, dp):
    plan = BatchPlan(global_batch_size=G, micro_batch_size=mbs, data_parallel_size=dp)
    assert plan.num_micro_batches * mbs * dp == G
    samples = list(range(G))
    order = []
    for rank in range(dp):
        local = samples[plan.local_slice(rank)]
        assert len(local) == G // dp
        assert local == list(range(rank * G // dp, (rank + 1) * G // dp))
        from_micros = []
        for m in range(plan.num_micro_batches):
            micro = samples[plan.micro_slice(rank, m)]
            assert len(micro) == mbs
            from_micros += micro
        assert from_micros == local
        order += from_micros
    assert order == samples


@pytest.mark.parametrize(
    "G,mbs,dp,fragment",
    [
        (
            10, 4, 2,
            "global batch size 10 is not divisible by --micro-batch-size 4 x data-parallel size 2 = 8; "
            "use a --global-batch-size of 8 or 16, or a --micro-batch-size that divides 5 (1 or 5)",
        ),
        (
            7, 1, 2,
            "global batch size 7 is not divisible by --micro-batch-size 1 x data-parallel size 2 = 2; "
            "use a --global-batch-size of 6 or 8",
        ),
        (4, 4, 2, "= 8; use a --global-batch-size of 8, or a --micro-batch-size that divides 2 (2)"),
        (36, 5, 3, "= 15; use a --global-batch-size of 30 or 45, or a --micro-batch-size that divides 12 (4 or 6)"),
        (0, 1, 1, "--global-batch-size must be a positive integer, got 0"),
        (8, 0, 1, "--micro-batch-size must be a positive integer, got 0"),
        (8, 1, -2, "data-parallel size must be a positive integer, got -2"),
    ],
)
def test_bad_batch_sizes_are_one_line(G, mbs, dp, fragment):
    with pytest.raises(ConfigError) as info:
        BatchPlan(global_batch_size=G, micro_batch_size=mbs, data_parallel_size=dp)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_seven_is_not_followed_by_a_micro_batch_hint():
    with pytest.raises(ConfigError) as info:
        BatchPlan(global_batch_size=7, micro_batch_size=1, data_parallel_size=2)
    assert "micro-batch-size that divides" not in str(info.value)


def test_non_integer_sizes_are_refused():
    with pytest.raises(ConfigError, match="--global-batch-size must be a positive integer, got 8.0"):
        BatchPlan(global_batch_size=8.0, micro_batch_size=1, data_parallel_size=1)  # type: ignore[arg-type]


def test_out_of_range_ranks_and_micro_batches():
    plan = BatchPlan(global_batch_size=8, micro_batch_size=2, data_parallel_size=2)
    with pytest.raises(ValueError, match="dp_rank 2 is outside 0..1"):
        plan.local_slice(2)
    with pytest.raises(ValueError, match="micro-batch 2 is outside 0..1"):
        plan.micro_slice(0, 2)
    with pytest.raises(ValueError, match="dp_rank -1"):
        plan.micro_slice(-1, 0)
