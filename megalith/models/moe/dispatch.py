"""Token dispatch: tokens to their experts' rows and the experts' outputs back, weighted by the routing
probabilities. Both of Megatron's dispatchers are here. Each gives its experts the same rows in the same order
(expert-major; within an expert by ep rank, etp rank, then token). At etp 1 they are bitwise equal: at ep 1
the same local permutation; under ep with top-2 each token's sums have at most two nonzero terms, exact in
any order. Under etp > 1 alltoall sums the etp partials per row, allgather per token: equal to rounding.

allgather: gathers every token over etp x ep and keeps the rows of this rank's experts (Megatron's
MoEAllGatherTokenDispatcher), dropless. alltoall: sends each token to the ep rank of its expert and sorts what
arrives by local expert (MoEAlltoAllTokenDispatcher); the one that supports capacity and padding. Under expert
tensor parallelism each etp rank runs its slice of the experts on the same rows: allgather gathers the
tokens over etp first; alltoall gathers the rows that arrived, so only a rank's own tokens cross the ep
all-to-all. Which layouts run is checked before any group exists (Layout.check_moe)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from megalith.models.moe.config import expert_capacity
from megalith.parallel import comm


class Permutation(NamedTuple):
    """Where each dispatched row came from: `tokens` [N] and `experts` [N]; `slots` [N] (row of each pair in
    the expert input; None: rows are the pairs in order) and the rows per expert `counts`."""

    tokens: torch.Tensor
    experts: torch.Tensor
    slots: torch.Tensor | None
    counts: list[int]


def group_size(group) -> int:
    return comm.group_size(group)


def permute(x: torch.Tensor, routing_map: torch.Tensor, capacity: int | None = None):
    """Rows of x for each (token, expert) pair, expert-major; with `capacity` each expert gets exactly that
    many rows, zero-padded."""
    experts, tokens = routing_map.t().nonzero(as_tuple=True)
    per_expert = routing_map.sum(0)
    if capacity is None:
        return x[tokens], Permutation(tokens, experts, None, per_expert.tolist())
    starts = torch.cumsum(per_expert, 0) - per_expert
    slots = experts * capacity + torch.arange(tokens.numel(), device=x.device) - starts[experts]
    rows = x.new_zeros(routing_map.shape[1] * capacity, x.shape[1]).index_copy(0, slots, x[tokens])
    return rows, Permutation(tokens, experts, slots, [capacity] * routing_map.shape[1])


def unpermute(y: torch.Tensor, probs: torch.Tensor, perm: Permutation, num_tokens: int) -> torch.Tensor:
    """Sum each token's expert outputs weighted by their probabilities (pairs in expert-major order)."""
    rows = y if perm.slots is None else y.index_select(0, perm.slots)
    weights = probs[perm.tokens, perm.experts].to(rows.dtype).unsqueeze(-1)
    return y.new_zeros(num_tokens, y.shape[1]).index_add(0, perm.tokens, rows * weights)


def expert_tp_group(ctx):
    """The group each expert is tensor-parallel over: etp (the tp group unless --expert-tensor-parallel-size
    sets another; a context without etp_group: tp)."""
    group = getattr(ctx, "etp_group", None)
    return ctx.tp_group if group is None else group


