"""Checkpoints: bitwise resume under 3D layouts (fp32 and bf16), resharding to other layouts,
config checks, --finetune / --no-load-optim, and the on-disk format's safety."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from megalith.errors import ConfigError
from megalith.parallel.spawn import free_port
from megalith.testing import pretrain_on_rank, relative_error
from megalith.config.arguments import parse_pretrain_args
from megalith.training.checkpoint_format import TRACKER_FILE, CheckpointReader

BASE = ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "100", "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "2e-3",
        "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--adam-eps", "1e-6",
        "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1", "--ddp-bucket-size", "3000",
        "--overlap-grad-reduce", "--no-log-progress-bar", "--train-iters", "6"]
LAYOUTS = {
    "tp2.pp2.dp2.sp": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                        "--sequence-parallel"], 8),
    "tp2.pp2.dp2.zero1": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--use-distributed-optimizer"], 8),
    "tp2.pp2.dp2": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 8),
    "tp1.pp4.dp2": (["--pipeline-model-parallel-size", "4"], 8),
    "tp4.pp1.dp2.zero1": (["--tensor-model-parallel-size", "4", "--use-distributed-optimizer"], 8),
    "pp2.vpp2.dp2.zero1": (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
                            "--use-distributed-optimizer"], 8),
    "pp2.vpp2": (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2),
    "pp4": (["--pipeline-model-parallel-size", "4"], 4),
    "pp4.zb-h1": (["--pipeline-model-parallel-size", "4", "--pipeline-schedule", "zb-h1"], 4),
    "dp2.zero1": (["--use-distributed-optimizer"], 2),
    "dp4.zero1": (["--use-distributed-optimizer"], 4),
    "tp2.dp2.sp.zero1.bf16": (["--tensor-model-parallel-size", "2", "--sequence-parallel",
                               "--use-distributed-optimizer", "--bf16"], 4),
}


def _train(pool, layout: str, log: Path, extra: list[str], layouts: dict = LAYOUTS) -> list[dict]:
    flags, world = layouts[layout]
    pool.run(pretrain_on_rank, BASE + flags + ["--log-json", str(log)] + extra, world)
    return [json.loads(line) for line in log.read_text().splitlines() if "consumed_samples" in line]


def _values(records: list[dict], key: str, first: int) -> list[float]:
    return [r[key] for r in records if r["iteration"] > first]


@pytest.mark.parametrize("layout", [pytest.param("tp2.pp2.dp2.sp", marks=pytest.mark.slow), "pp2.vpp2.dp2.zero1", "dp4.zero1",
                                    pytest.param("tp2.dp2.sp.zero1.bf16", marks=pytest.mark.slow)])
def test_resume_is_bitwise(rank_pools, tmp_path, layout):
    """6 iterations straight == 3, save (--exit-interval), load, 3 more: identical losses and norms."""
    pool = rank_pools(8)
    straight = _train(pool, layout, tmp_path / "straight.jsonl", [])
    first = _train(pool, layout, tmp_path / "first.jsonl", ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"])
    assert [r["iteration"] for r in first] == [1, 2, 3]
    assert (tmp_path / "ckpt" / TRACKER_FILE).read_text().strip() == "3"
    resumed = _train(pool, layout, tmp_path / "resumed.jsonl", ["--load", str(tmp_path / "ckpt")])
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    for key in ("lm_loss", "grad_norm", "lr", "loss_scale"):
        assert _values(resumed, key, 3) == _values(straight, key, 3), key  # rtol = atol = 0
    assert [r["consumed_samples"] for r in resumed] == [32, 40, 48]


@pytest.mark.parametrize("source, target", [
    ("tp2.pp2.dp2", "tp1.pp4.dp2"), pytest.param("tp2.pp2.dp2.zero1", "tp4.pp1.dp2.zero1", marks=pytest.mark.slow),
    ("pp2.vpp2", "pp4"),
    ("pp2.vpp2", "pp4.zb-h1"),  # saved under interleaved 1F1B, continued under zero bubble
    ("dp2.zero1", "dp4.zero1"),
])
def test_a_checkpoint_reshards_to_another_layout(rank_pools, tmp_path, source, target):
    """Saved under `source` after 3 iterations, continued under `target`: the same losses as
    continuing under `source` (which is bitwise the straight run), to 1e-6."""
    assert_continues_under(rank_pools(8), tmp_path, source, target)


def assert_continues_under(pool, tmp_path, source: str, target: str, layouts: dict = LAYOUTS) -> None:
    """3 iterations under `source`, saved, 3 more under `target`: the uninterrupted `source` run's
    losses and norms to 1e-6."""
    straight = _train(pool, source, tmp_path / "straight.jsonl", [], layouts)
    _train(pool, source, tmp_path / "first.jsonl", ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"], layouts)
    moved = _train(pool, target, tmp_path / "moved.jsonl", ["--load", str(tmp_path / "ckpt")], layouts)
    assert [r["iteration"] for r in moved] == [4, 5, 6]
    for key in ("lm_loss", "grad_norm"):
        expected = torch.tensor(_values(straight, key, 3), dtype=torch.float64)
        assert relative_error(torch.tensor(_values(moved, key, 3), dtype=torch.float64), expected) < 1e-6, key


def assert_resumes_bitwise(pool, tmp_path, layout: str, layouts: dict = LAYOUTS) -> None:
    """6 iterations straight == 3, save, load under the same layout, 3 more: identical numbers."""
    straight = _train(pool, layout, tmp_path / "straight.jsonl", [], layouts)
    _train(pool, layout, tmp_path / "first.jsonl", ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"], layouts)
    resumed = _train(pool, layout, tmp_path / "resumed.jsonl", ["--load", str(tmp_path / "ckpt")], layouts)
    assert [r["iteration"] for r in resumed] == [4, 5, 6]
    for key in ("lm_loss", "grad_norm", "lr"):
        assert _values(resumed, key, 3) == _values(straight, key, 3), key  # rtol = atol = 0


def test_a_checkpoint_holds_global_tensors_whatever_the_layout(rank_pools, tmp_path):
    pool = rank_pools(8)
    for layout in ("tp2.pp2.dp2.zero1", "dp2.zero1"):
        _train(pool, layout, tmp_path / f"{layout}.jsonl", ["--save", str(tmp_path / layout), "--exit-interval", "2"])
    a = CheckpointReader(str(tmp_path / "tp2.pp2.dp2.zero1" / "iter_0000002"))
    b = CheckpointReader(str(tmp_path / "dp2.zero1" / "iter_0000002"))
    assert a.names() == b.names() and any(n.startswith("optimizer/exp_avg/") for n in a.names())
    assert a.shape("model/embedding.word_embeddings.weight") == (100, 32)  # vocabulary padding is not stored
    worst = max(relative_error(a.read(n), b.read(n)) for n in a.names())
    assert worst < 1e-5  # two layouts after two identical steps


def test_finetune_and_no_load_optim(rank_pools, tmp_path):
    pool = rank_pools(8)
    _train(pool, "dp2.zero1", tmp_path / "first.jsonl", ["--save", str(tmp_path / "ckpt"), "--exit-interval", "3"])
    tuned = _train(pool, "dp2.zero1", tmp_path / "tuned.jsonl", ["--load", str(tmp_path / "ckpt"), "--finetune"])
    assert [r["iteration"] for r in tuned] == [1, 2, 3, 4, 5, 6]  # weights only, iteration reset
    fresh = _train(pool, "dp2.zero1", tmp_path / "fresh.jsonl", [])
    assert tuned[0]["lm_loss"] < fresh[0]["lm_loss"]  # the loaded weights were trained
    no_optim = _train(pool, "dp2.zero1", tmp_path / "no_optim.jsonl", ["--load", str(tmp_path / "ckpt"),
                                                                        "--no-load-optim"])
    assert [r["iteration"] for r in no_optim] == [4, 5, 6]


def test_loading_into_another_model_names_what_differs(rank_pools, tmp_path):
    pool = rank_pools(8)
    _train(pool, "dp2.zero1", tmp_path / "first.jsonl", ["--save", str(tmp_path / "ckpt"), "--exit-interval", "1"])
    flags, world = LAYOUTS["dp2.zero1"]
    argv = [a if a != "32" else "64" for a in BASE] + flags + ["--load", str(tmp_path / "ckpt")]
    with pytest.raises(ConfigError, match=r"written for another model: --hidden-size 32 in the checkpoint, 64 now"):
        parse_pretrain_args(argv, world)  # before any process group
    # which kernels compute the model is not the model: a checkpoint loads under other kernel flags
    kernels = ["--kernel-backend", "torch", "--no-rope-fusion", "--no-bias-gelu-fusion", "--cross-entropy-loss-fusion"]
    parse_pretrain_args(BASE + flags + kernels + ["--load", str(tmp_path / "ckpt")], world)


def test_a_pickled_checkpoint_is_refused(tmp_path):
    (tmp_path / "iter_0000001").mkdir()
    torch.save({"w": torch.zeros(1)}, tmp_path / "iter_0000001" / "model_optim_rng.pt")
    with pytest.raises(ConfigError, match="pickled files .*can run code"):
        CheckpointReader(str(tmp_path / "iter_0000001"))
    os.remove(tmp_path / "iter_0000001" / "model_optim_rng.pt")
    with pytest.raises(ConfigError, match="not a complete megalith checkpoint"):
        CheckpointReader(str(tmp_path / "iter_0000001"))


# --- atomic saves and preemption (one process, in a subprocess that is killed) -----------------

ONE_PROCESS = [a for a in BASE if a != "--overlap-grad-reduce"] + ["--distributed-backend", "gloo"]
KILLER = '''
import os, signal, sys
import megalith.training.checkpoint as checkpoint
import megalith.training.checkpoint_format as fmt
point, calls = sys.argv[1], {"n": 0}

def kill_at(name, original, when=lambda *a: True):
    def wrapper(*args, **kwargs):
        if when(*args):
            calls["n"] += 1
            if calls["n"] == 2:  # the second checkpoint: the first one stays complete
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    return wrapper

if point == "shard":
    checkpoint.save_pieces = kill_at(point, checkpoint.save_pieces)
elif point == "rng":
    checkpoint.save_tensors = kill_at(point, checkpoint.save_tensors)
elif point == "rename":
    checkpoint.os.replace = kill_at(point, os.replace, lambda src, dst: src.endswith(".tmp") and os.path.isdir(src))
elif point == "tracker":
    fmt.write_tracker = kill_at(point, fmt.write_tracker)
    checkpoint.write_tracker = fmt.write_tracker
from megalith.cli import main
sys.exit(main(["pretrain", *sys.argv[2:]]))
'''


def _run(args: list[str], *extra: str, timeout: float = 120) -> subprocess.CompletedProcess:

    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    return subprocess.run([sys.executable, *args, *extra], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("point", [pytest.param("shard", marks=pytest.mark.slow), "rng", "rename",
                                   pytest.param("tracker", marks=pytest.mark.slow)])
def test_a_save_killed_at_any_point_leaves_the_previous_checkpoint_loadable(tmp_path, point):
    driver = tmp_path / "killer.py"
    driver.write_text(KILLER)
    save = tmp_path / "ckpt"
    done = _run([str(driver), point], *ONE_PROCESS, "--save", str(save), "--save-interval", "2")
    assert done.returncode == -9, done.stderr[-2000:]  # SIGKILL, during the save at iteration 4
    assert (save / TRACKER_FILE).read_text().strip() == "2"
    reader = CheckpointReader(str(save / "iter_0000002"))
    assert reader.metadata["iteration"] == 2 and "model/embedding.word_embeddings.weight" in reader
    if point == "shard":
        resumed = _run(["-m", "megalith", "pretrain"], *ONE_PROCESS, "--load", str(save), "--save", str(save))
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert "iteration        3/" in resumed.stdout and (save / TRACKER_FILE).read_text().strip() == "6"


@pytest.mark.slow  # about 20 s; test_sigterm_to_one_rank_stops_every_rank_at_the_same_iteration stays fast
def test_sigterm_saves_and_exits_cleanly_and_the_run_resumes(tmp_path):
    """What Slurm sends before it kills a job: the iteration finishes, a checkpoint is written, exit 0."""
    save = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=str(free_port()))  # not the default port: it may be taken
    argv = [sys.executable, "-u", "-m", "megalith", "pretrain", *ONE_PROCESS, "--train-iters", "100000",
            "--eval-iters", "0", "--save", str(save), "--exit-signal-handler"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        lines.append(line)
        if "iteration        3/" in line:
            break
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, (out[-1000:], err[-2000:])
    assert "exiting at iteration" in out and "(SIGTERM)" in out
    stopped = int((save / TRACKER_FILE).read_text())
    assert stopped >= 3
    again = ["-m", "megalith", "pretrain", *ONE_PROCESS, "--train-iters", str(stopped + 2), "--load", str(save)]
    refused = _run(again)  # a resumed run keeps its schedule unless told otherwise (Megatron's rule)
    assert refused.returncode == 2 and "--lr-decay-iters 100000" in refused.stderr
    resumed = _run(again, "--override-opt-param-scheduler")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"iteration {stopped + 1:>8}/" in resumed.stdout


def _pretrain_with_sigterm_to_one_rank(ctx, argv, world_size, log):
    def signal_once_training():
        while not (os.path.exists(log) and len(open(log).read().splitlines()) >= 2):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    if ctx.rank == 1:  # a signal that reaches one rank only: all must still stop at the same iteration
        threading.Thread(target=signal_once_training, daemon=True).start()
    return pretrain_on_rank(ctx, argv, world_size)


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_iteration(rank_pools, tmp_path):
    flags, world = LAYOUTS["tp2.pp2.dp2.zero1"]
    argv = [a if a != "6" else "100000" for a in BASE] + flags + [
        "--eval-iters", "0", "--save", str(tmp_path / "ckpt"), "--exit-signal-handler", "--lr-decay-iters", "10",
        "--log-json", str(tmp_path / "log.jsonl")]
    lines = rank_pools(8).run(_pretrain_with_sigterm_to_one_rank, argv, world, str(tmp_path / "log.jsonl"))[world - 1]
    stopped = int((tmp_path / "ckpt" / TRACKER_FILE).read_text())
    assert 0 < stopped < 100000 and f"exiting at iteration {stopped} (SIGTERM)" in "\n".join(lines)
    reader = CheckpointReader(str(tmp_path / "ckpt" / f"iter_{stopped:07d}"))
    assert reader.metadata["iteration"] == stopped and reader.metadata["consumed_samples"] == 8 * stopped


def test_checkpoint_inspect_prints_iteration_layout_config_and_tensors(rank_pools, tmp_path, capsys):
    from megalith.cli import main

    _train(rank_pools(8), "tp2.pp2.dp2.zero1", tmp_path / "log.jsonl",
           ["--save", str(tmp_path / "ckpt"), "--exit-interval", "2"])
    capsys.readouterr()
    assert main(["checkpoint", "inspect", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert "iteration 2, consumed samples 16" in out and "tp 2, pp 2, dp 2" in out and "zero1 True" in out
    assert "hidden_size=32" in out and "model/embedding.word_embeddings.weight" in out
    assert "optimizer/exp_avg_sq/decoder.layers.3.mlp.linear_fc2.weight" in out
    assert main(["checkpoint", "inspect", str(tmp_path / "missing")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
