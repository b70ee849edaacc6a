"""scripts/pretrain_gpt.sh: the torchrun command it builds (DRY_RUN=1), and that its flags are a valid run."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import megalith.device
from megalith.training.arguments import parse_pretrain_args

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "pretrain_gpt.sh"
OVERRIDES = ("GPUS_PER_NODE", "NNODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TP", "PP", "VPP_LAYERS",
             "NUM_LAYERS", "HIDDEN_SIZE", "NUM_HEADS", "SEQ_LENGTH", "MICRO_BATCH", "GLOBAL_BATCH", "TRAIN_ITERS",
             "OUTPUT_DIR", "OMP_NUM_THREADS", "WANDB_MODE", "DATA_PATH", "TOKENIZER_TYPE", "TOKENIZER_MODEL",
             "MOCK_DATA", "MEGALITH_DATA_CACHE", "CKPT_DIR", "SAVE_INTERVAL", "EXIT_SIGNAL_HANDLER")


@pytest.fixture(autouse=True)
def cpu_only(monkeypatch):
    monkeypatch.setattr(megalith.device, "cuda_available", lambda: False)


def fake_nvidia_smi(directory: Path, gpus: int) -> None:
    """An nvidia-smi that lists `gpus` GPUs, or fails as it does on a machine without a driver."""
    lines = "".join(f"echo 'GPU {i}: NVIDIA H100 80GB HBM3 (UUID: GPU-{i:04d})'\n" for i in range(gpus))
    body = lines if gpus else "echo 'NVIDIA-SMI has failed' >&2\nexit 9\n"
    tool = directory / "nvidia-smi"
    tool.write_text("#!/bin/sh\n" + body)
    tool.chmod(0o755)


def run_script(tmp_path: Path, *args: str, gpus: int = 0, **env: str) -> tuple[dict, list[str], list[str], list[str]]:
    """(environment it sets, python + torchrun part, torchrun flags, megalith flags) of the printed command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake_nvidia_smi(bin_dir, gpus)
    environ = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    environ.update({"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHON": sys.executable, "DRY_RUN": "1",
                    "MEGALITH_DATA_CACHE": str(tmp_path.parent / "corpus-cache")})  # built once per test session
    environ.update(env)
    done = subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1
    words = shlex.split(done.stdout)
    settings = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        settings[name] = value
    split = words.index("megalith")
    assert words[split - 1] == "-m" and words[split + 1] == "pretrain"
    return settings, words[:3], words[3:split - 1], words[split + 2:]


