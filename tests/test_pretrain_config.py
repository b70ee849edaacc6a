"""`megalith pretrain`'s configuration: defaults, --config precedence, every rejection, the written config."""

from __future__ import annotations

import argparse
import os

import pytest
import torch
import torch.distributed

import megalith.device
from megalith.errors import ConfigError
from megalith.config.arguments import (
    add_pretrain_arguments,
    build_pretrain_parser,
    resolve_pretrain_config,
    resolved_config_directory,
    world_size_from_env,
    write_resolved_config,
)
from megalith.config.pretrain import SECTIONS, section_fields
from megalith.config.arguments import parse_pretrain_args as parse_with_data_flags
from megalith.training.loss_scaler import ConstantLossScaler


def parse_pretrain_args(argv, world_size):
    """These tests are about everything but the data: they train on --mock-data."""
    return parse_with_data_flags(["--mock-data", *argv], world_size)


def test_wandb_project_without_a_run_name_is_one_line_before_start():
    with pytest.raises(ConfigError, match="--wandb-project p needs --wandb-exp-name"):
        parse_pretrain_args(["--wandb-project", "p"], 1)


@pytest.mark.parametrize("argv, message", [
    ([], "no training data: give --data-path PREFIX"),
    (["--mock-data", "--data-path", "A"], "--mock-data and --data-path are both given"),
    (["--data-path", "A"], "--data-path needs --tokenizer-type"),
    (["--mock-data", "--vocab-extra-ids", "-1"], "--vocab-extra-ids must be an integer >= 0"),
])
def test_data_flags_are_checked_in_one_line(argv, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_with_data_flags(argv, 1)
    assert "\n" not in str(info.value)


@pytest.fixture
def no_process_groups(monkeypatch):
    """Fail loudly if anything tries to start torch.distributed."""
    def refuse(*args, **kwargs):
        raise AssertionError("configuration code touched torch.distributed")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "new_group", refuse)
    yield
    assert not torch.distributed.is_initialized()


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(megalith.device, "cuda_available", lambda: False)


