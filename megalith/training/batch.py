"""Batch arithmetic, checked before anything starts: which samples each rank and micro-batch takes.

One data order for every layout: a global batch is one fixed list of samples; data-parallel
rank d takes the contiguous slice [d*G/dp, (d+1)*G/dp), and its micro-batches are consecutive
slices of that. (Megatron's sampler interleaves ranks inside each micro-batch instead; the set
of samples in a step, and so the step's loss, is the same.)
"""

from __future__ import annotations

from dataclasses import dataclass

from megalith.errors import ConfigError


def _nearest_multiples(value: int, base: int) -> list[int]:
    """The multiples of `base` just below and just above `value` (positive ones only)."""
    below = value // base * base
    return [m for m in (below, below + base) if m > 0]


def _nearest_divisors(value: int, target: int) -> list[int]:
    """The divisors of `value` closest to `target` from below and from above."""
    divisors = [d for d in range(1, value + 1) if value % d == 0]
    below = [d for d in divisors if d <= target]
    above = [d for d in divisors if d >= target]
    return sorted({*below[-1:], *above[:1]})


def _either(values: list[int]) -> str:
    return " or ".join(str(v) for v in values)


@dataclass(frozen=True)
class BatchPlan:
    """How one global batch splits over data-parallel ranks and micro-batches."""

    global_batch_size: int
    micro_batch_size: int
    data_parallel_size: int

    def __post_init__(self) -> None:
        for value, name in (
            (self.global_batch_size, "--global-batch-size"),
            (self.micro_batch_size, "--micro-batch-size"),
            (self.data_parallel_size, "data-parallel size"),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        per_step = self.micro_batch_size * self.data_parallel_size
        if self.global_batch_size % per_step != 0:
            hint = f"use a --global-batch-size of {_either(_nearest_multiples(self.global_batch_size, per_step))}"
            if self.global_batch_size % self.data_parallel_size == 0:
                local = self.global_batch_size // self.data_parallel_size
                sizes = _either(_nearest_divisors(local, self.micro_batch_size))
                hint += f", or a --micro-batch-size that divides {local} ({sizes})"
            raise ConfigError(
                f"global batch size {self.global_batch_size} is not divisible by --micro-batch-size "
                f"{self.micro_batch_size} x data-parallel size {self.data_parallel_size} = {per_step}; {hint}"
            )

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each data-parallel rank runs per step (gradient accumulation steps)."""
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    @property
    def local_batch_size(self) -> int:
        """Sequences one data-parallel rank processes per step."""
        return self.global_batch_size // self.data_parallel_size

    def local_slice(self, dp_rank: int) -> slice:
        """Rank `dp_rank`'s contiguous share of the global batch."""
        if not 0 <= dp_rank < self.data_parallel_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{self.data_parallel_size - 1}")
        start = dp_rank * self.local_batch_size
        return slice(start, start + self.local_batch_size)

    def micro_slice(self, dp_rank: int, micro: int) -> slice:
        """Micro-batch `micro` of rank `dp_rank`, as positions inside the global batch."""
        if not 0 <= micro < self.num_micro_batches:
            raise ValueError(f"micro-batch {micro} is outside 0..{self.num_micro_batches - 1}")
        start = self.local_slice(dp_rank).start + micro * self.micro_batch_size
        return slice(start, start + self.micro_batch_size)

    def micro_batches(self, data: dict, dp_rank: int, device=None):
        """`get(i)`: micro-batch i of rank `dp_rank`, sliced from a global batch of tensors
        (moved to `device` if given): what the pipeline engine asks for."""
        def get(micro: int) -> dict:
            where = self.micro_slice(dp_rank, micro)
            return {key: value[where] if device is None else value[where].to(device) for key, value in data.items()}

        return get


