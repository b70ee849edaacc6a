"""The indexed .bin/.idx dataset: round trips, byte identity with the format spec, merging, corrupt files."""

import os
import struct

import numpy as np
import pytest

from megalith.data.errors import DataError
from megalith.data.indexed import (
    DTYPE_CODES,
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file,
    index_file,
    merge_datasets,
    optimal_dtype,
)

# Straight from the format spec, independent of megalith's writer: code -> (struct char, numpy dtype).
SPEC_DTYPES = {1: ("B", np.uint8), 2: ("b", np.int8), 3: ("h", np.int16), 4: ("i", np.int32),
               5: ("q", np.int64), 6: ("d", np.float64), 7: ("f", np.float32), 8: ("H", np.uint16)}

# Documents as lists of sequences: an empty document, one with an empty sequence, several sentences.
DOCUMENTS = [[[1, 2, 3]], [], [[4], [5, 6, 7, 8], []], [[9, 10]], [[0, 11, 12], [13]]]


def spec_files(path, code, documents):
    """The .bin and .idx bytes the format spec prescribes, written with struct alone."""
    char = SPEC_DTYPES[code][0]
    itemsize = struct.calcsize("<" + char)
    sequences = [sequence for document in documents for sequence in document]
    data = b"".join(struct.pack(f"<{len(s)}{char}", *s) for s in sequences)
    boundaries, count = [0], 0
    for document in documents:
        count += len(document)
        boundaries.append(count)
    pointers, offset = [], 0
    for sequence in sequences:
        pointers.append(offset)
        offset += len(sequence) * itemsize
    index = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", code)
    index += struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(boundaries))
    index += b"".join(struct.pack("<i", len(s)) for s in sequences)
    index += b"".join(struct.pack("<q", p) for p in pointers)
    index += b"".join(struct.pack("<q", b) for b in boundaries)
    with open(data_file(path), "wb") as f:
        f.write(data)
    with open(index_file(path), "wb") as f:
        f.write(index)
    return data, index


def build(prefix, documents, dtype, *, use_add_document=True):
    with IndexedDatasetBuilder(str(prefix), dtype) as builder:
        for document in documents:
            if use_add_document:
                tokens = [t for sequence in document for t in sequence]
                builder.add_document(tokens, [len(s) for s in document])
            else:
                for sequence in document:
                    builder.add_item(sequence)
                builder.end_document()
        builder.finalize()
    return str(prefix)


def read_bytes(prefix):
    with open(data_file(prefix), "rb") as b, open(index_file(prefix), "rb") as i:
        return b.read(), i.read()


def sequences_of(documents):
    return [sequence for document in documents for sequence in document]


@pytest.mark.parametrize("code", sorted(SPEC_DTYPES))
@pytest.mark.parametrize("use_add_document", [True, False])
def test_builder_matches_hand_built_fixture_byte_for_byte(tmp_path, code, use_add_document):
    dtype = SPEC_DTYPES[code][1]
    assert DTYPE_CODES[code] == np.dtype(dtype)
    expected = spec_files(str(tmp_path / "spec"), code, DOCUMENTS)
    prefix = build(tmp_path / "ours", DOCUMENTS, dtype, use_add_document=use_add_document)
    assert read_bytes(prefix) == expected


@pytest.mark.parametrize("code", sorted(SPEC_DTYPES))
def test_reader_reads_hand_built_fixture(tmp_path, code):
    prefix = str(tmp_path / "spec")
    spec_files(prefix, code, DOCUMENTS)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.dtype(SPEC_DTYPES[code][1])
    assert dataset.prefix == prefix
    expected = sequences_of(DOCUMENTS)
    assert len(dataset) == len(expected)
    for i, sequence in enumerate(expected):
        assert dataset[i].dtype == dataset.dtype
        assert dataset[i].tolist() == sequence
    assert dataset.document_indices.tolist() == [0, 1, 1, 4, 5, 7]
    assert dataset.sequence_lengths.dtype == np.int32 and dataset.sequence_lengths.tolist() == [3, 1, 4, 0, 2, 3, 1]
    itemsize = np.dtype(SPEC_DTYPES[code][1]).itemsize
    assert dataset.sequence_pointers.dtype == np.int64
    assert dataset.sequence_pointers.tolist() == [itemsize * n for n in (0, 3, 4, 8, 8, 10, 13)]
    assert [[s.tolist() for s in dataset.document(d)] for d in range(dataset.num_documents)] == DOCUMENTS


