"""MoE logs (issue 21, item 4): per-layer balancing loss, z-loss, tokens per expert and dropped fraction
against direct formulas, Megatron's `load_balancing_loss` in the log line, and a 2-rank pp2 pretrain run."""

import json
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from megalith.config import ModelConfig
from megalith.models.gpt import GPTModel
from megalith.testing import pretrain_on_rank, relative_error
from megalith.training.log_line import IterationLog, as_json_record, format_log_line, parse_log_line
from megalith.training.moe_stats import MoEStats, moe_layers, tensorboard_scalars

BASE = ModelConfig(num_layers=3, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=8,
                   vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0, num_experts=4, moe_router_topk=2,
                   moe_layer_freq="[1,0,1]", moe_aux_loss_coeff=0.05, moe_z_loss_coeff=0.01)


def direct_losses(config, layer, x):
    """(load-balancing loss, z-loss, tokens per expert) of one forward, without coefficients, from the
    definitions (Switch Transformer over softmax scores; ST-MoE's mean logsumexp squared)."""
    tokens = x.reshape(-1, x.shape[-1]).detach()
    logits = tokens @ layer.router.weight.detach().t()
    scores = torch.softmax(logits, -1)
    chosen = torch.topk(scores, config.moe_router_topk, -1).indices
    counts = torch.zeros(config.num_experts).index_add_(0, chosen.flatten(), torch.ones(chosen.numel()))
    fraction = counts / (config.moe_router_topk * tokens.shape[0])  # f_e: the share of routed pairs
    balance = config.num_experts * (fraction * scores.mean(0)).sum()  # E x sum_e f_e x P_e
    return float(balance), float(torch.logsumexp(logits, -1).square().mean()), counts


def run(config, micro_batches=2, seed=0):
    """Forward and backward `micro_batches` batches of one process, then one evaluation forward: the stats'
    summary, the layers, each layer's training inputs, the stats and each layer's forward calls."""
    model = GPTModel(config, init_seed=3)
    layers = moe_layers([model])
    stats = MoEStats(config, layers, (), torch.device("cpu"))
    seen = {index: [] for index in layers}
    for index, layer in layers.items():
        layer.register_forward_hook(
            lambda m, args, out, index=index: seen[index].append((torch.is_grad_enabled(), args[0].detach())))
    generator = torch.Generator().manual_seed(seed)
    for _ in range(micro_batches):
        tokens = torch.randint(0, 64, (2, 9), generator=generator)
        model(tokens[:, :-1], tokens[:, 1:]).mean().backward()
    with torch.no_grad():  # evaluation is not counted
        model(tokens[:, :-1], tokens[:, 1:])
    inputs = {index: [x for grad, x in calls if grad] for index, calls in seen.items()}
    return SimpleNamespace(summary=stats.reduce(iterations=1), layers=layers, inputs=inputs, stats=stats,
                           calls={index: len(calls) for index, calls in seen.items()})


def test_per_layer_stats_equal_the_direct_formulas_averaged_over_micro_batches():
    result = run(BASE)
    summary, layers, inputs = result.summary, result.layers, result.inputs
    assert all(len(xs) == 2 for xs in inputs.values())  # the evaluation is left out
    assert [entry["layer"] for entry in summary["layers"]] == [0, 2]
    for entry in summary["layers"]:
        direct = [direct_losses(BASE, layers[entry["layer"]], x) for x in inputs[entry["layer"]]]
        balance = sum(d[0] for d in direct) / len(direct)
        z = sum(d[1] for d in direct) / len(direct)
        counts = sum(d[2] for d in direct)
        assert relative_error(torch.tensor(entry["load_balancing_loss"]), torch.tensor(balance)) < 1e-5
        assert relative_error(torch.tensor(entry["z_loss"]), torch.tensor(z)) < 1e-5
        assert (entry["tokens_per_expert_min"], entry["tokens_per_expert_max"]) == (counts.min(), counts.max())
        assert entry["dropped_fraction"] == 0.0  # dropless
    means = {name: sum(e[name] for e in summary["layers"]) / 2 for name in ("load_balancing_loss", "z_loss")}
    assert summary["load_balancing_loss"] == means["load_balancing_loss"] and summary["z_loss"] == means["z_loss"]
    assert set(tensorboard_scalars(summary)) == {f"moe/{name}_layer_{i}" for i in (0, 2) for name in (
        "load_balancing_loss", "z_loss", "tokens_per_expert_min", "tokens_per_expert_max", "dropped_fraction")}
    # the sums restart after each reduce
    assert result.stats.reduce(1)["layers"][0]["tokens_per_expert_max"] == 0.0


def test_full_recompute_counts_each_micro_batch_once():
    """A checkpointed layer's first forward runs without gradients (not counted), its recomputation with."""
    plain = run(BASE)
    recomputed = run(replace(BASE, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1))
    assert recomputed.summary == plain.summary
    assert plain.calls[0] == 3 and recomputed.calls[0] == 5  # 2 micro-batches (twice each) and the evaluation


@pytest.mark.parametrize("coeffs", [(0.05, None), (0.0, 0.01)])
def test_one_loss_alone_is_its_weighted_value_over_its_coefficient(coeffs):
    config = replace(BASE, moe_aux_loss_coeff=coeffs[0], moe_z_loss_coeff=coeffs[1])
    result = run(config, micro_batches=1)
    summary, layers, inputs = result.summary, result.layers, result.inputs
    for entry in summary["layers"]:
        balance, z, _ = direct_losses(config, layers[entry["layer"]], inputs[entry["layer"]][0])
        name, value = ("load_balancing_loss", balance) if coeffs[0] else ("z_loss", z)
        assert set(entry) & {"load_balancing_loss", "z_loss"} == {name}
        assert relative_error(torch.tensor(entry[name]), torch.tensor(value)) < 1e-5


