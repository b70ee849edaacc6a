"""The global batch of every step: constant, or grown with the samples consumed (`--rampup-batch-size`).

Megatron's ramp (RampupBatchsizeNumMicroBatchesCalculator): `--rampup-batch-size START INCR SAMPLES`
goes from START to `--global-batch-size` in (global - START) / INCR equal increments, one every
SAMPLES / increments samples; once more than SAMPLES samples are consumed the full batch is used.
The arithmetic follows Megatron's to the float (the samples per increment is a real number, the
increments reached so far its truncated quotient), so a run resized by ramp-up takes the same
steps Megatron takes. Every batch the ramp reaches is checked here, before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass

from megalith.errors import ConfigError
from megalith.training.batch import BatchPlan


@dataclass(frozen=True)
class BatchSchedule:
    """Which global batch each step uses, from the samples consumed before it.

    `rampup` is Megatron's (START, INCREMENT, SAMPLES) or None for a constant batch.
    """

    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int
    rampup: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        BatchPlan(self.global_batch_size, self.micro_batch_size, self.data_parallel_size)  # checks the full batch
        if self.rampup is None:
            return
        given = " ".join(str(v) for v in self.rampup)
        if len(self.rampup) != 3:
            raise ConfigError(f"--rampup-batch-size takes 3 values (START INCREMENT SAMPLES), got {len(self.rampup)} "
                              f"({given}); e.g. --rampup-batch-size 16 16 5859375")
        start, increment, samples = self.rampup
        if start < 1 or increment < 1 or samples < 1:
            raise ConfigError(f"--rampup-batch-size {given}: START, INCREMENT and SAMPLES must all be positive")
        if start >= self.global_batch_size:
            raise ConfigError(f"--rampup-batch-size {given} starts at {start}, not below --global-batch-size "
                              f"{self.global_batch_size}; start lower or drop --rampup-batch-size")
        if (self.global_batch_size - start) % increment != 0:
            raise ConfigError(
                f"--rampup-batch-size {given} never reaches --global-batch-size {self.global_batch_size} exactly: "
                f"{self.global_batch_size} - {start} = {self.global_batch_size - start} is not a multiple of the "
                f"increment {increment}; choose an increment that divides it")
        per_step = self.micro_batch_size * self.data_parallel_size
        for size in self.batch_sizes():
            if size % per_step != 0:
                raise ConfigError(
                    f"--rampup-batch-size {given} reaches a global batch of {size}, which is not divisible by "
                    f"--micro-batch-size {self.micro_batch_size} x data-parallel size {self.data_parallel_size} = "
                    f"{per_step}; use a START and INCREMENT that are multiples of {per_step}")

    @property
    def num_increments(self) -> int:
        assert self.rampup is not None
        return (self.global_batch_size - self.rampup[0]) // self.rampup[1]

    def global_batch_size_at(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after `consumed_samples` samples (Megatron's formula)."""
        if self.rampup is None:
            return self.global_batch_size
        start, increment, samples = self.rampup
        if consumed_samples > samples:
            return self.global_batch_size
        per_increment = samples / self.num_increments  # a real number, as in Megatron
        return start + int(consumed_samples / per_increment) * increment

    def plan_at(self, consumed_samples: int) -> BatchPlan:
        """How the step that starts after `consumed_samples` samples splits over ranks and micro-batches."""
        return BatchPlan(self.global_batch_size_at(consumed_samples), self.micro_batch_size, self.data_parallel_size)

    @property
    def _ramp_end(self) -> int:
        """The ramp phase lasts while the consumed samples are at most this (-1: no ramp)."""
        return -1 if self.rampup is None else self.rampup[2]

    def batch_sizes(self) -> tuple[int, ...]:
        """Every global batch the run uses, ascending (the full batch last)."""
        sizes, consumed = {self.global_batch_size}, 0
        while consumed <= self._ramp_end:
            size = self.global_batch_size_at(consumed)
            sizes.add(size)
            consumed += size
        return tuple(sorted(sizes))

    def train_iters(self, train_samples: int) -> int:
        """Megatron's iteration count for `--train-samples` (update_train_iters): every step of the ramp
        phase, then whole full batches of what is left (a partial last batch is dropped)."""
        iterations = consumed = 0
        while consumed <= self._ramp_end:
            consumed += self.global_batch_size_at(consumed)
            iterations += 1
        return iterations + (train_samples - consumed) // self.global_batch_size

    def consumed_after(self, iterations: int) -> int:
        """The samples the first `iterations` steps consume."""
        done = consumed = 0
        while done < iterations and consumed <= self._ramp_end:
            consumed += self.global_batch_size_at(consumed)
            done += 1
        return consumed + (iterations - done) * self.global_batch_size
