"""`megalith pretrain`'s command line: Megatron's flags, a YAML `--config`, and the checks of a whole run.

Precedence, lowest first: the dataclasses' defaults, the model's registry defaults (for model
flags), the `--config` file, the command line. Flags the user typed are remembered by the
parser's actions (megalith.config.explicit_flags), so this works the same when the pretrain
flags are a subcommand of `megalith`. Nothing here touches torch.distributed: every bad
combination is a ConfigError of one line before any process group exists.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import fields, replace

from megalith.config.flags import add_config_arguments, explicit_flags
from megalith.config.megatron import add_megatron_compat_arguments, compat_notice, refuse_unsupported
from megalith.config.data import read_data_args
from megalith.config.model import ModelConfig
from megalith.config.pretrain import SECTIONS, PretrainConfig
from megalith.config.yaml_file import config_to_yaml, load_config_file
from megalith.data.tokenizers import DEFAULT_TOKENIZER_TYPES
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec

PRETRAIN_DESCRIPTION = (
    "Pretrain a model with Megatron-style tensor, pipeline and data parallelism (launch with torchrun or srun; "
    "one process on its own). Flags are Megatron's; --config FILE.yaml gives defaults that the command line overrides."
)
PRETRAIN_USAGE = "%(prog)s [--config FILE.yaml] [--flag VALUE ...] (see the groups below)"
GROUP_TITLES = {
    "model": "model",
    "distributed": "distributed",
    "precision": "mixed precision",
    "optimizer": "optimizer and learning rate",
    "training": "training",
    "data": "data and tokenizer",
    "checkpointing": "checkpointing",
    "logging": "logging",
}
RESOLVED_CONFIG_NAME = "config.yaml"


def add_pretrain_arguments(parser: argparse.ArgumentParser) -> None:
    """Every pretrain flag, grouped by topic, onto `parser` (a parser or a subcommand's parser)."""
    for name, cls in SECTIONS.items():
        if name == "model":
            group = parser.add_argument_group(
                "model", "Megatron's model flags; defaults shown are gpt's, and --model's registry entry supplies "
                "its own defaults for the flags that are not given")
            add_config_arguments(group, ModelConfig, BUILTIN_MODELS["gpt"].defaults)
        else:
            add_config_arguments(parser.add_argument_group(GROUP_TITLES[name]), cls)
    parser.add_argument_group("config").add_argument(
        "--config", metavar="FILE.yaml", default=None,
        help="YAML mapping of flag names (dashes or underscores; flat, or under model/distributed/precision/"
        "optimizer/training/data/checkpointing/logging); flags on the command line override it; default: %(default)s")
    add_megatron_compat_arguments(parser)  # after megalith's own flags, so those are never shadowed


def build_pretrain_parser(prog: str = "megalith pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, usage=PRETRAIN_USAGE, description=PRETRAIN_DESCRIPTION)
    add_pretrain_arguments(parser)
    return parser


def _section(cls, values: dict):
    return cls(**{f.name: values[f.name] for f in fields(cls)})


def _model_default(name: str, spec_defaults: Mapping) -> object:
    if name in spec_defaults:
        return spec_defaults[name]
    return next(f.default for f in fields(ModelConfig) if f.name == name)


def resolve_pretrain_config(args: argparse.Namespace, world_size: int, explicit: set[str] | None = None) -> PretrainConfig:
    """The checked config of a run of `world_size` processes from parsed flags (+ their --config file).

    `explicit`: the dest names the user gave on the command line; by default what the parser
    recorded. Those win over the file; the file wins over the defaults.
    """
    refuse_unsupported(args)  # Megatron flags owned by other issues: one line, before anything else
    given = set(explicit) if explicit is not None else explicit_flags(args)
    values = {f.name: getattr(args, f.name, f.default) for cls in SECTIONS.values() for f in fields(cls)}
    path = getattr(args, "config", None)
    from_file = load_config_file(path) if path else {}
    values.update({name: value for name, value in from_file.items() if name not in given})
    given |= set(from_file)
    spec = get_model_spec(values["model"])
    for name in ModelConfig.field_names():
        if name not in given:
            values[name] = _model_default(name, spec.defaults)
    if values["tokenizer_type"] is None and values["vocab_file"]:  # Megatron's pretrain_{gpt,bert,t5}.py default
        values["tokenizer_type"] = DEFAULT_TOKENIZER_TYPES.get(spec.dataset, "GPT2BPETokenizer")
    if values["data_args_path"]:
        if values["data_path"]:
            raise ConfigError("--data-args-path and --data-path are both given; give one (the file holds the "
                              "--data-path words)")
        values["data_path"] = read_data_args(values["data_args_path"])
    if values["use_checkpoint_args"]:
        values.update(checkpoint_model_args(values["load"], given))
    sections = {name: _section(cls, values) for name, cls in SECTIONS.items() if name != "model"}
    data = sections["data"]
    if data.reads_datasets:  # the files exist and are sound; the tokenizer sets the model's vocabulary
        from megalith.training.data import check_datasets, model_vocab_size

        check_datasets(data)
        values["vocab_size"] = model_vocab_size(data, values["vocab_size"], "vocab_size" in given)
    if "params_dtype" not in given:  # it follows --bf16 / --fp16; PretrainConfig refuses a contradiction
        values["params_dtype"] = sections["precision"].params_dtype
    config = PretrainConfig.resolve(world_size, model=_section(ModelConfig, values), **sections)
    if data.reads_datasets:  # the tokenizer has the tokens the model's samples need (BERT: [MASK]; T5: sentinels)
        from megalith.training.data import check_data_tokenizer

        check_data_tokenizer(config)
    if config.checkpointing.load:  # the checkpoint fits the model (reads its metadata only)
        from megalith.training.checkpoint import check_load_target

        check_load_target(config)
    notice = compat_notice(args)  # Megatron's GPU tuning knobs: accepted, named once
    return replace(config, notices=config.notices + (notice,)) if notice else config


EP_NOT_PROVEN = ("expert parallelism's groups, dispatcher and gradient routing are built and tested piece by piece, "
                 "but not yet proven exact end to end (verify under ep, checkpoints of expert shards: issue 21)")


def checkpoint_model_args(load: str | None, given: set[str]) -> dict:
    """--use-checkpoint-args: the model-shape flags not given here, from the --load checkpoint's metadata
    (Megatron's load_args_from_checkpoint); the flags given still win and must then agree with it."""
    import json

    from megalith.training.checkpoint_format import METADATA_FILE, iteration_dir_name, read_tracker

    if not load:
        raise ConfigError("--use-checkpoint-args takes the model's flags from the --load checkpoint; give --load DIR")
    iteration = read_tracker(load)
    if iteration is None:
        raise ConfigError(f"--use-checkpoint-args: {load} holds no checkpoint yet (no latest_checkpointed_iteration.txt)"
                          "; drop --use-checkpoint-args or point --load at a checkpoint")
    path = os.path.join(load, iteration_dir_name(iteration), METADATA_FILE)
    try:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle).get("model_config") or {}
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"--use-checkpoint-args: cannot read {path} ({error}); the checkpoint is incomplete") from None
    from megalith.training.checkpoint import RUNTIME_FIELDS

    return {name: value for name, value in saved.items()
            if name in ModelConfig.field_names() and name not in RUNTIME_FIELDS and name not in given}


