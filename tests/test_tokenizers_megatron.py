"""Megatron's other tokenizer types (BertWordPieceLowerCase/Case, Llama2Tokenizer, GPTSentencePieceTokenizer),
the GPT-2 default for --vocab-file + --merge-file, and BERT/T5 data built by `megalith preprocess` with
WordPiece, as Megatron users build it. Every vocab is made here; nothing is downloaded."""

import argparse
import json

import numpy as np
import pytest
import sentencepiece
import torch
from tokenizers import BertWordPieceTokenizer as HFWordPieceTrainer, ByteLevelBPETokenizer

from megalith.config.arguments import parse_pretrain_args
from megalith.data import bert_dataset, masking, t5_dataset
from megalith.data.corpus import build_default_corpus
from megalith.data.errors import DataError
from megalith.errors import ConfigError
from megalith.data.indexed import IndexedDataset
from megalith.data.preprocess import add_preprocess_arguments, run_preprocess, split_sentences
from megalith.data.tokenizers import (TOKENIZER_TYPES, BertWordPieceTokenizer, GPTSentencePieceTokenizer,
                                      HuggingFaceTokenizer, Llama2Tokenizer, build_tokenizer, train_sentencepiece)
from megalith.training.data import TRAIN_SPLIT, DatasetBatches, run_tokenizer

# A BERT vocab.txt: id = line number (Megatron's load_vocab).
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "quick", "brown", "fox", "jump", "##s", "##ed",
         "over", "lazy", "dog", ".", ",", "!", "hello", "Hello", "cafe", "Caf", "##é", "[", "]", "mask", "MASK"]
ID = {token: i for i, token in enumerate(VOCAB)}
SENTENCE = "Hello, the quick brown fox jumps over the lazy dog!"
BERT_MODEL = ["--model", "bert", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
              "--seq-length", "32"]
T5_MODEL = ["--model", "t5", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--encoder-seq-length", "32", "--decoder-seq-length", "16"]
RUN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "2", "--eval-interval", "2",
       "--eval-iters", "1", "--split", "90,10,0", "--log-interval", "1", "--no-log-progress-bar"]


