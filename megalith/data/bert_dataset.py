"""BERT samples: two segments of consecutive sentences, masked LM and the sentence-order label.

Megatron-LM's `BERTMaskedWordPieceDataset` semantics. A sample (see `masking.build_sample_mapping`)
is a run of sentences of one document with a target length of at most `seq_length - 3`. With
the binary head it splits at a random sentence into A and B and, half the time, swaps them
(`is_random` = 1: the sentence-order-prediction target); the longer segment then loses tokens
from a random end until A + B fit the target. The sequence `[CLS] A [SEP] B [SEP]` (or
`[CLS] A [SEP]` without the binary head) is masked (`masking.py`) and padded to `seq_length`.

Item (torch tensors, no batch dimension, s = seq_length):

    input_ids       int64 [s]    masked tokens, pad after the sequence
    token_type_ids  int64 [s]    0 for [CLS] A [SEP], 1 for B [SEP], 0 on padding
    labels          int64 [s]    the original token at masked positions, -1 elsewhere
    loss_mask       float32 [s]  1.0 at masked positions
    padding_mask    bool [s]     True at real tokens, False at padding
    is_random       int64 []     1 when A and B were swapped (always 0 without the binary head)
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from megalith.data import masking
from megalith.data.errors import DataError


def truncate_pair(a: np.ndarray, b: np.ndarray, target: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, bool]:
    """(a, b, truncated): drop tokens one at a time from the longer segment (B on a tie), from its
    front or back at random, until len(a) + len(b) <= target (Megatron's rule)."""
    excess = len(a) + len(b) - target
    if excess <= 0:
        return a, b, False
    bounds = [[0, len(a)], [0, len(b)]]
    for coin in rng.random(excess).tolist():
        side = bounds[0] if bounds[0][1] - bounds[0][0] > bounds[1][1] - bounds[1][0] else bounds[1]
        if coin < 0.5:
            side[0] += 1
        else:
            side[1] -= 1
    return a[bounds[0][0]:bounds[0][1]], b[bounds[1][0]:bounds[1][1]], True


def check_tokenizer(tokenizer) -> tuple[int, int, int, int]:
    """(cls, sep, mask, pad) of `tokenizer`, or a DataError naming the one BERT samples need and it lacks."""
    cls, sep, mask, pad = (masking.require_token(tokenizer, name, "BERT") for name in ("cls", "sep", "mask", "pad"))
    return cls, sep, mask, pad


class BertDataset:
    """`num_samples` (or more: whole epochs) BERT samples from documents [start, end) of `indexed`.

    `tokenizer` needs `vocab_size, cls, sep, mask, pad` (and lists its other special ids, which
    are never masked nor drawn as random replacements). With `whole_word_masking`, `word_start`
    (a predicate over token ids, or a bool table over the vocabulary) says which ids begin a
    word; without it the tokenizer's `inv_vocab` pieces tell ('##', '▁' or 'Ġ' conventions).
    At most `masked_lm_prob` times the sample's target length is masked (Megatron), and at most
    `max_predictions_per_seq` when given. N-gram masking as current Megatron BERT: up to
    `masking_max_ngram` words per span, sizes geometric with p = 0.2 (or 1/n weights).
    `cache_dir` keeps the sample mapping on disk (`--data-cache-path`).
    """

    def __init__(self, indexed, document_range: tuple[int, int], num_samples: int | None, seq_length: int,
                 seed: int, tokenizer, *, masked_lm_prob: float = 0.15, short_seq_prob: float = 0.1,
                 binary_head: bool = True, whole_word_masking: bool = False,
                 word_start: Callable[[int], bool] | np.ndarray | None = None,
                 max_predictions_per_seq: int | None = None, masking_max_ngram: int = 3,
                 masking_use_geometric_distribution: bool = True, cache_dir: str | None = None,
                 split: str | None = None) -> None:
        if not 0.0 < masked_lm_prob < 1.0:
            raise DataError(f"masked_lm_prob {masked_lm_prob} must be in (0, 1); set --mask-prob")
        if seq_length < 5:
            raise DataError(f"BERT seq_length {seq_length} is too short: [CLS] A [SEP] B [SEP] needs at least 5; "
                            "raise --seq-length")
        self.indexed, self.seq_length, self.seed = indexed, int(seq_length), int(seed)
        self.masked_lm_prob, self.binary_head = float(masked_lm_prob), bool(binary_head)
        self.cls, self.sep, self.mask, self.pad = check_tokenizer(tokenizer)
        self.special_ids = masking.special_token_ids(tokenizer)
        self.random_ids = masking.replacement_ids(int(tokenizer.vocab_size), self.special_ids)
        self.word_starts = None
        if whole_word_masking:
            if word_start is None:
                word_start = masking.word_start_from_tokenizer(tokenizer)
            self.word_starts = masking.word_start_table(word_start, int(tokenizer.vocab_size))
        self.max_predictions_per_seq = None if max_predictions_per_seq is None else int(max_predictions_per_seq)
        self.ngrams = masking.NgramSampler(int(masking_max_ngram),
                                           0.2 if masking_use_geometric_distribution else None)
        self.sample_mapping = masking.load_sample_mapping(
            indexed, document_range, num_samples, self.seq_length - 3, short_seq_prob, self.seed,
            2 if self.binary_head else 1, class_name=type(self).__name__, cache_dir=cache_dir, split=split)
        self.description_fields = masking.description_fields(
            self, indexed, document_range, num_samples, split, sequence_length=self.seq_length,
            short_sequence_probability=float(short_seq_prob), binary_head=self.binary_head)

    def __len__(self) -> int:
        return len(self.sample_mapping)

    def _segments(self, index: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, bool, int]:
        """(A, B, swapped, target length) of sample `index`, before truncation."""
        first, end, target = (int(x) for x in self.sample_mapping[index])
        sentences = [np.asarray(self.indexed[i], dtype=np.int64) for i in range(first, end)]
        pivot, swapped = len(sentences), False
        if self.binary_head:
            pivot = 1 if len(sentences) < 3 else int(rng.integers(1, len(sentences)))
            swapped = bool(rng.random() < 0.5)
        empty = np.zeros(0, dtype=np.int64)
        a = np.concatenate(sentences[:pivot]) if pivot else empty
        b = np.concatenate(sentences[pivot:]) if pivot < len(sentences) else empty
        return (b, a, True, target) if swapped else (a, b, False, target)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside a BERT dataset of {len(self)} samples")
        index = int(index)
        rng = masking.sample_rng(self.seed, index)
        a, b, swapped, target = self._segments(index, rng)
        a, b, _ = truncate_pair(a, b, target, rng)
        parts = [[self.cls], a, [self.sep]]
        types = [np.zeros(len(a) + 2, dtype=np.int64)]
        if len(b):
            parts += [b, [self.sep]]
            types.append(np.ones(len(b) + 1, dtype=np.int64))
        tokens = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts])

        starts, ends = masking.word_spans(tokens, self.special_ids, self.word_starts)
        budget = masking.num_to_mask(len(tokens), self.masked_lm_prob, target, self.max_predictions_per_seq)
        positions = masking.span_positions(masking.choose_spans(starts, ends, budget, rng, self.ngrams))
        masked = masking.bert_mask(tokens, positions, rng, self.mask, self.random_ids)

        s, n = self.seq_length, len(tokens)
        input_ids = np.full(s, self.pad, dtype=np.int64)
        input_ids[:n] = masked
        token_types = np.zeros(s, dtype=np.int64)
        token_types[:n] = np.concatenate(types)
        labels = np.full(s, -1, dtype=np.int64)
        labels[positions] = tokens[positions]
        loss_mask = np.zeros(s, dtype=np.float32)
        loss_mask[positions] = 1.0
        padding_mask = np.zeros(s, dtype=bool)
        padding_mask[:n] = True
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_types),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "padding_mask": torch.from_numpy(padding_mask),
            "is_random": torch.tensor(int(swapped), dtype=torch.int64),
        }
