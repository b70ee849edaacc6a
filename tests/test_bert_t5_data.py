"""`megalith pretrain --model bert|t5 --data-path`: the samples each model reads (ModelSpec.dataset),
built per prefix and split and blended by the one builder, the same global batches whatever the
layout, resumable by consumed samples, cached, and clear errors for a tokenizer that lacks tokens."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from megalith.data import masking
from megalith.data.bert_dataset import BertDataset
from megalith.data.blended import BlendedDataset
from megalith.data.corpus import build_default_corpus
from megalith.data.errors import DataError
from megalith.data.gpt_dataset import default_cache_dir
from megalith.data.indexed import IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megalith.data.t5_dataset import T5Dataset
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS
from megalith.training import data as training_data
from megalith.config.arguments import parse_pretrain_args
from megalith.training.batch import BatchPlan
from megalith.training.data import (TRAIN_SPLIT, VALID_SPLIT, DatasetBatches, dataset_kind,
                                    run_tokenizer)

MODEL = {
    "bert": ["--model", "bert", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "32"],
    "t5": ["--model", "t5", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
           "--encoder-seq-length", "32", "--decoder-seq-length", "16", "--vocab-extra-ids", "100"],
}
RUN = ["--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "4", "--eval-interval", "2",
       "--eval-iters", "1", "--split", "90,10,0"]
LAYOUTS = {  # world size, flags
    "one process": (1, []),
    "dp4": (4, []),
    "tp2.pp2.dp2.sp": (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                           "--sequence-parallel"]),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_default_corpus(str(tmp_path_factory.mktemp("corpus") / "corpus"))


def config_for(kind, corpus, cache, *extra, world=1, data=None):
    data = data if data is not None else corpus.flags(sentences=True)
    return parse_pretrain_args(MODEL[kind] + RUN + data + ["--data-cache-path", str(cache), *extra], world)


def batches(config):
    return DatasetBatches(config, run_tokenizer(config), torch.device("cpu"))


def global_batch(config, split, index, first_sample=None):
    """Every dp rank's micro-batches of batch `index`, concatenated in rank order."""
    source, plan = batches(config), BatchPlan(config.global_batch_size, config.training.micro_batch_size,
                                              config.layout.dp)
    parts = []
    for rank in range(config.layout.dp):
        get = source.micro_batches(plan, rank, split, index, first_sample)
        parts += [get(m) for m in range(plan.num_micro_batches)]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_the_same_global_batches_under_every_layout_and_on_resume(corpus, tmp_path, kind):
    reference = {}
    for name, (world, flags) in LAYOUTS.items():
        config = config_for(kind, corpus, tmp_path / "cache", *flags, world=world)
        assert dataset_kind(config) == kind
        got = {split: global_batch(config, split, 1) for split in (TRAIN_SPLIT, VALID_SPLIT)}
        if not reference:
            reference = got
            continue
        for split, batch in got.items():
            assert batch.keys() == reference[split].keys(), name
            assert all(torch.equal(batch[k], reference[split][k]) for k in batch), (name, split)
    # batch 1 is samples [8, 16): resuming at 8 consumed samples reads the same
    resumed = global_batch(config_for(kind, corpus, tmp_path / "cache"), TRAIN_SPLIT, 0, first_sample=8)
    assert all(torch.equal(resumed[k], reference[TRAIN_SPLIT][k]) for k in resumed)


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_samples_have_the_keys_shapes_and_dtypes_the_model_consumes(corpus, tmp_path, kind):
    """What the dataset gives is what the registry's mock batch (the model's contract) gives."""
    config = config_for(kind, corpus, tmp_path / "cache")
    batch = global_batch(config, TRAIN_SPLIT, 0)
    mock = BUILTIN_MODELS[kind].make_batch(config.model, 8, torch.Generator().manual_seed(0))
    assert set(batch) == set(mock)
    for key in batch:
        assert batch[key].shape == mock[key].shape and batch[key].dtype == mock[key].dtype, key
    tokenizer = run_tokenizer(config)
    assert config.model.vocab_size == tokenizer.vocab_size == corpus.vocab_size + (100 if kind == "t5" else 0)
    if kind == "bert":
        assert (batch["input_ids"][:, 0] == tokenizer.cls).all() and batch["loss_mask"].sum() >= 8
        assert ((batch["labels"] >= 0) == batch["loss_mask"].bool()).all()
    else:
        assert (batch["decoder_input_ids"][:, 0] == tokenizer.bos).all()
        assert int(batch["encoder_input_ids"].max()) >= corpus.vocab_size  # sentinels appear


