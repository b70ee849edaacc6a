"""The optimizer and learning-rate section."""

from __future__ import annotations

from dataclasses import dataclass

from megalith.config.flags import flag_field
from megalith.config.validators import check_choices, check_range
from megalith.errors import ConfigError
from megalith.training.lr_schedule import LR_DECAY_STYLES, LR_WSD_DECAY_STYLES, LRSchedule

OPTIMIZER_NAMES = ("adam", "sgd")


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and the learning-rate schedule (group "optimizer and learning rate")."""

    optimizer: str = flag_field("adam", "adam is AdamW (decoupled weight decay), as Megatron's adam",
                                OPTIMIZER_NAMES)
    lr: float = flag_field(1e-4, "peak learning rate")
    min_lr: float = flag_field(0.0, "learning rate at the end of the decay")
    weight_decay: float = flag_field(0.01, "decoupled weight decay (not on biases and norms)")
    adam_beta1: float = flag_field(0.9, "Adam beta1")
    adam_beta2: float = flag_field(0.999, "Adam beta2")
    adam_eps: float = flag_field(1e-8, "Adam epsilon")
    sgd_momentum: float = flag_field(0.9, "SGD momentum")
    clip_grad: float = flag_field(1.0, "clip the global gradient norm to this (0: off)")
    optimizer_cpu_offload: bool = flag_field(False, "fp32 main weights and optimizer state of "
                                             "--optimizer-offload-fraction of this rank's elements in host memory; "
                                             "their step runs on the CPU")
    optimizer_offload_fraction: float = flag_field(1.0, "share of this rank's optimizer elements offloaded with "
                                                   "--optimizer-cpu-offload (whole fragments in order, rounded up)")
    decoupled_lr: float | None = flag_field(None, "peak learning rate of the word embedding and output layer "
                                            "(None: --lr)")
    decoupled_min_lr: float | None = flag_field(None, "minimum learning rate of the embedding and output layer "
                                                "(None: --min-lr)")
    lr_warmup_iters: int = flag_field(0, "linear warm-up iterations")
    lr_warmup_samples: int = flag_field(0, "linear warm-up in samples (with --train-samples)")
    lr_warmup_fraction: float | None = flag_field(None, "warm-up as a fraction of the decay (iterations or samples)")
    lr_warmup_init: float = flag_field(0.0, "learning rate at the start of the warm-up")
    lr_decay_style: str = flag_field("linear", "decay after the warm-up", LR_DECAY_STYLES)
    lr_decay_iters: int | None = flag_field(None, "iterations until --min-lr (None: --train-iters)")
    lr_decay_samples: int | None = flag_field(None, "samples until --min-lr (with --train-samples; None: "
                                              "--train-samples)")
    lr_wsd_decay_iters: int | None = flag_field(None, "WSD: length of the final anneal in iterations")
    lr_wsd_decay_samples: int | None = flag_field(None, "WSD: length of the final anneal in samples (with "
                                                  "--train-samples)")
    lr_wsd_decay_style: str = flag_field("exponential", "WSD: shape of the final anneal", LR_WSD_DECAY_STYLES)

    def __post_init__(self) -> None:
        check_choices(self)
        check_range("weight_decay", self.weight_decay, 0.0)
        check_range("adam_beta1", self.adam_beta1, 0.0, 1.0)
        check_range("adam_beta2", self.adam_beta2, 0.0, 1.0)
        check_range("adam_eps", self.adam_eps, 0.0, open_low=True)
        check_range("sgd_momentum", self.sgd_momentum, 0.0)
        check_range("clip_grad", self.clip_grad, 0.0)
        check_range("optimizer_offload_fraction", self.optimizer_offload_fraction, 0.0, 1.0, open_high=False)
        if self.optimizer_offload_fraction != 1.0 and not self.optimizer_cpu_offload:  # Megatron ignores it silently
            raise ConfigError(f"--optimizer-offload-fraction {self.optimizer_offload_fraction} takes effect only with "
                              "--optimizer-cpu-offload; add that flag or drop the fraction")
        check_range("decoupled_lr", self.decoupled_lr, 0.0, open_low=True, optional=True)
        check_range("decoupled_min_lr", self.decoupled_min_lr, 0.0, optional=True)
        if self.decoupled_lr is not None:  # without it Megatron ignores --decoupled-min-lr, and so does this
            low = self.min_lr if self.decoupled_min_lr is None else self.decoupled_min_lr
            if not self.lr_warmup_init <= self.decoupled_lr >= low:
                raise ConfigError(f"--decoupled-lr {self.decoupled_lr} is below --lr-warmup-init {self.lr_warmup_init} "
                                  f"or the decoupled minimum {low} (--decoupled-min-lr, else --min-lr); raise it")

    def lr_schedule(self, train_iters: int | None, *, train_samples: int | None = None,
                    global_batch_size: int = 1) -> LRSchedule:
        """The learning rate after any number of samples; raises if the flags do not fit the run.

        Give `train_iters` (iteration flags, worth `global_batch_size` samples an iteration, the full
        batch as in Megatron) or `train_samples` (sample flags), not both.
        """
        return LRSchedule(lr=self.lr, train_iters=train_iters, min_lr=self.min_lr,
                          lr_warmup_iters=self.lr_warmup_iters, lr_warmup_fraction=self.lr_warmup_fraction,
                          lr_warmup_init=self.lr_warmup_init, lr_decay_style=self.lr_decay_style,
                          lr_decay_iters=self.lr_decay_iters, lr_wsd_decay_iters=self.lr_wsd_decay_iters,
                          lr_wsd_decay_style=self.lr_wsd_decay_style, train_samples=train_samples,
                          lr_warmup_samples=self.lr_warmup_samples, lr_decay_samples=self.lr_decay_samples,
                          lr_wsd_decay_samples=self.lr_wsd_decay_samples, global_batch_size=global_batch_size)
