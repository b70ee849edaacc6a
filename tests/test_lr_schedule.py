"""The LR schedule follows Megatron's OptimizerParamScheduler (counted in samples; with the default global
batch of 1 sample a step is a sample, so these curves read in optimizer steps)."""

from __future__ import annotations

import math

import pytest

from megalith.errors import ConfigError
from megalith.training.lr_schedule import LRSchedule, LRScheduler

# lr 1.0 -> 0.1 over 110 steps with 10 steps of warm-up: the decay phase is steps 10..110 (100 steps).
BASE = dict(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=110)


def test_linear_warmup_then_linear_decay():
    schedule = LRSchedule(**BASE, lr_decay_style="linear")
    expected = {
        0: 0.0,
        5: 0.5,
        10: 1.0,
        35: 0.1 + 0.9 * (1 - 25 / 100),
        60: 0.55,
        109: 0.1 + 0.9 * (1 - 99 / 100),
        110: 0.1,
        111: 0.1,
        500: 0.1,
    }
    for step, lr in expected.items():
        assert schedule.lr_at(step) == pytest.approx(lr, abs=1e-12), step


def test_cosine_decay():
    schedule = LRSchedule(**BASE, lr_decay_style="cosine")
    assert schedule.lr_at(10) == pytest.approx(1.0)
    assert schedule.lr_at(35) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi / 4) + 1))
    assert schedule.lr_at(60) == pytest.approx(0.55)
    assert schedule.lr_at(85) == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(3 * math.pi / 4) + 1))
    assert schedule.lr_at(110) == pytest.approx(0.1)
    assert schedule.lr_at(1000) == pytest.approx(0.1)


def test_constant_keeps_lr_after_warmup_even_past_decay():
    schedule = LRSchedule(**BASE, lr_decay_style="constant")
    assert [schedule.lr_at(s) for s in (0, 5, 10, 60, 110, 1000)] == pytest.approx([0.0, 0.5, 1.0, 1.0, 1.0, 1.0])


def test_inverse_square_root():
    schedule = LRSchedule(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=10000,
                          lr_decay_style="inverse-square-root")
    assert schedule.lr_at(10) == pytest.approx(1.0)
    assert schedule.lr_at(40) == pytest.approx(0.5)  # sqrt(10 / 40)
    assert schedule.lr_at(1000) == pytest.approx(0.1)  # sqrt(10 / 1000)
    assert schedule.lr_at(4000) == pytest.approx(0.1)  # sqrt(10 / 4000) = 0.05, floored at min_lr
    assert schedule.lr_at(10001) == pytest.approx(0.1)


def test_inverse_square_root_without_warmup_counts_from_one():
    schedule = LRSchedule(lr=2.0, train_iters=100, lr_decay_style="inverse-square-root")
    assert schedule.lr_at(0) == pytest.approx(2.0)
    assert schedule.lr_at(1) == pytest.approx(2.0)
    assert schedule.lr_at(4) == pytest.approx(1.0)
    assert schedule.lr_at(16) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "style,coeff",
    [
        ("linear", lambda r: 1 - r),
        ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1)),
        ("exponential", lambda r: 2 * 0.5**r - 1),
        ("minus_sqrt", lambda r: 1 - math.sqrt(r)),
    ],
)
def test_wsd_is_stable_then_anneals_over_the_last_steps(style, coeff):
    # decay ends at 110, the anneal takes the last 20 steps: it starts after step 90
    schedule = LRSchedule(**BASE, lr_decay_style="WSD", lr_wsd_decay_iters=20, lr_wsd_decay_style=style)
    assert schedule.lr_at(5) == pytest.approx(0.5)
    for step in (10, 11, 50, 90):
        assert schedule.lr_at(step) == pytest.approx(1.0), step
    for step in (91, 95, 100, 105, 110):
        r = (step - 90) / 20
        assert schedule.lr_at(step) == pytest.approx(0.1 + 0.9 * coeff(r)), step
    assert schedule.lr_at(110) == pytest.approx(0.1)
    assert schedule.lr_at(111) == pytest.approx(0.1)


