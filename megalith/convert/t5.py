"""Hugging Face T5ForConditionalGeneration <-> megalith's T5Model (`--model t5`): configs and tensors (pure).

T5 v1.0 layout (`feed_forward_proj: relu`, no biases, RMS norms, relative position buckets in
each stack's first block, one shared word embedding that is also the output layer, decoder
outputs scaled by d_model**-0.5). HF keeps one relative-bias table per stack in block 0;
megalith keeps it beside the stack (`encoder_relative_position`, `decoder_relative_position`).
Q, K and V become megalith's fused grouped `linear_qkv`; cross-attention's K and V become
`linear_kv` = [k; v]. `shared.weight` is the word embedding; HF's copies of it
(`encoder.embed_tokens`, `decoder.embed_tokens`, `lm_head`), when stored, must equal it.

Refused with one line: gated MLPs (T5 v1.1, Flan-T5: megalith's MLP has no gated GELU), an
untied or unscaled output layer (v1.1's convention), encoder-only checkpoints, and any tensor
with no place in megalith's T5. Read and dropped, as transformers' own loader drops it: the
unused cross-attention relative bias some original conversions store.

Pipeline: the encoder's and the decoder's layers are one sequence of E + D layers (decoder
layer j is global layer E + j). A table several stages hold is stored by the earliest stage
holding it, as `megalith pretrain --save` does (T5Model._mark_shared_tables).
"""

from __future__ import annotations

import re
from typing import Collection

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.models.t5 import resolve_t5_config
from megalith.training.checkpoint_format import Placement
from megalith.convert.mapping import (
    ConvertError, HFFamily, LogitPairs, Tensors, TensorTaker, fuse_qkv, random_padding_mask, split_qkv,
)
from megalith.convert.mapping import placement as standard_placement

# HF copies of the shared embedding that carry no information of their own
TIED_HF_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight")
# stored by some original T5 conversions, used by no model (transformers ignores it on load too)
IGNORED_HF_TENSORS = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)
USE_ALL_HINT = "convert a T5 v1.0 T5ForConditionalGeneration (other heads and layers have no place in megalith's T5)"
TIED_HINT = "megalith's T5 ties the output layer to the word embedding (T5 v1.0); T5 v1.1 / Flan-T5 are not supported"


# --- configs ----------------------------------------------------------------------------------


def t5_config_from_hf(hf: dict) -> ModelConfig:
    """megalith's T5 for an HF T5Config dict (dropout 0: conversion is for exact weights)."""
    projection = hf.get("feed_forward_proj", "relu")
    if projection.startswith("gated-"):
        raise ConvertError(f"T5 with feed_forward_proj {projection!r} (T5 v1.1 / Flan-T5's gated MLP) is not "
                           "supported; megalith maps T5 v1.0 models (feed_forward_proj 'relu')")
    if projection != "relu":
        raise ConvertError(f"T5 with feed_forward_proj {projection!r} is not supported; megalith maps T5 v1.0 "
                           "models (feed_forward_proj 'relu')")
    if hf.get("tie_word_embeddings") is False or hf.get("scale_decoder_outputs") is False:
        raise ConvertError("this T5 has an untied output layer or unscaled decoder outputs (T5 v1.1's convention); "
                           "megalith maps T5 v1.0 models, whose output layer is the scaled shared embedding")
    if hf.get("is_decoder", False):
        raise ConvertError("this T5 config is a decoder alone (is_decoder true); convert a T5ForConditionalGeneration")
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


def config_from_hf(hf: dict, names: Collection[str]) -> ModelConfig:
    """The config for these weights, refusing an encoder-only checkpoint (T5EncoderModel)."""
    if "decoder.final_layer_norm.weight" not in names:
        raise ConvertError("the T5 checkpoint has no decoder (decoder.final_layer_norm.weight is missing): it is a "
                           "T5EncoderModel; megalith's T5 is the whole encoder-decoder: convert "
                           "T5ForConditionalGeneration weights")
    return t5_config_from_hf(hf)


