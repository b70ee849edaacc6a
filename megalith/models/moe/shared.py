"""The MoE layer's shared expert: a dense MLP every token goes through, optionally gated per token.

With --moe-shared-expert-gate (Megatron-Core's `moe_shared_expert_gate`, Qwen2-MoE's `shared_expert_gate`)
the MLP's output is multiplied by sigmoid(x . gate_weight), gate_weight [1, h] replicated over tp. The parameters
keep Megatron's names: `shared_experts.linear_fc1`, `shared_experts.linear_fc2`, `shared_experts.gate_weight`.
Without the flag the shared expert is the dense MLP itself, so such a model is unchanged."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn


class GatedSharedExpert(nn.Module):
    """mlp(x) * sigmoid(x . gate_weight^T), per token.

    It takes over the MLP's submodules (so names stay Megatron's) and keeps the MLP's forward to run them; the
    MLP is not registered a second time. Under sequence parallelism x is this rank's tokens, as the MLP's output
    is, and the gate's gradient is summed over tp (marked `sequence_parallel`, like the router)."""

    def __init__(self, mlp: nn.Module, config, ctx, init) -> None:
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.dense_forward = mlp.forward  # a bound method: runs the (shared) submodules taken over above
        full = torch.zeros(1, config.hidden_size, dtype=torch.float32)
        init(full)
        self.gate_weight = nn.Parameter(full.to(dtype=config.torch_dtype, device=ctx.device))
        self.gate_weight.sequence_parallel = ctx.sequence_parallel and ctx.tp_size > 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(torch.nn.functional.linear(x, self.gate_weight))
        return self.dense_forward(x) * gate


def build_shared_expert(config, ctx, init, output_init, shared_mlp) -> nn.Module | None:
    """The shared expert of --moe-shared-expert-intermediate-size (None without it): `shared_mlp` (the dense
    MLP class) of that ffn size, gated when --moe-shared-expert-gate is given. Its weights are drawn after the
    router's and the experts' (the gate's last), as before the gate existed."""
    if config.moe_shared_expert_intermediate_size is None:
        return None
    mlp = shared_mlp(replace(config, ffn_hidden_size=config.moe_shared_expert_intermediate_size), ctx, init,
                     output_init)
    return GatedSharedExpert(mlp, config, ctx, init) if config.moe_shared_expert_gate else mlp
