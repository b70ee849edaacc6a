"""LayerNorm and RMSNorm over the last dimension, optionally zero-centred (weight = gamma - 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, zero_centered_gamma: bool = False):
    return F.rms_norm(x, x.shape[-1:], weight + 1 if zero_centered_gamma else weight, eps)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *,
               zero_centered_gamma: bool = False):
    return F.layer_norm(x, x.shape[-1:], weight + 1 if zero_centered_gamma else weight, bias, eps)