def preprocess(*argv):
    return run_preprocess(add_preprocess_arguments(argparse.ArgumentParser()).parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def vocab_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "vocab.txt"
    path.write_text("".join(token + "\n" for token in VOCAB), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_default_corpus(str(tmp_path_factory.mktemp("corpus") / "corpus"))


@pytest.fixture(scope="module")
def corpus_vocab(corpus, tmp_path_factory):
    """A lower-cased WordPiece vocab.txt trained on the corpus with Hugging Face tokenizers."""
    with open(corpus.jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f]
    trainer = HFWordPieceTrainer(lowercase=True)
    trainer.train_from_iterator(texts, vocab_size=1200, min_frequency=2, show_progress=False,
                                special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    directory = tmp_path_factory.mktemp("corpus-vocab")
    return trainer.save_model(str(directory))[0]


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory, corpus):
    with open(corpus.jsonl, encoding="utf-8") as f:
        text = "\n".join(json.loads(line)["text"] for line in list(f)[:40])
    path = tmp_path_factory.mktemp("sp") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return train_sentencepiece(str(path), str(path.parent / "m"), 500)


# --- BERT WordPiece --------------------------------------------------------------------------


def test_wordpiece_lower_case_ids_and_specials_are_megatrons(vocab_file):
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=vocab_file)
    assert isinstance(tokenizer, BertWordPieceTokenizer) and tokenizer.name == "BertWordPieceLowerCase"
    words = ["hello", ",", "the", "quick", "brown", "fox", "jump", "##s", "over", "the", "lazy", "dog", "!"]
    assert tokenizer.tokenize(SENTENCE) == [ID[w] for w in words]
    # Megatron's decode: pieces joined by spaces, '##' glued; lower-casing and splits stay.
    assert tokenizer.detokenize(tokenizer.tokenize(SENTENCE)) == "hello , the quick brown fox jumps over the lazy dog !"
    # cls/sep/pad/mask from the vocab; [BOS] and [EOS] appended after it; eod is eos.
    n = len(VOCAB)
    assert (tokenizer.cls, tokenizer.sep, tokenizer.pad, tokenizer.mask) == (2, 3, 0, 4)
    assert (tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.vocab_size) == (n, n + 1, n + 1, n + 2)
    assert tokenizer.inv_vocab[n] == "[BOS]" and tokenizer.vocab["[EOS]"] == n + 1
    assert tokenizer.additional_special_tokens_ids == []
    # Accents stripped when lower-casing; special tokens in text are split like other text; unknown words [UNK].
    assert tokenizer.tokenize("Café [MASK] jumped zebra") == [ID["cafe"], ID["["], ID["mask"], ID["]"], ID["jump"],
                                                               ID["##ed"], ID["[UNK]"]]
    assert tokenizer.tokenize_batch([SENTENCE, "", "Dog."]) == [tokenizer.tokenize(SENTENCE), [],
                                                                [ID["dog"], ID["."]]]


def test_wordpiece_case_keeps_case_and_accents(vocab_file):
    tokenizer = build_tokenizer("BertWordPieceCase", vocab_file=vocab_file)
    assert tokenizer.name == "BertWordPieceCase"
    assert tokenizer.tokenize(SENTENCE)[0] == ID["Hello"]
    assert tokenizer.tokenize("Café [MASK]") == [ID["Caf"], ID["##é"], ID["["], ID["MASK"], ID["]"]]
    assert tokenizer.tokenize("cafe CAFE") == [ID["cafe"], ID["[UNK]"]]  # a word it cannot cover is [UNK]
    assert tokenizer.detokenize([ID["Caf"], ID["##é"], ID["dog"]]) == "Café dog"


def test_vocab_extra_ids_are_t5_sentinels_after_bos_and_eos(vocab_file, tmp_path):
    tokenizer = build_tokenizer("BertWordPieceCase", vocab_file=vocab_file, vocab_extra_ids=3)
    n = len(VOCAB)
    assert tokenizer.additional_special_tokens_ids == [n + 2, n + 3, n + 4]
    assert [tokenizer.inv_vocab[i] for i in (n + 2, n + 4)] == ["<extra_id_0>", "<extra_id_2>"]
    assert tokenizer.vocab_size == n + 5
    assert tokenizer.tokenize("<extra_id_0>") != [n + 2]  # as in Megatron: text never maps to a sentinel
    # Tokens the vocab already has keep their ids (Megatron's add_token).
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB + ["[EOS]", "<extra_id_1>"]) + "\n", encoding="utf-8")
    again = BertWordPieceTokenizer(str(path), lower_case=False, vocab_extra_ids=2)
    assert (again.eos, again.bos) == (n, n + 2)
    assert again.additional_special_tokens_ids == [n + 3, n + 1] and again.vocab_size == n + 4


def test_wordpiece_feeds_bert_and_t5_samples(vocab_file):
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=vocab_file, vocab_extra_ids=8)
    assert bert_dataset.check_tokenizer(tokenizer) == (2, 3, 4, 0)
    bos, eos, pad, sentinels = t5_dataset.check_tokenizer(tokenizer, 16, 8)
    assert (bos, eos, pad) == (tokenizer.bos, tokenizer.eos, 0) and len(sentinels) == 8
    starts = masking.word_start_table(masking.word_start_from_tokenizer(tokenizer), tokenizer.vocab_size)
    assert not starts[ID["##s"]] and not starts[ID["##é"]] and starts[ID["jump"]] and starts[ID["dog"]]
    specials = set(masking.special_token_ids(tokenizer).tolist())
    assert {0, 2, 3, 4, tokenizer.bos, tokenizer.eos} <= specials  # never masked nor drawn as replacements