def test_wsd_default_anneal_is_exponential():
    schedule = LRSchedule(lr=1.0, train_iters=100, lr_decay_style="WSD", lr_wsd_decay_iters=10)
    assert schedule.lr_at(95) == pytest.approx(2 * 0.5**0.5 - 1)


def test_warmup_starts_from_lr_warmup_init():
    schedule = LRSchedule(lr=1.0, train_iters=100, lr_warmup_iters=4, lr_warmup_init=0.2)
    assert [schedule.lr_at(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_no_warmup_starts_at_lr():
    schedule = LRSchedule(lr=1.0, train_iters=100, lr_warmup_init=0.5)
    assert schedule.warmup_iters == 0
    assert schedule.lr_at(0) == pytest.approx(1.0)
    assert schedule.lr_at(50) == pytest.approx(0.5)


def test_warmup_fraction_is_a_fraction_of_the_decay_iterations_and_may_be_fractional():
    schedule = LRSchedule(lr=1.0, train_iters=150, lr_warmup_fraction=0.01)
    assert schedule.warmup_iters == pytest.approx(1.5)
    assert schedule.lr_at(1) == pytest.approx(1 / 1.5)
    assert schedule.lr_at(2) == pytest.approx(1 - 0.5 / 148.5)
    with_decay = LRSchedule(lr=1.0, train_iters=150, lr_decay_iters=100, lr_warmup_fraction=0.1)
    assert with_decay.warmup_iters == pytest.approx(10.0)
    assert with_decay.lr_at(5) == pytest.approx(0.5)


def test_decay_iters_default_to_train_iters_and_can_end_early():
    assert LRSchedule(lr=1.0, train_iters=100).decay_iters == 100
    schedule = LRSchedule(lr=1.0, min_lr=0.25, train_iters=100, lr_decay_iters=50)
    assert schedule.decay_iters == 50
    assert schedule.lr_at(25) == pytest.approx(0.25 + 0.75 * 0.5)
    assert schedule.lr_at(50) == pytest.approx(0.25)
    assert schedule.lr_at(99) == pytest.approx(0.25)


@pytest.mark.parametrize("style", ["constant", "linear", "cosine", "inverse-square-root", "WSD"])
def test_warmup_as_long_as_the_decay_warms_up_then_holds_min_lr(style):
    schedule = LRSchedule(lr=1.0, min_lr=0.2, train_iters=4, lr_warmup_iters=4, lr_decay_style=style,
                          lr_wsd_decay_iters=2)
    after = 1.0 if style == "constant" else 0.2
    assert [schedule.lr_at(s) for s in range(7)] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, after, after])


