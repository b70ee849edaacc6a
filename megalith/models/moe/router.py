"""The top-k router: a replicated linear h -> E, the expert choice, capacity dropping, and the balancing
losses (Switch Transformer's aux loss, its per-sequence variant, ST-MoE's z-loss) as Megatron-Core defines
and scales them. The losses reach the gradient through MoELayer's side channel (see layer.py)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from megalith.models.moe.config import expert_capacity
from megalith.parallel import comm

ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class Routing(NamedTuple):
    """One batch's routing: `probs` [T, E] (0 where a token does not go), `routing_map` [T, E] bool, the
    side-channel loss (a scalar, already weighted; None when there is none) and detached values to log."""

    probs: torch.Tensor
    routing_map: torch.Tensor
    loss: torch.Tensor | None
    stats: dict


def aux_loss(scores: torch.Tensor, tokens_per_expert: torch.Tensor, total_tokens: int, topk: int,
             coeff: float) -> torch.Tensor:
    """Switch Transformer: E x sum_e f_e x P_e x coeff, f_e = tokens_e / (topk x T), P_e = the mean score of e.
    With this rank's share of the scores and all ranks' counts it is this rank's share of the sum."""
    experts = scores.shape[-1]
    return (scores.sum(0) * tokens_per_expert).sum() * (experts * coeff / (topk * total_tokens * total_tokens))


def seq_aux_loss(scores: torch.Tensor, routing_map: torch.Tensor, batch: int, topk: int,
                 coeff: float) -> torch.Tensor:
    """The aux loss per sequence, averaged over the batch (tokens sequence-first: T = s x b)."""
    experts = scores.shape[-1]
    seq = scores.shape[0] // batch
    load = routing_map.reshape(seq, batch, experts).sum(0, dtype=scores.dtype) / (seq * topk / experts)
    return (load * scores.reshape(seq, batch, experts).mean(0)).sum(1).mean() * coeff


def z_loss(logits: torch.Tensor, coeff: float) -> torch.Tensor:
    """ST-MoE: mean over tokens of logsumexp(logits)^2, times coeff."""
    return torch.logsumexp(logits, dim=-1).square().mean() * coeff


def _topk_probs(config, logits: torch.Tensor, bias: torch.Tensor | None):
    """Chosen experts [T, k] and their probabilities [T, k] (Megatron's order of softmax and top-k)."""
    topk = config.moe_router_topk
    if config.moe_router_score_function == "softmax":
        if config.moe_router_pre_softmax:
            probs, chosen = torch.topk(torch.softmax(logits, dim=-1), topk, dim=-1)
        else:
            top, chosen = torch.topk(logits, topk, dim=-1)
            probs = torch.softmax(top, dim=-1)
    else:
        scores = torch.sigmoid(logits)
        _, chosen = torch.topk(scores if bias is None else scores + bias, topk, dim=-1)
        probs = scores.gather(1, chosen)
        probs = probs / (probs.sum(-1, keepdim=True) + 1e-20) if topk > 1 else probs
    if config.moe_router_topk_scaling_factor is not None:
        probs = probs * config.moe_router_topk_scaling_factor
    return chosen, probs


def capacity_mask(config, probs: torch.Tensor, routing_map: torch.Tensor) -> torch.Tensor:
    """Which (token, expert) pairs fit the experts' capacity: per expert the `capacity` highest probabilities
    (probs) or earliest tokens (position); ties go to the earlier token."""
    tokens, experts = routing_map.shape
    capacity = expert_capacity(tokens, experts, config.moe_router_topk, config.moe_expert_capacity_factor)
    if config.moe_token_drop_policy == "position":
        return routing_map & (routing_map.long().cumsum(0) <= capacity)
    keys = torch.where(routing_map, probs.detach(), torch.full_like(probs, -1.0))
    order = torch.sort(keys, dim=0, descending=True, stable=True).indices[:capacity]
    keep = torch.zeros_like(routing_map).scatter(0, order, True)
    return routing_map & keep