@pytest.mark.parametrize("lower_case", [True, False])
def test_wordpiece_matches_berts_original_python_tokenizer(corpus, corpus_vocab, lower_case):
    """The same ids as BERT's original BasicTokenizer + WordpieceTokenizer (Megatron's FullTokenizer;
    here transformers' pure-Python copy) on the corpus and on text that exercises every rule."""
    legacy = pytest.importorskip("transformers.models.bert.tokenization_bert_legacy")
    name = "BertWordPieceLowerCase" if lower_case else "BertWordPieceCase"
    tokenizer = build_tokenizer(name, vocab_file=corpus_vocab)
    basic = legacy.BasicTokenizer(do_lower_case=lower_case)
    pieces = legacy.WordpieceTokenizer(vocab=tokenizer.vocab, unk_token="[UNK]", max_input_chars_per_word=200)
    with open(corpus.jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in list(f)[:30]]
    texts += ["Naïve CAFÉ déjà-vu, 東京タワー!", "tabs\tand\x00control\x07chars\ufffd", "[CLS] x [SEP] <extra_id_0>",
              "a" * 199 + " " + "b" * 201, "print(f'{x!r}') # 3.14e-10 -> ~$5", "Ünïcödé\u3000spaces\u00a0here"]
    for text in texts:
        expected = [tokenizer.vocab[p] for w in basic.tokenize(text) for p in pieces.tokenize(w)]
        assert tokenizer.tokenize(text) == expected, text[:60]
        tokens = [tokenizer.inv_vocab[i] for i in expected]  # Megatron's decode: convert_tokens_to_string
        assert tokenizer.detokenize(expected) == " ".join(tokens).replace(" ##", "").strip()


@pytest.mark.parametrize("lines, message", [
    (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "dog"], "no [MASK] in the vocab"),
    (VOCAB + ["dog"], "token 'dog' is already on line"),
])
def test_a_bad_wordpiece_vocab_is_one_line(tmp_path, lines, message):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as error:
        build_tokenizer("BertWordPieceLowerCase", vocab_file=str(path))
    assert message in str(error.value) and "--vocab-file" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(DataError, match="pass --vocab-file PATH"):
        build_tokenizer("BertWordPieceCase")


# --- SentencePiece: Llama2Tokenizer, GPTSentencePieceTokenizer -------------------------------


def test_llama2_tokenizer_puts_bos_first_and_ends_documents_with_eos(sp_model):
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    tokenizer = build_tokenizer("Llama2Tokenizer", tokenizer_model=sp_model, vocab_extra_ids=5)
    assert isinstance(tokenizer, Llama2Tokenizer) and tokenizer.name == "Llama2Tokenizer"
    text = "The quick brown fox.\nSecond line"
    assert tokenizer.tokenize(text) == [sp.bos_id()] + sp.encode(text)
    assert tokenizer.tokenize_batch([text, ""]) == [tokenizer.tokenize(text), [sp.bos_id()]]
    assert tokenizer.detokenize(tokenizer.tokenize(text)) == text
    # The model's own ids, nothing appended; no cls/sep/mask, no sentinels (Megatron's -1 / None).
    assert tokenizer.vocab_size == sp.get_piece_size()
    assert (tokenizer.bos, tokenizer.eos, tokenizer.eod, tokenizer.pad) == (sp.bos_id(), sp.eos_id(), sp.eos_id(),
                                                                            sp.pad_id())
    assert (tokenizer.cls, tokenizer.sep, tokenizer.mask) == (None, None, None)
    assert tokenizer.additional_special_tokens_ids == []
    gpt = build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=sp_model)
    assert isinstance(gpt, GPTSentencePieceTokenizer) and gpt.tokenize(text) == sp.encode(text)
    assert gpt.special_ids() == tokenizer.special_ids()


