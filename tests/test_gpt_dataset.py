"""GPTDataset: Megatron's split, document/sample/shuffle indices, masks, and the on-disk cache."""

import os

import numpy as np
import pytest
import torch

from megalith.data import gpt_dataset
from megalith.data.errors import DataError
from megalith.data.gpt_dataset import (GPTDataset, build_gpt_indices, build_sample_index, default_cache_dir,
                                       ltor_masks_and_position_ids, parse_split, split_document_ranges)
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder

EOD = 0


def make_corpus(tmp_path, lengths, name="corpus"):
    """Document d has tokens 1000*(d+1) + position, ending with EOD: every token says where it is from."""
    prefix = str(tmp_path / name)
    with IndexedDatasetBuilder(prefix, np.int32) as builder:
        for d, n in enumerate(lengths):
            tokens = [1000 * (d + 1) + p for p in range(n - 1)] + ([EOD] if n else [])
            builder.add_item(tokens)
            builder.end_document()
        builder.finalize()
    return IndexedDataset(prefix)


def stream_of(ds):
    """The concatenated documents in document-index order (what the samples are windows of)."""
    return np.concatenate([ds.indexed[int(d)] for d in ds.document_index]).astype(np.int64)


def one_line(error):
    return "\n" not in str(error.value)


# --- split --------------------------------------------------------------------------------------


def test_parse_split_normalises_and_pads():
    assert parse_split("949,50,1") == pytest.approx([0.949, 0.05, 0.001])
    assert parse_split("1") == [1.0, 0.0, 0.0]
    assert parse_split("98, 2") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("99/1/0") == pytest.approx([0.99, 0.01, 0.0])


@pytest.mark.parametrize("bad", ["", "a,b,c", "1,2,3,4", "-1,2,0", "0,0,0", "1,,2", "nan,1"])
def test_bad_split_is_a_one_line_error(bad):
    with pytest.raises(DataError) as error:
        parse_split(bad)
    assert one_line(error) and "--split" in str(error.value)


def test_split_document_ranges_round_cumulatively():
    assert split_document_ranges(1000, parse_split("949,50,1")) == [(0, 949), (949, 999), (999, 1000)]
    assert split_document_ranges(10, parse_split("1,1,1")) == [(0, 3), (3, 7), (7, 10)]
    assert split_document_ranges(10, parse_split("1,0,1")) == [(0, 5), (5, 5), (5, 10)]
    assert split_document_ranges(7, parse_split("1")) == [(0, 7), (7, 7), (7, 7)]
    assert split_document_ranges(0, parse_split("8,1,1")) == [(0, 0), (0, 0), (0, 0)]
    for n in (1, 3, 17, 1001):
        for split in ("949,50,1", "1,1,1", "33,33,34", "0.1,0.7,0.2"):
            ranges = split_document_ranges(n, parse_split(split))
            assert ranges[0][0] == 0 and ranges[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert all(start <= end for start, end in ranges)


# --- indices ------------------------------------------------------------------------------------


def reference_sample_index(lengths, document_index, seq_length, num_epochs, tokens_per_epoch, extra=1):
    """A plain port of helpers.cpp build_sample_idx's loop, to check the vectorised one against."""
    num_samples = (num_epochs * tokens_per_epoch - extra) // seq_length
    out = [(0, 0)]
    position, offset = 0, 0
    while len(out) <= num_samples:
        remaining = seq_length + extra
        while remaining != 0:
            length = lengths[document_index[position]] - offset
            remaining -= length
            if remaining <= 0:
                offset += remaining + length - extra
                remaining = 0
            else:
                position += 1
                offset = 0
        out.append((position, offset))
    return np.array(out)


@pytest.mark.parametrize("extra", [1, 0])
def test_vectorised_sample_index_matches_megatrons_loop(extra):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, size=60).astype(np.int32)  # some empty documents too
    lengths[0] = 0
    for seq_length in (1, 2, 7, 32, 100):
        document_index = rng.permutation(np.tile(np.arange(60, dtype=np.int32), 3))
        tokens = int(lengths.sum())
        got = build_sample_index(lengths, document_index, seq_length, 3, tokens, extra)
        expected = reference_sample_index(lengths, document_index, seq_length, 3, tokens, extra)
        np.testing.assert_array_equal(got, expected)