def parse_pretrain_args(argv: list[str], world_size: int) -> PretrainConfig:
    """Parse `argv` (pretrain flags only), read its --config, and resolve for `world_size` processes."""
    return resolve_pretrain_config(build_pretrain_parser().parse_args(argv), world_size)


def _positive_count(name: str, text: str) -> int:
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:
        raise ConfigError(f"{name}={text!r} is not a positive integer; set {name} to the number of processes")
    return int(text)


def world_size_from_env(env: Mapping[str, str] = os.environ) -> int:
    """Processes in the job: WORLD_SIZE (torchrun), else SLURM_NTASKS (srun), else 1."""
    for name in ("WORLD_SIZE", "SLURM_NTASKS"):
        if name in env:
            return _positive_count(name, env[name])
    return 1


def resolved_config_directory(config: PretrainConfig) -> str | None:
    """Where config.yaml goes: beside the logs (--log-json's folder, --tensorboard-dir, --wandb-save-dir)."""
    logging = config.logging
    if logging.log_json:
        return os.path.dirname(logging.log_json) or "."
    return logging.tensorboard_dir or logging.wandb_save_dir or None


def write_resolved_config(config: PretrainConfig, directory: str) -> str:
    """Write DIR/config.yaml atomically (a temporary file renamed over it); returns its path.

    Call it on one rank only. A reader never sees half a file, and `--config` on the written
    file gives the same PretrainConfig back.
    """
    path = os.path.join(directory, RESOLVED_CONFIG_NAME)
    temporary = None
    try:
        os.makedirs(directory, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{RESOLVED_CONFIG_NAME}.", suffix=".tmp")
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(config_to_yaml(config))
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
        raise ConfigError(f"cannot write the resolved config to {path}: {error.strerror or error}; "
                          "check that the directory is writable") from None
    return path
