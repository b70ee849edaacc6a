"""Hugging Face GPT-2 and Llama <-> megalith's GPT (`--model gpt`): configs and tensors (pure).

What differs from Hugging Face:

- QKV is one matrix in Megatron's grouped layout: for each key/value group, its query heads,
  then its key head, then its value head (so a contiguous tp slice holds whole groups). GPT-2
  fuses [all q; all k; all v] instead; Llama keeps q, k, v apart.
- GPT-2's Conv1D stores weights transposed ([in, out]); megalith's linears are [out, in].
- SwiGLU's fc1 is [gate; up] (Llama's gate_proj over up_proj).
- Llama's rotate_half (cos/sin over two halves of each head) is megalith's non-interleaved
  rotary; HF's repeat_kv lets query head j read kv head j // (heads per group), as megalith.
"""

from __future__ import annotations

import re
from typing import Collection

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.models.moe import moe_layer_pattern
from megalith.convert.mapping import (
    HFFamily, LogitPairs, Tensors, TensorTaker, fuse_qkv, placement, refuse, split_qkv, stage_of,
)

GPT2_GELUS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}  # activation -> openai_gelu
# buffers some HF checkpoints carry that are not weights (causal masks, rotary frequencies)
IGNORED_HF_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")


# --- configs ----------------------------------------------------------------------------------


def gpt2_config(hf: dict, names: Collection[str] = ()) -> ModelConfig:
    """megalith's GPT for a GPT2Config dict (dropout 0: conversion is for exact weights)."""
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_GELUS:
        refuse("gpt2", f"activation_function {activation!r} (megalith has {', '.join(GPT2_GELUS)})")
    if not hf.get("scale_attn_weights", True):
        refuse("gpt2", "scale_attn_weights false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        refuse("gpt2", "scale_attn_by_inverse_layer_idx")
    if hf.get("add_cross_attention", False):
        refuse("gpt2", "add_cross_attention")
    hidden, positions = hf.get("n_embd", 768), hf.get("n_positions", 1024)
    return ModelConfig(
        num_layers=hf.get("n_layer", 12), hidden_size=hidden, num_attention_heads=hf.get("n_head", 12),
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden, seq_length=positions, max_position_embeddings=positions,
        vocab_size=hf.get("vocab_size", 50257), norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        normalization="LayerNorm", position_embedding_type="learned_absolute", openai_gelu=GPT2_GELUS[activation],
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
    )


def rope_theta(hf: dict, family: str = "llama") -> int:
    """rotary_base of a Llama-like config.json (transformers 4's rope_theta or 5's rope_parameters)."""
    if hf.get("rope_scaling"):
        refuse(family, f"rope_scaling {hf['rope_scaling']}")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        refuse(family, f"rope_parameters.rope_type {params['rope_type']!r}")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        refuse(family, "partial_rotary_factor below 1")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        refuse(family, f"rope_theta {theta} (megalith's rotary_base is an integer)")
    return int(theta)


def llama_config(hf: dict, names: Collection[str] = ()) -> ModelConfig:
    """megalith's GPT (RMSNorm, SwiGLU, rotary, GQA, no biases) for a LlamaConfig dict."""
    if hf.get("hidden_act", "silu") != "silu":
        refuse("llama", f"hidden_act {hf['hidden_act']!r} (megalith's SwiGLU uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            refuse("llama", flag)
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    positions, groups = hf.get("max_position_embeddings", 2048), hf.get("num_key_value_heads") or heads
    return ModelConfig(
        num_layers=hf.get("num_hidden_layers", 32), hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=hf.get("intermediate_size", 11008), num_query_groups=groups,
        group_query_attention=groups != heads,  # the flags a Megatron user gives for this model
        kv_channels=hf.get("head_dim") or hidden // heads, seq_length=positions,
        max_position_embeddings=positions, vocab_size=hf.get("vocab_size", 32000),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), normalization="RMSNorm", position_embedding_type="rope",
        rotary_base=rope_theta(hf), swiglu=True, disable_bias_linear=True,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
    )


def gpt2_misfits(config: ModelConfig) -> list[str]:
    return [what for what, bad in (
        ("rotary positions", config.position_embedding_type != "learned_absolute"),
        ("RMSNorm", config.normalization != "LayerNorm"), ("SwiGLU", config.swiglu),
        ("a relu MLP", config.activation != "gelu"), ("no linear biases", config.disable_bias_linear),
        ("grouped-query attention", config.num_query_groups != config.num_attention_heads),
        ("kv_channels x heads != hidden size", config.kv_channels * config.num_attention_heads != config.hidden_size),
        ("no position table (--no-position-embedding)", not config.position_embedding),
        ("--qk-layernorm", config.qk_layernorm), ("MoE layers (--num-experts)", config.is_moe),
    ) if bad]


def llama_misfits(config: ModelConfig) -> list[str]:
    return [what for what, bad in (
        ("learned positions", config.position_embedding_type != "rope"),
        ("LayerNorm", config.normalization != "RMSNorm"), ("a GELU MLP", not config.swiglu),
        ("linear biases", config.add_bias_linear or config.add_qkv_bias),
        ("--qk-layernorm", config.qk_layernorm),
        (f"--rotary-percent {config.rotary_percent:g} (Llama rotates whole heads)", config.rotary_percent < 1.0),
        ("MoE layers (--num-experts)", config.is_moe),
    ) if bad]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gpt2_hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a GPT2LMHeadModel (transformers 4 and 5 read it)."""
    token = 50256 if config.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.max_position_embeddings, "n_embd": config.hidden_size, "n_layer": config.num_layers,
        "n_head": config.num_attention_heads, "n_inner": config.ffn_hidden_size,
        "activation_function": "gelu_new" if config.openai_gelu else "gelu",
        "resid_pdrop": config.hidden_dropout, "embd_pdrop": config.hidden_dropout,
        "attn_pdrop": config.attention_dropout, "layer_norm_epsilon": config.norm_epsilon,
        "initializer_range": config.init_method_std, "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights, "bos_token_id": token,
        "eos_token_id": token, "dtype": _dtype_name(dtype),
    }


def llama_hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a LlamaForCausalLM (rope_theta in both of the places transformers 4 and 5 look)."""
    theta = float(config.rotary_base)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups, "head_dim": config.kv_channels, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_epsilon,
        "rope_theta": theta, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_method_std,
        "tie_word_embeddings": not config.untie_embeddings_and_output_weights, "dtype": _dtype_name(dtype),
    }


