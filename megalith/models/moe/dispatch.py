"""Token dispatch: tokens to their experts' rows and the experts' outputs back, weighted by the routing
probabilities. Both of Megatron's dispatchers are here. Each gives its experts the same rows in the same order
(expert-major; within an expert by source rank, then token), so they give bitwise-equal results at ep 1, and
at ep 2 with top-2 (each token's sum then has at most two terms, whatever the order of addition).

allgather: gathers every token over etp x ep and keeps the rows of this rank's experts (Megatron's
MoEAllGatherTokenDispatcher), dropless. alltoall: sends each token to the ep rank of its expert and sorts what
arrives by local expert (MoEAlltoAllTokenDispatcher); the one that supports capacity and padding. Under expert
tensor parallelism both first gather the tokens over etp (tp under SP), so each etp rank runs its slice of
the experts on the same rows. Which layouts run is checked before any group exists (Layout.check_moe)."""

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


class AllToAllDispatcher:
    """Megatron's alltoall dispatcher: the gather over the expert-tp group (etp; tp under SP), the
    expert-major permutation (with capacity padding when asked), an all-to-all over the ep group (each rank's rows to
    the rank of their experts; nothing at ep = 1) and the sort of what arrives from [source rank][local
    expert] to [local expert][source rank] (the identity at ep = 1)."""

    supports_capacity = True

    def __init__(self, config, ctx) -> None:
        self.config, self.ctx = config, ctx
        self.etp_group, self.ep_group = expert_tp_group(ctx), getattr(ctx, "ep_group", None)
        self.ep = group_size(self.ep_group)

    def dispatch(self, x: torch.Tensor, probs: torch.Tensor, routing_map: torch.Tensor):
        x, probs, routing_map = gather_tokens(self.etp_group, x, probs, routing_map)
        config, capacity = self.config, None
        if config.moe_pad_expert_input_to_capacity:
            capacity = expert_capacity(x.shape[0], config.num_experts, config.moe_router_topk,
                                       config.moe_expert_capacity_factor)
        rows, perm = permute(x, routing_map, capacity)
        if self.ep == 1:
            return rows, perm.counts, (perm, probs, x.shape[0], None)
        local = self.config.num_experts // self.ep
        sent = torch.tensor(perm.counts, dtype=torch.int64, device=x.device).view(self.ep, local)
        arrived = torch.empty_like(sent)
        comm.all_to_all(arrived, sent, self.ep_group)  # [source rank, local expert]
        send, receive = sent.sum(1).tolist(), arrived.sum(1).tolist()
        rows = _AllToAll.apply(rows, self.ep_group, receive, send)
        sizes = arrived.flatten().tolist()
        by_expert = [source * local + e for e in range(local) for source in range(self.ep)]
        rows = _reorder(rows, sizes, by_expert)
        return rows, arrived.sum(0).tolist(), (perm, probs, x.shape[0], (sizes, by_expert, send, receive))

    def combine(self, y: torch.Tensor, state) -> torch.Tensor:
        perm, probs, tokens, exchange = state
        if exchange is not None:
            sizes, by_expert, send, receive = exchange
            back = sorted(range(len(by_expert)), key=by_expert.__getitem__)
            y = _reorder(y, [sizes[i] for i in by_expert], back)
            y = _AllToAll.apply(y, self.ep_group, send, receive)
        return scatter_output(self.etp_group, unpermute(y, probs, perm, tokens))


DISPATCHERS = {"allgather": AllGatherDispatcher, "alltoall": AllToAllDispatcher}


def build_dispatcher(config, ctx):
    return DISPATCHERS[config.moe_token_dispatcher_type](config, ctx)
