"""ZeRO-2 and ZeRO-3 (--data-parallel-sharding-strategy optim_grads / optim_grads_params) equal one
process, keep only shards of what they shard, and communicate what the formulas say.

Exactness runs through `megalith verify` (the real optimizer step: clipping, LR schedule, weight
decay, loss scaling) against the single-process reference, as tests/test_data_parallel.py does.
"""

from dataclasses import replace

import pytest
import torch
from torch import nn

from megalith.config import ModelConfig, parse_layout
from megalith.config.parallel import DistributedConfig, zero_stage
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec
from megalith.parallel.data_parallel import DataParallelGrads
from megalith.verify import runner_after_one_step
from megalith.verify import VerifySettings, build_runner, global_batch, plan, run_verify, sequence_mean_loss, train

BASE = ModelConfig(**BUILTIN_MODELS["gpt"].defaults)
SETTINGS = VerifySettings("gpt", BASE, steps=3, micro_batches=4, micro_batch_size=2)


def assert_exact(results, layouts):
    assert [r.layout for r in results] == [str(parse_layout(t)) for t in layouts]
    for r in results:
        assert r.passed and r.skipped_steps == 0, r
        assert max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5, r


# --- configuration ---------------------------------------------------------------------------


def test_strategy_names_map_to_zero_stages_and_the_alias_is_optim():
    assert [zero_stage(s, False) for s in ("no_shard", "optim", "optim_grads", "optim_grads_params")] == [0, 1, 2, 3]
    assert zero_stage("no_shard", True) == 1 and zero_stage("optim_grads", True) == 2
    assert DistributedConfig(data_parallel_sharding_strategy="optim_grads").zero_stage == 2
    assert parse_layout("dp2.zero2").zero == 2 and str(parse_layout("dp2.zero2")) == "dp2.zero2"
    assert parse_layout("dp2.zero2").sharded_gradients and not parse_layout("dp2.zero1").sharded_gradients


@pytest.mark.parametrize("kwargs, fragment", [
    ({"data_parallel_sharding_strategy": "zero9"}, "--data-parallel-sharding-strategy .zero9. is not one of no_shard"),
    ({"overlap_param_gather": True, "overlap_grad_reduce": True}, "--overlap-param-gather needs"),
])
def test_bad_strategy_input_is_one_line(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        DistributedConfig(**kwargs)
    assert "\n" not in str(info.value)


# --- ZeRO-2 without processes ------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [True, False])
def test_zero2_buffer_keeps_a_shard_and_frees_each_bucket_after_its_reduction(overlap):
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    reference = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))
    reference.load_state_dict(module.state_dict())
    buffer = DataParallelGrads(module, None, bucket_size=20, shard_grads=True, overlap=overlap)
    plain = DataParallelGrads(reference, None, bucket_size=20)
    assert buffer.shard and buffer.grad_data.numel() == sum(b.size for b in buffer.buckets)  # dp 1: the shard is all
    x = torch.randn(5, 4)
    for _ in range(3):  # three micro-batches: each reduced on its own, summed into the shard
        for buf, mod in ((buffer, module), (plain, reference)):
            buf.set_last_microbatch(True)
            mod(x).pow(2).sum().backward()
        assert all(b.grad is None for b in buffer.buckets) and module[0].weight.main_grad is None
    buffer.finish()
    plain.finish()
    assert len(buffer.launches) == 3 * len(buffer.buckets)
    whole = buffer.full_main_grads()
    for name, grad in plain.full_main_grads().items():
        assert torch.allclose(whole[name], grad, rtol=1e-6, atol=1e-7), name
    with buffer.full_grads([module[1].bias]):
        assert torch.equal(module[1].bias.main_grad, whole["1.bias"])
        module[1].bias.main_grad.mul_(2)
    assert module[1].bias.main_grad is None
    assert torch.equal(buffer.full_main_grads()["1.bias"], 2 * whole["1.bias"])


