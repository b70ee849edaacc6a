"""The one seam through which megalith communicates: collectives, p2p and autograd mappings.

Every collective and point-to-point operation that moves training data goes through a
function here, which counts it in the active `CommLedger` (megalith.parallel.comm_ledger:
calls and bytes per group kind and operation) before handing it to torch.distributed. The
rest of megalith calls torch.distributed only to build and tear down process groups
(parallel/state.py, parallel/spawn.py) and for the timers' gather of names (a pickled
object, not a tensor; training/timers.py).

The autograd-aware collectives over the tensor-parallel group (Megatron's "mappings") are
pairs (forward, backward) that are each other's adjoint, so autograd through a
tensor-parallel layer computes the same gradient as one process would:

    copy_to_tp                     identity            | all-reduce
    reduce_from_tp                 all-reduce          | identity
    scatter_to_tp                  split last dim      | all-gather last dim
    gather_from_tp                 all-gather last dim | split last dim
    scatter_to_sequence_parallel   split dim 0         | all-gather dim 0
    gather_from_sequence_parallel  all-gather dim 0    | reduce-scatter dim 0 (or split)
    reduce_scatter_to_sequence_parallel  reduce-scatter dim 0 | all-gather dim 0

Each captures the active ledger in forward and counts its backward there, since backward may
run on another thread. Every function takes its process group explicitly; with a group of one
rank, or None (one process, no torch.distributed needed), each mapping is the identity.
Activations are sequence-first `[s, b, h]`, so sequence parallelism works on dim 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megalith.errors import ConfigError
from megalith.parallel.comm_ledger import CommLedger, active_ledger


# torch 2.13 renamed the single-tensor collectives; older releases only have the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class _Active:
    """The `ledger` argument's default: whichever ledger is active when the operation is issued."""

    def __repr__(self) -> str:
        return "ACTIVE"


ACTIVE = _Active()


def group_size(group) -> int:
    """Ranks in `group`. None means one process with no communication (not torch's world group):
    megalith always names its groups, so a model built without one is a plain single-process model."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def global_rank(group, rank: int) -> int:
    """The global rank of `group`'s rank `rank` (p2p peers are named by global rank)."""
    return dist.get_global_rank(group, rank)


# --- the counted operations: everything megalith sends goes through one of these ------------


def _count(ledger, group, op: str, tensor: torch.Tensor) -> None:
    if group is None:  # torch would read None as its world group: never what megalith means
        raise ValueError(f"{op} over group None: None means one process, which communicates nothing")
    ledger = active_ledger() if ledger is ACTIVE else ledger
    if ledger is not None and dist.get_world_size(group) > 1:  # over one rank nothing moves
        ledger.add(group, op, tensor.numel() * tensor.element_size())


def all_reduce(tensor: torch.Tensor, group, *, op: str = "sum", async_op: bool = False,
               ledger: CommLedger | None | _Active = ACTIVE):
    """Reduce `tensor` in place over `group` (op "sum", "max" or "min"); counts the buffer."""
    _count(ledger, group, "all_reduce", tensor)
    return dist.all_reduce(tensor, op=_REDUCE_OPS[op], group=group, async_op=async_op)


def all_gather_into(output: torch.Tensor, tensor: torch.Tensor, group, *, async_op: bool = False,
                    ledger: CommLedger | None | _Active = ACTIVE):
    """Every rank's `tensor` concatenated along dim 0 into `output`; counts the gathered output."""
    _count(ledger, group, "all_gather", output)
    return _all_gather_single(output, tensor, group=group, async_op=async_op)


def reduce_scatter_into(output: torch.Tensor, tensor: torch.Tensor, group, *, async_op: bool = False,
                        ledger: CommLedger | None | _Active = ACTIVE):
    """The sum of every rank's `tensor`, this rank keeping its slice of dim 0 in `output`; counts the
    unscattered input."""
    _count(ledger, group, "reduce_scatter", tensor)
    if dist.get_backend(group) == "gloo":
        return _reduce_scatter_by_exchange(output, tensor, group, async_op)
    return _reduce_scatter_single(output, tensor, group=group, async_op=async_op)


class _SumOnWait:
    """An all-to-all's work that finishes a reduce-scatter: waiting sums the received slices."""

    def __init__(self, work, received: torch.Tensor, output: torch.Tensor) -> None:
        self.work, self.received, self.output = work, received, output

    def wait(self) -> bool:
        self.work.wait()
        torch.sum(self.received, dim=0, out=self.output.view(self.received.shape[1:]))
        return True


def all_to_all(output: torch.Tensor, tensor: torch.Tensor, group, *, output_split_sizes: list[int] | None = None,
               input_split_sizes: list[int] | None = None, ledger: CommLedger | None | _Active = ACTIVE):
    """Rows of `tensor` to every rank of `group` (`input_split_sizes` rows each; None: equal
    shares), rows from every rank into `output`; counts the input sent (MoE's token dispatch)."""
    _count(ledger, group, "all_to_all", tensor)
    return dist.all_to_all_single(output, tensor, output_split_sizes, input_split_sizes, group=group)


def _reduce_scatter_by_exchange(output: torch.Tensor, tensor: torch.Tensor, group, async_op: bool):
    """gloo's reduce_scatter is about 3x slower than an all-to-all of the same slices followed by a
    local sum (measured: 2.6 ms vs 1.0 ms for 1 MiB over 2 ranks), so on gloo megalith sends each
    rank its slice and sums what arrives, in rank order."""
    size = dist.get_world_size(group)
    received = torch.empty((size, output.numel()), dtype=tensor.dtype, device=tensor.device)
    work = dist.all_to_all_single(received, tensor.contiguous().view(size, -1), group=group, async_op=True)
    pending = _SumOnWait(work, received, output)
    if async_op:
        return pending
    pending.wait()
    return None


