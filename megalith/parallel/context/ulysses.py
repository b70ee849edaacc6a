"""DeepSpeed-Ulysses attention (cp_comm_type "a2a"): an all-to-all turns the sequence split into a
head split, each rank attends its share of the heads over the whole sequence, and a second
all-to-all turns the output back. Needs the heads and the key/value groups divisible by cp.

After the all-to-all the rows are every rank's tokens in rank order (each in load-balanced
order), not global order; the mask is built from those rows' global positions instead of
reordering the tensors.
"""

from __future__ import annotations

import torch

from megalith.errors import ConfigError
from megalith.parallel import comm
from megalith.parallel.comm_ledger import active_ledger
from megalith.parallel.context.blocks import attend, block_mask, group_queries
from megalith.parallel.context.layout import gathered_positions


def _exchange(x: torch.Tensor, group, ledger, to_heads: bool) -> torch.Tensor:
    """to_heads: `[s, b, n, d]` -> `[cp * s, b, n / cp, d]`; otherwise the inverse."""
    cp = comm.group_size(group)
    if to_heads:
        s, b, n, d = x.shape
        send = x.reshape(s, b, cp, n // cp, d).permute(2, 0, 1, 3, 4).contiguous()
        received = torch.empty_like(send)
        comm.all_to_all(received, send, group, ledger=ledger)
        return received.reshape(cp * s, b, n // cp, d)
    rows, b, part, d = x.shape
    send = x.contiguous().reshape(cp, rows // cp, b, part, d)
    received = torch.empty_like(send)
    comm.all_to_all(received, send, group, ledger=ledger)
    return received.permute(1, 2, 0, 3, 4).reshape(rows // cp, b, cp * part, d)


class _AllToAll(torch.autograd.Function):
    """The exchange, whose adjoint is the inverse exchange (counted in the forward's ledger)."""

    @staticmethod
    def forward(ctx, x, group, to_heads):
        ctx.group, ctx.to_heads, ctx.ledger = group, to_heads, active_ledger()
        return _exchange(x, group, ctx.ledger, to_heads)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad, ctx.group, ctx.ledger, not ctx.to_heads), None, None


def check_heads(heads: int, groups: int, cp: int) -> None:
    if heads % cp or groups % cp:
        raise ConfigError(f"cp_comm_type a2a splits heads over cp: {heads} attention heads and {groups} query groups "
                          f"must both be divisible by the context-parallel size {cp}; use p2p or all_gather instead")


def ulysses_attention(q, k, v, group, causal: bool, scale: float, key_padding_mask=None) -> torch.Tensor:
    """`[s_local, b, nh * d]`: the whole sequence's attention for this rank's heads, exchanged back."""
    cp, heads, groups = comm.group_size(group), q.shape[2], k.shape[2]
    check_heads(heads, groups, cp)
    if cp == 1:
        qh, kh, vh = q, k, v
    else:
        qh = _AllToAll.apply(q, group, True)
        kh, vh = _AllToAll.apply(k, group, True), _AllToAll.apply(v, group, True)
    seq = qh.shape[0]
    positions = gathered_positions(seq, cp, device=q.device)
    mask = block_mask(positions, positions, causal, key_padding_mask)
    out5 = attend(group_queries(qh, kh.shape[2]), kh.float().permute(1, 2, 0, 3), vh.float().permute(1, 2, 0, 3),
                  mask, scale)
    b, g, r, _, d = out5.shape
    out = out5.reshape(b, g * r, seq, d).permute(2, 0, 1, 3).to(q.dtype)  # [S, b, nh / cp, d]
    if cp > 1:
        out = _AllToAll.apply(out, group, False)
    return out.reshape(out.shape[0], out.shape[1], -1)
