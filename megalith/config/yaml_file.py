"""`--config FILE.yaml`: flag values from a YAML file, and the resolved config written back as one.

A file is a mapping of flag names, spelled either way (`tensor-model-parallel-size` or
`tensor_model_parallel_size`), flat or nested under the section names of PretrainConfig
(model, distributed, precision, optimizer, training, data, checkpointing, logging); a flat `model: gpt` is the
registry name (--model), a `model:` mapping the model section. Values are checked like the
command line checks them, so a typo or a wrong type is one line naming the file and the key,
not a surprise later. The `derived` section that megalith writes is a record for the reader and
is recomputed, not read, when the file is loaded again.
"""

from __future__ import annotations

import difflib
from typing import Any

import yaml

from megalith.config.flags import field_choices
from megalith.config.pretrain import SECTIONS, PretrainConfig, section_fields
from megalith.config.validators import flag
from megalith.errors import ConfigError

DERIVED_SECTION = "derived"
HEADER = "# megalith pretrain: resolved configuration (load it again with --config)\n"


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as handle:
            return yaml.safe_load(handle)
    except OSError as error:
        raise ConfigError(f"cannot read --config {path}: {error.strerror or error}; check the path") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"--config {path} is not valid YAML{where}: {problem}; fix the syntax") from None


def _convert(name: str, value: Any, kind: str, choices, path: str) -> Any:
    """The value as the flag's type, or one line saying why it cannot be."""
    where = f"{flag(name)} in --config {path}"
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{where} needs a value, got null; give one or remove the key")
    if kind.startswith("tuple"):  # a YAML list, or one string of words as on the command line
        words = value.split() if isinstance(value, str) else value
        if not isinstance(words, list) or not words or not all(isinstance(w, (str, int, float)) for w in words):
            raise ConfigError(f"{where} must be a list of words (e.g. [0.3, A, 0.7, B]), got {value!r}")
        if "int" not in kind:
            return tuple(str(w) for w in words)
        if not all(isinstance(w, int) or (isinstance(w, str) and w.strip().lstrip("-").isdigit()) for w in words):
            raise ConfigError(f"{where} must be a list of integers, got {value!r}")
        return tuple(int(w) for w in words)
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if kind.startswith(("int", "float")):
        convert = int if kind.startswith("int") else float
        # YAML reads 1e-4 (no dot) as a string; accept what the command line would accept.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
                convert is int and isinstance(value, float)):
            raise ConfigError(f"{where} must be {'an integer' if convert is int else 'a number'}, got {value!r}")
        try:
            value = convert(value)
        except ValueError:
            raise ConfigError(f"{where} must be {'an integer' if convert is int else 'a number'}, "
                              f"got {value!r}") from None
    elif not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    if choices and value not in choices:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


class _Collector:
    """Flattens the file into dest -> value, rejecting unknown, misplaced and repeated keys."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fields = section_fields()
        self.values: dict[str, Any] = {}
        self.spelled: dict[str, str] = {}

    def take(self, key: Any, value: Any, section: str | None) -> None:
        spelled = key if section is None else f"{section}.{key}"
        if not isinstance(key, str):
            raise ConfigError(f"key {key!r} in --config {self.path} is not a flag name; use e.g. lr or micro-batch-size")
        name = key.replace("-", "_")
        if name not in self.fields:
            raise ConfigError(self._unknown(spelled, name))
        owner, spec = self.fields[name]
        if section is not None and owner != section:
            raise ConfigError(f"key {spelled!r} in --config {self.path} belongs to section {owner}, not {section}; "
                              f"move it under {owner} or write it flat")
        if name in self.values:
            raise ConfigError(f"--config {self.path} gives {flag(name)} twice ({self.spelled[name]!r} and "
                              f"{spelled!r}); keep one")
        choices = field_choices(spec)
        self.values[name] = _convert(name, value, str(spec.type), choices, self.path)
        self.spelled[name] = spelled

    def _unknown(self, spelled: str, name: str) -> str:
        if name == "config":
            return f"--config {self.path} cannot name another config file; merge the two files"
        close = difflib.get_close_matches(name, list(self.fields), n=1)
        hint = f"did you mean {flag(close[0])}?" if close else "see `megalith pretrain --help` for the flags"
        return f"unknown key {spelled!r} in --config {self.path}; {hint}"


def load_config_file(path: str) -> dict[str, Any]:
    """The flag values a YAML file gives, by dest name (`tensor_model_parallel_size`), checked."""
    data = _read_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag names to values, got a {type(data).__name__}; "
                          "write e.g. 'lr: 1.0e-4' on each line")
    collector = _Collector(path)
    for key, value in data.items():
        if key == DERIVED_SECTION:
            continue
        if key in SECTIONS and isinstance(value, dict):
            for sub_key, sub_value in value.items():
                collector.take(sub_key, sub_value, key)
        elif key in SECTIONS and key not in collector.fields:
            raise ConfigError(f"section {key!r} in --config {path} must be a mapping of flag names to values, "
                              f"got {value!r}")
        else:
            collector.take(key, value, None)
    return collector.values


def config_to_yaml(config: PretrainConfig) -> str:
    """The resolved config as YAML: sections in --help order, keys sorted inside each."""
    sections = config.to_dict()
    body = "\n".join(yaml.safe_dump({name: values}, sort_keys=name != DERIVED_SECTION, default_flow_style=False)
                     for name, values in sections.items())
    return HEADER + body
