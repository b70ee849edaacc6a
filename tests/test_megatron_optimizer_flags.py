"""Megatron's optimizer and gradient flags: --decoupled-lr / --decoupled-min-lr,
--calculate-per-token-loss, --grad-reduce-in-bf16 and --overlap-param-gather, each with
Megatron's meaning, proven against one process (or against the run without the flag)."""

import math
from dataclasses import replace

import pytest
import torch

from megalith.config import Layout, ModelConfig, parse_layout
from megalith.config.arguments import parse_pretrain_args
from megalith.config.optimizer import OptimizerConfig
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec
from megalith.testing import log_record_errors, pretrain_on_rank, relative_error
from megalith.training.lr_schedule import LRSchedule, LRScheduler
from megalith.training.optimizer import LearningRates, is_embedding_or_output, learning_rates
from megalith.training.step import StepPlan, assemble_runner, forward_only, sequence_mean_loss, token_sum_loss
from megalith.verify import VerifySettings, global_batch, plan, run_verify

BASE = ModelConfig(**BUILTIN_MODELS["gpt"].defaults)
SETTINGS = VerifySettings("gpt", BASE, steps=3, micro_batches=4, micro_batch_size=2)
PER_TOKEN = replace(SETTINGS, calculate_per_token_loss=True)
SPEC = get_model_spec("gpt")


def _runner(settings, layout, state=None, optimizer=None, **plan_fields):
    step = replace(plan(settings, layout), **plan_fields)
    return assemble_runner(step, state, optimizer or settings.optimizer_config(), None)


def _mean_loss(settings):
    return lambda out, batch: sequence_mean_loss(out, batch, settings.global_batch_size)


def _micro(settings, layout, step, dp_rank=0):
    return plan(settings, layout).batch.micro_batches(global_batch(settings, SPEC, step), dp_rank)


# --- --decoupled-lr / --decoupled-min-lr ----------------------------------------------------


def test_decoupled_rate_follows_the_main_schedule_with_its_own_peak_and_floor():
    schedule = LRSchedule(lr=1e-3, train_iters=10, min_lr=1e-4, lr_warmup_iters=2, lr_warmup_init=1e-5,
                          lr_decay_style="cosine")
    config = OptimizerConfig(lr=1e-3, min_lr=1e-4, decoupled_lr=5e-3, decoupled_min_lr=5e-4, lr_warmup_init=1e-5)
    scheduler = LRScheduler(schedule)
    for step in range(12):
        rates = learning_rates(scheduler, config)
        if step <= 2:  # Megatron: the same warm-up from --lr-warmup-init, to the group's own peak
            expected = 1e-5 + (5e-3 - 1e-5) * step / 2
        elif step <= 10:
            expected = 5e-4 + 0.5 * (1 + math.cos(math.pi * (step - 2) / 8)) * (5e-3 - 5e-4)
        else:
            expected = 5e-4
        assert rates.main == schedule.lr_at(step)
        assert rates.decoupled == pytest.approx(expected, rel=1e-12)
        scheduler.step()
    # without --decoupled-min-lr the floor is --min-lr
    floor = learning_rates(LRScheduler(schedule, 10), replace(config, decoupled_min_lr=None))
    assert floor.decoupled == pytest.approx(1e-4)
    # without --decoupled-lr there is no decoupled rate (Megatron ignores --decoupled-min-lr then)
    assert learning_rates(scheduler, replace(config, decoupled_lr=None)) == LearningRates(scheduler.lr)


def test_embedding_and_output_parameters_are_megatrons():
    for name in ("embedding.word_embeddings.weight", "word_embeddings_for_head.weight", "output_layer.weight"):
        assert is_embedding_or_output(name, torch.zeros(2, 2))
    for name in ("embedding.position_embeddings.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.0.mlp.linear_fc1.weight", "lm_head.bias"):
        assert not is_embedding_or_output(name, torch.zeros(2, 2))
    marked = torch.zeros(2)
    marked.is_embedding_or_output_parameter = True  # a custom model's own marking wins
    assert is_embedding_or_output("head.w", marked)


