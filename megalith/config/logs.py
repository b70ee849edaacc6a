"""The logging section: where metrics go besides the log line."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.config.validators import check_choices, check_int
from megalith.errors import ConfigError
from megalith.training.timers import TIMING_LOG_LEVELS


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides the log line (group "logging")."""

    log_json: str | None = flag_field(None, "append one JSON record per log interval to this file")
    log_comm_bytes: bool = flag_field(False, "count the calls and bytes of every collective and p2p per group kind "
                                      "and operation; the last rank's counts of the interval's last iteration go "
                                      "into the --log-json record as \"comm\" (docs/communication.md)")
    tensorboard_dir: str | None = flag_field(None, "write TensorBoard scalars here")
    tensorboard_log_interval: int = flag_field(1, "iterations between TensorBoard scalars")
    log_timers_to_tensorboard: bool = flag_field(False, "TensorBoard: the step's timers")
    log_validation_ppl_to_tensorboard: bool = flag_field(False, "TensorBoard: validation perplexity")
    log_memory_to_tensorboard: bool = flag_field(False, "TensorBoard: memory allocated and reserved")
    log_throughput: bool = flag_field(False, "the log line's TFLOP/s field (megalith prints it always)")
    wandb_project: str | None = flag_field(None, "log to this Weights & Biases project")
    wandb_exp_name: str | None = flag_field(None, "Weights & Biases run name")
    wandb_save_dir: str | None = flag_field(None, "Weights & Biases local directory")
    timing_log_level: int = flag_field(0, "0: none; 1 and 2: the last rank's forward-backward (with the gradient reduction) and optimizer times per iteration",
                                       TIMING_LOG_LEVELS)
    moe_per_layer_logging: bool = flag_field(False, "MoE models: each MoE layer's load-balancing loss, z-loss, "
                                             "tokens per expert (min, max) and dropped fraction in the --log-json "
                                             "record (\"moe_layers\") and on TensorBoard (moe/NAME_layer_I)")
    log_progress_bar: bool | None = flag_field(None, "tqdm progress bar (None: when stdout is a terminal)")

    def __post_init__(self) -> None:
        check_choices(self)
        check_int("tensorboard_log_interval", self.tensorboard_log_interval)
        if self.log_comm_bytes and not self.log_json:
            raise ConfigError("--log-comm-bytes writes its counts into the --log-json records; add --log-json PATH")
        if self.wandb_project and not self.wandb_exp_name:  # before any process starts, not at the first log
            raise ConfigError(f"--wandb-project {self.wandb_project} needs --wandb-exp-name; add --wandb-exp-name "
                              "NAME for the run")


def check_profile_output(training, logging: LoggingConfig, world_size: int) -> None:
    """--profile writes its traces under --tensorboard-dir (as Megatron's torch.profiler does), on
    ranks that exist; checked by PretrainConfig.resolve, before any process starts."""
    if not training.profile:
        return
    if not logging.tensorboard_dir:
        raise ConfigError("--profile writes its trace under --tensorboard-dir; add --tensorboard-dir DIR")
    outside = [rank for rank in training.profile_ranks if rank >= world_size]
    if outside:
        raise ConfigError(f"--profile-ranks {' '.join(map(str, outside))}: the job has ranks 0..{world_size - 1}; "
                          "name ranks of this job")
