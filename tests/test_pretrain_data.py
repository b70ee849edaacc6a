"""`megalith pretrain --data-path`: real text from the embedded corpus, the same global batches and
the same losses under every layout, blending, and data errors before any process group."""

import json
from pathlib import Path

import pytest
import torch

from megalith.data.corpus import build_default_corpus
from megalith.errors import ConfigError
from megalith.testing import log_record_errors, pretrain_on_rank
from megalith.config.arguments import parse_pretrain_args

SMALL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
         "--micro-batch-size", "1", "--global-batch-size", "8", "--lr", "2e-3", "--lr-warmup-iters", "1",
         "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--adam-eps", "1e-6", "--log-interval", "1",
         "--eval-interval", "2", "--eval-iters", "1", "--ddp-bucket-size", "3000", "--overlap-grad-reduce",
         "--no-log-progress-bar", "--split", "90,10,0"]
LAYOUTS = {
    "one process": ([], 1),
    "tp2.pp2.dp2.sp.zero1": (["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2",
                              "--sequence-parallel", "--use-distributed-optimizer"], 8),
    "dp4": ([], 4),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_default_corpus(str(tmp_path_factory.mktemp("corpus") / "corpus"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pretrain_on_the_corpus_equals_one_process_under_3d_layouts(rank_pools, corpus, tmp_path):
    """Real text with documents inside sequences (reset positions and masks, no loss on eod): the
    layouts read the same global batches, so losses and grad norms match one process."""
    data = corpus.flags() + ["--data-cache-path", str(tmp_path / "cache"), "--reset-position-ids",
                             "--reset-attention-mask", "--eod-mask-loss"]
    records = {}
    for name, (extra, world) in LAYOUTS.items():
        log = tmp_path / f"{name}.jsonl"
        rank_pools(8).run(pretrain_on_rank, SMALL + data + extra + ["--train-iters", "4", "--log-json", str(log)],
                          world)
        records[name] = _records(log)
    reference = records.pop("one process")
    train = [r for r in reference if "consumed_samples" in r]
    assert len(train) == 4 and all(r["lm_loss"] > 0 for r in train)
    assert abs(train[0]["lm_loss"] - torch.log(torch.tensor(float(corpus.vocab_size))).item()) < 0.5  # real tokens
    for name, got in records.items():
        errors = log_record_errors(reference, got)  # loss, grad norm and validation loss, every iteration
        assert max(errors.values()) < 1e-5, (name, errors)
    assert sorted(p.name.split("-")[2] for p in (tmp_path / "cache").glob("*-description.json")) == ["train", "valid"]


def test_loss_falls_on_real_text_with_a_weighted_blend(rank_pools, corpus, tmp_path):
    """Documents and sentences of the corpus blended 0.7 / 0.3 (Megatron's weighted --data-path)."""
    log = tmp_path / "blend.jsonl"
    argv = SMALL + ["--data-path", "0.7", corpus.data_prefix, "0.3", corpus.sentence_prefix, "--tokenizer-type",
                    "SentencePieceTokenizer", "--tokenizer-model", corpus.tokenizer_model, "--data-cache-path",
                    str(tmp_path / "cache"), "--train-iters", "24", "--eval-interval", "24", "--lr", "1e-2",
                    "--log-json", str(log)]
    rank_pools(8).run(pretrain_on_rank, argv, 2)
    train = [r["lm_loss"] for r in _records(log) if "consumed_samples" in r]
    assert len(train) == 24
    assert sum(train[-4:]) / 4 < sum(train[:4]) / 4 - 0.5, train


def test_the_tokenizer_sets_the_vocabulary(corpus):
    config = parse_pretrain_args(SMALL + corpus.flags(), 1)
    assert config.model.vocab_size == corpus.tokenizer().vocab_size
    with pytest.raises(ConfigError, match="--vocab-size 77 contradicts the SentencePieceTokenizer's"):
        parse_pretrain_args(SMALL + corpus.flags() + ["--vocab-size", "77"], 1)


@pytest.mark.parametrize("damage, message", [
    ("missing", "no such file; check --data-path"),
    ("magic", "not an indexed-dataset index"),
    ("bin", "the pair does not match"),
])
def test_a_bad_dataset_is_one_line_before_any_process_group(corpus, tmp_path, damage, message):
    prefix = tmp_path / "data"
    if damage != "missing":
        index = Path(corpus.data_prefix + ".idx").read_bytes()
        data = Path(corpus.data_prefix + ".bin").read_bytes()
        (tmp_path / "data.idx").write_bytes(b"NOTANIDX\x00" + index[9:] if damage == "magic" else index)
        (tmp_path / "data.bin").write_bytes(data[:-2] if damage == "bin" else data)
    argv = SMALL + ["--data-path", str(prefix), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model",
                    corpus.tokenizer_model]
    with pytest.raises(ConfigError, match=message) as info:
        parse_pretrain_args(argv, 8)
    assert "\n" not in str(info.value) and str(prefix) in str(info.value)
