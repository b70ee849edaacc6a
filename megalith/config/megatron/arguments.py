"""The table's flags on an argparse parser, the refusal of case (b), and the notice of case (c).

Flags are stored under prefixed dests (`megatron_<name>`), so they never collide with a config
field; an option the parser already defines is skipped (megalith implements it: case a). The
option strings the user typed are remembered on the namespace, like megalith's own flags.
"""

from __future__ import annotations

import argparse

from megalith.config.megatron.records import (AliasTarget, MegatronFlag, Owner, dest_name, is_default,
                                              option_strings)
from megalith.config.megatron.table import ACCEPTED, ALIASES, REFUSED
from megalith.errors import ConfigError

GROUP_TITLE = "Megatron compatibility"
GROUP_DESCRIPTION = ("Megatron-LM flags megalith parses but does not implement: GPU tuning knobs are accepted and "
                     "ignored (one notice); flags owned by other issues, or not planned, are refused unless left at "
                     "Megatron's default. See docs/flags.md.")
_GIVEN = "_megalith_megatron_flags_given"
_TYPES = {"int": int, "float": float, "str": str}


def _remember(namespace: argparse.Namespace, dest: str, option: str) -> None:
    setattr(namespace, _GIVEN, getattr(namespace, _GIVEN, ()) + ((dest, option),))


class _Store(argparse.Action):
    """Store the value (the const for a flag without a value) and remember the option string."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)
        _remember(namespace, self.dest, option_string)


class _Switch(argparse.BooleanOptionalAction):
    """`--x` / `--no-x`, remembered like _Store."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember(namespace, self.dest, option_string)


class _Alias(argparse.Action):
    """Hand the value to megalith's own flag (its action remembers that the user gave it)."""

    def __init__(self, option_strings, dest, target=None, target_action=None, **kwargs) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.target, self.target_action = target, target_action

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        value = self.target.value if self.target.value is not None else values
        self.target_action(parser, namespace, value, self.target.option)


def _argparse_kwargs(record: MegatronFlag) -> dict:
    arity = record.arity
    if arity in ("true", "false"):
        return {"action": _Store, "nargs": 0, "const": arity == "true"}
    if arity == "switch":
        return {"action": _Switch}
    kwargs = {"action": _Store, "type": _TYPES[arity.rstrip("*+")], "metavar": record.options[0][2:].upper()}
    if arity[-1] in "*+":
        kwargs["nargs"] = arity[-1]
    return kwargs


def status_text(record: MegatronFlag) -> str:
    """The record's status in words, for --help and docs/flags.md."""
    if isinstance(record.note, AliasTarget):
        value = f" {record.note.value}" if record.note.value is not None else ""
        return f"(a) another spelling of {record.note.option}{value}"
    if isinstance(record.note, Owner):
        return f"(b) refused unless at its default: {record.note.clause}"
    return f"(c) accepted and ignored: {record.note}"


def add_megatron_compat_arguments(parser: argparse.ArgumentParser) -> None:
    """Add every table flag that `parser` does not define yet, in one group "Megatron compatibility"."""
    existing = parser._option_string_actions  # argparse's own index of the options it has
    group = parser.add_argument_group(GROUP_TITLE, GROUP_DESCRIPTION)
    for record in ALIASES:
        target_action = existing.get(record.note.option)
        spellings = [option for option in record.options if option not in existing]
        if target_action is None or not spellings:
            continue
        extra = {"nargs": 0} if record.arity == "true" else {"type": _TYPES[record.arity], "metavar": "N"}
        group.add_argument(*spellings, action=_Alias, dest=dest_name(record), default=argparse.SUPPRESS,
                           target=record.note, target_action=target_action,
                           help=f"{record.meaning}: {status_text(record)}", **extra)
    for record in REFUSED + ACCEPTED:
        spellings = [option for option in record.options if option not in existing]
        if not spellings or (record.arity == "switch" and any(o in existing for o in option_strings(record))):
            continue
        text = f"{record.meaning}; {status_text(record)}; Megatron's default: {record.default}"
        group.add_argument(*spellings, dest=dest_name(record), default=record.default, help=text.replace("%", "%%"),
                           **_argparse_kwargs(record))


def _given(args: argparse.Namespace, records: tuple[MegatronFlag, ...]) -> list[tuple[MegatronFlag, str]]:
    """(record, option string) of the given flags among `records`, in command-line order, once each."""
    by_dest = {dest_name(record): record for record in records}
    seen, found = set(), []
    for dest, option in getattr(args, _GIVEN, ()):
        if dest in by_dest and dest not in seen:
            seen.add(dest)
            found.append((by_dest[dest], option))
    return found


def refused_flags(args: argparse.Namespace) -> list[str]:
    """The case (b) flags given with a value other than Megatron's default, in command-line order."""
    return [option for record, option in _given(args, REFUSED) if not is_default(record, getattr(args, dest_name(record)))]


def refuse_unsupported(args: argparse.Namespace) -> None:
    """Raise a one-line ConfigError naming the first refused flag (and any others) before anything starts."""
    refused = refused_flags(args)
    if not refused:
        return
    first = refused[0]
    owner = next(record.note for record in REFUSED if first in record.options)
    others = f" (also refused: {', '.join(refused[1:])})" if refused[1:] else ""
    raise ConfigError(f"{first} is not supported{' yet' if owner.issue else ''}: {owner.clause}; "
                      f"drop the flag{others}")


def accepted_given(args: argparse.Namespace) -> list[str]:
    """The case (c) flags the user gave, in command-line order."""
    return [option for _, option in _given(args, ACCEPTED)]


def compat_notice(args: argparse.Namespace) -> str | None:
    """One line naming the accepted-and-ignored flags, or None when none was given."""
    given = accepted_given(args)
    if not given:
        return None
    return f"accepted and ignored here: {', '.join(given)} (GPU tuning knobs; see docs/flags.md)"
