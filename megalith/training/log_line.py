"""Megatron-LM's per-iteration log line: write it, read it back, and turn it into a JSON record.

Launch scripts, dashboards and log scrapers written for Megatron parse this line, so every field
Megatron prints keeps Megatron's label, number format and order (megatron/training/training.py,
`training_log`):

     [2024-05-01 12:00:00] iteration      100/    1000 | consumed samples:         3200 |
     elapsed time per iteration (ms): 512.3 | throughput per GPU (TFLOP/s/GPU): 12.5 |
     throughput (tokens/s): 65432 | learning rate: 3.000000E-04 | global batch size:    32 |
     lm loss: 6.543210E+00 | loss scale: 65536.0 | grad norm: 1.234 |
     number of skipped iterations:   0 | number of nan iterations:   0 |

(one line in the log; wrapped here). An MoE model (--num-experts) adds Megatron's
` load_balancing_loss: 1.234567E-02 |` (and ` z_loss: ... |` with --moe-z-loss-coeff) after the lm loss,
as Megatron's track_moe_metrics puts them into the same loss dictionary (megalith.training.moe_stats).
One field is ours: ` throughput (tokens/s): N |`, right after
the TFLOP/s field, because tokens per second is the number people compare across hardware and
Megatron does not print it. Parsers that split on `|` and look fields up by label, as Megatron's
users' scrapers do, skip it. `grad norm` is left out when there is none (as Megatron does).

`parse_log_line` reads our lines and Megatron's own (with or without the timestamp, which older
Megatron versions do not print, and with the fractional seconds that recent ones do); fields it
does not know (`params norm`, `num zeros`, other losses) are ignored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from megalith.errors import ConfigError

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"


@dataclass(frozen=True)
class IterationLog:
    """What one log line reports. Times and rates are averages over the logging interval;
    the skipped and nan counts are totals within it, as in Megatron."""

    iteration: int
    train_iters: int
    consumed_samples: int
    elapsed_ms: float  # per iteration, averaged over the interval
    tflops_per_device: float
    tokens_per_s: float
    learning_rate: float
    global_batch_size: int
    lm_loss: float | None  # None when every iteration of the interval was skipped (Megatron omits it)
    loss_scale: float
    grad_norm: float | None
    skipped_iterations: int
    nan_iterations: int
    timestamp: datetime
    moe_losses: tuple[tuple[str, float], ...] = ()  # (name, value) in the line's order; () for a dense model


def format_log_line(log: IterationLog) -> str:
    """The line Megatron's `training_log` prints, plus our tokens/s field."""
    parts = [
        f" [{log.timestamp.strftime(TIMESTAMP_FORMAT)}]",
        f" iteration {log.iteration:8d}/{log.train_iters:8d} |",
        f" consumed samples: {log.consumed_samples:12d} |",
        f" elapsed time per iteration (ms): {log.elapsed_ms:.1f} |",
        f" throughput per GPU (TFLOP/s/GPU): {log.tflops_per_device:.1f} |",
        f" throughput (tokens/s): {log.tokens_per_s:.0f} |",
        f" learning rate: {log.learning_rate:.6E} |",
        f" global batch size: {log.global_batch_size:5d} |",
    ]
    if log.lm_loss is not None:
        parts.append(f" lm loss: {log.lm_loss:.6E} |")
    parts.extend(f" {name}: {value:.6E} |" for name, value in log.moe_losses)
    parts.append(f" loss scale: {log.loss_scale:.1f} |")
    if log.grad_norm is not None:
        parts.append(f" grad norm: {log.grad_norm:.3f} |")
    parts.append(f" number of skipped iterations: {log.skipped_iterations:3d} |")
    parts.append(f" number of nan iterations: {log.nan_iterations:3d} |")
    return "".join(parts)


