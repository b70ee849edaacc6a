"""docs/flags.md, generated from the `megalith pretrain` parser: every flag, its default, its meaning
and its status (a, b or c). Regenerate with `python -m megalith.config.megatron.docs > docs/flags.md`;
tests/test_flags_doc.py fails when the file and the parser disagree.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from megalith.config.megatron.arguments import GROUP_TITLE, status_text
from megalith.config.megatron.records import AliasTarget, Owner, dest_name
from megalith.config.megatron.table import TABLE

COMMAND = "python -m megalith.config.megatron.docs > docs/flags.md"
# megalith's own flags (no Megatron flag of that name): (a), with megalith's meaning.
OWN_FLAGS = ("--model", "--params-dtype", "--post-layer-norm", "--num-tokentypes", "--activation",
             "--pipeline-schedule", "--log-json", "--log-progress-bar", "--config")

HEADER = f"""# Flags of `megalith pretrain`

Generated from the parser by `{COMMAND}`; do not edit by hand.

Every Megatron-LM flag lands in one of three cases:

- **(a)** implemented with Megatron's meaning and default (a few defaults of the model's shape come
  from `--model`'s registry entry), or another spelling of such a flag;
- **(b)** refused: owned by another open issue, or not planned. A refused flag may still be given
  at Megatron's default (`--num-experts 0`, `--moe-router-topk 2`); any other value stops
  the run at start-up with one line, e.g. `--num-experts is not supported yet: mixture of experts is
  issue 21; drop the flag`;
- **(c)** accepted and ignored: a GPU tuning knob or a log-only switch that changes no number
  megalith computes; the run prints one notice naming them.

`verify` and `bench-overhead` parse the (b) and (c) flags too, with the same rules.
"""


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _default(value: object) -> str:
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value)) if value else "(none)"
    return f"`{value}`"


def _field_index() -> dict:
    from megalith.config.pretrain import SECTIONS

    return {f.name: f for cls in SECTIONS.values() for f in fields(cls)}


def _own_row(action: argparse.Action, spec) -> str:
    names = " / ".join(f"`{option}`" for option in action.option_strings)
    meaning = spec.metadata["help"] if spec is not None else (action.help or "").split("; default")[0]
    status = (spec.metadata.get("status") if spec is not None else None) or "(a)"
    if any(option in OWN_FLAGS for option in action.option_strings):
        status += " megalith's own flag"
    return f"| {names} | {_default(action.default)} | {_cell(meaning)} | {_cell(status)} |"


def _table_row(action: argparse.Action, record) -> str:
    names = " / ".join(f"`{option}`" for option in action.option_strings)
    default = record.default if not isinstance(record.note, AliasTarget) else "-"
    return f"| {names} | {_default(default)} | {_cell(record.meaning)} | {_cell(status_text(record))} |"


def _table(rows: list[str]) -> list[str]:
    return ["| flag | default | meaning | status |", "| --- | --- | --- | --- |", *rows, ""]


def render(parser: argparse.ArgumentParser | None = None) -> str:
    """The text of docs/flags.md for `parser` (default: the `megalith pretrain` parser)."""
    if parser is None:
        from megalith.config.arguments import build_pretrain_parser

        parser = build_pretrain_parser()
    specs = _field_index()
    records = {dest_name(record): record for record in TABLE}
    lines = [HEADER]
    compat: dict[str, list[str]] = {}
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        if group.title == GROUP_TITLE:
            for action in actions:
                record = records[action.dest]
                compat.setdefault(_section_of(record), []).append(_table_row(action, record))
            continue
        lines += [f"## {group.title}", "", *_table([_own_row(action, specs.get(action.dest)) for action in actions])]
    for title in sorted(compat, key=_section_order):
        lines += [f"## {GROUP_TITLE}: {title}", "", *_table(compat[title])]
    return "\n".join(lines).rstrip("\n") + "\n"


def _section_of(record) -> str:
    if isinstance(record.note, AliasTarget):
        return "(a) other spellings"
    if isinstance(record.note, Owner):
        return f"(b) issue {record.note.issue}" if record.note.issue else "(b) not planned"
    return "(c) accepted and ignored"


def _section_order(title: str) -> tuple:
    return (title[:3], title)


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
