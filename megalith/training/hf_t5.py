"""Hugging Face T5ForConditionalGeneration <-> megalith's T5Model: config and tensor mapping.

T5 v1.0 layout (`feed_forward_proj: relu`, no biases, RMS norms, relative position buckets in
each stack's first block, one shared word embedding that is also the output layer, decoder
outputs scaled by d_model**-0.5). HF keeps one
relative-bias table per stack in block 0; megalith keeps it beside the stack
(`encoder_relative_position`, `decoder_relative_position`). Q, K and V become megalith's fused
grouped `linear_qkv`; cross-attention's K and V become `linear_kv` = [k; v]. Gated-GELU T5s
(v1.1, Flan-T5) are refused: megalith's MLP has no gated GELU.
"""

from __future__ import annotations

import torch

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.t5 import resolve_t5_config
from megalith.training.hf_mapping import fuse_qkv, split_qkv


class T5ConvertError(ConfigError):
    """A T5 checkpoint or config megalith cannot map (one line: what and what to do)."""


def t5_config_from_hf(hf: dict) -> ModelConfig:
    """megalith's T5 for an HF T5Config dict (dropout 0: conversion is for exact weights)."""
    projection = hf.get("feed_forward_proj", "relu")
    if projection != "relu":
        raise T5ConvertError(f"T5 with feed_forward_proj {projection!r} (T5 v1.1 / Flan-T5's gated MLP) is not "
                             "supported; megalith maps T5 v1.0 models (feed_forward_proj 'relu')")
    if hf.get("tie_word_embeddings") is False or hf.get("scale_decoder_outputs") is False:
        raise T5ConvertError("this T5 has an untied output layer or unscaled decoder outputs (T5 v1.1's convention); "
                             "megalith maps T5 v1.0 models, whose output layer is the scaled shared embedding")
    encoders = hf.get("num_layers", 6)
    config = ModelConfig(
        num_layers=encoders, encoder_num_layers=encoders, decoder_num_layers=hf.get("num_decoder_layers") or encoders,
        hidden_size=hf.get("d_model", 512), num_attention_heads=hf.get("num_heads", 8), kv_channels=hf.get("d_kv", 64),
        ffn_hidden_size=hf.get("d_ff", 2048), vocab_size=hf.get("vocab_size", 32128), seq_length=512,
        normalization="RMSNorm", norm_epsilon=hf.get("layer_norm_epsilon", 1e-6), disable_bias_linear=True,
        activation="relu", position_embedding_type="relative",
        relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf.get("relative_attention_max_distance", 128),
        hidden_dropout=0.0, attention_dropout=0.0)
    return resolve_t5_config(config)


