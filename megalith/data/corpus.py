"""A default corpus that needs no download: Python's own documentation, tokenized and indexed.

Every Python installation carries `pydoc_data.topics` (the text `help("assert")` shows): about
465 KB of real English prose with code examples. At first use this module turns it into

    corpus.jsonl                    one {"text": ...} per document
    tokenizer.model / .vocab        a SentencePiece BPE model trained on it (`train_sentencepiece`)
    corpus_text_document.bin/.idx   GPT data: one sequence per document, eod appended
    corpus_text_sentence.bin/.idx   BERT/T5 data: each document's sentences, no eod
    corpus.json                     the manifest (counts, vocab size, a hash of the source text)

in a cache directory, so that tiny CPU models can be trained end to end with nothing but the
interpreter. Documents are groups of consecutive paragraphs of one topic, at least ~2000
characters where the topic has them. Where pydoc_data is missing (some distributions strip
it), docstrings of a fixed list of standard-library modules stand in.

Measured (CPython 3.11.7, vocab 1024, 2 cores): 79 topics, 464,970 characters -> 234 documents
of 464,452 characters (blank-line runs between paragraphs normalised), 170,519 tokens with eod
(2.7 characters per token), 3,700 sentences; the build takes about half a second. The docstring fallback
holds about 300,000 characters.

The build is atomic and safe to race: one process builds (under a file lock where the OS has
one) in a temporary sibling directory that is renamed into place only when complete; a process
that loses the race uses the winner's directory. The files are a pure function of the Python
version's documentation and the vocab size (no paths, times or thread counts leak into them).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Iterator

from megalith.data.errors import DataError
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megalith.data.tokenizers import SentencePieceTokenizer, train_sentencepiece_from_lines

CORPUS_VERSION = 1
DEFAULT_VOCAB_SIZE = 1024
MIN_DOCUMENT_CHARS = 2000
MIN_CORPUS_CHARS = 100_000
TRAIN_THREADS = 2  # recorded in the SentencePiece model, so fixed for reproducible files

MANIFEST = "corpus.json"
JSONL = "corpus.jsonl"
MODEL_PREFIX = "tokenizer"
DOCUMENT_PREFIX = "corpus_text_document"
SENTENCE_PREFIX = "corpus_text_sentence"

# Fallback source: modules whose public docstrings are substantial prose.
DOCSTRING_MODULES = (
    "argparse", "asyncio", "calendar", "collections", "concurrent.futures", "configparser", "contextlib",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email.message", "enum", "fractions",
    "functools", "gettext", "heapq", "http.client", "inspect", "json", "logging", "mailbox", "optparse",
    "os", "pathlib", "pickle", "pprint", "random", "re", "shutil", "statistics", "string", "subprocess",
    "tarfile", "tempfile", "textwrap", "threading", "traceback", "typing", "unittest", "urllib.request",
    "warnings", "zipfile",
)


@dataclass(frozen=True)
class DefaultCorpus:
    """Paths of a built default corpus and its size."""

    directory: str
    jsonl: str
    tokenizer_model: str
    data_prefix: str        # GPT: --data-path; one sequence per document, eod appended
    sentence_prefix: str    # BERT/T5: sentences of each document, no eod
    vocab_size: int
    documents: int
    characters: int
    tokens: int             # in data_prefix, eods included
    sentences: int

    def tokenizer(self, vocab_extra_ids: int = 0) -> SentencePieceTokenizer:
        return SentencePieceTokenizer(self.tokenizer_model, vocab_extra_ids=vocab_extra_ids)

    def flags(self, sentences: bool = False) -> list[str]:
        """Megatron-style flags that train on this corpus: its documents (GPT), or with `sentences`
        its sentence-split documents (BERT, T5; the tokenizer has their special tokens, and T5's
        sentinels come from --vocab-extra-ids)."""
        return ["--data-path", self.sentence_prefix if sentences else self.data_prefix, "--tokenizer-type",
                "SentencePieceTokenizer", "--tokenizer-model", self.tokenizer_model]


def default_corpus_dir(vocab_size: int = DEFAULT_VOCAB_SIZE) -> str:
    """`$MEGALITH_DATA_CACHE/corpus/<version>`, else under `$XDG_CACHE_HOME/megalith` or `~/.cache/megalith`."""
    root = os.environ.get("MEGALITH_DATA_CACHE")
    if not root:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "megalith")
    version = f"v{CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}-sp{int(vocab_size)}"
    return os.path.join(root, "corpus", version)


# --- source text ----------------------------------------------------------------------------


def _pydoc_topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:
        return {}
    return dict(topics) if isinstance(topics, dict) else {}


def _docstring_texts() -> Iterator[str]:
    """Docstrings of DOCSTRING_MODULES and their public members, in a fixed order."""
    import importlib
    import inspect
    import warnings

    seen: set[int] = set()
    with warnings.catch_warnings():  # touching deprecated attributes (typing.io, ...) warns
        warnings.simplefilter("ignore")
        yield from _module_docstrings(importlib, inspect, seen)


def _module_docstrings(importlib, inspect, seen: set[int]) -> Iterator[str]:
    for name in DOCSTRING_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        parts = [inspect.getdoc(module) or ""]
        for attribute in sorted(dir(module)):
            obj = getattr(module, attribute, None)
            if attribute.startswith("_") or getattr(obj, "__module__", None) != module.__name__ or id(obj) in seen:
                continue
            seen.add(id(obj))
            doc = inspect.getdoc(obj)
            if doc:
                parts.append(f"{attribute}\n\n{doc}")
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            yield text


def source_texts() -> list[str]:
    """The texts the corpus is made of: pydoc topics (by name), plus docstrings if they are short."""
    topics = _pydoc_topics()
    texts = [topics[name] for name in sorted(topics) if isinstance(topics[name], str) and topics[name].strip()]
    if sum(map(len, texts)) < MIN_CORPUS_CHARS:
        texts.extend(_docstring_texts())
    if sum(map(len, texts)) < MIN_CORPUS_CHARS:
        raise DataError(f"this Python carries only {sum(map(len, texts))} characters of documentation "
                        "(pydoc_data missing and docstrings stripped, e.g. by -OO); "
                        "build a corpus with megalith preprocess instead")
    return texts


def documents_of(texts: list[str], min_chars: int = MIN_DOCUMENT_CHARS) -> list[str]:
    """Split each text at blank lines into documents of consecutive paragraphs, >= min_chars each
    where the text allows (a short last group joins the previous one)."""
    documents: list[str] = []
    for text in texts:
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text.strip()) if p.strip()]
        groups: list[list[str]] = []
        current: list[str] = []
        size = 0
        for paragraph in paragraphs:
            current.append(paragraph)
            size += len(paragraph) + 2
            if size >= min_chars:
                groups.append(current)
                current, size = [], 0
        if current:
            if groups and size < min_chars // 2:
                groups[-1].extend(current)
            else:
                groups.append(current)
        documents.extend("\n\n".join(group) for group in groups)
    return documents


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def sentences_of(document: str) -> list[str]:
    """A simple sentence splitter (no nltk): paragraphs, then prose at '. ' before a capital;
    indented paragraphs (code, grammar) stay whole."""
    sentences: list[str] = []
    for paragraph in re.split(r"\n\s*\n", document):
        if not paragraph.strip():
            continue
        if paragraph.startswith((" ", "\t")):
            sentences.append(paragraph.strip("\n"))
            continue
        prose = " ".join(line.strip() for line in paragraph.splitlines())
        sentences.extend(s.strip() for s in _SENTENCE_END.split(prose) if s.strip())
    return sentences


# --- building -------------------------------------------------------------------------------


def build_default_corpus(directory: str | None = None, *, vocab_size: int = DEFAULT_VOCAB_SIZE,
                         force: bool = False) -> DefaultCorpus:
    """The default corpus in `directory` (default: `default_corpus_dir(vocab_size)`), built if it
    is missing, stale (other vocab size or source text) or `force` is set."""
    directory = os.path.abspath(directory or default_corpus_dir(vocab_size))
    texts = source_texts()
    digest = _digest(texts)
    if not force and (found := load_corpus(directory, vocab_size, digest)) is not None:
        return found
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    with _exclusive(os.path.join(parent, f".{name}.lock")):
        if not force and (found := load_corpus(directory, vocab_size, digest)) is not None:
            return found  # another process built it while this one waited
        building = tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent)
        try:
            os.chmod(building, 0o755)  # mkdtemp makes it private; a cache may be shared
            _build_into(building, texts, vocab_size, digest)
            valid = lambda: load_corpus(directory, vocab_size, digest) is not None  # noqa: E731
            _install(building, directory, keep_existing=lambda: not force and valid())
        finally:
            shutil.rmtree(building, ignore_errors=True)
    found = load_corpus(directory, vocab_size, digest)
    if found is None:
        raise DataError(f"{directory}: the default corpus is incomplete after building; remove the directory "
                        "and run megalith corpus --force")
    return found


def load_corpus(directory: str, vocab_size: int | None = None, digest: str | None = None) -> DefaultCorpus | None:
    """The corpus in `directory` if it is complete (and matches vocab_size/digest when given), else None."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    if manifest.get("version") != CORPUS_VERSION:
        return None
    if vocab_size is not None and manifest.get("vocab_size") != vocab_size:
        return None
    if digest is not None and manifest.get("source_sha256") != digest:
        return None
    join = lambda file: os.path.join(directory, file)  # noqa: E731
    corpus = DefaultCorpus(
        directory=directory, jsonl=join(JSONL), tokenizer_model=join(MODEL_PREFIX + ".model"),
        data_prefix=join(DOCUMENT_PREFIX), sentence_prefix=join(SENTENCE_PREFIX),
        vocab_size=manifest["vocab_size"], documents=manifest["documents"], characters=manifest["characters"],
        tokens=manifest["tokens"], sentences=manifest["sentences"])
    files = [corpus.jsonl, corpus.tokenizer_model]
    if not all(os.path.isfile(f) for f in files) or not IndexedDataset.exists(corpus.data_prefix) \
            or not IndexedDataset.exists(corpus.sentence_prefix):
        return None
    return corpus


