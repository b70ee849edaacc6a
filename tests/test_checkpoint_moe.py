"""Checkpoints of MoE models: expert tensors are pieces of the global [E, ...] tensors (ep splits
dim 0, etp their tensor-parallel dim), so a checkpoint reshards across ep and etp (ep2 -> ep4 ->
one process, tp2.sp -> tp1) and across the sharding strategies over edp, continuing the
uninterrupted run to 1e-6; bitwise when the layout is unchanged. Runs are trained, saved and
resumed as in tests/test_checkpoint.py; the piece geometry is checked without ranks."""

import json
from pathlib import Path

import pytest
import torch

from megalith.testing import relative_error
from megalith.training.checkpoint_format import (
    CheckpointError, CheckpointReader, Placement, global_shape, pieces, read_local, save_pieces, saved_layout,
)
from test_checkpoint import _train as train
from test_checkpoint import _values, assert_continues_under, assert_resumes_bitwise

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
       "--disable-bias-linear", "--moe-aux-loss-coeff", "0.01"]
EP, STRATEGY = "--expert-model-parallel-size", "--data-parallel-sharding-strategy"
SP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
BIAS = ["--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
        "0.05"]
LAYOUTS = {
    "dp1": (MOE, 1),
    "ep2": (MOE + [EP, "2"], 2),
    "ep4": (MOE + [EP, "4"], 4),
    "tp2.sp": (MOE + SP2, 2),  # the experts split over etp = tp 2
    "dp4.ep2.zero1": (MOE + [EP, "2", "--use-distributed-optimizer"], 4),  # experts sharded over edp 2
    "dp4.ep2.zero3": (MOE + [EP, "2", STRATEGY, "optim_grads_params"], 4),
    "dp4.ep2.zero3.bf16": (MOE + [EP, "2", STRATEGY, "optim_grads_params", "--bf16"], 4),
    "tp2.sp.dp2.zero1": (MOE + SP2 + ["--use-distributed-optimizer"], 4),
    "pp2.ep2": (MOE + [EP, "2", "--pipeline-model-parallel-size", "2"], 4),  # each stage's experts split over ep
    "dp1.bias": (MOE + BIAS, 1),
    "ep2.bias": (MOE + BIAS + [EP, "2"], 2),  # the router's expert_bias, a buffer training updates
}


def _train(pool, layout: str, log: Path, extra: list[str]) -> list[dict]:
    return train(pool, layout, log, extra, LAYOUTS)


def test_an_ep2_checkpoint_continues_under_ep4_then_one_process(rank_pools, tmp_path):
    """ep2 for 3 iterations, saved; ep4 for 1, saved; one process for 2: the uninterrupted ep2
    run's losses and norms to 1e-6."""
    pool, ckpt = rank_pools(8), str(tmp_path / "ckpt")
    straight = _train(pool, "ep2", tmp_path / "straight.jsonl", [])
    _train(pool, "ep2", tmp_path / "first.jsonl", ["--save", ckpt, "--exit-interval", "3"])
    ep4 = _train(pool, "ep4", tmp_path / "ep4.jsonl", ["--load", ckpt, "--save", ckpt, "--exit-interval", "4"])
    alone = _train(pool, "dp1", tmp_path / "alone.jsonl", ["--load", ckpt])
    assert [r["iteration"] for r in ep4 + alone] == [4, 5, 6]
    meta = json.loads((tmp_path / "ckpt" / "iter_0000004" / "metadata.json").read_text())
    assert (meta["layout"]["ep"], meta["layout"]["etp"], meta["format_version"]) == (4, 1, 2)
    for key in ("lm_loss", "grad_norm"):
        expected = torch.tensor(_values(straight, key, 3), dtype=torch.float64)
        moved = torch.tensor([r[key] for r in ep4 + alone], dtype=torch.float64)
        assert relative_error(moved, expected) < 1e-6, key


@pytest.mark.slow
@pytest.mark.parametrize("source, target", [
    ("tp2.sp", "dp1"),  # etp 2 -> etp 1
    ("dp4.ep2.zero1", "ep4"),  # expert fragments summed over edp 2, read back by four ep ranks
    ("dp4.ep2.zero3", "dp1"),  # sharded expert parameters too
    ("tp2.sp.dp2.zero1", "ep2"),  # etp 2 with ZeRO-1 -> ep 2
    ("ep2.bias", "dp1.bias"),
    ("pp2.ep2", "ep4"),
])
def test_an_moe_checkpoint_moves_between_expert_layouts(rank_pools, tmp_path, source, target):
    assert_continues_under(rank_pools(8), tmp_path, source, target, LAYOUTS)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep2", "dp4.ep2.zero1", "dp4.ep2.zero3.bf16", "tp2.sp",
                                    "ep2.bias"])
def test_resume_of_an_moe_run_is_bitwise(rank_pools, tmp_path, layout):
    assert_resumes_bitwise(rank_pools(8), tmp_path, layout, LAYOUTS)


@pytest.mark.slow
def test_an_ep_checkpoint_holds_the_global_tensors_of_one_process(rank_pools, tmp_path):
    """After two identical steps, ep2 with ZeRO-1 over edp 2 writes what one process writes: the
    same names, shapes and values (to fp32 rounding), optimizer state included, one file per ep rank."""
    pool = rank_pools(8)
    for layout in ("dp4.ep2.zero1", "dp1"):
        _train(pool, layout, tmp_path / f"{layout}.jsonl", ["--save", str(tmp_path / layout), "--exit-interval", "2"])
    sharded = CheckpointReader(str(tmp_path / "dp4.ep2.zero1" / "iter_0000002"))
    whole = CheckpointReader(str(tmp_path / "dp1" / "iter_0000002"))
    assert sharded.names() == whole.names() and "optimizer/exp_avg/decoder.layers.0.mlp.experts.weight1" in whole
    assert all(sharded.shape(n) == whole.shape(n) for n in whole.names())
    assert whole.shape("model/decoder.layers.0.mlp.experts.weight2") == (4, 32, 128)
    assert max(relative_error(sharded.read(n), whole.read(n)) for n in whole.names()) < 1e-5
    files = sorted(p.name for p in (tmp_path / "dp4.ep2.zero1" / "iter_0000002").glob("expert_*"))
    assert files == ["expert_rank_00_000_000.safetensors", "expert_rank_00_001_000.safetensors"]


