"""Split backward: the linear layers' weight gradients computed later, for zero-bubble pipelines.

Qi et al. 2023 ("Zero Bubble Pipeline Parallelism") split a stage's backward into B, the input
gradient that the previous stage waits for, and W, the weight gradient nobody waits for, so a
schedule can run W in what would be a bubble. In a transformer nearly all of W is the linear
layers' `grad_out^T @ input`; megalith defers exactly those and computes everything else (norm,
embedding and bias gradients, which are cheap) in B, as Megatron-Core's split does.

The pipeline engine opens `deferring_weight_grads(queue)` around a micro-batch's forward. A linear
built with `linear` (or the sequence-parallel `linear_over_gathered_sequence`) remembers that queue
in forward, so its backward, on whatever thread autograd runs it, appends a closure instead of the
weight-gradient matmul. The engine's W action runs the closures in order. Each one hands its
gradient to autograd's own accumulation of the parameter (`torch.autograd.backward` on the leaf),
so `.grad` accumulates and the data-parallel buffer's post-accumulate hooks fire exactly as in a
fused backward. Without an open queue `linear` is `F.linear` itself: the fused path is unchanged.
The matmuls are the ones autograd runs for `F.linear`, so a split step equals a fused one.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

_QUEUE: ContextVar[list | None] = ContextVar("megalith_weight_grad_queue", default=None)


@contextlib.contextmanager
def deferring_weight_grads(queue: list[Callable[[], None]]) -> Iterator[list]:
    """Linears run forward inside this region defer their weight gradients into `queue`."""
    token = _QUEUE.set(queue)
    try:
        yield queue
    finally:
        _QUEUE.reset(token)


def active_queue() -> list | None:
    return _QUEUE.get()


def accumulate_into(param: torch.Tensor, grad: torch.Tensor) -> None:
    """Add `grad` to a leaf parameter through autograd's accumulation (its hooks included)."""
    torch.autograd.backward([param], [grad])


def run_deferred(queue: list[Callable[[], None]]) -> None:
    """The W of one micro-batch: every deferred weight gradient, in the order backward queued them."""
    for compute in queue:
        compute()
    queue.clear()


def weight_grad_of(grad_flat: torch.Tensor, input_flat: torch.Tensor) -> torch.Tensor:
    """`grad^T @ input`: the weight gradient autograd computes for F.linear."""
    return grad_flat.t().mm(input_flat)


class _DeferrableLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, queue):
        ctx.save_for_backward(x, weight)
        ctx.queue, ctx.has_bias = queue, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_flat = grad.contiguous().view(-1, grad.shape[-1])
        grad_x = grad_flat.mm(weight).view(grad.shape[:-1] + (weight.shape[1],)) if ctx.needs_input_grad[0] else None
        grad_bias = grad_flat.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        if ctx.needs_input_grad[1]:
            x_flat = x.contiguous().view(-1, x.shape[-1])
            ctx.queue.append(lambda: accumulate_into(weight, weight_grad_of(grad_flat, x_flat)))
        return grad_x, None, grad_bias, None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, whose weight gradient is deferred when a queue is open (see the module docstring)."""
    queue = active_queue()
    if queue is None or not torch.is_grad_enabled():
        return F.linear(x, weight, bias)
    return _DeferrableLinear.apply(x, weight, bias, queue)