def hf_t5_config_from_model(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for T5ForConditionalGeneration with megalith's T5 weights."""
    if (config.activation != "relu" or config.swiglu or config.add_bias_linear or config.normalization != "RMSNorm"
            or config.untie_embeddings_and_output_weights):
        raise T5ConvertError("only megalith T5s in T5 v1.0's shape (ReLU MLP, no biases, RMSNorm, tied output layer) "
                             "map to Hugging Face; this one differs")
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": config.vocab_size, "d_model": config.hidden_size, "d_kv": config.kv_channels,
        "d_ff": config.ffn_hidden_size, "num_layers": config.encoder_num_layers,
        "num_decoder_layers": config.decoder_num_layers, "num_heads": config.num_attention_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.hidden_dropout, "layer_norm_epsilon": config.norm_epsilon,
        "feed_forward_proj": "relu", "tie_word_embeddings": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def _plain_names(config: ModelConfig) -> dict[str, str]:
    """megalith name -> HF name for every tensor that maps one to one."""
    names = {
        "embedding.word_embeddings.weight": "shared.weight",
        "encoder_relative_position.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder_relative_position.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.final_layernorm.weight": "encoder.final_layer_norm.weight",
        "decoder.final_layernorm.weight": "decoder.final_layer_norm.weight",
    }
    for i in range(config.encoder_num_layers):
        ours, theirs = f"encoder.layers.{i}.", f"encoder.block.{i}.layer."
        names.update({
            ours + "input_layernorm.weight": theirs + "0.layer_norm.weight",
            ours + "self_attention.linear_proj.weight": theirs + "0.SelfAttention.o.weight",
            ours + "pre_mlp_layernorm.weight": theirs + "1.layer_norm.weight",
            ours + "mlp.linear_fc1.weight": theirs + "1.DenseReluDense.wi.weight",
            ours + "mlp.linear_fc2.weight": theirs + "1.DenseReluDense.wo.weight",
        })
    for i in range(config.decoder_num_layers):
        ours, theirs = f"decoder.layers.{i}.", f"decoder.block.{i}.layer."
        names.update({
            ours + "input_layernorm.weight": theirs + "0.layer_norm.weight",
            ours + "self_attention.linear_proj.weight": theirs + "0.SelfAttention.o.weight",
            ours + "pre_cross_attn_layernorm.weight": theirs + "1.layer_norm.weight",
            ours + "cross_attention.linear_q.weight": theirs + "1.EncDecAttention.q.weight",
            ours + "cross_attention.linear_proj.weight": theirs + "1.EncDecAttention.o.weight",
            ours + "pre_mlp_layernorm.weight": theirs + "2.layer_norm.weight",
            ours + "mlp.linear_fc1.weight": theirs + "2.DenseReluDense.wi.weight",
            ours + "mlp.linear_fc2.weight": theirs + "2.DenseReluDense.wo.weight",
        })
    return names


def _fused_names(config: ModelConfig) -> dict[str, tuple[str, ...]]:
    """megalith name -> the HF tensors fused into it (self-attention qkv, cross-attention kv)."""
    fused = {}
    for stack, count in (("encoder", config.encoder_num_layers), ("decoder", config.decoder_num_layers)):
        for i in range(count):
            prefix = f"{stack}.block.{i}.layer.0.SelfAttention."
            fused[f"{stack}.layers.{i}.self_attention.linear_qkv.weight"] = tuple(prefix + p + ".weight" for p in "qkv")
    for i in range(config.decoder_num_layers):
        prefix = f"decoder.block.{i}.layer.1.EncDecAttention."
        fused[f"decoder.layers.{i}.cross_attention.linear_kv.weight"] = (prefix + "k.weight", prefix + "v.weight")
    return fused


# HF copies of the shared embedding that carry no information of their own
TIED_HF_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")


def t5_parameter_names(config: ModelConfig) -> list[str]:
    """Every global tensor name of megalith's T5 under `config`."""
    return sorted([*_plain_names(config), *_fused_names(config)])


def t5_hf_to_global(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """An HF T5ForConditionalGeneration state dict -> megalith's global tensors (fp32)."""
    out, used = {}, set()

    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise T5ConvertError(f"the HF checkpoint lacks {name}; it is not a complete T5ForConditionalGeneration")
        used.add(name)
        return tensors[name].float()

    for ours, theirs in _plain_names(config).items():
        out[ours] = take(theirs)
    for ours, parts in _fused_names(config).items():
        values = [take(part) for part in parts]
        out[ours] = fuse_qkv(*values, config.num_query_groups) if len(values) == 3 else torch.cat(values)
    shared = out["embedding.word_embeddings.weight"]
    for copy in TIED_HF_COPIES:
        if copy in tensors:
            if not torch.equal(tensors[copy].float(), shared):
                raise T5ConvertError(f"{copy} differs from shared.weight, but megalith's T5 ties them; "
                                     "this checkpoint is not a standard T5")
            used.add(copy)
    unused = sorted(set(tensors) - used)
    if unused:
        raise T5ConvertError(f"the HF checkpoint has tensors megalith's T5 has no place for ({', '.join(unused[:3])}"
                             f"{', ...' if len(unused) > 3 else ''}); it is not a plain T5 v1.0 model")
    return out


def t5_global_to_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """megalith's global T5 tensors -> an HF T5ForConditionalGeneration state dict (tied copies left out)."""
    out = {theirs: tensors[ours].contiguous() for ours, theirs in _plain_names(config).items()}
    for ours, parts in _fused_names(config).items():
        values = split_qkv(tensors[ours], config) if len(parts) == 3 else tensors[ours].chunk(2)
        out.update({part: value.contiguous() for part, value in zip(parts, values)})
    return out
