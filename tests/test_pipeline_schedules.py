"""Schedules as data, checked without processes: every pp <= 8, vpp <= 4, m <= 16 a schedule allows."""

import itertools
from fractions import Fraction

import pytest

from megalith.errors import ConfigError
from megalith.parallel.pipeline.actions import Action, Kind
from megalith.parallel.pipeline.checks import (
    ScheduleError,
    check_schedule,
    peak_in_flight,
    theoretical_peak_in_flight,
)
from megalith.parallel.pipeline.schedules import SCHEDULES, build_schedule, validate_schedule_args
from megalith.parallel.pipeline.simulate import predicted_bubble, simulate


def allowed(name, pp, vpp, m):
    try:
        validate_schedule_args(name, pp, vpp, m)
        return True
    except ConfigError:
        return False


COMBOS = [(name, pp, vpp, m) for name, pp, vpp, m in itertools.product(SCHEDULES, range(1, 9), range(1, 5), range(1, 17))
          if allowed(name, pp, vpp, m)]


def test_the_matrix_covers_every_schedule():
    counts = {name: sum(1 for c in COMBOS if c[0] == name) for name in SCHEDULES}
    assert counts == {"no-pipelining": 16, "gpipe": 128, "1f1b": 128, "interleaved-1f1b": 78}


@pytest.mark.parametrize("name", SCHEDULES)
def test_valid_deadlock_free_bounded_and_bubble_equals_formula(name):
    for _, pp, vpp, m in (c for c in COMBOS if c[0] == name):
        schedules = [build_schedule(name, pp, vpp, m, rank) for rank in range(pp)]
        check_schedule(schedules, pp, vpp, m)
        for rank, actions in enumerate(schedules):
            assert peak_in_flight(actions) == theoretical_peak_in_flight(name, pp, vpp, m, rank), (name, pp, vpp, m, rank)
        # per-chunk costs f/v and b/v: the same total work whatever v
        result = simulate(schedules, pp, vpp, m, Fraction(1, vpp), Fraction(2, vpp))
        assert result.bubble_fraction == predicted_bubble(name, pp, vpp, m), (name, pp, vpp, m)


def test_bubble_with_p2p_cost_is_larger():
    schedules = [build_schedule("1f1b", 4, 1, 8, r) for r in range(4)]
    assert simulate(schedules, 4, 1, 8, 1, 2, p2p_cost=Fraction(1, 2)).bubble_fraction > Fraction(3, 8)


@pytest.mark.parametrize("args,fragment", [
    (("interleaved-1f1b", 4, 2, 6), "multiple of pipeline size 4, got 6; use 4, 8, 12"),
    (("interleaved-1f1b", 1, 2, 4), "needs pp >= 2 and vpp >= 2"),
    (("1f1b", 4, 2, 8), "1f1b runs one model chunk per rank, got vpp 2"),
    (("gpipe", 2, 3, 8), "gpipe runs one model chunk per rank"),
    (("no-pipelining", 2, 1, 4), "no-pipelining runs one stage"),
    (("zero-bubble", 2, 1, 4), "unknown pipeline schedule 'zero-bubble'"),
    (("1f1b", 2, 1, 0), "number of micro-batches must be a positive integer"),
])
def test_unsupported_combinations(args, fragment):
    with pytest.raises(ConfigError) as info:
        build_schedule(*args, rank=0)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def _good(pp=2, m=2):
    return [build_schedule("1f1b", pp, 1, m, r) for r in range(pp)]


def test_checker_rejects_a_backward_before_its_forward():
    schedules = _good()
    actions = schedules[1]
    f, b = actions.index(Action(Kind.FORWARD, 0, 0)), actions.index(Action(Kind.BACKWARD, 0, 0))
    actions[f], actions[b] = actions[b], actions[f]
    with pytest.raises(ScheduleError, match="B0.0 comes before its forward"):
        check_schedule(schedules, 2, 1, 2)


def test_checker_rejects_sends_out_of_receive_order():
    schedules = _good()
    actions = schedules[0]  # rank 0 sends activations of micro-batch 0 and 1 to rank 1: swap the receives
    r0, r1 = actions.index(Action(Kind.RECV_BACKWARD, 0, 0)), actions.index(Action(Kind.RECV_BACKWARD, 0, 1))
    actions[r0], actions[r1] = actions[r1], actions[r0]
    with pytest.raises(ScheduleError):
        check_schedule(schedules, 2, 1, 2)


def test_checker_finds_a_deadlock():
    """Rank 0 holds its activations back until after its backwards, which wait on rank 1, which waits on them."""
    schedules = _good(m=2)
    sends = [a for a in schedules[0] if a.kind is Kind.SEND_FORWARD]
    schedules[0] = [a for a in schedules[0] if a.kind is not Kind.SEND_FORWARD] + sends
    with pytest.raises(ScheduleError, match="the schedule deadlocks: rank 0 at B0.0, rank 1 at F0.0"):
        check_schedule(schedules, 2, 1, 2)


def test_pure_deadlock_is_reported_with_the_stuck_ranks():
    schedules = [[Action(Kind.RECV_BACKWARD, 0, 0), Action(Kind.BACKWARD, 0, 0)],
                 [Action(Kind.RECV_FORWARD, 0, 0), Action(Kind.FORWARD, 0, 0)]]
    with pytest.raises(ScheduleError, match="deadlocks: rank 0 at B0.0, rank 1 at F0.0"):
        simulate(schedules, 2, 1, 1)
