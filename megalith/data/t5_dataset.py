"""T5 samples: span corruption with sentinel tokens.

Megatron-LM's `T5MaskedWordPieceDataset` semantics. A sample (see `masking.build_sample_mapping`,
one sentence or more) is flattened and cut to its target length (at most
`encoder_seq_length - 2`); about `masked_lm_prob` of its tokens are chosen as spans of whole
words (`masking.choose_spans`, geometric span sizes clipped to `masking_max_ngram`). Span k
becomes sentinel k (`tokenizer.additional_special_tokens_ids[k]`, i.e. <extra_id_k>) in the
encoder input; the target is, per span, its sentinel then its tokens:

    tokens   a b c d e f g h            spans (b c) and (f)
    encoder  a <0> d e <1> g h
    decoder  <bos> <0> b c <1> f        ([bos] + target)
    labels   <0> b c <1> f <eos>        (target + [eos])

As in Megatron the encoder input gets no [EOS]/[SEP]. Spans are chosen so that the decoder
sequence fits `decoder_seq_length` (Megatron would fail an assertion instead).

Item (torch tensors, no batch dimension, se / sd = encoder / decoder sequence length):

    encoder_input_ids     int64 [se]    pad after the sequence
    decoder_input_ids     int64 [sd]    pad after the sequence
    labels                int64 [sd]    -1 on padding
    loss_mask             float32 [sd]  1.0 at every real decoder position (target and [eos])
    encoder_padding_mask  bool [se]     True at real tokens
    decoder_padding_mask  bool [sd]     True at real tokens
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from megalith.data import masking
from megalith.data.errors import DataError


def check_tokenizer(tokenizer, encoder_seq_length: int, decoder_seq_length: int, masked_lm_prob: float = 0.15,
                    max_predictions_per_seq: int | None = None) -> tuple[int, int, int, list[int]]:
    """(bos, eos, pad, sentinels) of `tokenizer`, or a DataError naming what T5 samples of these
    lengths need and it lacks: bos, eos, pad, and a sentinel for the most spans a sample can hold."""
    bos, eos, pad = (masking.require_token(tokenizer, name, "T5") for name in ("bos", "eos", "pad"))
    sentinels = [int(i) for i in (getattr(tokenizer, "additional_special_tokens_ids", None) or [])]
    target = int(encoder_seq_length) - 2
    most_masked = masking.num_to_mask(target, masked_lm_prob, target, max_predictions_per_seq)
    most_spans = max(1, min(int(most_masked), (int(decoder_seq_length) - 1) // 2))
    if len(sentinels) < most_spans:
        raise DataError(f"T5 span masking needs up to {most_spans} sentinel tokens "
                        f"(additional_special_tokens_ids) but the tokenizer has {len(sentinels)}; "
                        f"build it with --vocab-extra-ids {most_spans} or more (Megatron's T5 uses 100)")
    return bos, eos, pad, sentinels


class T5Dataset:
    """`num_samples` (or more: whole epochs) T5 samples from documents [start, end) of `indexed`.

    `tokenizer` needs `vocab_size, bos, eos, pad` and enough sentinels in
    `additional_special_tokens_ids` (`--vocab-extra-ids`) for the most spans a sample can hold.
    Span sizes are drawn geometric with mean `mean_span_length` words (p = 1 / mean), clipped to
    `masking_max_ngram` (Megatron: p = 0.2, i.e. mean_span_length 5, max 10). The spans kept are
    shorter on average (Megatron's procedure skips n-grams that overlap earlier spans and shrinks
    the last to the budget): 2.5-2.7 tokens for mean 3, at 128-512 encoder tokens.
    With `whole_word_masking`, `word_start` (predicate or table over ids) says which ids begin a
    word; without it the tokenizer's `inv_vocab` pieces tell.
    """

    def __init__(self, indexed, document_range: tuple[int, int], num_samples: int | None,
                 encoder_seq_length: int, decoder_seq_length: int, seed: int, tokenizer, *,
                 masked_lm_prob: float = 0.15, mean_span_length: float = 3.0, short_seq_prob: float = 0.1,
                 masking_max_ngram: int = 10, whole_word_masking: bool = False,
                 word_start: Callable[[int], bool] | np.ndarray | None = None,
                 max_predictions_per_seq: int | None = None, cache_dir: str | None = None,
                 split: str | None = None) -> None:
        if not 0.0 < masked_lm_prob < 1.0:
            raise DataError(f"masked_lm_prob {masked_lm_prob} must be in (0, 1); set --mask-prob")
        if mean_span_length < 1:
            raise DataError(f"mean span length {mean_span_length} must be at least 1 token")
        if encoder_seq_length < 4:
            raise DataError(f"T5 encoder_seq_length {encoder_seq_length} is too short (at least 4); "
                            "raise --encoder-seq-length")
        if decoder_seq_length < 3:
            raise DataError(f"T5 decoder_seq_length {decoder_seq_length} cannot hold [bos], a sentinel and one "
                            "masked token; raise --decoder-seq-length")
        self.indexed, self.seed = indexed, int(seed)
        self.encoder_seq_length, self.decoder_seq_length = int(encoder_seq_length), int(decoder_seq_length)
        self.masked_lm_prob = float(masked_lm_prob)
        self.bos, self.eos, self.pad, self.sentinels = check_tokenizer(
            tokenizer, self.encoder_seq_length, self.decoder_seq_length, masked_lm_prob, max_predictions_per_seq)
        self.special_ids = masking.special_token_ids(tokenizer)
        self.word_starts = None
        if whole_word_masking:
            if word_start is None:
                word_start = masking.word_start_from_tokenizer(tokenizer)
            self.word_starts = masking.word_start_table(word_start, int(tokenizer.vocab_size))
        target = self.encoder_seq_length - 2
        self.max_predictions_per_seq = None if max_predictions_per_seq is None else int(max_predictions_per_seq)
        self.ngrams = masking.NgramSampler(int(masking_max_ngram), 1.0 / float(mean_span_length))
        self.sample_mapping = masking.load_sample_mapping(
            indexed, document_range, num_samples, target, short_seq_prob, self.seed, 1,
            class_name=type(self).__name__, cache_dir=cache_dir, split=split)
        self.description_fields = masking.description_fields(
            self, indexed, document_range, num_samples, split, sequence_length=self.encoder_seq_length,
            sequence_length_decoder=self.decoder_seq_length, short_sequence_probability=float(short_seq_prob))

    def __len__(self) -> int:
        return len(self.sample_mapping)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} is outside a T5 dataset of {len(self)} samples")
        index = int(index)
        rng = masking.sample_rng(self.seed, index)
        first, end, target = (int(x) for x in self.sample_mapping[index])
        tokens = np.concatenate([np.asarray(self.indexed[i], dtype=np.int64) for i in range(first, end)])[:target]

        starts, ends = masking.word_spans(tokens, self.special_ids, self.word_starts)
        budget = masking.num_to_mask(len(tokens), self.masked_lm_prob, target, self.max_predictions_per_seq)
        spans = masking.choose_spans(starts, ends, budget, rng, self.ngrams,
                                     cost_budget=self.decoder_seq_length - 1)
        encoder, target_tokens = masking.span_corrupt(tokens, spans, self.sentinels)

        se, sd = self.encoder_seq_length, self.decoder_seq_length
        ne, nd = len(encoder), len(target_tokens) + 1
        encoder_ids = np.full(se, self.pad, dtype=np.int64)
        encoder_ids[:ne] = encoder
        decoder_ids = np.full(sd, self.pad, dtype=np.int64)
        decoder_ids[0] = self.bos
        decoder_ids[1:nd] = target_tokens
        labels = np.full(sd, -1, dtype=np.int64)
        labels[:nd - 1] = target_tokens
        labels[nd - 1] = self.eos
        loss_mask = np.zeros(sd, dtype=np.float32)
        loss_mask[:nd] = 1.0
        return {
            "encoder_input_ids": torch.from_numpy(encoder_ids),
            "decoder_input_ids": torch.from_numpy(decoder_ids),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "encoder_padding_mask": torch.from_numpy(np.arange(se) < ne),
            "decoder_padding_mask": torch.from_numpy(np.arange(sd) < nd),
        }
