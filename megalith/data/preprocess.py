"""JSON lines -> Megatron indexed datasets: `megalith preprocess`, Megatron's tools/preprocess_data.py.

One JSON object per line; for each `--json-keys` key, its text (a string, or a list of strings
that are already sentences) becomes one document of `PREFIX_<key>_document.bin/.idx`
(`_sentence` with `--split-sentences`, where each sentence is a sequence of its own). Output is
byte-identical to Megatron's for the same token ids: one document per line in input order, a
text that tokenizes to nothing is an empty document, sentences that tokenize to nothing are
dropped, and `--append-eod` adds the eod to the last sequence of non-empty documents only.

The input streams through in batches of lines: worker processes (each builds the tokenizer once)
encode them, and at most a few batches per worker are in flight, so memory stays bounded
whatever the input size. A bad line stops the run with one line naming the file and line
number, and no output appears: the builders write temporary files, renamed only at the end.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import signal
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from megalith.data.errors import DataError
from megalith.data.indexed import IndexedDatasetBuilder, data_file, index_file, optimal_dtype
from megalith.data.tokenizers import TOKENIZER_TYPES, Tokenizer, build_tokenizer

BATCH_BYTES = 1 << 20     # text per task sent to a worker (a longer line is a batch alone)
BATCH_LINES = 4096
IN_FLIGHT_PER_WORKER = 3  # batches queued or running per worker: bounds memory, keeps workers busy


def add_preprocess_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron's tools/preprocess_data.py flags; those that only tune its multi-file runs are accepted."""
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="JSON lines file (.gz read as gzip)")
    group.add_argument("--json-keys", nargs="+", default=["text"], metavar="KEY",
                       help="keys whose text to tokenize; one dataset per key (default: text)")
    group.add_argument("--split-sentences", action="store_true",
                       help="split texts into sentences (rule-based splitter), one sequence each; "
                            "writes PREFIX_<key>_sentence.bin/.idx (BERT, T5 data)")
    group.add_argument("--keep-newlines", action="store_true",
                       help="with --split-sentences: keep the whitespace (newlines) after each sentence")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model (SentencePieceTokenizer, GPTSentencePieceTokenizer, "
                            "Llama2Tokenizer), or a local Hugging Face tokenizer.json or its directory")
    group.add_argument("--vocab-file", default=None,
                       help="GPT-2 vocab.json (GPT2BPETokenizer) or BERT vocab.txt (BertWordPiece*)")
    group.add_argument("--merge-file", default=None, help="GPT-2 merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer's vocab size")
    group.add_argument("--vocab-extra-ids", type=int, default=0,
                       help="T5 sentinel tokens to add (SentencePieceTokenizer, BertWordPiece*)")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="append the tokenizer's end-of-document token to every non-empty document")
    group.add_argument("--lang", default="english",
                       help="accepted for Megatron's scripts (its NLTK splitter's language); the rule-based "
                            "splitter here breaks after . ! ? in any language")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="writes PREFIX_<key>_document.bin/.idx (or _sentence) per json key")
    group.add_argument("--dataset-impl", default="mmap", choices=("mmap",),
                       help="accepted for older Megatron scripts: the mmap .bin/.idx format is the one written")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="tokenizing processes (1: tokenize in this process)")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for Megatron's scripts; the input streams through --workers processes in "
                            "one pass and PREFIX_<key>_* is written directly (Megatron's merged output)")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for Megatron's scripts: documents always keep the input's order")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="documents between progress lines (when stderr is not a terminal)")
    return parser