def test_samples_are_windows_of_the_shuffled_documents_overlapping_by_one(tmp_path):
    indexed = make_corpus(tmp_path, [5, 17, 1, 30, 8, 12, 9, 40, 3, 21])
    ds = GPTDataset(indexed, (2, 9), 40, 8, seed=3, eod_id=EOD)
    assert len(ds) >= 40
    stream = stream_of(ds)
    for k in range(len(ds)):
        i = int(ds.shuffle_index[k])
        np.testing.assert_array_equal(ds.sample_tokens(k), stream[i * 8: i * 8 + 9])
        item = ds[k]
        assert torch.equal(item["input_ids"], torch.from_numpy(stream[i * 8: i * 8 + 8]))
        assert torch.equal(item["labels"], torch.from_numpy(stream[i * 8 + 1: i * 8 + 9]))
    order = np.argsort(ds.shuffle_index)  # dataset position of raw sample i
    for i in range(len(ds) - 1):
        assert ds.sample_tokens(int(order[i]))[-1] == ds.sample_tokens(int(order[i + 1]))[0]
    # the range's documents, once per epoch, shuffled across all epochs (Megatron's document index)
    documents = np.arange(2, 9)
    epochs = len(ds.document_index) // len(documents)
    assert epochs > 1
    np.testing.assert_array_equal(np.sort(ds.document_index), np.repeat(documents, epochs))


def test_epochs_and_the_separate_final_epoch():
    lengths = np.full(100, 11, dtype=np.int32)  # 1100 tokens an epoch, 109 samples of 10 (+1)
    full = build_gpt_indices(lengths, (0, 100), 109 + 100, 10, seed=1)  # final epoch used ~92 %: shuffled together
    assert len(full["document_index"]) == 200 and len(full["shuffle_index"]) == len(full["sample_index"]) - 1
    part = build_gpt_indices(lengths, (0, 100), 109 + 20, 10, seed=1)  # final epoch used ~18 %: apart
    document_index = part["document_index"]
    np.testing.assert_array_equal(np.sort(document_index[:100]), np.arange(100))
    np.testing.assert_array_equal(np.sort(document_index[100:]), np.arange(100))
    sans_final = (1100 - 1) // 10
    shuffle = part["shuffle_index"]
    np.testing.assert_array_equal(np.sort(shuffle[:sans_final]), np.arange(sans_final))
    np.testing.assert_array_equal(np.sort(shuffle[sans_final:]), np.arange(sans_final, len(shuffle)))
    assert len(shuffle) == (2 * 1100 - 1) // 10 >= 129


def test_megatron_random_state_order():
    """The document shuffle is numpy RandomState(seed).shuffle of the repeated documents, then the samples'."""
    lengths = np.full(10, 5, dtype=np.int32)
    got = build_gpt_indices(lengths, (3, 10), 3, 4, seed=42)
    rng = np.random.RandomState(42)
    documents = np.arange(3, 10, dtype=np.int32)
    rng.shuffle(documents)
    np.testing.assert_array_equal(got["document_index"], documents)
    samples = np.arange(len(got["sample_index"]) - 1, dtype=np.uint32)
    rng.shuffle(samples)
    np.testing.assert_array_equal(got["shuffle_index"], samples)


# --- determinism and the cache -------------------------------------------------------------------


def test_same_seed_same_samples_and_files_other_seed_other_order(tmp_path):
    indexed = make_corpus(tmp_path, list(range(3, 40)))
    a = GPTDataset(indexed, (0, 30), 50, 16, seed=7, cache_dir=str(tmp_path / "a"), eod_id=EOD)
    b = GPTDataset(indexed, (0, 30), 50, 16, seed=7, cache_dir=str(tmp_path / "b"), eod_id=EOD)
    c = GPTDataset(indexed, (0, 30), 50, 16, seed=8, eod_id=EOD)
    for k in range(len(a)):
        for key in a[k]:
            assert torch.equal(a[k][key], b[k][key])
    names_a, names_b = sorted(os.listdir(tmp_path / "a")), sorted(os.listdir(tmp_path / "b"))
    assert names_a == names_b and len(names_a) == 4
    for name in names_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not np.array_equal(a.shuffle_index, c.shuffle_index)
    assert not np.array_equal(a.document_index, c.document_index)


