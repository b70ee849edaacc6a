"""Helpers for proving a parallel run equal to one process (public API, used by the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

FP32_RELATIVE_TOLERANCE = 1e-5


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (a norm-wise error that ignores near-zero entries)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape {tuple(actual.shape)} differs from expected {tuple(expected.shape)}")
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    scale = expected.abs().max().item() if expected.numel() else 0.0
    diff = (actual - expected).abs().max().item() if expected.numel() else 0.0
    return diff / max(scale, 1e-30)


def failures(errors: Mapping[str, float], tolerance: float = FP32_RELATIVE_TOLERANCE) -> dict[str, float]:
    """The named errors at or above `tolerance` (NaN counts as a failure)."""
    return {name: err for name, err in errors.items() if not err < tolerance}


@dataclass(frozen=True)
class Tolerance:
    """Relative bounds for verify's comparisons: per-step losses and grad norms, first-step
    gradients (worst tensor), final parameters."""

    losses: float
    norms: float
    grads: float
    params: float


# Low-precision layouts are compared with one process in the same precision: the parallel
# computation rounds in a different order (partial sums over tp, micro-batches, dp), so they
# agree to the precision's rounding, not to fp32's. Measured with `megalith verify --steps 5`
# over 17 layouts (docs/architecture.md, "Mixed precision"): bf16 worst loss 4.5e-5, grad norm
# 5.0e-3, gradient tensor 2.7e-2, parameters one bf16 ulp (3.9e-3 of the largest weight, 1.0);
# fp16 7e-6, 4.5e-4, 3.7e-3, 9.7e-4. The bounds leave a margin of 2.5x to 14x; a gradient
# counted twice (relative error 1.0) still fails.
RELATIVE_TOLERANCES = {
    "fp32": Tolerance(*(FP32_RELATIVE_TOLERANCE,) * 4),
    "bf16": Tolerance(losses=5e-4, norms=2e-2, grads=1e-1, params=1e-2),
    "fp16": Tolerance(losses=1e-4, norms=2e-3, grads=2e-2, params=4e-3),
}


def pretrain_on_rank(ctx, argv: list[str], world_size: int) -> list[str] | None:
    """Run `megalith pretrain argv` for `world_size` processes on a RankPool rank (`pool.run(
    pretrain_on_rank, argv, n)`): the lines the last rank printed; None on ranks the layout leaves
    idle. Compare runs through --log-json files (see tests/test_pretrain.py)."""
    from megalith.config.arguments import parse_pretrain_args
    from megalith.training.loop import pretrain

    config = parse_pretrain_args(argv, world_size)
    layout = config.layout
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp, cp=layout.cp, dp=layout.dp, ep=layout.ep,
                               etp=layout.etp)
    if state is None:
        return None
    lines: list[str] = []
    pretrain(config, state, print_fn=lines.append)
    return lines


def log_record_errors(reference: list[dict], actual: list[dict],
                      keys: tuple[str, ...] = ("lm_loss", "grad_norm", "validation_lm_loss")) -> dict[str, float]:
    """Per key, the relative error between two runs' --log-json records (the values of the
    records that have the key, in order); a key missing from one run, or from both, is an error."""
    errors = {}
    for key in keys:
        expected = torch.tensor([r[key] for r in reference if key in r], dtype=torch.float64)
        got = torch.tensor([r[key] for r in actual if key in r], dtype=torch.float64)
        if len(expected) == 0 or len(expected) != len(got):
            raise ValueError(f"{key}: {len(expected)} values in the reference, {len(got)} in the run")
        errors[key] = relative_error(got, expected)
    return errors