class TopKRouter(nn.Module):
    """Replicated over tp (each rank routes the tokens it holds; under SP its gradient is summed over tp);
    `weight` [E, h] drawn with the layer's init. Under SP the balancing loss is each rank's share (token counts
    summed over tp, T = local tokens x tp) and the z-loss coefficient is divided by tp, as Megatron does.

    With --moe-router-enable-expert-bias a buffer `expert_bias` [E] joins the choice only (never the
    probabilities), and `tokens_per_expert` counts the tokens routed since the last update_expert_biases."""

    def __init__(self, config, ctx, init) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        full = torch.zeros(config.num_experts, config.hidden_size, dtype=torch.float32)
        init(full)
        self.weight = nn.Parameter(full.to(dtype=config.torch_dtype, device=ctx.device))
        self.weight.sequence_parallel = ctx.sequence_parallel and ctx.tp_size > 1
        self.dtype = ROUTER_DTYPES.get(config.moe_router_dtype)
        if config.moe_router_enable_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32, device=ctx.device))
            self.register_buffer("tokens_per_expert", torch.zeros(config.num_experts, dtype=torch.float32,
                                                                  device=ctx.device), persistent=False)
        else:
            self.expert_bias = self.tokens_per_expert = None

    def forward(self, x: torch.Tensor, batch: int) -> Routing:
        """Route `x` [T, h] (T = s x b tokens, sequence-first)."""
        config = self.config
        dtype = self.dtype or x.dtype
        logits = torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype))
        bias = None if self.expert_bias is None else self.expert_bias.to(dtype)
        chosen, top_probs = _topk_probs(config, logits, bias)
        routing_map = torch.zeros_like(logits, dtype=torch.bool).scatter(1, chosen, True)
        probs = torch.zeros_like(logits).scatter(1, chosen, top_probs)
        before = routing_map
        if config.moe_expert_capacity_factor is not None:
            routing_map = capacity_mask(config, probs, routing_map)
            probs = probs * routing_map
        if self.tokens_per_expert is not None and torch.is_grad_enabled():
            self.tokens_per_expert += routing_map.sum(0)
        balance, z = self._losses(logits, batch)
        loss = balance if z is None else z if balance is None else balance + z
        stats = {"tokens_per_expert": routing_map.sum(0).detach(),
                 "dropped": (before.sum() - routing_map.sum()).detach()}
        if loss is not None:  # the weighted sum, and each weighted part for the logs
            stats["loss"] = loss.detach()
            stats["balance_loss"] = None if balance is None else balance.detach()
            stats["z_loss"] = None if z is None else z.detach()
        return Routing(probs, routing_map, loss, stats)

    def _losses(self, logits: torch.Tensor, batch: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The weighted balancing loss and the weighted z-loss (each None when it is off)."""
        config, total, z = self.config, None, None
        kind, coeff = config.moe_router_load_balancing_type, config.moe_aux_loss_coeff
        if kind != "none" and coeff > 0:
            if config.moe_router_score_function == "softmax":
                scores = torch.softmax(logits, dim=-1)
            else:
                scores = torch.sigmoid(logits)
                scores = scores / (scores.sum(-1, keepdim=True) + 1e-20)
            chosen = torch.topk(scores, config.moe_router_topk, dim=-1).indices
            routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, chosen, True)
            if kind == "aux_loss":
                counts = routing_map.sum(0, dtype=scores.dtype)
                if self.ctx.tp_size > 1:
                    comm.all_reduce(counts, self.ctx.tp_group)
                total = aux_loss(scores, counts, scores.shape[0] * self.ctx.tp_size, config.moe_router_topk, coeff)
            else:
                total = seq_aux_loss(scores, routing_map, batch, config.moe_router_topk, coeff)
        if config.moe_z_loss_coeff:
            z = z_loss(logits, config.moe_z_loss_coeff / self.ctx.tp_size)
        return total, z


def update_expert_biases(model: nn.Module, groups=()) -> None:
    """DeepSeek-V3's aux-free balancing, after each optimizer step: bias += rate x sign(mean load - load) for
    every router with an expert bias, the loads summed over each of `groups` (the ranks that saw other tokens:
    dp; none: this process only; under sequence parallelism the router's tp group too), then the counts restart."""
    for module in model.modules():
        if not isinstance(module, TopKRouter) or module.expert_bias is None:
            continue
        counts = module.tokens_per_expert
        tp = [module.ctx.tp_group] if module.ctx.sequence_parallel and module.ctx.tp_size > 1 else []
        for group in list(groups) + tp:
            if group is not None and comm.group_size(group) > 1:
                comm.all_reduce(counts, group)
        offset = counts.mean() - counts
        module.expert_bias += torch.sign(offset) * module.config.moe_router_bias_update_rate
        counts.zero_()
