"""benchmarks/moe.py run tiny: the alltoall dispatcher's bytes equal the formula exactly (ep2 on 2 ranks);
the timing sections run and report (no assertion about time)."""

import importlib.util
import json
from pathlib import Path

import pytest

from megalith.bench.moe_bench import dispatch_formula_bytes, time_grouped_against_loop, time_moe_against_dense

_SPEC = importlib.util.spec_from_file_location(
    "megalith_benchmarks_moe", Path(__file__).resolve().parent.parent / "benchmarks" / "moe.py")
moe_benchmark = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(moe_benchmark)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"hidden": 32, "experts": 8, "topk": 3}])
def test_alltoall_bytes_per_rank_and_direction_equal_topk_tokens_hidden_bytes(rank_pools, options):
    report = moe_benchmark.measure_bytes(rank_pools(2), **options)
    topk, hidden, experts = options.get("topk", 2), options.get("hidden", 16), options.get("experts", 4)
    formula = dispatch_formula_bytes(topk, 16, hidden, 4)  # 16 tokens per rank (8 x 2), fp32
    assert report["formula per rank"] == formula
    # each rank's own top-k x T rows, in forward (dispatch) and in backward (combine's gradient)
    assert report["dispatch forward per rank"] == [formula, formula]
    assert report["combine backward per rank (dispatch direction)"] == [formula, formula]
    # the way back carries what each rank's experts received: per rank it follows the routing, over all ranks
    # it is the same ep x top-k x T rows
    assert sum(report["combine forward per rank"]) == report["formula, all ranks"] == 2 * formula
    assert report["dispatch backward per rank (combine direction)"] == report["combine forward per rank"]
    assert report["counts exchange per rank"] == [experts * 8, experts * 8]  # E int64 counts
    assert all(0 <= local <= formula for local in report["local share of dispatch (rows kept on the rank)"])


def test_the_timing_sections_run_tiny_and_grouped_gemm_gives_the_loops_numbers(tmp_path):
    sides = time_moe_against_dense(hidden=16, layers=1, experts=4, moe_ffn=16, seq=8, batch=2, steps=1, warmup=0)
    assert sides["moe ms/step"] > 0 and sides["dense ms/step"] > 0
    # the same active parameters up to the router (E x h) and fc2's bias (E x h x k / E against h)
    assert sides["active params moe"] - sides["active params dense"] == 4 * 16 + 16
    gemm = time_grouped_against_loop(hidden=16, experts=4, ffn=16, rows=64, steps=1, warmup=0)
    assert gemm["max |grouped - loop| output"] <= 1e-6
    out = tmp_path / "moe.json"
    report = moe_benchmark.main(["--quick", "--skip-bytes", "--steps", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert set(report) == {"moe vs dense", "moe (grouped gemm) vs dense", "grouped gemm vs loop"}
