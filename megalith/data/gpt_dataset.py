"""GPT samples: fixed-length windows over the shuffled, concatenated documents of a split.

Megatron's GPTDataset (megatron/core/datasets/gpt_dataset.py), index for index: the same seed
and inputs give the same document, sample and shuffle indices, so a run reads the samples a
Megatron run would. Three indices, built once and cached (megalith.data.index_cache):

- document index: the split's document ids, repeated for as many epochs as the requested
  samples need and shuffled with numpy's RandomState(seed). When the last epoch would be used
  by less than 80 %, it is shuffled separately (Megatron's separate final epoch), so the
  partial epoch still samples documents uniformly.
- sample index: [samples + 1, 2] (position in the document index, token offset) where each
  sample starts. Sample i is tokens [i*s, i*s + s + 1) of the concatenated stream: s + 1
  tokens, so consecutive samples share one token (inputs are tokens[:-1], labels tokens[1:]).
- shuffle index: a permutation of the samples (the separate final epoch's samples shuffled
  among themselves, after the others).

As in Megatron, a GPT "document" is one sequence of the indexed dataset (GPT data is
preprocessed without sentence splitting, so the two coincide).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch

from megalith.data.errors import DataError
from megalith.data.index_cache import load_or_build
from megalith.data.indexed import IndexedDataset

SPLIT_NAMES = ("train", "valid", "test")
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


# --- train/valid/test split -----------------------------------------------------------------


def parse_split(split: str) -> list[float]:
    """`"949,50,1"` -> [0.949, 0.05, 0.001]: up to three non-negative weights, missing ones 0."""
    text = str(split).strip()
    parts = [part.strip() for part in re.split(r"[,/]", text)]
    usage = "give up to three non-negative train,valid,test weights, e.g. --split 949,50,1"
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise DataError(f"--split {split!r} is not a list of numbers; {usage}") from None
    if not 1 <= len(values) <= len(SPLIT_NAMES):
        raise DataError(f"--split {split!r} has {len(values)} weights; {usage}")
    if any(not np.isfinite(v) or v < 0 for v in values):
        raise DataError(f"--split {split!r} has a negative or non-finite weight; {usage}")
    total = sum(values)
    if total <= 0:
        raise DataError(f"--split {split!r} gives every split weight 0; {usage}")
    values += [0.0] * (len(SPLIT_NAMES) - len(values))
    return [v / total for v in values]


def split_document_ranges(num_documents: int, weights: list[float]) -> list[tuple[int, int]]:
    """[(start, end)] per split: cumulative weights times `num_documents`, rounded.

    Megatron rounds the cumulative book-ends; the last is pinned to `num_documents` so float
    error never drops a document. A split of weight 0 gets an empty range.
    """
    bounds = [0]
    cumulative = 0.0
    for weight in weights:
        cumulative += weight
        bounds.append(min(num_documents, max(bounds[-1], int(round(cumulative * float(num_documents))))))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(len(weights))]


# --- the three indices ------------------------------------------------------------------------


def num_epochs_needed(tokens_per_epoch: int, num_samples: int | None, seq_length: int, extra: int) -> int:
    """Fewest epochs whose tokens give `num_samples` windows (one epoch when None)."""
    if num_samples is None or tokens_per_epoch <= 0:
        return 1
    needed = num_samples * seq_length + extra
    return max(1, -(-needed // tokens_per_epoch))


def build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                         separate_final_epoch: bool) -> np.ndarray:
    """`documents` repeated `num_epochs` times and shuffled (the final epoch apart if asked)."""
    if separate_final_epoch and num_epochs > 1:
        first = build_document_index(documents, num_epochs - 1, rng, False)
        last = build_document_index(documents, 1, rng, False)
        return np.concatenate((first, last))
    index = np.tile(np.asarray(documents, dtype=np.int32), num_epochs)
    rng.shuffle(index)
    return index


def build_sample_index(sequence_lengths: np.ndarray, document_index: np.ndarray, seq_length: int,
                       num_epochs: int, tokens_per_epoch: int, extra: int = 1) -> np.ndarray:
    """[samples + 1, 2]: (position in document_index, offset) of token i*seq_length, for each i.

    Vectorised equivalent of Megatron's helpers.cpp build_sample_idx (drop the last partial
    sample). Its loop consumes seq_length + extra tokens and steps back `extra`, so boundary t
    lands in the first document (in document-index order) whose cumulative end reaches
    t + extra: with the extra token, the document holding token t; without it, a boundary at a
    document's end stays in that document (offset = its length). Empty documents are skipped
    as the loop skips them; the first row is (0, 0) as in Megatron.
    """
    num_samples = max(0, (num_epochs * tokens_per_epoch - extra) // seq_length)
    lengths = np.asarray(sequence_lengths)[document_index].astype(np.int64)
    ends = np.cumsum(lengths)
    fits32 = len(document_index) < 2**31 and (lengths.size == 0 or lengths.max() < 2**31)
    index = np.zeros((num_samples + 1, 2), dtype=np.int32 if fits32 else np.int64)
    if num_samples:
        starts = np.arange(1, num_samples + 1, dtype=np.int64) * seq_length
        position = np.searchsorted(ends, starts + extra, side="left")
        index[1:, 0] = position
        index[1:, 1] = starts - (ends[position] - lengths[position])
    return index


def build_shuffle_index(num_samples: int, total_size: int, rng: np.random.RandomState) -> np.ndarray:
    """A permutation of [0, num_samples) followed by one of [num_samples, total_size)."""
    dtype = np.uint32 if total_size < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_samples, dtype=dtype)
    rng.shuffle(first)
    if num_samples == total_size:
        return first
    last = np.arange(num_samples, total_size, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_gpt_indices(sequence_lengths: np.ndarray, document_range: tuple[int, int], num_samples: int | None,
                      seq_length: int, seed: int, extra: int = 1) -> dict[str, np.ndarray]:
    """Megatron's document, sample and shuffle indices for documents [start, end)."""
    start, end = document_range
    documents = np.arange(start, end, dtype=np.int32)
    tokens_per_epoch = int(np.asarray(sequence_lengths[start:end]).sum(dtype=np.int64))
    num_epochs = num_epochs_needed(tokens_per_epoch, num_samples, seq_length, extra)
    separate_final_epoch = False
    sans_final_epoch = 0
    if num_epochs > 1:
        sans_final_epoch = ((num_epochs - 1) * tokens_per_epoch - extra) // seq_length
        from_final_epoch = num_samples - sans_final_epoch
        per_epoch = (tokens_per_epoch - extra) // seq_length
        separate_final_epoch = from_final_epoch < int(SEPARATE_FINAL_EPOCH_THRESHOLD * per_epoch)
    rng = np.random.RandomState(seed)
    document_index = build_document_index(documents, num_epochs, rng, separate_final_epoch)
    sample_index = build_sample_index(sequence_lengths, document_index, seq_length, num_epochs,
                                      tokens_per_epoch, extra)
    total = sample_index.shape[0] - 1
    shuffle_index = build_shuffle_index(sans_final_epoch if separate_final_epoch else total, total, rng)
    return {"document_index": document_index, "sample_index": sample_index, "shuffle_index": shuffle_index}


