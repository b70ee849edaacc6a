"""`megalith demo` proves TP and SP exact end to end; the CLI rejects bad input in one line."""

import subprocess
import sys
from dataclasses import replace

import pytest

from megalith.cli import main
from megalith.config import parse_layout
from megalith.demo import DemoSettings, _train_on_rank, compare, run_demo
from megalith.models.tiny_lm import TinyLM


def test_every_layout_matches_one_process(rank_pools):
    layouts = [parse_layout(t) for t in ["tp1", "tp2", "tp2.sp", "tp4", "tp4.sp"]]
    results = run_demo(layouts, DemoSettings(), pool=rank_pools(4))
    assert [r.layout for r in results] == ["tp1", "tp2", "tp2.sp", "tp4", "tp4.sp"]
    for r in results:
        assert r.passed, r
        assert len(r.losses) == 10
        assert r.losses[-1] < r.losses[0] - 0.5, "the tiny LM should learn its stream"


def train_without_sp_grad_sync(ctx, settings):
    original = TinyLM.finish_grad_sync
    TinyLM.finish_grad_sync = lambda self: None
    try:
        return _train_on_rank(ctx, settings, parse_layout("tp2.sp"))
    finally:
        TinyLM.finish_grad_sync = original


def test_a_missing_gradient_sum_is_caught(rank_pools):
    """Negative control: under SP, norm gradients not summed over tp must show up as FAIL."""
    pool, settings = rank_pools(4), replace(DemoSettings(), steps=3)
    reference = pool.run(_train_on_rank, settings, None)[0]
    broken = compare("tp2.sp", reference, pool.run(train_without_sp_grad_sync, settings)[0])
    assert not broken.passed
    assert broken.param_error > 1e-3


def test_cli_demo_runs_end_to_end():
    done = subprocess.run(
        [sys.executable, "-m", "megalith", "demo", "--layouts", "tp2.sp", "--steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "tp2.sp" in done.stdout and "PASS" in done.stdout
    assert "1 passed, 0 failed" in done.stdout


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["demo", "--layouts", "tp2.pp2"], "unknown layout token 'pp2'"),
        (["demo", "--layouts", "tp4.sp", "--seq-length", "10"], "sequence length 10 is not divisible"),
        (["demo", "--layouts", "tp3"], "hidden size 32 is not divisible by --tensor-model-parallel-size 3"),
        (["topology", "--world-size", "8", "--tp", "3"], "does not divide world size 8"),
    ],
)
def test_cli_bad_input_is_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1


def test_topology_lists_every_rank(capsys):
    assert main(["topology", "--world-size", "8", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "layout tp2.cp1.dp2.pp2 (world 8), order tp-cp-dp-pp"
    assert len(out) == 2 + 8
    assert out[-1].split()[:5] == ["7", "1", "0", "1", "1"]
