"""The pretrain memory report: the startup numbers are what the rank built plus the paper's
activations at the schedule's peak, and both reports reach the log."""

import re

import pytest

from megalith.config.arguments import parse_pretrain_args
from megalith.parallel.pipeline.schedules import build_schedule
from megalith.plan.memory import activation_bytes_per_layer
from megalith.testing import pretrain_on_rank
from megalith.models.transformer import TransformerLayer
from megalith.training.memory_report import STRATEGIES, formula_bytes, peak_layers_in_flight, startup_memory

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


# --- persistent memory per ZeRO strategy, counted from storage, against the formulas ---------


def _persistent_after_one_step(ctx, layout_text):
    from megalith.config import ModelConfig, parse_layout
    from megalith.training.memory_report import persistent_memory
    from megalith.verify import VerifySettings, runner_after_one_step

    config = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=8, vocab_size=512,
                         hidden_dropout=0.0, attention_dropout=0.0)
    settings = VerifySettings("gpt", config, steps=1, micro_batches=4, micro_batch_size=1, ddp_bucket_size=20_000)
    layout = parse_layout(layout_text)
    runner = runner_after_one_step(ctx, settings, layout_text)
    if runner is None:
        return None
    params = sum(p.numel() for chunk in runner.chunks for p in chunk.parameters())
    layers = [sum(p.numel() for p in layer.parameters()) for chunk in runner.chunks
              for layer in chunk.modules() if isinstance(layer, TransformerLayer)]
    from megalith.training.memory_report import gathered_bound_bytes

    return persistent_memory(runner), params, max(layers), gathered_bound_bytes(runner.chunks, layout.zero)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_persistent_memory_is_the_formula_for_every_strategy(rank_pools, strategy):
    """bf16 parameters, fp32 gradients, Adam at dp4 (several buckets, padded): every rank within 2%
    of (2 + 4 + 12)Ψ with the sharded terms divided by d; ZeRO-3's gathered working set beside it,
    at most the root unit and two layers."""
    stage = STRATEGIES.index(strategy)
    layout = "dp4" + (f".zero{stage}" if stage else "") + ".bf16"
    for memory, params, layer, bound in filter(None, rank_pools(4).run(_persistent_after_one_step, layout)):
        expected = formula_bytes(strategy, params, 4)
        for key, value in expected.items():
            assert abs(memory[key] - value) / value < 0.02, (key, memory, expected)
        if stage < 3:
            assert memory["gathered_peak_bytes"] == 0 and bound == 0
        else:  # everything but the layers is the root unit; two layers are gathered at most
            root = params - 2 * layer
            assert bound == 2 * (root + 2 * layer)  # what the startup report prints
            assert 2 * layer <= memory["gathered_peak_bytes"] <= bound * 1.02, memory


def test_formula_bytes_by_strategy():
    assert formula_bytes("no_shard", 10, 4) == {"params_bytes": 20, "grads_bytes": 40, "optimizer_bytes": 120}
    assert formula_bytes("optim", 10, 4) == {"params_bytes": 20, "grads_bytes": 40, "optimizer_bytes": 30}
    assert formula_bytes("optim_grads", 10, 4) == {"params_bytes": 20, "grads_bytes": 10, "optimizer_bytes": 30}
    assert formula_bytes("optim_grads_params", 10, 4) == {"params_bytes": 5, "grads_bytes": 10,
                                                          "optimizer_bytes": 30}
    with pytest.raises(ValueError, match="unknown sharding strategy 'zero4'"):
        formula_bytes("zero4", 10, 4)


@pytest.mark.parametrize("strategy", ["optim_grads", "optim_grads_params"])
def test_the_first_json_record_carries_the_memory(rank_pools, tmp_path, strategy):
    """The first record holds this rank's persistent bytes and the gathered peak, and no other
    does; the startup rows show ZeRO-3's gathered bound."""
    import json

    log = tmp_path / "log.jsonl"
    flags = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--seq-length", "16", "--vocab-size", "128", "--micro-batch-size", "1", "--global-batch-size", "4",
             "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0", "--no-log-progress-bar", "--bf16",
             "--data-parallel-sharding-strategy", strategy, "--log-json", str(log)]
    lines = next(filter(None, rank_pools(4).run(pretrain_on_rank, flags, 2)))
    records = [json.loads(line) for line in log.read_text().splitlines() if "consumed_samples" in line]
    memory = records[0]["memory"]
    assert sorted(memory) == ["gathered_peak_bytes", "grads_bytes", "offloaded_bytes", "optimizer_bytes", "params_bytes"]
    assert "memory" not in records[1]
    startup = [line for line in lines if re.match(r"\[Rank \d\] \(tp \d, pp \d\) parameters", line)]
    gathered = float(re.search(r"gathered ([0-9.]+)", startup[0]).group(1))
    if strategy == "optim_grads":
        params = memory["params_bytes"] / 2  # bf16, whole
        assert memory["grads_bytes"] < 4 * params and memory["optimizer_bytes"] < 12 * params  # sharded over dp 2
        assert memory["gathered_peak_bytes"] == 0 and gathered == 0
    else:
        assert memory["gathered_peak_bytes"] > memory["params_bytes"]  # here the root and a layer whole outweigh the shard
        assert gathered > 0
