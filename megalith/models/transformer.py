"""The transformer layer and block, built from the tensor-parallel layers.

Activations are sequence-first `[s, b, h]` (`[s/tp, b, h]` between layers under sequence
parallelism). Parameter names follow Megatron-Core (`self_attention.linear_qkv`,
`mlp.linear_fc1`, `input_layernorm`, ...) so checkpoints and conversion scripts line up.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.kernel_choice import KernelChoice, kernels_of
from megalith.models.moe import MoELayer, moe_layer_pattern
from megalith.models.norms import build_norm
from megalith.models.parallel_context import ParallelContext
from megalith.models.te_layers import fp8_context
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.parallel.layers import ColumnParallelLinear, InitMethod, RowParallelLinear
from megalith.parallel.rng import TP_LOCAL, checkpoint

__all__ = ["MLP", "SelfAttention", "TransformerBlock", "TransformerLayer", "apply_rotary", "attend", "build_norm",
           "core_attention", "dropout", "loss_per_token", "masked_dropout", "rotary_cos_sin", "rotate"]


def dropout(x: torch.Tensor, p: float, training: bool, ctx: ParallelContext, stream: str) -> torch.Tensor:
    """Dropout drawn from one of the tracker's streams (so tp ranks agree or differ on purpose)."""
    if p == 0.0 or not training:
        return x
    with ctx.rng_tracker.fork(stream):
        return masked_dropout(x, p)


def masked_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout that keeps a 1-byte mask for backward on every device. On CPU,
    F.dropout keeps the scaled mask in x's dtype (2 or 4 bytes an element); the same draw and
    the same kept values, at a quarter of the memory in fp32 (see docs/memory.md)."""
    return torch.native_dropout(x, p, True)[0]


def rotary_cos_sin(seq_length: int, dim: int, base: int, device=None,
                   position_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (fp32) for rotary embeddings: `[s, 1, 1, d]` over positions 0..s-1, or
    `[s, b, 1, d]` over per-sequence `position_ids [b, s]` (positions restarting at documents)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))
    if position_ids is None:
        freqs = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)[:, None, :]
    else:
        freqs = position_ids.t().to(torch.float32)[:, :, None] * inv_freq  # [s, b, d/2]
    angles = torch.cat([freqs, freqs], dim=-1)[:, :, None, :]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `[s, b, n, d]` by position (non-interleaved halves, as Megatron and GPT-NeoX), in fp32.

    cos and sin of r < d channels (--rotary-percent) rotate the first r channels of each head and
    pass the rest through unchanged, as Megatron does."""
    rotary = cos.shape[-1]
    passed = None
    if rotary < x.shape[-1]:
        x, passed = x[..., :rotary], x[..., rotary:]
    x32 = x.float()
    first, second = x32.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    out = (x32 * cos + rotated * sin).to(x.dtype)
    return out if passed is None else torch.cat([out, passed], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kernels: KernelChoice) -> torch.Tensor:
    """apply_rotary, or megalith_kernels.rope when the record says so and cos/sin are per position
    (`[s, 1, 1, r]`; per-sequence positions `[s, b, 1, r]` have no fused kernel)."""
    if kernels.rope != "kernels" or cos.shape[1] != 1:
        return apply_rotary(x, cos, sin)
    import megalith_kernels

    out = megalith_kernels.rope(x.transpose(0, 1), cos[:, 0, 0], sin[:, 0, 0], backend=kernels.backend)
    return out.transpose(0, 1)


def loss_per_token(logits: torch.Tensor, target: torch.Tensor, ctx: ParallelContext, kernels: KernelChoice, *,
                   vocab_size: int, ignore_index: int = -100) -> torch.Tensor:
    """vocab_parallel_cross_entropy, with the fused kernel or TE's when the record's cross_entropy says so."""
    if kernels.cross_entropy == "te":
        from megalith.models.te_layers import te_cross_entropy

        return te_cross_entropy(logits, target, ctx.tp_group, vocab_size=vocab_size, ignore_index=ignore_index)
    fused = {"kernel": "triton"} if kernels.cross_entropy == "triton" else {}
    return vocab_parallel_cross_entropy(logits, target, ctx.tp_group, vocab_size=vocab_size, ignore_index=ignore_index,
                                        **fused)


def _flash(q, k, v, attention_mask, causal: bool, scale: float, backend: str) -> torch.Tensor:
    """megalith_kernels.flash_attention on `[s, b, n, d]` tensors -> `[s, b, nh, d]`."""
    import megalith_kernels

    out = megalith_kernels.flash_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), causal=causal,
                                           scale=scale, attention_mask=attention_mask, backend=backend)
    return out.transpose(0, 1)


