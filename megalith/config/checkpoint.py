"""The checkpointing section: saving, loading and leaving a run, in Megatron's directory layout."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.config.validators import check_int, check_range
from megalith.errors import ConfigError

# megalith's own format first; the rest are Megatron's names, which write megalith's format.
CKPT_FORMATS = ("megalith", "torch_dist", "torch", "zarr", "torch_dcp", "fsdp_dtensor")
# What each Megatron format is, for the one notice a run that names one prints.
MEGATRON_CKPT_FORMATS = {
    "torch_dist": "PyTorch distributed checkpointing, reshardable",
    "torch": "one torch.save file per model-parallel rank, fixed to its layout",
    "zarr": "Zarr arrays (deprecated in Megatron)",
    "torch_dcp": "torch.distributed.checkpoint's own layout",
    "fsdp_dtensor": "DTensor shards of Megatron's FSDP",
}


def ckpt_format_notice(ckpt_format: str) -> str | None:
    """The line a run that names one of Megatron's checkpoint formats prints (None for megalith's)."""
    if ckpt_format == "megalith":
        return None
    return (f"--ckpt-format {ckpt_format} ({MEGATRON_CKPT_FORMATS[ckpt_format]}) is Megatron's; megalith writes "
            "its own format (reshardable safetensors shards, any layout on load; docs/checkpoints.md)")


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving, loading and leaving a run (group "checkpointing"); Megatron's flags and directory layout."""

    save: str | None = flag_field(None, "write checkpoints here (DIR/iter_0000100/, DIR/latest_checkpointed_iteration.txt)")
    save_interval: int | None = flag_field(None, "iterations between checkpoints (None: only on exit)")
    load: str | None = flag_field(None, "resume from the newest checkpoint here (any layout; none yet: start fresh)")
    no_save_optim: bool = flag_field(False, "checkpoints without the optimizer state")
    no_save_rng: bool = flag_field(False, "checkpoints without the random states")
    use_checkpoint_args: bool = flag_field(False, "take the model's shape flags from the --load checkpoint's "
                                           "metadata (flags given here must agree)")
    ckpt_format: str = flag_field("megalith", "checkpoint format: megalith (reshardable safetensors shards); "
                                  "torch_dist, torch, zarr, torch_dcp and fsdp_dtensor are Megatron's formats and "
                                  "write megalith's (with one notice)", CKPT_FORMATS)
    no_load_optim: bool = flag_field(False, "load weights, schedule position and data position, not the optimizer")
    no_load_rng: bool = flag_field(False, "keep this run's random states")
    finetune: bool = flag_field(False, "load the weights only and start at iteration 0")
    override_opt_param_scheduler: bool = flag_field(
        False, "keep this run's LR schedule flags instead of refusing ones that differ from the checkpoint's")
    exit_signal_handler: bool = flag_field(False, "on SIGTERM save a checkpoint and exit with status 0")
    exit_interval: int | None = flag_field(None, "save and exit when the iteration is a multiple of this")
    exit_duration_in_mins: float | None = flag_field(None, "save and exit after this many minutes of training")

    def __post_init__(self) -> None:
        check_int("save_interval", self.save_interval, 1, optional=True)
        check_int("exit_interval", self.exit_interval, 1, optional=True)
        check_range("exit_duration_in_mins", self.exit_duration_in_mins, 0, open_low=True, optional=True)
        if self.save_interval is not None and self.save is None:
            raise ConfigError(f"--save-interval {self.save_interval} needs --save DIR (where to write checkpoints)")
        if self.exit_signal_handler and self.save is None:
            raise ConfigError("--exit-signal-handler saves a checkpoint on SIGTERM; give --save DIR")
