"""Megatron's sample-based training: --rampup-batch-size, iterations from --train-samples, and the LR
schedule counted in samples (--lr-decay-samples, --lr-warmup-samples) against the iteration flags."""

from __future__ import annotations

import json

import pytest

from megalith.config.arguments import parse_pretrain_args as parse_with_data_flags
from megalith.errors import ConfigError
from megalith.testing import log_record_errors, pretrain_on_rank
from megalith.training.log_line import parse_log_line
from megalith.training.lr_schedule import LRSchedule, LRScheduler
from megalith.training.rampup import BatchSchedule

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "128", "--micro-batch-size", "1"]


def parse(argv, world_size=1):
    return parse_with_data_flags(["--mock-data", *TINY, *argv], world_size)


# --- the formula, written out here independently of megalith -----------------------------------

def megatron_batch(consumed: int, start: int, increment: int, ramp_samples: int, full: int) -> int:
    """Megatron's current global batch: the full one once past the ramp's samples, else START plus
    INCREMENT for every whole (real-valued) share of the ramp's samples consumed."""
    if consumed > ramp_samples:
        return full
    per_increment = ramp_samples / ((full - start) / increment)
    return start + int(consumed / per_increment) * increment


def megatron_train_iters(train_samples: int, ramp, full: int) -> int:
    """Megatron's update_train_iters: the ramp phase step by step, then whole full batches."""
    consumed = iterations = 0
    while consumed <= ramp[2]:
        consumed += megatron_batch(consumed, *ramp, full)
        iterations += 1
    return iterations + (train_samples - consumed) // full


def sizes_per_iteration(schedule: BatchSchedule, iterations: int) -> list[int]:
    sizes, consumed = [], 0
    for _ in range(iterations):
        sizes.append(schedule.global_batch_size_at(consumed))
        consumed += sizes[-1]
    return sizes


# --- ramp-up ------------------------------------------------------------------------------------

def test_small_ramp_by_hand():
    # 2 -> 8 by 2 in 3 increments over 12 samples: one increment every 4 samples
    schedule = BatchSchedule(8, 1, 2, (2, 2, 12))
    assert sizes_per_iteration(schedule, 8) == [2, 2, 4, 6, 8, 8, 8, 8]  # consumed 0, 2, 4, 8, 14, ...
    assert schedule.batch_sizes() == (2, 4, 6, 8)
    assert [schedule.plan_at(c).num_micro_batches for c in (0, 4, 8, 13)] == [1, 2, 3, 4]
    assert schedule.train_iters(50) == 4 + (50 - 14) // 8
    assert schedule.consumed_after(8) == 14 + 4 * 8


@pytest.mark.parametrize("full, mbs, dp, ramp", [
    (1536, 1, 16, (16, 16, 5859375)),  # Megatron's GPT-3 175B example
    (64, 2, 2, (8, 4, 1000)),
    (30, 1, 1, (3, 3, 10)),  # 10 samples / 9 increments: a real-valued share, truncated as Megatron does
    (12, 1, 2, (2, 2, 7)),
])
def test_ramp_batch_of_every_iteration_is_megatrons(full, mbs, dp, ramp):
    schedule = BatchSchedule(full, mbs, dp, ramp)
    consumed = 0
    while consumed <= ramp[2] + full:  # through the ramp and past it
        size = schedule.global_batch_size_at(consumed)
        assert size == megatron_batch(consumed, *ramp, full), consumed
        assert schedule.plan_at(consumed).num_micro_batches == size // (mbs * dp)
        consumed += size
    assert size == full


@pytest.mark.parametrize("train_samples, full, ramp", [
    (146484375, 1536, (16, 16, 5859375)),
    (1000, 64, (8, 4, 200)),
    (100, 8, (2, 2, 12)),
    (13, 8, (2, 2, 12)),  # the ramp phase overshoots the samples: Megatron's count still
])
def test_iterations_from_samples_with_ramp_are_megatrons(train_samples, full, ramp):
    assert BatchSchedule(full, 1, 1, ramp).train_iters(train_samples) == megatron_train_iters(train_samples, ramp, full)


@pytest.mark.parametrize("samples, gbs, iters", [(100, 8, 12), (96, 8, 12), (7, 1, 7), (1000, 7, 142)])
def test_iterations_from_samples_without_ramp_drop_the_partial_batch(samples, gbs, iters):
    assert BatchSchedule(gbs, 1, 1).train_iters(samples) == iters
    config = parse(["--global-batch-size", str(gbs), "--train-samples", str(samples)])
    assert (config.training.train_iters, config.training.train_samples) == (iters, samples)


