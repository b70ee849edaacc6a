"""The training section: which model, how many steps, which batches."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.config.validators import check_int
from megalith.models.registry import BUILTIN_MODELS, get_model_spec


@dataclass(frozen=True)
class TrainingConfig:
    """What to train, for how long, on which batches (group "training")."""

    model: str = flag_field("gpt", f"a built-in model ({', '.join(BUILTIN_MODELS)}), module.path:ATTRIBUTE naming a "
                            "ModelSpec, or an entry point of the group megalith.models (docs/custom_models.md)")
    train_iters: int = flag_field(100, "optimizer steps")
    micro_batch_size: int = flag_field(1, "sequences per micro-batch")
    global_batch_size: int | None = flag_field(None, "sequences per step (None: micro-batch size x dp)")
    seed: int = flag_field(1234, "seed of initialisation, data and dropout")
    eval_interval: int = flag_field(1000, "iterations between evaluations")
    eval_iters: int = flag_field(100, "batches per evaluation (0: none)")
    log_interval: int = flag_field(100, "iterations between log lines")

    def __post_init__(self) -> None:
        get_model_spec(self.model)
        for name in ("train_iters", "micro_batch_size", "eval_interval", "log_interval"):
            check_int(name, getattr(self, name))
        check_int("global_batch_size", self.global_batch_size, 1, optional=True)
        check_int("eval_iters", self.eval_iters, 0)
        check_int("seed", self.seed, 0)