def misfits(config: ModelConfig) -> list[str]:
    """What keeps a megalith T5 config from being an HF T5 v1.0 (empty: it fits)."""
    return [what for what, bad in (
        (f"a {config.activation} MLP", config.activation != "relu" and not config.swiglu),
        ("SwiGLU", config.swiglu), ("linear biases", config.add_bias_linear),
        ("a QKV bias", config.add_qkv_bias and not config.add_bias_linear),
        (config.normalization, config.normalization != "RMSNorm"),
        ("an untied output layer (--untie-embeddings-and-output-weights)", config.untie_embeddings_and_output_weights),
        (f"{config.position_embedding_type} positions", config.position_embedding_type != "relative"),
        ("grouped-query attention", config.num_query_groups != config.num_attention_heads),
        ("post-norm layers", config.post_layer_norm),
    ) if bad]


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a T5ForConditionalGeneration (T5 v1.0) holding megalith's T5 weights."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True,
        "vocab_size": config.vocab_size, "d_model": config.hidden_size, "d_kv": config.kv_channels,
        "d_ff": config.ffn_hidden_size, "num_layers": config.encoder_num_layers,
        "num_decoder_layers": config.decoder_num_layers, "num_heads": config.num_attention_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.hidden_dropout, "layer_norm_epsilon": config.norm_epsilon,
        "feed_forward_proj": "relu", "tie_word_embeddings": True, "scale_decoder_outputs": True,
        "pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0,
        "dtype": str(dtype).removeprefix("torch."),
    }


# --- megalith's parameters ------------------------------------------------------------------


