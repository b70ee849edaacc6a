"""The training section: which model, how many steps, which batches."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.config.validators import check_choices, check_int
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec

DATALOADER_TYPES = ("single", "cyclic")


@dataclass(frozen=True)
class TrainingConfig:
    """What to train, for how long, on which batches (group "training")."""

    model: str = flag_field("gpt", f"a built-in model ({', '.join(BUILTIN_MODELS)}), module.path:ATTRIBUTE naming a "
                            "ModelSpec, or an entry point of the group megalith.models (docs/custom_models.md)")
    train_iters: int | None = flag_field(None, "optimizer steps (None: from --train-samples, else 100)")
    train_samples: int | None = flag_field(None, "train on this many samples instead of --train-iters")
    micro_batch_size: int = flag_field(1, "sequences per micro-batch")
    global_batch_size: int | None = flag_field(None, "sequences per step (None: micro-batch size x dp)")
    rampup_batch_size: tuple[int, ...] | None = flag_field(
        None, "START INCREMENT SAMPLES: the global batch grows from START by INCREMENT up to --global-batch-size, "
        "evenly over SAMPLES samples (with --train-samples or --train-iters)")
    calculate_per_token_loss: bool = flag_field(False, "the step loss is the sum over loss tokens divided by their "
                                                "count across micro-batches and dp ranks (not a mean per sequence)")
    dataloader_type: str = flag_field("single", "single: each sample once, in order of the shuffled dataset; cyclic: "
                                      "the epoch's order reshuffled every pass", DATALOADER_TYPES)
    num_workers: int = flag_field(2, "Megatron: DataLoader worker processes; megalith reads each micro-batch's "
                                  "samples on demand in the training process (memory-mapped), so the count changes "
                                  "nothing", status="(c) accepted: samples are read in the training process")
    manual_gc: bool = flag_field(False, "turn Python's automatic garbage collector off and collect at fixed steps")
    manual_gc_interval: int = flag_field(0, "with --manual-gc: collect every this many iterations (0: only at "
                                         "the start and around evaluation)")
    manual_gc_eval: bool = flag_field(True, "with --manual-gc: collect before and after each evaluation")
    empty_unused_memory_level: int = flag_field(0, "free the allocator's cached memory: 1 after each step, 2 also "
                                                "after each evaluation", (0, 1, 2))
    profile: bool = flag_field(False, "write a torch.profiler trace of steps --profile-step-start to "
                               "--profile-step-end under --tensorboard-dir (Perfetto / TensorBoard)")
    profile_step_start: int = flag_field(10, "first profiled iteration")
    profile_step_end: int = flag_field(12, "iteration at which profiling stops")
    profile_ranks: tuple[int, ...] = flag_field((0,), "global ranks that profile")
    seed: int = flag_field(1234, "seed of initialisation, data and dropout")
    eval_interval: int = flag_field(1000, "iterations between evaluations")
    eval_iters: int = flag_field(100, "batches per evaluation (0: none)")
    log_interval: int = flag_field(100, "iterations between log lines")

    def check_length(self) -> None:
        """As given on the command line (before resolution fills in train_iters): iterations or samples.

        A resolved --train-samples run carries both: the samples and the iterations they take.
        """
        if self.train_iters is not None and self.train_samples is not None:
            raise ConfigError(f"--train-iters {self.train_iters} and --train-samples {self.train_samples} are both "
                              "given; give one (Megatron trains for iterations or for samples, not both)")

    @property
    def iterations(self) -> int:
        """train_iters once resolved (PretrainConfig.resolve fills it in from --train-samples or 100)."""
        assert self.train_iters is not None, "an unresolved TrainingConfig has no iteration count yet"
        return self.train_iters

    def __post_init__(self) -> None:
        get_model_spec(self.model)
        for name in ("micro_batch_size", "eval_interval", "log_interval"):
            check_int(name, getattr(self, name))
        check_int("train_iters", self.train_iters, optional=True)
        check_int("train_samples", self.train_samples, optional=True)
        check_choices(self)
        check_int("num_workers", self.num_workers, 0)
        check_int("manual_gc_interval", self.manual_gc_interval, 0)
        check_int("profile_step_start", self.profile_step_start, 0)
        check_int("profile_step_end", self.profile_step_end, 0)
        if self.profile and self.profile_step_end <= self.profile_step_start:
            raise ConfigError(f"--profile-step-end {self.profile_step_end} must be after --profile-step-start "
                              f"{self.profile_step_start}; the window is iterations start..end-1")
        for rank in self.profile_ranks:
            check_int("profile_ranks", rank, 0)
        check_int("global_batch_size", self.global_batch_size, 1, optional=True)
        check_int("eval_iters", self.eval_iters, 0)
        check_int("seed", self.seed, 0)
