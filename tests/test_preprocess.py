"""megalith preprocess: the same bytes as building the dataset directly from the tokenizer's ids."""

import argparse
import gzip
import json
import os

import numpy as np
import pytest

import megalith.data.preprocess as preprocess
from megalith.data.errors import DataError
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder, data_file, index_file, optimal_dtype
from megalith.data.preprocess import add_preprocess_arguments, run_preprocess, split_sentences
from megalith.data.tokenizers import NullTokenizer, build_tokenizer, train_sentencepiece

PROSE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump? Sphinx of black quartz, judge my vow.\n"
    "Über naïve cafés serve crème brûlée; 東京 is far away. Numbers like 3.14 and 2,718 appear too. "
)


def run(*argv):
    parser = add_preprocess_arguments(argparse.ArgumentParser())
    return run_preprocess(parser.parse_args([str(a) for a in argv]))


def write_jsonl(path, records, *, raw_lines=()):
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        for line in raw_lines:
            f.write(line)
    return str(path)


def read_bytes(prefix):
    with open(data_file(prefix), "rb") as b, open(index_file(prefix), "rb") as i:
        return b.read(), i.read()


def build_directly(prefix, tokenizer, texts, append_eod):
    """What Megatron's tool writes: one document per text, eod only after a non-empty one."""
    with IndexedDatasetBuilder(str(prefix), optimal_dtype(tokenizer.vocab_size)) as builder:
        for text in texts:
            sentences = text if isinstance(text, list) else [text]
            ids = [tokenizer.tokenize(s) for s in sentences]
            ids = [i for i in ids if i]
            if ids and append_eod:
                ids[-1] = ids[-1] + [tokenizer.eod]
            builder.add_document([t for i in ids for t in i], [len(i) for i in ids])
        builder.finalize()
    return read_bytes(str(prefix))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    directory = tmp_path_factory.mktemp("sp")
    corpus = directory / "corpus.txt"
    corpus.write_text((PROSE + "\n") * 40, encoding="utf-8")
    return train_sentencepiece(str(corpus), str(directory / "tiny"), 400)


@pytest.fixture
def small_batches(monkeypatch):
    """Several batches even for a tiny input, so workers really share the work."""
    monkeypatch.setattr(preprocess, "BATCH_LINES", 3)


NULL_TEXTS = ["1 2 3", "", "4", "   ", "5 6 7 8 9 10", "0", "11 12", "", "99 98 97"]


@pytest.mark.parametrize("append_eod", [False, True])
def test_null_tokenizer_matches_direct_build_for_1_and_2_workers(tmp_path, small_batches, append_eod):
    records = [{"text": t, "other": " ".join(reversed(t.split()))} for t in NULL_TEXTS]
    source = write_jsonl(tmp_path / "in.jsonl", records)
    tokenizer = NullTokenizer(100)
    eod = ["--append-eod"] if append_eod else []
    for workers in (1, 2):
        assert run("--input", source, "--output-prefix", tmp_path / f"w{workers}", "--tokenizer-type",
                   "NullTokenizer", "--vocab-size", 100, "--json-keys", "text", "other",
                   "--workers", workers, *eod) == 0
    for key in ("text", "other"):
        expected = build_directly(tmp_path / f"direct_{key}", tokenizer, [r[key] for r in records], append_eod)
        assert read_bytes(str(tmp_path / f"w1_{key}_document")) == expected
        assert read_bytes(str(tmp_path / f"w2_{key}_document")) == expected
    dataset = IndexedDataset(str(tmp_path / "w1_text_document"))
    assert dataset.dtype == np.uint16
    assert dataset.num_documents == len(NULL_TEXTS)
    assert dataset.document_indices.tolist()[:4] == [0, 1, 1, 2]  # empty texts are empty documents
    assert dataset[0].tolist() == ([1, 2, 3, 100] if append_eod else [1, 2, 3])


