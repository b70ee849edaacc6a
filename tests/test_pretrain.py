"""`megalith pretrain`: the training loop under 3D layouts equals one process; fp16 loss scaling;
the launch script end to end (torchrun, 8 processes) with its log line, JSON, TensorBoard, wandb."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from torch import nn

from megalith.cli import main
from megalith.parallel.data_parallel import DataParallelGrads
from megalith.parallel.spawn import free_port
from megalith.testing import log_record_errors, pretrain_on_rank
from megalith.config.optimizer import OptimizerConfig
from megalith.training.log_line import parse_log_line
from megalith.training.optimizer import ParallelOptimizer

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "128", "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "2e-3",
         "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--adam-eps", "1e-6",
         "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1", "--ddp-bucket-size", "3000",
         "--overlap-grad-reduce", "--no-log-progress-bar"]
LAYOUTS = {
    "one process": ([], 1),
    "tp2.pp2.dp2.sp.vpp2.zero1": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                                   "--sequence-parallel", "--num-layers-per-virtual-pipeline-stage", "1",
                                   "--use-distributed-optimizer"], 8),
    "pp2.dp4": (["--pipeline-model-parallel-size", "2"], 8),
}


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pretrain_under_3d_layouts_equals_one_process(rank_pools, tmp_path):
    """Per-iteration loss, grad norm and validation loss of the loop itself, fp32, against one process."""
    records = {}
    for name, (extra, world) in LAYOUTS.items():
        log = tmp_path / f"{name}.jsonl"
        argv = SMALL + extra + ["--train-iters", "6", "--log-json", str(log)]
        rank_pools(8).run(pretrain_on_rank, argv, world)
        records[name] = _records(log)
    reference = records.pop("one process")
    train = [r for r in reference if "consumed_samples" in r]
    assert len(train) == 6 and train[-1]["lm_loss"] < train[0]["lm_loss"]
    for name, got in records.items():
        errors = log_record_errors(reference, got)  # loss, grad norm and validation loss, every iteration
        assert max(errors.values()) < 1e-5, (name, errors)


def test_fp16_from_the_initial_scale_skips_until_the_gradients_fit(rank_pools, tmp_path):
    """Megatron's start: 2^32 overflows fp16; steps are skipped and counted, the scale halves
    (after the hysteresis of 2), then training goes on with finite losses."""
    log = tmp_path / "fp16.jsonl"
    argv = SMALL + ["--fp16", "--train-iters", "30", "--eval-iters", "0", "--log-json", str(log)]
    lines = rank_pools(8).run(pretrain_on_rank, argv, 1)[0]
    train = [r for r in _records(log) if "consumed_samples" in r]
    skipped = [r["skipped"] for r in train]
    scales = [r["loss_scale"] for r in train]  # the scale after the iteration's update
    assert skipped[0] == 1 and scales[0] == 2.0**32  # first overflow: hysteresis, no halving yet
    assert skipped[1] == 1 and scales[1] == 2.0**31
    first_update = skipped.index(0)
    assert all(skipped[:first_update])
    for before, after, skip in zip(scales[first_update - 1:], scales[first_update:], skipped[first_update:]):
        assert after == (before / 2 if skip else before)  # hysteresis spent: every later overflow halves
    assert all((r["grad_norm"] is None) == bool(r["skipped"]) for r in train)
    assert all((r["lm_loss"] is None) == bool(r["skipped"]) for r in train)
    assert sum(1 - s for s in skipped) >= 10  # training goes on
    updated = [r["lm_loss"] for r in train if not r["skipped"]]
    assert updated[-1] < updated[0]
    logged = [parse_log_line(line) for line in lines if line.startswith(" [") and " iteration " in line]
    assert [entry["skipped_iterations"] for entry in logged] == skipped
    assert all(("lm_loss" in entry) != bool(entry["skipped_iterations"]) for entry in logged)


def test_weight_decay_skips_biases_and_norms():
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = ParallelOptimizer([DataParallelGrads(module, None)], OptimizerConfig(weight_decay=0.1))
    decay, no_decay = optimizer.inner.param_groups
    assert decay["weight_decay"] == 0.1 and [t.numel() for t in decay["params"]] == [16]
    assert no_decay["weight_decay"] == 0.0 and sorted(t.numel() for t in no_decay["params"]) == [4, 4, 4]


def test_bad_layout_is_one_line_before_any_process_group(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert main(["pretrain", "--mock-data", "--tensor-model-parallel-size", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "world size 8 is not divisible by --tensor-model-parallel-size 3" in err and "\n" not in err


# The log line as Megatron-LM prints it, written independently of megalith's formatter.
MEGATRON_LINE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| "
    r"elapsed time per iteration \(ms\): [\d.]+ \| throughput per GPU \(TFLOP/s/GPU\): [\d.]+ \| "
    r"throughput \(tokens/s\): \d+ \| learning rate: \d\.\d{6}E[+-]\d\d \| global batch size: +(\d+) \| "
    r"lm loss: (\d\.\d{6}E[+-]\d\d) \| loss scale: [\d.]+ \| grad norm: [\d.]+ \| "
    r"number of skipped iterations: +(\d+) \| number of nan iterations: +(\d+) \|$"
)


@pytest.mark.slow  # about 160 s: the README's command, 100 iterations under torchrun
def test_the_launch_script_trains_a_gpt_with_8_processes(tmp_path):
    """scripts/pretrain_gpt.sh with no arguments: tp2 x pp2 (interleaved) x dp2, SP, 100 iterations
    on the embedded corpus (built on the way)."""
    env = dict(os.environ, PYTHON=sys.executable, OUTPUT_DIR=str(tmp_path), MASTER_PORT=str(free_port()),
               MEGALITH_DATA_CACHE=str(tmp_path / "cache"))
    env.pop("WANDB_MODE", None)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "pretrain_gpt.sh")], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    matches = [MEGATRON_LINE.match(line) for line in done.stdout.splitlines()]
    logged = [m for m in matches if m]
    assert [int(m.group(1)) for m in logged] == list(range(10, 101, 10))
    assert all(int(m.group(2)) == 100 and int(m.group(4)) == 16 for m in logged)
    assert [int(m.group(3)) for m in logged] == [160 * k for k in range(1, 11)]
    losses = [float(m.group(5)) for m in logged]
    # real text (the embedded corpus, 1024 pieces: a uniform guess is ln 1024 = 6.93): about 6.8 -> 5.7
    assert losses[-1] < losses[0] - 0.8 and all(b < a + 0.05 for a, b in zip(losses, losses[1:])), losses
    assert all(int(m.group(6)) == 0 and int(m.group(7)) == 0 for m in logged)
    records = [r for r in _records(tmp_path / "log.jsonl") if "consumed_samples" in r]
    assert [r["iteration"] for r in records] == list(range(10, 101, 10))
    assert [round(r["lm_loss"], 5) for r in records] == [round(x, 5) for x in losses]
    assert (tmp_path / "config.yaml").read_text().count("tensor_model_parallel_size: 2") == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    tb_losses = [e.value for e in events.Scalars("lm loss")]
    assert len(tb_losses) == 10 and abs(tb_losses[-1] - losses[-1]) < 1e-5 * losses[-1]
    runs = list((tmp_path / "wandb").glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
