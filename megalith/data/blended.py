"""Blending datasets by weight, and building the train/valid/test datasets (GPT, BERT, T5) from --data-path.

Megatron's BlendedDataset and BlendedMegatronDatasetBuilder (megatron/core/datasets): each
prefix is split with --split on its own documents; with several prefixes every split is a
blend whose sample i comes from the dataset whose realised share lags its weight the most
(helpers.cpp build_blending_indices), so any prefix of the blend follows the weights to within
one sample per dataset.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from megalith.data.errors import DataError
from megalith.data.gpt_dataset import (SPLIT_NAMES, GPTDataset, default_cache_dir, parse_split,
                                       split_document_ranges)
from megalith.data.index_cache import load_or_build
from megalith.data.indexed import IndexedDataset

# Megatron builds each blended dataset's parts this much larger than their share, so that the
# greedy blend (which can run one sample ahead of a share) never asks a part for too many.
MID_LEVEL_SURPLUS = 0.005


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value


def parse_data_path(data_path: list[str] | str) -> list[tuple[float | None, str]]:
    """--data-path -> [(weight, prefix)], weights normalised to sum 1, or all None when not given.

    `["0.3", "A", "0.7", "B"]` is a weighted blend; `["A", "B"]` is unweighted (Megatron then
    weighs each prefix by its number of samples, one epoch each: see build_blended_datasets).
    """
    items = [data_path] if isinstance(data_path, str) else [str(item).strip() for item in data_path]
    usage = "give prefixes (A B) or weight-prefix pairs (0.3 A 0.7 B) to --data-path"
    if not items or any(not item for item in items):
        raise DataError(f"--data-path {' '.join(items)!r} names no dataset (or an empty one); {usage}")
    if _number(items[0]) is None:
        numbers = [item for item in items if _number(item) is not None]
        if numbers:
            raise DataError(f"--data-path mixes prefixes with weights ({numbers[0]}) but does not start with a "
                            f"weight; {usage}")
        return [(None, item) for item in items]
    if len(items) % 2:
        raise DataError(f"--data-path has {len(items)} items, an odd number, but starts with a weight; "
                        f"weights and prefixes must pair up: {usage}")
    weights, prefixes = items[0::2], items[1::2]
    values = [_number(weight) for weight in weights]
    for weight, value, prefix in zip(weights, values, prefixes):
        if value is None:
            raise DataError(f"--data-path: {weight!r} (before {prefix!r}) is not a weight; {usage}")
        if not math.isfinite(value) or value < 0:
            raise DataError(f"--data-path: weight {weight} of {prefix!r} must be a non-negative number; {usage}")
        if _number(prefix) is not None:
            raise DataError(f"--data-path: {prefix!r} after weight {weight} looks like a weight, not a prefix; {usage}")
    total = sum(values)
    if total <= 0:
        raise DataError("--data-path: every weight is 0; give at least one dataset a positive weight")
    return [(value / total, prefix) for value, prefix in zip(values, prefixes)]


def build_blending_indices(weights: list[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index int16 [size], dataset_sample_index int64 [size]): Megatron's greedy blend.

    Sample i goes to the dataset with the largest lag weight*max(i, 1) - taken so far (the first
    such on ties), and is that dataset's next sample.
    """
    w = [float(x) for x in weights]
    k = len(w)
    counts = [0] * k
    chosen = [0] * size
    positions = [0] * size
    others = range(1, k)
    for i in range(size):
        x = float(i) if i > 1 else 1.0
        best, best_lag = 0, w[0] * x - counts[0]
        for d in others:
            lag = w[d] * x - counts[d]
            if lag > best_lag:
                best, best_lag = d, lag
        chosen[i] = best
        positions[i] = counts[best]
        counts[best] += 1
    return np.array(chosen, dtype=np.int16), np.array(positions, dtype=np.int64)


class BlendedDataset(torch.utils.data.Dataset):
    """`size` samples drawn from `datasets` in proportion to `weights` (normalised here).

    Item i is `datasets[dataset_index[i]][dataset_sample_index[i]]` unchanged (Megatron adds a
    "dataset_id" key; samples here keep the keys every dataset gives, so batches collate alike).
    """

    def __init__(self, datasets: list, weights: list[float], size: int, *, cache_dir: str | None = None) -> None:
        if not datasets or len(datasets) != len(weights):
            raise DataError(f"a blend needs one weight per dataset, got {len(datasets)} datasets and "
                            f"{len(weights)} weights")
        if len(datasets) >= 32767:
            raise DataError(f"a blend of {len(datasets)} datasets is too many (at most 32766)")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise DataError(f"blend weights {list(weights)} must be non-negative with a positive sum")
        self.datasets, self.weights, self.size = list(datasets), [float(w) / total for w in weights], int(size)
        self.description_fields = {
            "class": type(self).__name__,
            "datasets": [getattr(d, "description_fields", type(d).__name__) for d in self.datasets],
            "weights": self.weights, "size": self.size,
        }
        cacheable = all(hasattr(d, "description_fields") for d in self.datasets)
        arrays, self.built_now = load_or_build(
            cache_dir if cacheable else None, self.description_fields, type(self).__name__, None,
            ["dataset_index", "dataset_sample_index"],
            lambda: dict(zip(("dataset_index", "dataset_sample_index"),
                             build_blending_indices(self.weights, self.size))),
            lambda a: a["dataset_index"].shape == (self.size,) and a["dataset_sample_index"].shape == (self.size,))
        self.dataset_index, self.dataset_sample_index = arrays["dataset_index"], arrays["dataset_sample_index"]
        for d, dataset in enumerate(self.datasets):
            taken = self.dataset_sample_index[self.dataset_index == d]
            if taken.size and int(taken.max()) >= len(dataset):
                raise DataError(f"blend asks dataset {d} for sample {int(taken.max())} but it has {len(dataset)}; "
                                "build it with more samples")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not -self.size <= idx < self.size:
            raise IndexError(f"sample {idx} is outside the blended dataset of {self.size} samples")
        idx %= self.size
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


