"""--optimizer-cpu-offload / --optimizer-offload-fraction: bitwise the run without offload (fp32,
bf16, fp16 with a skipped step, Adam and SGD, with and without ZeRO-1), the same checkpoints, the
host bytes counted, and one line for bad flags. On a CPU machine host and device coincide, but
the offloaded fragments get host copies and an optimizer of their own, which is what runs here."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megalith.config import ModelConfig, parse_layout
from megalith.config.arguments import parse_pretrain_args
from megalith.config.optimizer import OptimizerConfig
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec
from megalith.testing import pretrain_on_rank
from megalith.training.checkpoint_format import CheckpointReader
from megalith.training.loss_scaler import make_loss_scaler
from megalith.training.offload import HostOffload, HybridOptimizer, offloaded_count
from megalith.training.step import assemble_runner, sequence_mean_loss
from megalith.verify import VerifySettings, global_batch, plan

BASE = replace(ModelConfig(**BUILTIN_MODELS["gpt"].defaults), num_layers=2)
SETTINGS = VerifySettings("gpt", BASE, steps=3, micro_batches=4, micro_batch_size=2, clip_grad=0.05,
                          ddp_bucket_size=5_000, hysteresis=1)
SPEC = get_model_spec("gpt")


# --- which fragments: pure ------------------------------------------------------------------


def test_the_share_rounds_up_to_whole_fragments_in_order():
    sizes = [3, 3, 4]
    assert [offloaded_count(sizes, f) for f in (0.0, 0.1, 0.3, 0.31, 0.5, 0.6, 0.61, 1.0)] == [0, 1, 1, 2, 2, 2, 3, 3]
    assert offloaded_count([], 0.5) == 0 and offloaded_count([5], 1e-9) == 1


# --- bad input: one line, before any process group ----------------------------------------


ARGV = ["--mock-data", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "100", "--micro-batch-size", "1", "--global-batch-size", "4", "--lr", "2e-3",
        "--lr-warmup-iters", "1", "--lr-decay-style", "cosine", "--min-lr", "1e-4", "--adam-eps", "1e-6",
        "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "0", "--ddp-bucket-size", "3000",
        "--no-log-progress-bar", "--train-iters", "6", "--use-distributed-optimizer"]


@pytest.mark.parametrize("extra, fragment", [
    (["--optimizer-cpu-offload", "--optimizer-offload-fraction", "1.5"], "--optimizer-offload-fraction must be in "
                                                                         "[0.0, 1.0]"),
    (["--optimizer-cpu-offload", "--optimizer-offload-fraction", "-0.1"], "--optimizer-offload-fraction must be in"),
    (["--optimizer-offload-fraction", "0.5"], "takes effect only with --optimizer-cpu-offload"),
])
def test_bad_offload_flags_are_one_line(extra, fragment):
    with pytest.raises(ConfigError) as error:
        parse_pretrain_args(ARGV + extra, 2)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_the_flags_parse_with_sgd_too():
    config = parse_pretrain_args(ARGV + ["--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.25",
                                         "--optimizer", "sgd"], 2).optimizer
    assert (config.optimizer_cpu_offload, config.optimizer_offload_fraction, config.optimizer) == (True, 0.25, "sgd")
    default = parse_pretrain_args(ARGV + ["--optimizer-offload-fraction", "1.0"], 2).optimizer
    assert default.optimizer_cpu_offload is False
    OptimizerConfig(optimizer_cpu_offload=True, optimizer_offload_fraction=0.0)  # nothing offloaded: allowed


# --- bitwise against no offload -------------------------------------------------------------


def _train(settings, layout_text, state=None, fraction=None, overflow_step=None):
    """3 steps of `layout_text` (fraction None: no offload); what must match, and what to inspect."""
    layout = parse_layout(layout_text)
    step_plan = plan(settings, layout)
    scaler = make_loss_scaler(fp16=step_plan.model.params_dtype == "fp16", loss_scale=None,
                              initial_loss_scale=settings.initial_loss_scale, hysteresis=settings.hysteresis)
    config = settings.optimizer_config()
    if fraction is not None:
        config = replace(config, optimizer_cpu_offload=True, optimizer_offload_fraction=fraction)
    runner = assemble_runner(step_plan, state, config, scaler)
    optimizer, chunk = runner.optimizer, runner.chunks[0]
    if overflow_step is not None:  # an fp16 overflow in one gradient element, before the dp reduction
        current = {"step": -1}

        def overflow(grad):
            if current["step"] == overflow_step:
                grad = grad.clone()
                grad.view(-1)[0] = float("inf")
            return grad

        next(iter(chunk.parameters())).register_hook(overflow)
    dp_rank = state.dp_rank if state is not None else 0
    schedule, records = settings.lr_schedule(), []
    for step in range(settings.steps):
        if overflow_step is not None:
            current["step"] = step
        micro = step_plan.batch.micro_batches(global_batch(settings, SPEC, step), dp_rank)
        before = [p.detach().clone() for p in chunk.parameters()]
        report = runner.train_step(micro, lambda out, b: sequence_mean_loss(out, b, settings.global_batch_size),
                                   schedule.lr_at(step))
        changed = any(not torch.equal(b, p) for b, p in zip(before, chunk.parameters()))
        records.append((report.loss, report.outcome.skipped, report.outcome.grad_norm, report.outcome.loss_scale,
                        changed))
    runner.finish_param_gather()
    key = [(f.name, f.offset) for f in optimizer.fragments]
    return {
        "records": records,
        "params": {name: p.detach().clone() for name, p in chunk.named_parameters()},
        "mains": {k: f.main.detach().clone() for k, f in zip(key, optimizer.fragments)},
        "state": {k + (kind,): value.clone() for k, f in zip(key, optimizer.fragments)
                  for kind, value in optimizer.inner.state.get(f.main, {}).items()},
        "offloaded": [f.offloaded for f in optimizer.fragments],
        "sizes": [f.main.numel() for f in optimizer.fragments],
        "host_copies": all(f.main.data_ptr() != p.data_ptr() for f in optimizer.fragments if f.offloaded
                           for p in chunk.parameters()),
        "hybrid": isinstance(optimizer.inner, HybridOptimizer),
        "memory": optimizer.memory_bytes(),
        "backend": optimizer.backend.name,
    }


def _assert_bitwise(offloaded, plain, fraction):
    assert offloaded["records"] == plain["records"]  # losses, skips, norms, scales: float equality
    for part in ("params", "mains", "state"):
        assert offloaded[part].keys() == plain[part].keys(), part
        for key, value in plain[part].items():
            assert torch.equal(offloaded[part][key], value), (part, key)
    flags, sizes = offloaded["offloaded"], offloaded["sizes"]
    count = offloaded_count(sizes, fraction)
    assert flags == [True] * count + [False] * (len(flags) - count)
    assert sum(s for s, f in zip(sizes, flags) if f) >= fraction * sum(sizes)
    assert (0 < count < len(flags)) if fraction == 0.5 else all(flags)  # both parts really exist at 0.5
    assert offloaded["hybrid"] and offloaded["host_copies"] and "on the host" in offloaded["backend"]
    assert offloaded["memory"]["offloaded"] > 0 and plain["memory"]["offloaded"] == 0
    assert all(norm is None or norm > SETTINGS.clip_grad for _, _, norm, _, _ in plain["records"])  # clipping acts


@pytest.mark.parametrize("precision", ["dp1", "dp1.bf16"])
@pytest.mark.parametrize("fraction", [0.5, 1.0])
def test_one_process_offload_is_bitwise_no_offload(precision, fraction):
    plain = _train(SETTINGS, precision)
    _assert_bitwise(_train(SETTINGS, precision, fraction=fraction), plain, fraction)


def test_sgd_offload_is_bitwise_no_offload():
    settings = replace(SETTINGS, optimizer="sgd", lr=0.05)
    _assert_bitwise(_train(settings, "dp1.bf16", fraction=0.5), _train(settings, "dp1.bf16"), 0.5)


def test_fp16_overflow_skips_both_parts():
    plain = _train(SETTINGS, "dp1.fp16", overflow_step=1)
    offloaded = _train(SETTINGS, "dp1.fp16", fraction=0.5, overflow_step=1)
    assert [r[1] for r in plain["records"]] == [False, True, False]  # the step really was skipped
    assert [r[4] for r in plain["records"]] == [True, False, True]
    assert plain["records"][2][3] == plain["records"][0][3] / 2  # hysteresis 1: the scale halved
    _assert_bitwise(offloaded, plain, 0.5)
    steps = {float(v) for k, v in offloaded["state"].items() if k[-1] == "step"}
    assert steps == {2.0}  # host and device parts both took 2 of the 3 steps


def _memory_per_element(offloaded):
    memory, elements = offloaded["memory"], sum(offloaded["sizes"])
    return memory["main_params"] / elements, memory["optimizer_state"] / elements, memory["offloaded"] / elements


def test_memory_moves_to_the_host():
    """bf16 at fraction 1: the device keeps no main weight and no Adam state; the host holds 4 (main)
    + 4 (gradient staging) + 8 (moments) bytes per element."""
    offloaded = _train(SETTINGS, "dp1.bf16", fraction=1.0)
    assert _memory_per_element(offloaded) == (0.0, 0.0, 16.0)
    plain = _train(SETTINGS, "dp1.bf16")
    assert _memory_per_element(plain) == (4.0, 8.0, 0.0)
    assert offloaded["memory"]["params"] == plain["memory"]["params"]
    assert offloaded["memory"]["grads"] == plain["memory"]["grads"]


def _dp2_pairs(ctx, cases):
    state = ctx.parallel_state(dp=2)
    out = []
    for layout_text, fraction in cases:
        plain = _train(SETTINGS, layout_text, state)
        offloaded = _train(SETTINGS, layout_text, state, fraction=fraction)
        try:
            _assert_bitwise(offloaded, plain, fraction)
            out.append((layout_text, fraction, "ok"))
        except AssertionError as error:
            out.append((layout_text, fraction, f"differs: {error}"))
    return out


def test_dp2_with_and_without_zero1_is_bitwise(rank_pools):
    cases = [(f"dp2{zero}{precision}", fraction) for zero in (".zero1", "") for precision in ("", ".bf16")
             for fraction in (0.5, 1.0) if zero or fraction == 0.5]
    per_rank = rank_pools(2).run(_dp2_pairs, cases)
    for results in per_rank:
        assert results == [(layout, fraction, "ok") for layout, fraction in cases]


# --- through `megalith pretrain`: JSON log and checkpoints ------------------------------------


def _pretrain(pool, tmp_path, name, extra):
    log = tmp_path / f"{name}.jsonl"
    pool.run(pretrain_on_rank, ARGV + ["--log-json", str(log)] + extra, 2)
    return [json.loads(line) for line in log.read_text().splitlines() if "consumed_samples" in line]


def _same_checkpoints(a: Path, b: Path) -> None:
    first, second = CheckpointReader(str(a)), CheckpointReader(str(b))
    assert first.names() == second.names() and any(n.startswith("optimizer/exp_avg/") for n in first.names())
    for name in first.names():
        assert torch.equal(first.read(name), second.read(name)), name


@pytest.mark.parametrize("precision", [[], ["--bf16"]])
def test_checkpoints_are_the_same_and_resume_across_offload(rank_pools, tmp_path, precision):
    """dp2.zero1: a checkpoint saved with offload (fraction 0.5) holds the same tensors as without,
    and either one resumes under the other setting exactly as the uninterrupted run goes on."""
    pool, offload = rank_pools(2), ["--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.5"]
    extra = precision
    straight = _pretrain(pool, tmp_path, "straight", extra)
    for name, flags in (("plain", []), ("offload", offload)):
        first = _pretrain(pool, tmp_path, f"first_{name}", extra + flags + ["--save", str(tmp_path / name),
                                                                            "--exit-interval", "3"])
        for key in ("lm_loss", "grad_norm"):
            assert [r[key] for r in first] == [r[key] for r in straight[:3]], (name, key)
    assert first[0]["memory"]["offloaded_bytes"] > 0 and straight[0]["memory"]["offloaded_bytes"] == 0
    _same_checkpoints(tmp_path / "plain" / "iter_0000003", tmp_path / "offload" / "iter_0000003")
    for source, flags in (("plain", offload), ("offload", [])):
        resumed = _pretrain(pool, tmp_path, f"resumed_{source}", extra + flags + ["--load", str(tmp_path / source)])
        assert [r["iteration"] for r in resumed] == [4, 5, 6]
        for key in ("lm_loss", "grad_norm", "lr", "loss_scale"):
            assert [r[key] for r in resumed] == [r[key] for r in straight[3:]], (source, key)


def test_negative_control_the_write_back_is_needed(monkeypatch):
    """Without the host -> device copy the fp32 weights of the offloaded part never change: the
    comparisons above see the host path."""
    plain = _train(SETTINGS, "dp1")
    monkeypatch.setattr(HostOffload, "weights_to_device", lambda self: None)
    broken = _train(SETTINGS, "dp1", fraction=0.5)
    assert any(not torch.equal(broken["params"][n], p) for n, p in plain["params"].items())
