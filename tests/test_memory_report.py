"""The pretrain memory report: the startup numbers are what the rank built plus the paper's
activations at the schedule's peak, and both reports reach the log."""

import re

import pytest

from megalith.config.arguments import parse_pretrain_args
from megalith.parallel.pipeline.schedules import build_schedule
from megalith.plan.memory import activation_bytes_per_layer
from megalith.testing import pretrain_on_rank
from megalith.training.memory_report import peak_layers_in_flight, startup_memory

ARGV = ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "2",
        "--log-interval", "1", "--eval-iters", "0", "--no-log-progress-bar", "--bf16",
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--sequence-parallel",
        "--use-distributed-optimizer"]


@pytest.mark.parametrize("name, pp, vpp, m, rank, layers, peak", [
    ("gpipe", 2, 1, 4, 0, [2], 8),  # every micro-batch's forward before any backward
    ("1f1b", 2, 1, 4, 0, [2], 4),  # the first stage holds pp micro-batches
    ("1f1b", 2, 1, 4, 1, [2], 2),  # the last stage holds one
    ("1f1b", 4, 1, 8, 1, [1], 3),  # pp - rank
    ("interleaved-1f1b", 2, 2, 4, 0, [1, 1], 5),  # Megatron's warm-up: (pp - 1 - rank) * 2 + (vpp - 1) * pp + 1 chunks
])
def test_the_peak_follows_the_schedule(name, pp, vpp, m, rank, layers, peak):
    assert peak_layers_in_flight(build_schedule(name, pp, vpp, m, rank), layers) == peak


def _startup_and_built(ctx, argv, world):
    from megalith.training.loop import Trainer

    config = parse_pretrain_args(argv, world)
    state = ctx.parallel_state(tp=2, pp=2)
    trainer = Trainer(config, state, print_fn=lambda line: None)
    memory = startup_memory(trainer.runner, config, state.tp_size)
    optimizer = trainer.runner.optimizer
    params = sum(p.numel() * p.element_size() for chunk in trainer.runner.chunks for p in chunk.parameters())
    shard = sum(f.main.numel() for f in optimizer.fragments)  # ZeRO-1: this rank's fp32 main weights
    layers = sum(1 for chunk in trainer.runner.chunks for name, _ in chunk.named_modules()
                 if re.fullmatch(r".*layers\.\d+", name))
    model = config.model
    per_layer = activation_bytes_per_layer(16, 2, 32, 4, tp=2, sequence_parallel=True,
                                           attention_scores=model.attention_path == "unfused",
                                           hidden_dropout=model.hidden_dropout > 0,
                                           attention_dropout=model.attention_dropout > 0)
    return memory, params, shard, layers, state.pp_rank, per_layer


def test_startup_numbers_are_what_the_rank_built(rank_pools):
    for memory, params, shard, layers, pp_rank, per_layer in rank_pools(4).run(_startup_and_built, ARGV, 4):
        assert memory.parameters == params  # bf16
        assert memory.gradients == 2 * params  # the fp32 gradient buffer
        assert memory.optimizer == 3 * 4 * shard  # fp32 main weights and Adam's two moments, sharded
        in_flight = 2 - pp_rank  # 1F1B over 4 micro-batches on 2 stages
        assert memory.peak_layers == in_flight * layers
        assert memory.activations == per_layer * in_flight * layers


def test_both_reports_reach_the_log(rank_pools):
    lines = next(filter(None, rank_pools(4).run(pretrain_on_rank, ARGV, 4)))
    startup = [line for line in lines if re.match(r"\[Rank \d\] \(tp \d, pp \d\) parameters", line)]
    measured = [line for line in lines if re.match(r"\[Rank \d\] \(after 1 iterations\) memory \(MB\) \| max rss: ", line)]
    # the last rank prints its model-parallel group: ranks 0-3 of a tp2.pp2 job
    assert [line.split()[1] for line in startup] == ["0]", "1]", "2]", "3]"]
    assert len(measured) == 4 and all(float(line.rsplit(" ", 1)[1]) > 10 for line in measured)  # a Python process
    first_log = next(i for i, line in enumerate(lines) if "iteration        1/" in line)
    assert lines.index(measured[0]) > first_log > lines.index(startup[-1])