def write(tmp_path, text: str, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def rejected(argv: list[str], world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        parse_pretrain_args(argv, world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_defaults_are_megatrons_and_the_registrys(cpu_only, no_process_groups):
    config = parse_pretrain_args([], world_size=1)
    # gpt's registry defaults where nothing was given; ModelConfig's own for the rest
    assert (config.model.num_layers, config.model.num_attention_heads, config.model.vocab_size) == (8, 8, 300)
    assert (config.model.hidden_dropout, config.model.make_vocab_size_divisible_by) == (0.0, 128)
    assert (config.model.ffn_hidden_size, config.model.kv_channels, config.model.params_dtype) == (256, 8, "fp32")
    assert (config.optimizer.lr, config.optimizer.adam_eps, config.optimizer.lr_decay_style) == (1e-4, 1e-8, "linear")
    assert (config.precision.initial_loss_scale, config.precision.hysteresis) == (4294967296.0, 2)
    assert (config.training.train_iters, config.training.log_interval, config.training.eval_iters) == (100, 100, 100)
    assert (config.layout.dp, config.layout.vpp, config.num_micro_batches) == (1, 1, 1)
    assert (config.global_batch_size, config.layout.pipeline_schedule, config.distributed_backend) == (1, "no-pipelining", "gloo")
    assert config.ddp_bucket_size == 40_000_000
    assert config.notices == ()


def test_derived_values_of_a_3d_layout(cpu_only):
    config = parse_pretrain_args(
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--num-layers", "8",
         "--num-layers-per-virtual-pipeline-stage", "2", "--micro-batch-size", "2", "--global-batch-size", "16"], 8)
    # dp = 8 / (2 x 2); vpp = 8 layers / (pp 2 x 2 per stage); micro-batches = 16 / (2 x dp 2)
    assert (config.layout.dp, config.layout.vpp, config.num_micro_batches) == (2, 2, 4)
    assert config.layout.pipeline_schedule == "interleaved-1f1b"
    assert config.layout.grid(8).dp == 2 and str(config.layout) == "tp2.pp2.vpp2.dp2.interleaved-1f1b"
    one_f_one_b = parse_pretrain_args(["--pipeline-model-parallel-size", "2", "--micro-batch-size", "3"], 4)
    assert (one_f_one_b.layout.pipeline_schedule, one_f_one_b.global_batch_size, one_f_one_b.num_micro_batches) == ("1f1b", 6, 1)


def test_bucket_size_follows_megatrons_default_and_flag(cpu_only):
    assert parse_pretrain_args([], 64).ddp_bucket_size == 64_000_000  # max(40M, 1M x dp 64)
    assert parse_pretrain_args(["--ddp-bucket-size", "1000"], 64).ddp_bucket_size == 1000


def test_precision_flags_set_the_parameter_dtype(cpu_only):
    bf16 = parse_pretrain_args(["--bf16"], 1)
    assert (bf16.model.params_dtype, bf16.distributed.accumulate_allreduce_grads_in_fp32) == ("bf16", True)
    assert bf16.notices == ("--bf16: gradients are accumulated and all-reduced in fp32 "
                            "(--accumulate-allreduce-grads-in-fp32 turned on, as in Megatron)",)
    fp16 = parse_pretrain_args(["--fp16", "--loss-scale", "1024"], 1)
    assert (fp16.model.params_dtype, fp16.distributed.accumulate_allreduce_grads_in_fp32) == ("fp16", False)
    scaler = fp16.precision.make_loss_scaler()
    assert isinstance(scaler, ConstantLossScaler) and scaler.scale == 1024.0
    assert parse_pretrain_args(["--bf16", "--params-dtype", "bf16"], 1).model.params_dtype == "bf16"


def test_loss_scale_without_fp16_is_a_notice_and_dropped(cpu_only):
    config = parse_pretrain_args(["--loss-scale", "512"], 1)
    assert config.precision.loss_scale is None
    assert config.notices == ("--loss-scale 512.0 applies to --fp16 only; ignored",)


def test_sequence_parallel_at_tp1_is_turned_off_with_a_notice(cpu_only):
    config = parse_pretrain_args(["--sequence-parallel"], 2)
    assert config.distributed.sequence_parallel is False
    assert config.notices == ("--sequence-parallel does nothing with --tensor-model-parallel-size 1; turned off",)
    assert parse_pretrain_args(["--sequence-parallel", "--tensor-model-parallel-size", "2"], 2).distributed.sequence_parallel


def test_overlap_and_distributed_optimizer_work_at_any_dp(cpu_only):
    config = parse_pretrain_args(["--overlap-grad-reduce", "--use-distributed-optimizer"], 1)
    assert (config.distributed.overlap_grad_reduce, config.distributed.use_distributed_optimizer) == (True, True)


@pytest.mark.parametrize("argv,world_size,fragment", [
    (["--tensor-model-parallel-size", "3"], 8,
     "world size 8 is not divisible by --tensor-model-parallel-size 3 x --pipeline-model-parallel-size 1 x "
     "--context-parallel-size 1 = 3"),
    (["--micro-batch-size", "4", "--global-batch-size", "10"], 2,
     "global batch size 10 is not divisible by --micro-batch-size 4 x data-parallel size 2 = 8"),
    (["--pipeline-model-parallel-size", "3", "--num-layers", "8"], 3,
     "--num-layers 8 is not divisible by --pipeline-model-parallel-size 3;"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
     "--num-layers 8 is not divisible by --pipeline-model-parallel-size 2 x --num-layers-per-virtual-pipeline-stage 3 = 6"),
    (["--pipeline-model-parallel-size", "2", "--num-layers", "8", "--decoder-first-pipeline-num-layers", "5",
      "--decoder-last-pipeline-num-layers", "5"], 2, "first/last stage layers (5, 5) exceed the 8 layers"),
    (["--num-layers-per-virtual-pipeline-stage", "2"], 1, "--num-layers-per-virtual-pipeline-stage needs a pipeline"),
    (["--tensor-model-parallel-size", "2", "--num-attention-heads", "3", "--hidden-size", "48"], 2,
     "number of attention heads 3 is not divisible by --tensor-model-parallel-size 2"),
    (["--tensor-model-parallel-size", "4", "--group-query-attention", "--num-query-groups", "2"], 4,
     "number of query groups 2 is not divisible by --tensor-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "4", "--ffn-hidden-size", "90"], 4,
     "ffn hidden size 90 is not divisible by --tensor-model-parallel-size 4"),
    (["--tensor-model-parallel-size", "4", "--sequence-parallel", "--seq-length", "30"], 4,
     "sequence length 30 is not divisible by --tensor-model-parallel-size 4 under --sequence-parallel"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 are both set; choose one"),
    (["--bf16", "--params-dtype", "fp32"], 1, "--params-dtype fp32 contradicts --bf16; drop --params-dtype"),
    (["--params-dtype", "fp16"], 1, "--params-dtype fp16 contradicts fp32 (neither --bf16 nor --fp16)"),
    (["--lr-warmup-iters", "5", "--lr-warmup-fraction", "0.1"], 1,
     "--lr-warmup-fraction 0.1 and --lr-warmup-iters 5 are both set; pass only one of them"),
    (["--train-iters", "10", "--lr-warmup-iters", "11"], 1, "warm-up of 11 iterations (--lr-warmup-iters)"),
    (["--lr-decay-style", "WSD"], 1, "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "200"], 1,
     "--lr-wsd-decay-iters 200 must lie between 1 and the 100 decay iterations"),
    (["--train-iters", "0"], 1, "--train-iters must be an integer >= 1, got 0"),
    (["--log-interval", "0"], 1, "--log-interval must be an integer >= 1, got 0"),
    (["--eval-interval", "0"], 1, "--eval-interval must be an integer >= 1, got 0"),
    (["--eval-iters", "-1"], 1, "--eval-iters must be an integer >= 0, got -1"),
    (["--model", "gpt2"], 1, "unknown model 'gpt2'; known models: gpt, bert, t5;"),
    (["--context-parallel-size", "2"], 2, "--context-parallel-size 2 is not supported yet"),
    (["--pipeline-model-parallel-size", "2", "--pipeline-schedule", "no-pipelining"], 2,
     "--pipeline-schedule no-pipelining: no-pipelining runs one stage, not pp 2 x vpp 1"),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2",
      "--pipeline-schedule", "1f1b"], 2, "--pipeline-schedule 1f1b: 1f1b runs one model chunk per rank, got vpp 2"),
    (["--adam-beta2", "1.0"], 1, "--adam-beta2 must be in [0.0, 1.0), got 1.0"),
    (["--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"], 1,
     "--min-loss-scale 8.0 must be positive and at most --initial-loss-scale 4.0"),
])
def test_invalid_combinations_are_one_line_before_anything_starts(argv, world_size, fragment, cpu_only,
                                                                  no_process_groups):
    assert fragment in rejected(argv, world_size)


def test_nccl_without_cuda_falls_back_to_gloo_with_one_notice(cpu_only):
    """A Megatron launch script (T5's passes --distributed-backend nccl) runs on a CPU machine."""
    config = parse_pretrain_args(["--distributed-backend", "nccl"], 1)
    assert config.distributed_backend == "gloo"
    assert [n for n in config.notices if "nccl" in n] == [
        "--distributed-backend nccl needs CUDA, which is not available; using gloo"]


def test_world_size_must_be_positive(cpu_only):
    assert "world size must be a positive integer, got 0" in rejected([], 0)


def test_config_file_both_spellings_flat_and_nested_with_command_line_winning(tmp_path, cpu_only):
    path = write(tmp_path, """
tensor-model-parallel-size: 2
micro_batch_size: 4
train_iters: 50
sequence-parallel: true
optimizer:
  lr: 3e-4          # YAML reads this as a string; it is converted like the command line would
  lr-decay-style: cosine
model:
  hidden-size: 128
  num_attention_heads: 4
""")
    config = parse_pretrain_args(["--config", path, "--micro-batch-size", "2", "--train-iters", "100",
                                  "--no-sequence-parallel"], 4)
    assert config.distributed.tensor_model_parallel_size == 2  # file, dashed, flat
    assert (config.optimizer.lr, config.optimizer.lr_decay_style) == (3e-4, "cosine")  # file, nested
    assert (config.model.hidden_size, config.model.num_attention_heads) == (128, 4)  # file, nested, both spellings
    assert config.model.num_layers == 8  # neither: the registry's default
    # the command line wins, even where it repeats the default (100) or turns a switch off
    assert (config.training.micro_batch_size, config.training.train_iters) == (2, 100)
    assert config.distributed.sequence_parallel is False
    assert (config.layout.dp, config.global_batch_size) == (2, 4)


def test_flat_model_key_is_the_registry_name(tmp_path, cpu_only):
    assert parse_pretrain_args(["--config", write(tmp_path, "model: gpt\nnum-layers: 4\n")], 1).model.num_layers == 4
    assert "unknown model 'llama'" in rejected(["--config", write(tmp_path, "training:\n  model: llama\n")])


def test_config_file_works_through_a_subcommand(tmp_path, cpu_only):
    parser = argparse.ArgumentParser(prog="megalith")
    add_pretrain_arguments(parser.add_subparsers(dest="command").add_parser("pretrain"))
    args = parser.parse_args(["pretrain", "--mock-data", "--config", write(tmp_path, "lr: 0.5\nmin_lr: 5.0e-5\n"),
                              "--lr", "1e-4"])
    config = resolve_pretrain_config(args, world_size=1)
    assert (config.optimizer.lr, config.optimizer.min_lr) == (1e-4, 5e-5)


@pytest.mark.parametrize("text,fragment", [
    ("tensor_model_paralel_size: 2\n", "unknown key 'tensor_model_paralel_size' in --config {path}; "
                                       "did you mean --tensor-model-parallel-size?"),
    ("optimizer:\n  lr-warmup-iter: 3\n", "unknown key 'optimizer.lr-warmup-iter' in --config {path}; "
                                          "did you mean --lr-warmup-iters?"),
    ("- lr\n- 1e-4\n", "--config {path} must hold a mapping of flag names to values, got a list"),
    ("lr: [1, 2\n", "--config {path} is not valid YAML (line 2, column 1)"),
    ("optimizer:\n  bf16: true\n", "key 'optimizer.bf16' in --config {path} belongs to section precision, not optimizer"),
    ("lr: 1.0e-3\noptimizer:\n  lr: 2.0e-3\n", "--config {path} gives --lr twice ('lr' and 'optimizer.lr'); keep one"),
    ("train_iters: ten\n", "--train-iters in --config {path} must be an integer, got 'ten'"),
    ("train_iters: 2.5\n", "--train-iters in --config {path} must be an integer, got 2.5"),
    ("bf16: 1\n", "--bf16 in --config {path} must be true or false, got 1"),
    ("lr: null\n", "--lr in --config {path} needs a value, got null"),
    ("lr-decay-style: fast\n", "--lr-decay-style in --config {path}: 'fast' is not one of constant, linear"),
    ("config: other.yaml\n", "--config {path} cannot name another config file"),
    ("distributed: 2\n", "section 'distributed' in --config {path} must be a mapping"),
])
def test_bad_config_files_are_one_line_naming_the_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    assert fragment.format(path=path) in rejected(["--config", path])


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    assert f"cannot read --config {missing}: No such file or directory" in rejected(["--config", missing])


def test_empty_config_file_changes_nothing(tmp_path, cpu_only):
    assert parse_pretrain_args(["--config", write(tmp_path, "")], 1) == parse_pretrain_args([], 1)


def test_help_lists_every_group_and_every_flag_with_a_default(capsys):
    with pytest.raises(SystemExit) as info:
        build_pretrain_parser().parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for group in ("model:", "distributed:", "mixed precision:", "optimizer and learning rate:", "training:",
                  "logging:", "config:"):
        assert f"\n{group}\n" in out
    for dest in section_fields():
        assert f"--{dest.replace('_', '-')}" in out
    actions = [a for a in build_pretrain_parser()._actions  # megalith's own flags (not the Megatron table's)
               if a.dest != "help" and not a.dest.startswith("megatron_")]
    assert len(actions) == len(section_fields()) + 1  # + --config
    for action in actions:
        assert action.help and "default: %(default)s" in action.help and not action.help.startswith("default")


def test_flag_names_are_unique_across_sections():
    names = [f for cls in SECTIONS.values() for f in cls.__dataclass_fields__]
    assert len(names) == len(set(names)) == len(section_fields())


def rich_config():
    return parse_pretrain_args(
        ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
         "--num-layers", "8", "--num-layers-per-virtual-pipeline-stage", "2", "--group-query-attention", "--num-query-groups", "2",
         "--position-embedding-type", "rope", "--swiglu", "--recompute-granularity", "full", "--bf16",
         "--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "3e-4", "--min-lr", "3e-5",
         "--lr-warmup-fraction", "0.05", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "20",
         "--adam-eps", "1e-8", "--use-distributed-optimizer", "--distributed-timeout-minutes", "2.5",
         "--log-json", "RUN/log.jsonl", "--wandb-project", "p", "--wandb-exp-name", "e", "--no-log-progress-bar", "--mock-data"], 8)