# --- megalith's parameters ------------------------------------------------------------------


def gpt_parameter_names(config: ModelConfig) -> list[str]:
    """A whole GPTModel's named_parameters() names (global layer indices), in order."""
    norm = ["weight"] + (["bias"] if config.normalization == "LayerNorm" else [])
    linear = ["weight"] + (["bias"] if config.add_bias_linear else [])
    qkv = ["weight"] + (["bias"] if config.add_bias_linear or config.add_qkv_bias else [])
    names, pattern = ["embedding.word_embeddings.weight"], moe_layer_pattern(config)
    if config.has_position_table:
        names.append("embedding.position_embeddings.weight")
    for i in range(config.num_layers):
        prefix = f"decoder.layers.{i}."
        names += [f"{prefix}input_layernorm.{p}" for p in norm]
        names += [f"{prefix}self_attention.linear_qkv.{p}" for p in qkv]
        names += [f"{prefix}self_attention.linear_proj.{p}" for p in linear]
        if config.qk_layernorm:
            names += [f"{prefix}self_attention.{qk}_layernorm.{p}" for qk in "qk" for p in norm]
        names += [f"{prefix}pre_mlp_layernorm.{p}" for p in norm]
        names += moe_parameter_names(config, prefix) if pattern[i] else dense_mlp_names(f"{prefix}mlp.", linear)
    names += [f"decoder.final_layernorm.{p}" for p in norm]
    if config.untie_embeddings_and_output_weights:
        names.append("output_layer.weight")
    return names


def dense_mlp_names(prefix: str, linear: list[str]) -> list[str]:
    return [f"{prefix}linear_fc1.{p}" for p in linear] + [f"{prefix}linear_fc2.{p}" for p in linear]