def core_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    config: ModelConfig,
    ctx: ParallelContext,
    training: bool,
    causal: bool = True,
    attention_bias: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    kernels: KernelChoice | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias + mask) v for this rank's heads: q `[sq, b, nh, d]`, k and v
    `[sk, b, ng, d]` -> `[sq, b, nh * d]`. Causal unless `causal=False` (bidirectional: BERT,
    T5's encoder and cross-attention); `attention_mask` (bool, broadcastable to `[b, 1, sq, sk]`,
    True = masked out, Megatron's convention) adds padding masks; `attention_bias` (float,
    broadcastable to `[b, nh, sq, sk]`) adds T5's relative position bias; `softmax_scale`
    defaults to 1/sqrt(d) (T5: 1).

    Three paths compute the same thing: PyTorch's scaled_dot_product_attention ("sdpa"), an
    explicit matmul-softmax-matmul ("unfused") that is easy to read and to check, and
    megalith_kernels.flash_attention ("flash", no dropout, no additive bias). `kernels` (the
    model's record, see megalith.kernel_choice) says which; TE's attention is a module of its own.
    """
    s, b, heads, d = q.shape
    sk = k.shape[0]
    repeat = heads // k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    dtype = q.dtype
    kernels = kernels or kernels_of(config, ctx)
    path = kernels.attention_for(attention_bias is not None)
    if config.attention_softmax_in_fp32:
        q, k, v = q.float(), k.float(), v.float()
    if path == "flash":
        return _flash(q, k, v, attention_mask, causal, scale, kernels.backend).reshape(s, b, heads * d).to(dtype)
    q, k, v = q.permute(1, 2, 0, 3), k.permute(1, 2, 0, 3), v.permute(1, 2, 0, 3)  # [b, n, s, d]
    if repeat > 1 and path == "unfused":
        k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    p = config.attention_dropout if training else 0.0

    additive = None
    if attention_mask is not None or attention_bias is not None:
        masked = attention_mask if attention_mask is not None else torch.zeros(1, 1, 1, 1, dtype=torch.bool,
                                                                               device=q.device)
        if causal:
            masked = masked | torch.ones(s, sk, dtype=torch.bool, device=q.device).triu(1)
        additive = torch.zeros(masked.shape, dtype=q.dtype, device=q.device)
        if attention_bias is not None:
            additive = additive + attention_bias.to(q.dtype)
        # a large negative number, not -inf: a fully masked row stays finite on both paths
        additive = additive.masked_fill(masked, torch.finfo(q.dtype).min)

    # heads are split over tp: each rank draws its own attention-dropout mask
    streams = ctx.rng_tracker.fork(TP_LOCAL) if p > 0 else contextlib.nullcontext()
    with streams:
        if path != "unfused":
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=additive, dropout_p=p, is_causal=causal and additive is None, enable_gqa=repeat > 1,
                scale=scale,
            )
        else:
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            if additive is None and causal:
                upper = torch.ones(s, sk, dtype=torch.bool, device=q.device).triu(1)
                scores = scores.masked_fill(upper, torch.finfo(scores.dtype).min)
            elif additive is not None:
                scores = scores + additive
            probs = torch.softmax(scores, dim=-1)
            out = torch.matmul(masked_dropout(probs, p) if p > 0 else probs, v)
    return out.permute(2, 0, 1, 3).reshape(s, b, heads * d).to(dtype)


class SelfAttention(nn.Module):
    """Fused QKV (column-parallel, heads split over tp), core attention, output projection (row-parallel).

    QKV rows use Megatron's grouped layout: for each key/value group, its query heads, then its
    key head, then its value head — so a contiguous tp slice holds whole groups. `causal=False`
    attends both ways (an encoder: BERT). With qk_layernorm, queries and keys go through the
    model's norm per head (over kv_channels) after the projection and before rotary, as in
    Megatron-Core; those norm weights are replicated and summed over tp (each rank has its heads).
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init: InitMethod, output_init: InitMethod,
                 causal: bool = True, softmax_scale: float | None = None) -> None:
        super().__init__()
        self.config, self.ctx, self.causal, self.softmax_scale = config, ctx, causal, softmax_scale
        self.kernels = kernels_of(config, ctx)
        d, heads, groups = config.kv_channels, config.num_attention_heads, config.num_query_groups
        self.heads_per_group = heads // groups
        self.groups_per_rank = groups // ctx.tp_size
        common = dict(tp_group=ctx.tp_group, sequence_parallel=ctx.sequence_parallel,
                      params_dtype=config.torch_dtype, device=ctx.device)
        self.linear_qkv = ColumnParallelLinear(
            config.hidden_size, (heads + 2 * groups) * d, bias=config.add_bias_linear or config.add_qkv_bias,
            init_method=init, **common,
        )
        self.linear_proj = RowParallelLinear(
            heads * d, config.hidden_size, bias=config.add_bias_linear, input_is_parallel=True,
            init_method=output_init, **common,
        )
        self.linear_qkv = local_or_te(self.linear_qkv, ctx, config)
        self.linear_proj = local_or_te(self.linear_proj, ctx, config)
        self.te_attention = None
        if self.kernels.attention == "te":
            from megalith.models.te_layers import TEAttention

            self.te_attention = TEAttention(config, ctx, causal, softmax_scale)
        self.q_layernorm = self.k_layernorm = None
        if config.qk_layernorm:
            self.q_layernorm = build_norm(config, ctx, d, partial_over_tp=True)
            self.k_layernorm = build_norm(config, ctx, d, partial_over_tp=True)

    def forward(self, x: torch.Tensor, rotary=None, attention_mask: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        qkv = self.linear_qkv(x)
        s, b = qkv.shape[:2]
        d = self.config.kv_channels
        qkv = qkv.view(s, b, self.groups_per_rank, self.heads_per_group + 2, d)
        q = qkv[:, :, :, : self.heads_per_group].reshape(s, b, -1, d)
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]
        if self.q_layernorm is not None:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        if rotary is not None:
            q, k = rotate(q, *rotary, self.kernels), rotate(k, *rotary, self.kernels)
        if self.te_attention is not None and attention_bias is None:
            return self.linear_proj(self.te_attention(q, k, v, attention_mask))
        return self.linear_proj(attend(q, k, v, attention_mask, attention_bias, self))