def test_resolved_sample_run_writes_back_samples_only():
    config = parse(["--global-batch-size", "8", "--train-samples", "100", "--rampup-batch-size", "2", "2", "12"])
    assert config.training.train_iters == megatron_train_iters(100, (2, 2, 12), 8)
    assert config.to_dict()["training"]["train_iters"] is None  # --config reads it back as a sample run


def test_ramp_with_train_iters_is_accepted_and_ramps_over_samples():
    """Megatron asserts here; its own GPT-3 example script combines the two, so megalith accepts it."""
    config = parse(["--global-batch-size", "8", "--train-iters", "6", "--rampup-batch-size", "2", "2", "12"])
    assert config.training.train_iters == 6
    assert sizes_per_iteration(config.batch_schedule(), 6) == [2, 2, 4, 6, 8, 8]


# --- the LR schedule in samples ---------------------------------------------------------------------

@pytest.mark.parametrize("style", ["linear", "cosine", "inverse-square-root", "WSD", "constant"])
@pytest.mark.parametrize("warmup", [{"iters": 3}, {"fraction": 0.1}])
def test_sample_flags_give_the_iteration_flags_curve(style, warmup):
    gbs = 8
    common = dict(lr=1.0, min_lr=0.05, lr_decay_style=style, global_batch_size=gbs, lr_warmup_init=0.01)
    by_iters = dict(train_iters=40, lr_decay_iters=30, lr_wsd_decay_iters=10)
    by_samples = dict(train_samples=40 * gbs, lr_decay_samples=30 * gbs, lr_wsd_decay_samples=10 * gbs)
    if "iters" in warmup:
        by_iters["lr_warmup_iters"], by_samples["lr_warmup_samples"] = warmup["iters"], warmup["iters"] * gbs
    else:
        by_iters["lr_warmup_fraction"] = by_samples["lr_warmup_fraction"] = warmup["fraction"]
    iterations, samples = LRSchedule(**common, **by_iters), LRSchedule(**common, **by_samples)
    assert [iterations.lr_at(s) for s in range(45)] == [samples.lr_at(s) for s in range(45)]  # bitwise
    assert iterations.decay_samples == samples.decay_samples == 30 * gbs
    assert [samples.lr_at_samples(n) for n in range(0, 45 * gbs, 3)] == \
           [iterations.lr_at_samples(n) for n in range(0, 45 * gbs, 3)]


def test_resolved_sample_run_equals_iteration_run():
    base = ["--global-batch-size", "8", "--lr", "1e-3", "--min-lr", "1e-5", "--lr-decay-style", "cosine"]
    by_iters = parse(base + ["--train-iters", "12", "--lr-decay-iters", "10", "--lr-warmup-iters", "2"])
    by_samples = parse(base + ["--train-samples", "96", "--lr-decay-samples", "80", "--lr-warmup-samples", "16"])
    assert by_iters.training.train_iters == by_samples.training.train_iters == 12
    a, b = LRScheduler(by_iters.lr_schedule()), LRScheduler(by_samples.lr_schedule())
    for _ in range(14):
        assert a.lr == b.lr
        a.step(8)
        b.step(8)
    # defaults: decay over --train-iters x global batch / over --train-samples
    assert parse(base + ["--train-iters", "12"]).lr_schedule().decay_samples == 96
    assert parse(base + ["--train-samples", "100"]).lr_schedule().decay_samples == 100


def test_ramp_steps_count_their_own_batch_in_the_schedule():
    """Megatron's increment is each step's global batch: under ramp-up the rate follows the samples."""
    config = parse(["--global-batch-size", "8", "--train-samples", "100", "--rampup-batch-size", "2", "2", "12",
                    "--lr-warmup-samples", "10", "--lr-decay-samples", "90", "--lr", "1.0"])
    schedule, scheduler, consumed = config.lr_schedule(), LRScheduler(config.lr_schedule()), 0
    for size in sizes_per_iteration(config.batch_schedule(), config.training.train_iters):
        assert scheduler.lr == schedule.lr_at_samples(consumed)
        scheduler.step(size)
        consumed += size
    assert consumed == config.batch_schedule().consumed_after(config.training.train_iters)


def test_scheduler_state_is_in_samples_and_names_the_runs_flags_on_mismatch():
    old = LRScheduler(LRSchedule(lr=1.0, train_samples=1000, lr_decay_samples=800))
    old.step(37)
    state = old.state_dict()
    assert state["num_samples"] == 37 and state["decay_samples"] == 800
    new = LRScheduler(LRSchedule(lr=1.0, train_samples=1000, lr_decay_samples=900))
    with pytest.raises(ConfigError, match="trained with --lr-decay-samples 800 but this run sets 900"):
        new.load_state_dict(state)
    by_iters = LRScheduler(LRSchedule(lr=1.0, train_iters=100, lr_decay_iters=90, global_batch_size=10))
    with pytest.raises(ConfigError, match="--lr-decay-samples 800 but this run sets --lr-decay-iters 90"):
        by_iters.load_state_dict(state)
    new.load_state_dict(state, override_opt_param_scheduler=True)  # keeps this run's schedule, resumes the count
    assert new.num_samples == 37 and new.schedule.decay_samples == 900


