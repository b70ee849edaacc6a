"""Hugging Face GPT-2 and Llama <-> megalith's GPT: configs and tensors, both directions (pure).

megalith's side is the *global* tensors of a whole model (what one process would hold, no
vocabulary padding), named as GPTModel's parameters. What differs from Hugging Face:

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

import torch

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.gpt import PADDED_VOCAB_PARAMETERS
from megalith.training.checkpoint_format import Placement

SUPPORTED_MODEL_TYPES = ("gpt2", "llama")
GPT2_GELUS = {"gelu_new": True, "gelu_pytorch_tanh": True, "gelu": False}  # activation -> openai_gelu
# buffers some HF checkpoints carry that are not weights (causal masks, rotary frequencies)
IGNORED_HF_KEYS = re.compile(r"(\.attn\.(bias|masked_bias)|\.rotary_emb\.inv_freq)$")


class ConvertError(ConfigError):
    """A model or checkpoint that cannot be converted, with what does not fit."""


# --- configs ----------------------------------------------------------------------------------


def _refuse(model_type: str, what: str) -> None:
    raise ConvertError(f"{model_type} config: {what} is not supported by megalith's GPT; convert a model without it")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """megalith's ModelConfig for an HF config.json (dropout 0: conversion is for exact weights)."""
    model_type = hf.get("model_type")
    if model_type == "gpt2":
        return _gpt2_config(hf)
    if model_type == "llama":
        return _llama_config(hf)
    raise ConvertError(f"model_type {model_type!r} is not supported; megalith converts "
                       f"{', '.join(SUPPORTED_MODEL_TYPES)} (GPT2LMHeadModel, LlamaForCausalLM)")


def _gpt2_config(hf: dict) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in GPT2_GELUS:
        _refuse("gpt2", f"activation_function {activation!r} (megalith has {', '.join(GPT2_GELUS)})")
    if not hf.get("scale_attn_weights", True):
        _refuse("gpt2", "scale_attn_weights false")
    if hf.get("scale_attn_by_inverse_layer_idx", False):
        _refuse("gpt2", "scale_attn_by_inverse_layer_idx")
    if hf.get("add_cross_attention", False):
        _refuse("gpt2", "add_cross_attention")
    hidden, positions = hf.get("n_embd", 768), hf.get("n_positions", 1024)
    return ModelConfig(
        num_layers=hf.get("n_layer", 12), hidden_size=hidden, num_attention_heads=hf.get("n_head", 12),
        ffn_hidden_size=hf.get("n_inner") or 4 * hidden, seq_length=positions, max_position_embeddings=positions,
        vocab_size=hf.get("vocab_size", 50257), norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        normalization="LayerNorm", position_embedding_type="learned_absolute", openai_gelu=GPT2_GELUS[activation],
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", True),
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
    )


def _rope_theta(hf: dict) -> int:
    if hf.get("rope_scaling"):
        _refuse("llama", f"rope_scaling {hf['rope_scaling']}")
    params = hf.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default":
        _refuse("llama", f"rope_parameters.rope_type {params['rope_type']!r}")
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        _refuse("llama", "partial_rotary_factor below 1")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if float(theta) != int(theta):
        _refuse("llama", f"rope_theta {theta} (megalith's rotary_base is an integer)")
    return int(theta)


