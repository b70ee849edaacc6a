"""Zero-bubble schedules (zb-h1, zb-v) as data: checked, simulated and compared with 1F1B without processes.

Bubble = the simulator's: (makespan - mean busy time per rank) / mean busy time, the makespan from
time 0 to the end of the last action on any rank.
"""

from fractions import Fraction

import pytest

from megalith.cli import build_parser, main
from megalith.errors import ConfigError
from megalith.parallel.pipeline.actions import Action, Kind, holder_of, peer_of, stage_of
from megalith.parallel.pipeline.checks import ScheduleError, check_schedule, peak_in_flight, theoretical_peak_in_flight
from megalith.parallel.pipeline.schedules import (
    SCHEDULES,
    SIMULATED_SCHEDULES,
    build_schedule,
    placement_of,
    validate_schedule_args,
)
from megalith.parallel.pipeline.simulate import predicted_bubble, simulate
from megalith.parallel.pipeline.timeline import describe_schedule, draw_gantt, to_chrome_trace

VPP = {"zb-h1": 1, "zb-v": 2}


def build(name, pp, m):
    return [build_schedule(name, pp, VPP[name], m, rank) for rank in range(pp)]


def run(name, pp, m, f=1, b=1, w=1, p2p=0):
    """Simulate with whole-stage costs: per chunk f / v, b / v, w / v, as describe_schedule does."""
    v = VPP.get(name, 1)
    schedules = build(name, pp, m) if name in VPP else [build_schedule(name, pp, 1, m, r) for r in range(pp)]
    return simulate(schedules, pp, v, m, Fraction(f) / v, Fraction(b) / v, Fraction(p2p), Fraction(w) / v,
                    placement_of(name))


@pytest.mark.parametrize("name", ["zb-h1", "zb-v"])
@pytest.mark.parametrize("pp", [2, 4])
@pytest.mark.parametrize("factor", ["pp", "2pp", "16"])
def test_checks_pass_at_the_briefs_sizes(name, pp, factor):
    m = {"pp": pp, "2pp": 2 * pp, "16": 16}[factor]
    schedules = build(name, pp, m)
    check_schedule(schedules, pp, VPP[name], m, placement_of(name))
    for rank, actions in enumerate(schedules):
        assert peak_in_flight(actions) == theoretical_peak_in_flight(name, pp, VPP[name], m, rank)


@pytest.mark.parametrize("name", ["zb-h1", "zb-v"])
def test_every_size_up_to_pp_8_and_16_microbatches_checks(name):
    for pp in range(2, 9):
        for m in range(1, 17):
            schedules = build(name, pp, m)
            check_schedule(schedules, pp, VPP[name], m, placement_of(name))
            peaks = [peak_in_flight(actions) for actions in schedules]
            assert peaks == [theoretical_peak_in_flight(name, pp, VPP[name], m, r) for r in range(pp)], (pp, m)


def test_goals_at_pp_4_and_16_microbatches():
    """1F1B with a fused backward of cost b + w against zb-h1 and zb-v, f = b = w = 1."""
    one_f_one_b = run("1f1b", 4, 16).bubble_fraction
    zb_h1, zb_v = run("zb-h1", 4, 16).bubble_fraction, run("zb-v", 4, 16).bubble_fraction
    assert (one_f_one_b, zb_h1, zb_v) == (Fraction(3, 16), Fraction(1, 16), Fraction(1, 32))
    assert zb_h1 <= Fraction(2, 5) * one_f_one_b  # a third
    # zb-v reaches the floor of any schedule: rank 3 waits 3 half-stage forwards (1.5) before its first
    # action, then works m (f + b + w) = 48, so the bubble is at least 1.5 / 48 = (1/6) x 1F1B's; 0.15x
    # cannot be reached under this definition (it would need f / (2 (f + b + w)) <= 0.15)
    assert zb_v == Fraction(3, 2) / 48 == one_f_one_b / 6
    h1_peaks = [peak_in_flight(a) for a in build("zb-h1", 4, 16)]
    one_f_one_b_peaks = [peak_in_flight(build_schedule("1f1b", 4, 1, 16, r)) for r in range(4)]
    assert h1_peaks == [4, 4, 4, 4] and one_f_one_b_peaks == [4, 3, 2, 1]
    assert max(h1_peaks) <= max(one_f_one_b_peaks)
    assert [peak_in_flight(a) for a in build("zb-v", 4, 16)] == [8, 8, 8, 8]  # half-stage chunks: 4 stages' worth