def test_sentencepiece_matches_direct_build(tmp_path, small_batches, sp_model):
    texts = [PROSE, "", "Hello world.", PROSE * 3, "  ", "x", "Ünïcødé ✓ 🙂 <EOD> literal"]
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts])
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    for workers in (1, 2):
        run("--input", source, "--output-prefix", tmp_path / f"w{workers}", "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--append-eod", "--workers", workers)
    expected = build_directly(tmp_path / "direct", tokenizer, texts, append_eod=True)
    assert read_bytes(str(tmp_path / "w1_text_document")) == expected
    assert read_bytes(str(tmp_path / "w2_text_document")) == expected
    dataset = IndexedDataset(str(tmp_path / "w1_text_document"))
    assert tokenizer.detokenize(dataset[0][:-1]) == PROSE
    assert dataset[0][-1] == tokenizer.eod


def test_large_vocab_writes_int32(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "69999 0 65536"}, {"text": "1"}])
    run("--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", 70000, "--append-eod")
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset.dtype == np.int32
    assert [dataset[i].tolist() for i in range(2)] == [[69999, 0, 65536, 70000], [1, 70000]]


def test_list_values_are_sentences_and_blank_lines_hold_no_document(tmp_path):
    records = [{"text": ["1 2", "", "3"]}, {"text": []}, {"text": ["", " "]}, {"text": "4 5"}]
    source = write_jsonl(tmp_path / "in.jsonl", records[:2], raw_lines=["\n", "  \r\n"])
    with open(source, "a") as f:
        f.write(json.dumps(records[2]) + "\r\n" + json.dumps(records[3]))  # CRLF; no newline at the end
    run("--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", 10, "--append-eod")
    expected = build_directly(tmp_path / "direct", NullTokenizer(10), [r["text"] for r in records], True)
    assert read_bytes(str(tmp_path / "out_text_document")) == expected
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert dataset.document_indices.tolist() == [0, 2, 2, 2, 3]
    assert [dataset[i].tolist() for i in range(3)] == [[1, 2], [3, 10], [4, 5, 10]]


def test_split_sentences(tmp_path, sp_model):
    text = "Dr. Smith went home. He slept!  Then?\nThe end"
    assert split_sentences(text) == ["Dr. Smith went home.", "He slept!", "Then?", "The end"]
    assert split_sentences(text, keep_newlines=True) == ["Dr. Smith went home. ", "He slept!  ", "Then?\n",
                                                         "The end"]
    assert split_sentences("") == [] and split_sentences("  ") == []
    assert split_sentences('He said "Stop." Then J. R. left.') == ['He said "Stop."', "Then J. R. left."]

    source = write_jsonl(tmp_path / "in.jsonl", [{"text": text}, {"text": ""}, {"text": PROSE}])
    for workers in (1, 2):
        run("--input", source, "--output-prefix", tmp_path / f"w{workers}", "--tokenizer-type",
            "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--split-sentences", "--append-eod",
            "--workers", workers)
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model)
    expected = build_directly(tmp_path / "direct", tokenizer, [split_sentences(text), [], split_sentences(PROSE)],
                              True)
    assert read_bytes(str(tmp_path / "w1_text_sentence")) == expected
    assert read_bytes(str(tmp_path / "w2_text_sentence")) == expected
    dataset = IndexedDataset(str(tmp_path / "w1_text_sentence"))
    assert dataset.document_indices.tolist()[:3] == [0, 4, 4]
    assert tokenizer.detokenize(dataset[1]) == "He slept!"


def test_gzip_input(tmp_path):
    with gzip.open(tmp_path / "in.jsonl.gz", "wt") as f:
        f.write('{"text": "1 2"}\n{"text": "3"}\n')
    run("--input", tmp_path / "in.jsonl.gz", "--output-prefix", tmp_path / "out", "--tokenizer-type",
        "NullTokenizer", "--vocab-size", 10)
    dataset = IndexedDataset(str(tmp_path / "out_text_document"))
    assert [dataset[i].tolist() for i in range(2)] == [[1, 2], [3]]


