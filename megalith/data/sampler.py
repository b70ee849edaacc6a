"""Which samples each data-parallel rank reads per iteration, and stacking them into a batch.

One data order for every layout (DESIGN.md): iteration k's global batch is dataset indices
[consumed + k*b, consumed + (k+1)*b), the same whatever the data-parallel size, and dp rank r
reads only its contiguous slice [r*b/dp, (r+1)*b/dp) of it. Resuming from a consumed-samples
count therefore continues exactly where an uninterrupted run would be (Megatron's
MegatronPretrainingSampler, drop_last; Megatron interleaves ranks inside each micro-batch
instead, which selects the same samples per step).

Running out of samples is an error, not the end of an iteration: the datasets are sized from
the number of samples training consumes, so an exhausted dataset means they were built for a
shorter run. The sampler raises DataError naming the counts instead of stopping quietly
(Megatron's sampler stops and training dies on StopIteration).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from megalith.data.errors import DataError


def global_batch_indices(consumed_samples: int, global_batch_size: int) -> range:
    """Dataset indices of the global batch that starts after `consumed_samples`."""
    return range(consumed_samples, consumed_samples + global_batch_size)


def local_batch_indices(consumed_samples: int, global_batch_size: int, dp_size: int = 1, dp_rank: int = 0) -> range:
    """This dp rank's contiguous share of that global batch."""
    local = global_batch_size // dp_size
    start = consumed_samples + dp_rank * local
    return range(start, start + local)


def cyclic_sample(position: int, dataset_size: int, seed: int) -> int:
    """The dataset index read at stream position `position` under --dataloader-type cyclic.

    Megatron's cyclic loader reshuffles the dataset every pass: pass e = position // size reads a
    permutation seeded by seed + e. Here the permutation is of the whole dataset, not of each dp
    rank's bucket as in Megatron, so every layout reads the same samples at every step (and a
    resumed run, which knows its consumed samples, reads the same ones as an uninterrupted run).
    """
    if dataset_size < 1:
        raise DataError("the dataset holds no sample; --dataloader-type cyclic has nothing to cycle over")
    epoch, within = divmod(position, dataset_size)
    order = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed + epoch))
    return int(order[within])


class GlobalBatchSampler:
    """Yields, per iteration, the list of dataset indices this dp rank reads.

    Iterating past the last full global batch raises DataError (see the module docstring);
    `len()` is the number of full global batches still available.
    """

    def __init__(self, total_samples: int, consumed_samples: int, global_batch_size: int,
                 dp_size: int = 1, dp_rank: int = 0, *, name: str = "train") -> None:
        if global_batch_size < 1 or dp_size < 1:
            raise DataError(f"global batch size {global_batch_size} and data-parallel size {dp_size} must be positive")
        if global_batch_size % dp_size:
            raise DataError(f"global batch size {global_batch_size} is not divisible by the data-parallel size "
                            f"{dp_size}; choose a --global-batch-size that is a multiple of it")
        if not 0 <= dp_rank < dp_size:
            raise DataError(f"dp rank {dp_rank} is outside 0..{dp_size - 1}")
        if consumed_samples < 0:
            raise DataError(f"consumed samples must be >= 0, got {consumed_samples}")
        self.total_samples, self.consumed_samples = int(total_samples), int(consumed_samples)
        self.global_batch_size, self.dp_size, self.dp_rank, self.name = global_batch_size, dp_size, dp_rank, name

    def __len__(self) -> int:
        return max(0, (self.total_samples - self.consumed_samples) // self.global_batch_size)

    def exhausted_error(self, consumed: int) -> DataError:
        return DataError(
            f"the {self.name} dataset is exhausted: it has {self.total_samples} samples, {consumed} are consumed "
            f"and the next global batch needs {self.global_batch_size} more; the datasets were built for a "
            f"shorter run, so rebuild them for the samples training consumes (--train-iters/--train-samples, "
            f"--eval-iters) or resume with the settings they were built for")

    def __iter__(self) -> Iterator[list[int]]:
        consumed = self.consumed_samples
        while True:
            if consumed + self.global_batch_size > self.total_samples:
                raise self.exhausted_error(consumed)
            yield list(local_batch_indices(consumed, self.global_batch_size, self.dp_size, self.dp_rank))
            consumed += self.global_batch_size


def collate(samples: Sequence[dict]) -> dict:
    """Stack each key's tensors along a new dim 0 (every sample must have the same keys)."""
    if not samples:
        raise DataError("cannot collate an empty list of samples")
    keys = list(samples[0])
    for sample in samples[1:]:
        if list(sample) != keys:
            raise DataError(f"samples disagree on their keys ({keys} vs {list(sample)}); "
                            "blend only datasets of one kind")
    return {key: torch.stack([torch.as_tensor(sample[key]) for sample in samples]) for key in keys}


def iterate_batches(dataset, consumed_samples: int, global_batch_size: int, dp_size: int = 1, dp_rank: int = 0,
                    *, name: str = "train") -> Iterator[dict]:
    """This dp rank's collated batch per iteration: `collate([dataset[i] for i in its indices])`."""
    sampler = GlobalBatchSampler(len(dataset), consumed_samples, global_batch_size, dp_size, dp_rank, name=name)
    for indices in sampler:
        yield collate([dataset[i] for i in indices])