def moe_parameter_names(config: ModelConfig, prefix: str) -> list[str]:
    """An MoE layer's MLP parameters (megalith.models.moe: router, stacked experts, the shared expert)."""
    names = [f"{prefix}mlp.router.weight", f"{prefix}mlp.experts.weight1", f"{prefix}mlp.experts.weight2"]
    if config.add_bias_linear:
        names += [f"{prefix}mlp.experts.bias1", f"{prefix}mlp.experts.bias2"]
    if config.moe_shared_expert_intermediate_size is not None:
        if config.moe_shared_expert_gate:  # the gate's own parameter comes before the MLP's it took over
            names.append(f"{prefix}mlp.shared_experts.gate_weight")
        linear = ["weight"] + (["bias"] if config.add_bias_linear else [])
        names += dense_mlp_names(f"{prefix}mlp.shared_experts.", linear)
    return names


# --- tensors ----------------------------------------------------------------------------------


def dense_hf_names(config: ModelConfig, model_type: str) -> dict[str, str]:
    """megalith name -> HF name for the tensors that map one to one (GPT-2's transposed)."""
    if model_type == "gpt2":
        pairs = {"embedding.word_embeddings.weight": "transformer.wte.weight",
                 "embedding.position_embeddings.weight": "transformer.wpe.weight"}
        layer = {"input_layernorm": "ln_1", "self_attention.linear_proj": "attn.c_proj",
                 "pre_mlp_layernorm": "ln_2", "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj"}
        suffixes, block, final = ("weight", "bias"), "transformer.h", "transformer.ln_f"
    else:
        pairs = {"embedding.word_embeddings.weight": "model.embed_tokens.weight"}
        layer = {"input_layernorm": "input_layernorm", "self_attention.linear_proj": "self_attn.o_proj",
                 "pre_mlp_layernorm": "post_attention_layernorm", "mlp.linear_fc2": "mlp.down_proj"}
        suffixes, block, final = ("weight",), "model.layers", "model.norm"
    for i in range(config.num_layers):
        for ours, theirs in layer.items():
            for suffix in suffixes:
                pairs[f"decoder.layers.{i}.{ours}.{suffix}"] = f"{block}.{i}.{theirs}.{suffix}"
    for suffix in suffixes:
        pairs[f"decoder.final_layernorm.{suffix}"] = f"{final}.{suffix}"
    pairs["output_layer.weight"] = "lm_head.weight"
    return pairs


def _transposed(megalith_name: str, model_type: str) -> bool:
    """GPT-2's Conv1D weights are stored [in, out]."""
    return model_type == "gpt2" and megalith_name.endswith(".weight") and (
        ".linear_proj." in megalith_name or ".mlp." in megalith_name)


def normalize_hf_names(tensors: Tensors, model_type: str) -> Tensors:
    """Drop non-weight buffers; give original GPT-2 checkpoints (no `transformer.` prefix) the prefix."""
    out = {key: value for key, value in tensors.items() if not IGNORED_HF_KEYS.search(key)}
    if model_type == "gpt2" and not any(key.startswith("transformer.") for key in out):
        out = {key if key.startswith("lm_head.") else f"transformer.{key}": value for key, value in out.items()}
    return out


def take_dense(take: TensorTaker, name: str, config: ModelConfig, model_type: str, names: dict[str, str]):
    """The global tensor of one dense parameter `name` (not an MoE layer's MLP) from the HF tensors."""
    if name in names:
        tensor = take(names[name])
        return tensor.t().contiguous() if _transposed(name, model_type) else tensor
    index, kind = name.split(".")[2], name.rsplit(".", 1)[1]
    if ".linear_qkv" in name and model_type == "gpt2":
        fused = take(f"transformer.h.{index}.attn.c_attn.{kind}")
        fused = fused.t() if kind == "weight" else fused
        return fuse_qkv(*fused.chunk(3, dim=0), config.num_query_groups)
    if ".linear_qkv" in name:
        parts = (take(f"model.layers.{index}.self_attn.{p}_proj.{kind}") for p in "qkv")
        return fuse_qkv(*parts, config.num_query_groups)
    mlp = f"model.layers.{index}.mlp"  # Llama's fc1: [gate; up]
    return torch.cat([take(f"{mlp}.gate_proj.{kind}"), take(f"{mlp}.up_proj.{kind}")])