def test_no_gpu_runs_eight_cpu_processes_of_a_valid_3d_layout(tmp_path):
    settings, launcher, torchrun, flags = run_script(tmp_path, gpus=0)
    assert launcher == [sys.executable, "-m", "torch.distributed.run"]
    assert torchrun == ["--nproc-per-node", "8", "--nnodes", "1", "--node-rank", "0", "--master-addr", "localhost",
                        "--master-port", "6000"]
    assert settings == {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    assert "--sequence-parallel" in flags and "--mock-data" not in flags and "--vocab-size" not in flags
    corpus = flags[flags.index("--data-path") + 1]
    assert Path(corpus + ".bin").is_file() and flags[flags.index("--tokenizer-type") + 1] == "SentencePieceTokenizer"
    config = parse_pretrain_args(flags, world_size=8)
    dist = config.distributed
    assert (dist.tensor_model_parallel_size, dist.pipeline_model_parallel_size, config.data_parallel_size) == (2, 2, 2)
    assert (dist.sequence_parallel, dist.distributed_backend, config.virtual_pipeline_size) == (True, "gloo", 2)
    assert (config.pipeline_schedule, config.num_micro_batches) == ("interleaved-1f1b", 4)  # 16 / (2 x dp 2)
    model = config.model
    assert (model.num_layers, model.hidden_size, model.num_attention_heads, model.seq_length) == (8, 64, 4, 64)
    assert model.vocab_size == 1024  # the corpus tokenizer's
    training = config.training
    assert (training.train_iters, training.log_interval, training.micro_batch_size, training.global_batch_size) == (
        100, 10, 2, 16)
    assert (config.optimizer.lr, config.optimizer.lr_warmup_iters) == (1e-3, 10)
    assert (config.logging.log_json, config.logging.tensorboard_dir, config.logging.wandb_project) == (
        "./runs/gpt/log.jsonl", "./runs/gpt/tensorboard", "megalith-gpt")
    assert config.notices == ()


def test_gpu_node_uses_its_gpus_and_nccl(tmp_path):
    settings, _, torchrun, flags = run_script(tmp_path, gpus=4)
    assert torchrun[:2] == ["--nproc-per-node", "4"]
    assert "--distributed-backend" not in flags and "OMP_NUM_THREADS" not in settings
    # 4 GPUs: tp2 x pp2 leaves dp 1, so 16 / 2 = 8 micro-batches (a multiple of pp 2)
    config = parse_pretrain_args([*flags, "--distributed-backend", "gloo"], world_size=4)
    assert (config.data_parallel_size, config.num_micro_batches) == (1, 8)
    assert run_script(tmp_path, gpus=4, GPUS_PER_NODE="2")[2][:2] == ["--nproc-per-node", "2"]


def test_environment_overrides(tmp_path):
    env = dict(GPUS_PER_NODE="4", NNODES="2", NODE_RANK="1", MASTER_ADDR="node007", MASTER_PORT="29999", TP="1",
               PP="4", VPP_LAYERS="1", NUM_LAYERS="8", HIDDEN_SIZE="128", NUM_HEADS="8", SEQ_LENGTH="32",
               MICRO_BATCH="1", GLOBAL_BATCH="8", TRAIN_ITERS="20", OUTPUT_DIR=str(tmp_path / "my run"))
    _, _, torchrun, flags = run_script(tmp_path, **env)
    assert torchrun == ["--nproc-per-node", "4", "--nnodes", "2", "--node-rank", "1", "--master-addr", "node007",
                        "--master-port", "29999"]
    assert "--sequence-parallel" not in flags  # meaningless at tp 1
    config = parse_pretrain_args(flags, world_size=8)  # 4 per node x 2 nodes
    # pp 4, 1 layer per virtual stage: vpp = 8 / (4 x 1) = 2; dp = 8 / 4 = 2; micro-batches = 8 / (1 x 2) = 4
    assert (config.distributed.pipeline_model_parallel_size, config.virtual_pipeline_size) == (4, 2)
    assert (config.data_parallel_size, config.num_micro_batches) == (2, 4)
    assert (config.model.hidden_size, config.model.num_attention_heads, config.model.seq_length) == (128, 8, 32)
    assert config.training.train_iters == 20
    assert config.logging.log_json == str(tmp_path / "my run" / "log.jsonl")


def test_no_pipeline_drops_virtual_stages(tmp_path):
    _, _, _, flags = run_script(tmp_path, PP="1")
    assert "--num-layers-per-virtual-pipeline-stage" not in flags
    config = parse_pretrain_args(flags, world_size=8)
    assert (config.data_parallel_size, config.pipeline_schedule, config.num_micro_batches) == (4, "no-pipelining", 2)


def test_arguments_to_the_script_come_last_and_override(tmp_path):
    _, _, _, flags = run_script(tmp_path, "--train-iters", "30", "--lr", "5e-4", "--bf16")
    assert flags[-5:] == ["--train-iters", "30", "--lr", "5e-4", "--bf16"]
    config = parse_pretrain_args(flags, world_size=8)
    assert (config.training.train_iters, config.optimizer.lr, config.model.params_dtype) == (30, 5e-4, "bf16")


def test_python_comes_from_the_environment(tmp_path):
    _, launcher, _, _ = run_script(tmp_path, PYTHON="/opt/py/bin/python3", MOCK_DATA="1")  # nothing run with it
    assert launcher == ["/opt/py/bin/python3", "-m", "torch.distributed.run"]


def test_data_comes_from_the_environment(tmp_path):
    """MOCK_DATA=1: synthetic tokens of a fixed vocabulary; DATA_PATH (with weights) and
    TOKENIZER_MODEL: the user's preprocessed data, passed through as Megatron's flags."""
    _, _, _, flags = run_script(tmp_path, MOCK_DATA="1")
    assert "--mock-data" in flags and flags[flags.index("--vocab-size") + 1] == "512" and "--data-path" not in flags
    _, _, _, flags = run_script(tmp_path, DATA_PATH="0.3 data/a_text_document 0.7 data/b_text_document",
                                TOKENIZER_MODEL="tok.model")
    start = flags.index("--data-path")
    assert flags[start:start + 9] == ["--data-path", "0.3", "data/a_text_document", "0.7", "data/b_text_document",
                                      "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", "tok.model"]
    assert "--mock-data" not in flags and "--vocab-size" not in flags


def test_checkpoints_only_when_asked_for(tmp_path):
    """CKPT_DIR: save there and resume from there, every 1000 iterations, and save-and-exit on SIGTERM;
    SAVE_INTERVAL and EXIT_SIGNAL_HANDLER=0 adjust that; without CKPT_DIR no checkpoint flag at all."""
    _, _, _, flags = run_script(tmp_path, MOCK_DATA="1")
    assert not {"--save", "--load", "--save-interval", "--exit-signal-handler"} & set(flags)
    assert parse_pretrain_args(flags, world_size=8).checkpointing.save is None
    ckpt = str(tmp_path / "my ckpt")
    _, _, _, flags = run_script(tmp_path, "--bf16", MOCK_DATA="1", CKPT_DIR=ckpt)
    assert flags[-8:] == ["--save", ckpt, "--load", ckpt, "--save-interval", "1000", "--exit-signal-handler", "--bf16"]
    saving = parse_pretrain_args(flags, world_size=8).checkpointing
    assert (saving.save, saving.load, saving.save_interval, saving.exit_signal_handler) == (ckpt, ckpt, 1000, True)
    _, _, _, flags = run_script(tmp_path, MOCK_DATA="1", CKPT_DIR=ckpt, SAVE_INTERVAL="50", EXIT_SIGNAL_HANDLER="0")
    saving = parse_pretrain_args(flags, world_size=8).checkpointing
    assert (saving.save_interval, saving.exit_signal_handler) == (50, False)
    _, _, _, flags = run_script(tmp_path, MOCK_DATA="1", CKPT_DIR=ckpt, SAVE_INTERVAL="0")  # at the end and on SIGTERM
    saving = parse_pretrain_args(flags, world_size=8).checkpointing
    assert (saving.save, saving.save_interval, saving.exit_signal_handler) == (ckpt, None, True)
    _, _, _, flags = run_script(tmp_path, "--save-interval", "7", MOCK_DATA="1", CKPT_DIR=ckpt)  # arguments win
    assert parse_pretrain_args(flags, world_size=8).checkpointing.save_interval == 7


@pytest.mark.parametrize("env, message", [
    ({"SAVE_INTERVAL": "100"}, "SAVE_INTERVAL or EXIT_SIGNAL_HANDLER=1 needs CKPT_DIR (where checkpoints go)"),
    ({"EXIT_SIGNAL_HANDLER": "1"}, "SAVE_INTERVAL or EXIT_SIGNAL_HANDLER=1 needs CKPT_DIR (where checkpoints go)"),
    ({"CKPT_DIR": "ckpt", "EXIT_SIGNAL_HANDLER": "yes"}, "EXIT_SIGNAL_HANDLER=yes must be 0 or 1"),
])
def test_checkpoint_variables_that_cannot_work_are_refused(tmp_path, env, message):
    environ = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    environ.update({"PYTHON": sys.executable, "DRY_RUN": "1", "MOCK_DATA": "1", **env})
    done = subprocess.run(["bash", str(SCRIPT)], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr == f"pretrain_gpt.sh: {message}\n"