def gather_tokens(group, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
    """Every rank of `group`'s tokens, probabilities and routing (dim 0, in rank order; nothing for one rank).
    Gradients come back reduce-scattered: each rank's experts see all of them and hold a partial result."""
    size = group_size(group)
    if size == 1:
        return x, probs, routing_map
    gathered = torch.empty((size,) + tuple(routing_map.shape), dtype=torch.uint8, device=routing_map.device)
    comm.all_gather_into(gathered.view(-1), routing_map.to(torch.uint8).contiguous().view(-1), group)
    return (comm.gather_from_sequence_parallel(x, group), comm.gather_from_sequence_parallel(probs, group),
            gathered.flatten(0, 1).bool())


def scatter_output(group, out: torch.Tensor) -> torch.Tensor:
    """Sum the ranks' partial outputs over `group`, each keeping its own tokens (the inverse of gather_tokens)."""
    return out if group_size(group) == 1 else comm.reduce_scatter_to_sequence_parallel(out, group)


class AllGatherDispatcher:
    """Megatron's allgather dispatcher: every token gathered over etp (tp under SP), then over ep (so over
    etp x ep, in that group's rank order); each rank permutes the pairs of its own experts, and the partial
    outputs are reduce-scattered back over ep, then etp. At ep = etp = 1 a local permutation."""

    supports_capacity = False

    def __init__(self, config, ctx) -> None:
        self.config, self.ctx = config, ctx
        self.etp_group, self.ep_group = expert_tp_group(ctx), getattr(ctx, "ep_group", None)
        self.ep = group_size(self.ep_group)
        local = config.num_experts // self.ep
        first = comm.group_rank(self.ep_group) * local if self.ep > 1 else 0
        self.mine = slice(first, first + local)

    def dispatch(self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        x, probs, routing_map = gather_tokens(self.etp_group, x, probs, routing_map)
        if self.ep > 1:
            x, probs, routing_map = gather_tokens(self.ep_group, x, probs, routing_map)
            probs, routing_map = probs[:, self.mine], routing_map[:, self.mine]
        rows, perm = permute(x, routing_map)
        return rows, perm.counts, (perm, probs, x.shape[0])

    def combine(self, y: torch.Tensor, state) -> torch.Tensor:
        perm, probs, tokens = state
        out = scatter_output(self.ep_group, unpermute(y, probs, perm, tokens)) if self.ep > 1 else \
            unpermute(y, probs, perm, tokens)
        return scatter_output(self.etp_group, out)


class _AllToAll(torch.autograd.Function):
    """Rows to the ep ranks (`send` rows to each, `receive` from each); backward sends the gradients back."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group, receive: list[int], send: list[int]) -> torch.Tensor:
        ctx.group, ctx.receive, ctx.send = group, receive, send
        return _exchange(rows, group, receive, send)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group, ctx.send, ctx.receive), None, None, None


def _exchange(rows: torch.Tensor, group, receive: list[int], send: list[int]) -> torch.Tensor:
    out = rows.new_empty((sum(receive),) + tuple(rows.shape[1:]))
    comm.all_to_all(out, rows.contiguous(), group, output_split_sizes=receive, input_split_sizes=send)
    return out


def _reorder(rows: torch.Tensor, sizes: list[int], order: list[int]) -> torch.Tensor:
    chunks = torch.split(rows, sizes)
    return torch.cat([chunks[i] for i in order], dim=0)


def _gather_v(rows: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows (rank r holds sizes[r]) in rank order, by one all-to-all of this rank's rows."""
    size = group_size(group)
    out = rows.new_empty((sum(sizes),) + tuple(rows.shape[1:]))
    comm.all_to_all(out, rows.contiguous().repeat((size,) + (1,) * (rows.dim() - 1)), group,
                    output_split_sizes=sizes, input_split_sizes=[rows.shape[0]] * size)
    return out


def _reduce_scatter_v(rows: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """This rank's block of rows (sizes[rank] of them) summed over the group, in rank order."""
    size, mine = group_size(group), sizes[comm.group_rank(group)]
    out = rows.new_empty((size * mine,) + tuple(rows.shape[1:]))
    comm.all_to_all(out, rows.contiguous(), group, output_split_sizes=[mine] * size, input_split_sizes=sizes)
    parts = out.unflatten(0, (size, mine))
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


class _GatherV(torch.autograd.Function):
    """Rows of variable count from every etp rank; backward: each rank's gradient slices summed."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
        ctx.group, ctx.sizes = group, sizes
        return _gather_v(rows, group, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _reduce_scatter_v(grad, ctx.group, ctx.sizes), None, None


class _ReduceScatterV(torch.autograd.Function):
    """The inverse of _GatherV: partial rows summed over the etp ranks, each keeping its own block."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
        ctx.group, ctx.sizes = group, sizes
        return _reduce_scatter_v(rows, group, sizes)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_v(grad, ctx.group, ctx.sizes), None, None


class AllToAllDispatcher:
    """Megatron's alltoall dispatcher: the expert-major permutation of this rank's tokens (with capacity
    padding when asked), an all-to-all over the ep group (each rank's rows to the rank of their experts), a
    gather of what arrived over the expert-tp group (etp; tp under SP), and the sort of the rows from
    [etp rank][source rank][local expert] to [local expert][source rank][etp rank] (the allgather
    dispatcher's order). Combine undoes it: the experts' partial rows are reduce-scattered over etp before
    they go back. Only this rank's tokens cross the all-to-all: top-k x tokens x h per direction."""

    supports_capacity = True

    def __init__(self, config, ctx) -> None:
        self.config, self.ctx = config, ctx
        self.etp_group, self.ep_group = expert_tp_group(ctx), getattr(ctx, "ep_group", None)
        self.ep, self.etp = group_size(self.ep_group), group_size(self.etp_group)

    def dispatch(self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        config, capacity = self.config, None
        if config.moe_pad_expert_input_to_capacity:
            capacity = expert_capacity(x.shape[0], config.num_experts, config.moe_router_topk,
                                       config.moe_expert_capacity_factor)
        rows, perm = permute(x, routing_map, capacity)
        if self.ep == 1 and self.etp == 1:
            return rows, perm.counts, (perm, probs, x.shape[0], None)
        local = config.num_experts // self.ep
        arrived = torch.tensor(perm.counts, dtype=torch.int64, device=x.device).view(self.ep, local)
        sent = None
        if self.ep > 1:  # arrived: [source rank, local expert]
            sent, arrived = arrived, torch.empty_like(arrived)
            comm.all_to_all(arrived, sent, self.ep_group)
            sent = (sent.sum(1).tolist(), arrived.sum(1).tolist())
            rows = _AllToAll.apply(rows, self.ep_group, sent[1], sent[0])
        every, etp_sizes = arrived.unsqueeze(0), None  # [etp rank, source rank, local expert]
        if self.etp > 1:
            every = torch.empty((self.etp,) + tuple(arrived.shape), dtype=arrived.dtype, device=arrived.device)
            comm.all_gather_into(every.view(-1), arrived.contiguous().view(-1), self.etp_group)
            etp_sizes = every.sum((1, 2)).tolist()
            rows = _GatherV.apply(rows, self.etp_group, etp_sizes)
        sizes = every.flatten().tolist()
        order = [(j * self.ep + source) * local + e for e in range(local) for source in range(self.ep)
                 for j in range(self.etp)]
        rows = _reorder(rows, sizes, order)
        return rows, every.sum((0, 1)).tolist(), (perm, probs, x.shape[0], (sizes, order, sent, etp_sizes))

    def combine(self, y: torch.Tensor, state) -> torch.Tensor:
        perm, probs, tokens, exchange = state
        if exchange is not None:
            sizes, order, sent, etp_sizes = exchange
            back = sorted(range(len(order)), key=order.__getitem__)
            y = _reorder(y, [sizes[i] for i in order], back)
            if etp_sizes is not None:
                y = _ReduceScatterV.apply(y, self.etp_group, etp_sizes)
            if sent is not None:
                y = _AllToAll.apply(y, self.ep_group, sent[0], sent[1])
        return unpermute(y, probs, perm, tokens)


DISPATCHERS = {"allgather": AllGatherDispatcher, "alltoall": AllToAllDispatcher}


def build_dispatcher(config, ctx):
    return DISPATCHERS[config.moe_token_dispatcher_type](config, ctx)
