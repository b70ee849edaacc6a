"""Tokenizers: round trips, special ids, sentinels, Megatron's NullTokenizer, build errors, training.

Every tokenizer file is made here from Python's own documentation; nothing is downloaded.
"""

import argparse
import hashlib
import json
import os

import pytest
import sentencepiece
from pydoc_data.topics import topics
from tokenizers import ByteLevelBPETokenizer, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, \
    processors, trainers

from megalith.data.errors import DataError
from megalith.data.tokenizers import (
    TOKENIZER_TYPES, GPT2BPETokenizer, HuggingFaceTokenizer, NullTokenizer, SentencePieceTokenizer,
    add_train_tokenizer_arguments, build_tokenizer, run_train_tokenizer, train_sentencepiece)

TEXTS = [
    "Hello world.",
    "  leading and trailing spaces,   runs of them  ",
    "line one\nline two\n\n\tindented with a tab\n",
    "unicode: naïve café — “quotes” 日本語 🙂",
    "specials written out: <EOD> <s> </s> <pad> <MASK> <|endoftext|>",
    "",
    "x",
]
SP_VOCAB = 640


def _topic_texts(count=25):
    return [topics[name] for name in sorted(topics)[:count]]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "docs.txt"
    path.write_text("\n".join(_topic_texts()), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def sp_model(text_file, tmp_path_factory):
    return train_sentencepiece(text_file, str(tmp_path_factory.mktemp("sp") / "m"), SP_VOCAB)


@pytest.fixture(scope="module")
def plain_sp_model(text_file, tmp_path_factory):
    """A model trained with SentencePiece's defaults: none of Megatron's special tokens, no pad."""
    prefix = str(tmp_path_factory.mktemp("plain") / "plain")
    sentencepiece.SentencePieceTrainer.train(input=text_file, model_prefix=prefix, vocab_size=300,
                                             model_type="bpe", minloglevel=2)
    return prefix + ".model"


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(_topic_texts(10), vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    vocab, merges = bpe.save_model(str(directory))
    return vocab, merges


def _hf_tokenizer(sentinels=3):
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<mask>"] + [f"<extra_id_{i}>" for i in range(sentinels)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_topic_texts(10), trainer)
    return tokenizer


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf")
    tokenizer = _hf_tokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": {"content": "</s>", "__type": "AddedToken"},
              "pad_token": "<pad>", "mask_token": "<mask>"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return str(directory)


def _check_special_ids(tokenizer, expect):
    ids = tokenizer.special_ids()
    assert set(ids) == set(expect)
    assert all(0 <= i < tokenizer.vocab_size for i in ids.values())
    assert all(0 <= i < tokenizer.vocab_size for i in tokenizer.additional_special_tokens_ids)


# --- SentencePiece --------------------------------------------------------------------------


def test_sentencepiece_round_trips_any_text(sp_model):
    tokenizer = SentencePieceTokenizer(sp_model)
    for text in TEXTS + _topic_texts(3):
        ids = tokenizer.tokenize(text)
        assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.detokenize(ids) == text
    assert tokenizer.tokenize_batch(TEXTS) == [tokenizer.tokenize(t) for t in TEXTS]
    assert len(tokenizer.tokenize(topics["assert"])) < len(topics["assert"]) / 2  # it learned real merges


def test_sentencepiece_specials_are_in_vocab_of_a_trained_model(sp_model):
    tokenizer = SentencePieceTokenizer(sp_model)
    assert tokenizer.vocab_size == SP_VOCAB  # nothing appended
    _check_special_ids(tokenizer, ["eod", "pad", "mask", "cls", "sep", "bos", "eos"])
    assert len(set(tokenizer.special_ids().values())) == 7
    vocab = tokenizer.vocab
    assert (tokenizer.eod, tokenizer.cls, tokenizer.sep, tokenizer.mask) == \
        (vocab["<EOD>"], vocab["<CLS>"], vocab["<SEP>"], vocab["<MASK>"])
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad) == (vocab["<s>"], vocab["</s>"], vocab["<pad>"])
    assert tokenizer.tokenize("<EOD>")[-1] == tokenizer.eod
    assert tokenizer.eod in tokenizer.tokenize("end.<EOD>next")
    assert tokenizer.additional_special_tokens_ids == []


def test_sentencepiece_appends_missing_specials_and_sentinels(plain_sp_model):
    plain = SentencePieceTokenizer(plain_sp_model)
    # The default model has <unk>, <s>, </s> but no pad: <CLS> <SEP> <EOD> <MASK> <PAD> are appended.
    assert plain.vocab_size == 300 + 5
    assert [plain.cls, plain.sep, plain.eod, plain.mask, plain.pad] == list(range(300, 305))
    assert (plain.bos, plain.eos) == (1, 2)
    tokenizer = SentencePieceTokenizer(plain_sp_model, vocab_extra_ids=4)
    assert tokenizer.vocab_size == 300 + 5 + 4
    assert tokenizer.additional_special_tokens_ids == list(range(305, 309))
    _check_special_ids(tokenizer, ["eod", "pad", "mask", "cls", "sep", "bos", "eos"])
    assert len(set(tokenizer.special_ids().values()) | set(tokenizer.additional_special_tokens_ids)) == 7 + 4
    ids = tokenizer.tokenize("before<extra_id_2>after<EOD>")
    assert ids[-1] == tokenizer.eod and tokenizer.additional_special_tokens_ids[2] in ids
    assert tokenizer.detokenize(ids) == "before<extra_id_2>after<EOD>"
    assert tokenizer.inv_vocab[tokenizer.eod] == "<EOD>"


def test_sentencepiece_sentinels_follow_the_model(sp_model):
    tokenizer = SentencePieceTokenizer(sp_model, vocab_extra_ids=100)
    assert tokenizer.vocab_size == SP_VOCAB + 100
    assert tokenizer.additional_special_tokens_ids == list(range(SP_VOCAB, SP_VOCAB + 100))
    assert tokenizer.tokenize("<extra_id_2>") == [SP_VOCAB + 2]
    assert tokenizer.detokenize([SP_VOCAB + 99]) == "<extra_id_99>"


def test_sentencepiece_training_is_deterministic(text_file, tmp_path):
    first = train_sentencepiece(text_file, str(tmp_path / "a" / "one"), 450)
    second = train_sentencepiece([text_file], str(tmp_path / "b"), 450)
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()  # noqa: E731
    assert first.endswith("one.model") and os.path.isfile(first[:-len(".model")] + ".vocab")
    assert digest(first) == digest(second)
    assert SentencePieceTokenizer(first).vocab_size == 450


def test_sentencepiece_training_reads_json_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for text in _topic_texts(5):
            f.write(json.dumps({"body": text, "id": 1}) + "\n")
    model = train_sentencepiece([str(path)], str(tmp_path / "j"), 400, json_keys=["body"])
    tokenizer = SentencePieceTokenizer(model)
    assert tokenizer.vocab_size == 400
    assert tokenizer.detokenize(tokenizer.tokenize(topics["assert"])) == topics["assert"]
    with pytest.raises(DataError, match="no key 'text'") as error:
        train_sentencepiece([str(path)], str(tmp_path / "k"), 400)  # .jsonl: key "text" by default
    assert "\n" not in str(error.value)


def test_sentencepiece_training_errors(text_file, tmp_path):
    for vocab_size, fix in ((1_000_000, r"--vocab-size \d+ or less"), (100, r"--vocab-size \d+ or more")):
        with pytest.raises(DataError, match=fix) as error:
            train_sentencepiece(text_file, str(tmp_path / "m"), vocab_size)
        assert "\n" not in str(error.value)
    with pytest.raises(DataError, match="no such input file"):
        train_sentencepiece(str(tmp_path / "missing.txt"), str(tmp_path / "m"), 100)
    with pytest.raises(DataError, match="not a SentencePiece model"):
        SentencePieceTokenizer(text_file)


def test_train_tokenizer_command(text_file, tmp_path, capsys):
    parser = add_train_tokenizer_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--input", text_file, "--model-prefix", str(tmp_path / "cli"),
                              "--vocab-size", "420", "--model-type", "unigram"])
    assert run_train_tokenizer(args) == 0
    assert str(tmp_path / "cli.model") in capsys.readouterr().out
    tokenizer = SentencePieceTokenizer(str(tmp_path / "cli.model"))
    assert tokenizer.vocab_size == 420
    assert tokenizer.detokenize(tokenizer.tokenize(TEXTS[2])) == TEXTS[2]


