"""fp16 loss scalers follow Megatron's rules: hysteresis on overflow, growth after a clean window."""

from __future__ import annotations

import pytest
import torch

from megalith.errors import ConfigError
from megalith.training.loss_scaler import ConstantLossScaler, DynamicLossScaler, make_loss_scaler

X, OK = True, False  # found_inf: overflow / clean step

# (found_inf, scale after the update), worked out by hand for
# initial 16, min 2, growth interval 3, hysteresis 2.
SCRIPT = [
    (X, 16.0),  # hysteresis 2 -> 1: the first overflow keeps the scale
    (X, 8.0),  # 1 -> 0: halve
    (X, 4.0),  # -1: still spent, halve again
    (OK, 4.0),  # clean 1
    (OK, 4.0),  # clean 2
    (X, 2.0),  # overflow resets the clean count; budget still spent: halve
    (X, 2.0),  # 1.0 would be below min_scale 2: floored
    (OK, 2.0),  # clean 1
    (OK, 2.0),  # clean 2
    (OK, 4.0),  # clean 3 = growth interval: double, refill hysteresis to 2
    (X, 4.0),  # 2 -> 1: kept
    (OK, 4.0),  # clean steps do not refill the budget...
    (X, 2.0),  # ...so this overflow (1 -> 0) halves
    (OK, 2.0),
    (OK, 2.0),
    (OK, 4.0),  # grow
    (OK, 4.0),
    (OK, 4.0),
    (OK, 8.0),  # grow again after another full window
]


def test_dynamic_scaler_follows_the_scripted_sequence():
    scaler = DynamicLossScaler(initial_scale=16.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    assert scaler.scale == 16.0
    for i, (found_inf, expected) in enumerate(SCRIPT):
        scaler.update(found_inf)
        assert scaler.scale == expected, f"after event {i}"
        assert isinstance(scaler.scale, float)


def test_hysteresis_one_halves_on_every_overflow():
    scaler = DynamicLossScaler(initial_scale=64.0, hysteresis=1, growth_interval=1000)
    scales = []
    for _ in range(4):
        scaler.update(True)
        scales.append(scaler.scale)
    assert scales == [32.0, 16.0, 8.0, 4.0]


def test_custom_growth_and_backoff_factors():
    scaler = DynamicLossScaler(initial_scale=100.0, min_scale=1.0, growth_factor=3.0, backoff_factor=0.25,
                               growth_interval=2, hysteresis=1)
    scaler.update(True)
    assert scaler.scale == 25.0
    scaler.update(False)
    scaler.update(False)
    assert scaler.scale == 75.0


def test_dynamic_defaults_are_megatrons():
    scaler = DynamicLossScaler()
    assert scaler.scale == 2.0**32
    for _ in range(999):
        scaler.update(False)
    assert scaler.scale == 2.0**32
    scaler.update(False)
    assert scaler.scale == 2.0**33
    scaler.update(True)
    assert scaler.scale == 2.0**33
    scaler.update(True)
    assert scaler.scale == 2.0**32


def test_dynamic_state_round_trip_resumes_mid_window_and_mid_hysteresis():
    scaler = DynamicLossScaler(initial_scale=16.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    for found_inf, _ in SCRIPT[:11]:
        scaler.update(found_inf)
    state = scaler.state_dict()
    assert state == {"scale": 4.0, "growth_tracker": 0, "hysteresis_tracker": 1}
    resumed = DynamicLossScaler(initial_scale=16.0, min_scale=2.0, growth_interval=3, hysteresis=2)
    resumed.load_state_dict(state)
    for found_inf, expected in SCRIPT[11:]:
        resumed.update(found_inf)
        assert resumed.scale == expected


def test_dynamic_state_accepts_a_tensor_scale():
    scaler = DynamicLossScaler()
    scaler.load_state_dict({"scale": torch.tensor(8.0), "growth_tracker": 5, "hysteresis_tracker": 2})
    assert scaler.scale == 8.0 and isinstance(scaler.scale, float)
    assert scaler.state_dict() == {"scale": 8.0, "growth_tracker": 5, "hysteresis_tracker": 2}


def test_dynamic_state_missing_keys():
    with pytest.raises(ConfigError) as info:
        DynamicLossScaler().load_state_dict({"scale": 4.0})
    assert "lacks growth_tracker, hysteresis_tracker" in str(info.value)
    assert "\n" not in str(info.value)


def test_constant_scaler_never_moves():
    scaler = ConstantLossScaler(128.0)
    for found_inf in (True, True, False, True):
        scaler.update(found_inf)
    assert scaler.scale == 128.0
    assert scaler.state_dict() == {"scale": 128.0}
    other = ConstantLossScaler(64.0)
    other.load_state_dict(scaler.state_dict())
    assert other.scale == 64.0  # this run's --loss-scale wins, as in Megatron


def test_make_loss_scaler():
    assert make_loss_scaler(fp16=False, loss_scale=None) is None
    assert make_loss_scaler(fp16=False, loss_scale=1024.0) is None  # ignored without --fp16, as in Megatron
    constant = make_loss_scaler(fp16=True, loss_scale=1024.0)
    assert isinstance(constant, ConstantLossScaler) and constant.scale == 1024.0
    dynamic = make_loss_scaler(fp16=True, loss_scale=None, initial_loss_scale=256.0, min_loss_scale=64.0,
                               loss_scale_window=2, hysteresis=1)
    assert isinstance(dynamic, DynamicLossScaler) and dynamic.scale == 256.0
    dynamic.update(False)
    dynamic.update(False)
    assert dynamic.scale == 512.0  # window of 2, growth factor 2
    for _ in range(5):
        dynamic.update(True)
    assert dynamic.scale == 64.0  # hysteresis 1, backoff 0.5, floored at --min-loss-scale


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(initial_scale=0.0), "--initial-loss-scale must be positive, got 0.0"),
        (dict(initial_scale=4.0, min_scale=8.0), "--min-loss-scale 8.0 must be positive and at most --initial-loss-s"),
        (dict(min_scale=0.0), "--min-loss-scale 0.0 must be positive"),
        (dict(growth_factor=1.0), "growth factor must be above 1, got 1.0"),
        (dict(backoff_factor=1.0), "backoff factor must lie strictly between 0 and 1, got 1.0"),
        (dict(backoff_factor=0.0), "backoff factor must lie strictly between 0 and 1, got 0.0"),
        (dict(growth_interval=0), "--loss-scale-window must be at least 1, got 0"),
        (dict(hysteresis=0), "--hysteresis must be at least 1, got 0"),
    ],
)
def test_bad_dynamic_arguments_are_one_line(kwargs, fragment):
    with pytest.raises(ConfigError) as info:
        DynamicLossScaler(**kwargs)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_constant_scale_is_one_line():
    with pytest.raises(ConfigError) as info:
        make_loss_scaler(fp16=True, loss_scale=-1.0)
    assert "--loss-scale must be positive, got -1.0" in str(info.value)
    assert "\n" not in str(info.value)


def test_make_loss_scaler_validates_the_dynamic_flags():
    with pytest.raises(ConfigError, match="--loss-scale-window must be at least 1"):
        make_loss_scaler(fp16=True, loss_scale=None, loss_scale_window=0)