def give_dense(out: Tensors, name: str, tensor: torch.Tensor, config: ModelConfig, model_type: str,
               names: dict[str, str]) -> None:
    """Put one dense parameter's global tensor into the HF state dict `out` (take_dense's inverse)."""
    if name in names:
        out[names[name]] = tensor.t().contiguous() if _transposed(name, model_type) else tensor.contiguous()
        return
    index, kind = name.split(".")[2], name.rsplit(".", 1)[1]
    if ".linear_qkv" in name and model_type == "gpt2":
        fused = torch.cat(split_qkv(tensor, config))
        out[f"transformer.h.{index}.attn.c_attn.{kind}"] = fused.t().contiguous() if kind == "weight" else fused
    elif ".linear_qkv" in name:
        for part, value in zip("qkv", split_qkv(tensor, config)):
            out[f"model.layers.{index}.self_attn.{part}_proj.{kind}"] = value
    else:  # Llama's fc1: [gate; up]
        gate, up = tensor.chunk(2)
        out[f"model.layers.{index}.mlp.gate_proj.{kind}"] = gate.contiguous()
        out[f"model.layers.{index}.mlp.up_proj.{kind}"] = up.contiguous()


def hf_to_global(tensors: Tensors, config: ModelConfig, model_type: str) -> Tensors:
    """HF state dict -> megalith's global tensors (fp32), checking that every tensor is used."""
    take = TensorTaker(normalize_hf_names(tensors, model_type), "GPT")
    names = dense_hf_names(config, model_type)
    out = {name: take_dense(take, name, config, model_type, names) for name in gpt_parameter_names(config)}
    if not config.untie_embeddings_and_output_weights:
        take.tied("lm_head.weight", out["embedding.word_embeddings.weight"],
                  "set tie_word_embeddings false in config.json")
    take.check_all_used(f"it is not a plain {model_type} model")
    return out


def global_to_hf(tensors: Tensors, config: ModelConfig, model_type: str) -> Tensors:
    """megalith's global tensors -> the HF state dict of `model_type` (tied head left out)."""
    names = dense_hf_names(config, model_type)
    out = {}
    for name in gpt_parameter_names(config):
        give_dense(out, name, tensors[name], config, model_type, names)
    return out


# --- --check ----------------------------------------------------------------------------------


def compare(hf_model: nn.Module, model: nn.Module, config: ModelConfig, generator: torch.Generator,
            batch_size: int = 2) -> LogitPairs:
    """Next-token logits of both models on random ids (no padding: causal LMs see every token)."""
    ids = torch.randint(config.vocab_size, (batch_size, min(config.seq_length, 64)), generator=generator)
    with torch.no_grad():
        theirs = hf_model(input_ids=ids).logits
        ours = model(ids).transpose(0, 1)[..., : config.vocab_size]
    return [(ours, theirs)]


def _family(name: str, model_type: str, config_from_hf, needs: str, misfits, hf_config) -> HFFamily:
    return HFFamily(
        name=name, model_types=(model_type,), model="gpt", config_from_hf=config_from_hf,
        hf_to_global=lambda tensors, config: hf_to_global(tensors, config, model_type),
        parameter_names=gpt_parameter_names, placement=placement, stage_of=stage_of, export_needs=needs,
        export_misfits=misfits, global_to_hf=lambda tensors, config: global_to_hf(tensors, config, model_type),
        hf_config=hf_config, compare=compare,
    )


GPT2 = _family("GPT-2", "gpt2", gpt2_config, "learned positions, LayerNorm, GELU and biases", gpt2_misfits,
               gpt2_hf_config)
LLAMA = _family("Llama", "llama", llama_config, "rotary, RMSNorm, SwiGLU and no biases", llama_misfits,
                llama_hf_config)