@pytest.mark.parametrize("dtype, values", [
    (np.uint16, [0, 1, 65534, 65535, 300]),
    (np.int32, [0, -1, 2**31 - 1, -(2**31), 70000]),
    (np.int64, [2**40, -(2**40), 7]),
    (np.float32, [0.5, -1.25, 3.0]),
])
def test_round_trip_extreme_values(tmp_path, dtype, values):
    documents = [[values[:2], values[2:]], [], [values[::-1]]]
    dataset = IndexedDataset(build(tmp_path / "d", documents, dtype))
    assert [dataset[i].tolist() for i in range(len(dataset))] == sequences_of(documents)
    assert dataset.num_documents == 3
    assert dataset.num_tokens == 2 * len(values)


def test_reader_api(tmp_path):
    dataset = IndexedDataset(build(tmp_path / "d", DOCUMENTS, np.uint16))
    assert dataset[-1].tolist() == [13]
    assert dataset.get(2, 1).tolist() == [6, 7, 8]
    assert dataset.get(2, 1, 2).tolist() == [6, 7]
    assert dataset.get(2, 4).tolist() == []
    assert dataset[3].tolist() == []
    with pytest.raises(IndexError):
        dataset[7]
    with pytest.raises(IndexError):
        dataset.get(2, 3, 2)
    assert IndexedDataset.exists(dataset.prefix)
    assert not IndexedDataset.exists(str(tmp_path / "absent"))


def test_only_empty_documents_and_no_documents(tmp_path):
    dataset = IndexedDataset(build(tmp_path / "empty_docs", [[], [], []], np.uint16))
    assert len(dataset) == 0 and dataset.num_documents == 3
    assert dataset.document_indices.tolist() == [0, 0, 0, 0]
    assert os.path.getsize(data_file(dataset.prefix)) == 0
    nothing = IndexedDataset(build(tmp_path / "nothing", [], np.int32))
    assert len(nothing) == 0 and nothing.num_documents == 0
    assert read_bytes(nothing.prefix) == spec_files(str(tmp_path / "spec"), 4, [])


def test_add_document_checks_lengths(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16) as builder:
        with pytest.raises(ValueError, match="add up to 2"):
            builder.add_document([1, 2, 3], [1, 1])
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_merge_equals_building_the_concatenation(tmp_path, dtype):
    parts = [DOCUMENTS, [[[20, 21]], []], [], [[[30], [31, 32]]]]
    prefixes = [build(tmp_path / f"part{i}", part, dtype) for i, part in enumerate(parts)]
    merge_datasets(prefixes, str(tmp_path / "merged"))
    direct = build(tmp_path / "direct", [d for part in parts for d in part], dtype)
    assert read_bytes(str(tmp_path / "merged")) == read_bytes(direct)
    merged = IndexedDataset(str(tmp_path / "merged"))
    assert merged.num_documents == sum(len(p) for p in parts)


def test_merge_refuses_mixed_dtypes_and_leaves_nothing(tmp_path):
    a = build(tmp_path / "a", DOCUMENTS, np.uint16)
    b = build(tmp_path / "b", DOCUMENTS, np.int32)
    with pytest.raises(DataError, match="b.idx"):
        merge_datasets([a, b], str(tmp_path / "merged"))
    assert sorted(os.listdir(tmp_path)) == ["a.bin", "a.idx", "b.bin", "b.idx"]
    with pytest.raises(DataError, match="at least one"):
        merge_datasets([], str(tmp_path / "merged"))


