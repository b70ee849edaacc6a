"""Megatron's indexed dataset: token ids in `PREFIX.bin`, their layout in `PREFIX.idx`.

Byte-compatible with Megatron-LM (`megatron/core/datasets/indexed_dataset.py`), so data
preprocessed by either tool loads in the other. `.bin` is the raw token ids, back to back.
`.idx`, all little-endian:

    9 bytes   magic b"MMIDIDX\\x00\\x00"
    uint64    version, 1
    uint8     dtype code (DTYPE_CODES)
    uint64    sequence count S
    uint64    document-index count D (documents + 1)
    int32[S]  sequence lengths (tokens)
    int64[S]  sequence byte offsets into .bin
    int64[D]  document boundaries: sequence indices, starting at 0, ending at S

A sequence is a sentence when sentences are split, else a whole document; a document is a
range of sequences. The reader validates both files up front and memory-maps them, so opening
a dataset costs nothing whatever its size; the builder streams (memory bounded by the index)
and writes under temporary names, renamed into place only once complete.
"""

from __future__ import annotations

import os
import struct
from array import array as packed_array
from typing import Iterable, Sequence

import numpy as np

from megalith.data.errors import DataError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float64), 7: np.dtype(np.float32), 8: np.dtype(np.uint16),
}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document-index count


def code_of(dtype) -> int:
    dtype = np.dtype(dtype)
    for code, known in DTYPE_CODES.items():
        if known == dtype:
            return code
    raise DataError(f"dtype {dtype} has no indexed-dataset code; use one of "
                    f"{', '.join(str(d) for d in DTYPE_CODES.values())}")


def optimal_dtype(vocab_size: int | None) -> np.dtype:
    """Megatron's choice: uint16 when every id fits with room to spare, else int32."""
    return np.dtype(np.uint16) if vocab_size is not None and vocab_size < 65500 else np.dtype(np.int32)


def data_file(prefix: str) -> str:
    return f"{prefix}.bin"


def index_file(prefix: str) -> str:
    return f"{prefix}.idx"


# --- writing --------------------------------------------------------------------------------


