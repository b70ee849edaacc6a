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
from megalith.parallel.pipeline.schedules import SCHEDULES, ZERO_BUBBLE_SCHEDULES, build_schedule, validate_schedule_args

FUSED = tuple(s for s in SCHEDULES if s not in ZERO_BUBBLE_SCHEDULES)  # zb-*: tests/test_zero_bubble_schedules.py
from megalith.parallel.pipeline.simulate import predicted_bubble, simulate


def allowed(name, pp, vpp, m):
    try:
        validate_schedule_args(name, pp, vpp, m)
        return True
    except ConfigError:
        return False


COMBOS = [(name, pp, vpp, m) for name, pp, vpp, m in itertools.product(FUSED, range(1, 9), range(1, 5), range(1, 17))
          if allowed(name, pp, vpp, m)]


def test_the_matrix_covers_every_schedule():
    counts = {name: sum(1 for c in COMBOS if c[0] == name) for name in FUSED}
    assert counts == {"no-pipelining": 16, "gpipe": 128, "1f1b": 128, "interleaved-1f1b": 336}


def _textbook(name, pp, m):
    """Combinations the textbook formulas describe: interleaved only when pp divides m."""
    return name != "interleaved-1f1b" or m % pp == 0


@pytest.mark.parametrize("name", FUSED)
def test_valid_deadlock_free_bounded_and_bubble_equals_formula(name):
    for _, pp, vpp, m in (c for c in COMBOS if c[0] == name and _textbook(*c[0:2], c[3])):
        schedules = [build_schedule(name, pp, vpp, m, rank) for rank in range(pp)]
        check_schedule(schedules, pp, vpp, m)
        for rank, actions in enumerate(schedules):
            assert peak_in_flight(actions) == theoretical_peak_in_flight(name, pp, vpp, m, rank), (name, pp, vpp, m, rank)
        # per-chunk costs f/v and b/v: the same total work whatever v
        result = simulate(schedules, pp, vpp, m, Fraction(1, vpp), Fraction(2, vpp))
        assert result.bubble_fraction == predicted_bubble(name, pp, vpp, m), (name, pp, vpp, m)


def test_interleaved_with_any_number_of_micro_batches():
    """m not a multiple of pp (the last group of micro-batches is short, as Megatron-Core's table): checked,
    deadlock-free, within the same in-flight bound, and never a larger bubble than 1F1B's at the same m."""
    combos = [c for c in COMBOS if c[0] == "interleaved-1f1b" and not _textbook(c[0], c[1], c[3])]
    assert len(combos) == 258
    for _, pp, vpp, m in combos:
        schedules = [build_schedule("interleaved-1f1b", pp, vpp, m, rank) for rank in range(pp)]
        check_schedule(schedules, pp, vpp, m)
        for rank, actions in enumerate(schedules):
            assert peak_in_flight(actions) <= theoretical_peak_in_flight("interleaved-1f1b", pp, vpp, m, rank)
        one = [build_schedule("1f1b", pp, 1, m, rank) for rank in range(pp)]
        bubble = simulate(schedules, pp, vpp, m, Fraction(1, vpp), Fraction(2, vpp)).bubble_fraction
        assert bubble <= simulate(one, pp, 1, m, 1, 2).bubble_fraction, (pp, vpp, m)


def test_bubble_with_p2p_cost_is_larger():
    schedules = [build_schedule("1f1b", 4, 1, 8, r) for r in range(4)]
    assert simulate(schedules, 4, 1, 8, 1, 2, p2p_cost=Fraction(1, 2)).bubble_fraction > Fraction(3, 8)


@pytest.mark.parametrize("args,fragment", [
    (("interleaved-1f1b", 1, 2, 4), "needs pp >= 2 and vpp >= 2"),
    (("1f1b", 4, 2, 8), "1f1b runs one model chunk per rank, got vpp 2"),
    (("gpipe", 2, 3, 8), "gpipe runs one model chunk per rank"),
    (("no-pipelining", 2, 1, 4), "no-pipelining runs one stage"),
    (("zero-bubble", 2, 1, 4), "unknown pipeline schedule 'zero-bubble'"),
    (("1f1b", 2, 1, 0), "number of micro-batches must be a positive integer"),
    (("1f1b", True, 1, 4), "pipeline size must be a positive integer"),
])
def test_unsupported_combinations(args, fragment):
    with pytest.raises(ConfigError) as info:
        build_schedule(*args, rank=0)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_rank_outside_the_pipeline():
    with pytest.raises(ConfigError, match="pipeline rank 4 is outside 0..3"):
        build_schedule("1f1b", 4, 1, 8, rank=4)


def test_interleaved_chunk_order_follows_megatron():
    """Groups of pp micro-batches per chunk: forwards through chunks ascending, backwards descending."""
    actions = build_schedule("interleaved-1f1b", 2, 2, 4, rank=1)
    forwards = [(a.chunk, a.microbatch) for a in actions if a.kind is Kind.FORWARD]
    backwards = [(a.chunk, a.microbatch) for a in actions if a.kind is Kind.BACKWARD]
    assert forwards == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    assert backwards == [(1, 0), (1, 1), (0, 0), (0, 1), (1, 2), (1, 3), (0, 2), (0, 3)]


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
    """Each send still follows its forward (structure is fine), but rank 0 sends micro-batch 1 before 0."""
    schedules = [build_schedule("gpipe", 2, 1, 2, r) for r in range(2)]
    actions = schedules[0]
    assert actions[:4] == [Action(Kind.FORWARD, 0, 0), Action(Kind.SEND_FORWARD, 0, 0),
                           Action(Kind.FORWARD, 0, 1), Action(Kind.SEND_FORWARD, 0, 1)]
    actions[:4] = [actions[0], actions[2], actions[3], actions[1]]
    with pytest.raises(ScheduleError, match="rank 0 sends to rank 1 in an order its receives do not follow"):
        check_schedule(schedules, 2, 1, 2)


def test_checker_rejects_a_receive_after_its_compute_and_a_missing_send():
    schedules = _good()
    actions = schedules[1]
    receive = actions.index(Action(Kind.RECV_FORWARD, 0, 0))
    actions.insert(receive + 1, actions.pop(receive))
    with pytest.raises(ScheduleError, match="rank 1: F0.0 comes before RF0.0"):
        check_schedule(schedules, 2, 1, 2)
    schedules = _good()
    schedules[0].remove(Action(Kind.SEND_FORWARD, 0, 1))
    with pytest.raises(ScheduleError, match="rank 0: missing SF0.1"):
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