def parameter_names(config: ModelConfig) -> list[str]:
    """A whole T5Model's named_parameters() names, in order (one copy of each shared table)."""
    layer = ["input_layernorm.weight", "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight"]
    cross = ["pre_cross_attn_layernorm.weight", "cross_attention.linear_q.weight", "cross_attention.linear_kv.weight",
             "cross_attention.linear_proj.weight"]
    mlp = ["pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    names = ["embedding.word_embeddings.weight", "encoder_relative_position.weight"]
    names += [f"encoder.layers.{i}.{p}" for i in range(config.encoder_num_layers) for p in layer + mlp]
    names += ["encoder.final_layernorm.weight", "decoder_relative_position.weight"]
    names += [f"decoder.layers.{i}.{p}" for i in range(config.decoder_num_layers) for p in layer + cross + mlp]
    names += ["decoder.final_layernorm.weight"]
    return names + (["output_layer.weight"] if config.untie_embeddings_and_output_weights else [])


def placement(name: str, config: ModelConfig) -> Placement:
    """How megalith's T5 splits `name` over tp: the relative-bias tables by heads (dim 1),
    cross-attention's queries by heads and its [k; v] by heads within each part (stride 2),
    the rest as megalith's standard layers."""
    if name.endswith("_relative_position.weight"):
        return Placement(1)
    if ".cross_attention.linear_q." in name:
        return Placement(0)
    if ".cross_attention.linear_kv." in name:
        return Placement(0, 2)
    return standard_placement(name, config)


LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.")


def stage_of(name: str, config: ModelConfig, layer_stages: dict[int, int], last_stage: int) -> int:
    """The global stage whose copy `megalith pretrain --save` stores: the earliest holding it
    (word embedding and encoder bias: the first; decoder bias: the one holding layer E; encoder
    norm: the one holding layer E - 1; a layer where the split puts it; the rest: the last)."""
    encoders = config.encoder_num_layers
    if name.startswith("embedding.") or name.startswith("encoder_relative_position."):
        return layer_stages[0]
    if name.startswith("decoder_relative_position."):
        return layer_stages[encoders]
    if name.startswith("encoder.final_layernorm."):
        return layer_stages[encoders - 1]
    match = LAYER.match(name)
    if match:
        return layer_stages[int(match.group(2)) + (encoders if match.group(1) == "decoder" else 0)]
    return last_stage  # the decoder's final norm, an untied output layer


# --- tensors ----------------------------------------------------------------------------------


def _layer_names(stack: str, i: int) -> dict[str, str]:
    """megalith -> HF names of layer i's one-to-one tensors: HF's sub-layer 0 is self-attention,
    then (decoder) 1 cross-attention, then the MLP."""
    ours, theirs = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
    names = {ours + "input_layernorm.weight": theirs + "0.layer_norm.weight",
             ours + "self_attention.linear_proj.weight": theirs + "0.SelfAttention.o.weight"}
    mlp = "1"
    if stack == "decoder":
        mlp = "2"
        names.update({ours + "pre_cross_attn_layernorm.weight": theirs + "1.layer_norm.weight",
                      ours + "cross_attention.linear_q.weight": theirs + "1.EncDecAttention.q.weight",
                      ours + "cross_attention.linear_proj.weight": theirs + "1.EncDecAttention.o.weight"})
    names.update({ours + "pre_mlp_layernorm.weight": theirs + f"{mlp}.layer_norm.weight",
                  ours + "mlp.linear_fc1.weight": theirs + f"{mlp}.DenseReluDense.wi.weight",
                  ours + "mlp.linear_fc2.weight": theirs + f"{mlp}.DenseReluDense.wo.weight"})
    return names


def _plain_names(config: ModelConfig) -> dict[str, str]:
    """megalith name -> HF name for every tensor that maps one to one."""
    names = {
        "embedding.word_embeddings.weight": "shared.weight",
        "encoder_relative_position.weight": "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder_relative_position.weight": "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "encoder.final_layernorm.weight": "encoder.final_layer_norm.weight",
        "decoder.final_layernorm.weight": "decoder.final_layer_norm.weight",
    }
    for stack, count in (("encoder", config.encoder_num_layers), ("decoder", config.decoder_num_layers)):
        for i in range(count):
            names.update(_layer_names(stack, i))
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


def t5_hf_to_global(tensors: Tensors, config: ModelConfig) -> Tensors:
    """An HF T5ForConditionalGeneration state dict -> megalith's global tensors (fp32, no
    vocabulary padding), in parameter_names order, refusing any HF tensor left unused."""
    if config.untie_embeddings_and_output_weights:
        raise ConvertError("Hugging Face T5 v1.0 ties its output layer; use a tied config (t5_config_from_hf)")
    take = TensorTaker({key: value for key, value in tensors.items() if key not in IGNORED_HF_TENSORS}, "T5")
    out = {ours: take(theirs) for ours, theirs in _plain_names(config).items()}
    for ours, parts in _fused_names(config).items():
        values = [take(part) for part in parts]
        out[ours] = fuse_qkv(*values, config.num_query_groups) if len(values) == 3 else torch.cat(values)
    for copy in TIED_HF_COPIES:
        take.tied(copy, out["embedding.word_embeddings.weight"], TIED_HINT)
    take.check_all_used(USE_ALL_HINT)
    return {name: out[name] for name in parameter_names(config)}


def t5_global_to_hf(tensors: Tensors, config: ModelConfig) -> Tensors:
    """megalith's global T5 tensors -> the state dict save_pretrained writes (tied copies left out)."""
    out = {theirs: tensors[ours].contiguous() for ours, theirs in _plain_names(config).items()}
    for ours, parts in _fused_names(config).items():
        values = split_qkv(tensors[ours], config) if len(parts) == 3 else tensors[ours].chunk(2)
        out.update({part: value.contiguous() for part, value in zip(parts, values)})
    return out


# --- --check ----------------------------------------------------------------------------------


def compare(hf_model: nn.Module, model: nn.Module, config: ModelConfig, generator: torch.Generator,
            batch_size: int = 3) -> LogitPairs:
    """Decoder logits of both models on random encoder and decoder ids, each sequence padded after
    a random length of at least half (both stacks: megalith's padding masks, HF's attention masks);
    compared at the real decoder tokens."""
    lengths = (min(config.encoder_seq_length or config.seq_length, 24),
               min(config.decoder_seq_length or config.seq_length, 16))
    ids, real = [], []
    for length in lengths:
        ids.append(torch.randint(config.vocab_size, (batch_size, length), generator=generator))
        real.append(random_padding_mask(batch_size, length, generator))
    with torch.no_grad():
        ours = model(ids[0], ids[1], None, real[0], real[1])
        theirs = hf_model(input_ids=ids[0], attention_mask=real[0].long(), decoder_input_ids=ids[1],
                          decoder_attention_mask=real[1].long()).logits
    ours = ours.transpose(0, 1)[..., : config.vocab_size]
    return [(ours[real[1]], theirs[real[1]])]


T5 = HFFamily(
    name="T5", model_types=("t5",), model="t5", config_from_hf=config_from_hf, hf_to_global=t5_hf_to_global,
    parameter_names=parameter_names, placement=placement, stage_of=stage_of,
    export_needs="a ReLU MLP, no biases, RMSNorm, relative positions and the output layer tied to the word embedding",
    export_misfits=misfits, global_to_hf=t5_global_to_hf, hf_config=hf_config, compare=compare,
)