def test_decoupled_groups_step_with_their_own_rate():
    """SGD without momentum, decay or clipping: an update is -rate x gradient, so each parameter
    shows which rate it got: the word embedding and untied output layer the decoupled one."""
    settings = replace(SETTINGS, config=replace(BASE, untie_embeddings_and_output_weights=True), optimizer="sgd",
                       weight_decay=0.0, clip_grad=0.0)
    config = replace(settings.optimizer_config(), sgd_momentum=0.0, decoupled_lr=0.5)
    runner = _runner(settings, Layout(), optimizer=config)
    runner.forward_backward(_micro(settings, Layout(), 0), _mean_loss(settings))
    chunk, buffer = runner.chunks[0], runner.buffers[0]
    before = {name: p.detach().clone() for name, p in chunk.named_parameters()}
    grads = {name: g.clone() for name, g in buffer.full_main_grads().items()}
    with pytest.raises(ValueError, match="LearningRates"):
        runner.optimizer.step(0.01)  # --decoupled-lr needs both rates
    runner.optimizer.step(LearningRates(0.01, 0.5))
    decoupled = set()
    for name, param in chunk.named_parameters():
        rate = -(param.detach() - before[name]).flatten() @ grads[name].flatten() / grads[name].flatten().square().sum()
        expected = 0.5 if is_embedding_or_output(name, param) else 0.01
        assert float(rate) == pytest.approx(expected, rel=1e-2), name  # 1e-2: fp32 rounding of w - update
        decoupled |= {name} if is_embedding_or_output(name, param) else set()
    assert decoupled == {"embedding.word_embeddings.weight", "output_layer.weight"}
    groups = runner.optimizer.inner.param_groups
    assert sorted(g["decoupled"] for g in groups) == [False, False, True]  # the two weights decay; no bias among them


def test_decoupled_min_lr_alone_changes_nothing_and_bad_values_are_one_line():
    runner = _runner(SETTINGS, Layout(), optimizer=replace(SETTINGS.optimizer_config(), decoupled_min_lr=1e-5))
    groups = runner.optimizer.inner.param_groups
    assert not any(g["decoupled"] for g in groups)
    assert sum(len(g["params"]) for g in groups) == len(runner.optimizer.fragments)  # every parameter is trained
    for kwargs, fragment in [({"decoupled_lr": 0.0}, "--decoupled-lr must be in"),
                             ({"decoupled_lr": 1e-4, "decoupled_min_lr": 1e-3}, "--decoupled-lr 0.0001 is below"),
                             ({"decoupled_min_lr": -1.0}, "--decoupled-min-lr must be in")]:
        with pytest.raises(ConfigError, match=fragment) as info:
            OptimizerConfig(**kwargs)
        assert "\n" not in str(info.value)


# --- --calculate-per-token-loss -------------------------------------------------------------


def test_per_token_loss_is_the_token_sum_over_the_token_count_of_the_whole_batch():
    """Four micro-batches: the step loss and gradients equal those of one forward over the whole
    global batch of sum(loss x mask) / sum(mask), not the mean of per-sequence or per-micro-batch means."""
    runner = _runner(PER_TOKEN, Layout())
    assert runner.per_token_loss
    loss, _ = runner.forward_backward(_micro(PER_TOKEN, Layout(), 0), token_sum_loss)
    grads = runner.buffers[0].full_main_grads()

    reference = _runner(PER_TOKEN, Layout())  # same seed: same weights
    batch = global_batch(PER_TOKEN, SPEC, 0)
    per_token = reference.chunks[0].pipeline_forward(None, batch)
    mask = batch["loss_mask"]
    expected = (per_token * mask).sum() / mask.sum()
    expected.backward()
    expected_grads = reference.buffers[0].full_main_grads()
    assert loss == pytest.approx(expected.item(), rel=1e-6)
    assert max(relative_error(grads[n], expected_grads[n]) for n in grads) < 1e-5
    per_micro = [(token_sum_loss(per_token[i:i + 2], {"loss_mask": mask[i:i + 2]})) for i in range(0, 8, 2)]
    mean_of_means = sum(float(s.detach() / c) for s, c in per_micro) / 4
    assert abs(mean_of_means - loss) > 1e-4  # the micro-batches hold different token counts: a real difference


def test_per_token_loss_under_dp2_equals_one_process(rank_pools):
    results = run_verify(PER_TOKEN, [parse_layout("dp2")], pool=rank_pools(2))
    r = results[0]
    assert max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5, r


@pytest.mark.slow  # about 15 s; dp2 above is the fast representative
def test_per_token_loss_under_pp_tp_and_3d_equals_one_process(rank_pools):
    layouts = ["pp2", "tp2", "pp2.dp2.zero1", "tp2.pp2.dp2.sp"]
    for r in run_verify(PER_TOKEN, [parse_layout(t) for t in layouts], pool=rank_pools(8)):
        assert max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5, r


