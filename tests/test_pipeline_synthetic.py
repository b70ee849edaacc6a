"""The fixed-cost pipeline benchmark's harness: every schedule runs on megalith's engine and on
torch.distributed.pipelining with equal losses, and the analytic times are the issue's formulas.
Nothing here is about time."""

import pytest

from megalith.bench.synthetic_pipeline import SyntheticRun, measure

RUNS = [SyntheticRun("1f1b", 2, 1, 4, 1.0, 2.0), SyntheticRun("interleaved-1f1b", 2, 2, 4, 1.0, 2.0),
        SyntheticRun("gpipe", 2, 1, 4, 1.0, 2.0)]


def test_analytic_step_times():
    assert SyntheticRun("1f1b", 4, 1, 8, 20, 40).analytic_ms == (8 + 3) * 60
    assert SyntheticRun("gpipe", 4, 1, 16, 20, 40).analytic_ms == (16 + 3) * 60
    assert SyntheticRun("interleaved-1f1b", 4, 2, 8, 20, 40).analytic_ms == (8 + 3 / 2) * 60


def test_a_chunk_costs_a_vth_of_the_rank():
    stages = SyntheticRun("interleaved-1f1b", 2, 2, 4, 20, 40).stages(rank=1)
    assert [s.index for s in stages] == [1, 3]
    assert all((s.forward_s, s.backward_s) == (0.01, 0.02) for s in stages)


def test_every_schedule_runs_on_both_sides_with_equal_losses(rank_pools):
    # measure() raises if the last stage's losses differ before anything is timed
    (rows,) = [r for r in rank_pools(2).run(measure, RUNS, 1) if r is not None]
    assert [(r["schedule"], r["vpp"], r["m"]) for r in rows] == [("1f1b", 1, 4), ("interleaved-1f1b", 2, 4),
                                                               ("gpipe", 1, 4)]
    assert all(r["torch_ms"] is not None and r["measured_ms"] > 0 for r in rows)
    assert [r["analytic_ms"] for r in rows] == [15.0, 13.5, 15.0]


def test_the_loss_check_catches_a_different_step():
    from megalith.bench.synthetic_pipeline import _check_losses

    with pytest.raises(AssertionError, match="differs"):
        _check_losses(RUNS[0], rank=1, mine=10.0, theirs=10.5)
    _check_losses(RUNS[0], rank=0, mine=10.0, theirs=0.0)  # only the last stage knows torch's loss