def _llama_config(hf: dict) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        _refuse("llama", f"hidden_act {hf['hidden_act']!r} (megalith's SwiGLU uses silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag, False):
            _refuse("llama", flag)
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    positions = hf.get("max_position_embeddings", 2048)
    return ModelConfig(
        num_layers=hf.get("num_hidden_layers", 32), hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=hf.get("intermediate_size", 11008), num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hidden // heads, seq_length=positions,
        max_position_embeddings=positions, vocab_size=hf.get("vocab_size", 32000),
        norm_epsilon=hf.get("rms_norm_eps", 1e-6), normalization="RMSNorm", position_embedding_type="rope",
        rotary_base=_rope_theta(hf), swiglu=True, disable_bias_linear=True,
        untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
    )


def hf_model_type(config: ModelConfig) -> str:
    """The HF architecture that computes what this megalith model does, or a one-line refusal."""
    learned = config.position_embedding_type == "learned_absolute"
    gpt2_misfits = [what for what, bad in (
        ("rotary positions", not learned), ("RMSNorm", config.normalization != "LayerNorm"),
        ("SwiGLU", config.swiglu), ("no linear biases", config.disable_bias_linear),
        ("grouped-query attention", config.num_query_groups != config.num_attention_heads),
        ("kv_channels x heads != hidden size", config.kv_channels * config.num_attention_heads != config.hidden_size),
    ) if bad]
    if not gpt2_misfits:
        return "gpt2"
    llama_misfits = [what for what, bad in (
        ("learned positions", learned), ("LayerNorm", config.normalization != "RMSNorm"),
        ("a GELU MLP", not config.swiglu), ("linear biases", config.add_bias_linear or config.add_qkv_bias),
    ) if bad]
    if not llama_misfits:
        return "llama"
    raise ConvertError(f"this model fits no Hugging Face architecture megalith exports: GPT-2 needs learned "
                       f"positions, LayerNorm, GELU and biases (it has {', '.join(gpt2_misfits)}); Llama needs "
                       f"rotary, RMSNorm, SwiGLU and no biases (it has {', '.join(llama_misfits)})")


def hf_config_from_model(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json for the HF model that `hf_model_type` picks (transformers 4 and 5 read it)."""
    model_type = hf_model_type(config)
    dtype_name = str(dtype).removeprefix("torch.")
    tied = not config.untie_embeddings_and_output_weights
    if model_type == "gpt2":
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
            "tie_word_embeddings": tied, "bos_token_id": token, "eos_token_id": token, "dtype": dtype_name,
        }
    theta = float(config.rotary_base)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups, "head_dim": config.kv_channels, "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings, "rms_norm_eps": config.norm_epsilon,
        "rope_theta": theta, "rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "attention_bias": False, "mlp_bias": False, "attention_dropout": config.attention_dropout,
        "initializer_range": config.init_method_std, "tie_word_embeddings": tied, "dtype": dtype_name,
    }


# --- megalith's parameters ------------------------------------------------------------------


def megalith_parameter_names(config: ModelConfig) -> list[str]:
    """A whole GPTModel's named_parameters() names (global layer indices), in order."""
    norm = ["weight"] + (["bias"] if config.normalization == "LayerNorm" else [])
    linear = ["weight"] + (["bias"] if config.add_bias_linear else [])
    qkv = ["weight"] + (["bias"] if config.add_bias_linear or config.add_qkv_bias else [])
    names = ["embedding.word_embeddings.weight"]
    if config.position_embedding_type == "learned_absolute":
        names.append("embedding.position_embeddings.weight")
    for i in range(config.num_layers):
        prefix = f"decoder.layers.{i}."
        names += [f"{prefix}input_layernorm.{p}" for p in norm]
        names += [f"{prefix}self_attention.linear_qkv.{p}" for p in qkv]
        names += [f"{prefix}self_attention.linear_proj.{p}" for p in linear]
        names += [f"{prefix}pre_mlp_layernorm.{p}" for p in norm]
        names += [f"{prefix}mlp.linear_fc1.{p}" for p in linear]
        names += [f"{prefix}mlp.linear_fc2.{p}" for p in linear]
    names += [f"decoder.final_layernorm.{p}" for p in norm]
    if config.untie_embeddings_and_output_weights:
        names.append("output_layer.weight")
    return names


def placement(name: str, config: ModelConfig) -> Placement:
    """How megalith's layers split parameter `name` over tp (their tensor_parallel_dim/stride)."""
    vocab = config.vocab_size if name.endswith(PADDED_VOCAB_PARAMETERS) else None
    if vocab is not None:
        return Placement(0, 1, vocab)
    if ".linear_qkv." in name:
        return Placement(0)
    if ".linear_fc1." in name:
        return Placement(0, 2 if config.swiglu else 1)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return Placement(1)
    return Placement(None)  # norms, row-parallel biases, learned positions: replicated


def stage_of(name: str, layer_stages: dict[int, int], last_stage: int) -> int:
    """The global pipeline stage that holds parameter `name`."""
    if name.startswith("embedding."):
        return 0
    match = re.match(r"decoder\.layers\.(\d+)\.", name)
    if match:
        return layer_stages[int(match.group(1))]
    return last_stage  # final norm, output layer


# --- fused attention --------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[all q; all k; all v] rows -> Megatron's grouped rows (per group: its q heads, k head, v head)."""
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped rows -> q `[heads*d, ...]`, k and v `[groups*d, ...]`."""
    groups, d = config.num_query_groups, config.kv_channels
    per_group = config.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


# --- tensors ----------------------------------------------------------------------------------


def _hf_names(config: ModelConfig, model_type: str) -> dict[str, str]:
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


def normalize_hf_names(tensors: dict[str, torch.Tensor], model_type: str) -> dict[str, torch.Tensor]:
    """Drop non-weight buffers; give original GPT-2 checkpoints (no `transformer.` prefix) the prefix."""
    out = {key: value for key, value in tensors.items() if not IGNORED_HF_KEYS.search(key)}
    if model_type == "gpt2" and not any(key.startswith("transformer.") for key in out):
        out = {key if key.startswith("lm_head.") else f"transformer.{key}": value for key, value in out.items()}
    return out


def hf_to_global(tensors: dict[str, torch.Tensor], config: ModelConfig, model_type: str) -> dict[str, torch.Tensor]:
    """HF state dict -> megalith's global tensors (fp32), checking that every tensor is used."""
    tensors = normalize_hf_names(tensors, model_type)
    names = _hf_names(config, model_type)
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ConvertError(f"the HF checkpoint has no tensor {key!r}, which its config.json needs; "
                               "the weights do not belong to this config")
        used.add(key)
        return tensors[key].float()

    out = {}
    for name in megalith_parameter_names(config):
        if name in names:
            tensor = take(names[name])
            out[name] = tensor.t().contiguous() if _transposed(name, model_type) else tensor
            continue
        index, kind = name.split(".")[2], name.rsplit(".", 1)[1]
        if ".linear_qkv" in name and model_type == "gpt2":
            fused = take(f"transformer.h.{index}.attn.c_attn.{kind}")
            fused = fused.t() if kind == "weight" else fused
            out[name] = fuse_qkv(*fused.chunk(3, dim=0), config.num_query_groups)
        elif ".linear_qkv" in name:
            parts = (take(f"model.layers.{index}.self_attn.{p}_proj.{kind}") for p in "qkv")
            out[name] = fuse_qkv(*parts, config.num_query_groups)
        elif ".linear_fc1" in name and model_type == "llama":  # [gate; up]
            mlp = f"model.layers.{index}.mlp"
            out[name] = torch.cat([take(f"{mlp}.gate_proj.{kind}"), take(f"{mlp}.up_proj.{kind}")])
        else:
            raise ConvertError(f"no Hugging Face tensor maps to megalith's {name}")
    head = "lm_head.weight"
    if not config.untie_embeddings_and_output_weights and head in tensors:
        if not torch.equal(tensors[head].float(), out["embedding.word_embeddings.weight"]):
            raise ConvertError("config.json ties the output layer to the embedding but lm_head.weight differs; "
                               "set tie_word_embeddings false in config.json")
        used.add(head)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ConvertError(f"the HF checkpoint has tensors megalith's GPT has no place for ({', '.join(unused[:3])}"
                           f"{', ...' if len(unused) > 3 else ''}); it is not a plain {model_type} model")
    return out


def global_to_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """megalith's global tensors -> the HF state dict of `hf_model_type(config)` (tied head left out)."""
    model_type = hf_model_type(config)
    names = _hf_names(config, model_type)
    out = {}
    for name in megalith_parameter_names(config):
        tensor = tensors[name]
        if name in names:
            out[names[name]] = tensor.t().contiguous() if _transposed(name, model_type) else tensor.contiguous()
            continue
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
    return out


# --- BERT (BertForMaskedLM, BertForPreTraining) -> megalith's BertModel -----------------------

BERT_GELUS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # hidden_act -> openai_gelu


def bert_config_from_hf(hf: dict, binary_head: bool = False) -> ModelConfig:
    """megalith's post-norm BERT for an HF BertConfig dict (dropout 0: conversion is for exact
    weights). `binary_head`: the checkpoint has a pooler and seq_relationship (BertForPreTraining)."""
    activation = hf.get("hidden_act", "gelu")
    if activation not in BERT_GELUS:
        _refuse("bert", f"hidden_act {activation!r} (megalith has {', '.join(BERT_GELUS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        _refuse("bert", f"position_embedding_type {hf['position_embedding_type']!r}")
    if hf.get("is_decoder", False) or hf.get("add_cross_attention", False):
        _refuse("bert", "is_decoder / add_cross_attention")
    positions = hf.get("max_position_embeddings", 512)
    return ModelConfig(
        num_layers=hf.get("num_hidden_layers", 12), hidden_size=hf.get("hidden_size", 768),
        num_attention_heads=hf.get("num_attention_heads", 12), ffn_hidden_size=hf.get("intermediate_size", 3072),
        seq_length=positions, max_position_embeddings=positions, vocab_size=hf.get("vocab_size", 30522),
        norm_epsilon=hf.get("layer_norm_eps", 1e-12), openai_gelu=BERT_GELUS[activation], post_layer_norm=True,
        num_tokentypes=hf.get("type_vocab_size", 2), bert_no_binary_head=not binary_head,
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
    )


def _bert_hf_names(config: ModelConfig) -> dict[str, str]:
    """megalith BertModel name -> HF name for the tensors that map one to one."""
    pairs = {f"embedding.{ours}": f"bert.embeddings.{theirs}" for ours, theirs in (
        ("word_embeddings.weight", "word_embeddings.weight"),
        ("position_embeddings.weight", "position_embeddings.weight"),
        ("tokentype_embeddings.weight", "token_type_embeddings.weight"), ("layernorm.weight", "LayerNorm.weight"),
        ("layernorm.bias", "LayerNorm.bias"))}
    layer = {"self_attention.linear_proj": "attention.output.dense",
             "post_self_attn_layernorm": "attention.output.LayerNorm", "mlp.linear_fc1": "intermediate.dense",
             "mlp.linear_fc2": "output.dense", "post_mlp_layernorm": "output.LayerNorm"}
    head = {"lm_head.dense": "cls.predictions.transform.dense",
            "lm_head.layernorm": "cls.predictions.transform.LayerNorm"}
    if not config.bert_no_binary_head:
        head.update({"pooler": "bert.pooler.dense", "binary_head": "cls.seq_relationship"})
    for suffix in ("weight", "bias"):
        for i in range(config.num_layers):
            for ours, theirs in layer.items():
                pairs[f"encoder.layers.{i}.{ours}.{suffix}"] = f"bert.encoder.layer.{i}.{theirs}.{suffix}"
        for ours, theirs in head.items():
            pairs[f"{ours}.{suffix}"] = f"{theirs}.{suffix}"
    pairs["lm_head.bias"] = "cls.predictions.bias"
    return pairs


def bert_hf_to_global(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF BERT state dict -> megalith BertModel's global tensors (fp32, no vocabulary padding),
    checking that every HF tensor is used. Needs `config.post_layer_norm` (HF's layer order)."""
    if not config.post_layer_norm:
        raise ConvertError("Hugging Face BERT is post-norm; use a config with post_layer_norm (bert_config_from_hf)")
    tensors = {key: value for key, value in tensors.items() if not key.endswith(("position_ids", "token_type_ids"))}
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise ConvertError(f"the HF checkpoint has no tensor {key!r}, which its config needs; "
                               "the weights do not belong to this config")
        used.add(key)
        return tensors[key].float()

    out = {ours: take(theirs) for ours, theirs in _bert_hf_names(config).items()}
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            parts = (take(f"bert.encoder.layer.{i}.attention.self.{p}.{kind}") for p in ("query", "key", "value"))
            out[f"encoder.layers.{i}.self_attention.linear_qkv.{kind}"] = fuse_qkv(*parts, config.num_query_groups)
    tied = {"cls.predictions.decoder.weight": out["embedding.word_embeddings.weight"],
            "cls.predictions.decoder.bias": out["lm_head.bias"]}
    for key, expected in tied.items():
        if key in tensors:
            if not torch.equal(tensors[key].float(), expected):
                raise ConvertError(f"{key} differs from the tensor it is tied to; megalith's BERT ties them")
            used.add(key)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ConvertError(f"the HF checkpoint has tensors megalith's BERT has no place for ({', '.join(unused[:3])}"
                           f"{', ...' if len(unused) > 3 else ''}); convert BertForMaskedLM or BertForPreTraining "
                           "with the matching binary_head")
    return out