# --- --grad-reduce-in-bf16 ------------------------------------------------------------------


def _bf16_grads(ctx, accumulate_in_fp32):
    layout = parse_layout("dp2.bf16")
    state = ctx.parallel_state(dp=2)
    if state is None:
        return None
    runner = _runner(SETTINGS, layout, state, accumulate_in_fp32=accumulate_in_fp32)
    runner.forward_backward(_micro(SETTINGS, layout, 0, state.dp_rank), _mean_loss(SETTINGS))
    buffer = runner.buffers[0]
    return ({name: g.float() for name, g in buffer.full_main_grads().items()}, buffer.grad_data.dtype,
            sum(launch.bytes for launch in buffer.launches), buffer.grad_data.numel())


def test_grad_reduce_in_bf16_halves_the_bytes_and_stays_within_bf16_rounding(rank_pools):
    pool = rank_pools(2)
    fp32_grads, fp32_dtype, fp32_bytes, elements = pool.run(_bf16_grads, True)[0]
    bf16_grads, bf16_dtype, bf16_bytes, _ = pool.run(_bf16_grads, False)[0]
    assert (fp32_dtype, bf16_dtype) == (torch.float32, torch.bfloat16)
    assert fp32_bytes == 4 * elements and bf16_bytes == 2 * elements  # what each rank sends: halved
    # The parameters' gradients are bf16 either way; the buffers differ only in the sums (two
    # micro-batches on a rank, then the two dp ranks), each rounded to bf16's 8 significant bits,
    # i.e. within 2^-9 of the partial sum it rounds. A few such roundings of partial sums near the
    # largest element: measured 5.9e-3 (3 x 2^-9) worst tensor; bound 4 x 2^-8 = 8 roundings.
    errors = {name: relative_error(bf16_grads[name], fp32_grads[name]) for name in fp32_grads}
    assert 0 < max(errors.values()) < 4 * 2.0**-8, errors


def test_grad_reduce_in_bf16_follows_megatron_in_the_config():
    bf16 = parse_pretrain_args(["--mock-data", "--bf16", "--grad-reduce-in-bf16"], 1)
    assert not bf16.distributed.accumulate_allreduce_grads_in_fp32
    assert not StepPlan.for_pretrain(bf16).accumulate_in_fp32
    forced = parse_pretrain_args(["--mock-data", "--bf16"], 1)
    assert StepPlan.for_pretrain(forced).accumulate_in_fp32  # --bf16 alone: fp32, as before
    fp32 = parse_pretrain_args(["--mock-data", "--grad-reduce-in-bf16"], 1)
    assert not fp32.distributed.grad_reduce_in_bf16
    assert any("--grad-reduce-in-bf16 applies to --bf16 only" in n for n in fp32.notices)


# --- --overlap-param-gather -----------------------------------------------------------------


def _train_zero1(ctx, layout_text, overlap, steps=3):
    """Train `steps` steps; with overlap, record what the gathers did around the second forward."""
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp, dp=layout.dp)
    if state is None:
        return None
    settings = replace(SETTINGS, config=replace(BASE, untie_embeddings_and_output_weights=True))
    runner = _runner(settings, layout, state, overlap_param_gather=overlap)
    schedule, losses, record = settings.lr_schedule(), [], {}
    for step in range(steps):
        micro = _micro(settings, layout, step, state.dp_rank)
        if step == 1 and overlap:
            record["pending_after_step"] = [b.gather is not None for buf in runner.buffers for b in buf.buckets]
            record["started"] = [[e.bucket for e in buf.gather_events if e.kind == "start"] for buf in runner.buffers]
            runner.forward_backward(micro, _mean_loss(settings))
            record["waits"] = [[(e.kind, e.bucket) for e in buf.gather_events if e.kind != "start"]
                               for buf in runner.buffers]
            record["buckets"] = [len(buf.buckets) for buf in runner.buffers]
            runner.optimizer.step(schedule.lr_at(step))
            losses.append(None)
            continue
        losses.append(runner.train_step(micro, _mean_loss(settings), schedule.lr_at(step)).loss)
    valid = runner.evaluate(_micro(settings, layout, 99, state.dp_rank), _mean_loss(settings),
                            forward_only(runner.actions))
    record["finished_by_eval"] = [[e.kind for e in buf.gather_events].count("finish") for buf in runner.buffers]
    assert all(b.gather is None for buf in runner.buffers for b in buf.buckets)
    params = {n: p.detach().clone() for chunk in runner.chunks for n, p in chunk.named_parameters()}
    return losses, valid, params, record


