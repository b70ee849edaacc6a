"""The model's norms: LayerNorm or RMSNorm, optionally with a zero-centred gamma.

With --apply-layernorm-1p the weight is stored as (gamma - 1): it starts at zero and is applied
as (1 + weight), so weight decay pulls gamma towards 1 instead of 0. Megatron applies it through
Transformer Engine's zero_centered_gamma (LayerNorm and RMSNorm alike) and its fused LayerNorm;
megalith does the same for both kinds. At initialisation the output is bitwise that of the plain
norm (1 + 0 is exactly 1).

Which implementation computes the norm is megalith.kernel_choice's decision (its `norm`):
torch's, megalith_kernels' Triton kernel, apex's fused kernels or Transformer Engine's. Every
one keeps the parameters `weight` (and `bias`) of torch's modules, so checkpoints do not care.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from megalith.config import ModelConfig
from megalith.kernel_choice import kernels_of
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


def _triton_layer_norm(backend: str):
    import megalith_kernels

    def run(x, weight, bias, eps, zero_centred):
        return megalith_kernels.layer_norm(x, weight, bias, eps, zero_centered_gamma=zero_centred, backend=backend)
    return run


def _triton_rms_norm(backend: str):
    import megalith_kernels

    def run(x, weight, bias, eps, zero_centred):
        return megalith_kernels.rms_norm(x, weight, eps, zero_centered_gamma=zero_centred, backend=backend)
    return run


def _apex_layer_norm(backend: str):
    fused = importlib.import_module("apex.normalization.fused_layer_norm").fused_layer_norm_affine

    def run(x, weight, bias, eps, zero_centred):
        return fused(x, weight + 1 if zero_centred else weight, bias, weight.shape, eps)
    return run


def _apex_rms_norm(backend: str):
    fused = importlib.import_module("apex.normalization.fused_layer_norm").fused_rms_norm_affine

    def run(x, weight, bias, eps, zero_centred):
        return fused(x, weight + 1 if zero_centred else weight, weight.shape, eps)
    return run


KERNEL_NORMS = {("triton", "LayerNorm"): _triton_layer_norm, ("triton", "RMSNorm"): _triton_rms_norm,
                ("apex", "LayerNorm"): _apex_layer_norm, ("apex", "RMSNorm"): _apex_rms_norm}


class KernelNorm(nn.Module):
    """A norm computed by a fused kernel, with torch's parameters (`weight`, LayerNorm's `bias`)."""

    def __init__(self, config: ModelConfig, size: int, kernel: str, backend: str, device=None) -> None:
        super().__init__()
        self.eps, self.zero_centred = config.norm_epsilon, config.apply_layernorm_1p
        self.kernel, self.normalization = kernel, config.normalization
        self.weight = nn.Parameter(torch.empty(size, dtype=config.torch_dtype, device=device))
        layer_norm = config.normalization == "LayerNorm"
        self.bias = nn.Parameter(torch.empty(size, dtype=config.torch_dtype, device=device)) if layer_norm else None
        self._run = KERNEL_NORMS[kernel, config.normalization](backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.zero_centred else nn.init.ones_)(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.weight, self.bias, self.eps, self.zero_centred)

    def extra_repr(self) -> str:
        return f"{self.normalization} ({self.kernel}), size={self.weight.shape[0]}, eps={self.eps}"


def norm_class(config: ModelConfig) -> type[nn.Module]:
    """torch's norm class for `config` (the reference implementation)."""
    if config.normalization == "LayerNorm":
        return ZeroCentredLayerNorm if config.apply_layernorm_1p else nn.LayerNorm
    return ZeroCentredRMSNorm if config.apply_layernorm_1p else nn.RMSNorm


def build_norm(config: ModelConfig, ctx: ParallelContext, size: int | None = None,
               partial_over_tp: bool = False) -> nn.Module:
    """The model's norm over `size` (default: the hidden size), replicated over tp.

    Its gradients are summed over tp when each rank computes only part of them: under SP (each
    rank's tokens), or with `partial_over_tp` (a per-head norm over each rank's heads: qk-layernorm).
    """
    size = size or config.hidden_size
    kernels = kernels_of(config, ctx)
    if kernels.norm == "te":
        from megalith.models.te_layers import te_norm

        return te_norm(config, ctx, size, partial_over_tp)
    if kernels.norm in ("triton", "apex"):
        norm = KernelNorm(config, size, kernels.norm, kernels.backend, ctx.device)
    else:
        norm = norm_class(config)(size, eps=config.norm_epsilon, dtype=config.torch_dtype, device=ctx.device)
    return mark_sequence_parallel(norm, ctx.sequence_parallel or (partial_over_tp and ctx.tp_size > 1))
