"""Transformer Engine's layers in megalith's places, for --transformer-impl transformer_engine.

A small adapter, written against TE's public API and not run in megalith's CPU test suite
(TE needs CUDA); the selection and the refusals are tested with a stand-in module. It keeps
megalith's parameter names and shapes (checkpoints load under either implementation) and
megalith's initial weights (each TE layer is given the weights its megalith twin drew, so a
sharded parameter is still the slice of the full tensor one process would have drawn). For
that reason the norm and the following linear stay two modules: TE's LayerNormLinear would
move the norm's weight into the linear (`linear_qkv.layer_norm_weight`), a different checkpoint.
"""

from __future__ import annotations

import contextlib
import importlib

import torch
from torch import nn

from megalith.parallel.layers import ColumnParallelLinear, RowParallelLinear, mark_sequence_parallel


def te():
    """transformer_engine.pytorch (the seam checked that it imports before any model is built)."""
    return importlib.import_module("transformer_engine.pytorch")


def _copy(target: nn.Module, source: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, param in source.named_parameters():
            mine = getattr(target, name)
            mine.copy_(param)
            for key, value in vars(param).items():  # sharding and sequence-parallel marks the optimizer reads
                setattr(mine, key, value)
    return target


def te_norm(config, ctx, size: int, partial_over_tp: bool) -> nn.Module:
    """TE's LayerNorm / RMSNorm (zero-centred gamma for --apply-layernorm-1p), weights `weight` (+ `bias`)."""
    cls = te().LayerNorm if config.normalization == "LayerNorm" else te().RMSNorm
    norm = cls(size, eps=config.norm_epsilon, sequence_parallel=ctx.sequence_parallel, params_dtype=config.torch_dtype,
               zero_centered_gamma=config.apply_layernorm_1p, device=ctx.device)
    return mark_sequence_parallel(norm, ctx.sequence_parallel or (partial_over_tp and ctx.tp_size > 1))


def te_linear(layer: ColumnParallelLinear | RowParallelLinear, ctx, config, fp8_param_gather: bool = False):
    """TE's Linear with `layer`'s shape, tp group, sequence parallelism and initial weights."""
    column = isinstance(layer, ColumnParallelLinear)
    in_size, out_size = (layer.input_size, layer.output_size)
    model_init = te().fp8_model_init(enabled=True) if fp8_param_gather else contextlib.nullcontext()
    with model_init:
        linear = te().Linear(in_size, out_size, bias=layer.bias is not None, tp_group=ctx.tp_group,
                             tp_size=ctx.tp_size, sequence_parallel=ctx.sequence_parallel,
                             parallel_mode="column" if column else "row", return_bias=layer.skip_bias_add,
                             params_dtype=config.torch_dtype, device=ctx.device)
    return _copy(linear, layer)


class TEAttention(nn.Module):
    """TE's DotProductAttention on megalith's `[s, b, heads, d]` tensors (qkv_format "sbhd")."""

    def __init__(self, config, ctx, causal: bool, softmax_scale: float | None) -> None:
        super().__init__()
        self.causal = causal
        self.attention = te().DotProductAttention(
            config.num_attention_heads, config.kv_channels, num_gqa_groups=config.num_query_groups,
            attention_dropout=config.attention_dropout, qkv_format="sbhd", tp_size=ctx.tp_size, tp_group=ctx.tp_group,
            softmax_scale=softmax_scale)

    def forward(self, q, k, v, attention_mask):
        if attention_mask is None:
            kind = "causal" if self.causal else "no_mask"
        else:
            kind = "padding_causal" if self.causal else "padding"
        return self.attention(q, k, v, attention_mask=attention_mask, attn_mask_type=kind)


def fp8_context(choice):
    """te.fp8_autocast with the run's recipe around a forward; nothing without fp8."""
    if choice is None or choice.fp8 is None:
        return contextlib.nullcontext()
    return te().fp8_autocast(enabled=True, fp8_recipe=choice.fp8.recipe())


def te_cross_entropy(logits, target, tp_group, *, vocab_size: int, ignore_index: int, label_smoothing: float = 0.0):
    """TE's vocab-parallel cross-entropy, with the padding columns masked out first, so that the loss
    is megalith's (which never lets padding into the softmax)."""
    local = logits.shape[-1]
    from megalith.parallel import comm

    start = comm.group_rank(tp_group) * local
    if start + local > vocab_size:
        columns = torch.arange(start, start + local, device=logits.device)
        logits = logits.masked_fill(columns >= vocab_size, torch.finfo(logits.dtype).min)
    parallel = importlib.import_module("transformer_engine.pytorch.cross_entropy").parallel_cross_entropy
    return parallel(logits, target, label_smoothing, False, tp_group, ignore_index)
