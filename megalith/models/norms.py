"""The model's norms: LayerNorm or RMSNorm, optionally with a zero-centred gamma.

With --apply-layernorm-1p the weight is stored as (gamma - 1): it starts at zero and is applied
as (1 + weight), so weight decay pulls gamma towards 1 instead of 0. Megatron applies it through
Transformer Engine's zero_centered_gamma (LayerNorm and RMSNorm alike) and its fused LayerNorm;
megalith does the same for both kinds. At initialisation the output is bitwise that of the plain
norm (1 + 0 is exactly 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalith.config import ModelConfig
from megalith.models.parallel_context import ParallelContext
from megalith.parallel.layers import mark_sequence_parallel


class ZeroCentredLayerNorm(nn.LayerNorm):
    """LayerNorm whose weight is (gamma - 1), initialised to zero."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.elementwise_affine:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight + 1, self.bias, self.eps)


class ZeroCentredRMSNorm(nn.RMSNorm):
    """RMSNorm whose weight is (gamma - 1), initialised to zero."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.elementwise_affine:
            nn.init.zeros_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight + 1, self.eps)


def norm_class(config: ModelConfig) -> type[nn.Module]:
    if config.normalization == "LayerNorm":
        return ZeroCentredLayerNorm if config.apply_layernorm_1p else nn.LayerNorm
    return ZeroCentredRMSNorm if config.apply_layernorm_1p else nn.RMSNorm


def build_norm(config: ModelConfig, ctx: ParallelContext, size: int | None = None,
               partial_over_tp: bool = False) -> nn.Module:
    """The model's norm over `size` (default: the hidden size), replicated over tp.

    Its gradients are summed over tp when each rank computes only part of them: under SP (each
    rank's tokens), or with `partial_over_tp` (a per-head norm over each rank's heads: qk-layernorm).
    """
    norm = norm_class(config)(size or config.hidden_size, eps=config.norm_epsilon, dtype=config.torch_dtype,
                              device=ctx.device)
    return mark_sequence_parallel(norm, ctx.sequence_parallel or (partial_over_tp and ctx.tp_size > 1))