# label in the line -> (key in the parsed dict, type)
_FIELDS: dict[str, tuple[str, type]] = {
    "consumed samples": ("consumed_samples", int),
    "elapsed time per iteration (ms)": ("elapsed_ms", float),
    "throughput per GPU (TFLOP/s/GPU)": ("tflops_per_device", float),
    "throughput (tokens/s)": ("tokens_per_s", float),
    "learning rate": ("learning_rate", float),
    "global batch size": ("global_batch_size", int),
    "lm loss": ("lm_loss", float),
    "load_balancing_loss": ("load_balancing_loss", float),
    "z_loss": ("z_loss", float),
    "loss scale": ("loss_scale", float),
    "grad norm": ("grad_norm", float),
    "number of skipped iterations": ("skipped_iterations", int),
    "number of nan iterations": ("nan_iterations", int),
}
# Megatron prints these whatever its flags; the others depend on flags (--log-throughput) or rank.
_REQUIRED = ("consumed samples", "elapsed time per iteration (ms)", "global batch size", "loss scale",
             "number of skipped iterations", "number of nan iterations")

_HEAD = re.compile(
    r"(?:\[(?P<timestamp>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?)\]\s*)?"
    r"\biteration\s+(?P<iteration>\d+)\s*/\s*(?P<train_iters>\d+)\s*\|(?P<fields>.*)$"
)


def _not_a_log_line(line: str, why: str) -> ConfigError:
    shown = line if len(line) <= 120 else line[:117] + "..."
    return ConfigError(
        f"not a Megatron iteration log line ({why}): {shown!r}; expected "
        f"' [YYYY-MM-DD HH:MM:SS] iteration N/M | consumed samples: N | ... | number of nan iterations: N |'"
    )


def _number(text: str, kind: type) -> int | float:
    if kind is int:
        if not re.fullmatch(r"[+-]?\d+", text):
            raise ValueError(text)
        return int(text)
    return float(text)  # accepts Python's 'NAN', 'nan', 'INF', '-inf' as well as 1.5E-04


def parse_log_line(line: str) -> dict[str, float | int | str]:
    """The fields of one iteration log line, keyed like IterationLog (grad_norm, timestamp,
    learning_rate, tflops_per_device, tokens_per_s, lm_loss, load_balancing_loss and z_loss only when the
    line has them)."""
    head = _HEAD.search(line.rstrip("\r\n"))
    if head is None:
        raise _not_a_log_line(line, "no 'iteration N/M |'")
    parsed: dict[str, float | int | str] = {}
    if head["timestamp"] is not None:
        parsed["timestamp"] = head["timestamp"]
    parsed["iteration"] = int(head["iteration"])
    parsed["train_iters"] = int(head["train_iters"])
    seen: set[str] = set()
    for segment in head["fields"].split("|"):
        segment = segment.strip()
        if not segment:
            continue
        label, colon, value = segment.rpartition(":")
        label, value = label.strip(), value.strip()
        if not colon or not label or not value:
            raise _not_a_log_line(line, f"field {segment!r} is not 'label: value'")
        if label in seen:
            raise _not_a_log_line(line, f"field {label!r} appears twice")
        seen.add(label)
        if label not in _FIELDS:
            continue
        key, kind = _FIELDS[label]
        try:
            parsed[key] = _number(value, kind)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise _not_a_log_line(line, f"{label} {value!r} is not {expected}") from None
    missing = [label for label in _REQUIRED if label not in seen]
    if missing:
        raise _not_a_log_line(line, f"missing {', '.join(missing)}")
    return parsed


def as_json_record(log: IterationLog) -> dict:
    """One --log-json record: the same numbers as the line, at full precision."""
    record = {
        "iteration": log.iteration,
        "train_iters": log.train_iters,
        "consumed_samples": log.consumed_samples,
        "elapsed_ms": log.elapsed_ms,
        "tflops_per_device": log.tflops_per_device,
        "tokens_per_s": log.tokens_per_s,
        "lr": log.learning_rate,
        "global_batch_size": log.global_batch_size,
        "lm_loss": log.lm_loss,
        "loss_scale": log.loss_scale,
        "grad_norm": log.grad_norm,
        "skipped": log.skipped_iterations,
        "nan_iterations": log.nan_iterations,
        "timestamp": log.timestamp.isoformat(),
    }
    record.update(log.moe_losses)
    return record
