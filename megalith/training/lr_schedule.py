"""Learning-rate schedule with Megatron's OptimizerParamScheduler semantics, counted in iterations.

Megatron counts its schedule in samples (every step adds the global batch size); with a fixed
global batch size that is the same curve as counting optimizer steps, which is what this module
does. `LRSchedule` is the pure, validated description (Megatron's `--lr*` flags); `LRScheduler`
is the one small mutable object a training run owns: it knows how many steps have been taken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megalith.errors import ConfigError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate of every optimizer step, from Megatron's flags (names without dashes).

    Warm-up runs linearly from `lr_warmup_init` to `lr` over the warm-up steps; then the decay
    style takes the rate from `lr` down to `min_lr` at `decay_iters`, and `min_lr` is kept after.
    WSD (warm-up, stable, decay) holds `lr` and anneals only over the last `lr_wsd_decay_iters`.
    """

    lr: float
    train_iters: int
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str = "exponential"

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}; pass the peak learning rate, e.g. --lr 3e-4")
        if self.train_iters < 1:
            raise ConfigError(f"--train-iters must be at least 1, got {self.train_iters}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(
                f"--min-lr {self.min_lr} must lie between 0 and --lr {self.lr}; choose a --min-lr in that range"
            )
        if not 0 <= self.lr_warmup_init <= self.lr:
            raise ConfigError(
                f"--lr-warmup-init {self.lr_warmup_init} must lie between 0 and --lr {self.lr}; "
                "choose a --lr-warmup-init in that range"
            )
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ConfigError(
                f"unknown --lr-decay-style {self.lr_decay_style!r}; choose one of {', '.join(LR_DECAY_STYLES)}"
            )
        if self.lr_wsd_decay_style not in LR_WSD_DECAY_STYLES:
            raise ConfigError(
                f"unknown --lr-wsd-decay-style {self.lr_wsd_decay_style!r}; "
                f"choose one of {', '.join(LR_WSD_DECAY_STYLES)}"
            )
        if self.lr_decay_iters is not None and self.lr_decay_iters < 1:
            raise ConfigError(
                f"--lr-decay-iters must be at least 1, got {self.lr_decay_iters}; "
                "or leave it out to decay over --train-iters"
            )
        if self.lr_warmup_iters < 0:
            raise ConfigError(f"--lr-warmup-iters must not be negative, got {self.lr_warmup_iters}")
        if self.lr_warmup_fraction is not None:
            if self.lr_warmup_iters > 0:
                raise ConfigError(
                    f"--lr-warmup-fraction {self.lr_warmup_fraction} and --lr-warmup-iters {self.lr_warmup_iters} "
                    "are both set; pass only one of them"
                )
            if not 0 <= self.lr_warmup_fraction < 1:
                raise ConfigError(
                    f"--lr-warmup-fraction must be at least 0 and below 1, got {self.lr_warmup_fraction}"
                )
        # Megatron asserts warm-up < decay; equal is allowed here (warm-up to the last step, then
        # min_lr), so a run as short as its warm-up still works: no step ever divides by zero.
        if self.warmup_iters > self.decay_iters:
            raise ConfigError(
                f"warm-up of {self.warmup_iters} iterations (--lr-warmup-iters) is longer than the "
                f"{self.decay_iters} decay iterations (--lr-decay-iters, default --train-iters); "
                "shorten the warm-up or lengthen the decay"
            )
        if self.lr_decay_style == "WSD":
            if self.lr_wsd_decay_iters is None:
                raise ConfigError("--lr-decay-style WSD needs --lr-wsd-decay-iters (the length of the final anneal)")
            if not 1 <= self.lr_wsd_decay_iters <= self.decay_iters:
                raise ConfigError(
                    f"--lr-wsd-decay-iters {self.lr_wsd_decay_iters} must lie between 1 and the {self.decay_iters} "
                    "decay iterations (--lr-decay-iters, default --train-iters)"
                )

    @property
    def decay_iters(self) -> int:
        """Steps until the rate reaches `min_lr`: `--lr-decay-iters`, else `--train-iters`."""
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters

    @property
    def warmup_iters(self) -> float:
        """Warm-up length in steps: `--lr-warmup-iters`, or fraction x decay iterations.

        With `--lr-warmup-fraction` this may be fractional (e.g. 1.5 steps), exactly as in
        Megatron, whose sample-counted schedule does not round it either.
        """
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * self.decay_iters
        return self.lr_warmup_iters

    def lr_at(self, step: int) -> float:
        """The learning rate that optimizer step `step` uses (0 = the first step of training)."""
        if step < 0:
            raise ValueError(f"step must not be negative, got {step}")
        warmup, decay = self.warmup_iters, self.decay_iters
        if warmup > 0 and step <= warmup:
            return self.lr_warmup_init + (self.lr - self.lr_warmup_init) * step / warmup
        if self.lr_decay_style == "constant":
            return self.lr
        if step > decay:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(self.min_lr, self.lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(step, 1)))
        ratio = (step - warmup) / (decay - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: stable at lr, then anneal over the last lr_wsd_decay_iters steps
            coeff = self._wsd_coeff(step)
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def _wsd_coeff(self, step: int) -> float:
        assert self.lr_wsd_decay_iters is not None
        anneal_start = self.decay_iters - self.lr_wsd_decay_iters
        if step <= anneal_start:
            return 1.0
        r = (step - anneal_start) / self.lr_wsd_decay_iters
        if self.lr_wsd_decay_style == "linear":
            return 1.0 - r
        if self.lr_wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * r) + 1.0)
        if self.lr_wsd_decay_style == "exponential":
            return 2.0 * 0.5**r - 1.0
        return 1.0 - math.sqrt(r)  # minus_sqrt