def test_progress_lines_and_rates(tmp_path, capsys, small_batches):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}] * 10)
    run("--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", 10, "--log-interval", 4)
    captured = capsys.readouterr()
    assert [line.split(" (")[0] for line in captured.err.splitlines()] == [
        "Processed 6 documents", "Processed 9 documents"]  # batches of 3 lines: 3, 6, 9, 10
    assert "docs/s" in captured.out and "tokens/s" in captured.out and "10 documents, 20 tokens" in captured.out


# --- errors: one line naming the file (and line), and no output ------------------------------------


BAD_LINES = {
    "not json": ('{"text": "1 2"', "not JSON"),
    "no key": ('{"body": "1 2"}', "no key 'text'"),
    "not a string": ('{"text": 12}', "holds a JSON int"),
    "list of non-strings": ('{"text": ["1", 2]}', "holds a JSON list"),
    "not an object": ('["1 2"]', "not an object"),
    "not utf-8": (b'{"text": "caf\xe9"}', "not UTF-8"),
    "id outside vocab": ('{"text": "1 200"}', "token id 200 is outside the vocab"),
}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_bad_line_gives_one_line_naming_file_and_line(tmp_path, small_batches, case, workers):
    bad, words = BAD_LINES[case]
    source = tmp_path / "in.jsonl"
    good = b'{"text": "1 2 3"}\n'
    source.write_bytes(good * 4 + (bad if isinstance(bad, bytes) else bad.encode()) + b"\n" + good * 4)
    (tmp_path / "out").mkdir()
    old = tmp_path / "out" / "data_text_document"
    with IndexedDatasetBuilder(str(old), np.uint16) as builder:  # an older dataset under the same prefix
        builder.add_document([7, 7], [2])
        builder.finalize()
    before = read_bytes(str(old))
    with pytest.raises(DataError) as caught:
        run("--input", source, "--output-prefix", tmp_path / "out" / "data", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", 100, "--workers", workers)
    message = str(caught.value)
    assert "\n" not in message
    assert f"{source}:5:" in message and words in message
    assert caught.value.__cause__ is None
    assert sorted(os.listdir(tmp_path / "out")) == ["data_text_document.bin", "data_text_document.idx"]
    assert read_bytes(str(old)) == before


@pytest.mark.parametrize("problem", ["missing input", "missing output directory", "missing model", "no eod"])
def test_setup_errors_come_before_any_output(tmp_path, monkeypatch, problem):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "1"}])
    argv = {"--input": source, "--output-prefix": tmp_path / "out", "--tokenizer-type": "NullTokenizer",
            "--vocab-size": "10"}
    expected = {"missing input": str(tmp_path / "absent.jsonl"), "missing output directory": str(tmp_path / "no"),
                "missing model": str(tmp_path / "absent.model"), "no eod": "no end-of-document token"}[problem]
    if problem == "missing input":
        argv["--input"] = tmp_path / "absent.jsonl"
    elif problem == "missing output directory":
        argv["--output-prefix"] = tmp_path / "no" / "out"
    elif problem == "missing model":
        argv.update({"--tokenizer-type": "SentencePieceTokenizer", "--tokenizer-model": tmp_path / "absent.model"})
    flags = [str(x) for pair in argv.items() for x in pair]
    if problem == "no eod":
        flags.append("--append-eod")
        tokenizer = NullTokenizer(10)
        tokenizer.eod = None
        monkeypatch.setattr(preprocess, "build_tokenizer", lambda *a, **k: tokenizer)
    with pytest.raises(DataError) as caught:
        run(*flags)
    assert "\n" not in str(caught.value) and expected in str(caught.value)
    assert os.listdir(tmp_path) == ["in.jsonl"]


class _DyingTokenizer(NullTokenizer):
    """Kills the worker process it runs in: the run must fail with one line, not hang."""

    def __init__(self, main_pid):
        super().__init__(10)
        self.main_pid = main_pid

    def tokenize_batch(self, texts):
        if os.getpid() != self.main_pid:
            os._exit(3)
        return super().tokenize_batch(texts)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("failure", ["worker dies", "worker cannot build tokenizer"])