def output_prefix(prefix: str, key: str, split_sentences: bool) -> str:
    """Megatron's output name for one json key."""
    return f"{prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def run_preprocess(args: argparse.Namespace) -> int:
    """Tokenize `args.input` into one indexed dataset per json key; prints throughput; returns 0."""
    _check_arguments(args)
    tokenizer_options = dict(tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                             merge_file=args.merge_file, vocab_size=args.vocab_size,
                             vocab_extra_ids=args.vocab_extra_ids)
    tokenizer = build_tokenizer(args.tokenizer_type, **tokenizer_options)
    if args.append_eod and tokenizer.eod is None:
        raise DataError(f"{args.tokenizer_type} has no end-of-document token; drop --append-eod")
    dtype = optimal_dtype(tokenizer.vocab_size)
    options = EncodeOptions(path=args.input, json_keys=tuple(args.json_keys), append_eod=args.append_eod,
                            split_sentences=args.split_sentences, keep_newlines=args.keep_newlines,
                            dtype=dtype.str, vocab_size=tokenizer.vocab_size)
    prefixes = [output_prefix(args.output_prefix, key, args.split_sentences) for key in args.json_keys]

    with ExitStack() as stack:
        progress = Progress(args.input, args.log_interval)
        stack.callback(progress.close)
        builders = [stack.enter_context(IndexedDatasetBuilder(p, dtype)) for p in prefixes]
        batches = _batches(args.input)
        if args.workers == 1:
            encoder = Encoder(options, tokenizer)
            results: Iterable[EncodedBatch] = (encoder.encode_checked(batch) for batch in batches)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(args.workers, initializer=_start_worker,
                                                           initargs=(options, args.tokenizer_type,
                                                                     tokenizer_options)))
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = _ordered(pool, batches, args.workers * IN_FLIGHT_PER_WORKER, args.input)
        for result in results:
            for builder, (tokens, lengths, counts) in zip(builders, result.keys):
                _write_documents(builder, tokens, lengths, counts)
            progress.update(result)
        for builder in builders:
            builder.finalize()
    print(progress.summary())
    for prefix in prefixes:
        print(f"wrote {data_file(prefix)} and {index_file(prefix)} ({dtype} tokens)")
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    """Everything that can be wrong before reading a line: nothing is written when it is."""
    if not os.path.exists(args.input):
        raise DataError(f"{args.input}: no such input file; check --input")
    if not os.path.isfile(args.input):
        raise DataError(f"{args.input}: not a file; --input takes one JSON lines file")
    if not os.access(args.input, os.R_OK):
        raise DataError(f"{args.input}: not readable; check its permissions")
    directory = os.path.dirname(os.path.abspath(args.output_prefix))
    if not os.path.isdir(directory):
        raise DataError(f"output directory {directory} does not exist; create it or fix --output-prefix")
    if not args.json_keys or len(set(args.json_keys)) != len(args.json_keys):
        raise DataError(f"--json-keys {' '.join(args.json_keys)}: give each key once")
    if args.workers < 1:
        raise DataError(f"--workers {args.workers}: need at least 1")
    if args.log_interval < 1:
        raise DataError(f"--log-interval {args.log_interval}: need at least 1")
    if args.partitions < 1:
        raise DataError(f"--partitions {args.partitions}: need at least 1")
    if args.tokenizer_type.startswith("BertWordPiece") and not args.split_sentences:
        print("note: BERT data is usually split into sentences; pass --split-sentences for BERT's "
              "sentence-pair samples (as Megatron's tool asks)", file=sys.stderr)
    if args.keep_newlines and not args.split_sentences:
        print("note: --keep-newlines only applies with --split-sentences; ignored (as Megatron does)", file=sys.stderr)


# --- reading ------------------------------------------------------------------------------------


