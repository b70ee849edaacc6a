"""Data parallelism, the distributed optimizer (ZeRO-1) and mixed precision equal one process.

Each layout trains with the real optimizer (clipping, LR schedule, weight decay, loss scaling)
through `megalith verify`; negative controls show that each mechanism is needed, and direct
probes show the overlap, the overflow skip and the optimizer's memory.
"""

import inspect
from dataclasses import replace

import pytest
import torch
from torch import nn

from megalith.config import ModelConfig, parse_layout
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec
from megalith.parallel.data_parallel import DataParallelGrads, _Done
from megalith.training import optimizer as optimizer_module
from megalith.verify import runner_after_one_step
from megalith.verify import (
    VerifySettings,
    _train_on_rank,
    build_runner,
    compare,
    global_batch,
    merge_ranks,
    plan,
    run_verify,
    sequence_mean_loss,
)

BASE = ModelConfig(**BUILTIN_MODELS["gpt"].defaults)
SETTINGS = VerifySettings("gpt", BASE, steps=5, micro_batches=4, micro_batch_size=2)
ISSUE_LAYOUTS = ["dp2", "dp2.zero1", "tp2.pp2.dp2.sp", "tp2.pp2.dp2.sp.zero1", "pp2.vpp2.dp2.zero1", "dp4.zero1"]


def assert_all_pass(results, layouts):
    assert [r.layout for r in results] == layouts
    for r in results:
        assert r.passed, r
        assert r.skipped_steps == 0, r
        assert r.losses[-1] < r.losses[0], r


@pytest.mark.slow  # about 20 s; the other verify tests here cover dp, ZeRO-1 and tp.dp in the fast tier
def test_issue_layouts_match_one_process(rank_pools):
    """dp=N equals one process over the same global batch, with and without ZeRO-1, in 3D layouts."""
    results = run_verify(SETTINGS, [parse_layout(t) for t in ISSUE_LAYOUTS], pool=rank_pools(8))
    assert_all_pass(results, ISSUE_LAYOUTS)
    for r in results:  # fp32: every column to 1e-5, grad norms included
        assert max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5


def test_sgd_and_linear_decay_without_clipping(rank_pools):
    settings = replace(SETTINGS, optimizer="sgd", lr=0.05, min_lr=0.0, lr_decay_style="linear", clip_grad=0.0, steps=3)
    layouts = ["dp2.zero1", "tp2.dp2.sp"]
    assert_all_pass(run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4)), layouts)


def test_bf16_and_fp16_layouts_match_one_process_in_their_precision(rank_pools):
    layouts = ["pp2.dp2.zero1.bf16", "tp2.dp2.sp.zero1.bf16", "dp2.fp16", "tp2.pp2.dp2.sp.zero1.fp16"]
    results = run_verify(replace(SETTINGS, steps=3), [parse_layout(t) for t in layouts], pool=rank_pools(8))
    assert_all_pass(results, layouts)
    bf16 = [r for r in results if r.layout.endswith("bf16")]
    assert all(r.param_error > 0 for r in bf16)  # really ran in bf16: not bit-identical to fp32 maths


# --- negative controls: each mechanism is needed ------------------------------------------


def _run_patched(ctx, settings, control):
    """Train the control's layout with one piece of the machinery disabled on every rank (then restored)."""
    layout_text, (target, name, replacement), _ = _controls()[control]
    original = inspect.getattr_static(target, name)  # a staticmethod stays one when restored
    setattr(target, name, replacement)
    try:
        return _train_on_rank(ctx, settings, parse_layout(layout_text))
    finally:
        setattr(target, name, original)


def _launch_without_communication(self, bucket):
    bucket.work = _Done()


def _controls():
    return {
        "no dp reduction": ("dp2", (DataParallelGrads, "_launch", _launch_without_communication), "grad"),
        # one bucket for everything: the tied embedding's slices differ between the first and last stage
        "tied embedding shares a bucket (Megatron #844)": (
            "pp2.dp2.zero1", (DataParallelGrads, "_own_bucket", staticmethod(lambda param: False)), "grad"),
        "tied copy counted twice in the norm": (
            "pp2", (optimizer_module, "_counted_in_norm",
                    lambda param, tp_rank: getattr(param, "tensor_parallel_dim", None) is not None or tp_rank == 0),
            "norm"),
        "tp-replicated parameters counted on every tp rank": (
            "tp2", (optimizer_module, "_counted_in_norm", lambda param, tp_rank: True), "norm"),
    }