def _assert_overlapped_equals_plain(pool, layout_text):
    plain = pool.run(_train_zero1, layout_text, False)
    overlapped = pool.run(_train_zero1, layout_text, True)
    for a, b in zip(plain, overlapped):
        if a is None:
            continue
        (losses, valid, params, _), (o_losses, o_valid, o_params, record) = a, b
        assert [x for x, y in zip(losses, o_losses) if y is not None] == [y for y in o_losses if y is not None]
        assert valid == o_valid
        assert params.keys() == o_params.keys() and all(torch.equal(params[n], o_params[n]) for n in params)
        # the step left every bucket's gather in flight, started in forward order ...
        assert all(record["pending_after_step"])
        for started, waits, buckets in zip(record["started"], record["waits"], record["buckets"]):
            assert sorted(started) == list(range(buckets))
            assert [b for _, b in waits] == started  # issued in the order the forward needs them
            # ... and the next forward waited for each, in pre-hooks, none left for anyone else
            assert sorted(b for kind, b in waits) == list(range(buckets))
            assert {kind for kind, _ in waits} == {"forward"}
        assert record["finished_by_eval"] == record["buckets"]  # evaluation waited for the last step's gathers


def test_overlap_param_gather_is_bitwise_the_plain_gather_and_waits_in_forward(rank_pools):
    _assert_overlapped_equals_plain(rank_pools(2), "dp2.zero1")


@pytest.mark.slow  # about 10 s; dp2.zero1 above is the fast representative
def test_overlap_param_gather_under_pp2_dp2(rank_pools):
    _assert_overlapped_equals_plain(rank_pools(4), "pp2.dp2.zero1")


def test_the_flags_reach_the_step_plan():
    config = parse_pretrain_args(["--mock-data", "--calculate-per-token-loss", "--use-distributed-optimizer",
                                  "--overlap-grad-reduce", "--overlap-param-gather"], 2)
    step = StepPlan.for_pretrain(config)
    assert step.calculate_per_token_loss and step.overlap_param_gather
    assert not StepPlan.for_pretrain(parse_pretrain_args(["--mock-data"], 1)).overlap_param_gather


def test_overlap_param_gather_is_refused_without_its_prerequisites():
    for argv, fragment in [(["--overlap-param-gather", "--overlap-grad-reduce"], "needs --use-distributed-optimizer"),
                           (["--overlap-param-gather", "--use-distributed-optimizer"], "needs --overlap-grad-reduce")]:
        with pytest.raises(ConfigError, match=fragment) as info:
            parse_pretrain_args(["--mock-data", *argv], 2)
        assert "\n" not in str(info.value)


# --- the loop end to end ----------------------------------------------------------------------

SMALL = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "128", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "2e-3",
         "--adam-eps", "1e-6", "--log-interval", "1", "--eval-interval", "2", "--eval-iters", "1",
         "--ddp-bucket-size", "3000", "--overlap-grad-reduce", "--no-log-progress-bar", "--train-iters", "4"]


@pytest.mark.slow  # about 15 s: four short pretrain runs
def test_pretrain_with_per_token_loss_and_overlapped_gathers(rank_pools, tmp_path):
    """The loop's flags reach the step: per-token loss under dp2 equals one process; the
    overlapped gather (with evaluation and a checkpoint save in between) is bitwise the plain one."""
    def run(name, extra, world):
        log = tmp_path / f"{name}.jsonl"
        rank_pools(2).run(pretrain_on_rank, SMALL + extra + ["--log-json", str(log)], world)
        import json
        return [json.loads(line) for line in log.read_text().splitlines()]

    one = run("one", ["--calculate-per-token-loss"], 1)
    dp2 = run("dp2", ["--calculate-per-token-loss"], 2)
    assert max(log_record_errors(one, dp2).values()) < 1e-5
    assert min(log_record_errors(one, run("default", [], 1)).values()) > 1e-6  # the flag changed the loss
    zero1 = ["--use-distributed-optimizer", "--save", str(tmp_path / "ckpt"), "--save-interval", "2"]
    plain = run("plain", zero1, 2)
    overlapped = run("overlapped", zero1 + ["--overlap-param-gather", "--save", str(tmp_path / "ckpt2")], 2)
    assert max(log_record_errors(plain, overlapped).values()) == 0.0