def samples_per_dataset(weights: list[float], size: int) -> list[int]:
    """Samples to build per blended dataset for `size` blended ones: ceil(size * weight * 1.005)."""
    return [int(math.ceil(size * w * (1 + MID_LEVEL_SURPLUS))) for w in weights]


PartFactory = Callable[[IndexedDataset, tuple[int, int], "int | None", str, str], object]
"""(indexed, document range, samples or None for one epoch, split name, cache dir) -> a dataset
of one prefix's split: what `build_blended_datasets` makes for each prefix (GPT, BERT, T5)."""


def build_blended_datasets(data_path: list[str] | str, split: str, train_valid_test_num_samples: tuple[int, int, int],
                           make_part: PartFactory, *, cache_dir: str | None = None, class_name: str = "GPTDataset",
                           by_documents: bool = False, mmap: bool = True) -> tuple:
    """(train, valid, test): `make_part`'s dataset or a BlendedDataset of them per split, None where
    a split has weight 0 in --split or 0 samples requested. Megatron's BlendedMegatronDatasetBuilder,
    whatever the samples are.

    One prefix: its split of --split, `n` samples. Weighted prefixes: each prefix's split built
    with ceil(n * weight * 1.005) samples, blended to `n`. Unweighted prefixes (Megatron): each
    prefix's split is one epoch, blended by their sample counts to min(n, their total).
    --split divides each prefix's sequences (GPT, Megatron's GPTDataset), or with `by_documents` its
    documents (BERT, T5: their samples are runs of a document's sentences, as Megatron's masked
    datasets). `cache_dir=None` caches beside each prefix (`default_cache_dir(prefix, class_name)`).
    `mmap` False reads the .bin files with file reads (--no-mmap-bin-files).
    """
    # a prefix of weight 0 is left out (Megatron's greedy blend could still pick it on a tie)
    blend = [(w, prefix) for w, prefix in parse_data_path(data_path) if w is None or w > 0]
    split_weights = parse_split(split)
    sizes = [int(n) for n in train_valid_test_num_samples]
    if len(sizes) != len(SPLIT_NAMES) or any(n < 0 for n in sizes):
        raise DataError("train/valid/test sample counts must be three numbers >= 0, "
                        f"got {train_valid_test_num_samples}")
    indexed = {prefix: IndexedDataset(prefix, mmap=mmap) for _, prefix in blend}

    def cache_for(prefix: str) -> str:
        return cache_dir if cache_dir is not None else default_cache_dir(prefix, class_name)

    def units(prefix: str) -> int:
        return indexed[prefix].num_documents if by_documents else len(indexed[prefix])

    def document_range(prefix: str, s: int) -> tuple[int, int]:
        return split_document_ranges(units(prefix), split_weights)[s]

    def part(prefix: str, s: int, num_samples: int | None):
        start, end = document_range(prefix, s)
        if start == end:
            raise DataError(f"{prefix}: its {SPLIT_NAMES[s]} split has no documents (--split {split} of "
                            f"{units(prefix)} documents) but {SPLIT_NAMES[s]} samples are needed; give it "
                            "more weight in --split or add data")
        return make_part(indexed[prefix], (start, end), num_samples, SPLIT_NAMES[s], cache_for(prefix))

    result = []
    for s, n in enumerate(sizes):
        if split_weights[s] == 0 or n == 0:
            result.append(None)
        elif len(blend) == 1:
            result.append(part(blend[0][1], s, n))
        elif blend[0][0] is not None:
            weights = [w for w, _ in blend]
            parts = [part(prefix, s, count) for (_, prefix), count in zip(blend, samples_per_dataset(weights, n))]
            result.append(BlendedDataset(parts, weights, n, cache_dir=cache_for(blend[0][1])))
        else:  # prefixes whose split is empty hold no sample: left out, as a weight of 0
            present = [prefix for _, prefix in blend if document_range(prefix, s)[0] < document_range(prefix, s)[1]]
            parts = [part(prefix, s, None) for prefix in present]
            lengths = [len(p) for p in parts]
            if sum(lengths) == 0:
                raise DataError(f"the {SPLIT_NAMES[s]} split of every --data-path prefix is too small for one "
                                "sample; give it more weight in --split or add data")
            result.append(BlendedDataset(parts, lengths, min(n, sum(lengths)), cache_dir=cache_for(blend[0][1])))
    return tuple(result)


def build_gpt_datasets(data_path: list[str] | str, split: str, seq_length: int, seed: int,
                       train_valid_test_num_samples: tuple[int, int, int], *, cache_dir: str | None = None,
                       eod_id: int, eod_mask_loss: bool = False, reset_position_ids: bool = False,
                       reset_attention_mask: bool = False, add_extra_token: bool = True) -> tuple:
    """(train, valid, test) GPTDatasets (or blends of them): `build_blended_datasets` with GPT samples
    of `seq_length` tokens."""
    options = dict(eod_id=eod_id, eod_mask_loss=eod_mask_loss, reset_position_ids=reset_position_ids,
                   reset_attention_mask=reset_attention_mask, add_extra_token=add_extra_token)

    def make_part(indexed, document_range, num_samples, split_name, part_cache):
        return GPTDataset(indexed, document_range, num_samples, seq_length, seed, split_name=split_name,
                          cache_dir=part_cache, **options)

    return build_blended_datasets(data_path, split, train_valid_test_num_samples, make_part, cache_dir=cache_dir)