# --- bad input, one line each, before any process group --------------------------------------------

@pytest.mark.parametrize("argv, world, fragment", [
    (["--train-iters", "10", "--train-samples", "100"], 1, "--train-iters 10 and --train-samples 100 are both given"),
    (["--global-batch-size", "8", "--rampup-batch-size", "2", "4", "100"], 1,
     "--rampup-batch-size 2 4 100 never reaches --global-batch-size 8 exactly"),
    (["--global-batch-size", "8", "--rampup-batch-size", "2", "2"], 1, "--rampup-batch-size takes 3 values"),
    (["--global-batch-size", "8", "--rampup-batch-size", "2", "2", "2", "2"], 1, "takes 3 values"),
    (["--global-batch-size", "8", "--rampup-batch-size", "8", "8", "100"], 1, "starts at 8, not below"),
    (["--global-batch-size", "8", "--rampup-batch-size", "2", "0", "100"], 1, "must all be positive"),
    (["--global-batch-size", "8", "--rampup-batch-size", "1", "1", "100"], 2,
     "reaches a global batch of 1, which is not divisible by --micro-batch-size 1 x data-parallel size 2 = 2"),
    (["--global-batch-size", "8", "--rampup-batch-size", "2", "3", "100"], 2,
     "--rampup-batch-size 2 3 100 reaches a global batch of 5, which is not divisible by"),
    (["--train-samples", "100", "--lr-decay-samples", "80", "--lr-decay-iters", "10"], 1,
     "--lr-decay-iters and --lr-decay-samples are both given"),
    (["--train-samples", "100", "--lr-warmup-samples", "8", "--lr-warmup-iters", "1"], 1,
     "--lr-warmup-iters and --lr-warmup-samples are both given"),
    (["--train-samples", "100", "--lr-warmup-samples", "8", "--lr-warmup-fraction", "0.1"], 1,
     "--lr-warmup-fraction 0.1 and --lr-warmup-samples 8 are both set"),
    (["--train-iters", "10", "--lr-decay-samples", "50"], 1,
     "--lr-decay-samples does not fit a run counted in iterations"),
    (["--lr-warmup-samples", "5"], 1, "--lr-warmup-samples does not fit a run counted in iterations"),
    (["--train-samples", "100", "--lr-decay-iters", "5"], 1, "--lr-decay-iters does not fit a run counted in samples"),
    (["--train-samples", "100", "--lr-warmup-iters", "2"], 1, "--lr-warmup-iters does not fit a run counted in"),
    (["--train-samples", "100", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "3"], 1,
     "--lr-wsd-decay-iters does not fit a run counted in samples"),
    (["--train-samples", "100", "--lr-warmup-samples", "200"], 1,
     "warm-up of 200 samples (--lr-warmup-samples) is longer than the 100 decay samples"),
    (["--global-batch-size", "8", "--train-samples", "5"], 1, "--train-samples 5 is less than one global batch of 8"),
])
def test_bad_input_is_one_line(argv, world, fragment):
    with pytest.raises(ConfigError) as info:
        parse(argv, world)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


# --- the loop -----------------------------------------------------------------------------------------

RAMP_RUN = ["--global-batch-size", "8", "--train-samples", "60", "--rampup-batch-size", "2", "2", "12",
            "--lr", "2e-3", "--lr-warmup-samples", "8", "--lr-decay-style", "cosine", "--min-lr", "1e-4",
            "--adam-eps", "1e-6", "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1",
            "--no-log-progress-bar"]


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_one_process_run_with_a_ramp_logs_the_growing_global_batch(rank_pools, tmp_path):
    log = tmp_path / "ramp.jsonl"
    lines = rank_pools(1).run(pretrain_on_rank, ["--mock-data", *TINY, *RAMP_RUN, "--log-json", str(log)], 1)[0]
    iterations = megatron_train_iters(60, (2, 2, 12), 8)
    expected = [megatron_batch(c, 2, 2, 12, 8) for c in (0, 2, 4, 8)] + [8] * (iterations - 4)
    logged = [parse_log_line(line) for line in lines if line.startswith(" [") and "iteration" in line]
    assert [entry["global_batch_size"] for entry in logged] == expected == [2, 2, 4, 6] + [8] * (iterations - 4)
    train = [r for r in _records(log) if "consumed_samples" in r]
    assert [r["consumed_samples"] for r in train] == [sum(expected[:i + 1]) for i in range(iterations)]
    assert all(r["lm_loss"] > 0 for r in train)