def test_llama2_tokenizer_needs_a_bos_piece(tmp_path, corpus):
    prefix = str(tmp_path / "nobos")
    with open(corpus.jsonl, encoding="utf-8") as f:
        lines = [line for record in list(f)[:20] for line in json.loads(record)["text"].splitlines() if line]
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=prefix, vocab_size=200,
                                             bos_id=-1, minloglevel=2)
    with pytest.raises(DataError, match="no bos piece") as error:
        build_tokenizer("Llama2Tokenizer", tokenizer_model=prefix + ".model")
    assert "\n" not in str(error.value)
    assert build_tokenizer("GPTSentencePieceTokenizer", tokenizer_model=prefix + ".model").bos is None


# --- Hugging Face: local only -----------------------------------------------------------------


def test_huggingface_takes_a_tokenizer_json_and_never_downloads(vocab_file, tmp_path):
    trained = HFWordPieceTrainer(vocab_file, lowercase=True)
    trained.save(str(tmp_path / "tokenizer.json"))
    by_file = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path / "tokenizer.json"))
    by_dir = build_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(tmp_path))
    assert isinstance(by_file, HuggingFaceTokenizer) and by_file.tokenize(SENTENCE) == by_dir.tokenize(SENTENCE)
    with pytest.raises(DataError, match="nothing is downloaded") as error:
        build_tokenizer("HuggingFaceTokenizer", tokenizer_model="meta-llama/Llama-2-7b-hf")
    assert "save_pretrained" in str(error.value)


# --- GPT-2 default with --vocab-file and --merge-file ---------------------------------------


def test_vocab_and_merge_files_without_a_type_mean_gpt2_bpe(corpus, tmp_path):
    """Megatron's pretrain_gpt.py defaults --tokenizer-type to GPT2BPETokenizer (its GPT-3 script
    passes only --vocab-file and --merge-file)."""
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    with open(corpus.jsonl, encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in list(f)[:20]]
    bpe.train_from_iterator(texts, vocab_size=400, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    vocab, merges = bpe.save_model(str(tmp_path))
    source = tmp_path / "docs.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    preprocess("--input", source, "--output-prefix", tmp_path / "gpt", "--tokenizer-type", "GPT2BPETokenizer",
               "--vocab-file", vocab, "--merge-file", merges, "--append-eod")
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
             "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "2", "--data-path",
             str(tmp_path / "gpt_text_document"), "--data-cache-path", str(tmp_path / "cache")]
    config = parse_pretrain_args(flags + ["--vocab-file", vocab, "--merge-file", merges], 1)
    assert config.data.tokenizer_type == "GPT2BPETokenizer"
    assert config.model.vocab_size == build_tokenizer("GPT2BPETokenizer", vocab_file=vocab,
                                                      merge_file=merges).vocab_size
    with pytest.raises(DataError, match="pass --merge-file PATH"):  # GPT-2 BPE needs both files
        parse_pretrain_args(flags + ["--vocab-file", vocab], 1)
    with pytest.raises(ConfigError, match="--data-path needs --tokenizer-type"):  # no file: no default
        parse_pretrain_args(flags, 1)
    assert "BertWordPieceLowerCase" in TOKENIZER_TYPES and "Llama2Tokenizer" in TOKENIZER_TYPES


# --- preprocess: BERT and T5 data from WordPiece ---------------------------------------------


@pytest.fixture(scope="module")
def bert_data(corpus, corpus_vocab, tmp_path_factory):
    prefix = tmp_path_factory.mktemp("bert-data") / "wiki"
    preprocess("--input", corpus.jsonl, "--json-keys", "text", "--split-sentences", "--tokenizer-type",
               "BertWordPieceLowerCase", "--vocab-file", corpus_vocab, "--output-prefix", prefix, "--workers", 2,
               "--partitions", 2, "--keep-sequential-samples", "--lang", "english", "--log-interval", 100)
    return f"{prefix}_text_sentence"


