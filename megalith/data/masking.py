"""What the BERT and T5 datasets share: samples of consecutive sentences, and masking.

Megatron-LM semantics (`megatron/core/datasets/masked_dataset.py`, `helpers.cpp:build_mapping`),
reimplemented in numpy:

* **Sample mapping.** A sample is a run of consecutive sentences (sequences) of one document,
  closed once it reaches a target length drawn per sample (the maximum, or with
  `short_seq_prob` a uniform length in [2, maximum]); whole epochs over the documents until
  `num_samples` is reached, then shuffled. Rows are (first sentence, end sentence, target).
* **Masking candidates** are words: maximal runs of non-special tokens, split where a token
  starts a word (without a word-start predicate every token is its own word). Special tokens
  are never masked.
* **Span choice.** About `masked_lm_prob` of the tokens (`max(1, round(len * prob))`, at most
  `prob * target length`): words are visited in random order; each draws an n-gram size (1/n
  weights, or a clipped geometric distribution), shrinks it until it fits the budget, and is
  skipped if it overlaps an earlier span. Spans never cross a special token.
* **BERT** replaces each chosen token by [MASK] (80%), a random non-special token (10%) or
  keeps it (10%); **T5** replaces each span by one sentinel.

Every random choice of a sample comes from `sample_rng(seed, index)`, so sample `index` is the
same whatever the data-parallel layout, worker count or order of access.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from megalith.data.errors import DataError
from megalith.data.index_cache import load_or_build

LONG_SENTENCE_LEN = 512
"""Megatron skips a document of several sentences when one of them is longer than this."""

SPECIAL_TOKEN_NAMES = ("cls", "sep", "mask", "pad", "eod", "bos", "eos")

_MAPPING_STREAM, _SHUFFLE_STREAM, _SAMPLE_STREAM = 0, 1, 2


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of sample `index`: a function of (seed, index) alone."""
    return np.random.default_rng([int(seed), _SAMPLE_STREAM, int(index)])


# --- tokenizer facts ---------------------------------------------------------------------------


def special_token_ids(tokenizer) -> np.ndarray:
    """Sorted ids of every special token the tokenizer has (sentinels included); never masked."""
    ids = [getattr(tokenizer, name, None) for name in SPECIAL_TOKEN_NAMES]
    ids += list(getattr(tokenizer, "additional_special_tokens_ids", None) or [])
    return np.unique(np.asarray([int(i) for i in ids if i is not None and int(i) >= 0], dtype=np.int64))


def require_token(tokenizer, name: str, needed_by: str) -> int:
    """`tokenizer.<name>` as an int, or a DataError naming what lacks it."""
    value = getattr(tokenizer, name, None)
    if value is None or int(value) < 0:
        raise DataError(f"the {type(tokenizer).__name__} tokenizer has no {name} token, which {needed_by} needs; "
                        "use a tokenizer that defines it (e.g. a BERT WordPiece vocabulary or a SentencePiece "
                        "model with that special token)")
    return int(value)


def replacement_ids(vocab_size: int, specials: np.ndarray) -> np.ndarray:
    """The ids BERT's 10% random replacement draws from: the vocabulary less its special tokens."""
    keep = np.ones(int(vocab_size), dtype=bool)
    keep[specials[specials < vocab_size]] = False
    ids = np.flatnonzero(keep)
    if ids.size == 0:
        raise DataError(f"a vocabulary of {vocab_size} ids holds only special tokens; nothing to draw random "
                        "replacement tokens from")
    return ids


def word_start_table(word_start: Callable[[int], bool] | np.ndarray, vocab_size: int) -> np.ndarray:
    """A bool lookup table over the vocabulary from a predicate (or table) saying which ids start a word."""
    if isinstance(word_start, np.ndarray):
        table = word_start.astype(bool)
        if table.shape != (vocab_size,):
            raise DataError(f"the word-start table has shape {table.shape}, expected ({vocab_size},), one entry "
                            "per token id")
        return table
    return np.fromiter((bool(word_start(i)) for i in range(vocab_size)), dtype=bool, count=vocab_size)


def sentencepiece_word_start(pieces: Sequence[str]) -> Callable[[int], bool]:
    """SentencePiece: a piece starting with '▁' (U+2581) starts a word; pieces[i] is the piece of id i.
    (Pieces without it, byte-fallback pieces included, continue the word before them.)"""
    return lambda token_id: pieces[token_id].startswith("\u2581")


