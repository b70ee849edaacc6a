"""Blending: --data-path parsing, Megatron's greedy blend, and building the train/valid/test datasets."""

import os

import numpy as np
import pytest
import torch

from megalith.data import gpt_dataset
from megalith.data.blended import (BlendedDataset, build_blending_indices, build_gpt_datasets, parse_data_path,
                                   samples_per_dataset)
from megalith.data.errors import DataError
from megalith.data.gpt_dataset import GPTDataset, default_cache_dir, parse_split, split_document_ranges
from megalith.data.indexed import IndexedDatasetBuilder

EOD = 0


def make_corpus(tmp_path, name, tag, num_documents, length=12):
    """Documents whose tokens are tag*100000 + 100*document + position (EOD last): sources stay visible."""
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for d in range(num_documents):
            n = length + d % 5
            builder.add_item([tag * 100000 + 100 * d + p + 1 for p in range(n - 1)] + [EOD])
            builder.end_document()
        builder.finalize()
    return prefix


def one_line(error):
    return "\n" not in str(error.value)


# --- --data-path ---------------------------------------------------------------------------------


def test_parse_data_path():
    assert parse_data_path(["0.3", "A", "0.7", "B"]) == [(pytest.approx(0.3), "A"), (pytest.approx(0.7), "B")]
    assert parse_data_path(["30", "A", "10", "B"]) == [(0.75, "A"), (0.25, "B")]
    assert parse_data_path(["A", "B"]) == [(None, "A"), (None, "B")]
    assert parse_data_path(["A"]) == [(None, "A")]
    assert parse_data_path("A") == [(None, "A")]
    assert parse_data_path(["1", "A"]) == [(1.0, "A")]


@pytest.mark.parametrize("bad", [[], ["0.3", "A", "0.7"], ["0.3", "A", "B", "C"], ["A", "0.5", "B"],
                                 ["-1", "A", "2", "B"], ["0", "A", "0", "B"], ["0.5", "0.5"], [""]])
def test_bad_data_path_is_a_one_line_error(bad):
    with pytest.raises(DataError) as error:
        parse_data_path(bad)
    assert one_line(error) and "--data-path" in str(error.value)


# --- the greedy blend ----------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.3, 0.7], [0.5, 0.5], [0.2, 0.3, 0.5], [0.01, 0.99], [0.1] * 10,
                                     [0.123, 0.456, 0.021, 0.4]])
@pytest.mark.parametrize("size", [1000, 4567, 20000])
def test_blend_follows_the_weights_within_one_per_thousand(weights, size):
    dataset_index, sample_index = build_blending_indices(weights, size)
    assert dataset_index.dtype == np.int16 and sample_index.dtype == np.int64
    counts = np.bincount(dataset_index, minlength=len(weights))
    assert np.all(np.abs(counts / size - np.asarray(weights)) <= 1e-3)
    for d in range(len(weights)):  # each dataset's samples are taken in order 0, 1, 2, ...
        np.testing.assert_array_equal(sample_index[dataset_index == d], np.arange(counts[d]))


def test_blend_is_megatrons_greedy_rule():
    """Sample i goes to the dataset lagging its target weight * max(i, 1) most (first on ties)."""
    dataset_index, _ = build_blending_indices([0.5, 0.5], 6)
    assert dataset_index.tolist() == [0, 1, 0, 1, 0, 1]
    dataset_index, _ = build_blending_indices([0.25, 0.75], 8)
    assert dataset_index.tolist() == [1, 0, 1, 1, 0, 1, 1, 1]


def test_samples_per_dataset_has_megatrons_surplus():
    assert samples_per_dataset([0.3, 0.7], 1000) == [302, 704]
    assert samples_per_dataset([0.5, 0.5], 10) == [6, 6]


def test_blended_dataset_items_come_from_their_datasets():
    first = [{"x": torch.tensor([i])} for i in range(100)]
    second = [{"x": torch.tensor([1000 + i])} for i in range(100)]
    blend = BlendedDataset([first, second], [1, 3], 120)
    assert len(blend) == 120 and blend.weights == [0.25, 0.75]
    for i in range(120):
        source = (first, second)[blend.dataset_index[i]]
        assert blend[i] is source[blend.dataset_sample_index[i]]
    with pytest.raises(IndexError):
        blend[120]
    with pytest.raises(DataError):
        BlendedDataset([first[:10], second], [0.5, 0.5], 100)  # the first has too few samples


