"""The default corpus: built from Python's documentation, consistent, deterministic, race-safe."""

import argparse
import json
import multiprocessing
import os

import numpy as np
import pytest

from megalith.data import corpus as corpus_module
from megalith.data.corpus import (
    DEFAULT_VOCAB_SIZE, DefaultCorpus, add_build_corpus_arguments, build_default_corpus, default_corpus_dir,
    documents_of, load_corpus, run_build_corpus, sentences_of, source_texts)
from megalith.data.indexed import IndexedDataset


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build_default_corpus(str(tmp_path_factory.mktemp("corpus") / "default"))


def _files(directory):
    names = sorted(os.listdir(directory))
    return {name: open(os.path.join(directory, name), "rb").read() for name in names}


def test_corpus_files_agree_with_each_other(built):
    assert isinstance(built, DefaultCorpus) and built.vocab_size == DEFAULT_VOCAB_SIZE
    tokenizer = built.tokenizer()
    assert tokenizer.vocab_size == DEFAULT_VOCAB_SIZE
    texts = [json.loads(line)["text"] for line in open(built.jsonl, encoding="utf-8")]
    assert len(texts) == built.documents > 100
    assert sum(map(len, texts)) == built.characters > 300_000

    documents = IndexedDataset(built.data_prefix)
    assert len(documents) == documents.num_documents == built.documents
    assert documents.num_tokens == built.tokens
    assert documents.dtype == np.uint16
    for i in (0, len(documents) // 2, len(documents) - 1):
        ids = documents[i]
        assert ids[-1] == tokenizer.eod and tokenizer.eod not in ids[:-1]
        assert tokenizer.detokenize(ids[:-1].tolist()) == texts[i]  # exact round trip
    assert int(max(documents[i].max() for i in range(len(documents)))) < tokenizer.vocab_size

    sentences = IndexedDataset(built.sentence_prefix)
    assert sentences.num_documents == built.documents and len(sentences) == built.sentences
    assert built.sentences > 2 * built.documents  # BERT/T5 need documents of several sentences
    assert tokenizer.eod not in np.concatenate([sentences[i] for i in range(50)])
    first = " ".join(tokenizer.detokenize(s.tolist()) for s in sentences.document(0))
    assert first.split() == texts[0].split()  # same words, whitespace aside


def test_second_call_reuses_and_flags_point_at_files(built, capsys):
    stamp = os.path.getmtime(built.tokenizer_model)
    again = build_default_corpus(built.directory)
    assert again == built and os.path.getmtime(built.tokenizer_model) == stamp
    assert load_corpus(built.directory) == built
    assert load_corpus(built.directory, vocab_size=512) is None
    flags = built.flags()
    assert flags[flags.index("--data-path") + 1] == built.data_prefix
    assert IndexedDataset.exists(built.data_prefix)

    args = add_build_corpus_arguments(argparse.ArgumentParser()).parse_args(["--directory", built.directory])
    assert run_build_corpus(args) == 0
    out = capsys.readouterr().out
    assert built.data_prefix in out and built.tokenizer_model in out and f"{built.tokens} tokens" in out


def _build(directory):
    return build_default_corpus(directory)


def test_concurrent_builds_end_with_one_identical_corpus(built, tmp_path):
    directory = str(tmp_path / "shared" / "corpus")
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_build, [directory] * 3)
    assert all(result == results[0] for result in results)
    assert results[0].directory == directory and load_corpus(directory) is not None
    assert sorted(os.listdir(tmp_path / "shared")) == [".corpus.lock", "corpus"]  # no leftover build dirs
    # Deterministic: byte-identical to the build in another directory.
    assert _files(directory) == _files(built.directory)


def test_stale_or_forced_corpus_is_rebuilt(tmp_path):
    directory = str(tmp_path / "c")
    small = build_default_corpus(directory, vocab_size=512)
    assert small.vocab_size == 512 and small.tokenizer().vocab_size == 512
    big = build_default_corpus(directory, vocab_size=640)  # other vocab size: replaced in place
    assert big.vocab_size == 640 and big.tokens < small.tokens
    stamp = os.path.getmtime(big.tokenizer_model)
    os.utime(big.tokenizer_model, (stamp - 100, stamp - 100))
    forced = build_default_corpus(directory, vocab_size=640, force=True)
    assert forced == big and os.path.getmtime(forced.tokenizer_model) > stamp - 100
    assert sorted(os.listdir(tmp_path)) == [".c.lock", "c"]


def test_install_keeps_or_replaces_an_existing_directory(tmp_path):
    target, built = tmp_path / "target", tmp_path / "built"
    target.mkdir(), built.mkdir()
    (target / "old").write_text("old"), (built / "new").write_text("new")
    corpus_module._install(str(built), str(target), keep_existing=lambda: True)
    assert os.listdir(target) == ["old"] and built.exists()  # the loser's build stays for its owner to remove
    corpus_module._install(str(built), str(target), keep_existing=lambda: False)
    assert os.listdir(target) == ["new"] and not built.exists()
    assert sorted(os.listdir(tmp_path)) == ["target"]


def test_documents_and_sentences_split_the_text():
    text = "Title\n*****\n\n" + "\n\n".join(f"Paragraph {i}. It has two sentences!" * 10 for i in range(30))
    documents = documents_of([text, "Short topic."], min_chars=1000)
    assert documents[-1] == "Short topic."
    assert all(len(d) >= 1000 for d in documents[:-1]) and len(documents) > 3
    assert "\n\n".join(documents[:-1]) == text  # paragraphs kept whole and in order
    assert sentences_of("One here. Two (there).  Three?\n\n    code = 1\n    more = 2\n\nLast one") == \
        ["One here.", "Two (there).", "Three?", "    code = 1\n    more = 2", "Last one"]


def test_source_falls_back_to_docstrings(monkeypatch):
    topics = source_texts()
    assert sum(map(len, topics)) > 300_000 and "assert" in topics[0] + topics[1] + topics[2]
    monkeypatch.setattr(corpus_module, "_pydoc_topics", lambda: {})
    docstrings = source_texts()
    assert sum(map(len, docstrings)) >= corpus_module.MIN_CORPUS_CHARS
    assert any("ArgumentParser" in text for text in docstrings)


def test_default_directory_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGALITH_DATA_CACHE", str(tmp_path))
    assert default_corpus_dir().startswith(str(tmp_path / "corpus") + os.sep)
    assert default_corpus_dir(512).endswith("-sp512") and default_corpus_dir() != default_corpus_dir(512)
    monkeypatch.delenv("MEGALITH_DATA_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_corpus_dir().startswith(str(tmp_path / "xdg" / "megalith" / "corpus"))
