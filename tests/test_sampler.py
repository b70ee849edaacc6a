"""Global batches: one data order for every dp size, exact resume, clear exhaustion, collation."""

import itertools

import numpy as np
import pytest
import torch

from megalith.data.errors import DataError
from megalith.data.gpt_dataset import GPTDataset
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megalith.data.sampler import (GlobalBatchSampler, collate, global_batch_indices, iterate_batches,
                                   local_batch_indices)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_global_and_local_batch_indices():
    assert list(global_batch_indices(40, 8)) == list(range(40, 48))
    assert list(local_batch_indices(40, 8, dp_size=4, dp_rank=2)) == [44, 45]


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_union_over_dp_ranks_is_the_dp1_batch(dp_size):
    reference = take(iter(GlobalBatchSampler(1000, 24, 16)), 10)
    ranks = [take(iter(GlobalBatchSampler(1000, 24, 16, dp_size, r)), 10) for r in range(dp_size)]
    for step in range(10):
        assert sum((ranks[r][step] for r in range(dp_size)), []) == reference[step]
        assert all(len(ranks[r][step]) == 16 // dp_size for r in range(dp_size))
    assert reference[0] == list(range(24, 40))


def test_resume_from_consumed_samples_equals_an_uninterrupted_run():
    uninterrupted = take(iter(GlobalBatchSampler(500, 0, 12, 3, 1)), 20)
    for stop in (1, 7, 13):
        resumed = take(iter(GlobalBatchSampler(500, stop * 12, 12, 3, 1)), 20 - stop)
        assert uninterrupted[:stop] + resumed == uninterrupted


def test_exhaustion_is_a_one_line_error_and_len_counts_full_batches():
    sampler = GlobalBatchSampler(50, 8, 16, 2, 0)
    assert len(sampler) == 2
    iterator = iter(sampler)
    assert take(iterator, 2) == [list(range(8, 16)), list(range(24, 32))]
    with pytest.raises(DataError) as error:
        next(iterator)
    assert "\n" not in str(error.value) and "exhausted" in str(error.value) and "50 samples" in str(error.value)


@pytest.mark.parametrize("args", [(100, 0, 10, 3, 0), (100, 0, 8, 2, 2), (100, -1, 8, 2, 0), (100, 0, 0, 1, 0)])
def test_bad_sampler_arguments(args):
    with pytest.raises(DataError):
        GlobalBatchSampler(*args)


def test_collate_stacks_along_a_new_first_dim():
    samples = [{"a": torch.arange(3) + i, "m": torch.ones(1, 2, 2, dtype=torch.bool)} for i in range(4)]
    batch = collate(samples)
    assert batch["a"].shape == (4, 3) and batch["m"].shape == (4, 1, 2, 2)
    assert batch["a"][2].tolist() == [2, 3, 4]
    with pytest.raises(DataError):
        collate([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}])
    with pytest.raises(DataError):
        collate([])


def test_dp_ranks_read_their_rows_of_the_same_gpt_batches(tmp_path):
    prefix = str(tmp_path / "corpus")
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for d in range(30):
            builder.add_item(list(range(100 * d + 1, 100 * d + 10 + d % 7)) + [0])
            builder.end_document()
        builder.finalize()
    dataset = GPTDataset(IndexedDataset(prefix), (0, 30), 64, 8, seed=5, eod_id=0, reset_attention_mask=True)
    whole = take(iterate_batches(dataset, 16, 8), 3)
    halves = [take(iterate_batches(dataset, 16, 8, dp_size=2, dp_rank=r), 3) for r in range(2)]
    for step in range(3):
        for key, value in whole[step].items():
            assert value.shape[0] == 8
            assert torch.equal(torch.cat([halves[0][step][key], halves[1][step][key]]), value)
    assert torch.equal(whole[0]["input_ids"][0], dataset[16]["input_ids"])