def attend(q, k, v, attention_mask, attention_bias, attention: nn.Module) -> torch.Tensor:
    """core_attention with `attention`'s settings, recomputed in backward under selective recompute."""
    kwargs = dict(config=attention.config, ctx=attention.ctx, training=attention.training, causal=attention.causal,
                  softmax_scale=attention.softmax_scale, kernels=attention.kernels)
    if attention.config.recompute_granularity == "selective":
        return checkpoint(_core_attention_call, q, k, v, attention_mask, attention_bias, kwargs,
                          rng_tracker=attention.ctx.rng_tracker)
    return core_attention(q, k, v, attention_mask, attention_bias=attention_bias, **kwargs)


def _core_attention_call(q, k, v, attention_mask, attention_bias, kwargs):
    return core_attention(q, k, v, attention_mask, attention_bias=attention_bias, **kwargs)


def local_or_te(layer: nn.Module, ctx: ParallelContext, config: ModelConfig) -> nn.Module:
    """`layer`, or TE's Linear in its place (with its weights) when the record says linears "te"."""
    kernels = kernels_of(config, ctx)
    if kernels.linears != "te":
        return layer
    from megalith.models.te_layers import te_linear

    return te_linear(layer, ctx, config, fp8_param_gather=kernels.fp8 is not None and kernels.fp8.param_gather)