def test_exception_inside_builder_leaves_no_files_and_keeps_older_dataset(tmp_path):
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(str(tmp_path / "new"), np.uint16) as builder:
            builder.add_item([1, 2, 3])
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []

    prefix = build(tmp_path / "old", DOCUMENTS, np.uint16)
    before = read_bytes(prefix)
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.int32) as builder:
            builder.add_document([7] * 1000, [1000])
            raise RuntimeError("interrupted")
    assert read_bytes(prefix) == before
    assert sorted(os.listdir(tmp_path)) == ["old.bin", "old.idx"]

    with IndexedDatasetBuilder(prefix, np.int32) as builder:  # left without finalize(): nothing either
        builder.add_item([1])
    assert read_bytes(prefix) == before
    assert sorted(os.listdir(tmp_path)) == ["old.bin", "old.idx"]


def test_finalize_replaces_older_dataset(tmp_path):
    prefix = build(tmp_path / "d", DOCUMENTS, np.uint16)
    build(tmp_path / "d", [[[5, 6]]], np.int32)
    dataset = IndexedDataset(prefix)
    assert dataset.dtype == np.int32 and [dataset[i].tolist() for i in range(len(dataset))] == [[5, 6]]
    assert sorted(os.listdir(tmp_path)) == ["d.bin", "d.idx"]


def test_builder_errors(tmp_path):
    with pytest.raises(DataError, match="missing_dir"):
        IndexedDatasetBuilder(str(tmp_path / "missing_dir" / "d"))
    with pytest.raises(DataError, match="complex128"):
        IndexedDatasetBuilder(str(tmp_path / "d"), np.complex128)
    assert os.listdir(tmp_path) == []


def test_optimal_dtype():
    assert optimal_dtype(None) == np.int32
    assert optimal_dtype(0) == np.uint16
    assert optimal_dtype(32000) == np.uint16
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(128256) == np.int32


# --- corrupt inputs: each a DataError of one line naming the file ------------------------------


def corrupt_index(prefix, offset, raw):
    with open(index_file(prefix), "r+b") as f:
        f.seek(offset)
        f.write(raw)


def truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    "wrong magic": (lambda p: corrupt_index(p, 0, b"NOTANIDX\x00"), ".idx", "magic"),
    "unknown version": (lambda p: corrupt_index(p, 9, struct.pack("<Q", 2)), ".idx", "version 2"),
    "unknown dtype code": (lambda p: corrupt_index(p, 17, struct.pack("<B", 9)), ".idx", "dtype code 9"),
    "dtype code zero": (lambda p: corrupt_index(p, 17, struct.pack("<B", 0)), ".idx", "dtype code 0"),
    "idx truncated in header": (lambda p: truncate(index_file(p), 20), ".idx", "truncated"),
    "idx truncated in body": (lambda p: truncate(index_file(p), os.path.getsize(index_file(p)) - 8), ".idx",
                              "truncated"),
    "idx with trailing bytes": (lambda p: open(index_file(p), "ab").write(b"\x00" * 8), ".idx", "bytes"),
    "bad document boundaries": (lambda p: corrupt_index(p, 34 + 7 * 12, struct.pack("<q", 1)), ".idx",
                                "document boundaries"),
    "bin too short": (lambda p: truncate(data_file(p), 6), ".bin", "bytes"),
    "bin too long": (lambda p: open(data_file(p), "ab").write(b"\x00\x00"), ".bin", "bytes"),
    "missing bin": (lambda p: os.remove(data_file(p)), ".bin", "no such file"),
    "missing idx": (lambda p: os.remove(index_file(p)), ".idx", "no such file"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_input_gives_one_line_naming_the_file(tmp_path, case):
    damage, suffix, words = CORRUPTIONS[case]
    prefix = build(tmp_path / "d", DOCUMENTS, np.uint16)
    damage(prefix)
    with pytest.raises(DataError) as caught:
        IndexedDataset(prefix)
    message = str(caught.value)
    assert "\n" not in message
    assert prefix + suffix in message
    assert words in message