@pytest.mark.parametrize("kind, cls", [("bert", BertDataset), ("t5", T5Dataset)])
def test_split_divides_documents_and_the_flags_reach_the_datasets(corpus, tmp_path, kind, cls):
    config = config_for(kind, corpus, tmp_path / "cache", "--mask-prob", "0.3", "--short-seq-prob", "0.2")
    train, valid, test = batches(config).datasets
    assert isinstance(train, cls) and isinstance(valid, cls) and test is None
    documents = IndexedDataset(corpus.sentence_prefix).num_documents
    cut = round(0.9 * documents)
    assert train.description_fields["document_range"] == [0, cut]
    assert valid.description_fields["document_range"] == [cut, documents]
    assert train.masked_lm_prob == 0.3 and train.description_fields["short_sequence_probability"] == 0.2
    assert train.word_starts is not None  # whole words, from the SentencePiece pieces (Megatron masks words)
    first_valid_sentence = IndexedDataset(corpus.sentence_prefix).document_indices[cut]
    assert int(np.max(train.sample_mapping[:, 1])) <= first_valid_sentence <= int(np.min(valid.sample_mapping[:, 0]))


def test_mask_and_short_sequence_flags():
    config = parse_pretrain_args(["--mock-data"], 1)
    assert (config.data.mask_prob, config.data.short_seq_prob) == (0.15, 0.1)  # Megatron's defaults
    for flags, message in ((["--mask-prob", "0"], r"--mask-prob must be in \(0.0, 1.0\)"),
                           (["--mask-prob", "1"], r"--mask-prob must be in \(0.0, 1.0\)"),
                           (["--short-seq-prob", "1.5"], r"--short-seq-prob must be in \[0.0, 1.0\]")):
        with pytest.raises(ConfigError, match=message):
            parse_pretrain_args(["--mock-data", *flags], 1)
    assert parse_pretrain_args(["--mock-data", "--short-seq-prob", "0"], 1).data.short_seq_prob == 0.0


def part_of_corpus(corpus, prefix, documents: int) -> str:
    """The first `documents` documents of the corpus's sentences, as a dataset of their own."""
    source = IndexedDataset(corpus.sentence_prefix)
    with IndexedDatasetBuilder(prefix, optimal_dtype(corpus.vocab_size)) as builder:
        for d in range(documents):
            first, last = source.document_indices[d], source.document_indices[d + 1]
            sentences = [source[i] for i in range(first, last)]
            builder.add_document(np.concatenate(sentences), [len(s) for s in sentences])
        builder.finalize()
    return prefix


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_weighted_and_unweighted_blends_are_built_once_and_cached(corpus, tmp_path, monkeypatch, kind):
    small = part_of_corpus(corpus, str(tmp_path / "small_text_sentence"), 60)
    tokenizer = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus.tokenizer_model]
    weighted = ["--data-path", "0.7", corpus.sentence_prefix, "0.3", small, *tokenizer]
    config = config_for(kind, corpus, tmp_path / "cache", data=weighted)
    train = batches(config).datasets[TRAIN_SPLIT]
    assert isinstance(train, BlendedDataset) and len(train) == config.training.train_iters * 8
    assert train.weights == pytest.approx([0.7, 0.3]) and train.built_now
    first = global_batch(config, TRAIN_SPLIT, 2)

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt instead of loaded from the cache")

    monkeypatch.setattr(masking, "build_sample_mapping", no_build)
    monkeypatch.setattr("megalith.data.blended.build_blending_indices", no_build)
    again = batches(config).datasets[TRAIN_SPLIT]
    assert not again.built_now and all(torch.equal(first[k], global_batch(config, TRAIN_SPLIT, 2)[k]) for k in first)
    monkeypatch.undo()

    unweighted = ["--data-path", corpus.sentence_prefix, small, *tokenizer]
    train = batches(config_for(kind, corpus, tmp_path / "cache", data=unweighted)).datasets[TRAIN_SPLIT]
    assert isinstance(train, BlendedDataset) and len(train.datasets) == 2  # one epoch of each, by their sizes