@pytest.mark.parametrize("control", list(_controls()))
def test_negative_controls_fail(rank_pools, control):
    layout, _, column = _controls()[control]
    settings = replace(SETTINGS, steps=2, ddp_bucket_size=10**9)
    pool = rank_pools(4)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare(layout, reference, merge_ranks(pool.run(_run_patched, settings, control)))
    assert not broken.passed, broken
    assert getattr(broken, f"{column}_error") > 1e-3, broken
    healthy = compare(layout, reference, merge_ranks(pool.run(_train_on_rank, settings, parse_layout(layout))))
    assert healthy.passed, healthy


# --- overlap ---------------------------------------------------------------------------------


def _backward_launch_trace(ctx, overlap):
    """Per backward: how many bucket reductions had started before it; and the launches."""
    layout = parse_layout("dp2")
    settings = replace(SETTINGS, ddp_bucket_size=5_000, micro_batches=8, micro_batch_size=1)  # 4 per dp rank
    state = ctx.parallel_state(dp=2)
    if state is None:
        return None
    runner = build_runner(settings, layout, state)
    buffer = runner.buffers[0]
    buffer.overlap = overlap
    seen = []
    original = runner._before_backward

    def before_backward(chunk, last):
        seen.append((len(buffer.launches), last))
        original(chunk, last)

    runner._before_backward = before_backward
    micro = plan(settings, layout).batch.micro_batches(global_batch(settings, get_model_spec("gpt"), 0), state.dp_rank)
    runner.forward_backward(micro, lambda out, b: sequence_mean_loss(out, b, settings.global_batch_size))
    return seen, buffer.launches, len(buffer.buckets)


def test_bucket_reduction_starts_during_the_last_backward(rank_pools):
    seen, launches, buckets = rank_pools(2).run(_backward_launch_trace, True)[0]
    assert buckets >= 4
    # four micro-batches: nothing is communicated before the last backward starts
    assert seen == [(0, False), (0, False), (0, False), (0, True)]
    assert [launch.bucket for launch in launches] == list(range(buckets))  # each once, in backward order
    first = launches[0]
    assert first.hooks_fired < first.hooks_total  # launched while backward still had gradients to produce
    assert sum(launch.hooks_fired < launch.hooks_total for launch in launches) == buckets - 1


def test_without_overlap_buckets_start_after_backward(rank_pools):
    seen, launches, buckets = rank_pools(2).run(_backward_launch_trace, False)[0]
    assert len(launches) == buckets
    assert all(launch.hooks_fired == launch.hooks_total for launch in launches)


# --- fp16 overflow ---------------------------------------------------------------------------


def _train_with_injected_overflow(ctx, overflow_step, param_kind):
    """tp2.dp2 fp16: on rank 3 alone (tp rank 1, dp rank 1), one element of one parameter's
    gradient becomes inf during backward at `overflow_step`, before the dp reduction, as a real
    fp16 overflow would. `param_kind`: "sharded" (a tp-split weight, counted in the norm on every
    tp rank) or "replicated" (a norm weight, counted on tp rank 0 only: rank 3 must still see it)."""
    layout = parse_layout("tp2.dp2.fp16")
    settings = replace(SETTINGS, steps=4, hysteresis=1)
    state = ctx.parallel_state(tp=2, dp=2)
    if state is None:
        return None
    runner = build_runner(settings, layout, state)
    batch_plan = plan(settings, layout).batch
    spec, schedule = get_model_spec("gpt"), settings.lr_schedule()
    params = runner.buffers[0].params
    target = next(p for p in params if (getattr(p, "tensor_parallel_dim", None) is None) == (param_kind == "replicated"))
    current = {"step": -1}

    def overflow(grad):
        if current["step"] == overflow_step and ctx.rank == 3:
            grad = grad.clone()
            grad.view(-1)[0] = float("inf")
        return grad

    target.register_hook(overflow)
    records = []
    for step in range(settings.steps):
        current["step"] = step
        micro = batch_plan.micro_batches(global_batch(settings, spec, step), state.dp_rank)
        before = [p.detach().clone() for p in runner.chunks[0].parameters()]
        report = runner.train_step(micro, lambda out, b: sequence_mean_loss(out, b, settings.global_batch_size),
                                   schedule.lr_at(step))
        changed = any(not torch.equal(b, p) for b, p in zip(before, runner.chunks[0].parameters()))
        records.append((report.outcome.skipped, report.outcome.loss_scale, runner.optimizer.loss_scale, changed,
                        report.loss))
    return records


@pytest.mark.parametrize("param_kind", ["sharded", "replicated"])
def test_fp16_overflow_skips_the_step_on_every_rank_and_halves_the_scale(rank_pools, param_kind):
    per_rank = rank_pools(4).run(_train_with_injected_overflow, 1, param_kind)
    assert all(records == per_rank[0] for records in per_rank), per_rank  # every rank agrees, step by step
    skipped = [r[0] for r in per_rank[0]]
    assert skipped == [False, True, False, False]
    scale_used, scale_after = [r[1] for r in per_rank[0]], [r[2] for r in per_rank[0]]
    assert scale_used == [4096.0, 4096.0, 2048.0, 2048.0] and scale_after[1] == 2048.0
    changed = [r[3] for r in per_rank[0]]
    assert changed == [True, False, True, True]  # the skipped step leaves the weights alone
    losses = [r[4] for r in per_rank[0]]
    assert losses[3] < losses[0]  # training goes on