@pytest.mark.slow  # two ranks
def test_data_parallel_and_pipeline_ramp_equals_one_process(rank_pools, tmp_path):
    """dp2 splits every ramp batch over ranks; pp2 (1F1B) and pp2.vpp2 (interleaved: 2, 4, 6 and 8
    micro-batches, all multiples of pp) run a schedule rebuilt for each micro-batch count."""
    records = {}
    pp2 = ["--pipeline-model-parallel-size", "2"]
    for name, extra, world in (("one", [], 1), ("dp2", [], 2), ("pp2", pp2, 2),
                               ("pp2.vpp2", pp2 + ["--num-layers-per-virtual-pipeline-stage", "1"], 2)):
        log = tmp_path / f"{name}.jsonl"
        argv = ["--mock-data", *TINY, *RAMP_RUN, "--num-layers", "4", *extra, "--log-json", str(log)]
        lines = rank_pools(2).run(pretrain_on_rank, argv, world)[world - 1]
        assert name != "pp2.vpp2" or "interleaved-1f1b" in lines[0]
        records[name] = _records(log)
    for name in ("dp2", "pp2", "pp2.vpp2"):
        errors = log_record_errors(records["one"], records[name])
        assert max(errors.values()) < 1e-5, (name, errors)
        sizes = [r["global_batch_size"] for r in records[name] if "consumed_samples" in r]
        assert sizes[:4] == [2, 2, 4, 6] and set(sizes[4:]) == {8}


@pytest.mark.slow  # three runs
def test_resuming_inside_the_ramp_continues_its_batches_and_schedule(rank_pools, tmp_path):
    """The checkpoint's consumed samples pick the next batch; the scheduler's sample count the rate."""
    base = ["--mock-data", *TINY, *RAMP_RUN, "--eval-iters", "0"]
    pool = rank_pools(1)
    pool.run(pretrain_on_rank, base + ["--log-json", str(tmp_path / "straight.jsonl")], 1)
    pool.run(pretrain_on_rank, base + ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"], 1)
    pool.run(pretrain_on_rank, base + ["--load", str(tmp_path / "ckpt"), "--log-json", str(tmp_path / "resumed.jsonl")], 1)
    straight = [r for r in _records(tmp_path / "straight.jsonl") if r["iteration"] > 3]
    resumed = _records(tmp_path / "resumed.jsonl")
    assert [r["global_batch_size"] for r in resumed] == [r["global_batch_size"] for r in straight]
    assert [r["global_batch_size"] for r in resumed][:1] == [6]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    assert max(log_record_errors(straight, resumed, keys=("lm_loss",)).values()) < 1e-6


@pytest.mark.parametrize("argv, train", [
    (["--train-samples", "60", "--rampup-batch-size", "2", "2", "12"], 60),  # Megatron asks for --train-samples
    (["--train-iters", "6", "--rampup-batch-size", "2", "2", "12"], 6 * 8),  # else iterations x the full batch
    (["--train-samples", "100"], 100),
])
def test_datasets_are_asked_for_megatrons_train_samples(argv, train):
    from megalith.training.data import samples_per_split

    config = parse(["--global-batch-size", "8", "--eval-interval", "4", "--eval-iters", "2", *argv])
    evaluations = config.training.train_iters // 4 + 1
    assert samples_per_split(config) == (train, evaluations * 2 * 8, 0)
    assert config.batch_schedule().consumed_after(config.training.train_iters) <= train


@pytest.mark.slow  # two ranks, real data
def test_a_ramp_on_the_corpus_reads_the_same_samples_under_dp2(rank_pools, tmp_path):
    from megalith.data.corpus import build_default_corpus

    corpus = build_default_corpus(str(tmp_path / "corpus"))
    data = corpus.flags() + ["--data-cache-path", str(tmp_path / "cache"), "--split", "90,10,0"]
    records = {}
    for name, world in (("one", 1), ("dp2", 2)):
        log = tmp_path / f"{name}.jsonl"
        tiny = [a for a in TINY if a not in ("--vocab-size", "128")]  # the tokenizer sets the vocabulary
        rank_pools(2).run(pretrain_on_rank, [*tiny, *data, *RAMP_RUN, "--log-json", str(log)], world)
        records[name] = _records(log)
    assert max(log_record_errors(records["one"], records["dp2"]).values()) < 1e-5
    assert [r["consumed_samples"] for r in records["dp2"] if "consumed_samples" in r][:5] == [2, 4, 8, 14, 22]
