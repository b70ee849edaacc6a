"""Attention over one block of keys, by global position: the math every comm type shares.

Tensors here are head-major and grouped for GQA: queries `[b, ng, r, sq, d]` (r query heads per
key/value group, head h = group h // r, as repeat_interleave lays them out), keys and values
`[b, ng, sk, d]`. Masked scores are filled with the float32 minimum, not -inf, exactly as
megalith.models.transformer.core_attention does: a block whose row is fully masked stays
finite (its log-sum-exp is about -3.4e38 and vanishes when merged with a real block), so no
NaN appears anywhere, and a row masked everywhere comes out as core_attention's.
"""

from __future__ import annotations

import torch

from megalith.errors import ConfigError

MASKED = torch.finfo(torch.float32).min


def group_queries(q: torch.Tensor, groups: int) -> torch.Tensor:
    """`[s, b, nh, d]` queries -> float32 `[b, ng, nh / ng, s, d]`."""
    sq, b, heads, d = q.shape
    if heads % groups != 0:
        raise ConfigError(f"{heads} attention heads are not divisible by {groups} query groups; "
                          f"choose a number of query groups that divides the heads")
    return q.float().permute(1, 2, 0, 3).reshape(b, groups, heads // groups, sq, d)


def to_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """`[s, b, nh, d]` queries and `[s, b, ng, d]` keys/values -> the grouped head-major float32 layout."""
    return group_queries(q, k.shape[2]), k.float().permute(1, 2, 0, 3), v.float().permute(1, 2, 0, 3)


def from_grouped(out5: torch.Tensor) -> torch.Tensor:
    """`[b, ng, r, s, d]` -> `[s, b, nh * d]` (core_attention's output layout)."""
    b, groups, r, s, d = out5.shape
    return out5.reshape(b, groups * r, s, d).permute(2, 0, 1, 3).reshape(s, b, groups * r * d)


def block_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool,
               key_padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """True where a query may not see a key: later global position (causal) or a padded key.
    `key_padding_mask` is `[b, S]` in global order; the result broadcasts to `[b, ng, r, sq, sk]`."""
    masked = (k_pos[None, :] > q_pos[:, None])[None, None, None] if causal else None
    if key_padding_mask is not None:
        padded = key_padding_mask.index_select(1, k_pos)[:, None, None, None, :]
        masked = padded if masked is None else masked | padded
    return masked


def scores(q5: torch.Tensor, k4: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    s = torch.matmul(q5, k4.unsqueeze(2).transpose(-1, -2)) * scale
    return s if mask is None else s.masked_fill(mask, MASKED)


def attend(q5, k4, v4, mask, scale) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v through ordinary autograd (all_gather and a2a use this)."""
    probs = torch.softmax(scores(q5, k4, mask, scale), dim=-1)
    return torch.matmul(probs, v4.unsqueeze(2))


def forward_block(q5, k4, v4, mask, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """This block's normalised output `[b, ng, r, sq, d]` and its log-sum-exp `[b, ng, r, sq]`."""
    s = scores(q5, k4, mask, scale)
    peak = s.amax(dim=-1, keepdim=True)
    p = torch.exp(s - peak)
    total = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p, v4.unsqueeze(2)) / total
    return out, (peak + torch.log(total)).squeeze(-1)


def merge(out: torch.Tensor, lse: torch.Tensor, block_out: torch.Tensor, block_lse: torch.Tensor):
    """The online-softmax rule: two partial results over disjoint keys -> the result over both.
    `lse` may be -inf (nothing seen yet); `block_lse` is always finite."""
    new_lse = torch.logaddexp(lse, block_lse)
    merged = out * torch.exp(lse - new_lse).unsqueeze(-1) + block_out * torch.exp(block_lse - new_lse).unsqueeze(-1)
    return merged, new_lse


def backward_block(q5, k4, v4, do5, lse, delta, mask, scale):
    """FlashAttention-2's backward for one block, from the whole row's log-sum-exp `lse` and
    delta = rowsum(dO * O): P = exp(S - L), dV = P^T dO, dS = P * (dP - delta), dQ = dS K, dK = dS^T Q
    (the scale applied to dQ and dK). dK and dV are summed over the r heads of each group."""
    p = torch.exp(scores(q5, k4, mask, scale) - lse.unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), do5).sum(dim=2)
    dp = torch.matmul(do5, v4.unsqueeze(2).transpose(-1, -2))
    ds = p * (dp - delta.unsqueeze(-1))
    dq = torch.matmul(ds, k4.unsqueeze(2)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q5).sum(dim=2) * scale
    return dq, dk, dv
