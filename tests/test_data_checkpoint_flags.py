"""Megatron's data and checkpoint flags: --no-mmap-bin-files, --dataloader-type cyclic,
--train/--valid/--test-data-path, --data-args-path, --no-save-optim, --no-save-rng,
--use-checkpoint-args and --ckpt-format. Small runs in this process (world size 1)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch.distributed as dist

from megalith.config.arguments import parse_pretrain_args
from megalith.data.corpus import build_default_corpus
from megalith.data.indexed import IndexedDataset
from megalith.data.sampler import cyclic_sample
from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid
from megalith.parallel.spawn import free_port
from megalith.parallel.state import ParallelState
from megalith.training.checkpoint_format import RNG_DIR, read_tracker
from megalith.training.data import DatasetBatches, TRAIN_SPLIT, run_tokenizer
from megalith.training.loop import pretrain

MODEL = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "16",
         "--micro-batch-size", "1", "--global-batch-size", "2", "--lr", "1e-3", "--log-interval", "1",
         "--eval-interval", "2", "--eval-iters", "1", "--no-log-progress-bar", "--train-iters", "2"]
MOCK = ["--mock-data", "--vocab-size", "64"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return build_default_corpus(str(tmp_path_factory.getbasetemp() / "corpus-cache" / "corpus"))


def data_flags(corpus) -> list[str]:
    return ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", corpus.tokenizer_model]


@pytest.fixture(scope="module")
def state():
    """A one-process gloo job in this process."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield ParallelState.from_grid(RankGrid(1))
    dist.destroy_process_group()


def run(state, argv):
    lines = []
    losses = pretrain(parse_pretrain_args(argv, 1), state, print_fn=lines.append)
    return lines, losses