def test_the_dropped_fraction_counts_pairs_beyond_capacity():
    config = replace(BASE, moe_expert_capacity_factor=0.5, moe_token_dispatcher_type="alltoall")
    result = run(config, micro_batches=1)
    summary, layers, inputs = result.summary, result.layers, result.inputs
    capacity = 4  # ceil(16 tokens x top-2 / 4 experts x 0.5)
    for entry in summary["layers"]:
        counts = direct_losses(config, layers[entry["layer"]], inputs[entry["layer"]][0])[2]
        kept = counts.clamp(max=capacity)
        assert entry["dropped_fraction"] == float((counts - kept).sum() / 32) > 0
        assert (entry["tokens_per_expert_min"], entry["tokens_per_expert_max"]) == (kept.min(), kept.max())


def test_the_log_line_carries_megatrons_load_balancing_loss_after_the_lm_loss():
    from datetime import datetime

    entry = IterationLog(2, 4, 8, 10.0, 0.1, 100.0, 1e-3, 4, 5.0, 1.0, 0.5, 0, 0, datetime(2026, 1, 1),
                         moe_losses=(("load_balancing_loss", 1.0123456789), ("z_loss", 2.5e-3)))
    line = format_log_line(entry)
    assert " lm loss: 5.000000E+00 | load_balancing_loss: 1.012346E+00 | z_loss: 2.500000E-03 | loss scale:" in line
    parsed = parse_log_line(line)
    assert parsed["load_balancing_loss"] == 1.012346 and parsed["z_loss"] == 2.5e-3
    record = as_json_record(entry)
    assert record["load_balancing_loss"] == 1.0123456789 and record["z_loss"] == 2.5e-3
    dense = format_log_line(replace(entry, moe_losses=()))
    assert "load_balancing_loss" not in dense and "load_balancing_loss" not in as_json_record(replace(entry, moe_losses=()))


# --- pretrain on 2 ranks: the layers live on both pipeline stages -------------------------------------------

ARGV = ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length",
        "16", "--vocab-size", "128", "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3",
        "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0", "--no-log-progress-bar",
        "--num-experts", "4", "--moe-router-topk", "2", "--moe-layer-freq", "[1,0,1,1]", "--moe-aux-loss-coeff",
        "0.01", "--moe-z-loss-coeff", "0.001", "--moe-per-layer-logging"]


def _records(pool, tmp_path, name, layout, world):
    log = tmp_path / f"{name}.jsonl"
    results = pool.run(pretrain_on_rank, ARGV + layout + ["--log-json", str(log)], world)
    lines = [line for line in results[world - 1] if "load_balancing_loss" in line]
    return lines, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.slow
def test_pp2_dp2_and_tp2_pretrain_log_every_moe_layer_as_one_process(rank_pools, tmp_path):
    """pp2 puts layer 0 on stage 0 and layers 2, 3 on stage 1; dp2 splits the step's 4 micro-batches over
    two ranks; tp2.sp splits each micro-batch's tokens (the aux loss is a share per rank). All log what one
    process logs (the same micro-batches, weights equal to fp32 rounding), and
    the line's load_balancing_loss is the mean of the per-layer values."""
    pool = rank_pools(2)
    _, reference = _records(pool, tmp_path, "one", [], 1)
    board = tmp_path / "tensorboard"
    for name, layout in (("pp2", ["--pipeline-model-parallel-size", "2", "--tensorboard-dir", str(board)]),
                         ("dp2", []), ("tp2.sp", ["--tensor-model-parallel-size", "2", "--sequence-parallel"])):
        lines, records = _records(pool, tmp_path, name, layout, 2)
        assert [r["iteration"] for r in records] == [1, 2] and len(lines) == 2
        for line, record, expected in zip(lines, records, reference):
            layers = record["moe_layers"]
            assert [entry["layer"] for entry in layers] == [0, 2, 3]
            for entry, want in zip(layers, expected["moe_layers"]):
                for key in ("load_balancing_loss", "z_loss"):
                    assert relative_error(torch.tensor(entry[key]), torch.tensor(want[key])) < 1e-5, (name, key)
                assert entry["dropped_fraction"] == 0.0  # dropless
                if record["iteration"] == 1:  # the same weights: the same routing
                    assert (entry["tokens_per_expert_min"], entry["tokens_per_expert_max"]) == (
                        want["tokens_per_expert_min"], want["tokens_per_expert_max"])
            mean = sum(entry["load_balancing_loss"] for entry in layers) / len(layers)
            assert relative_error(torch.tensor(record["load_balancing_loss"]), torch.tensor(mean)) < 1e-12
            parsed = parse_log_line(line)
            assert parsed["load_balancing_loss"] == float(f"{record['load_balancing_loss']:.6E}")
            assert parsed["z_loss"] == float(f"{record['z_loss']:.6E}")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(board), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"load_balancing_loss", "z_loss"} <= tags
    assert {f"moe/{name}_layer_{i}" for i in (0, 2, 3) for name in (
        "load_balancing_loss", "z_loss", "tokens_per_expert_min", "tokens_per_expert_max", "dropped_fraction")} <= tags
    assert [e.step for e in events.Scalars("moe/load_balancing_loss_layer_3")] == [1, 2]
