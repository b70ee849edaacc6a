"""Split backward (zero-bubble pipelines): B computes input gradients and defers the linears'
weight gradients, W computes them; the result is a fused backward's, bitwise where the
reduction order is the same, and zb-h1 trains exactly as one process."""

from dataclasses import replace

import pytest
import torch

from megalith.cli import main
from megalith.config import ModelConfig, parse_layout
from megalith.models.registry import BUILTIN_MODELS
from megalith.parallel.layers import ColumnParallelLinear, RowParallelLinear, parallel_lm_logits
from megalith.parallel.weight_grad import deferring_weight_grads, run_deferred
from megalith.verify import VerifySettings, run_verify


def _layers():
    torch.manual_seed(0)
    return ColumnParallelLinear(16, 32, tp_group=None), RowParallelLinear(32, 16, tp_group=None)


def _run(split: bool):
    column, row = _layers()
    table = torch.nn.Parameter(torch.randn(40, 16))
    x = torch.randn(6, 2, 16, requires_grad=True)
    queue: list = []
    with deferring_weight_grads(queue) if split else torch.enable_grad():
        loss = parallel_lm_logits(row(torch.nn.functional.gelu(column(x))), table, None).square().mean()
    loss.backward()
    deferred = len(queue)
    weights_before_w = [p.grad is None for p in (column.weight, row.weight, table)]
    run_deferred(queue)
    grads = [x.grad] + [p.grad for p in (column.weight, column.bias, row.weight, row.bias, table)]
    return grads, deferred, weights_before_w


def test_b_defers_every_linear_weight_and_w_gives_the_fused_gradients_bitwise():
    fused, _, _ = _run(split=False)
    split, deferred, pending = _run(split=True)
    assert deferred == 3 and pending == [True, True, True]  # qkv-like, proj-like, the output layer
    for got, want in zip(split, fused):
        assert torch.equal(got, want)


def test_w_reaches_the_post_accumulate_hooks():
    column, _ = _layers()
    seen = []  # autograd calls the hook in B too, with no gradient (the data-parallel buffer skips those)
    column.weight.register_post_accumulate_grad_hook(lambda p: seen.append(None if p.grad is None else p.grad.clone()))
    queue: list = []
    with deferring_weight_grads(queue):
        y = column(torch.randn(4, 16))
    y.sum().backward()
    assert all(grad is None for grad in seen)
    run_deferred(queue)
    assert seen[-1] is not None and torch.equal(seen[-1], column.weight.grad)


def test_without_a_queue_nothing_is_deferred():
    column, _ = _layers()
    column(torch.randn(4, 16)).sum().backward()
    assert column.weight.grad is not None


BASE = ModelConfig(**BUILTIN_MODELS["gpt"].defaults)
ZB_LAYOUTS = ["pp2.zb-h1", "pp4.zb-h1", "tp2.pp2.sp.zb-h1", "pp2.dp2.zero1.zb-h1"]


def test_zb_h1_equals_one_process(rank_pools):
    settings = VerifySettings("gpt", BASE, steps=2, micro_batches=4, micro_batch_size=1)
    results = run_verify(settings, [parse_layout(t) for t in ZB_LAYOUTS], pool=rank_pools(4))
    assert [r.layout for r in results] == [str(parse_layout(t)) for t in ZB_LAYOUTS]
    assert all(r.passed for r in results), results


@pytest.mark.slow
@pytest.mark.parametrize("model", ["bert", "t5"])
def test_zb_h1_for_bert_and_t5(capsys, model):
    assert main(["verify", "--model", model, "--layouts", "pp2.zb-h1", "tp2.pp2.sp.zb-h1"]) == 0
    assert "2 passed, 0 failed" in capsys.readouterr().out


@pytest.mark.slow
def test_zb_h1_with_untied_output_recompute_and_few_micro_batches(rank_pools):
    config = replace(BASE, untie_embeddings_and_output_weights=True, recompute_granularity="full",
                     recompute_method="uniform", recompute_num_layers=1)
    settings = VerifySettings("gpt", config, steps=2, micro_batches=6, micro_batch_size=1)
    layouts = ["pp4.zb-h1.mb2", "pp2.zb-h1.mb3"]
    results = run_verify(settings, [parse_layout(t) for t in layouts], pool=rank_pools(4))
    assert all(r.passed for r in results), results


