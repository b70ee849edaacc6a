"""A plain single-device PyTorch GPT with the same architecture as megalith's GPTModel.

It exists as an independent reference: it shares no code with megalith's parallel layers, so a
match in loss and gradients after `load_megalith_state_dict` checks megalith's model (and its
weight layout) against ordinary torch, and timing both measures what megalith's machinery costs.
Layout is batch-first `[b, s, h]`, separate q/k/v projections, and an unpadded vocabulary.
Megatron's model options are written out plainly: --apply-layernorm-1p as an ordinary norm
loaded with (1 + weight), --qk-layernorm as a norm on each head's queries and keys before
rotary, --rotary-percent as rotating the first channels of each head, --no-position-embedding
as no position table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megalith.config import ModelConfig


def _norm(config: ModelConfig, size: int | None = None) -> nn.Module:
    if config.normalization == "RMSNorm":
        return nn.RMSNorm(size or config.hidden_size, eps=config.norm_epsilon)
    return nn.LayerNorm(size or config.hidden_size, eps=config.norm_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_tables(seq_length: int, head_dim: int, base: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin `[s, d]` of GPT-NeoX style (non-interleaved) rotary embeddings, in fp32."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class Attention(nn.Module):
    """Causal grouped-query self-attention: query head j reads kv head j // (heads per group)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, d = config.hidden_size, config.kv_channels
        self.num_heads = config.num_attention_heads
        self.num_groups = config.num_query_groups
        self.head_dim = d
        self.dropout_p = config.attention_dropout
        self.rope = config.position_embedding_type == "rope"
        self.rotary_base, self.rotary_dim = config.rotary_base, config.rotary_dim
        self.q_norm = _norm(config, d) if config.qk_layernorm else None
        self.k_norm = _norm(config, d) if config.qk_layernorm else None
        qkv_bias = config.add_bias_linear or config.add_qkv_bias
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=qkv_bias)
        self.k_proj = nn.Linear(h, self.num_groups * d, bias=qkv_bias)
        self.v_proj = nn.Linear(h, self.num_groups * d, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_groups, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_groups, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope:
            r = self.rotary_dim
            cos, sin = rotary_tables(s, r, self.rotary_base, device=x.device)
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)
            q = torch.cat([q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
            k = torch.cat([k[..., :r] * cos + _rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
        repeat = self.num_heads // self.num_groups
        if repeat > 1:
            k = k.repeat_interleave(repeat, dim=1)
            v = v.repeat_interleave(repeat, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout_p if self.training else 0.0, is_causal=True,
            scale=1.0 / math.sqrt(self.head_dim),
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """fc2(gelu(fc1(x))) (tanh-approximate GELU with openai_gelu), or with swiglu fc1 yields [gate ; up]
    and the activation is silu(gate) * up."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.swiglu = config.swiglu
        self.gelu_approximate = "tanh" if config.openai_gelu else "none"
        width = config.ffn_hidden_size * (2 if config.swiglu else 1)
        self.fc1 = nn.Linear(config.hidden_size, width, bias=config.add_bias_linear)
        self.fc2 = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc1(x)
        if self.swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y, approximate=self.gelu_approximate)
        return self.fc2(y)


class Block(nn.Module):
    """Pre-norm residual layer: attention then MLP."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm1 = _norm(config)
        self.attn = Attention(config)
        self.norm2 = _norm(config)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm1(x)))
        return x + self.dropout(self.mlp(self.norm2(x)))


class PlainGPT(nn.Module):
    """Batch-first GPT: `forward(input_ids [b, s], labels [b, s])` -> per-token fp32 loss `[b, s]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, h)
        self.position_embeddings = (
            nn.Embedding(config.max_position_embeddings, h)
            if config.has_position_table else None
        )
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.final_norm = _norm(config)
        self.output_layer = (
            nn.Linear(h, config.vocab_size, bias=False) if config.untie_embeddings_and_output_weights else None
        )
        self._init_weights(config.init_method_std)
        self.to(config.torch_dtype)

    def _init_weights(self, std: float) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits `[b, s, V]` over the real vocabulary."""
        x = self.word_embeddings(input_ids)
        if self.position_embeddings is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            x = x + self.position_embeddings(positions)
        x = self.dropout(x)
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        weight = self.word_embeddings.weight if self.output_layer is None else self.output_layer.weight
        return x @ weight.t()

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.logits(input_ids).float()
        loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return loss.view_as(labels)


def _take(state_dict: dict[str, torch.Tensor], key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"megalith state dict has no key {key!r}")
    tensor = state_dict[key]
    if tuple(tensor.shape) != shape:
        raise ValueError(f"megalith state dict key {key!r} has shape {tuple(tensor.shape)}, expected {shape}")
    return tensor


def _copy(target: torch.Tensor, source: torch.Tensor) -> None:
    with torch.no_grad():
        target.copy_(source.detach().to(device=target.device, dtype=target.dtype))


def _copy_key(target: torch.Tensor, state_dict: dict[str, torch.Tensor], key: str, used: set[str]) -> None:
    _copy(target, _take(state_dict, key, tuple(target.shape)))
    used.add(key)


def _copy_norm(norm: nn.Module, state_dict: dict[str, torch.Tensor], prefix: str, used: set[str],
               one_plus: bool = False) -> None:
    """A norm's weight (as 1 + weight when megalith stores it zero-centred) and bias."""
    _copy_key(norm.weight, state_dict, prefix + ".weight", used)
    if one_plus:
        with torch.no_grad():
            norm.weight.add_(1.0)
    if getattr(norm, "bias", None) is not None:
        _copy_key(norm.bias, state_dict, prefix + ".bias", used)


def _copy_vocab(target: torch.Tensor, state_dict: dict[str, torch.Tensor], key: str, used: set[str]) -> None:
    """Vocab-sized matrices are padded in megalith: keep the first V rows."""
    vocab, hidden = target.shape
    if key not in state_dict:
        raise ValueError(f"megalith state dict has no key {key!r}")
    tensor = state_dict[key]
    if tensor.dim() != 2 or tensor.shape[1] != hidden or tensor.shape[0] < vocab:
        raise ValueError(
            f"megalith state dict key {key!r} has shape {tuple(tensor.shape)}, expected [>= {vocab}, {hidden}]"
        )
    _copy(target, tensor[:vocab])
    used.add(key)


def _copy_qkv(attn: Attention, state_dict: dict[str, torch.Tensor], prefix: str, used: set[str]) -> None:
    """Split Megatron's grouped QKV: per kv group, its query heads, then its key head, then its value head."""
    nh, ng, d = attn.num_heads, attn.num_groups, attn.head_dim
    per_group = nh // ng
    hidden = attn.q_proj.in_features
    names = [("weight", (hidden,))]
    if attn.q_proj.bias is not None:
        names.append(("bias", ()))
    for name, tail in names:
        key = f"{prefix}.{name}"
        fused = _take(state_dict, key, ((nh + 2 * ng) * d, *tail)).reshape(ng, per_group + 2, d, *tail)
        _copy(getattr(attn.q_proj, name), fused[:, :per_group].reshape(nh * d, *tail))
        _copy(getattr(attn.k_proj, name), fused[:, per_group].reshape(ng * d, *tail))
        _copy(getattr(attn.v_proj, name), fused[:, per_group + 1].reshape(ng * d, *tail))
        used.add(key)


def _copy_linear(linear: nn.Linear, state_dict: dict[str, torch.Tensor], prefix: str, used: set[str]) -> None:
    _copy_key(linear.weight, state_dict, prefix + ".weight", used)
    if linear.bias is not None:
        _copy_key(linear.bias, state_dict, prefix + ".bias", used)


def load_megalith_state_dict(model: PlainGPT, state_dict: dict[str, torch.Tensor]) -> None:
    """Copy a tensor-parallel-size-1 megalith GPTModel state dict into `model`.

    Raises ValueError naming the key when one is missing or has the wrong shape, and when a
    weight or bias is left over (a bias the config says is absent means the configs differ).
    """
    used: set[str] = set()
    one_plus = model.config.apply_layernorm_1p
    _copy_vocab(model.word_embeddings.weight, state_dict, "embedding.word_embeddings.weight", used)
    if model.position_embeddings is not None:
        _copy_key(model.position_embeddings.weight, state_dict, "embedding.position_embeddings.weight", used)
    for i, layer in enumerate(model.layers):
        prefix = f"decoder.layers.{i}"
        _copy_norm(layer.norm1, state_dict, f"{prefix}.input_layernorm", used, one_plus)
        _copy_qkv(layer.attn, state_dict, f"{prefix}.self_attention.linear_qkv", used)
        if layer.attn.q_norm is not None:
            _copy_norm(layer.attn.q_norm, state_dict, f"{prefix}.self_attention.q_layernorm", used, one_plus)
            _copy_norm(layer.attn.k_norm, state_dict, f"{prefix}.self_attention.k_layernorm", used, one_plus)
        _copy_linear(layer.attn.o_proj, state_dict, f"{prefix}.self_attention.linear_proj", used)
        _copy_norm(layer.norm2, state_dict, f"{prefix}.pre_mlp_layernorm", used, one_plus)
        _copy_linear(layer.mlp.fc1, state_dict, f"{prefix}.mlp.linear_fc1", used)
        _copy_linear(layer.mlp.fc2, state_dict, f"{prefix}.mlp.linear_fc2", used)
    _copy_norm(model.final_norm, state_dict, "decoder.final_layernorm", used, one_plus)
    if model.output_layer is not None:
        _copy_vocab(model.output_layer.weight, state_dict, "output_layer.weight", used)
    leftover = sorted(k for k in state_dict if k not in used and k.endswith((".weight", ".bias")))
    if leftover:
        raise ValueError(f"megalith state dict has parameters PlainGPT does not: {', '.join(leftover)}")