# --- GPT-2 BPE ------------------------------------------------------------------------------


def test_gpt2_bpe_round_trips_and_eod(gpt2_files):
    vocab_file, merge_file = gpt2_files
    tokenizer = GPT2BPETokenizer(vocab_file, merge_file)
    vocab = json.load(open(vocab_file, encoding="utf-8"))
    assert tokenizer.vocab_size == len(vocab)
    assert tokenizer.eod == vocab["<|endoftext|>"]
    _check_special_ids(tokenizer, ["eod", "eos"])
    for text in TEXTS + _topic_texts(2):
        assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    # No prefix space: a leading word is not encoded as " word".
    assert tokenizer.detokenize(tokenizer.tokenize("word")[:1]).startswith("w")
    assert tokenizer.tokenize_batch(TEXTS) == [tokenizer.tokenize(t) for t in TEXTS]
    assert tokenizer.detokenize([tokenizer.eod]) == "<|endoftext|>"


def test_gpt2_bpe_missing_files(gpt2_files, tmp_path):
    vocab_file, merge_file = gpt2_files
    with pytest.raises(DataError, match="--merge-file"):
        GPT2BPETokenizer(vocab_file, str(tmp_path / "merges.txt"))
    with pytest.raises(DataError, match="--vocab-file"):
        GPT2BPETokenizer(str(tmp_path / "vocab.json"), merge_file)


# --- Hugging Face -----------------------------------------------------------------------------