@pytest.mark.parametrize("costs", [(1, 1, 1), (1, 2, 1), (2, 1, 1), (1, 1, Fraction(1, 2)), (1, Fraction(3, 2), Fraction(1, 2))])
def test_zb_h1_bubble_equals_the_papers_formula(costs):
    f, b, w = costs
    for pp, m in [(2, 2), (4, 4), (4, 16), (8, 16)]:
        assert run("zb-h1", pp, m, f, b, w).bubble_fraction == predicted_bubble("zb-h1", pp, 1, m, f, b, w), (pp, m)
    assert predicted_bubble("zb-h1", 4, 1, 16, 1, 1, 3) is None and predicted_bubble("zb-v", 4, 2, 16) is None


@pytest.mark.parametrize("name", ["zb-h1", "zb-v"])
def test_f_before_b_before_w_and_w_sends_nothing(name):
    for rank, actions in enumerate(build(name, 4, 8)):
        assert not any(a.kind is Kind.BACKWARD for a in actions)
        for chunk in range(VPP[name]):
            for i in range(8):
                f, b, w = (actions.index(Action(k, chunk, i)) for k in (Kind.FORWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT))
                assert f < b < w
        for index, action in enumerate(actions):
            if action.kind is Kind.SEND_BACKWARD:  # the input gradient leaves right after its B
                assert actions[index - 1] == Action(Kind.BACKWARD_INPUT, action.chunk, action.microbatch)
            if action.kind is Kind.BACKWARD_WEIGHT and index + 1 < len(actions):
                assert actions[index + 1].kind is not Kind.SEND_BACKWARD


def test_zb_h1_keeps_1f1b_order_of_forwards_and_backwards():
    for rank in range(4):
        zb = [(a.kind, a.microbatch) for a in build_schedule("zb-h1", 4, 1, 8, rank) if a.kind in (Kind.FORWARD, Kind.BACKWARD_INPUT)]
        ref = [(a.kind, a.microbatch) for a in build_schedule("1f1b", 4, 1, 8, rank) if a.kind in (Kind.FORWARD, Kind.BACKWARD)]
        assert [(Kind.BACKWARD if k is Kind.BACKWARD_INPUT else k, i) for k, i in zb] == ref


def test_v_placement_and_the_interleaved_one_unchanged():
    pp = 4
    assert [stage_of(r, c, pp, "v") for r in range(pp) for c in (0, 1)] == [0, 7, 1, 6, 2, 5, 3, 4]
    assert all(holder_of(stage_of(r, c, pp, "v"), pp, "v") == (r, c) for r in range(pp) for c in (0, 1))
    assert [stage_of(r, c, pp) for r in range(pp) for c in (0, 1)] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert holder_of(5, pp) == (1, 1)
    assert peer_of(Action(Kind.SEND_FORWARD, 0, 0), 3, pp, "v") == (3, 1)  # the turn of the V stays on rank 3
    assert peer_of(Action(Kind.SEND_BACKWARD, 1, 0), 0, pp, "v") == (1, 1)
    assert peer_of(Action(Kind.RECV_FORWARD, 1, 0), 0, pp, "v") == (1, 1)
    with pytest.raises(ValueError, match="unknown stage placement 'w'"):
        stage_of(0, 0, pp, "w")
    with pytest.raises(ValueError, match="holds chunks 0 and 1, got chunk 2"):
        stage_of(0, 2, pp, "v")


def test_v_receives_follow_the_send_order_on_each_channel():
    """A V channel carries forwards of one chunk and gradients of the other: receiving each just
    before its compute would break NCCL's order on most sizes, so some are posted earlier."""
    from megalith.parallel.pipeline.schedules import _with_comm
    from megalith.parallel.pipeline.zero_bubble import zb_v

    naive = [_with_comm(order, 4, 2, r, "v") for r, order in enumerate(zb_v(4, 8))]
    with pytest.raises(ScheduleError, match="in an order its receives do not follow"):
        check_schedule(naive, 4, 2, 8, "v")
    fixed = build("zb-v", 4, 8)
    assert [[a for a in s if a.kind.is_compute] for s in fixed] == [[a for a in s if a.kind.is_compute] for s in naive]
    assert fixed != naive
    check_schedule(fixed, 4, 2, 8, "v")


def test_the_turn_of_the_v_costs_no_p2p_time():
    """With p2p cost c the V's step is longer, but by less than if the turn were a message too."""
    base, slow = run("zb-v", 2, 4).makespan, run("zb-v", 2, 4, p2p=Fraction(1, 10)).makespan
    assert base < slow
    schedules = build("zb-v", 2, 1)
    result = simulate(schedules, 2, 2, 1, 1, 1, 1, 1, "v")
    times = {(e.rank, e.kind, e.chunk): e for e in result.events}
    assert times[(1, "F", 1)].start == times[(1, "F", 0)].end  # no p2p cost between stage 1 and 2 on rank 1
    assert times[(1, "F", 0)].start == times[(0, "F", 0)].end + 1


