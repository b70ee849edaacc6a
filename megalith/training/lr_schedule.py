"""Learning-rate schedule with Megatron's OptimizerParamScheduler semantics, counted in samples.

Megatron counts its schedule in samples: every optimizer step adds the samples of its global
batch, which under `--rampup-batch-size` grows. Iteration flags (`--lr-decay-iters`,
`--lr-warmup-iters`, `--lr-wsd-decay-iters`, with `--train-iters`) become samples by x the full
`--global-batch-size`; sample flags (`--lr-decay-samples`, `--lr-warmup-samples`,
`--lr-wsd-decay-samples`, with `--train-samples`) are samples already. Megatron refuses to mix the
two, and so does this module. `LRSchedule` is the pure, validated description; `LRScheduler` is
the one small mutable object a training run owns: it knows how many samples have been stepped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from megalith.errors import ConfigError

LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")

# (iteration flag, sample flag) of each length the schedule takes
_LENGTH_FLAGS = {
    "decay": ("--lr-decay-iters", "--lr-decay-samples"),
    "warmup": ("--lr-warmup-iters", "--lr-warmup-samples"),
    "wsd": ("--lr-wsd-decay-iters", "--lr-wsd-decay-samples"),
}


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


@dataclass(frozen=True)
class LRSchedule:
    """The learning rate after any number of consumed samples, from Megatron's flags (names without dashes).

    Warm-up runs linearly from `lr_warmup_init` to `lr`; then the decay style takes the rate from
    `lr` down to `min_lr` at the end of the decay, and `min_lr` is kept after. WSD (warm-up,
    stable, decay) holds `lr` and anneals only over the last `--lr-wsd-decay-iters/-samples`.
    Exactly one of `train_iters` (iteration flags, x `global_batch_size`) and `train_samples`
    (sample flags) is given.
    """

    lr: float
    train_iters: int | None = None
    min_lr: float = 0.0
    lr_warmup_iters: int = 0
    lr_warmup_fraction: float | None = None
    lr_warmup_init: float = 0.0
    lr_decay_style: str = "linear"
    lr_decay_iters: int | None = None
    lr_wsd_decay_iters: int | None = None
    lr_wsd_decay_style: str = "exponential"
    train_samples: int | None = None
    lr_warmup_samples: int = 0
    lr_decay_samples: int | None = None
    lr_wsd_decay_samples: int | None = None
    global_batch_size: int = 1  # the full batch: what one iteration of the iteration flags is worth

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}; pass the peak learning rate, e.g. --lr 3e-4")
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
        if self.global_batch_size < 1:
            raise ConfigError(f"the global batch size must be at least 1, got {self.global_batch_size}")
        self._check_units()
        self._check_lengths()

    # --- validation ---------------------------------------------------------------------------

    def _check_units(self) -> None:
        """Megatron's rule: iteration flags go with --train-iters, sample flags with --train-samples."""
        if (self.train_iters is None) == (self.train_samples is None):
            given = "both are given" if self.train_iters is not None else "neither is given"
            raise ConfigError(f"the LR schedule needs one of --train-iters and --train-samples; {given}")
        for (iters_flag, samples_flag), iters, samples in (
                (_LENGTH_FLAGS["decay"], self.lr_decay_iters is not None, self.lr_decay_samples is not None),
                (_LENGTH_FLAGS["warmup"], self.lr_warmup_iters != 0, self.lr_warmup_samples != 0),
                (_LENGTH_FLAGS["wsd"], self.lr_wsd_decay_iters is not None, self.lr_wsd_decay_samples is not None)):
            if iters and samples:
                raise ConfigError(f"{iters_flag} and {samples_flag} are both given; give one ({iters_flag} with "
                                  f"--train-iters, {samples_flag} with --train-samples)")
        if self.sample_based:
            if self.train_samples < 1:
                raise ConfigError(f"--train-samples must be at least 1, got {self.train_samples}")
            wrong = {"--lr-decay-iters": self.lr_decay_iters is not None, "--lr-warmup-iters": self.lr_warmup_iters != 0,
                     "--lr-wsd-decay-iters": self.lr_wsd_decay_iters is not None}
            run, other, fix = "samples (--train-samples)", "--train-iters", "-samples"
        else:
            if self.train_iters < 1:
                raise ConfigError(f"--train-iters must be at least 1, got {self.train_iters}")
            wrong = {"--lr-decay-samples": self.lr_decay_samples is not None,
                     "--lr-warmup-samples": self.lr_warmup_samples != 0,
                     "--lr-wsd-decay-samples": self.lr_wsd_decay_samples is not None}
            run, other, fix = "iterations (--train-iters, or its default)", "--train-samples", "-iters"
        for name, given in wrong.items():
            if given:
                counterpart = name.rsplit("-", 1)[0] + fix
                raise ConfigError(f"{name} does not fit a run counted in {run}, as in Megatron; use {counterpart} "
                                  f"or train with {other}")

    def _flag(self, length: str) -> str:
        return _LENGTH_FLAGS[length][self.sample_based]

    @property
    def _unit(self) -> str:
        return "samples" if self.sample_based else "iterations"

    def _check_lengths(self) -> None:
        decay, warmup, wsd = (self.lr_decay_samples, self.lr_warmup_samples, self.lr_wsd_decay_samples) \
            if self.sample_based else (self.lr_decay_iters, self.lr_warmup_iters, self.lr_wsd_decay_iters)
        total = "--train-samples" if self.sample_based else "--train-iters"
        if decay is not None and decay < 1:
            raise ConfigError(f"{self._flag('decay')} must be at least 1, got {decay}; "
                              f"or leave it out to decay over {total}")
        if warmup < 0:
            raise ConfigError(f"{self._flag('warmup')} must not be negative, got {warmup}")
        if self.lr_warmup_fraction is not None:
            if warmup > 0:
                raise ConfigError(
                    f"--lr-warmup-fraction {self.lr_warmup_fraction} and {self._flag('warmup')} {warmup} "
                    "are both set; pass only one of them"
                )
            if not 0 <= self.lr_warmup_fraction < 1:
                raise ConfigError(
                    f"--lr-warmup-fraction must be at least 0 and below 1, got {self.lr_warmup_fraction}"
                )
        # Megatron asserts warm-up < decay; equal is allowed here (warm-up to the last step, then
        # min_lr), so a run as short as its warm-up still works: no step ever divides by zero.
        if self.warmup_samples > self.decay_samples:
            scale = 1 if self.sample_based else self.global_batch_size
            raise ConfigError(
                f"warm-up of {_number(self.warmup_samples / scale)} {self._unit} ({self._flag('warmup')}) is longer "
                f"than the {_number(self.decay_samples / scale)} decay {self._unit} ({self._flag('decay')}, default "
                f"{total}); shorten the warm-up or lengthen the decay"
            )
        if self.lr_decay_style == "WSD":
            if wsd is None:
                raise ConfigError(f"--lr-decay-style WSD needs {self._flag('wsd')} (the length of the final anneal)")
            decay_length = decay if decay is not None else (self.train_samples if self.sample_based
                                                              else self.train_iters)
            if not 1 <= wsd <= decay_length:
                raise ConfigError(
                    f"{self._flag('wsd')} {wsd} must lie between 1 and the {decay_length} decay {self._unit} "
                    f"({self._flag('decay')}, default {total})"
                )

    # --- lengths, in samples --------------------------------------------------------------------

    @property
    def sample_based(self) -> bool:
        """Counted by --train-samples and the sample flags (else by --train-iters and the iteration flags)."""
        return self.train_samples is not None

    @property
    def decay_iters(self) -> int:
        """Iteration-based runs: steps until the rate reaches `min_lr` (--lr-decay-iters, else --train-iters)."""
        assert not self.sample_based, "a sample-based schedule has no decay iterations"
        return self.train_iters if self.lr_decay_iters is None else self.lr_decay_iters

    @property
    def warmup_iters(self) -> float:
        """Iteration-based runs: the warm-up in steps (--lr-warmup-iters, or fraction x decay iterations;
        fractional then, e.g. 1.5 steps, exactly as in Megatron, which does not round it either)."""
        assert not self.sample_based, "a sample-based schedule has no warm-up iterations"
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * self.decay_iters
        return self.lr_warmup_iters

    @property
    def decay_samples(self) -> int:
        """Samples until the rate reaches `min_lr` (Megatron's lr_decay_steps)."""
        if self.sample_based:
            return self.train_samples if self.lr_decay_samples is None else self.lr_decay_samples
        return self.decay_iters * self.global_batch_size

    @property
    def warmup_samples(self) -> float:
        """Samples of linear warm-up (Megatron's lr_warmup_steps; with --lr-warmup-fraction: fraction x decay)."""
        if self.lr_warmup_fraction is not None:
            return self.lr_warmup_fraction * self.decay_samples
        if self.sample_based:
            return self.lr_warmup_samples
        return self.lr_warmup_iters * self.global_batch_size

    @property
    def wsd_decay_samples(self) -> int | None:
        """WSD: samples of the final anneal (Megatron's wsd_decay_steps)."""
        if self.sample_based:
            return self.lr_wsd_decay_samples
        return None if self.lr_wsd_decay_iters is None else self.lr_wsd_decay_iters * self.global_batch_size

    # --- the curve ------------------------------------------------------------------------------

    def lr_at(self, step: int) -> float:
        """The rate of optimizer step `step` (0 = the first) when every step takes the full global batch."""
        if step < 0:
            raise ValueError(f"step must not be negative, got {step}")
        return self.lr_at_samples(step * self.global_batch_size)

    def lr_at_samples(self, samples: int) -> float:
        """The rate of the step taken after the schedule has counted `samples` samples (Megatron's get_lr)."""
        if samples < 0:
            raise ValueError(f"samples must not be negative, got {samples}")
        warmup, decay = self.warmup_samples, self.decay_samples
        if warmup > 0 and samples <= warmup:
            return self.lr_warmup_init + (self.lr - self.lr_warmup_init) * float(samples) / float(warmup)
        if self.lr_decay_style == "constant":
            return self.lr
        if samples > decay:
            return self.min_lr
        if self.lr_decay_style == "inverse-square-root":
            return max(self.min_lr, self.lr * math.sqrt(max(warmup, 1)) / math.sqrt(max(samples, 1)))
        ratio = float(samples - warmup) / float(decay - warmup)
        if self.lr_decay_style == "linear":
            coeff = 1.0 - ratio
        elif self.lr_decay_style == "cosine":
            coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
        else:  # WSD: stable at lr, then anneal over the last wsd_decay_samples
            coeff = self._wsd_coeff(samples)
        return self.min_lr + coeff * (self.lr - self.min_lr)

    def _wsd_coeff(self, samples: int) -> float:
        wsd = self.wsd_decay_samples
        assert wsd is not None
        anneal_start = self.decay_samples - wsd
        if samples <= anneal_start:
            return 1.0
        r = float(samples - anneal_start) / float(wsd)
        if self.lr_wsd_decay_style == "linear":
            return 1.0 - r
        if self.lr_wsd_decay_style == "cosine":
            return 0.5 * (math.cos(math.pi * r) + 1.0)
        if self.lr_wsd_decay_style == "exponential":
            return 2.0 * 0.5**r - 1.0
        return 1.0 - math.sqrt(r)  # minus_sqrt