# --- optimizer memory ------------------------------------------------------------------------


def _memory_per_parameter(ctx, layout_text):
    runner = runner_after_one_step(ctx, replace(SETTINGS, steps=1, ddp_bucket_size=10**9), layout_text)
    if runner is None:
        return None
    params = sum(p.numel() for p in runner.chunks[0].parameters())
    return {key: value / params for key, value in runner.optimizer.memory_bytes().items()}


@pytest.mark.parametrize("layout, formula", [
    ("dp1.bf16", 6 + 12 / 1), ("dp2.zero1.bf16", 6 + 12 / 2), ("dp4.zero1.bf16", 6 + 12 / 4),
    ("dp2.bf16", 6 + 12), ("dp2", 4 + 4 + 8), ("dp4.zero1", 4 + 4 + 8 / 4),
])
def test_optimizer_memory_per_parameter_follows_the_formula(rank_pools, layout, formula):
    """bf16 params (2) + fp32 grads (4) + fp32 main weights and Adam's two moments (12) / dp with
    ZeRO-1; fp32 parameters are their own main weights (8 / dp of state)."""
    per_rank = [r for r in rank_pools(4).run(_memory_per_parameter, layout) if r is not None]
    for bytes_per_param in per_rank:
        total = sum(bytes_per_param.values())
        assert abs(total - formula) / formula < 0.002, (layout, bytes_per_param)


# --- buckets without processes -----------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedding = nn.Linear(10, 10)
        self.layer = nn.Linear(10, 30)
        self.head = nn.Linear(30, 10, bias=False)
        self.head.weight.shared_embedding = True


def test_buckets_follow_backward_order_and_keep_a_shared_embedding_alone():
    module = _Tied()
    buffer = DataParallelGrads(module, None, bucket_size=100)
    names = [[buffer.names[id(p)] for p in bucket.params] for bucket in buffer.buckets]
    assert names == [["head.weight"], ["layer.bias", "layer.weight"], ["embedding.bias", "embedding.weight"]]
    assert [b.size for b in buffer.buckets] == [300, 330, 110]
    assert buffer.grad_data.numel() == 740 and buffer.grad_data.dtype == torch.float32
    assert module.layer.weight.main_grad.data_ptr() == buffer.grad_data[300 + 30:].data_ptr()


def test_gradients_accumulate_in_the_buffer_over_micro_batches():
    module = nn.Linear(4, 3).to(torch.bfloat16)
    buffer = DataParallelGrads(module, None, accumulate_in_fp32=True)
    assert buffer.grad_data.dtype == torch.float32
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    expected = torch.zeros(3, 4)
    for last in (False, True):
        buffer.set_last_microbatch(last)
        out = module(x).float().sum()
        out.backward()
        expected += torch.ones(2, 3).t().float() @ x.float()
        assert module.weight.grad is None  # moved into the buffer
    buffer.finish()
    assert torch.allclose(module.weight.main_grad, expected, rtol=1e-2)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"bucket_size": 0}, "--ddp-bucket-size must be a positive number of elements"),
])
def test_bad_buffer_settings(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        DataParallelGrads(nn.Linear(2, 2), None, **kwargs)
    assert "\n" not in str(info.value)


def test_a_chunk_mixing_dtypes_is_refused():
    module = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2).to(torch.bfloat16))
    with pytest.raises(ConfigError, match="mixes parameter dtypes"):
        DataParallelGrads(module, None)


def test_layout_tokens_for_data_parallel_and_precision():
    layout = parse_layout("tp2.pp2.dp2.sp.zero1.bf16")
    assert (layout.tp, layout.pp, layout.dp, layout.zero, layout.distributed_optimizer, layout.precision) == (
        2, 2, 2, 1, True, "bf16")
    assert layout.world_size == 8 and str(layout) == "tp2.pp2.dp2.sp.zero1.bf16"
    assert str(parse_layout("dp4.zero1")) == "dp4.zero1"
    with pytest.raises(ConfigError, match="does not split into dp 4 x 3 micro-batches"):
        plan(SETTINGS, parse_layout("dp4.mb3"))
    with pytest.raises(ConfigError, match="--micro-batches 3 x --micro-batch-size 2 sequences does not split over "
                                          "dp 4; use --micro-batches that is a multiple of 4"):
        plan(replace(SETTINGS, micro_batches=3), parse_layout("dp4"))