def test_resolved_config_round_trips_through_config(tmp_path, cpu_only):
    config = rich_config()
    path = write_resolved_config(config, str(tmp_path / "out"))
    assert path == str(tmp_path / "out" / "config.yaml")
    assert os.listdir(tmp_path / "out") == ["config.yaml"]  # the temporary file was renamed, nothing left over
    text = open(path).read()
    positions = [text.index(f"\n{section}:\n") for section in (*SECTIONS, "derived")]
    assert positions == sorted(positions)
    assert "  data_parallel_size: 2\n" in text and "  pipeline_schedule: interleaved-1f1b\n" in text
    again = parse_pretrain_args(["--config", path], 8)
    assert again == config
    assert again.to_dict() == config.to_dict()
    assert (again.model.params_dtype, again.model.recompute_method, again.optimizer.lr_warmup_fraction) == (
        "bf16", "uniform", 0.05)
    # the derived section is recomputed, not read: the same file under 16 processes has dp 4
    assert parse_pretrain_args(["--config", path], 16).layout.dp == 4


def test_to_dict_is_plain_sorted_sections():
    data = rich_config().to_dict()
    assert list(data) == [*SECTIONS, "derived"]
    for name in SECTIONS:
        assert list(data[name]) == sorted(data[name])
    assert "params_dtype" not in data["model"]  # it follows the precision section
    assert data["derived"] == {"world_size": 8, "data_parallel_size": 2, "virtual_pipeline_size": 2,
                               "num_micro_batches": 4, "global_batch_size": 16, "pipeline_schedule": "interleaved-1f1b",
                               "ddp_bucket_size": 40_000_000, "distributed_backend": data["derived"]["distributed_backend"]}


