"""Megatron's per-iteration log line: exact format, an independent regex, parsing ours and Megatron's."""

import json
import math
import re
from dataclasses import replace
from datetime import datetime

import pytest

from megalith.errors import ConfigError
from megalith.training.log_line import IterationLog, as_json_record, format_log_line, parse_log_line

LOG = IterationLog(
    iteration=100,
    train_iters=1000,
    consumed_samples=3200,
    elapsed_ms=512.34,
    tflops_per_device=12.46,
    tokens_per_s=65432.4,
    learning_rate=3e-4,
    global_batch_size=32,
    lm_loss=6.54321,
    loss_scale=65536.0,
    grad_norm=1.25,
    skipped_iterations=0,
    nan_iterations=1,
    timestamp=datetime(2024, 5, 1, 12, 0, 7),
)

# Typed by hand, field by field, from Megatron's training_log widths: {:8d}, {:12d}, {:.1f}, {:.6E}, {:5d}, {:3d}.
EXPECTED = (
    " [2024-05-01 12:00:07]"
    " iteration      100/    1000 |"
    " consumed samples:         3200 |"
    " elapsed time per iteration (ms): 512.3 |"
    " throughput per GPU (TFLOP/s/GPU): 12.5 |"
    " throughput (tokens/s): 65432 |"
    " learning rate: 3.000000E-04 |"
    " global batch size:    32 |"
    " lm loss: 6.543210E+00 |"
    " loss scale: 65536.0 |"
    " grad norm: 1.250 |"
    " number of skipped iterations:   0 |"
    " number of nan iterations:   1 |"
)

# Written from the Megatron format description, not from the formatter: the tokens/s and grad norm
# fields are optional, numbers may be NAN/INF (how Python prints a non-finite float).
NUM = r"(?:-?\d+\.\d+(?:E[+-]\d\d)?|-?(?:NAN|INF|nan|inf))"
LINE_RE = re.compile(
    r"^ \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\]"
    r" iteration [ \d]{7}\d/[ \d]{7}\d \|"
    r" consumed samples: [ \d]{11}\d \|"
    rf" elapsed time per iteration \(ms\): {NUM} \|"
    rf" throughput per GPU \(TFLOP/s/GPU\): {NUM} \|"
    r"(?: throughput \(tokens/s\): (?:\d+|nan|inf) \|)?"
    rf" learning rate: {NUM} \|"
    r" global batch size: [ \d]{4}\d \|"
    rf" lm loss: {NUM} \|"
    rf" loss scale: {NUM} \|"
    rf"(?: grad norm: {NUM} \|)?"
    r" number of skipped iterations: [ \d]{2}\d \|"
    r" number of nan iterations: [ \d]{2}\d \|$"
)

# A line in Megatron's own format (no tokens/s), typed by hand, with fields we do not model.
MEGATRON_LINE = (
    " [2024-06-03 10:15:42] iteration      200/   10000 | consumed samples:        51200 |"
    " elapsed time per iteration (ms): 1234.5 | throughput per GPU (TFLOP/s/GPU): 187.3 |"
    " learning rate: 2.999999E-04 | global batch size:   256 | lm loss: 3.456789E+00 |"
    " loss scale: 1.0 | grad norm: 0.876 | num zeros: 0 | params norm: 301.522 |"
    " number of skipped iterations:   0 | number of nan iterations:   0 |"
)


def test_format_matches_megatron_field_by_field():
    assert format_log_line(LOG) == EXPECTED


def test_grad_norm_is_left_out_when_there_is_none():
    line = format_log_line(replace(LOG, grad_norm=None))
    assert "grad norm" not in line
    assert line == EXPECTED.replace(" grad norm: 1.250 |", "")


@pytest.mark.parametrize(
    "log",
    [
        LOG,
        replace(LOG, grad_norm=None),
        replace(LOG, iteration=1, train_iters=500000, consumed_samples=123456789012, global_batch_size=4096),
        replace(LOG, lm_loss=float("nan"), grad_norm=float("inf"), skipped_iterations=10, nan_iterations=10),
        replace(LOG, learning_rate=0.0, tokens_per_s=0.4, elapsed_ms=0.04),
    ],
)
def test_independent_regex_accepts_every_formatted_line(log):
    assert LINE_RE.fullmatch(format_log_line(log)), format_log_line(log)


