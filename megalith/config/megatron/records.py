"""The record of one Megatron flag that megalith's own config fields do not define.

The compatibility table is plain data (tuples of `MegatronFlag`, one per line) so that the
parser, the refusal check and docs/flags.md all read one source. A flag is in exactly one of:
`accepted.ACCEPTED` (case c: a GPU tuning knob or log-only switch that changes nothing here),
the `refused_*` tables (case b: owned by another issue or not planned; refused only when given
a value other than Megatron's default), or `aliases.ALIASES` (case a: another spelling of a
flag megalith implements).
"""

from __future__ import annotations

from typing import NamedTuple

# How argparse reads a flag: "true" / "false" (store_true / store_false), "switch"
# (--x / --no-x), or a value type "int" / "float" / "str" with an optional nargs suffix
# "*", "+" or "?" (e.g. "int+": one or more integers).
ARITIES = ("true", "false", "switch", "int", "float", "str", "int*", "int+", "float+", "str*", "str+")


class Owner(NamedTuple):
    """Why a flag is refused: the issue that will implement it, or None when it is not planned."""

    clause: str  # completes "--flag is not supported yet: <clause>; drop the flag"
    issue: int | None = None


class MegatronFlag(NamedTuple):
    """One Megatron flag: its spellings, how argparse reads it, Megatron's default and meaning."""

    options: tuple[str, ...]
    arity: str
    default: object
    meaning: str  # what the flag does in Megatron (our words)
    note: object  # accepted: what it does here (str); refused: its Owner; alias: the target AliasTarget
    neutral: tuple = ()  # other values that mean the same as the default (e.g. --num-experts 0)


class AliasTarget(NamedTuple):
    """Where an alias sends its value: megalith's flag, and the value to give it (None: the flag's own)."""

    option: str
    value: object = None


def flag(options, arity: str, default, meaning: str, note, neutral: tuple = ()) -> MegatronFlag:
    """A MegatronFlag from one spelling (str) or several (tuple)."""
    spellings = (options,) if isinstance(options, str) else tuple(options)
    assert arity in ARITIES, f"{spellings[0]}: unknown arity {arity!r}"
    return MegatronFlag(spellings, arity, default, meaning, note, neutral)


def option_strings(record: MegatronFlag) -> tuple[str, ...]:
    """Every option string argparse gets for the record (a switch also gives --no-x)."""
    if record.arity == "switch":
        return record.options + tuple("--no-" + option[2:] for option in record.options)
    return record.options


def dest_name(record: MegatronFlag) -> str:
    """The namespace attribute of a table flag: prefixed, so it never collides with a config field."""
    return "megatron_" + record.options[0].lstrip("-").replace("-", "_")


def comparable(value):
    """Lists (nargs) become tuples, so a given value compares with the default and the neutral values."""
    return tuple(value) if isinstance(value, list) else value


def is_default(record: MegatronFlag, value) -> bool:
    """True when `value` means what Megatron's default means (the flag may then be given freely)."""
    value = comparable(value)
    return value == comparable(record.default) or value in record.neutral


# The owners of the refused flags (case b).
MOE = Owner("mixture of experts is issue 21", 21)
CONTEXT_PARALLEL = Owner("context parallelism is issue 22", 22)
FP8 = Owner("megalith's fp8 is Transformer Engine's delayed scaling from --fp8-format, --fp8-margin, "
            "--fp8-amax-history-len, --fp8-amax-compute-algo and --fp8-param-gather; other fp8/fp4 recipes and TE "
            "options are not implemented", None)
KERNELS = Owner("fused GPU kernels are issue 19", 19)
ZERO = Owner("ZeRO-2/3 and FSDP are issue 20", 20)
FAULT_TOLERANCE = Owner("fault tolerance (restarts, rerun checks, local checkpoints) is issue 23", 23)
ZERO_BUBBLE = Owner("zero-bubble pipelines (deferred weight gradients) are issue 18", 18)


def not_planned(what: str) -> Owner:
    """An owner for a feature megalith does not do and no issue will add."""
    return Owner(f"{what} is not planned for megalith", None)


def removed(replacement: str) -> Owner:
    """An owner for a flag that Megatron itself no longer accepts."""
    return Owner(f"Megatron rejects it too ({replacement})", None)
