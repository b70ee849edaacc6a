"""The checks every config section shares, each written once.

Each raises a ConfigError of one line that names the flag (Megatron's spelling) and what a good
value looks like, so a bad value is refused before any process group exists.
"""

from __future__ import annotations

from dataclasses import fields

from megalith.errors import ConfigError


def flag(name: str) -> str:
    """`tensor_model_parallel_size` -> `--tensor-model-parallel-size`."""
    return "--" + name.replace("_", "-")


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False) -> None:
    """An integer (not a bool) of at least `minimum`; None passes when `optional`."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{flag(name)} must be an integer >= {minimum}, got {value!r}")


def check_range(name: str, value, low: float, high: float | None = None, *, open_low: bool = False,
                open_high: bool = True, optional: bool = False) -> None:
    """low <= value (< or <=) high; `open_low` makes the lower bound strict, `open_high` the upper."""
    if optional and value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    above = number and (value > low if open_low else value >= low)
    below = number and (high is None or (value < high if open_high else value <= high))
    if not (above and below):
        bounds = ("(" if open_low else "[") + f"{low}, " + ("inf)" if high is None else f"{high}" + (")" if open_high else "]"))
        raise ConfigError(f"{flag(name)} must be in {bounds}, got {value!r}")


def check_choice(name: str, value, allowed, *, optional: bool = True) -> None:
    """One of `allowed`; None passes unless `optional` is False."""
    if value is None and optional:
        return
    if value not in allowed:
        raise ConfigError(f"{flag(name)} {value!r} is not one of {', '.join(map(str, allowed))}")


def check_choices(section) -> None:
    """Every field of a config section that declares choices (flag_field's third argument) holds one."""
    for f in fields(section):
        if f.metadata.get("choices"):
            check_choice(f.name, getattr(section, f.name), f.metadata["choices"])


def check_divides(size: int, count: int, what: str, size_flag: str = "--tensor-model-parallel-size") -> None:
    """`count` (a shape that `size` ranks split) divides evenly."""
    if count % size != 0:
        raise ConfigError(f"{what} {count} is not divisible by {size_flag} {size}; "
                          f"choose a {size_flag} that divides {count}")