# --- exactness against one process -----------------------------------------------------------


ZERO2_LAYOUTS = ["dp2.zero2", "tp2.dp2.sp.zero2", "pp2.vpp2.dp2.zero2.recompute-full"]


def test_zero2_layouts_match_one_process(rank_pools):
    results = run_verify(SETTINGS, [parse_layout(t) for t in ZERO2_LAYOUTS], pool=rank_pools(8))
    assert_exact(results, ZERO2_LAYOUTS)


@pytest.mark.parametrize("bucket_size", [3000, 10**9])
def test_zero2_with_small_buckets_and_one_bucket(rank_pools, bucket_size):
    settings = replace(SETTINGS, ddp_bucket_size=bucket_size)
    layouts = ["dp4.zero2", "pp2.dp2.zero2"]
    assert_exact(run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4)), layouts)


# --- memory, counted from storage ------------------------------------------------------------


def _memory_per_parameter(ctx, layout_text: str):
    runner = runner_after_one_step(ctx, replace(SETTINGS, steps=1, ddp_bucket_size=10**9), layout_text)
    if runner is None:
        return None
    params = sum(p.numel() for p in runner.chunks[0].parameters())
    return {key: value / params for key, value in runner.memory_bytes().items()}


@pytest.mark.parametrize("layout, formula", [
    ("dp2.bf16", (2, 4, 12)), ("dp2.zero1.bf16", (2, 4, 12 / 2)), ("dp2.zero2.bf16", (2, 4 / 2, 12 / 2)),
    ("dp4.zero2.bf16", (2, 4 / 4, 12 / 4)), ("dp2.zero3.bf16", (2 / 2, 4 / 2, 12 / 2)),
    ("dp4.zero3.bf16", (2 / 4, 4 / 4, 12 / 4)),
])
def test_persistent_memory_per_parameter_follows_the_formula(rank_pools, layout, formula):
    """bf16 params, fp32 gradients, fp32 main weights + Adam's two moments, each from storage."""
    for per_param in filter(None, rank_pools(4).run(_memory_per_parameter, layout)):
        measured = (per_param["params_bytes"], per_param["grads_bytes"], per_param["optimizer_bytes"])
        for got, want in zip(measured, formula):
            assert abs(got - want) / want < 0.02, (layout, per_param)
        if "zero3" not in layout:
            assert per_param["gathered_peak_bytes"] == 0
        else:  # the root unit (embeddings, final norm) held through the chunk's backward plus one layer
            assert 0 < per_param["gathered_peak_bytes"] <= 2 * (1 + 2 / BASE.num_layers)


# --- ZeRO-3 -----------------------------------------------------------------------------------


ZERO3_LAYOUTS = ["dp4.zero3", "tp2.sp.dp2.zero3", "pp2.dp2.zero3", "pp2.vpp2.dp2.zero2.recompute-full",
                 "pp2.dp2.zero3.recompute-full", "pp2.dp2.zero3.zb-h1", "tp2.dp2.zero3.recompute-selective",
                 "pp2.vpp2.dp2.zero3.recompute-full", "pp2.vpp2.dp2.zero3.zb-v", "tp2.pp2.dp2.sp.zero3"]


def test_zero3_layouts_match_one_process(rank_pools):
    results = run_verify(SETTINGS, [parse_layout(t) for t in ZERO3_LAYOUTS], pool=rank_pools(8))
    assert_exact(results, ZERO3_LAYOUTS)


def test_zero3_pads_units_whose_size_dp_does_not_divide(rank_pools):
    """hidden 38: a layer has 12 h^2 + 13 h = 17822 parameters, not a multiple of 4: padded, not refused."""
    config = ModelConfig(**{**BUILTIN_MODELS["gpt"].defaults, "hidden_size": 38, "num_attention_heads": 2,
                            "num_layers": 2})
    assert (12 * 38 * 38 + 13 * 38) % 4 != 0
    odd = replace(SETTINGS, config=config, steps=2)
    layouts = ["dp4.zero3", "dp4.zero2"]
    assert_exact(run_verify(odd, [parse_layout(t) for t in layouts], pool=rank_pools(4)), layouts)


