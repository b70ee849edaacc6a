"""docs/flags.md is generated from the `megalith pretrain` parser; it must match the parser."""

from pathlib import Path

from megalith.config.megatron.docs import COMMAND, render

DOC = Path(__file__).resolve().parent.parent / "docs" / "flags.md"


def test_flags_doc_matches_the_parser():
    assert DOC.read_text(encoding="utf-8") == render(), f"docs/flags.md is out of date; run: {COMMAND}"


def test_flags_doc_gives_every_flag_a_status():
    rows = [line for line in render().splitlines() if line.startswith("| `")]
    assert len(rows) > 500
    assert all(line.rstrip(" |").split("| ")[-1].startswith(("(a)", "(b)", "(c)")) for line in rows)
    assert "| `--context-parallel-size` | `1` |" in render() and "(a) for 1; larger sizes are issue 22" in render()