def _open(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb", buffering=1 << 20)


def _batches(path: str) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, raw lines) in batches of about BATCH_BYTES, read lazily."""
    lines: list[bytes] = []
    size, first = 0, 1
    number = 0
    try:
        with _open(path) as f:
            for number, line in enumerate(f, 1):
                lines.append(line)
                size += len(line)
                if size >= BATCH_BYTES or len(lines) >= BATCH_LINES:
                    yield first, lines
                    lines, size, first = [], 0, number + 1
    except (OSError, EOFError) as error:
        raise DataError(f"{path}:{number + 1}: cannot be read ({error}); check the file") from None
    if lines:
        yield first, lines


# --- encoding (in workers, or in this process with --workers 1) ---------------------------------


@dataclass(frozen=True)
class EncodeOptions:
    path: str
    json_keys: tuple[str, ...]
    append_eod: bool
    split_sentences: bool
    keep_newlines: bool
    dtype: str        # numpy dtype string of the output
    vocab_size: int   # every id must be below it


@dataclass
class EncodedBatch:
    """Per json key: the tokens of all documents, their sequence lengths, sequences per document."""
    keys: list[tuple[np.ndarray, np.ndarray, list[int]]]
    documents: int
    tokens: int
    bytes: int


class Encoder:
    """Turns raw JSON lines into token ids, the way Megatron's Encoder.encode does."""

    def __init__(self, options: EncodeOptions, tokenizer: Tokenizer) -> None:
        self.options, self.tokenizer = options, tokenizer
        self.dtype = np.dtype(options.dtype)

    def encode_batch(self, batch: tuple[int, list[bytes]]) -> EncodedBatch:
        first, lines = batch
        options = self.options
        texts: list[list[list[str]]] = [[] for _ in options.json_keys]  # key -> document -> sentences
        numbers: list[int] = []
        for number, raw in enumerate(lines, first):
            record = self._parse(raw, number)
            if record is None:
                continue
            numbers.append(number)
            for k, key in enumerate(options.json_keys):
                texts[k].append(self._sentences(record, key, number))
        keys = [self._encode_key(documents, numbers) for documents in texts]
        return EncodedBatch(keys, len(numbers), sum(len(k[0]) for k in keys), sum(len(r) for r in lines))

    def encode_checked(self, batch: tuple[int, list[bytes]]) -> EncodedBatch:
        """encode_batch, with any failure (a tokenizer bug, say) a DataError naming the lines."""
        try:
            return self.encode_batch(batch)
        except DataError:
            raise
        except Exception as error:
            first, lines = batch
            raise DataError(f"{self.options.path}:{first}-{first + len(lines) - 1}: encoding failed: "
                            f"{type(error).__name__}: {error}") from None

    def _parse(self, raw: bytes, number: int) -> dict | None:
        path = self.options.path
        try:
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as error:
            raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1}); "
                            "convert the file to UTF-8") from None
        if not line.strip():
            return None  # a blank line holds no document
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not JSON ({error.msg} at column {error.colno}); "
                            "each line must be one JSON object") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a JSON {type(record).__name__}, not an object; "
                            "each line must be one JSON object such as {\"text\": \"...\"}")
        return record

    def _sentences(self, record: dict, key: str, number: int) -> list[str]:
        path = self.options.path
        if key not in record:
            found = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise DataError(f"{path}:{number}: no key {key!r} (keys: {found}); choose the keys with --json-keys")
        value = record[key]
        if isinstance(value, str):
            if self.options.split_sentences:
                return split_sentences(value, self.options.keep_newlines)
            return [value]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return value  # already sentences, as Megatron takes them
        raise DataError(f"{path}:{number}: key {key!r} holds a JSON {type(value).__name__}, not a string "
                        "(or a list of strings); fix the line or choose another key with --json-keys")

    def _encode_key(self, documents: list[list[str]], numbers: list[int]):
        flat = [sentence for document in documents for sentence in document]
        ids = self.tokenizer.tokenize_batch(flat) if flat else []
        tokens: list[int] = []
        lengths: list[int] = []
        counts: list[int] = []
        ends: list[int] = []  # each document's end in tokens, to name the line of a bad id
        eod = self.tokenizer.eod if self.options.append_eod else None
        position = 0
        for document in documents:
            before = len(lengths)
            for sentence_ids in ids[position:position + len(document)]:
                if sentence_ids:
                    tokens.extend(sentence_ids)
                    lengths.append(len(sentence_ids))
            position += len(document)
            if eod is not None and len(lengths) > before:
                tokens.append(eod)
                lengths[-1] += 1
            counts.append(len(lengths) - before)
            ends.append(len(tokens))
        array = np.array(tokens, dtype=np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.options.vocab_size):
            bad = int(np.flatnonzero((array < 0) | (array >= self.options.vocab_size))[0])
            line = numbers[int(np.searchsorted(ends, bad, side="right"))]
            raise DataError(f"{self.options.path}:{line}: token id {int(array[bad])} is outside the vocab of "
                            f"{self.options.vocab_size}; fix the line or the tokenizer (--vocab-size)")
        return array.astype(self.dtype), np.array(lengths, dtype=np.int32), counts


# Set only inside pool worker processes, by their initializer (one tokenizer per worker).
_worker: dict = {}