class IndexedDatasetBuilder:
    """Streams sequences into `PREFIX.bin` and writes `PREFIX.idx` on `finalize()`.

    Both files are written as `*.tmp` and renamed only when complete; used as a context
    manager, an exception removes the temporary files, so no half-written dataset is ever
    visible under the prefix.
    """

    def __init__(self, prefix: str, dtype=np.int32) -> None:
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        code_of(self.dtype)
        directory = os.path.dirname(os.path.abspath(prefix))
        if not os.path.isdir(directory):
            raise DataError(f"output directory {directory} does not exist; create it or choose another prefix")
        self._bin_tmp = data_file(prefix) + ".tmp"
        self._idx_tmp = index_file(prefix) + ".tmp"
        self._bin = open(self._bin_tmp, "wb")
        # Compact arrays, not lists of Python ints (~36 bytes each): the index of a large corpus
        # (one entry per sequence and per document) stays about the size of the .idx it becomes.
        self._lengths = packed_array("i")  # int32 sequence lengths
        self._documents = packed_array("q", [0])  # int64 document boundaries
        self._finalized = False

    def add_item(self, tokens: Sequence[int] | np.ndarray) -> None:
        """One sequence."""
        array = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(array.tobytes(order="C"))
        self._lengths.append(array.size)

    def end_document(self) -> None:
        self._documents.append(len(self._lengths))

    def add_document(self, tokens: Sequence[int] | np.ndarray, lengths: Iterable[int]) -> None:
        """A document's sequences, their tokens concatenated (Megatron's add_document)."""
        array = np.asarray(tokens, dtype=self.dtype)
        lengths = [int(n) for n in lengths]
        if sum(lengths) != array.size:
            raise ValueError(f"sequence lengths add up to {sum(lengths)}, but the document has {array.size} tokens")
        self._bin.write(array.tobytes(order="C"))
        self._lengths.extend(lengths)
        self.end_document()

    def add_index(self, other_prefix: str) -> None:
        """Append every document of another dataset (of the same dtype): merging."""
        other = IndexedDataset(other_prefix)
        if other.dtype != self.dtype:
            raise DataError(f"{index_file(other_prefix)} holds {other.dtype} tokens but this dataset is {self.dtype}; "
                            "merge datasets of one dtype")
        offset = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(other.sequence_lengths, np.int32).tobytes())
        self._documents.frombytes((other.document_indices[1:] + offset).astype(np.int64).tobytes())
        with open(data_file(other_prefix), "rb") as source:
            while chunk := source.read(1 << 24):
                self._bin.write(chunk)

    def finalize(self) -> None:
        """Write the index, then move both files into place (.bin first: the index names it)."""
        self._bin.close()
        lengths = np.frombuffer(self._lengths, dtype=np.int32) if self._lengths else np.zeros(0, np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        if len(lengths) > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.frombuffer(self._documents, dtype=np.int64)
        with open(self._idx_tmp, "wb") as index:
            index.write(_HEADER.pack(MAGIC, VERSION, code_of(self.dtype), len(lengths), len(documents)))
            index.write(lengths.tobytes(order="C"))
            index.write(pointers.tobytes(order="C"))
            index.write(documents.tobytes(order="C"))
        os.replace(self._bin_tmp, data_file(self.prefix))
        os.replace(self._idx_tmp, index_file(self.prefix))
        self._finalized = True

    def discard(self) -> None:
        """Close and remove the temporary files (the prefix's previous files, if any, stay)."""
        if not self._bin.closed:
            self._bin.close()
        for path in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(path):
                os.remove(path)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is not None or not self._finalized:
            self.discard()


def merge_datasets(prefixes: list[str], output_prefix: str) -> None:
    """One dataset holding the documents of `prefixes`, in order."""
    if not prefixes:
        raise DataError("nothing to merge; give at least one dataset prefix")
    dtype = IndexedDataset(prefixes[0]).dtype
    with IndexedDatasetBuilder(output_prefix, dtype) as builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize()


# --- reading --------------------------------------------------------------------------------


class IndexedDataset:
    """A `.bin/.idx` pair; `ds[i]` is sequence i as a numpy array.

    The index is memory-mapped; the tokens are too unless `mmap` is False (Megatron's
    --no-mmap-bin-files), when each read is a file read of just that sequence's bytes.
    """

    def __init__(self, prefix: str, mmap: bool = True) -> None:
        self.prefix, self.mmap = prefix, mmap
        idx_path, bin_path = index_file(prefix), data_file(prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise DataError(f"{path}: no such file; check --data-path (a prefix without .bin/.idx)")
        size = os.path.getsize(idx_path)
        if size < _HEADER.size:
            raise DataError(f"{idx_path}: truncated index ({size} bytes, the header alone is {_HEADER.size}); "
                            "rebuild it with megalith preprocess")
        with open(idx_path, "rb") as index:
            magic, version, code, sequences, documents = _HEADER.unpack(index.read(_HEADER.size))
        if magic != MAGIC:
            raise DataError(f"{idx_path}: not an indexed-dataset index (magic {magic!r}, expected {MAGIC!r}); "
                            "point --data-path at a .bin/.idx pair written by megalith or Megatron preprocess")
        if version != VERSION:
            raise DataError(f"{idx_path}: index version {version} is not supported (only {VERSION}); "
                            "rebuild it with megalith preprocess")
        if code not in DTYPE_CODES:
            raise DataError(f"{idx_path}: unknown dtype code {code} (known: 1-8); the file is corrupt, rebuild it")
        self.dtype = DTYPE_CODES[code]
        expected = _HEADER.size + sequences * (4 + 8) + documents * 8
        if size != expected:
            raise DataError(f"{idx_path}: {size} bytes, but its header ({sequences} sequences, {documents} document "
                            f"boundaries) needs {expected}; the file is truncated or corrupt, rebuild it")
        self._index = np.memmap(idx_path, mode="r", order="C")
        offset = _HEADER.size
        self.sequence_lengths = np.frombuffer(self._index, np.int32, sequences, offset)
        offset += sequences * 4
        self.sequence_pointers = np.frombuffer(self._index, np.int64, sequences, offset)
        offset += sequences * 8
        self.document_indices = np.frombuffer(self._index, np.int64, documents, offset)
        if documents < 1 or self.document_indices[0] != 0 or self.document_indices[-1] != sequences:
            raise DataError(f"{idx_path}: document boundaries must start at 0 and end at the sequence count "
                            f"{sequences}; the file is corrupt, rebuild it")
        tokens = int(self.sequence_lengths.sum(dtype=np.int64))
        bin_size = os.path.getsize(bin_path)
        if bin_size != tokens * self.dtype.itemsize:
            raise DataError(f"{bin_path}: {bin_size} bytes, but {idx_path} describes {tokens} {self.dtype} tokens "
                            f"({tokens * self.dtype.itemsize} bytes); the pair does not match, rebuild both")
        self._bin_path = bin_path
        self._bin = np.memmap(bin_path, mode="r", order="C") if bin_size and mmap else np.zeros(0, np.uint8)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sequence_lengths.sum(dtype=np.int64))

    def get(self, index: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence `index` (to its end without length)."""
        total = int(self.sequence_lengths[index])
        if length is None:
            length = total - offset
        if offset < 0 or length < 0 or offset + length > total:
            raise IndexError(f"tokens [{offset}, {offset + length}) are outside sequence {index} of {total} tokens")
        start = int(self.sequence_pointers[index]) + offset * self.dtype.itemsize
        if not self.mmap:
            return np.fromfile(self._bin_path, self.dtype, length, offset=start) if length else np.zeros(0, self.dtype)
        return np.frombuffer(self._bin, self.dtype, length, start)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sequence {index} is outside a dataset of {len(self)} sequences")
        return self.get(index % len(self))

    def document(self, index: int) -> list[np.ndarray]:
        """The sequences of document `index`."""
        start, end = self.document_indices[index], self.document_indices[index + 1]
        return [self[i] for i in range(int(start), int(end))]

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(index_file(prefix)) and os.path.isfile(data_file(prefix))
