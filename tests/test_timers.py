"""Named timers: accumulation, log levels, misuse errors, and Megatron's (min, max) report across ranks."""

import time

import pytest
import torch

from megalith.errors import ConfigError
from megalith.training.timers import Timer, TimerError, Timers


class FakeClock:
    """A clock the test moves by hand, so every expected time is exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def report_line(name: str, low: float, high: float) -> str:
    """One line of Megatron's report: four spaces, the name and a space padded with dots to 48."""
    return "    " + name + " " + "." * (47 - len(name)) + f": ({low:.2f}, {high:.2f})"


def test_timer_accumulates_spans_until_read():
    clock = FakeClock()
    timer = Timer("forward", torch.device("cpu"), clock)
    for seconds in (0.5, 0.25, 0.125):
        timer.start()
        clock.advance(seconds)
        timer.stop()
        clock.advance(10.0)  # time between spans is not counted
    assert timer.elapsed(reset=False) == 0.875
    assert timer.elapsed() == 0.875  # reset=True by default
    assert timer.elapsed() == 0.0


def test_reading_a_running_timer_counts_up_to_now_and_keeps_it_running():
    clock = FakeClock()
    timer = Timer("interval-time", torch.device("cpu"), clock)
    timer.start()
    clock.advance(2.0)
    assert timer.elapsed() == 2.0
    assert timer.running
    clock.advance(3.0)
    timer.stop()
    assert timer.elapsed() == 3.0  # the first read reset it, the span continued from there


def test_real_clock_measures_at_least_the_time_slept():
    timers = Timers(0)
    timers("sleep").start()
    time.sleep(0.002)
    timers("sleep").stop()
    assert timers.elapsed_ms(["sleep"])["sleep"] >= 2.0


def test_misuse_is_a_clear_error():
    timers = Timers(0)
    timers("optimizer").start()
    with pytest.raises(TimerError, match=r"^timer 'optimizer' was started twice; stop\(\) it before starting it again$"):
        timers("optimizer").start()
    timers("optimizer").stop()
    with pytest.raises(TimerError, match=r"^timer 'optimizer' was stopped without being started; call start\(\) first$"):
        timers("optimizer").stop()


@pytest.mark.parametrize("level", [-1, 3, 1.0, True, "1"])
def test_timing_log_level_must_be_0_1_or_2(level):
    with pytest.raises(ConfigError) as err:
        Timers(level)
    assert str(err.value).startswith(f"--timing-log-level must be 0, 1 or 2, got {level!r};")
    assert "\n" not in str(err.value)


def test_timers_above_the_level_do_nothing():
    clock = FakeClock()
    timers = Timers(1, clock=clock)
    fine = timers("forward-compute", log_level=2)
    phase = timers("forward-backward", log_level=1)
    fine.start()
    fine.start()  # a no-op timer never complains
    phase.start()
    clock.advance(0.25)
    phase.stop()
    fine.stop()
    assert fine.elapsed() == 0.0
    assert timers.elapsed_ms() == {"forward-backward": 250.0}  # the no-op timer is not listed
    assert timers.elapsed_ms(["forward-compute", "forward-backward"]) == {"forward-compute": 0.0, "forward-backward": 0.0}


def test_a_timer_keeps_its_level():
    timers = Timers(2)
    timers("batch-generator", log_level=2)
    with pytest.raises(ConfigError, match=r"^timer 'batch-generator' was created at log level 2 and is now asked for at 1;"):
        timers("batch-generator", log_level=1)


def test_format_on_one_rank_matches_megatron_layout():
    clock = FakeClock()
    timers = Timers(0, clock=clock)
    for name, seconds in (("forward-backward", 1.2345), ("optimizer", 0.0501)):
        timers(name).start()
        clock.advance(seconds)
        timers(name).stop()
    timers("never-started")
    text = timers.format(reset=False)
    assert text == "\n".join([
        "(min, max) time across ranks (ms):",
        "    forward-backward ...............................: (1234.50, 1234.50)",
        "    optimizer ......................................: (50.10, 50.10)",
    ])
    assert text.splitlines()[1] == report_line("forward-backward", 1234.5, 1234.5)
    # per-iteration average over a log interval of 10, and reset after reading
    assert timers.format(["optimizer"], normalizer=10) == "\n".join([
        "(min, max) time across ranks (ms):", report_line("optimizer", 5.01, 5.01)])
    # only the optimizer was read (and reset); forward-backward still holds its time until read
    assert timers.format() == "\n".join([
        "(min, max) time across ranks (ms):", report_line("forward-backward", 1234.5, 1234.5)])
    assert timers.format() == ""  # now everything was reset and nothing ran since


def test_normalizer_must_be_positive():
    with pytest.raises(ConfigError, match=r"^timer normalizer must be positive, got 0; pass the number of iterations timed$"):
        Timers(0).format(normalizer=0)


def _format_across_two_ranks(ctx):
    import torch.distributed as dist

    clock = FakeClock()
    timers = Timers(2, clock=clock)
    # rank 0 spends 10 ms in forward-backward, rank 1 spends 20 ms; only rank 1 runs the optimizer
    timers("forward-backward").start()
    clock.advance(0.010 * (ctx.rank + 1))
    timers("forward-backward").stop()
    if ctx.rank == 1:
        timers("optimizer", log_level=1).start()
        clock.advance(0.005)
        timers("optimizer", log_level=1).stop()
    timers("recv", log_level=2)  # created everywhere, run nowhere
    union = timers.format(group=dist.group.WORLD, reset=False)  # names differ per rank
    named = timers.format(["optimizer", "forward-backward", "not-a-timer"], group=dist.group.WORLD, normalizer=2)
    after_reset = timers.format(["forward-backward"], group=dist.group.WORLD)
    return union, named, after_reset


def test_format_gathers_min_and_max_over_the_group(rank_pools):
    results = rank_pools(2).run(_format_across_two_ranks)
    assert len(results) == 2
    expected_union = "\n".join([
        "(min, max) time across ranks (ms):",
        report_line("forward-backward", 10.0, 20.0),
        report_line("optimizer", 5.0, 5.0),  # min over the ranks that ran it, as in Megatron
    ])
    expected_named = "\n".join([
        "(min, max) time across ranks (ms):",
        report_line("optimizer", 2.5, 2.5),
        report_line("forward-backward", 5.0, 10.0),
    ])
    for union, named, after_reset in results:
        assert union == expected_union
        assert named == expected_named
        assert after_reset == ""