def test_huggingface_tokenizer_reads_its_config(hf_dir):
    tokenizer = HuggingFaceTokenizer(hf_dir)
    hf = HFTokenizer.from_file(os.path.join(hf_dir, "tokenizer.json"))
    assert tokenizer.vocab_size == hf.get_vocab_size()
    assert (tokenizer.bos, tokenizer.eos, tokenizer.pad, tokenizer.mask) == \
        tuple(hf.token_to_id(t) for t in ("<s>", "</s>", "<pad>", "<mask>"))
    assert tokenizer.eod == tokenizer.eos and tokenizer.cls is None and tokenizer.sep is None
    _check_special_ids(tokenizer, ["eod", "eos", "bos", "pad", "mask"])
    assert tokenizer.additional_special_tokens_ids == [hf.token_to_id(f"<extra_id_{i}>") for i in range(3)]
    for text in TEXTS[:4]:
        ids = tokenizer.tokenize(text)
        assert ids[0] == tokenizer.bos  # the post-processor's BOS, as Megatron's HF tokenizer gives
        assert tokenizer.detokenize(ids[1:]) == text
    assert tokenizer.detokenize(tokenizer.tokenize("hi")) == "<s>hi"


def test_huggingface_tokenizer_without_config(tmp_path):
    _hf_tokenizer(sentinels=0).save(str(tmp_path / "tokenizer.json"))
    tokenizer = HuggingFaceTokenizer(str(tmp_path))
    assert tokenizer.special_ids() == {} and tokenizer.eod is None
    assert tokenizer.additional_special_tokens_ids == []
    assert tokenizer.detokenize(tokenizer.tokenize(TEXTS[3])) == TEXTS[3]
    # special_tokens_map.json wins over tokenizer_config.json; a token missing from the vocab is an error
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<s>"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "</s>"}))
    assert HuggingFaceTokenizer(str(tmp_path)).eod == HFTokenizer.from_file(
        str(tmp_path / "tokenizer.json")).token_to_id("</s>")
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<nope>"}))
    with pytest.raises(DataError, match="<nope>"):
        HuggingFaceTokenizer(str(tmp_path))


def test_huggingface_tokenizer_missing_files(tmp_path):
    with pytest.raises(DataError, match="no such tokenizer directory") as error:
        HuggingFaceTokenizer(str(tmp_path / "absent"))
    assert "--tokenizer-model" in str(error.value)
    with pytest.raises(DataError, match="tokenizer.json: missing"):
        HuggingFaceTokenizer(str(tmp_path))


# --- Null and build_tokenizer ----------------------------------------------------------------


def test_null_tokenizer_is_megatrons():
    tokenizer = NullTokenizer(1000)
    assert tokenizer.vocab_size == 1001 and tokenizer.eod == 1000
    assert tokenizer.tokenize("5 17  999\n3") == [5, 17, 999, 3]
    assert tokenizer.detokenize([5, 17, 999]) == "5 17 999"
    assert tokenizer.tokenize(tokenizer.detokenize([0, 1, 2])) == [0, 1, 2]
    assert tokenizer.special_ids() == {"eod": 1000}
    assert tokenizer.pad is None and tokenizer.additional_special_tokens_ids == []


def test_build_tokenizer_builds_each_type(sp_model, gpt2_files, hf_dir):
    built = {
        "SentencePieceTokenizer": build_tokenizer("SentencePieceTokenizer", tokenizer_model=sp_model,
                                                  vocab_extra_ids=2),
        "GPT2BPETokenizer": build_tokenizer("GPT2BPETokenizer", vocab_file=gpt2_files[0], merge_file=gpt2_files[1]),
        "HuggingFaceTokenizer": build_tokenizer("HuggingFaceTokenizer", tokenizer_model=hf_dir),
        "NullTokenizer": build_tokenizer("NullTokenizer", vocab_size=50),
    }
    assert set(built) <= set(TOKENIZER_TYPES)  # the other types: tests/test_tokenizers_megatron.py
    for name, tokenizer in built.items():
        assert tokenizer.name == name == type(tokenizer).__name__
        assert tokenizer.eod is not None and tokenizer.eod < tokenizer.vocab_size
    assert len(built["SentencePieceTokenizer"].additional_special_tokens_ids) == 2


@pytest.mark.parametrize("tokenizer_type, kwargs, flag", [
    ("SentencePieceTokenizer", {}, "--tokenizer-model"),
    ("GPT2BPETokenizer", {"merge_file": "m.txt"}, "--vocab-file"),
    ("GPT2BPETokenizer", {"vocab_file": "v.json"}, "--merge-file"),
    ("HuggingFaceTokenizer", {}, "--tokenizer-model"),
    ("NullTokenizer", {}, "--vocab-size"),
    ("BertWordPieceLowerCase", {}, "--vocab-file"),
    ("TikTokenizer", {}, "--tokenizer-type"),
    ("SentencePieceTokenizer", {"tokenizer_model": "/nonexistent/m.model"}, "--tokenizer-model"),
])
def test_build_tokenizer_errors_name_the_flag(tokenizer_type, kwargs, flag):
    with pytest.raises(DataError) as error:
        build_tokenizer(tokenizer_type, **kwargs)
    message = str(error.value)
    assert flag in message and "\n" not in message
