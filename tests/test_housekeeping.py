"""Run housekeeping with Megatron's meanings: --profile's trace window and ranks, --manual-gc,
--empty-unused-memory-level, and what TensorBoard gets (--tensorboard-log-interval, the
validation perplexity, memory and timers). Small GPT runs in this process (world size 1)."""

import gc
import json
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from megalith.config.arguments import parse_pretrain_args
from megalith.config.logs import LoggingConfig
from megalith.config.training import TrainingConfig
from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid
from megalith.parallel.spawn import free_port
from megalith.parallel.state import ParallelState
from megalith.training import housekeeping
from megalith.training.housekeeping import RunHousekeeping, profiler_schedule
from megalith.training.loop import Trainer, pretrain

TINY = ["--mock-data", "--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
        "--vocab-size", "64", "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--no-log-progress-bar",
        "--train-iters", "5"]  # evaluations after iterations 2, 4 and 5 (the last)


@pytest.fixture(scope="module")
def state():
    """A one-process gloo job in this process, so the tests can patch what the loop calls."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield ParallelState.from_grid(RankGrid(1))
    dist.destroy_process_group()


def run(state, flags, tmp_path):
    lines = []
    pretrain(parse_pretrain_args(TINY + ["--tensorboard-dir", str(tmp_path)] + flags, 1), state, print_fn=lines.append)
    return lines


def scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


# --- the profiler's window -------------------------------------------------------------------


def test_the_window_is_megatrons_schedule():
    # 10..12: wait 9 steps, warm up on the 10th, record iterations 10 and 11 (the log line's numbers)
    assert profiler_schedule(10, 12, 0) == {"wait": 9, "warmup": 1, "active": 2, "repeat": 1}
    assert profiler_schedule(0, 3, 0) == {"wait": 0, "warmup": 0, "active": 3, "repeat": 1}
    # a resumed run keeps the same iterations, and profiles nothing once past them
    assert profiler_schedule(10, 12, 5) == {"wait": 4, "warmup": 1, "active": 2, "repeat": 1}
    assert profiler_schedule(10, 12, 10) == {"wait": 0, "warmup": 0, "active": 2, "repeat": 1}
    assert profiler_schedule(10, 12, 11) is None


def test_profile_writes_one_trace_of_the_window_and_housekeeping_runs_at_its_points(state, tmp_path, monkeypatch):
    collects, caches, gc_during_steps = [], [], []
    real_collect, real_step = gc.collect, Trainer.train_step
    monkeypatch.setattr(gc, "collect", lambda *generation: collects.append(generation) or real_collect(*generation))
    monkeypatch.setattr(housekeeping, "_empty_cache", lambda device: caches.append(device.type))

    def step(self):
        gc_during_steps.append(gc.isenabled())
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    assert gc.isenabled()
    run(state, ["--profile", "--profile-step-start", "2", "--profile-step-end", "4", "--manual-gc",
                "--manual-gc-interval", "2", "--empty-unused-memory-level", "2", "--tensorboard-log-interval", "2",
                "--log-memory-to-tensorboard", "--log-timers-to-tensorboard", "--timing-log-level", "1"], tmp_path)

    traces = list(tmp_path.glob("rank0.*.pt.trace.json"))
    assert len(traces) == 1, list(tmp_path.iterdir())
    events = json.loads(traces[0].read_text())["traceEvents"]
    steps = sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})
    assert steps == ["ProfilerStep#2", "ProfilerStep#3"]  # iterations 2 and 3 = start .. end-1
    assert any(e.get("name", "").startswith("aten::") for e in events)  # the step's ops are in it

    assert gc_during_steps == [False] * 5 and gc.isenabled()  # off while training, back on after
    # at the start; every 2 iterations (2, 4); all generations before and the youngest after each evaluation
    assert collects == [(), (), (0,), (), (), (0,), (), (), (0,)]
    assert caches == ["cpu"] * (5 + 3)  # level 2: after every step and after each evaluation

    tags = scalars(tmp_path)
    for tag in ("lm loss", "learning-rate", "mem-max-rss-bytes", "forward-backward-time", "optimizer-time"):
        assert tags[tag] == [2, 4], tag  # --tensorboard-log-interval 2 with a log line every iteration
    assert tags["lm loss validation"] == [2, 4, 5]  # validation whenever it runs, as Megatron
    assert "lm loss validation ppl" not in tags  # only with --log-validation-ppl-to-tensorboard
    assert "mem-allocated-bytes" not in tags  # CUDA's allocator counters; on CPU the peak RSS instead


def test_validation_ppl_with_its_flag_and_memory_emptied_after_steps_only_at_level_1(state, tmp_path, monkeypatch):
    caches = []
    monkeypatch.setattr(housekeeping, "_empty_cache", lambda device: caches.append(device.type))
    run(state, ["--log-validation-ppl-to-tensorboard", "--empty-unused-memory-level", "1"], tmp_path)
    tags = scalars(tmp_path)
    assert tags["lm loss validation ppl"] == tags["lm loss validation"] == [2, 4, 5]
    assert tags["lm loss"] == [1, 2, 3, 4, 5]
    assert "mem-max-rss-bytes" not in tags and "forward-backward-time" not in tags  # their flags are off
    assert caches == ["cpu"] * 5
    assert not list(tmp_path.glob("*.pt.trace.json"))


def test_only_the_listed_ranks_profile(tmp_path):
    training = TrainingConfig(profile=True, profile_step_start=1, profile_step_end=2, profile_ranks=(0,))
    logging = LoggingConfig(tensorboard_dir=str(tmp_path))
    for rank in (1, 0):
        house = RunHousekeeping(training, logging, rank, torch.device("cpu"))
        house.start(0)
        for iteration in (1, 2):
            house.before_step()
            torch.ones(4).sum()
            house.after_step(iteration)
        house.close()
        names = sorted(p.name.split(".")[0] for p in tmp_path.glob("*.pt.trace.json"))
        assert names == ([] if rank == 1 else ["rank0"])


def test_empty_cache_per_level_and_no_gc_changes_without_manual_gc(monkeypatch):
    logging = LoggingConfig()
    for level, expected in ((0, 0), (1, 1), (2, 2)):
        calls = []
        house = RunHousekeeping(TrainingConfig(empty_unused_memory_level=level), logging, 0, torch.device("cpu"),
                                empty_cache=calls.append)
        house.start(0)
        house.after_step(1)
        with house.around_evaluation():
            pass
        house.close()
        assert len(calls) == expected, level
    fake = SimpleNamespace(isenabled=lambda: True, disable=None, collect=None, enable=None)  # any call would fail
    house = RunHousekeeping(TrainingConfig(), logging, 0, torch.device("cpu"), gc_module=fake)
    house.start(0)
    house.after_step(1)
    with house.around_evaluation():
        pass
    house.close()


def test_memory_on_cpu_is_the_peak_resident_set():
    house = RunHousekeeping(TrainingConfig(), LoggingConfig(log_memory_to_tensorboard=True), 0, torch.device("cpu"))
    assert house.tensorboard_scalars(timers=None, iterations=1)["mem-max-rss-bytes"] > 1 << 20


# --- refused at config time, in one line ------------------------------------------------------


@pytest.mark.parametrize("flags, message", [
    (["--profile", "--profile-step-start", "5", "--profile-step-end", "5"],
     "--profile-step-end 5 must be after --profile-step-start 5; the window is iterations start..end-1"),
    (["--profile"], "--profile writes its trace under --tensorboard-dir; add --tensorboard-dir DIR"),
    (["--profile", "--tensorboard-dir", "tb", "--profile-ranks", "0", "2", "3"],
     "--profile-ranks 2 3: the job has ranks 0..1; name ranks of this job"),
    (["--tensorboard-log-interval", "0"], "--tensorboard-log-interval must be an integer >= 1, got 0"),
])
def test_bad_profile_and_logging_flags_are_one_line(flags, message):
    with pytest.raises(ConfigError) as err:
        parse_pretrain_args(TINY + flags, 2)
    assert str(err.value) == message


def test_a_bad_window_without_profile_is_left_alone():
    assert TrainingConfig(profile_step_start=5, profile_step_end=5).profile_step_end == 5


def test_memory_on_cuda_is_megatrons_four_allocator_counters(monkeypatch):
    counters = {"allocated_bytes.all.current": 3, "reserved_bytes.all.current": 8, "allocated_bytes.all.peak": 5,
                "allocation.all.current": 2}
    monkeypatch.setattr(torch.cuda, "memory_stats", lambda device=None: counters)  # no GPU needed
    house = RunHousekeeping(TrainingConfig(), LoggingConfig(log_memory_to_tensorboard=True), 0, torch.device("cuda", 0))
    assert house.tensorboard_scalars(timers=None, iterations=1) == {
        "mem-allocated-bytes": 3, "mem-reserved-bytes": 8, "mem-max-allocated-bytes": 5, "mem-allocated-count": 2}