def _final_parameters(ctx, layout_text: str):
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(dp=layout.dp)
    if state is None:
        return None
    _, _, final, _ = train(SETTINGS, layout, state)
    return final if state.dp_rank == 0 else None


def test_bf16_strategies_give_no_shards_parameters(rank_pools):
    """After 3 steps every strategy's bf16 parameters are no_shard's, up to a bf16 rounding of fp32 main
    weights whose reduction order differs (per micro-batch reductions in ZeRO-2/3)."""
    finals = {}
    for text in ("dp2.bf16", "dp2.zero1.bf16", "dp2.zero2.bf16", "dp2.zero3.bf16"):
        finals[text] = next(r for r in rank_pools(2).run(_final_parameters, text) if r is not None)
    reference = finals.pop("dp2.bf16")
    for text, final in finals.items():
        for name, tensor in reference.items():
            difference = (final[name] - tensor).abs()
            assert difference.max() <= 2 ** -7 * tensor.abs().max() + 1e-12, (text, name)  # at most one bf16 ulp
            assert (difference > 0).float().mean() < 0.01, (text, name)


@pytest.mark.parametrize("model, layouts", [
    ("bert", ["tp2.pp2.dp2.sp.zero3", "pp2.dp2.zero2"]),
    ("t5", ["tp2.pp2.dp2.sp.zero3", "tp2.dp2.sp.zero2"]),
])
def test_bert_and_t5_under_zero2_and_zero3(rank_pools, model, layouts):
    spec = get_model_spec(model)
    settings = VerifySettings(model, spec.resolved(ModelConfig(**spec.defaults)), steps=3)
    assert_exact(run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(8)), layouts)


def test_fp16_with_the_loss_scaler_under_zero2_and_zero3(rank_pools):
    layouts = ["tp2.pp2.dp2.sp.zero3.fp16", "pp2.dp2.zero2.fp16"]
    results = run_verify(SETTINGS, [parse_layout(t) for t in layouts], pool=rank_pools(8))
    assert [r.layout for r in results] == layouts
    for r in results:  # in their precision's tolerance, as tests/test_data_parallel.py
        assert r.passed and r.skipped_steps == 0 and r.losses[-1] < r.losses[0], r


def _train_with_prefetch(ctx, layout_text: str, prefetch: bool):
    """Two steps of `layout_text` with --overlap-param-gather on or off: (final params, all-gathers, peak)."""
    from megalith.parallel.comm_ledger import CommLedger, counting
    from megalith.training.loss_scaler import make_loss_scaler
    from megalith.training.step import assemble_runner

    layout = parse_layout(layout_text)
    state = ctx.parallel_state(pp=layout.pp, dp=layout.dp)
    if state is None:
        return None
    step = replace(plan(SETTINGS, layout), overlap_param_gather=prefetch)
    runner = assemble_runner(step, state, SETTINGS.optimizer_config(), make_loss_scaler(fp16=False, loss_scale=None))
    ledger = CommLedger.for_state(state)
    for index in range(2):
        micro = step.batch.micro_batches(global_batch(SETTINGS, get_model_spec("gpt"), index), state.dp_rank)
        with counting(ledger):
            runner.train_step(micro, lambda out, b: sequence_mean_loss(out, b, SETTINGS.global_batch_size), 1e-3)
    with runner.gathered_parameters():
        final = {n: p.detach().clone() for c in runner.chunks for n, p in c.named_parameters()}
    return final, ledger.as_dict()["dp"]["all_gather"], runner.memory_bytes()["gathered_peak_bytes"]


