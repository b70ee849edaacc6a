"""A linear layer over the all-gathered sequence that keeps only this rank's shard for backward.

Under sequence parallelism a column-parallel linear (qkv, fc1, the output layer) gathers its
`[s/tp, b, h]` input to `[s, b, h]` before the matmul. Saving that gathered input for the weight
gradient would keep tp times more than the rank owns; Korthikanti et al. 2022 (section 4.2.2) and
Megatron-Core keep the shard instead and gather it again in backward. This module does that: the
forward saves `x` (the shard), the backward re-gathers it while the input gradient is computed,
then reduce-scatters the input gradient while the weight gradient is computed.

The gradients are the same matmuls that autograd runs for `F.linear` (input gradient
`grad @ W`, weight gradient `grad^T @ total`, bias gradient the sum over tokens), so the numbers
match the gather-then-linear form they replace. Communication per call: one all-gather forward,
one all-gather and one reduce-scatter backward, each of `[s, b, h]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalith.parallel import comm
from megalith.parallel.comm_ledger import active_ledger
from megalith.parallel.weight_grad import accumulate_into, active_queue, linear, weight_grad_of


def _gather_sequence(x: torch.Tensor, group, ledger, async_op: bool = False):
    """`x [s/tp, ...]` from every rank, concatenated along dim 0 (and the pending work when async)."""
    size = comm.group_size(group)
    x = x.contiguous()
    total = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    work = comm.all_gather_into(total, x, group, async_op=async_op, ledger=ledger)
    return total, work


class _LinearOverGatheredSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, group, queue):
        ctx.group, ctx.ledger, ctx.has_bias = group, active_ledger(), bias is not None
        ctx.queue = queue  # split backward: W deferred into it (None: computed in backward)
        total, _ = _gather_sequence(x, group, ctx.ledger)
        ctx.save_for_backward(x, weight)
        return F.linear(total, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        needs_input, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        gathering = None
        if needs_weight:
            total, gathering = _gather_sequence(x, ctx.group, ctx.ledger, async_op=True)
        grad = grad.contiguous()
        grad_flat = grad.view(-1, grad.shape[-1])
        grad_x = scattering = None
        if needs_input:
            grad_total = grad_flat.mm(weight).view(grad.shape[:-1] + (weight.shape[1],))
            size = comm.group_size(ctx.group)
            grad_x = torch.empty((grad_total.shape[0] // size,) + tuple(grad_total.shape[1:]), dtype=grad.dtype,
                                 device=grad.device)
            scattering = comm.reduce_scatter_into(grad_x, grad_total, ctx.group, async_op=True, ledger=ctx.ledger)
        grad_weight = grad_bias = None
        if needs_weight:
            gathering.wait()
            total_flat = total.view(-1, total.shape[-1])
            if ctx.queue is not None:  # the W of a split backward: later, from the re-gathered input
                ctx.queue.append(lambda: accumulate_into(weight, weight_grad_of(grad_flat, total_flat)))
            else:
                grad_weight = weight_grad_of(grad_flat, total_flat)
        if needs_bias and ctx.has_bias:
            grad_bias = grad_flat.sum(0)
        if scattering is not None:
            scattering.wait()
        return grad_x, grad_weight, grad_bias, None, None


def linear_over_gathered_sequence(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                  group) -> torch.Tensor:
    """`F.linear(all_gather(x), weight, bias)` for `x [s/tp, b, in]`, saving `x` rather than the gather;
    the input gradient is reduce-scattered back to the shard. The identity mapping over one rank."""
    if comm.group_size(group) == 1:
        return linear(x, weight, bias)
    # the queue is read here: inside Function.forward grad mode is always off
    queue = active_queue() if torch.is_grad_enabled() else None
    return _LinearOverGatheredSequence.apply(x, weight, bias, group, queue)
