"""The one-process peer and benchmarks/peers.py: the plain loop does megalith's work (same losses
over two steps, the second after AdamW), a wrong weight is caught before any time counts, and the
driver runs end to end at a tiny size and writes the issue's rows. Nothing here is timed."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megalith.bench import plain_peer
from megalith.bench.harness import run_case
from megalith.config import ModelConfig
from megalith.testing import FP32_RELATIVE_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                   hidden_dropout=0.0, attention_dropout=0.0)


def losses_of_both(ctx, case, steps, perturb=False):
    sides = case.build(ctx, case.work)
    if sides is None:
        return None
    if perturb:
        with torch.no_grad():
            sides[1].model.final_norm.weight.mul_(2.0)  # twice the logits
    return [[side.step(step) for step in range(steps)] for side in sides]


def one_process_case(lr=1e-2):
    from dataclasses import replace

    case = plain_peer.cases(TINY, quick=True, micro_batch_size=2)[0]
    return replace(case, work=replace(case.work, lr=lr))


def test_the_plain_loop_trains_as_megalith_does(rank_pools):
    case = one_process_case()
    assert (case.work_name, case.peer, case.ranks) == ("one process", "plain", 1)
    ours, theirs = [r for r in rank_pools(2).run(losses_of_both, case, 2) if r is not None][0]
    assert len(ours) == len(theirs) == 2 and ours[0] != ours[1]
    errors = [abs(a - b) / abs(a) for a, b in zip(ours, theirs)]
    assert max(errors) < FP32_RELATIVE_TOLERANCE, errors


def test_a_peer_with_other_weights_differs(rank_pools):
    """Negative control: the plain side's final norm doubled shows in the losses."""
    ours, theirs = [r for r in rank_pools(2).run(losses_of_both, one_process_case(), 2, perturb=True) if r is not None][0]
    assert abs(ours[0] - theirs[0]) / abs(ours[0]) > 1e-4


def test_the_driver_writes_the_issues_rows(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--tiny", "--repeats", "1",
                           "--warmup", "1", "--peers", "plain", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["work"], r["peer"]) for r in rows] == [("one process", "plain")]
    assert set(rows[0]) == {"work", "peer", "megalith_ms", "peer_ms", "ratio"}
    assert rows[0]["ratio"] == pytest.approx(rows[0]["megalith_ms"] / rows[0]["peer_ms"])
    assert "one process" in done.stdout and "goal" in done.stdout


def test_the_driver_names_an_unknown_peer():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--peers", "plainn"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "unknown peer(s) ['plainn']" in done.stderr


@pytest.mark.parametrize("index", [0, 1], ids=["ddp", "fsdp2"])
def test_the_data_parallel_peers_train_as_megalith_does(rank_pools, index):
    from dataclasses import replace

    from megalith.bench import data_parallel_peers

    case = data_parallel_peers.cases(TINY, quick=True, micro_batch_size=2, micro_batches=2)[index]
    case = replace(case, work=replace(case.work, lr=1e-2))
    per_rank = [r for r in rank_pools(2).run(losses_of_both, case, 2) if r is not None]
    assert len(per_rank) == 2 and per_rank[0] == per_rank[1]  # both ranks report the same losses
    ours, theirs = per_rank[0]
    assert ours[0] != ours[1]
    errors = [abs(a - b) / abs(a) for a, b in zip(ours, theirs)]
    assert max(errors) < FP32_RELATIVE_TOLERANCE, (case.peer, errors)


def test_the_dtensor_peer_trains_as_megalith_tp2_sp_does(rank_pools):
    from dataclasses import replace

    from megalith.bench import tensor_parallel_peer

    case = tensor_parallel_peer.cases(TINY, quick=True, micro_batch_size=2)[0]
    assert (case.work_name, case.peer, case.ranks) == ("tp2+SP", "dtensor", 2)
    case = replace(case, work=replace(case.work, lr=1e-2))
    per_rank = rank_pools(2).run(losses_of_both, case, 2)
    assert per_rank[0] == per_rank[1]  # both ranks report the same losses
    ours, theirs = per_rank[0]
    assert ours[0] != ours[1]
    errors = [abs(a - b) / abs(a) for a, b in zip(ours, theirs)]
    assert max(errors) < FP32_RELATIVE_TOLERANCE, errors