# --- masks ------------------------------------------------------------------------------------


def ltor_masks_and_position_ids(tokens: torch.Tensor, eod_id: int, *, reset_position_ids: bool = False,
                                reset_attention_mask: bool = False, eod_mask_loss: bool = False,
                                ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(attention_mask [1, s, s] bool True = masked, or None; loss_mask float32 [s]; position_ids [s]).

    Megatron's _get_ltor_masks_and_position_ids for one sample: eod_mask_loss zeroes the loss
    where the INPUT token is the end-of-document; reset_position_ids restarts positions at 0
    after every end-of-document; reset_attention_mask stops attention across it (the causal
    triangle is included, so the mask stands on its own). The eod token belongs to the document
    it ends.
    """
    s = tokens.numel()
    is_eod = tokens == eod_id
    loss_mask = torch.ones(s, dtype=torch.float32)
    if eod_mask_loss:
        loss_mask[is_eod] = 0.0
    positions = torch.arange(s, dtype=torch.long)
    attention_mask = None
    if reset_position_ids or reset_attention_mask:
        # segment[j]: end-of-documents strictly before j, i.e. which document token j is in
        segment = torch.cumsum(is_eod.long(), 0) - is_eod.long()
        if reset_position_ids:
            starts = torch.where(is_eod, positions + 1, torch.zeros_like(positions))
            segment_start = torch.cummax(torch.cat([torch.zeros(1, dtype=torch.long), starts[:-1]]), 0).values
            positions = positions - segment_start
        if reset_attention_mask:
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            attention_mask = ~(causal & (segment[:, None] == segment[None, :])).unsqueeze(0)
    return attention_mask, loss_mask, positions


# --- the dataset ------------------------------------------------------------------------------


def default_cache_dir(prefix: str, class_name: str = "GPTDataset") -> str:
    """--data-cache-path's default: `cache/<class_name>_indices` beside the data files (Megatron's)."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", f"{class_name}_indices")