def wordpiece_word_start(pieces: Sequence[str]) -> Callable[[int], bool]:
    """BERT WordPiece: every piece starts a word except the '##' continuations."""
    return lambda token_id: not pieces[token_id].startswith("##")


def word_start_from_tokenizer(tokenizer) -> Callable[[int], bool]:
    """The word-start predicate of a tokenizer with an `inv_vocab` (id -> piece): WordPiece when
    its pieces use '##' continuations, SentencePiece when they use '▁' word starts, GPT-2
    byte-level BPE when they use 'Ġ'; a DataError when it has no such convention. A tokenizer
    that names its `continuing_subword_prefix` (the BERT WordPiece types: '##') is taken at its word."""
    inv_vocab = getattr(tokenizer, "inv_vocab", None)
    if inv_vocab:
        pieces = [str(inv_vocab.get(i, "")) for i in range(int(tokenizer.vocab_size))]
        prefix = getattr(tokenizer, "continuing_subword_prefix", None)
        if prefix == "##":
            return wordpiece_word_start(pieces)
        markers = ("##", "\u2581", "\u0120")
        counts = {marker: sum(piece.startswith(marker) for piece in pieces) for marker in markers}
        marker = max(counts, key=counts.get)
        if counts[marker]:
            if marker == "##":
                return wordpiece_word_start(pieces)
            return lambda token_id: pieces[token_id].startswith(marker)
    raise DataError(f"cannot tell where words start in the {type(tokenizer).__name__} tokenizer's pieces; pass "
                    "word_start (a predicate over token ids) or turn whole-word masking off")


# --- sample mapping ----------------------------------------------------------------------------


def _target_lengths(rng: np.random.Generator, short_ratio: int, max_length: int):
    """Endless target lengths, Megatron's rule: 1 in `short_ratio` is uniform in [2, max_length]."""
    while True:
        for r in rng.integers(0, 2**32, size=4096, dtype=np.uint64).tolist():
            if short_ratio and r % short_ratio == 0:
                yield 2 + r % (max_length - 1)
            else:
                yield max_length


def build_sample_mapping(document_indices: np.ndarray, sequence_lengths: np.ndarray, num_samples: int | None,
                         max_seq_length: int, short_seq_prob: float, seed: int, min_sentences: int,
                         long_sentence_length: int = LONG_SENTENCE_LEN) -> np.ndarray:
    """Megatron's build_mapping: int64 rows (first sentence, end sentence, target length), shuffled.

    `document_indices` are the boundaries of the documents to use (D + 1 sentence indices).
    Documents with fewer than `min_sentences` sentences, or of several sentences one of which is
    longer than `long_sentence_length`, give no samples. Whole epochs are built until there are
    at least `num_samples` rows (one epoch when None), so the mapping may hold more.
    """
    if max_seq_length < 2:
        raise DataError(f"a sample target of {max_seq_length} tokens is too short; the sequence length must leave "
                        "at least 2 tokens besides the special tokens")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise DataError(f"short_seq_prob {short_seq_prob} is not a probability; use --short-seq-prob in [0, 1]")
    sizes = np.asarray(sequence_lengths)
    bounds = np.asarray(document_indices, dtype=np.int64)
    firsts, lasts = bounds[:-1], bounds[1:]
    counts = lasts - firsts
    long_before = np.concatenate([[0], np.cumsum(sizes > long_sentence_length)])
    has_long = (long_before[lasts] - long_before[firsts] > 0) & (counts > 1)
    keep = (counts >= min_sentences) & ~has_long
    documents = list(zip(firsts[keep].tolist(), lasts[keep].tolist()))
    if not documents:
        raise DataError(f"none of the {len(counts)} documents has {min_sentences} or more sentences (each of "
                        f"at most {long_sentence_length} tokens), so there are no samples; preprocess with "
                        "--split-sentences, or for BERT pass --bert-no-binary-head")
    size_list = sizes.tolist()
    short_ratio = int(round(1.0 / short_seq_prob)) if short_seq_prob > 0 else 0
    targets = _target_lengths(np.random.default_rng([int(seed), _MAPPING_STREAM]), short_ratio, max_seq_length)
    wanted = 1 if num_samples is None else int(num_samples)
    rows: list[tuple[int, int, int]] = []
    while len(rows) < wanted:
        for first, last in documents:
            target, length, count, start = next(targets), 0, 0, first
            for sentence in range(first, last):
                length += size_list[sentence]
                count += 1
                remaining = last - sentence - 1
                if (length >= target and remaining > 1 and count >= min_sentences) or remaining == 0:
                    rows.append((start, sentence + 1, target))
                    target, length, count, start = next(targets), 0, 0, sentence + 1
    mapping = np.asarray(rows, dtype=np.int64).reshape(-1, 3)
    order = np.random.default_rng([int(seed), _SHUFFLE_STREAM]).permutation(len(mapping))
    return mapping[order]


