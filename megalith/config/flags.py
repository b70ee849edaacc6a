"""Command-line flags generated from dataclass fields, once for every command.

A field declared with `flag_field` carries its help text and choices; `add_config_arguments`
turns each field into Megatron's `--flag-name`, and the YAML loader reads the same metadata, so a
flag's name, type and choices have one home: the field.
"""

from __future__ import annotations

import argparse
from dataclasses import field, fields

_EXPLICIT = "_megalith_explicit_flags"


def flag_field(default, help: str, choices: tuple | None = None, status: str | None = None):
    """A dataclass field whose `--flag` gets this help text and choices (`status`: a note for docs/flags.md)."""
    return field(default=default, metadata={"help": help, "choices": choices, "status": status})


def field_choices(spec) -> tuple | None:
    """The choices a field's flag accepts (None: any value of its type)."""
    return spec.metadata.get("choices")


def _remember_explicit(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, _EXPLICIT, explicit_flags(namespace) | {dest})


class _StoreFlag(argparse.Action):
    """Store the value and remember that the user gave it (so a config file does not override it)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _remember_explicit(namespace, self.dest)


class _StoreTuple(_StoreFlag):
    """Several words as one tuple (frozen configs stay hashable), remembered like _StoreFlag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, tuple(values), option_string)


class _SwitchFlag(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, remembered like _StoreFlag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember_explicit(namespace, self.dest)


class _NegativeSwitch(_StoreFlag):
    """A field already named as a negation (`no_load_optim`): `--no-load-optim` sets it, and there is
    no `--no-no-...` (argparse's BooleanOptionalAction would read the leading `--no-` as "off")."""

    def __init__(self, option_strings, dest, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, True, option_string)


def explicit_flags(namespace: argparse.Namespace) -> set[str]:
    """The fields (dest names) whose flags were given on the command line, not left at their default."""
    return set(getattr(namespace, _EXPLICIT, ()))


def flag_fields(cls) -> list:
    """The fields of `cls` that are flags (declared with flag_field)."""
    return [f for f in fields(cls) if "help" in f.metadata]


def add_config_arguments(parser, cls, overrides: dict | None = None) -> None:
    """One `--flag-name` per flag field of `cls` (Megatron's spelling); defaults from the class or `overrides`.

    Help text and choices come from the field (see flag_field). Flags the user gives are
    remembered on the namespace: see explicit_flags.
    """
    overrides = overrides or {}
    for f in flag_fields(cls):
        name = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, f.default)
        choices = field_choices(f)
        parts = [f.metadata["help"].replace("%", "%%")] if f.metadata["help"] else []
        parts += [f"one of {', '.join(map(str, choices))}"] if choices else []
        parts += ["default: %(default)s" + (" (derived)" if default is None and not parts else "")]
        text = "; ".join(parts)
        kind = str(f.type)
        if kind.startswith("bool"):
            switch = _NegativeSwitch if f.name.startswith("no_") else _SwitchFlag
            action = parser.add_argument(name, action=switch, default=default, help=text)
            action.help = text  # some Pythons append the default themselves; keep one
            continue
        if kind.startswith("tuple"):  # a list of words, e.g. --data-path 0.3 A 0.7 B (or of ints)
            parser.add_argument(name, action=_StoreTuple, nargs="+", type=int if "int" in kind else str,
                                default=default, metavar=f.name.upper(), help=text)
            continue
        convert = int if "int" in kind else float if "float" in kind else str
        parser.add_argument(name, action=_StoreFlag, type=convert, default=default, choices=choices,
                            metavar=f.name.upper(), help=text)


def config_from_arguments(args, cls, **others):
    """Build the dataclass from the parsed flags that add_config_arguments added (`others`: its other fields)."""
    return cls(**{f.name: getattr(args, f.name) for f in flag_fields(cls)}, **others)