class MLP(nn.Module):
    """fc1 (column-parallel) -> GELU (exact, or tanh-approximate with openai_gelu), ReLU or SwiGLU -> fc2
    (row-parallel); nothing communicated between. With the record's activation "kernels" the
    activation is megalith_kernels' swiglu, or bias_gelu with fc1's bias added inside the kernel
    (fc1 then returns its bias: skip_bias_add)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init: InitMethod, output_init: InitMethod) -> None:
        super().__init__()
        self.swiglu, self.relu = config.swiglu, config.activation == "relu"
        self.gelu_approximate = "tanh" if config.openai_gelu else "none"
        self.kernels = kernels_of(config, ctx)
        self.fused_bias_gelu = self.kernels.activation == "kernels" and not config.swiglu
        common = dict(tp_group=ctx.tp_group, sequence_parallel=ctx.sequence_parallel, bias=config.add_bias_linear,
                      params_dtype=config.torch_dtype, device=ctx.device)
        parts = 2 if config.swiglu else 1  # SwiGLU's fc1 is [gate; up], each part split over tp
        self.linear_fc1 = local_or_te(ColumnParallelLinear(
            config.hidden_size, parts * config.ffn_hidden_size, stride=parts, init_method=init,
            skip_bias_add=self.fused_bias_gelu, **common
        ), ctx, config)
        self.linear_fc2 = local_or_te(RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, input_is_parallel=True, init_method=output_init, **common
        ), ctx, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused_bias_gelu:
            import megalith_kernels

            h, bias = self.linear_fc1(x)
            if bias is None:  # --disable-bias-linear: the fused kernel with a zero bias
                bias = torch.zeros(h.shape[-1], dtype=h.dtype, device=h.device)
            return self.linear_fc2(megalith_kernels.bias_gelu(h, bias, backend=self.kernels.backend))
        h = self.linear_fc1(x)
        if self.swiglu and self.kernels.activation == "kernels":
            import megalith_kernels

            h = megalith_kernels.swiglu(h, backend=self.kernels.backend)
        elif self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        elif self.relu:
            h = F.relu(h)
        else:
            h = F.gelu(h, approximate=self.gelu_approximate)
        return self.linear_fc2(h)


def mlp_class(config: ModelConfig, layer_index: int | None):
    """The dense MLP, or the MoE MLP where --num-experts and --moe-layer-freq make global layer `layer_index` MoE.
    A model whose layers do not know their index (T5 so far) refuses --num-experts in one line."""
    if config.num_experts is None:
        return MLP
    if layer_index is None:
        raise ConfigError("--num-experts is built for GPT and BERT layers only so far (issue 21); drop it here")
    return functools.partial(MoELayer, shared_mlp=MLP) if moe_layer_pattern(config)[layer_index] else MLP


class TransformerLayer(nn.Module):
    """Pre-norm: x + dropout(attention(norm(x))), then + dropout(mlp(norm(x))).

    With `config.post_layer_norm` (the original BERT, Hugging Face's BertModel) the norms follow
    the residual sums instead: norm(x + dropout(attention(x))), then norm(x + dropout(mlp(x)));
    they are then named `post_self_attn_layernorm` and `post_mlp_layernorm` (Megatron-Core's names).
    `layer_index` (global) picks an MoE MLP for the layers --moe-layer-freq names (megalith.models.moe).
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init: InitMethod, output_init: InitMethod,
                 causal: bool = True, softmax_scale: float | None = None, layer_index: int | None = None) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        mlp = mlp_class(config, layer_index)
        if config.post_layer_norm:
            self.self_attention = SelfAttention(config, ctx, init, output_init, causal, softmax_scale)
            self.post_self_attn_layernorm = build_norm(config, ctx)
            self.mlp = mlp(config, ctx, init, output_init)
            self.post_mlp_layernorm = build_norm(config, ctx)
            return
        self.input_layernorm = build_norm(config, ctx)
        self.self_attention = SelfAttention(config, ctx, init, output_init, causal, softmax_scale)
        self.pre_mlp_layernorm = build_norm(config, ctx)
        self.mlp = mlp(config, ctx, init, output_init)

    def forward(self, x: torch.Tensor, rotary=None, attention_mask: torch.Tensor | None = None,
                attention_bias: torch.Tensor | None = None) -> torch.Tensor:
        p, stream = self.config.hidden_dropout, self.ctx.hidden_stream
        if self.config.post_layer_norm:
            attention = self.self_attention(x, rotary, attention_mask, attention_bias)
            x = self.post_self_attn_layernorm(x + dropout(attention, p, self.training, self.ctx, stream))
            return self.post_mlp_layernorm(x + dropout(self.mlp(x), p, self.training, self.ctx, stream))
        attention = self.self_attention(self.input_layernorm(x), rotary, attention_mask, attention_bias)
        x = x + dropout(attention, p, self.training, self.ctx, stream)
        return x + dropout(self.mlp(self.pre_mlp_layernorm(x)), p, self.training, self.ctx, stream)


class TransformerBlock(nn.Module):
    """The layers of one pipeline stage (keyed by global index) and, on the last stage, the final
    norm; with Megatron's full-recompute policies over this stage's layers:

    uniform: checkpoint every consecutive group of recompute_num_layers layers.
    block:   checkpoint each of the first recompute_num_layers layers, run the rest normally.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, layers: dict[int, TransformerLayer],
                 final_norm: bool = True) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        self.kernels = kernels_of(config, ctx)
        self.layers = nn.ModuleDict({str(index): layer for index, layer in layers.items()})
        self.final_layernorm = build_norm(config, ctx) if final_norm else None

    def _run(self, start: int, end: int, x, *args):
        for layer in list(self.layers.values())[start:end]:
            x = layer(x, *args)
        return x

    def _layers(self, x, *args):
        config, count = self.config, len(self.layers)
        if config.recompute_granularity != "full" or not self.training:
            return self._run(0, count, x, *args)
        n, tracker = min(config.recompute_num_layers, count), self.ctx.rng_tracker
        if config.recompute_method == "uniform":
            for start in range(0, count, max(n, 1)):
                x = checkpoint(self._run, start, min(start + n, count), x, *args, rng_tracker=tracker)
            return x
        for index in range(count):
            if index < n:
                x = checkpoint(self._run, index, index + 1, x, *args, rng_tracker=tracker)
            else:
                x = self._run(index, index + 1, x, *args)
        return x

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        """`layer(x, *args)` for each layer (GPT, BERT: rotary and attention_mask; T5's layers take
        their own), then the final norm if this block has it."""
        with fp8_context(self.kernels):  # te.fp8_autocast with the run's recipe; nothing without fp8
            x = self._layers(x, *args)
        return x if self.final_layernorm is None else self.final_layernorm(x)