def load_sample_mapping(indexed, document_range, num_samples: int | None, max_seq_length: int,
                        short_seq_prob: float, seed: int, min_sentences: int, *, class_name: str,
                        cache_dir: str | None = None, split: str | None = None) -> np.ndarray:
    """`build_sample_mapping` over documents [start, end) of an IndexedDataset, cached in
    `cache_dir` when given (built once, then memory-mapped by every rank and run)."""
    start, end = (int(x) for x in document_range)
    if not 0 <= start < end <= indexed.num_documents:
        raise DataError(f"document range [{start}, {end}) is not inside the {indexed.num_documents} documents of "
                        f"{indexed.prefix}; check --split")
    fields = {"class": class_name, "dataset_path": str(indexed.prefix), "document_range": [start, end],
              "num_samples": num_samples, "max_seq_length": int(max_seq_length),
              "short_seq_prob": float(short_seq_prob), "seed": int(seed), "min_sentences": int(min_sentences),
              "long_sentence_length": LONG_SENTENCE_LEN}

    def build() -> dict[str, np.ndarray]:
        try:
            mapping = build_sample_mapping(indexed.document_indices[start:end + 1], indexed.sequence_lengths,
                                           num_samples, max_seq_length, short_seq_prob, seed, min_sentences)
        except DataError as error:  # name the file and split: a blend has several
            raise DataError(f"{indexed.prefix} ({split or 'documents'} [{start}, {end})): {error}") from None
        return {"sample_mapping": mapping}

    def valid(arrays: dict[str, np.ndarray]) -> bool:
        mapping, least = arrays["sample_mapping"], 1 if num_samples is None else num_samples
        return mapping.ndim == 2 and mapping.shape[1] == 3 and len(mapping) >= least

    arrays, _ = load_or_build(cache_dir, fields, class_name, split, ["sample_mapping"], build, valid)
    return arrays["sample_mapping"]


def description_fields(dataset, indexed, document_range, num_samples: int | None, split: str | None,
                       **settings) -> dict:
    """What identifies a BERT/T5 dataset's samples, for the cache key of a blend built over it."""
    return {"class": type(dataset).__name__, "dataset_path": os.path.abspath(str(indexed.prefix)),
            "document_range": [int(x) for x in document_range], "num_samples": num_samples,
            "index_split": split, "random_seed": int(dataset.seed), **settings}


# --- masking -----------------------------------------------------------------------------------