# What a checkpoint records about the schedule (all in samples) and how a mismatch is named.
_CHECKED_FIELDS = {
    "lr": None,
    "min_lr": None,
    "warmup_samples": "warmup",
    "decay_samples": "decay",
    "lr_decay_style": None,
}


def _describe(name: str, value, sample_based: bool, global_batch_size: int) -> tuple[str, str]:
    """(flag, value as that flag reads) of one checked entry of a schedule."""
    length = _CHECKED_FIELDS[name]
    if length is None:
        return "--" + name.replace("_", "-"), str(value)
    flag = _LENGTH_FLAGS[length][sample_based]
    if length == "warmup":
        flag += "/--lr-warmup-fraction"
    return flag, _number(value if sample_based else value / global_batch_size)


def _upgraded(state: dict[str, Any], global_batch_size: int) -> dict[str, Any]:
    """A scheduler state of an older megalith checkpoint (counted in steps of one constant batch) in samples."""
    if "num_samples" in state or "num_steps" not in state:
        return state
    old = {"lr": state.get("lr"), "min_lr": state.get("min_lr"), "lr_decay_style": state.get("lr_decay_style"),
           "num_samples": int(state["num_steps"]) * global_batch_size, "sample_based": False,
           "global_batch_size": global_batch_size}
    for name in ("warmup", "decay"):
        if f"{name}_iters" in state:
            old[f"{name}_samples"] = state[f"{name}_iters"] * global_batch_size
    return {key: value for key, value in old.items() if value is not None}


