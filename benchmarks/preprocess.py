"""Throughput of `megalith preprocess` (JSON lines -> .bin/.idx) per worker count.

    .venv/bin/python benchmarks/preprocess.py [--size-mb 64] [--workers 1 2] [--repeat 3] [--workdir DIR]

Writes a deterministic JSON-lines corpus of English-like text (paragraphs of Python's bundled
pydoc topics, shuffled into documents of 2-12 paragraphs), trains a SentencePiece model (vocab
8000) on a 4 MB sample (both reused when --workdir already holds them), then preprocesses the
corpus with --append-eod per worker count and prints MB/s, docs/s and tokens/s of the fastest
of --repeat runs, and the CPU seconds it used (this process and its workers: a figure that a
busy machine disturbs less than wall time). SentencePiece batches already use every CPU in one
process, so --workers 1 is not single-core. The outputs of every worker count must be
byte-identical; the benchmark checks that.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import os
import random
import re
import resource
import shutil
import tempfile
import time

from megalith.data.indexed import data_file, index_file
from megalith.data.preprocess import add_preprocess_arguments, output_prefix, run_preprocess
from megalith.data.tokenizers import train_sentencepiece


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    found = [p.strip() for text in topics.values() for p in re.split(r"\n\s*\n", text)]
    return [re.sub(r"\s+", " ", p) for p in found if len(p.split()) > 5]


def write_corpus(path: str, size_mb: float, seed: int = 0) -> tuple[int, int]:
    """Documents until the file reaches size_mb; returns (documents, bytes)."""
    pool = paragraphs()
    rng = random.Random(seed)
    documents = written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_mb * 2**20:
            text = "\n\n".join(rng.choice(pool) for _ in range(rng.randint(2, 12)))
            line = json.dumps({"text": text, "id": documents}) + "\n"
            f.write(line)
            written += len(line.encode("utf-8"))
            documents += 1
    return documents, written


def write_sample(corpus: str, path: str, size_mb: float) -> None:
    with open(corpus, encoding="utf-8") as source, open(path, "w", encoding="utf-8") as sample:
        written = 0
        for line in source:
            text = json.loads(line)["text"]
            sample.write(text.replace("\n\n", "\n") + "\n")
            written += len(text)
            if written > size_mb * 2**20:
                return


def _cpu_seconds() -> float:
    """User + system time of this process and its finished children (the pool's workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--repeat", type=int, default=1, help="runs per worker count; the fastest is shown")
    parser.add_argument("--workdir", default=None, help="keep the corpus, model and outputs here (reused)")
    args = parser.parse_args()

    workdir = args.workdir or tempfile.mkdtemp(prefix="megalith-preprocess-bench-")
    os.makedirs(workdir, exist_ok=True)
    try:
        corpus = os.path.join(workdir, f"corpus-{args.size_mb:g}mb.jsonl")
        if not os.path.exists(corpus):
            began = time.perf_counter()
            documents, size = write_corpus(corpus, args.size_mb)
            print(f"corpus: {documents} documents, {size / 2**20:.1f} MB in {time.perf_counter() - began:.1f} s")
        model_prefix = os.path.join(workdir, f"sp{args.vocab_size}")
        if not os.path.exists(model_prefix + ".model"):
            sample = os.path.join(workdir, "sample.txt")
            write_sample(corpus, sample, 4)
            began = time.perf_counter()
            train_sentencepiece(sample, model_prefix, args.vocab_size, num_threads=os.cpu_count() or 1)
            print(f"trained {model_prefix}.model (vocab {args.vocab_size}) in {time.perf_counter() - began:.1f} s")
        size = os.path.getsize(corpus)
        print(f"input {corpus}: {size / 2**20:.1f} MB, {os.cpu_count()} CPUs")

        outputs = []
        for workers in args.workers:
            prefix = os.path.join(workdir, f"out-w{workers}")
            argv = ["--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "SentencePieceTokenizer",
                    "--tokenizer-model", model_prefix + ".model", "--append-eod", "--workers", str(workers),
                    "--log-interval", str(10**9)]
            run_args = add_preprocess_arguments(argparse.ArgumentParser()).parse_args(argv)
            runs = []
            for _ in range(args.repeat):
                cpu = _cpu_seconds()
                began = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()) as captured:
                    run_preprocess(run_args)
                runs.append((time.perf_counter() - began, _cpu_seconds() - cpu))
            elapsed, cpu = min(runs)
            summary = captured.getvalue().splitlines()[0]
            documents, tokens = (int(n) for n in re.findall(r"(\d+) (?:documents|tokens)", summary)[:2])
            print(f"workers {workers}: {elapsed:6.2f} s  {size / 2**20 / elapsed:6.2f} MB/s  "
                  f"{documents / elapsed:8.0f} docs/s  {tokens / elapsed:10.0f} tokens/s  cpu {cpu:5.1f} s  "
                  f"({documents} docs, {tokens} tokens; best of {args.repeat})")
            outputs.append(output_prefix(prefix, "text", False))
        for other in outputs[1:]:
            for name in (data_file, index_file):
                assert filecmp.cmp(name(outputs[0]), name(other), shallow=False), f"{name(other)} differs"
        if len(outputs) > 1:
            print("outputs byte-identical across worker counts")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