def test_negative_step_is_refused():
    with pytest.raises(ValueError, match="step must not be negative"):
        LRSchedule(lr=1.0, train_iters=10).lr_at(-1)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(lr=0.0, train_iters=10), "--lr must be positive, got 0.0"),
        (dict(lr=1.0, train_iters=0), "--train-iters must be at least 1, got 0"),
        (dict(lr=1.0, train_iters=10, min_lr=2.0), "--min-lr 2.0 must lie between 0 and --lr 1.0"),
        (dict(lr=1.0, train_iters=10, min_lr=-0.1), "--min-lr -0.1 must lie between 0 and --lr 1.0"),
        (dict(lr=1.0, train_iters=10, lr_warmup_init=1.5), "--lr-warmup-init 1.5 must lie between 0 and --lr 1.0"),
        (dict(lr=1.0, train_iters=10, lr_decay_style="poly"), "unknown --lr-decay-style 'poly'; choose one of"),
        (dict(lr=1.0, train_iters=10, lr_wsd_decay_style="step"), "unknown --lr-wsd-decay-style 'step'"),
        (dict(lr=1.0, train_iters=10, lr_decay_iters=0), "--lr-decay-iters must be at least 1, got 0"),
        (dict(lr=1.0, train_iters=10, lr_warmup_iters=-1), "--lr-warmup-iters must not be negative, got -1"),
        (
            dict(lr=1.0, train_iters=10, lr_warmup_iters=2, lr_warmup_fraction=0.1),
            "--lr-warmup-fraction 0.1 and --lr-warmup-iters 2 are both set; pass only one of them",
        ),
        (dict(lr=1.0, train_iters=10, lr_warmup_fraction=1.0), "--lr-warmup-fraction must be at least 0 and below 1"),
        (dict(lr=1.0, train_iters=10, lr_warmup_fraction=-0.1), "--lr-warmup-fraction must be at least 0 and below"),
        (dict(lr=1.0, train_iters=10, lr_warmup_iters=11), "warm-up of 11 iterations (--lr-warmup-iters) is longer"),
        (
            dict(lr=1.0, train_iters=100, lr_decay_iters=20, lr_warmup_iters=30),
            "is longer than the 20 decay iterations",
        ),
        (dict(lr=1.0, train_iters=10, lr_decay_style="WSD"), "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
        (
            dict(lr=1.0, train_iters=10, lr_decay_style="WSD", lr_wsd_decay_iters=11),
            "--lr-wsd-decay-iters 11 must lie between 1 and the 10 decay iterations",
        ),
        (dict(lr=1.0, train_iters=10, lr_decay_style="WSD", lr_wsd_decay_iters=0), "--lr-wsd-decay-iters 0 must lie"),
    ],
)
def test_bad_flags_are_one_line(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        LRSchedule(**kwargs)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_scheduler_steps_through_the_schedule():
    schedule = LRSchedule(**BASE, lr_decay_style="cosine")
    scheduler = LRScheduler(schedule)
    seen = []
    for _ in range(120):
        seen.append(scheduler.lr)
        scheduler.step()
    assert scheduler.num_samples == 120
    assert seen == [schedule.lr_at(s) for s in range(120)]


def test_scheduler_state_round_trip():
    schedule = LRSchedule(**BASE, lr_decay_style="linear")
    scheduler = LRScheduler(schedule)
    for _ in range(37):
        scheduler.step()
    state = scheduler.state_dict()
    assert state["num_samples"] == 37
    assert all(isinstance(v, (int, float, str)) for v in state.values())
    resumed = LRScheduler(schedule)
    resumed.load_state_dict(dict(state))
    assert resumed.num_samples == 37
    assert resumed.lr == pytest.approx(0.1 + 0.9 * (1 - 27 / 100))


def test_resuming_with_a_different_schedule_is_refused_unless_overridden():
    old = LRScheduler(LRSchedule(**BASE, lr_decay_style="linear"), num_samples=20)
    new_schedule = LRSchedule(**BASE, lr_decay_style="cosine")
    with pytest.raises(ConfigError) as info:
        LRScheduler(new_schedule).load_state_dict(old.state_dict())
    assert "the checkpoint was trained with --lr-decay-style linear but this run sets cosine" in str(info.value)
    assert "--override-opt-param-scheduler" in str(info.value)
    assert "\n" not in str(info.value)
    overridden = LRScheduler(new_schedule)
    overridden.load_state_dict(old.state_dict(), override_opt_param_scheduler=True)
    assert overridden.num_samples == 20
    assert overridden.lr == pytest.approx(0.1 + 0.9 * 0.5 * (math.cos(math.pi * 0.1) + 1))


def test_state_of_an_older_checkpoint_counted_in_steps_resumes_in_samples():
    """Before the schedule counted samples a checkpoint stored steps of one constant global batch."""
    schedule = LRSchedule(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=110, global_batch_size=8)
    old = {"lr": 1.0, "min_lr": 0.1, "warmup_iters": 10, "decay_iters": 110, "lr_decay_style": "linear",
           "num_steps": 35}
    resumed = LRScheduler(schedule)
    resumed.load_state_dict(old)
    assert resumed.num_samples == 35 * 8 and resumed.lr == schedule.lr_at(35)
    with pytest.raises(ConfigError, match="trained with --lr-decay-iters 110 but this run sets 120"):
        LRScheduler(LRSchedule(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=120,
                               global_batch_size=8)).load_state_dict(old)


def test_state_without_a_count_is_refused():
    with pytest.raises(ConfigError, match="has no 'num_samples'"):
        LRScheduler(LRSchedule(lr=1.0, train_iters=10)).load_state_dict({"lr": 1.0})
