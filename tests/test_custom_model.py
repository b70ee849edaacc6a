"""A model defined outside megalith (examples/custom_model/tiny_lm.py), found by name: it is proven
exact by verify and trained by pretrain under tp2.pp2; bad names are one-line errors."""

import importlib.metadata
import json
import sys
from pathlib import Path

import pytest

from megalith.cli import main
from megalith.config import ModelConfig, parse_layout
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, ENTRY_POINT_GROUP, get_model_spec
from megalith.testing import log_record_errors, pretrain_on_rank
from megalith.verify import VerifySettings, _train_on_rank, compare, format_table, merge_ranks, run_verify

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python -m pytest` puts it there, plain `pytest` does not; forked ranks inherit it
    sys.path.insert(0, str(ROOT))

from examples.custom_model import tiny_lm  # noqa: E402

MODEL = "examples.custom_model.tiny_lm:SPEC"
CONFIG = ModelConfig(**tiny_lm.SPEC.defaults)
LAYOUTS = ["tp2", "pp2", "tp2.pp2", "tp2.pp2.sp", "pp2.vpp2.recompute-full", "tp2.dp2.sp.zero1"]


@pytest.mark.slow  # about 7 s; the pretrain test and the negative control below stay fast
def test_verify_proves_every_layout_equal_to_one_process(rank_pools):
    settings = VerifySettings(MODEL, CONFIG, steps=3)
    results = run_verify(settings, [parse_layout(t) for t in LAYOUTS], pool=rank_pools(4))
    print(format_table(results))
    assert [r.layout for r in results] == LAYOUTS
    for r in results:
        assert r.passed and max(r.loss_error, r.norm_error, r.grad_error, r.param_error) < 1e-5, r


def _train_without_grad_sync(ctx, settings, layout):
    original = tiny_lm.TinyLM.finish_grad_sync
    tiny_lm.TinyLM.finish_grad_sync = lambda self: None
    try:
        return _train_on_rank(ctx, settings, parse_layout(layout))
    finally:
        tiny_lm.TinyLM.finish_grad_sync = original


def test_negative_control_verify_catches_a_missing_sequence_parallel_sum(rank_pools):
    """The exactness check sees into a custom model: drop its SP gradient sums and tp2.sp fails."""
    pool, settings = rank_pools(4), VerifySettings(MODEL, CONFIG, steps=1)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("tp2.sp", reference, merge_ranks(pool.run(_train_without_grad_sync, settings, "tp2.sp")))
    assert not broken.passed and broken.grad_error > 0.1, broken
    assert any(part in broken.worst_grad for part in ("layernorm", "proj.bias", "fc2.bias")), broken.worst_grad


SMALL = ["--model", MODEL, "--mock-data", "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "16", "--vocab-size", "128",
         "--micro-batch-size", "1",
         "--global-batch-size", "8", "--lr", "3e-3", "--lr-warmup-iters", "1", "--min-lr", "1e-4", "--adam-eps", "1e-6",
         "--train-iters", "6", "--log-interval", "1", "--eval-interval", "3", "--eval-iters", "1",
         "--no-log-progress-bar"]


def test_pretrain_trains_it_under_tp2_pp2_as_one_process_does(rank_pools, tmp_path):
    records = {}
    for name, extra, world in (("one", [], 1), ("tp2.pp2.sp", ["--tensor-model-parallel-size", "2",
                                                                "--pipeline-model-parallel-size", "2",
                                                                "--sequence-parallel"], 4)):
        log = tmp_path / f"{name}.jsonl"
        lines = rank_pools(4).run(pretrain_on_rank, SMALL + extra + ["--log-json", str(log)], world)[world - 1]
        assert lines[0].startswith(f"megalith pretrain: {MODEL}, 4 layers, hidden 32"), lines[0]
        records[name] = [json.loads(line) for line in log.read_text().splitlines()]
    losses = [r["lm_loss"] for r in records["one"] if "consumed_samples" in r]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.1, losses
    errors = log_record_errors(records["one"], records["tp2.pp2.sp"])
    assert max(errors.values()) < 1e-5, errors


def test_names_resolve_to_built_ins_paths_and_entry_points(monkeypatch):
    assert get_model_spec("gpt") is BUILTIN_MODELS["gpt"]
    assert get_model_spec(MODEL) is tiny_lm.SPEC
    assert get_model_spec("examples.custom_model:tiny_lm.SPEC") is tiny_lm.SPEC  # dotted attributes, as entry points

    def entry_points(group):
        assert group == ENTRY_POINT_GROUP
        return importlib.metadata.EntryPoints([
            importlib.metadata.EntryPoint("tiny", MODEL, group),
            importlib.metadata.EntryPoint("gpt", MODEL, group),  # built-ins come first
            importlib.metadata.EntryPoint("twice", MODEL, group),
            importlib.metadata.EntryPoint("twice", "examples.custom_model.tiny_lm:OTHER", group),
        ])

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    assert get_model_spec("tiny") is tiny_lm.SPEC
    assert get_model_spec("gpt") is BUILTIN_MODELS["gpt"]
    with pytest.raises(ConfigError, match=r"declared by 2 entry points .* uninstall one"):
        get_model_spec("twice")


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("llama", "unknown model 'llama'; known models: gpt, bert, t5; for your own model give 'module.path:ATTRIBUTE'"),
        ("no_such_package.models:SPEC", "no module named 'no_such_package' on the Python path; install its package"),
        ("examples.custom_model.tiny_lm:NOPE", "has no attribute 'NOPE' (it defines the ModelSpecs SPEC)"),
        ("examples.custom_model.tiny_lm:TinyLM", "is a type, not a megalith.models.registry.ModelSpec"),
        ("examples.custom_model.tiny_lm:", "is not of the form 'module.path:ATTRIBUTE'"),
        ("broken_model:SPEC", "importing 'broken_model' raised ZeroDivisionError: division by zero; fix the module"),
        ("needs_missing:SPEC", "importing 'needs_missing' failed: No module named 'not_installed'; install what"),
    ],
)
def test_bad_names_are_one_line_errors(monkeypatch, tmp_path, capsys, name, fragment):
    (tmp_path / "broken_model.py").write_text("VALUE = 1 / 0\n")
    (tmp_path / "needs_missing.py").write_text("import not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: importlib.metadata.EntryPoints([]))
    for command in (["verify", "--layouts", "tp2"], ["pretrain", "--mock-data"]):
        assert main(command + ["--model", name]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