class LRScheduler:
    """The schedule plus the samples it has counted so far (one per training run).

    Call `step(samples)` after every optimizer step that was applied, with that step's global
    batch size; a step skipped because fp16 gradients overflowed does not advance the schedule
    (as in Megatron).
    """

    def __init__(self, schedule: LRSchedule, num_samples: int = 0) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must not be negative, got {num_samples}")
        self.schedule = schedule
        self.num_samples = num_samples

    @property
    def lr(self) -> float:
        """The learning rate for the next optimizer step."""
        return self.schedule.lr_at_samples(self.num_samples)

    def step(self, samples: int | None = None) -> None:
        """Count one optimizer step of `samples` samples (default: the full global batch)."""
        self.num_samples += self.schedule.global_batch_size if samples is None else samples

    def state_dict(self) -> dict[str, Any]:
        """Plain numbers and strings: the samples counted and the schedule they belong to."""
        schedule = self.schedule
        state: dict[str, Any] = {name: getattr(schedule, name) for name in _CHECKED_FIELDS}
        state.update(num_samples=self.num_samples, sample_based=schedule.sample_based,
                     global_batch_size=schedule.global_batch_size)
        return state

    def load_state_dict(self, state: dict[str, Any], *, override_opt_param_scheduler: bool = False) -> None:
        """Resume the sample count; the schedule must match the checkpoint's unless overridden.

        Like Megatron, a resumed run refuses to silently change its schedule; pass
        `override_opt_param_scheduler=True` (Megatron's `--override-opt_param-scheduler`) to
        keep this run's flags and take only the sample count from the checkpoint. A state written
        before the schedule counted samples (`num_steps`) is read as steps of this run's batch.
        """
        schedule = self.schedule
        state = _upgraded(state, schedule.global_batch_size)
        if "num_samples" not in state:
            raise ConfigError(
                "the checkpoint's LR scheduler state has no 'num_samples'; it is not a megalith scheduler state"
            )
        if not override_opt_param_scheduler:
            theirs = (bool(state.get("sample_based", False)), int(state.get("global_batch_size", 1)))
            for name in _CHECKED_FIELDS:
                if name in state and state[name] != getattr(schedule, name):
                    flag, old = _describe(name, state[name], *theirs)
                    ours, new = _describe(name, getattr(schedule, name), schedule.sample_based,
                                          schedule.global_batch_size)
                    now = new if ours == flag else f"{ours} {new}"
                    raise ConfigError(
                        f"the checkpoint was trained with {flag} {old} but this run sets {now}; "
                        "pass the checkpoint's value or --override-opt-param-scheduler to keep this run's schedule"
                    )
        num_samples = int(state["num_samples"])
        if num_samples < 0:
            raise ConfigError(
                f"the checkpoint's LR scheduler count is negative ({num_samples}); the checkpoint is corrupt"
            )
        self.num_samples = num_samples