# --- the pieces of an expert tensor, without ranks ---------------------------------------------


def test_expert_pieces_sit_at_their_experts_and_tensor_parallel_rows():
    swiglu = Placement(1, stride=2, experts=True)  # weight1 [E / ep, 2 F / etp, h]
    assert global_shape((2, 4, 3), swiglu, 2, ep_size=2) == (4, 8, 3)
    (gate, up) = pieces((2, 4, 3), swiglu, 1, 2, ep_rank=1, ep_size=2)
    assert (gate.expert_start, gate.dim, gate.local_start, gate.global_start, gate.length) == (2, 1, 0, 2, 2)
    assert (up.expert_start, up.local_start, up.global_start) == (2, 2, 6)
    assert pieces((2, 5), Placement(None, experts=True), 0, 2, 1, 2)[0].expert_start == 2  # replicated over etp
    assert pieces((8, 3), Placement(None), 0, 1)[0].expert_start is None  # a dense tensor: as before
    with pytest.raises(ValueError, match="dim 0 is the experts'"):
        pieces((2, 3), Placement(0, experts=True), 0, 1)


def _write(tmp_path, full: torch.Tensor, placement: Placement, etp: int, ep: int) -> CheckpointReader:
    """`full` cut as etp x ep ranks hold it, each (etp, ep) rank's pieces in a file of its own."""
    for e in range(ep):
        experts = full.chunk(ep, dim=0)[e]
        for t in range(etp):
            local = experts
            if placement.dim is not None:
                parts = experts.unflatten(placement.dim, (placement.stride, -1))
                local = parts.chunk(etp, dim=placement.dim + 1)[t].flatten(placement.dim, placement.dim + 1)
            shape = tuple(local.shape)
            save_pieces(str(tmp_path / f"expert_rank_{t:02d}_{e:03d}_000.safetensors"),
                        {"model/w": (local, global_shape(shape, placement, etp, ep),
                                     pieces(shape, placement, t, etp, e, ep))})
    (tmp_path / "metadata.json").write_text(json.dumps({"format_version": 2}))
    return CheckpointReader(str(tmp_path))


@pytest.mark.parametrize("placement", [Placement(1, stride=2, experts=True), Placement(2, experts=True),
                                       Placement(None, experts=True)])
def test_any_expert_layout_reads_into_any_other(tmp_path, placement):
    full = torch.arange(4 * 8 * 6, dtype=torch.float32).view(4, 8, 6)
    reader = _write(tmp_path, full, placement, etp=2, ep=2)
    assert torch.equal(reader.read("model/w"), full)
    for etp, ep in ((1, 1), (1, 4), (2, 1), (2, 4)):
        for t in range(etp):
            for e in range(ep):
                experts = full.chunk(ep, dim=0)[e]
                expected = experts
                if placement.dim is not None:
                    parts = experts.unflatten(placement.dim, (placement.stride, -1))
                    expected = parts.chunk(etp, dim=placement.dim + 1)[t].flatten(placement.dim, placement.dim + 1)
                got = read_local(reader, "model/w", tuple(expected.shape), placement, t, etp, e, ep)
                assert torch.equal(got, expected), (etp, ep, t, e)


def test_a_missing_expert_piece_is_one_line(tmp_path):
    reader = _write(tmp_path, torch.ones(4, 8, 6), Placement(2, experts=True), etp=2, ep=2)
    (tmp_path / "expert_rank_01_001_000.safetensors").unlink()
    reader = CheckpointReader(str(tmp_path))
    with pytest.raises(CheckpointError, match="cover 48 of the 96 elements asked for; the checkpoint is incomplete"):
        read_local(reader, "model/w", (2, 8, 6), Placement(2, experts=True), 0, 1, 1, 2)


def test_a_format_1_checkpoint_still_loads(tmp_path):
    """Written before expert pieces: no `starts` in the headers, no ep / etp in the layout."""
    full = torch.arange(24, dtype=torch.float32).view(4, 6)
    for t in range(2):
        save_pieces(str(tmp_path / f"mp_rank_{t:02d}_000.safetensors"),
                    {"model/w": (full.chunk(2, dim=1)[t], (4, 6), pieces((4, 3), Placement(1), t, 2))})
    meta = {"format_version": 1, "layout": {"world_size": 2, "tp": 2, "pp": 1, "dp": 1}}
    (tmp_path / "metadata.json").write_text(json.dumps(meta))
    reader = CheckpointReader(str(tmp_path))
    assert torch.equal(reader.read("model/w"), full)
    assert torch.equal(read_local(reader, "model/w", (4, 6), Placement(1), 0, 1), full)
    assert saved_layout(reader.metadata) == {"world_size": 2, "tp": 2, "pp": 1, "dp": 1, "ep": 1, "etp": 2}
    (tmp_path / "metadata.json").write_text(json.dumps({"format_version": 3}))
    with pytest.raises(CheckpointError, match="checkpoint format 3, this megalith reads formats 1, 2"):
        CheckpointReader(str(tmp_path))