def test_second_build_loads_the_cached_files(tmp_path, monkeypatch):
    indexed = make_corpus(tmp_path, list(range(3, 40)))
    cache = str(tmp_path / "cache")
    first = GPTDataset(indexed, (0, 30), 50, 16, seed=7, split_name="valid", cache_dir=cache, eod_id=EOD)
    assert first.built_now
    names = sorted(os.listdir(cache))
    digest = names[0].split("-")[0]
    assert names == sorted(f"{digest}-GPTDataset-valid-{n}" for n in
                           ("description.json", "document_index.npy", "sample_index.npy", "shuffle_index.npy"))

    def no_build(*args, **kwargs):
        raise AssertionError("the indices were rebuilt instead of loaded")

    monkeypatch.setattr(gpt_dataset, "build_gpt_indices", no_build)
    second = GPTDataset(indexed, (0, 30), 50, 16, seed=7, split_name="valid", cache_dir=cache, eod_id=EOD)
    assert not second.built_now
    np.testing.assert_array_equal(second.sample_index, first.sample_index)
    assert torch.equal(second[3]["input_ids"], first[3]["input_ids"])
    with pytest.raises(AssertionError):  # another seed is another description, so another build
        GPTDataset(indexed, (0, 30), 50, 16, seed=9, split_name="valid", cache_dir=cache, eod_id=EOD)


def test_a_truncated_cache_file_is_rebuilt(tmp_path):
    indexed = make_corpus(tmp_path, list(range(3, 40)))
    cache = tmp_path / "cache"
    first = GPTDataset(indexed, (0, 30), 50, 16, seed=7, cache_dir=str(cache), eod_id=EOD)
    shuffle = next(p for p in cache.iterdir() if p.name.endswith("shuffle_index.npy"))
    shuffle.write_bytes(shuffle.read_bytes()[:20])
    again = GPTDataset(indexed, (0, 30), 50, 16, seed=7, cache_dir=str(cache), eod_id=EOD)
    assert again.built_now
    np.testing.assert_array_equal(again.shuffle_index, first.shuffle_index)


def test_unwritable_cache_falls_back_to_memory(tmp_path):
    indexed = make_corpus(tmp_path, list(range(3, 40)))
    (tmp_path / "blocker").write_text("a file where the cache directory would go")
    ds = GPTDataset(indexed, (0, 30), 20, 16, seed=7, cache_dir=str(tmp_path / "blocker" / "cache"), eod_id=EOD)
    assert len(ds) >= 20 and ds[0]["input_ids"].shape == (16,)
    assert default_cache_dir(str(tmp_path / "corpus")) == str(tmp_path / "cache" / "GPTDataset_indices")


# --- samples and masks ---------------------------------------------------------------------------


def reference_masks(tokens, eod, reset_position_ids, reset_attention_mask, eod_mask_loss):
    """Megatron's original per-eod loop (attention: 1 = attend, before its `< 0.5` flip)."""
    s = len(tokens)
    attention = torch.tril(torch.ones(s, s))
    loss_mask = torch.ones(s)
    if eod_mask_loss:
        loss_mask[tokens == eod] = 0.0
    positions = torch.arange(s)
    previous = 0
    for i in (tokens == eod).nonzero().flatten().tolist():
        if reset_attention_mask:
            attention[i + 1:, :i + 1] = 0
        if reset_position_ids:
            positions[i + 1:] -= i + 1 - previous
            previous = i + 1
    return attention.unsqueeze(0) < 0.5, loss_mask, positions


def test_masks_and_positions_on_a_hand_made_sample():
    tokens = torch.tensor([5, EOD, 7, 8, EOD, 9])
    mask, loss, positions = ltor_masks_and_position_ids(tokens, EOD, reset_position_ids=True,
                                                        reset_attention_mask=True, eod_mask_loss=True)
    assert positions.tolist() == [0, 1, 0, 1, 2, 0]
    assert loss.tolist() == [1, 0, 1, 1, 0, 1] and loss.dtype == torch.float32
    attend = [[1, 0, 0, 0, 0, 0],
              [1, 1, 0, 0, 0, 0],
              [0, 0, 1, 0, 0, 0],
              [0, 0, 1, 1, 0, 0],
              [0, 0, 1, 1, 1, 0],
              [0, 0, 0, 0, 0, 1]]
    assert mask.dtype == torch.bool and mask.shape == (1, 6, 6)
    assert (~mask[0]).int().tolist() == attend
    none, loss, positions = ltor_masks_and_position_ids(tokens, EOD)
    assert none is None and loss.tolist() == [1.0] * 6 and positions.tolist() == list(range(6))


