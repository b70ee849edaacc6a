"""Helpers for proving a parallel run equal to one process (public API, used by the tests)."""

from __future__ import annotations

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
