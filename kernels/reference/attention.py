"""Attention as explicit matmul, mask, softmax, matmul in fp32: the definition flash attention must equal.

Masked scores are set to the most negative fp32 number, not -inf, as megalith's local path does:
a fully masked row then averages v over all keys instead of producing NaN.
"""

from __future__ import annotations

import math

import torch


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None,
                    attention_mask: torch.Tensor | None = None, return_lse: bool = False):
    b, s, heads, d = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    if heads % kv_heads:
        raise ValueError(f"kv heads {kv_heads} must divide query heads {heads}")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    repeat = heads // kv_heads
    q32 = q.float().transpose(1, 2)  # [b, h, s, d]
    k32 = k.float().transpose(1, 2).repeat_interleave(repeat, dim=1)
    v32 = v.float().transpose(1, 2).repeat_interleave(repeat, dim=1)
    scores = torch.matmul(q32, k32.transpose(-1, -2)) * scale
    masked = torch.zeros(1, 1, s, sk, dtype=torch.bool, device=q.device)
    if causal:  # query i sees keys up to i + (sk - s): aligned at the end, as flash-attn does
        masked = masked | torch.ones(s, sk, dtype=torch.bool, device=q.device).triu(sk - s + 1)
    if attention_mask is not None:
        masked = masked | attention_mask.to(torch.bool)
    scores = scores.masked_fill(masked, torch.finfo(torch.float32).min)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v32).transpose(1, 2).to(q.dtype)
    return (out, lse) if return_lse else out
