"""Rotary embedding, rotate-half (Megatron, GPT-NeoX), computed in fp32 and returned in x's dtype."""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x `[b, s, h, d]`; cos and sin `[s, r]` with r <= d even: the first r features of each head rotate."""
    rotary = cos.shape[-1]
    rotated, passed = x[..., :rotary], x[..., rotary:]
    x32 = rotated.float()
    first, second = x32.chunk(2, dim=-1)
    cos, sin = cos.float()[None, :, None, :], sin.float()[None, :, None, :]
    out = (x32 * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)
    return out if passed.shape[-1] == 0 else torch.cat([out, passed], dim=-1)