class GPTDataset(torch.utils.data.Dataset):
    """Megatron's GPTDataset over the documents `document_range` of `indexed`.

    `len(ds)` is the number of samples the epochs hold (at least `num_samples`, as Megatron);
    with `num_samples=None` it is one epoch. `ds[i]` is a dict of tensors: input_ids, labels,
    loss_mask, position_ids, and attention_mask (bool [1, s, s], True = masked) only with
    `reset_attention_mask`. `cache_dir=None` keeps the indices in memory.
    """

    def __init__(self, indexed: IndexedDataset, document_range: tuple[int, int], num_samples: int | None,
                 seq_length: int, seed: int, *, split_name: str = "train", cache_dir: str | None = None,
                 eod_id: int, eod_mask_loss: bool = False, reset_position_ids: bool = False,
                 reset_attention_mask: bool = False, add_extra_token: bool = True) -> None:
        start, end = (int(v) for v in document_range)
        if not 0 <= start <= end <= len(indexed):
            raise DataError(f"{indexed.prefix}: document range [{start}, {end}) is outside its "
                            f"{len(indexed)} documents; check --split")
        if seq_length < 1:
            raise DataError(f"--seq-length must be positive, got {seq_length}")
        if num_samples is not None and num_samples < 0:
            raise DataError(f"{split_name} split: number of samples must be >= 0, got {num_samples}")
        num_samples = None if num_samples is None else int(num_samples)
        self.indexed, self.document_range, self.num_samples = indexed, (start, end), num_samples
        self.seq_length, self.seed, self.split_name = int(seq_length), int(seed), split_name
        self.eod_id, self.eod_mask_loss = eod_id, eod_mask_loss
        self.reset_position_ids, self.reset_attention_mask = reset_position_ids, reset_attention_mask
        self.extra = int(bool(add_extra_token))
        tokens = int(indexed.sequence_lengths[start:end].sum(dtype=np.int64))
        if tokens <= 0 and num_samples:
            raise DataError(f"{indexed.prefix}: the {split_name} split (documents [{start}, {end})) holds no tokens "
                            f"but {num_samples} {split_name} samples are needed; give the {split_name} split "
                            "more weight in --split, add data, or ask for no samples")
        self.description_fields = {
            "class": type(self).__name__, "dataset_path": os.path.abspath(indexed.prefix),
            "num_sequences": len(indexed), "document_range": [start, end], "tokens_in_range": tokens,
            "num_samples": num_samples, "index_split": split_name, "random_seed": self.seed,
            "sequence_length": self.seq_length, "add_extra_token_to_sequence": bool(self.extra),
        }
        if tokens <= 0:
            arrays = {"document_index": np.zeros(0, np.int32), "sample_index": np.zeros((1, 2), np.int32),
                      "shuffle_index": np.zeros(0, np.uint32)}
            self.built_now = True
        else:
            arrays, self.built_now = load_or_build(
                cache_dir, self.description_fields, type(self).__name__, split_name,
                ["document_index", "sample_index", "shuffle_index"],
                lambda: build_gpt_indices(indexed.sequence_lengths, (start, end), num_samples, self.seq_length,
                                          self.seed, self.extra),
                self._valid_indices)
        self.document_index = arrays["document_index"]
        self.sample_index = arrays["sample_index"]
        self.shuffle_index = arrays["shuffle_index"]

    def _valid_indices(self, arrays: dict[str, np.ndarray]) -> bool:
        samples = arrays["sample_index"]
        return (arrays["document_index"].ndim == 1 and samples.ndim == 2 and samples.shape[1] == 2
                and arrays["shuffle_index"].shape == (samples.shape[0] - 1,)
                and samples.shape[0] - 1 >= (self.num_samples or 0))

    def __len__(self) -> int:
        return self.sample_index.shape[0] - 1

    def sample_tokens(self, idx: int) -> np.ndarray:
        """The seq_length (+1) token ids of sample `idx` (after the shuffle), as int64."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"sample {idx} is outside the {self.split_name} dataset of {n} samples")
        i = int(self.shuffle_index[idx % n])
        first, first_offset = (int(v) for v in self.sample_index[i])
        last, last_offset = (int(v) for v in self.sample_index[i + 1])
        parts = []
        for position in range(first, last + 1):
            offset = first_offset if position == first else 0
            length = last_offset + self.extra - offset if position == last else None
            parts.append(self.indexed.get(int(self.document_index[position]), offset, length))
        return np.concatenate(parts).astype(np.int64)

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        text = torch.from_numpy(self.sample_tokens(idx))
        if self.extra:
            tokens, labels = text[:-1].contiguous(), text[1:].contiguous()
        else:  # no extra token: the last position has no label, so it is masked out
            tokens, labels = text, torch.roll(text, -1)
            labels[-1] = 0
        attention_mask, loss_mask, position_ids = ltor_masks_and_position_ids(
            tokens, self.eod_id, reset_position_ids=self.reset_position_ids,
            reset_attention_mask=self.reset_attention_mask, eod_mask_loss=self.eod_mask_loss)
        if not self.extra:
            loss_mask[-1] = 0.0
        sample = {"input_ids": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if attention_mask is not None:
            sample["attention_mask"] = attention_mask
        return sample
