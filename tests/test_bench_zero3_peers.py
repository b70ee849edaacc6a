"""The ZeRO-3 rows of benchmarks/peers.py do megalith's work: FSDP2 with reshard_after_forward and
DeepSpeed ZeRO stage 3 train the same weights on the same batches with the same losses as megalith
over two steps (the second after an optimizer step), each side sharding as ZeRO-3 does; a wrong
weight on the peer shows. Nothing here is timed."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from megalith.bench import zero3_peers
from megalith.config import ModelConfig, parse_layout
from megalith.testing import FP32_RELATIVE_TOLERANCE

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                   hidden_dropout=0.0, attention_dropout=0.0)
STEPS = 2


def tiny_cases(deepspeed=True):
    cases = zero3_peers.cases(TINY, quick=True, micro_batch_size=2, micro_batches=2, deepspeed=deepspeed)
    return [replace(c, work=replace(c.work, lr=1e-2)) for c in cases]  # a wrong gradient shows in step 2


def sharding(side) -> dict:
    """What the peer side holds: FSDP2's block parameters are shards (DTensor) and it reshards after
    forward; DeepSpeed's are partitioned (stage 3, the word embedding not available between steps)."""
    if hasattr(side, "engine"):
        weight = side.engine.module.word_embeddings.weight
        return {"stage": side.engine.zero_optimization_stage(), "empty": weight.numel() == 0,
                "full": getattr(weight, "ds_numel", None)}
    from torch.distributed.tensor import DTensor

    block = side.model.layers[0]
    return {"dtensor": all(isinstance(p, DTensor) for p in block.parameters()),
            "reshard": block._get_fsdp_state()._fsdp_param_group.post_forward_mesh_info is not None}


def train_both(ctx, case, steps, perturb=False):
    ours, theirs = case.build(ctx, case.work)
    if perturb:
        with torch.no_grad():
            theirs.model.final_norm.weight.mul_(2.0)  # twice the logits
    held = sharding(theirs)
    return [[side.step(step) for step in range(steps)] for side in (ours, theirs)], held


def errors(per_rank):
    """Relative loss differences per step, after checking both ranks report the same losses."""
    assert len(per_rank) == 2 and per_rank[0][0] == per_rank[1][0]
    ours, theirs = per_rank[0][0]
    assert len(ours) == len(theirs) == STEPS and ours[0] != ours[1]
    return [abs(a - b) / abs(a) for a, b in zip(ours, theirs)]


def test_the_rows():
    cases = zero3_peers.cases(TINY, quick=True)
    assert [(c.work_name, c.peer, c.ranks) for c in cases] == [("dp2 ZeRO-3", "fsdp2", 2), ("dp2 ZeRO-3", "deepspeed", 2)]
    assert {(c.work.micro_batch_size, c.work.micro_batches, c.work.dp) for c in cases} == {(4, 4, 2)}
    assert [c.peer for c in zero3_peers.cases(TINY, quick=True, deepspeed=False)] == ["fsdp2"]
    assert parse_layout(zero3_peers.LAYOUT).zero == 3


def test_fsdp2_zero3_trains_as_megalith_does(rank_pools):
    case = tiny_cases()[0]
    per_rank = rank_pools(2).run(train_both, case, STEPS)
    assert all(held == {"dtensor": True, "reshard": True} for _, held in per_rank), per_rank
    assert max(errors(per_rank)) < FP32_RELATIVE_TOLERANCE


def test_a_fsdp2_peer_with_other_weights_differs(rank_pools):
    """Negative control: the peer's final norm doubled shows in the first loss."""
    assert errors(rank_pools(2).run(train_both, tiny_cases()[0], STEPS, perturb=True))[0] > 1e-4


@pytest.mark.slow  # about 5 s: deepspeed's import and its engine on every rank
def test_deepspeed_zero3_trains_as_megalith_does(rank_pools):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional peer: pip install -e '.[bench]'")
    case = tiny_cases()[1]
    per_rank = rank_pools(2).run(train_both, case, STEPS)
    full = TINY.vocab_size * TINY.hidden_size
    assert all(held == {"stage": 3, "empty": True, "full": full} for _, held in per_rank), per_rank
    assert max(errors(per_rank)) < FP32_RELATIVE_TOLERANCE


def test_the_driver_runs_the_zero3_rows_alone(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--tiny", "--repeats", "1",
                           "--warmup", "1", "--peers", "fsdp2", "--work", "ZeRO-3", "--json", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [(r["work"], r["peer"]) for r in json.loads(out.read_text())] == [("dp2 ZeRO-3", "fsdp2")]


def test_the_driver_names_a_filter_that_leaves_no_row():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peers.py"), "--peers", "plain",
                           "--work", "ZeRO-3"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "no row has peer in ['plain'] and work containing 'ZeRO-3'" in done.stderr