def word_spans(tokens: np.ndarray, special: np.ndarray, starts_word: np.ndarray | None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Masking candidates as words: (starts, ends) position arrays, each word [start, end).

    A word is a run of non-special tokens; a new word begins after a special token and, with
    whole-word masking (`starts_word`, a lookup table over token ids), at every word-start id.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    candidate = ~np.isin(tokens, special)
    new_word = candidate.copy()
    if starts_word is not None and tokens.size:
        after_candidate = np.zeros_like(candidate)
        after_candidate[1:] = candidate[:-1]
        new_word &= ~after_candidate | starts_word[tokens]
    starts = np.flatnonzero(new_word)
    breaks = np.append(np.flatnonzero(new_word | ~candidate), tokens.size)
    ends = breaks[np.searchsorted(breaks, starts, side="right")]
    return starts, ends


def num_to_mask(length: int, masked_lm_prob: float, target_length: int,
                max_predictions: int | None = None) -> float:
    """Megatron's budget: max(1, round(length * prob)) tokens, at most prob * the sample's target
    length (and at most `max_predictions` when given). Fractional: the spans chosen hold at most
    its floor."""
    cap = masked_lm_prob * target_length
    if max_predictions is not None:
        cap = min(cap, float(max_predictions))
    return min(cap, max(1, int(round(length * masked_lm_prob))))


@dataclass(frozen=True)
class NgramSampler:
    """How many words one masked span covers: 1..max_ngram, by 1/n weights or a clipped geometric.

    Megatron's BERT: max_ngram 3 (geometric p 0.2 in current Megatron, 1/n weights before);
    T5: max_ngram 10, geometric. `geometric_p` None selects the 1/n weights.
    """

    max_ngram: int = 3
    geometric_p: float | None = None

    def __post_init__(self) -> None:
        if self.max_ngram < 1:
            raise DataError(f"masking max n-gram {self.max_ngram} must be at least 1")
        if self.geometric_p is not None and not 0.0 < self.geometric_p <= 1.0:
            raise DataError(f"geometric span probability {self.geometric_p} must be in (0, 1]; a mean span length "
                            "must be at least 1")
        weights = 1.0 / np.arange(1, self.max_ngram + 1)
        object.__setattr__(self, "_cdf", np.cumsum(weights / weights.sum()))

    def draw(self, rng: np.random.Generator) -> int:
        if self.geometric_p is not None:
            return min(int(rng.geometric(self.geometric_p)), self.max_ngram)
        return min(int(np.searchsorted(self._cdf, rng.random(), side="right")) + 1, self.max_ngram)


def choose_spans(starts: np.ndarray, ends: np.ndarray, budget: float, rng: np.random.Generator,
                 ngrams: NgramSampler, cost_budget: int | None = None) -> list[tuple[int, int]]:
    """Spans [start, end) of whole words to mask, sorted by position, at most `budget` tokens in all.

    Megatron's procedure: visit the words in random order; from each, draw an n-gram size, take
    that many consecutive words (fewer at a special token or the end), shrink the n-gram until
    it fits what is left of the budget (skip the word if even one word does not), skip it if it
    overlaps a chosen span. `cost_budget` bounds sum(span length + 1) as well: T5's decoder
    needs a sentinel plus the span's tokens for each.
    """
    count = len(starts)
    if count == 0:
        return []
    starts_list, ends_list = starts.tolist(), ends.tolist()
    # run_end[k]: one past the last word of the gap-free run of words that holds word k
    run_end = [count] * count
    for k in range(count - 2, -1, -1):
        run_end[k] = run_end[k + 1] if ends_list[k] == starts_list[k + 1] else k + 1
    taken = [False] * count
    spans: list[tuple[int, int]] = []
    masked, cost = 0, 0
    for k in rng.permutation(count).tolist():
        if masked >= budget:
            break
        size = min(ngrams.draw(rng), run_end[k] - k)
        while size > 0:
            length = ends_list[k + size - 1] - starts_list[k]
            fits = masked + length <= budget
            if cost_budget is not None:
                fits = fits and cost + length + 1 <= cost_budget
            if fits:
                break
            size -= 1
        if size == 0 or any(taken[k:k + size]):
            continue
        taken[k:k + size] = [True] * size
        spans.append((starts_list[k], ends_list[k + size - 1]))
        masked += ends_list[k + size - 1] - starts_list[k]
        cost += ends_list[k + size - 1] - starts_list[k] + 1
    spans.sort()
    return spans


def span_positions(spans: list[tuple[int, int]]) -> np.ndarray:
    if not spans:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate([np.arange(start, end, dtype=np.int64) for start, end in spans])


def bert_mask(tokens: np.ndarray, positions: np.ndarray, rng: np.random.Generator, mask_id: int,
              random_ids: np.ndarray) -> np.ndarray:
    """A copy of `tokens` with each chosen position: [MASK] 80%, a random token 10%, unchanged 10%."""
    masked = np.array(tokens, dtype=np.int64, copy=True)
    n = len(positions)
    if n == 0:
        return masked
    first, second = rng.random(n), rng.random(n)
    random_tokens = random_ids[rng.integers(0, len(random_ids), size=n)]
    replaced = np.where(first < 0.8, mask_id, np.where(second >= 0.5, random_tokens, masked[positions]))
    masked[positions] = replaced
    return masked


def span_corrupt(tokens: np.ndarray, spans: list[tuple[int, int]], sentinels: Sequence[int]
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(encoder tokens, target): each span becomes one sentinel, in order; the target is, per span,
    its sentinel then its tokens. Substituting the target's spans back gives `tokens` again."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(spans) > len(sentinels):
        raise DataError(f"{len(spans)} masked spans but only {len(sentinels)} sentinel tokens; raise "
                        "--vocab-extra-ids")
    encoder, target, previous = [], [], 0
    for (start, end), sentinel in zip(spans, sentinels):
        encoder.append(tokens[previous:start])
        encoder.append(np.asarray([sentinel], dtype=np.int64))
        target.append(np.asarray([sentinel], dtype=np.int64))
        target.append(tokens[start:end])
        previous = end
    encoder.append(tokens[previous:])
    return np.concatenate(encoder), (np.concatenate(target) if target else np.zeros(0, dtype=np.int64))