def test_default_cache_is_beside_the_data_per_dataset_class(corpus, tmp_path):
    (tmp_path / "data").mkdir()
    prefix = part_of_corpus(corpus, str(tmp_path / "data" / "part_text_sentence"), 80)
    data = ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            corpus.tokenizer_model]
    config = parse_pretrain_args(MODEL["bert"] + RUN + data, 1)
    batches(config)
    cache = default_cache_dir(prefix, "BertDataset")
    assert cache.endswith("cache/BertDataset_indices")
    names = sorted(name.split("-", 2)[2] for name in __import__("os").listdir(cache))
    assert names == ["train-description.json", "train-sample_mapping.npy", "valid-description.json",
                     "valid-sample_mapping.npy"]


@pytest.mark.parametrize("kind, flags, message", [
    ("bert", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1024"],
     "the NullTokenizer tokenizer has no cls token, which BERT needs"),
    ("t5", ["--tokenizer-type", "NullTokenizer", "--vocab-size", "1024"],
     "the NullTokenizer tokenizer has no bos token, which T5 needs"),
    ("t5", ["--vocab-extra-ids", "3"], "needs up to 4 sentinel tokens (additional_special_tokens_ids) but the "
                                       "tokenizer has 3; build it with --vocab-extra-ids 4 or more"),
])
def test_a_tokenizer_without_the_needed_tokens_is_one_line(corpus, tmp_path, monkeypatch, kind, flags, message):
    """Refused when the flags are resolved (before any process group), and again by the batches."""
    data = corpus.flags(sentences=True)
    if "NullTokenizer" in flags:
        data = ["--data-path", corpus.sentence_prefix]
    with pytest.raises(DataError) as error:
        config_for(kind, corpus, tmp_path / "cache", *flags, data=data)
    assert message in str(error.value) and "\n" not in str(error.value)
    monkeypatch.setattr(training_data, "check_data_tokenizer", lambda config: None)
    config = config_for(kind, corpus, tmp_path / "cache", *flags, data=data)
    with pytest.raises(DataError) as error:
        batches(config)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_model_asking_for_unknown_samples_is_refused(corpus, tmp_path, monkeypatch):
    config = config_for("bert", corpus, tmp_path / "cache")
    odd = replace(BUILTIN_MODELS["bert"], dataset="images")
    monkeypatch.setattr(training_data, "get_model_spec", lambda name: odd)
    with pytest.raises(ConfigError, match="asks for 'images' samples, but --data-path builds gpt, bert, t5"):
        batches(config)


def test_a_split_without_documents_names_the_prefix(corpus, tmp_path):
    prefix = part_of_corpus(corpus, str(tmp_path / "tiny_text_sentence"), 12)
    data = ["--data-path", prefix, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
            corpus.tokenizer_model]
    config = parse_pretrain_args(MODEL["bert"] + RUN + data + ["--split", "98,2,0"], 1)
    with pytest.raises(DataError) as error:
        batches(config)
    assert f"{prefix}: its valid split has no documents" in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_training_on_the_corpus_equals_one_process_under_tp2_pp2_dp2(rank_pools, corpus, tmp_path, kind):
    """The whole path under 8 ranks (rank 0 builds the cached indices, the others read them): the
    losses, grad norms and validation losses of one process."""
    import json

    from megalith.testing import log_record_errors, pretrain_on_rank

    records = {}
    for name in ("one process", "tp2.pp2.dp2.sp"):
        world, flags = LAYOUTS[name]
        log = tmp_path / f"{name}.jsonl"
        argv = (MODEL[kind] + RUN + corpus.flags(sentences=True) + flags +
                ["--data-cache-path", str(tmp_path / "cache"), "--train-iters", "2", "--eval-interval", "2",
                 "--log-interval", "1", "--lr", "1e-3", "--no-log-progress-bar", "--log-json", str(log)])
        rank_pools(8).run(pretrain_on_rank, argv, world)
        records[name] = [json.loads(line) for line in log.read_text().splitlines()]
    errors = log_record_errors(records["one process"], records["tp2.pp2.dp2.sp"])
    assert max(errors.values()) < 1e-5, errors