PRETRAIN = ["--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--vocab-size", "128", "--micro-batch-size", "1", "--global-batch-size", "8", "--train-iters", "3",
            "--log-interval", "1", "--eval-iters", "0", "--no-log-progress-bar", "--pipeline-model-parallel-size", "2",
            "--tensor-model-parallel-size", "2", "--sequence-parallel", "--overlap-grad-reduce"]


def test_pretrain_with_zb_h1_logs_1f1bs_losses(rank_pools, tmp_path):
    import json

    from megalith.testing import log_record_errors, pretrain_on_rank

    logs = {}
    for schedule in ("1f1b", "zb-h1"):
        logs[schedule] = tmp_path / f"{schedule}.jsonl"
        rank_pools(4).run(pretrain_on_rank, PRETRAIN + ["--pipeline-schedule", schedule, "--log-json",
                                                        str(logs[schedule])], 4)
    records = {k: [json.loads(line) for line in open(v, encoding="utf-8")] for k, v in logs.items()}
    errors = log_record_errors(records["1f1b"], records["zb-h1"], keys=("lm_loss", "grad_norm"))
    assert all(error < 1e-6 for error in errors.values()), errors


ZB_V_LAYOUTS = ["pp2.vpp2.zb-v", "pp4.vpp2.zb-v", "tp2.pp2.vpp2.sp.zb-v", "pp2.vpp2.dp2.zero1.zb-v"]


def test_zb_v_equals_one_process(rank_pools):
    """Two chunks per rank in a V: the turn handed over on rank pp - 1, the tied embedding's copies
    (first and last stage, both on rank 0) summed there."""
    settings = VerifySettings("gpt", BASE, steps=2, micro_batches=4, micro_batch_size=1)
    results = run_verify(settings, [parse_layout(t) for t in ZB_V_LAYOUTS], pool=rank_pools(4))
    assert all(r.passed for r in results), results


def _train_without_the_local_tied_sum(ctx, settings, layout):
    from megalith.training import step
    from megalith.verify import _train_on_rank

    original = step.local_tied_copies

    def unsummed(chunks):
        original(chunks)  # clears the shared marks
        return []
    step.local_tied_copies = unsummed
    try:
        return _train_on_rank(ctx, settings, parse_layout(layout))
    finally:
        step.local_tied_copies = original


def test_negative_control_zb_v_must_sum_the_tied_copies(rank_pools):
    from megalith.verify import _train_on_rank, compare, merge_ranks

    pool, settings = rank_pools(4), VerifySettings("gpt", BASE, steps=2, micro_batches=4)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("pp2.vpp2.zb-v", reference,
                     merge_ranks(pool.run(_train_without_the_local_tied_sum, settings, "pp2.vpp2.zb-v")))
    assert not broken.passed and "word_embeddings" in broken.worst_grad


def _sequence_parallel_column(ctx, split: bool):
    """ColumnParallelLinear under sp on a tp2 group: (deferred count, weight grad None before W, grads)."""
    state = ctx.parallel_state(tp=2, dp=1)
    if state is None:
        return None
    torch.manual_seed(0)
    column = ColumnParallelLinear(16, 32, tp_group=state.tp_group, sequence_parallel=True)
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(1 + state.tp_rank), requires_grad=True)
    queue: list = []
    with deferring_weight_grads(queue) if split else torch.enable_grad():
        out = column(x)
    out.square().sum().backward()
    pending = column.weight.grad is None
    deferred = len(queue)
    run_deferred(queue)
    return deferred, pending, [x.grad, column.weight.grad, column.bias.grad]


def test_the_sequence_parallel_linear_defers_its_weight_gradient(rank_pools):
    fused = [r for r in rank_pools(4).run(_sequence_parallel_column, False) if r is not None]
    split = [r for r in rank_pools(4).run(_sequence_parallel_column, True) if r is not None]
    for (_, _, want), (deferred, pending, got) in zip(fused, split):
        assert deferred == 1 and pending
        assert all(torch.equal(g, w) for g, w in zip(got, want))
