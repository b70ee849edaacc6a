"""Autograd-aware collectives over the tensor-parallel group (Megatron's "mappings").

Each is a pair (forward, backward) that are each other's adjoint, so autograd through a
tensor-parallel layer computes the same gradient as one process would:

    copy_to_tp                     identity            | all-reduce
    reduce_from_tp                 all-reduce          | identity
    scatter_to_tp                  split last dim      | all-gather last dim
    gather_from_tp                 all-gather last dim | split last dim
    scatter_to_sequence_parallel   split dim 0         | all-gather dim 0
    gather_from_sequence_parallel  all-gather dim 0    | reduce-scatter dim 0 (or split)
    reduce_scatter_to_sequence_parallel  reduce-scatter dim 0 | all-gather dim 0

Every function takes its process group explicitly; with a group of one rank, or None (one
process, no torch.distributed needed), each is the identity. Activations are sequence-first `[s, b, h]`, so sequence parallelism works on dim 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megalith.errors import ConfigError


# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    """Ranks in `group`. None means one process with no communication (not torch's world group):
    megalith always names its groups, so a model built without one is a plain single-process model."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _check_divisible(tensor: torch.Tensor, dim: int, size: int, what: str) -> int:
    length = tensor.shape[dim]
    if length % size != 0:
        raise ConfigError(
            f"{what}: dimension {dim} of size {length} is not divisible by the tensor-parallel size {size}; "
            f"choose a {'sequence length' if dim == 0 else 'hidden size'} that is a multiple of {size}"
        )
    return length // size


def _all_reduce(x: torch.Tensor, group) -> torch.Tensor:
    """Sum over the group into a new tensor (the input may still be needed by autograd)."""
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(x, group=group)
    return x


def _split(x: torch.Tensor, dim: int, group, what: str) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    chunk = _check_divisible(x, dim, size, what)
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _all_gather_single(out, x, group=group)
    if dim == 0:
        return out
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group, what: str) -> torch.Tensor:
    """Sum over the group, each rank keeping its slice of dim 0."""
    size = group_size(group)
    if size == 1:
        return x
    chunk = _check_divisible(x, 0, size, what)
    out = torch.empty((chunk,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    _reduce_scatter_single(out, x.contiguous(), group=group)
    return out


def _apply(function, x: torch.Tensor, group, *extra) -> torch.Tensor:
    """Every mapping is the identity over a group of one rank: skip autograd bookkeeping."""
    if group_size(group) == 1:
        return x
    return function.apply(x, group, *extra)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, -1, group, "scatter_to_tp")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group, "gather_from_tp backward"), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split(x, 0, group, "sequence parallel scatter")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.group = group
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather(x, 0, group)

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(grad, ctx.group, "sequence parallel gather backward"), None, None
        return _split(grad, 0, ctx.group, "sequence parallel gather backward"), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _reduce_scatter(x, group, "sequence parallel reduce-scatter")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group), None


def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a tensor-parallel region: identity forward, all-reduce of the gradient."""
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a tensor-parallel region by summing partial results: all-reduce forward."""
    return _apply(_ReduceFromTP, x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the last dimension; gradients are gathered back."""
    return _apply(_ScatterToTP, x, group)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate the ranks' slices along the last dimension; gradients are split."""
    return _apply(_GatherFromTP, x, group)


def scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Keep this rank's slice of the sequence (dim 0); gradients are gathered back."""
    return _apply(_ScatterToSP, x, group)


def gather_from_sequence_parallel(
    x: torch.Tensor, group, tensor_parallel_output_grad: bool = True
) -> torch.Tensor:
    """All-gather the sequence (dim 0).

    The gradient is reduce-scattered when the consumer is tensor-parallel (each rank holds a
    partial gradient of the whole sequence), or just split when every rank holds the full
    gradient (tensor_parallel_output_grad=False).
    """
    return _apply(_GatherFromSP, x, group, tensor_parallel_output_grad)


def reduce_scatter_to_sequence_parallel(x: torch.Tensor, group) -> torch.Tensor:
    """Sum partial results over the group, each rank keeping its slice of the sequence."""
    return _apply(_ReduceScatterToSP, x, group)


def gradient_of(param: torch.Tensor) -> torch.Tensor | None:
    """The gradient that the step will use: the data-parallel buffer's `main_grad` when the
    parameter has one (megalith.parallel.data_parallel), `.grad` otherwise."""
    main = getattr(param, "main_grad", None)
    return main if main is not None else param.grad


def all_reduce_grads(params, group) -> None:
    """Sum the gradients of `params` over `group` in one flat buffer (one collective).

    Used for parameters replicated over tp whose gradient each rank only partly computes, such
    as norm weights and row-parallel biases under sequence parallelism.
    """
    grads = [g for g in map(gradient_of, params) if g is not None]
    if not grads or group_size(group) == 1:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def max_over_job(value: float, state) -> float:
    """The largest `value` over every rank of `state`'s layout, and only those (idle RankPool ranks
    stay out): a max over mp, then over dp, reaches all of them because every mp group holds one
    rank of every dp group. Also a barrier; used to agree on a failure or on stopping."""
    flag = torch.tensor([float(value)], device=state.device)
    for group in (state.mp_group, state.dp_group):
        if group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return float(flag)
