"""Megatron-LM's own example launch scripts (GPT-3, BERT, T5; tests/megatron_scripts/) run under
torchrun on CPU, at tiny sizes, on the embedded corpus: tokenizer files built as a Megatron user
has them (GPT-2 vocab.json + merges.txt, a WordPiece vocab.txt), datasets built with Megatron's
preprocess flags, and the script's own flags unchanged but for the sizes."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tokenizers import BertWordPieceTokenizer, ByteLevelBPETokenizer

from megalith.data.corpus import build_default_corpus
from megalith.training.log_line import parse_log_line

pytestmark = pytest.mark.slow

SCRIPTS = Path(__file__).resolve().parent / "megatron_scripts"
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _texts(corpus) -> list[str]:
    with open(corpus.jsonl, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for line in lines]


def _preprocess(tmp: Path, corpus, name: str, flags: list[str]) -> str:
    prefix = tmp / name
    done = subprocess.run([sys.executable, "-m", "megalith", "preprocess", "--input", corpus.jsonl,
                           "--output-prefix", str(prefix), "--workers", "1", *flags],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    found = sorted(p.name for p in tmp.glob(f"{name}_text_*.bin"))
    assert len(found) == 1, found
    return str(tmp / found[0][:-len(".bin")])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tokenizer files and datasets for the three scripts, built once."""
    tmp = tmp_path_factory.mktemp("megatron-scripts")
    corpus = build_default_corpus(str(tmp_path_factory.getbasetemp() / "corpus-cache" / "corpus"))
    texts = _texts(corpus)
    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(texts, vocab_size=1000, min_frequency=2, special_tokens=["<|endoftext|>"],
                            show_progress=False)
    vocab_json, merges = bpe.save_model(str(tmp), "gpt2")
    out = {"vocab_json": vocab_json, "merges": merges}
    out["gpt_data"] = _preprocess(tmp, corpus, "gpt", ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file",
                                                       vocab_json, "--merge-file", merges, "--append-eod"])
    for cased in (False, True):
        wordpiece = BertWordPieceTokenizer(lowercase=not cased)
        wordpiece.train_from_iterator(texts, vocab_size=1000, special_tokens=BERT_SPECIALS, show_progress=False)
        folder = tmp / ("cased" if cased else "uncased")
        folder.mkdir()
        vocab_txt = wordpiece.save_model(str(folder))[0]
        kind = "BertWordPieceCase" if cased else "BertWordPieceLowerCase"
        extra = ["--vocab-extra-ids", "100"] if cased else []
        out["cased" if cased else "uncased"] = vocab_txt
        out[f"{'t5' if cased else 'bert'}_data"] = _preprocess(
            tmp, corpus, "t5" if cased else "bert",
            ["--tokenizer-type", kind, "--vocab-file", vocab_txt, "--split-sentences", *extra])
    return out


def _run(script: str, tmp_path: Path, *args: str, port: int) -> list[str]:
    environ = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(SCRIPTS / script), *args], env=environ, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "unrecognized arguments" not in output
    return output.splitlines()


def _iterations(lines: list[str]) -> list[dict]:
    return [parse_log_line(line) for line in lines if re.search(r"\biteration\s+\d+/", line)]


def test_gpt3_175b_script_runs_with_its_batch_size_ramp(files, tmp_path):
    lines = _run("train_gpt3_175b_distributed.sh", tmp_path, str(tmp_path / "ckpt"), str(tmp_path / "tb"),
                 files["vocab_json"], files["merges"], files["gpt_data"], port=29611)
    logged = _iterations(lines)
    assert [entry["iteration"] for entry in logged] == [1, 2, 3, 4, 5, 6]
    # --rampup-batch-size 2 2 24 towards 8: 3 increments of 8 samples each (Megatron's formula)
    assert [entry["global_batch_size"] for entry in logged] == [2, 2, 2, 2, 4, 4]
    assert [entry["consumed_samples"] for entry in logged] == [2, 4, 6, 8, 12, 16]
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert any(path.name.startswith("events.") for path in (tmp_path / "tb").rglob("*"))


def test_bert_340m_script_runs_with_a_wordpiece_vocab(files, tmp_path):
    lines = _run("train_bert_340m_distributed.sh", tmp_path, str(tmp_path / "ckpt"), str(tmp_path / "tb"),
                 files["uncased"], files["bert_data"], port=29613)
    logged = _iterations(lines)
    assert [entry["iteration"] for entry in logged] == [1, 2, 3, 4]
    assert all(entry["global_batch_size"] == 4 for entry in logged)
    assert any("validation loss at iteration 2" in line for line in lines)
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_t5_220m_script_runs_with_nccl_asked_for_on_a_cpu(files, tmp_path):
    lines = _run("train_t5_220m_distributed.sh", tmp_path, str(tmp_path / "ckpt"), str(tmp_path / "tb"),
                 files["cased"], files["t5_data"], port=29615)
    logged = _iterations(lines)
    assert [entry["iteration"] for entry in logged] == [1, 2, 3, 4]
    assert all(math.isfinite(entry["lm_loss"]) for entry in logged)  # bf16: no step is skipped
    assert sum("--distributed-backend nccl needs CUDA" in line for line in lines) == 1
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
