"""Training a SentencePiece model whose Megatron special tokens are in its own vocab (`megalith train-tokenizer`)."""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from typing import Iterable, Iterator, Sequence

from megalith.data.errors import DataError
from megalith.data.tokenizers.spm import SP_BOS, SP_EOS, SP_PAD, SP_SPECIAL_TOKENS, SP_UNK, SentencePieceTokenizer


def train_sentencepiece(input_files: Sequence[str] | str, model_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe", character_coverage: float = 1.0, num_threads: int = 2,
                        input_sentence_size: int = 2_000_000, json_keys: Sequence[str] | None = None,
                        byte_fallback: bool = True, seed: int = 1234, verbose: bool = False) -> str:
    """Train a SentencePiece model on text files; returns `model_prefix + ".model"`.

    Files are plain text (one sentence per line, as SentencePiece reads them) or, with
    `json_keys` (or a .json/.jsonl name, key "text"), JSON lines whose keys' values are taken,
    each split at newlines. See `train_sentencepiece_from_lines` for the model's settings.
    """
    files = [input_files] if isinstance(input_files, str) else list(input_files)
    if not files:
        raise DataError("no input files to train a tokenizer on; pass --input FILE [FILE ...]")
    for path in files:
        if not os.path.isfile(path):
            raise DataError(f"{path}: no such input file; check --input")
    return train_sentencepiece_from_lines(
        _training_lines(files, json_keys), model_prefix, vocab_size, model_type=model_type,
        character_coverage=character_coverage, num_threads=num_threads, input_sentence_size=input_sentence_size,
        byte_fallback=byte_fallback, seed=seed, verbose=verbose, source=", ".join(files))


def train_sentencepiece_from_lines(lines: Iterable[str], model_prefix: str, vocab_size: int, *,
                                   model_type: str = "bpe", character_coverage: float = 1.0, num_threads: int = 2,
                                   input_sentence_size: int = 2_000_000, byte_fallback: bool = True,
                                   seed: int = 1234, verbose: bool = False, source: str = "the given lines") -> str:
    """Train a SentencePiece model on lines of text; writes PREFIX.model and PREFIX.vocab.

    The model reserves Megatron's special tokens in-vocab (<unk>=0, <s>=1, </s>=2, <pad>=3,
    then <CLS> <SEP> <EOD> <MASK> as user-defined symbols), keeps text as written (identity
    normalisation, whitespace kept) and falls back to bytes for unseen characters (newlines
    included, since training lines have none), so `SentencePieceTokenizer` round-trips any
    text. Deterministic: the same lines and arguments give a byte-identical model (seeded
    sampling; no file paths are recorded in it, but num_threads is, so keep it fixed). The
    .model file appears atomically (written under a temporary name, then renamed).
    """
    import sentencepiece

    if vocab_size is None or int(vocab_size) < 16:
        raise DataError(f"vocab size {vocab_size} is too small for a SentencePiece model; pass --vocab-size 16 or more")
    directory = os.path.dirname(os.path.abspath(model_prefix))
    os.makedirs(directory, exist_ok=True)
    model, failures = io.BytesIO(), []

    def guarded() -> Iterator[str]:  # an error raised inside SentencePiece's callback would be lost
        try:
            yield from lines
        except Exception as error:
            failures.append(error)

    options = dict(
        sentence_iterator=guarded(), model_writer=model, vocab_size=int(vocab_size), model_type=model_type,
        character_coverage=character_coverage, num_threads=max(1, int(num_threads)),
        input_sentence_size=int(input_sentence_size), shuffle_input_sentence=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece=SP_UNK, bos_piece=SP_BOS, eos_piece=SP_EOS,
        pad_piece=SP_PAD, user_defined_symbols=",".join(SP_SPECIAL_TOKENS), byte_fallback=byte_fallback,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        max_sentence_length=16384, minloglevel=0 if verbose else 2,
    )
    sentencepiece.set_random_generator_seed(seed)
    try:
        sentencepiece.SentencePieceTrainer.train(**options)
    except RuntimeError as error:
        if failures:
            raise failures[0] from None
        raise DataError(_training_failure(str(error), source, int(vocab_size))) from None
    if failures:
        raise failures[0]
    proto = model.getvalue()
    path = model_prefix + ".model"
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as f:
        f.write(proto)
    os.replace(temporary, path)
    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    with open(model_prefix + ".vocab", "w", encoding="utf-8") as f:
        for i in range(processor.get_piece_size()):
            f.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")
    return path


def _training_failure(text: str, source: str, vocab_size: int) -> str:
    """SentencePiece's error as one line with the fix."""
    if match := re.search(r"size too high \((\d+)\).*<= (\d+)", text):
        return (f"vocab size {vocab_size} is more than {source} can fill; pass --vocab-size {match.group(2)} "
                "or less (or train on more text)")
    if match := re.search(r"smaller than required_chars\. (\d+) vs (\d+)", text):
        return (f"vocab size {vocab_size} is below the {match.group(2)} pieces {source} needs (its characters, "
                "256 fallback bytes and 8 special tokens); pass --vocab-size "
                f"{match.group(2)} or more")
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (f"training a SentencePiece model on {source} failed: {lines[-1] if lines else 'no reason given'}; "
            "check --input, --model-type and --vocab-size")


def _training_lines(files: Sequence[str], json_keys: Sequence[str] | None) -> Iterator[str]:
    """Non-empty lines of the inputs: JSON lines' values for json_keys, or plain text lines."""
    for path in files:
        is_json = bool(json_keys) or path.endswith((".json", ".jsonl"))
        keys = tuple(json_keys or ("text",))
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if not is_json:
                    yield line.rstrip("\r\n")
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    raise DataError(f"{path}:{number}: not a JSON line; JSON lines are read for --json-keys "
                                    "and .json/.jsonl names, rename a plain-text file") from None
                for key in keys:
                    if not isinstance(record, dict) or key not in record:
                        raise DataError(f"{path}:{number}: no key {key!r}; pass --json-keys with the text's key")
                    yield from (s for s in str(record[key]).split("\n") if s.strip())


def add_train_tokenizer_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `megalith train-tokenizer`."""
    parser.add_argument("--input", nargs="+", required=True, metavar="FILE",
                        help="plain-text files (one sentence per line), or JSON lines with --json-keys")
    parser.add_argument("--json-keys", nargs="+", default=None, metavar="KEY",
                        help="read the inputs as JSON lines and train on these keys' text (.json/.jsonl "
                             "files are read so with key 'text' by default)")
    parser.add_argument("--model-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True, help="pieces in the model, specials included")
    parser.add_argument("--model-type", default="bpe", choices=("bpe", "unigram", "char", "word"))
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--input-sentence-size", type=int, default=2_000_000,
                        help="sample at most this many lines (seeded, so repeatable)")
    parser.add_argument("--num-threads", type=int, default=min(16, os.cpu_count() or 1))
    return parser


def run_train_tokenizer(args: argparse.Namespace) -> int:
    """`megalith train-tokenizer`: train, then print the model's path and vocab size."""
    model = train_sentencepiece(args.input, args.model_prefix, args.vocab_size, model_type=args.model_type,
                                character_coverage=args.character_coverage, num_threads=args.num_threads,
                                input_sentence_size=args.input_sentence_size, json_keys=args.json_keys)
    tokenizer = SentencePieceTokenizer(model)
    print(f"wrote {model} (vocab size {tokenizer.vocab_size}, eod {tokenizer.eod}); use it with "
          f"--tokenizer-type SentencePieceTokenizer --tokenizer-model {model}")
    return 0