def test_file_reads_give_the_memory_mapped_tokens(corpus):
    mapped, read = IndexedDataset(corpus.data_prefix), IndexedDataset(corpus.data_prefix, mmap=False)
    assert not read.mmap
    for index in (0, 1, len(mapped) // 2, len(mapped) - 1):
        assert np.array_equal(mapped[index], read[index])
    assert np.array_equal(mapped.get(3, 2, 5), read.get(3, 2, 5))


def test_cyclic_order_is_a_new_permutation_every_pass_and_the_same_for_a_resumed_run():
    first = [cyclic_sample(p, 10, seed=7) for p in range(10)]
    second = [cyclic_sample(p, 10, seed=7) for p in range(10, 20)]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second and first != list(range(10))
    assert [cyclic_sample(p, 10, seed=7) for p in range(13, 16)] == second[3:6]  # position alone decides


def test_cyclic_loader_reads_shuffled_samples_and_single_reads_in_order(corpus, state):
    argv = MODEL + ["--data-path", corpus.data_prefix] + data_flags(corpus)
    single = parse_pretrain_args(argv, 1)
    cyclic = parse_pretrain_args(argv + ["--dataloader-type", "cyclic"], 1)
    plan = single.batch_plan()
    read = {}
    for config in (single, cyclic):
        batches = DatasetBatches(config, run_tokenizer(config), state.device, state)
        dataset = batches.datasets[TRAIN_SPLIT]
        tokens = batches.micro_batches(plan, 0, TRAIN_SPLIT, 0, first_sample=0)(0)["input_ids"]
        read[config.training.dataloader_type] = (tokens, dataset)
    tokens, dataset = read["single"]
    assert np.array_equal(tokens[0].numpy(), np.asarray(dataset[0]["input_ids"]))
    tokens, dataset = read["cyclic"]
    expected = dataset[cyclic_sample(0, len(dataset), cyclic.training.seed)]["input_ids"]
    assert np.array_equal(tokens[0].numpy(), np.asarray(expected))


def test_per_split_paths_and_data_args_file_train(corpus, state, tmp_path):
    lines, losses = run(state, MODEL + data_flags(corpus) + ["--train-data-path", corpus.data_prefix,
                                                             "--valid-data-path", corpus.data_prefix])
    assert len(losses) == 2 and any("validation loss at iteration 2" in line for line in lines)
    words = tmp_path / "data_args.txt"
    words.write_text(f"1.0 {corpus.data_prefix}\n")
    config = parse_pretrain_args(MODEL + data_flags(corpus) + ["--data-args-path", str(words)], 1)
    assert config.data.data_path == ("1.0", corpus.data_prefix)


@pytest.mark.parametrize("flags, fragment", [
    (["--data-path", "A", "--train-data-path", "B"], "--data-path and --train/--valid/--test-data-path are both"),
    (["--valid-data-path", "B"], "--valid-data-path / --test-data-path need --train-data-path"),
    (["--data-args-path", "/nonexistent/args.txt"], "--data-args-path /nonexistent/args.txt: No such file"),
    (["--use-checkpoint-args"], "--use-checkpoint-args takes the model's flags from the --load checkpoint"),
])
def test_bad_data_and_checkpoint_flags_are_one_line(flags, fragment, corpus):
    base = MODEL + data_flags(corpus) if "--data-path" in flags or "--valid-data-path" in flags else MODEL + MOCK
    with pytest.raises(ConfigError) as error:
        parse_pretrain_args(base + flags, 1)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_no_save_optim_and_rng_leave_them_out_and_a_resume_says_so(state, tmp_path):
    root = tmp_path / "ckpt"
    run(state, MODEL + MOCK + ["--save", str(root), "--no-save-optim", "--no-save-rng"])
    directory = root / "iter_0000002"
    meta = json.loads((directory / "metadata.json").read_text())
    assert meta["has_optimizer"] is False
    assert not (directory / RNG_DIR).exists()
    from safetensors import safe_open

    names = [name for shard in directory.glob("*.safetensors")
             for name in safe_open(str(shard), "pt").keys()]
    assert names and not any(name.startswith("optimizer/") for name in names)
    lines, _ = run(state, MODEL[:-1] + ["4"] + MOCK + ["--load", str(root)])
    assert any("holds no optimizer state" in line for line in lines)
    assert any("holds no random states" in line for line in lines)


def test_use_checkpoint_args_takes_the_shape_from_the_checkpoint(state, tmp_path):
    root = tmp_path / "ckpt"
    shape = ["--num-layers", "3", "--hidden-size", "24", "--num-attention-heads", "3"]
    run(state, MODEL + shape + MOCK + ["--save", str(root)])
    assert read_tracker(str(root)) == 2
    plain = [word for word in MODEL[6:]]  # without the shape flags
    config = parse_pretrain_args(plain + MOCK + ["--load", str(root), "--use-checkpoint-args",
                                                 "--train-iters", "3"], 1)
    assert (config.model.num_layers, config.model.hidden_size, config.model.num_attention_heads) == (3, 24, 3)
    with pytest.raises(Exception, match="in the checkpoint"):  # a flag given here still has to agree
        parse_pretrain_args(plain + MOCK + ["--load", str(root), "--use-checkpoint-args", "--num-layers", "2"], 1)


def test_megatron_checkpoint_formats_write_megaliths_with_one_notice():
    config = parse_pretrain_args(MODEL + MOCK + ["--ckpt-format", "torch_dist"], 1)
    lines = [n for n in config.notices if "--ckpt-format" in n]
    assert len(lines) == 1 and "megalith writes its own format" in lines[0]
    assert not [n for n in parse_pretrain_args(MODEL + MOCK, 1).notices if "--ckpt-format" in n]


def test_flags_named_as_negations_turn_their_option_on():
    """--no-load-optim / --no-save-rng are fields named as negations: giving the flag sets them
    (argparse's BooleanOptionalAction would read the leading --no- as "off")."""
    config = parse_pretrain_args(MODEL + MOCK + ["--no-load-optim", "--no-load-rng", "--no-save-optim",
                                                 "--no-save-rng"], 1)
    c = config.checkpointing
    assert c.no_load_optim and c.no_load_rng and c.no_save_optim and c.no_save_rng
    assert not parse_pretrain_args(MODEL + MOCK, 1).checkpointing.no_load_optim