@pytest.mark.parametrize("layout", ["dp2.zero3", "pp2.dp2.zero3"])
def test_zero3_prefetch_changes_nothing_but_when_gathers_start(rank_pools, layout):
    plain = rank_pools(4).run(_train_with_prefetch, layout, False)
    prefetched = rank_pools(4).run(_train_with_prefetch, layout, True)
    for (params, gathers, peak), (params_p, gathers_p, peak_p) in zip(filter(None, plain), filter(None, prefetched)):
        assert params.keys() == params_p.keys() and all(torch.equal(params[k], params_p[k]) for k in params)
        assert gathers_p["bytes"] >= gathers["bytes"] and peak_p >= peak  # one layer ahead: more may be alive


@pytest.mark.parametrize("overlap", [["--overlap-grad-reduce"], []])
def test_pretrain_takes_the_strategy_flag_and_every_strategy_logs_the_same_losses(rank_pools, tmp_path, overlap):
    """`megalith pretrain --data-parallel-sharding-strategy S` (with evaluation: forward without a graph)."""
    import json

    from megalith.testing import pretrain_on_rank

    argv = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--vocab-size", "128", "--micro-batch-size", "1", "--global-batch-size", "4",
            "--lr", "1e-3", "--train-iters", "3", "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "2",
            "--no-log-progress-bar"] + overlap
    logs = {}
    for strategy in ("no_shard", "optim", "optim_grads", "optim_grads_params"):
        log = tmp_path / f"{strategy}.jsonl"
        rank_pools(2).run(pretrain_on_rank, argv + ["--data-parallel-sharding-strategy", strategy,
                                                    "--log-json", str(log)], 2)
        logs[strategy] = [json.loads(line) for line in log.read_text().splitlines()]
    reference = [r["lm_loss"] for r in logs.pop("no_shard") if "lm_loss" in r]
    assert len(reference) == 3
    for strategy, records in logs.items():
        losses = [r["lm_loss"] for r in records if "lm_loss" in r]
        assert max(abs(a - b) / abs(b) for a, b in zip(losses, reference)) < 1e-5, strategy


def test_zero3_buffer_gathers_for_reading_and_writes_back_only_when_asked():
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2))
    expected = {name: p.detach().clone() for name, p in module.named_parameters()}
    buffer = DataParallelGrads(module, None, shard_params=True)
    assert module[0].weight.untyped_storage().nbytes() == 0  # freed until gathered
    with buffer.gathered_parameters():
        assert all(torch.equal(p, expected[n]) for n, p in module.named_parameters())
        module[0].weight.data.zero_()
    with buffer.gathered_parameters(writeback=True):
        assert torch.equal(module[0].weight, expected["0.weight"])  # not kept without writeback
        module[0].weight.data.fill_(2.0)
    assert module[0].weight.untyped_storage().nbytes() == 0 and buffer.gathered_peak_bytes > 0
    with buffer.gathered_parameters():
        assert bool((module[0].weight == 2.0).all())


def _bucket_peak(ctx, bucket_size: int):
    layout = parse_layout("dp2.zero2")
    settings = replace(SETTINGS, steps=1, ddp_bucket_size=bucket_size)
    state = ctx.parallel_state(dp=2)
    if state is None:
        return None
    runner = build_runner(settings, layout, state)
    micro = plan(settings, layout).batch.micro_batches(global_batch(settings, get_model_spec("gpt"), 0), state.dp_rank)
    runner.train_step(micro, lambda out, b: sequence_mean_loss(out, b, settings.global_batch_size), 1e-3)
    buffer = runner.buffers[0]
    return buffer.peak_bucket_grad_bytes, max(b.size for b in buffer.buckets) * 4, buffer.buckets[-1].end * 4


def test_zero2_full_size_gradients_exist_only_for_the_buckets_in_flight(rank_pools):
    """Small buckets: at most a few buckets' full-size buffers alive at once, far below the whole gradient."""
    for peak, largest, whole in filter(None, rank_pools(2).run(_bucket_peak, 3000)):
        assert largest <= peak <= 3 * largest < whole / 4
