"""The MoE MLP: router -> dispatch -> experts -> combine, plus the optional shared expert; it takes the dense
MLP's place (`mlp`) in the layers --moe-layer-freq picks.

The router's balancing losses are not returned: they join the gradient through AuxLossSideChannel (the idea
of Megatron-Core's MoEAuxLossAutoScaler), an identity on the layer's output whose backward also gives the
loss the gradient `aux_loss_scale` (1.0; a training step that divides its loss by the number of
micro-batches sets the same factor with set_aux_loss_scale)."""

from __future__ import annotations

import torch
from torch import nn

from megalith.config.layout import Layout
from megalith.models.moe.dispatch import build_dispatcher, expert_tp_group
from megalith.models.moe.experts import Experts
from megalith.models.moe.router import TopKRouter
from megalith.models.moe.shared import build_shared_expert
from megalith.parallel import comm


class AuxLossSideChannel(torch.autograd.Function):
    """Forward: `output` unchanged. Backward: `output`'s gradient, and `scale` as the gradient of `loss`."""

    @staticmethod
    def forward(ctx, output: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(loss)
        ctx.scale = scale
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(loss, ctx.scale), None


class MoELayer(nn.Module):
    """x [s, b, h] -> [s, b, h]: each token through its top-k experts, weighted by the router's probabilities,
    plus the shared expert's output when --moe-shared-expert-intermediate-size is given.

    `last_stats` keeps the latest forward's detached numbers (tokens per expert, dropped pairs, the weighted
    balancing loss) for the logs that issue 21 adds later."""

    def __init__(self, config, ctx, init, output_init, shared_mlp=None) -> None:
        """`shared_mlp`: the dense MLP class (megalith.models.transformer.MLP), which builds the shared expert."""
        super().__init__()
        check_layer_layout(config, ctx)
        self.config, self.ctx = config, ctx
        self.dispatcher = build_dispatcher(config, ctx)  # first: its checks come before any weight is drawn
        self.router = TopKRouter(config, ctx, init)
        self.experts = Experts(config, ctx, init, output_init)
        self.shared_experts = build_shared_expert(config, ctx, init, output_init, shared_mlp)
        self.aux_loss_scale = 1.0
        self.last_stats: dict = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, b, h = x.shape
        tokens = x.reshape(s * b, h)
        routing = self.router(tokens, b)
        rows, counts, state = self.dispatcher.dispatch(tokens, routing.probs, routing.routing_map)
        out = self.dispatcher.combine(self.experts(rows, counts), state)
        if self.experts.bias2 is not None and not self.experts.bias_on_rows:  # fc2's bias once per token: sum_e p_e x bias2[e], this rank's tokens
            out = out + routing.probs.to(out.dtype) @ self.experts.bias2
        out = out.reshape(s, b, h)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        self.last_stats = routing.stats
        if routing.loss is not None and torch.is_grad_enabled():
            out = AuxLossSideChannel.apply(out, routing.loss, self.aux_loss_scale)
        return out


def check_layer_layout(config, ctx) -> None:
    """The layout rules of Layout.check_moe (pretrain and verify check them before any group is built),
    again from the groups in `ctx`, for a layer built by hand."""
    etp = comm.group_size(expert_tp_group(ctx))
    ep, tp = comm.group_size(getattr(ctx, "ep_group", None)), ctx.tp_size
    Layout(tp=tp, ep=ep, etp=etp, sequence_parallel=ctx.sequence_parallel).check_moe(config)


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """Give every MoE layer's balancing loss the gradient `scale` (the factor the main loss is scaled by)."""
    for module in model.modules():
        if isinstance(module, MoELayer):
            module.aux_loss_scale = float(scale)