# --- build_gpt_datasets ----------------------------------------------------------------------------


def build(data_path, sizes, tmp_path, split="8,1,1", **kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_gpt_datasets(data_path, split, 16, 1234, sizes, eod_id=EOD, **kwargs)


def test_one_prefix_gives_gpt_datasets_per_split(tmp_path):
    prefix = make_corpus(tmp_path, "a", 1, 50)
    train, valid, test = build([prefix], (100, 20, 0), tmp_path)
    assert isinstance(train, GPTDataset) and isinstance(valid, GPTDataset) and test is None
    assert len(train) >= 100 and len(valid) >= 20
    assert train.document_range == (0, 40) and valid.document_range == (40, 45)
    assert set(np.unique(valid.document_index)) <= set(range(40, 45))
    assert build([prefix], (100, 20, 5), tmp_path, split="1,0,1")[1] is None


def test_weighted_prefixes_blend_each_split_of_each_prefix(tmp_path):
    a, b = make_corpus(tmp_path, "a", 1, 60), make_corpus(tmp_path, "b", 2, 30)
    train, valid, _ = build(["0.3", a, "0.7", b], (1000, 40, 0), tmp_path)
    assert isinstance(train, BlendedDataset) and len(train) == 1000 and len(valid) == 40
    only_b = build(["0", a, "1", b], (100, 0, 0), tmp_path)[0]  # a prefix of weight 0 is left out
    assert isinstance(only_b, GPTDataset) and only_b.indexed.prefix == b
    assert [len(d) >= n for d, n in zip(train.datasets, samples_per_dataset([0.3, 0.7], 1000))] == [True, True]
    counts = np.bincount(train.dataset_index, minlength=2)
    assert abs(counts[0] / 1000 - 0.3) <= 1e-3
    for i in range(0, 1000, 37):  # each sample's tokens come from the prefix the blend says
        tag = int(train.dataset_index[i]) + 1
        tokens = train[i]["input_ids"]
        assert ((tokens == EOD) | (tokens // 100000 == tag)).all()
    for prefix, part in zip((a, b), valid.datasets):  # each prefix split on its own documents
        start, end = split_document_ranges(len(part.indexed), parse_split("8,1,1"))[1]
        assert part.document_range == (start, end) and part.indexed.prefix == prefix


def test_unweighted_prefixes_blend_one_epoch_each_by_size(tmp_path):
    a, b = make_corpus(tmp_path, "a", 1, 60), make_corpus(tmp_path, "b", 2, 20)
    train, _, _ = build([a, b], (10, 0, 0), tmp_path)
    lengths = [len(d) for d in train.datasets]
    assert len(train) == 10 and train.weights == pytest.approx([n / sum(lengths) for n in lengths])
    train, _, _ = build([a, b], (10**6, 0, 0), tmp_path)
    assert len(train) == sum(lengths)  # capped at one epoch of each (Megatron)


def test_datasets_are_cached_beside_the_data_by_default(tmp_path, monkeypatch):
    a, b = make_corpus(tmp_path, "a", 1, 60), make_corpus(tmp_path, "b", 2, 30)
    first = build(["1", a, "1", b], (200, 20, 20), tmp_path, cache_dir=None)
    cache = default_cache_dir(a)
    names = os.listdir(cache)
    assert sum(n.endswith("-description.json") for n in names) == 3 * 2 + 3  # 3 splits x 2 prefixes + 3 blends
    assert not any(n.endswith(".tmp") for n in names)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt instead of loaded from the cache")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", no_build)
    monkeypatch.setattr("megalith.data.blended.build_blending_indices", no_build)
    second = build(["1", a, "1", b], (200, 20, 20), tmp_path, cache_dir=None)
    for one, two in zip(first, second):
        assert not two.built_now and all(not d.built_now for d in two.datasets)
        np.testing.assert_array_equal(one.dataset_index, two.dataset_index)
        for i in (0, 7, len(one) - 1):
            assert torch.equal(one[i]["input_ids"], two[i]["input_ids"])


def test_too_small_a_split_is_a_clear_error(tmp_path):
    prefix = make_corpus(tmp_path, "a", 1, 5)
    with pytest.raises(DataError) as error:
        build([prefix], (10, 10, 10), tmp_path, split="98,1,1")
    assert one_line(error) and "valid" in str(error.value)
    with pytest.raises(DataError):
        build([prefix], (10, 10, -1), tmp_path)