def test_write_resolved_config_into_a_file_path_is_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write the resolved config to") as info:
        write_resolved_config(rich_config(), str(blocker / "sub"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("argv,expected", [
    (["--log-json", "runs/a/log.jsonl", "--tensorboard-dir", "tb"], "runs/a"),
    (["--log-json", "log.jsonl"], "."),
    (["--tensorboard-dir", "tb", "--wandb-save-dir", "wb"], "tb"),
    (["--wandb-save-dir", "wb", "--wandb-project", "p", "--wandb-exp-name", "e"], "wb"),
    (["--wandb-project", "p", "--wandb-exp-name", "e"], None),
])
def test_resolved_config_goes_beside_the_logs(argv, expected, cpu_only):
    assert resolved_config_directory(parse_pretrain_args(argv, 1)) == expected


@pytest.mark.parametrize("env,expected", [
    ({}, 1),
    ({"WORLD_SIZE": "8"}, 8),
    ({"SLURM_NTASKS": "16"}, 16),
    ({"WORLD_SIZE": "4", "SLURM_NTASKS": "16"}, 4),  # torchrun inside a Slurm allocation
])
def test_world_size_from_env(env, expected):
    assert world_size_from_env(env) == expected


@pytest.mark.parametrize("env,fragment", [
    ({"WORLD_SIZE": "eight"}, "WORLD_SIZE='eight' is not a positive integer"),
    ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS='0' is not a positive integer"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not a positive integer"),
])
def test_bad_world_size_in_env(env, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        world_size_from_env(env)
    assert "\n" not in str(info.value)
