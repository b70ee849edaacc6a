"""The command line: verify end to end, one-line errors for bad input, topology."""

import subprocess
import sys

import pytest

from megalith.cli import main


def test_verify_runs_end_to_end():
    done = subprocess.run(
        [sys.executable, "-m", "megalith", "verify", "--layouts", "tp2.sp.recompute-selective", "--steps", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "tp2.sp.recompute-selective" in done.stdout and "PASS" in done.stdout
    assert "1 passed, 0 failed" in done.stdout


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["verify", "--layouts", "tp2.ep2.dp2"], "--expert-model-parallel-size 2 needs a mixture-of-experts model"),
        (["verify", "--layouts", "tp2.ep2"], "world size 2 is not divisible by --expert-tensor-parallel-size 2 x"),
        (["topology", "--world-size", "8", "--tp", "2", "--ep", "3"], "--expert-model-parallel-size 3 x "),
        (["verify", "--layouts", "tp2.xp2"], "unknown layout token 'xp2'"),
        (["verify", "--layouts", "tp2", "--params-dtype", "bf16"], "add the bf16 token to a layout (e.g. tp2.bf16)"),
        (["verify", "--layouts", "tp4.sp", "--seq-length", "30"], "sequence length 30 is not divisible by --tensor-model-parallel-size 4"),
        (["verify", "--layouts", "tp4", "--num-attention-heads", "6", "--hidden-size", "48"], "number of attention heads 6 is not divisible by --tensor-model-parallel-size 4"),
        (["verify", "--layouts", "tp4", "--group-query-attention", "--num-query-groups", "2"], "number of query groups 2 is not divisible by --tensor-model-parallel-size 4"),
        (["verify", "--layouts", "tp2", "--hidden-size", "60"], "hidden size 60 is not divisible by the number of attention heads 8"),
        (["verify", "--layouts", "tp2", "--group-query-attention", "--num-query-groups", "3"], "heads 8 is not divisible by the number of query groups 3"),
        (["verify", "--recompute-method", "block"], "need --recompute-granularity full"),
        (["topology", "--world-size", "8", "--tp", "3"], "world size 8 is not divisible by --tensor-model-parallel-size 3"),
    ],
)
def test_bad_input_is_one_line_before_any_rank_starts(capsys, argv, fragment):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert fragment in captured.err
    assert captured.err.count("\n") == 1
    assert "layout" not in captured.out  # nothing ran


def test_help_names_megatron_flags(capsys):
    with pytest.raises(SystemExit):
        main(["verify", "--help"])
    out = capsys.readouterr().out
    for flag in ("--num-query-groups", "--untie-embeddings-and-output-weights", "--recompute-granularity",
                 "--position-embedding-type", "--attention-softmax-in-fp32", "--micro-batches"):
        assert flag in out


def test_topology_lists_every_rank(capsys):
    assert main(["topology", "--world-size", "8", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "layout tp2.cp1.dp2.pp2 (world 8), order tp-cp-dp-pp"
    assert len(out) == 2 + 8
    assert out[-1].split()[:5] == ["7", "1", "0", "1", "1"]