def test_worker_failures_propagate_without_hanging(tmp_path, monkeypatch, small_batches, failure):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}] * 20)
    main_pid = os.getpid()

    def fake_build(*args, **kwargs):
        if failure == "worker dies":
            return _DyingTokenizer(main_pid)
        if os.getpid() != main_pid:
            raise RuntimeError("tokenizer file vanished")
        return NullTokenizer(10)

    monkeypatch.setattr(preprocess, "build_tokenizer", fake_build)
    with pytest.raises(DataError) as caught:
        run("--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", 10, "--workers", 2)
    message = str(caught.value)
    assert "\n" not in message
    assert ("worker died" in message) if failure == "worker dies" else ("tokenizer file vanished" in message)
    assert os.listdir(tmp_path) == ["in.jsonl"]


class _FailingTokenizer(NullTokenizer):
    def tokenize_batch(self, texts):
        if any("7" in t for t in texts):
            raise RuntimeError("boom")
        return super().tokenize_batch(texts)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_tokenizer_failure_names_the_lines(tmp_path, monkeypatch, small_batches, workers):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": str(i)} for i in range(10)])
    monkeypatch.setattr(preprocess, "build_tokenizer", lambda *a, **k: _FailingTokenizer(10))
    with pytest.raises(DataError) as caught:
        run("--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "NullTokenizer",
            "--vocab-size", 10, "--workers", workers)
    assert str(caught.value) == f"{source}:7-9: encoding failed: RuntimeError: boom"
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_batches_in_flight_are_bounded():
    """Memory stays bounded: the reader runs at most `window` batches ahead of the writer."""
    read = []

    def batches():
        for i in range(20):
            read.append(i)
            yield i + 1, [b"x"]

    class Done:
        def __init__(self, value):
            self.value = value

        def result(self):
            return self.value

    class Pool:
        def submit(self, fn, batch):
            return Done(batch[0])

    for written, first in enumerate(preprocess._ordered(Pool(), batches(), 3, "in.jsonl")):
        assert first == written + 1  # in input order
        assert len(read) <= written + 3


def test_help_lists_megatron_flags():
    text = add_preprocess_arguments(argparse.ArgumentParser()).format_help()
    for flag in ("--input", "--json-keys", "--split-sentences", "--keep-newlines", "--tokenizer-type",
                 "--tokenizer-model", "--vocab-file", "--merge-file", "--vocab-size", "--vocab-extra-ids",
                 "--append-eod", "--output-prefix", "--workers", "--log-interval"):
        assert flag in text


def test_vocab_extra_ids_reach_the_tokenizer(tmp_path, monkeypatch, sp_model):
    seen = []
    real = preprocess.build_tokenizer

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(preprocess, "build_tokenizer", spy)
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "Hello world."}])
    run("--input", source, "--output-prefix", tmp_path / "out", "--tokenizer-type", "SentencePieceTokenizer",
        "--tokenizer-model", sp_model, "--vocab-extra-ids", 3)
    assert seen == [dict(tokenizer_model=sp_model, vocab_file=None, merge_file=None, vocab_size=None,
                         vocab_extra_ids=3)]
    tokenizer = build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model, vocab_extra_ids=3)
    expected = build_directly(tmp_path / "direct", tokenizer, ["Hello world."], append_eod=False)
    assert read_bytes(str(tmp_path / "out_text_document")) == expected


def test_megalith_preprocess_reproduces_the_default_corpus_dataset(tmp_path):
    """Through the command line: the corpus's JSON lines, its tokenizer and --append-eod give back
    the corpus's own .bin/.idx (written by the builder directly), byte for byte."""
    from megalith.cli import main
    from megalith.data.corpus import build_default_corpus

    corpus = build_default_corpus(str(tmp_path / "corpus"))
    prefix = tmp_path / "out"
    assert main(["preprocess", "--input", corpus.jsonl, "--output-prefix", str(prefix), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", corpus.tokenizer_model, "--append-eod",
                 "--workers", "2"]) == 0
    for suffix in (".bin", ".idx"):
        assert (tmp_path / f"out_text_document{suffix}").read_bytes() == open(corpus.data_prefix + suffix, "rb").read()