def _h1(pp=2, m=2):
    return build("zb-h1", pp, m)


def test_checker_rejects_w_before_b_mixed_backwards_and_a_missing_w():
    schedules = _h1()
    actions = schedules[1]
    b, w = actions.index(Action(Kind.BACKWARD_INPUT, 0, 0)), actions.index(Action(Kind.BACKWARD_WEIGHT, 0, 0))
    actions[b], actions[w] = actions[w], actions[b]
    with pytest.raises(ScheduleError, match="rank 1: BW0.0 comes before BI0.0"):
        check_schedule(schedules, 2, 1, 2)
    schedules = _h1()
    schedules[0].remove(Action(Kind.BACKWARD_WEIGHT, 0, 1))
    with pytest.raises(ScheduleError, match="rank 0: missing BW0.1$"):
        check_schedule(schedules, 2, 1, 2)
    schedules = _h1()
    schedules[0].append(Action(Kind.BACKWARD, 0, 1))
    with pytest.raises(ScheduleError, match="rank 0: extra B0.1"):
        check_schedule(schedules, 2, 1, 2)
    schedules = build("zb-v", 2, 2)
    with pytest.raises(ScheduleError, match="rank 0: missing SF1.0"):  # the V read with the interleaved stages
        check_schedule(schedules, 2, 2, 2)


def test_simulator_costs():
    split = _h1(2, 1)
    with pytest.raises(ScheduleError, match="splits backward; give a weight-gradient cost"):
        simulate(split, 2, 1, 1)
    fused = [build_schedule("1f1b", 2, 1, 1, r) for r in range(2)]
    assert simulate(fused, 2, 1, 1, 1, 2).makespan == 6  # None: today's behaviour
    assert simulate(fused, 2, 1, 1, 1, 2, wgrad_cost=1).makespan == 8  # fused B costs b + w
    assert simulate(split, 2, 1, 1, 1, 2, wgrad_cost=1).makespan == 7  # rank 0's W after its B


def test_the_engine_runs_both_zero_bubble_schedules():
    assert {"zb-h1", "zb-v"} <= set(SCHEDULES) and SIMULATED_SCHEDULES == SCHEDULES
    validate_schedule_args("zb-v", 4, 2, 8)
    validate_schedule_args("zb-h1", 4, 1, 8)
    for args, fragment in [(("zb-v", 4, 1, 8), "zb-v runs two model chunks per rank in a V, got vpp 1"),
                           (("zb-h1", 4, 2, 8), "zb-h1 runs one model chunk per rank, got vpp 2"),
                           (("zb-h1", 1, 1, 8), "zb-h1 needs pp >= 2, got pp 1")]:
        with pytest.raises(ConfigError, match=fragment):
            validate_schedule_args(*args)
    parser = build_parser()
    assert parser.parse_args(["pretrain", "--pipeline-schedule", "zb-v"]).pipeline_schedule == "zb-v"


def test_schedule_command(capsys, tmp_path):
    argv = ["schedule", "--schedule", "zb-v", "--pp", "4", "--micro-batches", "16", "--backward-cost", "1",
            "--wgrad-cost", "1", "--trace", str(tmp_path / "v.json")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "zb-v: pp 4, vpp 2, 16 micro-batches; forward 1, backward 1, weight gradient 1 per stage" in out
    assert "bubble: formula n/a, simulated 0.0312; step time 49.5" in out
    assert "peak in-flight micro-batches per rank: 8, 8, 8, 8" in out
    assert main(argv[:2] + ["zb-h1"] + argv[3:11]) == 0
    assert "bubble: formula 0.0625, simulated 0.0625; step time 51" in capsys.readouterr().out
    assert main(["schedule", "--schedule", "zb-h1", "--pp", "4"]) == 2
    assert "give the weight gradient's cost (--wgrad-cost)" in capsys.readouterr().err
    assert main(["schedule", "--schedule", "zb-v", "--pp", "4", "--vpp", "3", "--wgrad-cost", "1"]) == 2
    assert "use vpp 2" in capsys.readouterr().err


def test_timelines_tell_f_b_and_w_apart(tmp_path):
    result = run("zb-h1", 2, 2)
    names = {e["name"].split(" ")[0] for e in to_chrome_trace(result.events)["traceEvents"] if e["ph"] == "X"}
    assert names == {"F", "BI", "BW"}  # Perfetto colours by name without digits: one colour per kind
    draw_gantt(result.events, tmp_path / "zb.png", "zb-h1")
    assert (tmp_path / "zb.png").read_bytes().startswith(b"\x89PNG")
    assert "wrote" in describe_schedule("zb-v", 2, 2, 4, 1, 1, wgrad_cost=1, png_path=tmp_path / "v.png")