def test_regex_rejects_a_line_with_a_field_out_of_order():
    swapped = EXPECTED.replace(" loss scale: 65536.0 | grad norm: 1.250 |", " grad norm: 1.250 | loss scale: 65536.0 |")
    assert LINE_RE.fullmatch(swapped) is None


def test_parse_reads_back_our_line():
    assert parse_log_line(EXPECTED + "\n") == {
        "timestamp": "2024-05-01 12:00:07",
        "iteration": 100,
        "train_iters": 1000,
        "consumed_samples": 3200,
        "elapsed_ms": 512.3,
        "tflops_per_device": 12.5,
        "tokens_per_s": 65432.0,
        "learning_rate": 3e-4,
        "global_batch_size": 32,
        "lm_loss": 6.54321,
        "loss_scale": 65536.0,
        "grad_norm": 1.25,
        "skipped_iterations": 0,
        "nan_iterations": 1,
    }


def test_parse_reads_a_megatron_line_without_our_tokens_field():
    parsed = parse_log_line(MEGATRON_LINE)
    assert parsed == {
        "timestamp": "2024-06-03 10:15:42",
        "iteration": 200,
        "train_iters": 10000,
        "consumed_samples": 51200,
        "elapsed_ms": 1234.5,
        "tflops_per_device": 187.3,
        "learning_rate": 2.999999e-4,
        "global_batch_size": 256,
        "lm_loss": 3.456789,
        "loss_scale": 1.0,
        "grad_norm": 0.876,
        "skipped_iterations": 0,
        "nan_iterations": 0,
    }
    assert isinstance(parsed["iteration"], int) and isinstance(parsed["consumed_samples"], int)


def test_parse_accepts_megatron_variants():
    # recent Megatron prints microseconds; older versions print no timestamp at all; torchrun adds a prefix
    with_micros = MEGATRON_LINE.replace("10:15:42]", "10:15:42.123456]")
    assert parse_log_line(with_micros)["timestamp"] == "2024-06-03 10:15:42.123456"
    old = MEGATRON_LINE.replace(" [2024-06-03 10:15:42]", "")
    parsed_old = parse_log_line(old)
    assert "timestamp" not in parsed_old and parsed_old["iteration"] == 200
    assert parse_log_line("[default7]:" + MEGATRON_LINE)["consumed_samples"] == 51200


def test_parse_keeps_grad_norm_absent_and_non_finite_values():
    line = format_log_line(replace(LOG, grad_norm=None, lm_loss=float("nan")))
    parsed = parse_log_line(line)
    assert "grad_norm" not in parsed
    assert math.isnan(parsed["lm_loss"])


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("hello world", "no 'iteration N/M |'"),
        ("", "no 'iteration N/M |'"),
        (" validation loss at iteration 100 on validation set | lm loss value: 3.4E+00 |", "no 'iteration N/M |'"),
        (EXPECTED.replace(" consumed samples:         3200 |", ""), "missing consumed samples"),
        (EXPECTED.replace("global batch size:    32", "global batch size: 3.5"), "global batch size '3.5' is not an integer"),
        (EXPECTED.replace("lm loss: 6.543210E+00", "lm loss: six"), "lm loss 'six' is not a number"),
        (EXPECTED.replace(" loss scale: 65536.0 |", " loss scale 65536.0 |"), "is not 'label: value'"),
        (EXPECTED + " lm loss: 1.0 |", "'lm loss' appears twice"),
    ],
)
def test_parse_rejects_what_is_not_a_log_line(line, fragment):
    with pytest.raises(ConfigError) as err:
        parse_log_line(line)
    message = str(err.value)
    assert fragment in message
    assert message.startswith("not a Megatron iteration log line")
    assert "\n" not in message


def test_json_record_has_every_number_at_full_precision():
    record = as_json_record(LOG)
    assert record == {
        "iteration": 100,
        "train_iters": 1000,
        "consumed_samples": 3200,
        "elapsed_ms": 512.34,
        "tflops_per_device": 12.46,
        "tokens_per_s": 65432.4,
        "lr": 3e-4,
        "global_batch_size": 32,
        "lm_loss": 6.54321,
        "loss_scale": 65536.0,
        "grad_norm": 1.25,
        "skipped": 0,
        "nan_iterations": 1,
        "timestamp": "2024-05-01T12:00:07",
    }
    assert json.loads(json.dumps(record)) == record
    assert datetime.fromisoformat(record["timestamp"]) == LOG.timestamp
    assert as_json_record(replace(LOG, grad_norm=None))["grad_norm"] is None
