"""The multi-rank harness: results in rank order, failures fast and loud, never a hang."""

import os
import time

import pytest
import torch
import torch.distributed as dist

from megalith.parallel.spawn import RankFailedError, RankPool, run_on_ranks


def rank_and_args(ctx, a, b=0):
    return (ctx.rank, ctx.world_size, a + b, os.getpid(), torch.get_num_threads())


def all_reduce_rank(ctx):
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t)
    return t.item()


def raise_on_rank_one(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on purpose")
    dist.all_reduce(torch.ones(1))  # the others block here until the pool kills them
    return "unreachable"


def die_on_rank_two(ctx):
    if ctx.rank == 2:
        os._exit(3)
    dist.all_reduce(torch.ones(1))


def sleep_on_rank_zero(ctx):
    if ctx.rank == 0:
        time.sleep(60)
    return ctx.rank


def tp_group_sum(ctx, tp):
    state = ctx.parallel_state(tp=tp)
    t = torch.tensor([float(ctx.rank)])
    dist.all_reduce(t, group=state.tp_group)
    return state.tp_rank, t.item()


def test_results_in_rank_order_and_pool_reused(rank_pools):
    pool = rank_pools(4)
    first = pool.run(rank_and_args, 1, b=2)
    assert [r[:3] for r in first] == [(r, 4, 3) for r in range(4)]
    assert all(r[4] == 1 for r in first), "every rank must run with one intra-op thread"
    second = pool.run(rank_and_args, 5)
    assert [r[3] for r in second] == [r[3] for r in first], "the pool must reuse its processes"
    assert pool.run(all_reduce_rank) == [6.0] * 4


def test_layout_groups_from_context(rank_pools):
    results = rank_pools(4).run(tp_group_sum, 2)
    assert results == [(0, 1.0), (1, 1.0), (0, 5.0), (1, 5.0)]


def test_failing_rank_brings_everyone_down_with_its_traceback():
    with RankPool(3, call_timeout_s=120) as pool:
        with pytest.raises(RankFailedError) as info:
            pool.run(raise_on_rank_one)
        message = str(info.value)
        assert "rank 1 of 3 failed" in message
        assert "ValueError: boom on purpose" in message
        assert "did not finish" not in message  # failed fast, not by the deadline
        assert not pool.started
        assert pool.run(all_reduce_rank) == [3.0] * 3, "the next call starts a fresh world"


def test_dead_rank_is_reported():
    with pytest.raises(RankFailedError, match=r"rank 2 of 3 died \(exit code 3\)"):
        run_on_ranks(die_on_rank_two, 3)


def test_deadline_kills_a_stuck_call():
    with RankPool(2) as pool:
        with pytest.raises(RankFailedError, match=r"ranks \[0\] did not finish within 2 s"):
            pool.run(sleep_on_rank_zero, timeout_s=2)
        assert not pool.started


def test_bad_world_size():
    from megalith.errors import ConfigError

    with pytest.raises(ConfigError, match="positive integer"):
        RankPool(0)