# What a checkpoint records about the schedule, and the flag each entry comes from.
_CHECKED_FIELDS = {
    "lr": "--lr",
    "min_lr": "--min-lr",
    "warmup_iters": "--lr-warmup-iters/--lr-warmup-fraction",
    "decay_iters": "--lr-decay-iters",
    "lr_decay_style": "--lr-decay-style",
}


class LRScheduler:
    """The schedule plus the number of optimizer steps taken so far (one per training run).

    Call `step()` after every optimizer step that was applied; a step skipped because fp16
    gradients overflowed does not advance the schedule (as in Megatron).
    """

    def __init__(self, schedule: LRSchedule, num_steps: int = 0) -> None:
        if num_steps < 0:
            raise ValueError(f"num_steps must not be negative, got {num_steps}")
        self.schedule = schedule
        self.num_steps = num_steps

    @property
    def lr(self) -> float:
        """The learning rate for the next optimizer step."""
        return self.schedule.lr_at(self.num_steps)

    def step(self) -> None:
        self.num_steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings: the step count and the schedule it belongs to."""
        state: dict[str, Any] = {name: getattr(self.schedule, name) for name in _CHECKED_FIELDS}
        state["num_steps"] = self.num_steps
        return state

    def load_state_dict(self, state: dict[str, Any], *, override_opt_param_scheduler: bool = False) -> None:
        """Resume the step count; the schedule must match the checkpoint's unless overridden.

        Like Megatron, a resumed run refuses to silently change its schedule; pass
        `override_opt_param_scheduler=True` (Megatron's `--override-opt_param-scheduler`) to
        keep this run's flags and take only the step count from the checkpoint.
        """
        if "num_steps" not in state:
            raise ConfigError(
                "the checkpoint's LR scheduler state has no 'num_steps'; it is not a megalith scheduler state"
            )
        if not override_opt_param_scheduler:
            for name, flag in _CHECKED_FIELDS.items():
                if name in state and state[name] != getattr(self.schedule, name):
                    raise ConfigError(
                        f"the checkpoint was trained with {flag} {state[name]} "
                        f"but this run sets {getattr(self.schedule, name)}; "
                        "pass the checkpoint's value or --override-opt-param-scheduler to keep this run's schedule"
                    )
        num_steps = int(state["num_steps"])
        if num_steps < 0:
            raise ConfigError(
                f"the checkpoint's LR scheduler num_steps is negative ({num_steps}); the checkpoint is corrupt"
            )
        self.num_steps = num_steps