def test_masks_match_megatrons_loop_on_random_tokens():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        tokens = torch.randint(0, 4, (24,), generator=generator)
        for flags in [(True, True, True), (True, False, False), (False, True, False), (False, False, True)]:
            mask, loss, positions = ltor_masks_and_position_ids(
                tokens, 0, reset_position_ids=flags[0], reset_attention_mask=flags[1], eod_mask_loss=flags[2])
            ref_mask, ref_loss, ref_positions = reference_masks(tokens, 0, *flags)
            assert torch.equal(loss, ref_loss) and torch.equal(positions, ref_positions)
            if flags[1]:
                assert torch.equal(mask, ref_mask)


def test_items_follow_the_spec(tmp_path):
    indexed = make_corpus(tmp_path, [9, 4, 13, 6, 20])
    plain = GPTDataset(indexed, (0, 5), 4, 10, seed=1, eod_id=EOD)
    item = plain[0]
    assert sorted(item) == ["input_ids", "labels", "loss_mask", "position_ids"]
    assert item["input_ids"].dtype == item["labels"].dtype == item["position_ids"].dtype == torch.int64
    assert item["loss_mask"].dtype == torch.float32 and item["loss_mask"].shape == (10,)
    assert torch.equal(item["input_ids"][1:], item["labels"][:-1])
    masked = GPTDataset(indexed, (0, 5), 4, 10, seed=1, eod_id=EOD, eod_mask_loss=True,
                        reset_position_ids=True, reset_attention_mask=True)
    item = masked[0]
    assert item["attention_mask"].shape == (1, 10, 10) and item["attention_mask"].dtype == torch.bool
    ref_mask, ref_loss, ref_positions = reference_masks(item["input_ids"], EOD, True, True, True)
    assert torch.equal(item["attention_mask"], ref_mask) and torch.equal(item["loss_mask"], ref_loss)
    assert torch.equal(item["position_ids"], ref_positions)
    with pytest.raises(IndexError):
        plain[len(plain)]


def test_without_the_extra_token_samples_do_not_overlap(tmp_path):
    indexed = make_corpus(tmp_path, [9, 4, 13, 6, 20])
    ds = GPTDataset(indexed, (0, 5), 5, 8, seed=1, eod_id=EOD, add_extra_token=False)
    stream = stream_of(ds)
    for k in range(len(ds)):
        i = int(ds.shuffle_index[k])
        item = ds[k]
        assert torch.equal(item["input_ids"], torch.from_numpy(stream[i * 8: i * 8 + 8]))
        assert item["labels"][-1] == 0 and item["loss_mask"][-1] == 0 and item["loss_mask"][:-1].all()


def test_empty_ranges(tmp_path):
    indexed = make_corpus(tmp_path, [9, 4, 13])
    assert len(GPTDataset(indexed, (3, 3), 0, 8, seed=1, eod_id=EOD)) == 0
    assert len(GPTDataset(indexed, (1, 1), None, 8, seed=1, eod_id=EOD)) == 0
    with pytest.raises(DataError) as error:
        GPTDataset(indexed, (3, 3), 10, 8, seed=1, split_name="test", eod_id=EOD)
    assert one_line(error) and "test split" in str(error.value) and "--split" in str(error.value)
    with pytest.raises(DataError):
        GPTDataset(indexed, (2, 5), 10, 8, seed=1, eod_id=EOD)


def test_one_million_samples_build_quickly():
    import time
    lengths = np.random.default_rng(0).integers(1, 2000, size=100_000).astype(np.int32)
    start = time.perf_counter()
    indices = build_gpt_indices(lengths, (0, 100_000), 1_000_000, 128, seed=5)
    assert len(indices["shuffle_index"]) >= 1_000_000
    assert time.perf_counter() - start < 10