def test_preprocess_splits_sentences_with_wordpiece_as_megatron(corpus, corpus_vocab, bert_data):
    tokenizer = build_tokenizer("BertWordPieceLowerCase", vocab_file=corpus_vocab)
    dataset = IndexedDataset(bert_data)
    with open(corpus.jsonl, encoding="utf-8") as f:
        first = json.loads(f.readline())["text"]
    expected = [ids for ids in (tokenizer.tokenize(s) for s in split_sentences(first)) if ids]
    start, end = dataset.document_indices[0], dataset.document_indices[1]
    assert [dataset[i].tolist() for i in range(start, end)] == expected  # one sequence per sentence, no eod
    assert len(dataset.document_indices) - 1 == corpus.documents and dataset[0].dtype == np.uint16


def test_t5_reads_the_wordpiece_sentences_with_sentinels(bert_data, corpus_vocab, tmp_path):
    flags = T5_MODEL + RUN + ["--data-path", bert_data, "--tokenizer-type", "BertWordPieceCase", "--vocab-file",
                              corpus_vocab, "--vocab-extra-ids", "100", "--data-cache-path", str(tmp_path)]
    config = parse_pretrain_args(flags, 1)
    tokenizer = run_tokenizer(config)
    assert config.model.vocab_size == tokenizer.vocab_size == len(open(corpus_vocab).read().split()) + 102
    train = DatasetBatches(config, tokenizer, torch.device("cpu")).datasets[TRAIN_SPLIT]
    samples = [train[i] for i in range(4)]
    sentinels = tokenizer.additional_special_tokens_ids
    for sample in samples:  # spans replaced by <extra_id_0>, <extra_id_1>, ... in order; [BOS] starts the decoder
        used = [t for t in sample["encoder_input_ids"].tolist() if t in sentinels]
        assert used and used == sentinels[:len(used)]
        assert sample["decoder_input_ids"][0] == tokenizer.bos
        assert tokenizer.eos in sample["labels"].tolist()


@pytest.mark.slow
def test_bert_pretrains_two_iterations_on_preprocessed_wordpiece_data(rank_pools, bert_data, corpus_vocab, tmp_path):
    from megalith.testing import pretrain_on_rank

    log = tmp_path / "bert.jsonl"
    # As Megatron's BERT script: --vocab-file alone (pretrain_bert.py defaults to BertWordPieceLowerCase).
    argv = BERT_MODEL + RUN + ["--data-path", bert_data, "--vocab-file", corpus_vocab, "--data-cache-path",
                               str(tmp_path / "cache"), "--log-json", str(log)]
    assert parse_pretrain_args(argv, 1).data.tokenizer_type == "BertWordPieceLowerCase"
    rank_pools(1).run(pretrain_on_rank, argv, 1)
    train = [r for r in map(json.loads, log.read_text().splitlines()) if "consumed_samples" in r]
    assert [r["consumed_samples"] for r in train] == [4, 8]
    assert all(np.isfinite(r["lm_loss"]) and r["lm_loss"] > 0 for r in train)


def test_preprocess_accepts_megatrons_flags(tmp_path, vocab_file, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text(json.dumps({"text": SENTENCE + " The dog."}) + "\n")
    common = ["--input", source, "--tokenizer-type", "BertWordPieceCase", "--vocab-file", vocab_file]
    preprocess(*common, "--output-prefix", tmp_path / "plain")
    assert "--split-sentences" in capsys.readouterr().err  # Megatron's tool asks too
    preprocess(*common, "--output-prefix", tmp_path / "tuned", "--partitions", 4, "--keep-sequential-samples",
               "--lang", "english", "--dataset-impl", "mmap", "--workers", 1, "--log-interval", 1)
    for suffix in (".bin", ".idx"):  # the knobs change nothing
        assert (tmp_path / f"plain_text_document{suffix}").read_bytes() == \
            (tmp_path / f"tuned_text_document{suffix}").read_bytes()
    tokenizer = build_tokenizer("BertWordPieceCase", vocab_file=vocab_file)
    assert IndexedDataset(str(tmp_path / "plain_text_document"))[0].tolist() == \
        tokenizer.tokenize(SENTENCE + " The dog.")