def _start_worker(options: EncodeOptions, tokenizer_type: str, tokenizer_options: dict) -> None:
    # Ctrl-C is the main process's to handle (it stops the pool); a worker interrupted
    # mid-task would leave the executor waiting for it forever.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes are the parallelism here
    try:
        tokenizer = build_tokenizer(tokenizer_type, **tokenizer_options)
        if hasattr(tokenizer, "num_threads"):
            tokenizer.num_threads = 1  # SentencePiece batches would start a thread per CPU in each worker
        _worker["encoder"] = Encoder(options, tokenizer)
    except Exception as error:  # raised again by the first task: a failing initializer breaks the pool
        _worker["error"] = DataError(f"a preprocess worker could not build the tokenizer: {error}")


def _encode_in_worker(batch: tuple[int, list[bytes]]) -> EncodedBatch:
    if "error" in _worker:
        raise _worker["error"]
    return _worker["encoder"].encode_checked(batch)


def _ordered(pool: ProcessPoolExecutor, batches, window: int, path: str) -> Iterator[EncodedBatch]:
    """The pool's results in input order, with at most `window` batches in flight."""
    pending: deque = deque()
    batches = iter(batches)
    exhausted = False
    while True:
        while not exhausted and len(pending) < window:
            batch = next(batches, None)
            if batch is None:
                exhausted = True
            else:
                pending.append((batch[0], len(batch[1]), pool.submit(_encode_in_worker, batch)))
        if not pending:
            return
        first, count, future = pending.popleft()
        try:
            result = future.result()
        except DataError as error:  # drop the worker's traceback chained to it
            raise DataError(str(error)) from None
        except BrokenProcessPool:
            raise DataError(f"{path}:{first}-{first + count - 1}: a preprocess worker died (out of memory or "
                            "killed); retry with fewer --workers") from None
        yield result


def _write_documents(builder: IndexedDatasetBuilder, tokens: np.ndarray, lengths: np.ndarray,
                     counts: list[int]) -> None:
    token, sequence = 0, 0
    for count in counts:
        document_lengths = lengths[sequence:sequence + count]
        size = int(document_lengths.sum())
        builder.add_document(tokens[token:token + size], document_lengths)
        token += size
        sequence += count


# --- sentences ----------------------------------------------------------------------------------

_SENTENCE_END = re.compile(r"([.!?]+[\"'\u201d\u2019)\]]*)(\s+)")
_ABBREVIATIONS = frozenset("mr mrs ms dr prof sr jr st vs etc e.g i.e no fig inc ltd co cf al".split())


def split_sentences(text: str, keep_newlines: bool = False) -> list[str]:
    """Sentences of English-like text: a break after . ! ? (and closing quotes) before whitespace.

    Not after common abbreviations or single-letter initials. Without keep_newlines each sentence
    is stripped of surrounding whitespace (as nltk's punkt returns them); with it, the whitespace
    after a sentence stays with it. Empty sentences are dropped.
    """
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        words = text[start:match.start()].split()
        word = words[-1].lower() if words else ""
        if match.group(1) == "." and (word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())):
            continue
        sentences.append(text[start:match.end() if keep_newlines else match.end(1)])
        start = match.end()
    sentences.append(text[start:])
    if keep_newlines:
        return [s for s in sentences if s]
    return [s.strip() for s in sentences if s.strip()]


# --- progress -----------------------------------------------------------------------------------


class Progress:
    """tqdm on a terminal, else a line every `log_interval` documents; the rates at the end."""

    def __init__(self, path: str, log_interval: int) -> None:
        self.log_interval = log_interval
        self.start = time.perf_counter()
        self.documents = self.tokens = self.bytes = 0
        self._next_log = log_interval
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            total = None if path.endswith(".gz") else os.path.getsize(path)
            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
                             desc="preprocess", dynamic_ncols=True)

    def update(self, result: EncodedBatch) -> None:
        self.documents += result.documents
        self.tokens += result.tokens
        self.bytes += result.bytes
        if self._bar is not None:
            self._bar.update(result.bytes)
        elif self.documents >= self._next_log:
            print(f"Processed {self.documents} documents ({self._rates()}).", file=sys.stderr, flush=True)
            self._next_log = (self.documents // self.log_interval + 1) * self.log_interval

    def _rates(self) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        return (f"{self.documents / elapsed:.1f} docs/s, {self.tokens / elapsed:.0f} tokens/s, "
                f"{self.bytes / elapsed / 2**20:.2f} MB/s")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.start
        return (f"preprocessed {self.documents} documents, {self.tokens} tokens, {self.bytes / 2**20:.1f} MB "
                f"in {elapsed:.2f} s: {self._rates()}")
