"""The batches `megalith pretrain` trains on: synthetic (`--mock-data`) or read from indexed datasets.

Either way one global batch is the same list of samples whatever the layout: iteration i of a
split is samples [i x global batch, (i + 1) x global batch) of that split's (blended, shuffled)
dataset, dp rank r reads only rows [r x b/dp, (r + 1) x b/dp) of it, and micro-batches are
consecutive slices of those rows (megalith.training.batch.BatchPlan). So resuming from a
consumed-samples count gives exactly the batches an uninterrupted run would have.

The datasets' sample indices are built by global rank 0 first (and cached beside the data or
under --data-cache-path), then by every other rank, which reads the cache: the same files
whatever the number of ranks, and no rank reads a half-written index.
"""

from __future__ import annotations

import torch

from megalith.data.blended import build_gpt_datasets, parse_data_path
from megalith.data.errors import DataError
from megalith.data.indexed import IndexedDataset
from megalith.data.sampler import collate, local_batch_indices
from megalith.data.tokenizers import Tokenizer, build_tokenizer
from megalith.errors import ConfigError
from megalith.models.registry import get_model_spec
from megalith.parallel.comm import max_over_job
from megalith.training.batch import BatchPlan

TRAIN_SPLIT, VALID_SPLIT, TEST_SPLIT = 0, 1, 2
SPLIT_NAMES = ("train", "valid", "test")


def tokenizer_from_flags(data, vocab_size: int | None) -> Tokenizer:
    """The tokenizer that `--tokenizer-type` and its file flags describe (`vocab_size`: NullTokenizer's)."""
    return build_tokenizer(data.tokenizer_type, tokenizer_model=data.tokenizer_model, vocab_file=data.vocab_file,
                           merge_file=data.merge_file, vocab_size=vocab_size, vocab_extra_ids=data.vocab_extra_ids)


def run_tokenizer(config) -> Tokenizer:
    """The tokenizer of a resolved run (whose model vocabulary already includes NullTokenizer's eod)."""
    null = config.data.tokenizer_type == "NullTokenizer"
    return tokenizer_from_flags(config.data, config.model.vocab_size - 1 if null else None)


def check_datasets(data_path: tuple[str, ...]) -> None:
    """Open every dataset of --data-path once (header and sizes checked): a bad path or a corrupt
    file is one line before any process group starts."""
    for _, prefix in parse_data_path(list(data_path)):
        IndexedDataset(prefix)


def model_vocab_size(data, given_vocab_size: int, explicit: bool) -> int:
    """The model's vocabulary for a run that reads datasets: the tokenizer's, as in Megatron.
    NullTokenizer reads --vocab-size (and adds its end-of-document id)."""
    if data.tokenizer_type == "NullTokenizer":
        return tokenizer_from_flags(data, given_vocab_size).vocab_size
    size = tokenizer_from_flags(data, None).vocab_size
    if explicit and given_vocab_size != size:
        raise ConfigError(f"--vocab-size {given_vocab_size} contradicts the {data.tokenizer_type}'s {size} tokens; "
                          "drop --vocab-size (the tokenizer sets the vocabulary)")
    return size


class MockBatches:
    """Synthetic global batches from the model's registry entry, the same for every layout."""

    def __init__(self, config, device: torch.device) -> None:
        self.spec = get_model_spec(config.training.model)
        self.model, self.seed, self.device = config.model, config.training.seed, device
        self.size = config.global_batch_size

    def global_batch(self, split: int, index: int) -> dict:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + index) * 2 + split)
        return self.spec.make_batch(self.model, self.size, generator)

    def micro_batches(self, plan: BatchPlan, dp_rank: int, split: int, index: int, first_sample: int | None = None):
        """Batch `index` of `split` (mock batches are seeded by their index; first_sample is unused)."""
        return plan.micro_batches(self.global_batch(split, index), dp_rank, self.device)


def samples_per_split(config) -> tuple[int, int, int]:
    """Megatron's request for training and validation: every training batch, and validation
    batches for every evaluation (and the one at the end). None for the test split: pretrain
    never evaluates it, so a split too small to hold a test sample is no error."""
    training, gbs = config.training, config.global_batch_size
    evaluations = training.train_iters // training.eval_interval + 1
    return (training.train_iters * gbs, evaluations * training.eval_iters * gbs, 0)


class DatasetBatches:
    """Global batches read from `--data-path` datasets; each dp rank reads only its rows."""

    def __init__(self, config, tokenizer: Tokenizer, device: torch.device, state=None) -> None:
        data = config.data
        self.device, self.global_batch_size = device, config.global_batch_size

        def build():
            return build_gpt_datasets(
                list(data.data_path), data.split, config.model.seq_length, config.training.seed,
                samples_per_split(config), cache_dir=data.data_cache_path, eod_id=tokenizer.eod,
                eod_mask_loss=data.eod_mask_loss, reset_position_ids=data.reset_position_ids,
                reset_attention_mask=data.reset_attention_mask)

        if state is None or state.grid.world_size == 1:
            self.datasets = build()
            return
        failed = None
        if state.rank == 0:
            try:
                self.datasets = build()
            except Exception as error:  # every rank must hear of it, or they would wait forever
                failed = error
        # rank 0 has written the cached indices (or failed); the others then read them (or stop too)
        someone_failed = max_over_job(1.0 if failed is not None else 0.0, state) > 0
        if failed is not None:
            raise failed
        if someone_failed:
            raise DataError("rank 0 could not build the datasets (its error is above); fix that and restart")
        if state.rank != 0:
            self.datasets = build()

    def micro_batches(self, plan: BatchPlan, dp_rank: int, split: int, index: int, first_sample: int | None = None):
        """`get(i)`: micro-batch i of rank `dp_rank` in batch `index` of `split`, read on demand;
        the batch starts at sample `first_sample` (the consumed samples; default index x batch)."""
        dataset = self.datasets[split]
        if dataset is None:
            raise DataError(f"the {SPLIT_NAMES[split]} split is empty; give it a share in --split "
                            "(e.g. 969,30,1) or set --eval-iters 0")
        first = index * self.global_batch_size if first_sample is None else first_sample
        rows = local_batch_indices(first, self.global_batch_size,
                                   plan.data_parallel_size, dp_rank)
        if rows.stop > len(dataset):
            raise DataError(f"the {SPLIT_NAMES[split]} dataset has {len(dataset)} samples; batch {index} needs "
                            f"sample {rows.stop - 1}; it was sized for fewer iterations")
        size = plan.micro_batch_size

        def get(micro: int) -> dict:
            batch = collate([dataset[i] for i in rows[micro * size:(micro + 1) * size]])
            return {key: value.to(self.device) for key, value in batch.items()}

        return get
