"""Per-rank checks of the MoE layer under expert parallelism against one process (run by a RankPool)."""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist

from megalith.config import ModelConfig
from megalith.models.moe import MoELayer
from megalith.models.parallel_context import ParallelContext
from megalith.parallel.layers import normal_init
from megalith.testing import relative_error

CONFIG = ModelConfig(num_layers=1, hidden_size=16, num_attention_heads=2, ffn_hidden_size=8, seq_length=4,
                     vocab_size=64, num_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                     disable_bias_linear=True)


def _layer(config, ctx):
    init = normal_init(0.2, torch.Generator().manual_seed(5))
    return MoELayer(config, ctx, init, init)


def expert_parallel_checks(rank_ctx, ep: int, options: dict) -> dict:
    """Each of the first `ep` ranks holds its own 3 sequences; the layer over the ep group against one process
    over all ranks' sequences: outputs, input gradients, this rank's experts' gradients, the router's (summed)."""
    config = replace(CONFIG, **options)
    ranks = list(range(ep))
    group = dist.new_group(ranks)  # every rank takes part in new_group
    if rank_ctx.rank >= ep:
        return {}
    full = torch.randn(4, 3 * ep, 16, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(4, 3 * ep, 16, generator=torch.Generator().manual_seed(2))
    reference = _layer(config, ParallelContext())
    x = full.clone().requires_grad_()
    (reference(x) * grad).sum().backward()
    ctx = ParallelContext()
    ctx.ep_group = group
    layer = _layer(config, ctx)
    mine = slice(3 * rank_ctx.rank, 3 * rank_ctx.rank + 3)
    xs = full[:, mine].clone().requires_grad_()
    out = layer(xs)
    (out * grad[:, mine]).sum().backward()
    local = config.num_experts // ep
    experts = slice(rank_ctx.rank * local, rank_ctx.rank * local + local)
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad, group=group)
    return {
        "weights": relative_error(layer.experts.weight1.detach(), reference.experts.weight1[experts].detach()),
        "output": relative_error(out.detach(), reference(x)[:, mine].detach()),
        "input grad": relative_error(xs.grad, x.grad[:, mine]),
        "fc1 grad": relative_error(layer.experts.weight1.grad, reference.experts.weight1.grad[experts]),
        "fc2 grad": relative_error(layer.experts.weight2.grad, reference.experts.weight2.grad[experts]),
        "router grad": relative_error(router_grad, reference.router.weight.grad),
        "local experts": layer.experts.weight1.shape[0],
    }