def _digest(texts: list[str]) -> str:
    sha = hashlib.sha256()
    for text in texts:
        sha.update(text.encode("utf-8"))
        sha.update(b"\0")
    return sha.hexdigest()


def _build_into(directory: str, texts: list[str], vocab_size: int, digest: str) -> None:
    documents = documents_of(texts)
    with open(os.path.join(directory, JSONL), "w", encoding="utf-8") as f:
        for document in documents:
            f.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
    lines = (line for document in documents for line in document.split("\n") if line.strip())
    model = train_sentencepiece_from_lines(lines, os.path.join(directory, MODEL_PREFIX), vocab_size,
                                           num_threads=TRAIN_THREADS, source="the default corpus")
    tokenizer = SentencePieceTokenizer(model)
    dtype = optimal_dtype(tokenizer.vocab_size)
    tokens = 0
    with IndexedDatasetBuilder(os.path.join(directory, DOCUMENT_PREFIX), dtype) as builder:
        for ids in tokenizer.tokenize_batch(documents):
            ids.append(tokenizer.eod)
            builder.add_document(ids, [len(ids)])
            tokens += len(ids)
        builder.finalize()
    sentences = 0
    with IndexedDatasetBuilder(os.path.join(directory, SENTENCE_PREFIX), dtype) as builder:
        for document in documents:
            pieces = [ids for ids in tokenizer.tokenize_batch(sentences_of(document)) if ids]
            builder.add_document([i for ids in pieces for i in ids], [len(ids) for ids in pieces])
            sentences += len(pieces)
        builder.finalize()
    manifest = {
        "version": CORPUS_VERSION, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "source": "pydoc_data.topics" if _pydoc_topics() else "docstrings", "source_sha256": digest,
        "vocab_size": tokenizer.vocab_size, "documents": len(documents),
        "characters": sum(map(len, documents)), "tokens": tokens, "sentences": sentences,
    }
    with open(os.path.join(directory, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.write("\n")


def _install(built: str, directory: str, keep_existing) -> None:
    """Rename the built directory into place. Where one is already there (another process won
    the race, or it is stale), keep it if `keep_existing()`, else swap it out."""
    try:
        os.rename(built, directory)
        return
    except OSError:
        if not os.path.exists(directory):
            raise
    if keep_existing():
        return
    old = f"{directory}.old-{os.getpid()}"
    os.rename(directory, old)
    try:
        os.rename(built, directory)
    except OSError:
        if not os.path.exists(directory):  # put the previous one back rather than leave nothing
            os.rename(old, directory)
            raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """An exclusive inter-process lock where the OS offers flock; a no-op elsewhere (the
    build-then-rename protocol alone is still safe, only wasteful)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- command line ---------------------------------------------------------------------------


def add_build_corpus_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags of `megalith corpus`."""
    parser.add_argument("--directory", default=None,
                        help="where to build it (default: $MEGALITH_DATA_CACHE/corpus/..., "
                             "else ~/.cache/megalith/corpus/...)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE,
                        help="SentencePiece vocab size, special tokens included")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete corpus is there")
    parser.add_argument("--print-flags", action="store_true",
                        help="print only the pretrain flags that train on it, one word per line (for scripts)")
    parser.add_argument("--sentences", action="store_true",
                        help="with --print-flags: the sentence-split data, for BERT and T5 (default: documents, GPT)")
    return parser


def run_build_corpus(args: argparse.Namespace) -> int:
    """`megalith corpus`: build (or find) the default corpus and print its paths."""
    corpus = build_default_corpus(args.directory, vocab_size=args.vocab_size, force=args.force)
    if getattr(args, "print_flags", False):
        print("\n".join(corpus.flags(sentences=getattr(args, "sentences", False))))
        return 0
    print(f"default corpus in {corpus.directory}: {corpus.documents} documents, {corpus.characters} characters, "
          f"{corpus.tokens} tokens, {corpus.sentences} sentences, vocab size {corpus.vocab_size}")
    print(f"  jsonl            {corpus.jsonl}")
    print(f"  tokenizer model  {corpus.tokenizer_model}")
    print(f"  data prefix      {corpus.data_prefix}")
    print(f"  sentence prefix  {corpus.sentence_prefix}")
    print(f"  train GPT with: {' '.join(corpus.flags())}")
    print(f"  train BERT, T5 with: {' '.join(corpus.flags(sentences=True))} (T5: and --vocab-extra-ids 100)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_build_corpus_arguments(argparse.ArgumentParser(prog="python -m megalith.data.corpus",
                                                                description=run_build_corpus.__doc__))
    return run_build_corpus(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
