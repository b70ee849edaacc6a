"""Tokenizers with Megatron-LM's interface and flag names, plus SentencePiece training.

Every tokenizer maps text to a list of ids and back and names its special ids (`eod`, `pad`,
`mask`, `cls`, `sep`, `bos`, `eos`; None where it has none) and its T5 sentinels
(`additional_special_tokens_ids`, `<extra_id_0>` first). `build_tokenizer` picks one by
Megatron's `--tokenizer-type` name and says which flag is missing when one is.

Types (Megatron's names):
  SentencePieceTokenizer  a SentencePiece `.model` (--tokenizer-model); Megatron's special tokens
  GPT2BPETokenizer        GPT-2 byte-level BPE from vocab.json + merges.txt (--vocab-file, --merge-file)
  HuggingFaceTokenizer    a local directory with tokenizer.json (--tokenizer-model)
  NullTokenizer           text is already ids separated by spaces (--vocab-size)

`train_sentencepiece` trains a model whose special tokens are all in its own vocab, so the
SentencePieceTokenizer built from it has exactly the requested vocab size and round-trips text
exactly (identity normalisation, whitespace kept, byte fallback for unseen characters).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
from abc import ABC, abstractmethod
from typing import Iterable, Iterator, Sequence

from megalith.data.errors import DataError

TOKENIZER_TYPES = ("SentencePieceTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer")

# Megatron's SentencePiece special tokens, reserved in-vocab by train_sentencepiece.
SP_SPECIAL_TOKENS = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
SP_UNK, SP_BOS, SP_EOS, SP_PAD = "<unk>", "<s>", "</s>", "<pad>"
GPT2_EOD = "<|endoftext|>"


def sentinel(i: int) -> str:
    """The T5 sentinel token number i."""
    return f"<extra_id_{i}>"


class Tokenizer(ABC):
    """Text <-> ids; special ids are None where the tokenizer has no such token."""

    name: str = "Tokenizer"
    eod: int | None = None
    pad: int | None = None
    mask: int | None = None
    cls: int | None = None
    sep: int | None = None
    bos: int | None = None
    eos: int | None = None

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """All ids, added special tokens included: every id is below it."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        ...

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        ...

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once (subclasses batch this in native code)."""
        return [self.tokenize(text) for text in texts]

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return []

    def special_ids(self) -> dict[str, int]:
        """The named special ids this tokenizer has (for checks and messages)."""
        names = ("eod", "pad", "mask", "cls", "sep", "bos", "eos")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def __repr__(self) -> str:
        return f"{self.name}(vocab_size={self.vocab_size})"


class _VocabTable(Tokenizer):
    """A tokenizer that keeps its piece <-> id tables (`_vocab`, `_inv_vocab`) and sentinels."""

    _vocab: dict[str, int]
    _inv_vocab: dict[int, str]
    _sentinels: list[int] | tuple = ()

    @property
    def vocab_size(self) -> int:
        return len(self._vocab)

    @property
    def vocab(self) -> dict[str, int]:
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        return self._inv_vocab

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return list(self._sentinels)


def _require_file(path: str | None, what: str, flag: str) -> str:
    if path is None:
        raise DataError(f"{what} is needed; pass {flag} PATH")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such {what}; check {flag}")
    return path


# --- SentencePiece --------------------------------------------------------------------------


class SentencePieceTokenizer(_VocabTable):
    """Megatron's SentencePieceTokenizer: a SentencePiece model plus its special tokens.

    <CLS> <SEP> <EOD> <MASK> are looked up in the model's vocab and appended after its pieces
    where missing; pad, bos and eos are the model's own pieces when it defines them, else
    <PAD> <BOS> <EOS>, likewise looked up or appended; then `vocab_extra_ids` sentinels
    <extra_id_0> ... . `eod` is the <EOD> id, as in Megatron (its GPTSentencePieceTokenizer,
    not offered here, would use the model's eos instead).

    Special tokens written literally in the text map to their ids (as in Megatron) unless the
    model already encodes them itself (user-defined symbols), which keeps the surrounding
    pieces exactly what the model produces. `detokenize` inverts `tokenize` exactly for models
    trained by `train_sentencepiece` (Megatron's adds spaces around special tokens; this does not).
    """

    name = "SentencePieceTokenizer"

    def __init__(self, model_file: str, vocab_extra_ids: int = 0) -> None:
        import sentencepiece

        _require_file(model_file, "SentencePiece model", "--tokenizer-model")
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=model_file)
        except (RuntimeError, OSError) as error:
            reason = (str(error).strip().splitlines() or ["unreadable"])[0]
            raise DataError(f"{model_file}: not a SentencePiece model ({reason}); check --tokenizer-model") from None
        self.model_file = model_file
        self.num_threads = -1  # of tokenize_batch: -1 = SentencePiece's own choice (one per CPU)
        sp = self._sp
        size = sp.get_piece_size()
        self._vocab = {sp.id_to_piece(i): i for i in range(size)}
        self._inv_vocab = {i: piece for piece, i in self._vocab.items()}
        self._split: dict[str, int] = {}  # special tokens the model does not encode itself -> id

        def add(token: str) -> int:
            if token not in self._vocab:
                index = len(self._vocab)
                self._vocab[token], self._inv_vocab[index] = index, token
            index = self._vocab[token]
            if index >= size or index not in sp.encode(token):  # the model does not match it in text
                self._split[token] = index
            return index

        self.cls, self.sep, self.eod, self.mask = (add(t) for t in SP_SPECIAL_TOKENS)
        self.pad = add(_model_piece(sp, sp.pad_id(), "<PAD>"))
        self.bos = add(_model_piece(sp, sp.bos_id(), "<BOS>"))
        self.eos = add(_model_piece(sp, sp.eos_id(), "<EOS>"))
        self._sentinels = [add(sentinel(i)) for i in range(vocab_extra_ids)]
        # Longest first, so a token that contains another wins.
        tokens = sorted(self._split, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        # Ids sp.decode cannot render (appended, control): detokenize writes their text itself.
        self._literal = {i: t for t, i in self._split.items()}

    def tokenize(self, text: str) -> list[int]:
        if self._pattern is None or self._pattern.search(text) is None:
            return self._sp.encode(text)
        ids: list[int] = []
        start = 0
        for match in self._pattern.finditer(text):
            if match.start() > start:
                ids.extend(self._sp.encode(text[start:match.start()]))
            ids.append(self._split[match.group()])
            start = match.end()
        if start < len(text):
            ids.extend(self._sp.encode(text[start:]))
        return ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        if self._pattern is not None and any(self._pattern.search(t) for t in texts):
            return [self.tokenize(t) for t in texts]
        return self._sp.encode(texts, num_threads=self.num_threads) if texts else []

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if not any(i in self._literal for i in ids):
            return self._sp.decode(ids)
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i in self._literal:
                parts.append(self._sp.decode(run) if run else "")
                parts.append(self._literal[i])
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run) if run else "")
        return "".join(parts)


def _model_piece(sp, index: int, fallback: str) -> str:
    """The model's piece for a reserved id (pad/bos/eos), or the fallback when it has none."""
    return sp.id_to_piece(index) if 0 <= index < sp.get_piece_size() else fallback


# --- GPT-2 byte-level BPE --------------------------------------------------------------------


class GPT2BPETokenizer(_VocabTable):
    """GPT-2's byte-level BPE (vocab.json + merges.txt) through HF tokenizers.

    Lossless on any text. `<|endoftext|>` is the eod; like Megatron's GPT2 tokenizer, the string
    written in text is encoded as ordinary bytes, not as the eod id.
    """

    name = "GPT2BPETokenizer"

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        _require_file(vocab_file, "GPT-2 vocab file", "--vocab-file")
        _require_file(merge_file, "GPT-2 merge file", "--merge-file")
        try:
            model = models.BPE.from_file(vocab_file, merge_file)
        except Exception as error:  # the Rust side raises plain Exception
            raise DataError(f"{vocab_file} / {merge_file}: not a GPT-2 BPE vocab and merge file ({error}); "
                            "check --vocab-file and --merge-file") from None
        self._tok = HFTokenizer(model)
        self._tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        self._tok.decoder = decoders.ByteLevel()
        self._vocab = self._tok.get_vocab()
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        if GPT2_EOD not in self._vocab:
            raise DataError(f"{vocab_file}: has no {GPT2_EOD} token; use a GPT-2 vocab file (--vocab-file)")
        self.eod = self.eos = self._vocab[GPT2_EOD]

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


# --- Hugging Face tokenizer.json ------------------------------------------------------------


_HF_SPECIALS = {"eos": "eos_token", "bos": "bos_token", "pad": "pad_token", "mask": "mask_token",
                "cls": "cls_token", "sep": "sep_token"}


class HuggingFaceTokenizer(_VocabTable):
    """A Hugging Face fast tokenizer saved locally (tokenizer.json), loaded without transformers.

    Special tokens come from tokenizer_config.json and special_tokens_map.json (the latter wins)
    when present, else are None; eod is the eos token. As with Megatron's (which calls the
    tokenizer with its defaults), `tokenize` lets the tokenizer's post-processor add its special
    tokens (e.g. Llama's BOS) and `detokenize` keeps special tokens. Sentinels are the config's
    `additional_special_tokens`, else the vocab's <extra_id_0>, <extra_id_1>, ... .
    """

    name = "HuggingFaceTokenizer"

    def __init__(self, directory: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        if directory is None:
            raise DataError("a Hugging Face tokenizer directory is needed; pass --tokenizer-model DIR")
        if os.path.isfile(directory) and directory.endswith(".json"):
            directory, tokenizer_json = os.path.dirname(directory) or ".", directory
        else:
            if not os.path.isdir(directory):
                raise DataError(f"{directory}: no such tokenizer directory; check --tokenizer-model")
            tokenizer_json = os.path.join(directory, "tokenizer.json")
            if not os.path.isfile(tokenizer_json):
                raise DataError(f"{tokenizer_json}: missing; --tokenizer-model must be a directory holding "
                                "a Hugging Face tokenizer.json (save one with tokenizer.save_pretrained)")
        try:
            self._tok = HFTokenizer.from_file(tokenizer_json)
        except Exception as error:  # the Rust side raises plain Exception
            raise DataError(f"{tokenizer_json}: cannot be loaded ({error}); re-save the tokenizer") from None
        self.directory = directory
        self._vocab = self._tok.get_vocab(with_added_tokens=True)
        self._inv_vocab = {i: t for t, i in self._vocab.items()}
        config = {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            config.update(_read_json(os.path.join(directory, name)))
        for attribute, key in _HF_SPECIALS.items():
            token = _token_text(config.get(key))
            setattr(self, attribute, None if token is None else self._id_of(token, key))
        self.eod = self.eos
        extra = [_token_text(t) for t in config.get("additional_special_tokens") or []]
        if extra:
            self._sentinels = [self._id_of(t, "additional_special_tokens") for t in extra if t is not None]
        else:
            self._sentinels = []
            while sentinel(len(self._sentinels)) in self._vocab:
                self._sentinels.append(self._vocab[sentinel(len(self._sentinels))])

    def _id_of(self, token: str, key: str) -> int:
        index = self._tok.token_to_id(token)
        if index is None:
            raise DataError(f"{self.directory}: {key} {token!r} is not in tokenizer.json's vocab; "
                            "fix the tokenizer config")
        return index

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def tokenize_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: not valid JSON ({error}); fix or remove it") from None
    return data if isinstance(data, dict) else {}


def _token_text(value) -> str | None:
    """A special token as saved by transformers: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


# --- Null ------------------------------------------------------------------------------------


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: the text is already token ids separated by spaces.

    eod is `vocab_size` as given, so the vocab_size property is one more than given.
    """

    name = "NullTokenizer"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size is None or int(vocab_size) < 1:
            raise DataError(f"NullTokenizer needs a positive vocab size, got {vocab_size}; pass --vocab-size N")
        self._given = int(vocab_size)
        self.eod = self._given

    @property
    def vocab_size(self) -> int:
        return self._given + 1

    def tokenize(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def detokenize(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)


# --- choosing one ----------------------------------------------------------------------------


def build_tokenizer(tokenizer_type: str, *, tokenizer_model: str | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None,
                    vocab_extra_ids: int = 0) -> Tokenizer:
    """The tokenizer Megatron's `--tokenizer-type` names, from its flags' values."""
    if tokenizer_type == "SentencePieceTokenizer":
        if tokenizer_model is None:
            raise DataError("SentencePieceTokenizer needs a SentencePiece model; pass --tokenizer-model PATH")
        return SentencePieceTokenizer(tokenizer_model, vocab_extra_ids=vocab_extra_ids)
    if tokenizer_type == "GPT2BPETokenizer":
        if vocab_file is None:
            raise DataError("GPT2BPETokenizer needs GPT-2's vocab.json; pass --vocab-file PATH")
        if merge_file is None:
            raise DataError("GPT2BPETokenizer needs GPT-2's merges.txt; pass --merge-file PATH")
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise DataError("HuggingFaceTokenizer needs a directory holding tokenizer.json; pass --tokenizer-model DIR")
        return HuggingFaceTokenizer(tokenizer_model)
    if tokenizer_type == "NullTokenizer":
        if vocab_size is None:
            raise DataError("NullTokenizer needs the vocab size; pass --vocab-size N")
        return NullTokenizer(vocab_size)
    raise DataError(f"unknown tokenizer type {tokenizer_type!r}; pass --tokenizer-type as one of "
                    f"{', '.join(TOKENIZER_TYPES)}")


# --- training SentencePiece -----------------------------------------------------------------


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