def broadcast(tensor: torch.Tensor, src: int, group, *, ledger: CommLedger | None | _Active = ACTIVE):
    """`tensor` from global rank `src` to every rank of `group`, in place; counts the tensor."""
    _count(ledger, group, "broadcast", tensor)
    return dist.broadcast(tensor, src=src, group=group)


@dataclass(frozen=True)
class PointToPoint:
    """One send (or, `recv`, one receive) of `tensor` to (from) global rank `peer` over `group`."""

    tensor: torch.Tensor
    peer: int
    group: object
    recv: bool = False


def batch_isend_irecv(ops: list[PointToPoint], *, ledger: CommLedger | None | _Active = ACTIVE) -> list:
    """Post every operation at once (non-blocking); the works, one per operation or one for all
    (a coalesced NCCL batch). Counts each tensor as sent or received."""
    if not ops:
        return []
    for op in ops:
        _count(ledger, op.group, "recv" if op.recv else "send", op.tensor)
    if all(dist.get_backend(op.group) == "gloo" for op in ops):
        # gloo has no coalesced batch: torch's batch_isend_irecv posts one isend/irecv per operation
        # inside a coalescing context whose Python costs about 0.15 ms per batch; posting them
        # directly is the same operations in the same order
        return [(dist.irecv if op.recv else dist.isend)(op.tensor, op.peer, group=op.group) for op in ops]
    return dist.batch_isend_irecv([dist.P2POp(dist.irecv if op.recv else dist.isend, op.tensor, op.peer, op.group)
                                   for op in ops])


# --- the autograd mappings --------------------------------------------------------------------


def _check_divisible(tensor: torch.Tensor, dim: int, size: int, what: str) -> int:
    length = tensor.shape[dim]
    if length % size != 0:
        raise ConfigError(
            f"{what}: dimension {dim} of size {length} is not divisible by the tensor-parallel size {size}; "
            f"choose a {'sequence length' if dim == 0 else 'hidden size'} that is a multiple of {size}"
        )
    return length // size


def _all_reduce(x: torch.Tensor, group, ledger) -> torch.Tensor:
    """Sum over the group into a new tensor (the input may still be needed by autograd)."""
    if group_size(group) == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)
    all_reduce(x, group, ledger=ledger)
    return x


def _split(x: torch.Tensor, dim: int, group, what: str) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    chunk = _check_divisible(x, dim, size, what)
    return x.narrow(dim, group_rank(group) * chunk, chunk).contiguous()


def _all_gather(x: torch.Tensor, dim: int, group, ledger) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    out = torch.empty((size * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    all_gather_into(out, x, group, ledger=ledger)
    if dim == 0:
        return out
    return torch.cat(out.chunk(size, dim=0), dim=dim)


def _reduce_scatter(x: torch.Tensor, group, what: str, ledger) -> torch.Tensor:
    """Sum over the group, each rank keeping its slice of dim 0."""
    size = group_size(group)
    if size == 1:
        return x
    chunk = _check_divisible(x, 0, size, what)
    out = torch.empty((chunk,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    reduce_scatter_into(out, x.contiguous(), group, ledger=ledger)
    return out


def _apply(function, x: torch.Tensor, group, *extra) -> torch.Tensor:
    """Every mapping is the identity over a group of one rank: skip autograd bookkeeping."""
    if group_size(group) == 1:
        return x
    return function.apply(x, group, *extra)


def _enter(ctx, group) -> CommLedger | None:
    """Remember the group and the ledger active in forward: backward may run on autograd's own
    thread, where no ledger is active, and must count into the forward's."""
    ctx.group, ctx.ledger = group, active_ledger()
    return ctx.ledger


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        _enter(ctx, group)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group, ctx.ledger), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group, _enter(ctx, group))

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        _enter(ctx, group)
        return _split(x, -1, group, "scatter_to_tp")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, -1, ctx.group, ctx.ledger), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_gather(x, -1, group, _enter(ctx, group))

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, -1, ctx.group, "gather_from_tp backward"), None


class _ScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        _enter(ctx, group)
        return _split(x, 0, group, "sequence parallel scatter")

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group, ctx.ledger), None


class _GatherFromSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, tensor_parallel_output_grad):
        ctx.tensor_parallel_output_grad = tensor_parallel_output_grad
        return _all_gather(x, 0, group, _enter(ctx, group))

    @staticmethod
    def backward(ctx, grad):
        if ctx.tensor_parallel_output_grad:
            return _reduce_scatter(grad, ctx.group, "sequence parallel gather backward", ctx.ledger), None, None
        return _split(grad, 0, ctx.group, "sequence parallel gather backward"), None, None


class _ReduceScatterToSP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _reduce_scatter(x, group, "sequence parallel reduce-scatter", _enter(ctx, group))

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, 0, ctx.group, ctx.ledger), None


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
    all_reduce(flat, group)
    for grad, synced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(synced)


def max_over_job(value: float, state) -> float:
    """The largest `value` over every rank of `state`'s layout, and only those (idle RankPool ranks
    stay out): a max over mp, then over dp, reaches all of them because every mp group holds one
    rank of every dp group. Also a barrier; used to agree on a failure or on stopping."""
    flag = torch.tensor([float(value)], device=state.device)
    for group in (state.mp_group, state.dp_group):
        if group is not None:
            all_reduce(flag, group, op="max")
    return float(flag)
