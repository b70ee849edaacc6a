"""Hugging Face BERT <-> megalith's BertModel (`--model bert`, post-norm): configs and tensors (pure).

HF's BertForMaskedLM and BertForPreTraining are megalith's post-norm BERT: the embedding
LayerNorm, post-norm layers (`attention.output.LayerNorm` -> `post_self_attn_layernorm`,
`output.LayerNorm` -> `post_mlp_layernorm`), the masked-LM head (`cls.predictions.transform` ->
`lm_head.dense`/`lm_head.layernorm`, `cls.predictions.bias` -> `lm_head.bias`, the decoder tied
to the word embedding) and, for BertForPreTraining, the pooler and the next-sentence head
(`bert.pooler.dense` -> `pooler`, `cls.seq_relationship` -> `binary_head`; HF's
next_sentence_label 1, "not the next segment", is megalith's is_random 1). query, key and value
are fused into megalith's QKV.

Which heads a checkpoint has decides the model: `cls.seq_relationship` present -> the binary
head, absent -> `bert_no_binary_head`. A BertModel (no masked-LM head) is refused: megalith's
BERT always has the head, and inventing one would not be a conversion.
"""

from __future__ import annotations

from typing import Collection

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.convert.mapping import (
    ConvertError, HFFamily, LogitPairs, Tensors, TensorTaker, fuse_qkv, placement, random_padding_mask, refuse,
    split_qkv, stage_of,
)

BERT_GELUS = {"gelu": False, "gelu_new": True, "gelu_pytorch_tanh": True}  # hidden_act -> openai_gelu
MLM_HEAD, BINARY_HEAD = "cls.predictions.transform.dense.weight", "cls.seq_relationship.weight"
BUFFERS = ("position_ids", "token_type_ids")  # saved by some transformers versions; not weights
USE_ALL_HINT = ("convert BertForMaskedLM or BertForPreTraining weights (a pooler belongs with cls.seq_relationship, "
                "other heads have no place in megalith's BERT)")


# --- configs ----------------------------------------------------------------------------------


def bert_config_from_hf(hf: dict, binary_head: bool = False) -> ModelConfig:
    """megalith's post-norm BERT for an HF BertConfig dict (dropout 0: conversion is for exact
    weights). `binary_head`: the checkpoint has a pooler and seq_relationship (BertForPreTraining)."""
    activation = hf.get("hidden_act", "gelu")
    if activation not in BERT_GELUS:
        refuse("bert", f"hidden_act {activation!r} (megalith has {', '.join(BERT_GELUS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        refuse("bert", f"position_embedding_type {hf['position_embedding_type']!r}")
    if hf.get("is_decoder", False) or hf.get("add_cross_attention", False):
        refuse("bert", "is_decoder / add_cross_attention")
    if not hf.get("tie_word_embeddings", True):
        refuse("bert", "tie_word_embeddings false (megalith's masked-LM head is tied to the word embedding)")
    positions = hf.get("max_position_embeddings", 512)
    return ModelConfig(
        num_layers=hf.get("num_hidden_layers", 12), hidden_size=hf.get("hidden_size", 768),
        num_attention_heads=hf.get("num_attention_heads", 12), ffn_hidden_size=hf.get("intermediate_size", 3072),
        seq_length=positions, max_position_embeddings=positions, vocab_size=hf.get("vocab_size", 30522),
        norm_epsilon=hf.get("layer_norm_eps", 1e-12), openai_gelu=BERT_GELUS[activation], post_layer_norm=True,
        num_tokentypes=hf.get("type_vocab_size", 2), bert_no_binary_head=not binary_head,
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
    )


def _hf_key(key: str) -> str:
    """Original TF-converted checkpoints name LayerNorm parameters gamma and beta."""
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if key.endswith(old):
            return key[: -len(old)] + new
    return key


def config_from_hf(hf: dict, names: Collection[str]) -> ModelConfig:
    """The config for these weights: the binary head if and only if they hold seq_relationship."""
    names = {_hf_key(name) for name in names}
    if MLM_HEAD not in names:
        raise ConvertError(f"the BERT checkpoint has no masked-LM head ({MLM_HEAD} is missing): it is a BertModel or "
                           "another head's model; megalith's BERT needs the head: convert BertForMaskedLM or "
                           "BertForPreTraining weights")
    return bert_config_from_hf(hf, binary_head=BINARY_HEAD in names)


def misfits(config: ModelConfig) -> list[str]:
    return [what for what, bad in (
        ("pre-norm layers (train with --post-layer-norm)", not config.post_layer_norm),
        ("RMSNorm", config.normalization != "LayerNorm"), ("SwiGLU", config.swiglu),
        ("a relu MLP", config.activation != "gelu"), ("no linear biases", config.disable_bias_linear),
        ("grouped-query attention", config.num_query_groups != config.num_attention_heads),
        ("kv_channels x heads != hidden size", config.kv_channels * config.num_attention_heads != config.hidden_size),
        ("no token types (--num-tokentypes 0)", config.num_tokentypes == 0),
        ("no position table (--no-position-embedding)", not config.position_embedding),
        ("--qk-layernorm", config.qk_layernorm),
    ) if bad]


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a BertForPreTraining (binary head) or BertForMaskedLM."""
    return {
        "architectures": ["BertForMaskedLM" if config.bert_no_binary_head else "BertForPreTraining"],
        "model_type": "bert", "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.ffn_hidden_size,
        "hidden_act": "gelu_pytorch_tanh" if config.openai_gelu else "gelu",
        "hidden_dropout_prob": config.hidden_dropout, "attention_probs_dropout_prob": config.attention_dropout,
        "max_position_embeddings": config.max_position_embeddings, "type_vocab_size": config.num_tokentypes,
        "initializer_range": config.init_method_std, "layer_norm_eps": config.norm_epsilon, "pad_token_id": 0,
        "position_embedding_type": "absolute", "is_decoder": False, "add_cross_attention": False,
        "tie_word_embeddings": True, "dtype": str(dtype).removeprefix("torch."),
    }


# --- megalith's parameters ------------------------------------------------------------------


def parameter_names(config: ModelConfig) -> list[str]:
    """A whole BertModel's named_parameters() names, in order (either layer order)."""
    norm = ["weight"] + (["bias"] if config.normalization == "LayerNorm" else [])
    linear = ["weight"] + (["bias"] if config.add_bias_linear else [])
    qkv = ["weight"] + (["bias"] if config.add_bias_linear or config.add_qkv_bias else [])
    post = config.post_layer_norm
    names = ["embedding.word_embeddings.weight"] + (["embedding.position_embeddings.weight"]
                                                    if config.has_position_table else [])
    names += ["embedding.tokentype_embeddings.weight"] if config.num_tokentypes else []
    names += [f"embedding.layernorm.{p}" for p in norm] if post else []
    for i in range(config.num_layers):
        prefix = f"encoder.layers.{i}."
        names += [] if post else [f"{prefix}input_layernorm.{p}" for p in norm]
        names += [f"{prefix}self_attention.linear_qkv.{p}" for p in qkv]
        names += [f"{prefix}self_attention.linear_proj.{p}" for p in linear]
        names += [f"{prefix}self_attention.{qk}_layernorm.{p}" for qk in "qk" for p in norm] if config.qk_layernorm else []
        names += [f"{prefix}{'post_self_attn' if post else 'pre_mlp'}_layernorm.{p}" for p in norm]
        names += [f"{prefix}mlp.linear_fc1.{p}" for p in linear]
        names += [f"{prefix}mlp.linear_fc2.{p}" for p in linear]
        names += [f"{prefix}post_mlp_layernorm.{p}" for p in norm] if post else []
    names += [] if post else [f"encoder.final_layernorm.{p}" for p in norm]
    names += ["lm_head.bias", "lm_head.dense.weight", "lm_head.dense.bias"] + [f"lm_head.layernorm.{p}" for p in norm]
    if not config.bert_no_binary_head:
        names += ["pooler.weight", "pooler.bias", "binary_head.weight", "binary_head.bias"]
    return names


# --- tensors ----------------------------------------------------------------------------------


def _hf_names(config: ModelConfig) -> dict[str, str]:
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


def _qkv_name(layer: int, part: str, kind: str) -> str:
    return f"bert.encoder.layer.{layer}.attention.self.{part}.{kind}"


def bert_hf_to_global(tensors: Tensors, config: ModelConfig) -> Tensors:
    """HF BERT state dict -> megalith BertModel's global tensors (fp32, no vocabulary padding),
    checking that every HF tensor is used. Needs `config.post_layer_norm` (HF's layer order)."""
    if not config.post_layer_norm:
        raise ConvertError("Hugging Face BERT is post-norm; use a config with post_layer_norm (bert_config_from_hf)")
    take = TensorTaker({_hf_key(key): value for key, value in tensors.items() if not key.endswith(BUFFERS)}, "BERT")
    out = {ours: take(theirs) for ours, theirs in _hf_names(config).items()}
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            parts = (take(_qkv_name(i, part, kind)) for part in ("query", "key", "value"))
            out[f"encoder.layers.{i}.self_attention.linear_qkv.{kind}"] = fuse_qkv(*parts, config.num_query_groups)
    hint = "megalith's BERT ties them"
    take.tied("cls.predictions.decoder.weight", out["embedding.word_embeddings.weight"], hint)
    take.tied("cls.predictions.decoder.bias", out["lm_head.bias"], hint)
    take.check_all_used(USE_ALL_HINT)
    return {name: out[name] for name in parameter_names(config)}


def global_to_hf(tensors: Tensors, config: ModelConfig) -> Tensors:
    """megalith's global tensors -> the state dict save_pretrained writes (the tied decoder left out)."""
    out = {theirs: tensors[ours].contiguous() for ours, theirs in _hf_names(config).items()}
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            qkv = split_qkv(tensors[f"encoder.layers.{i}.self_attention.linear_qkv.{kind}"], config)
            out.update({_qkv_name(i, part, kind): value for part, value in zip(("query", "key", "value"), qkv)})
    return out


# --- --check ----------------------------------------------------------------------------------


def compare(hf_model: nn.Module, model: nn.Module, config: ModelConfig, generator: torch.Generator,
            batch_size: int = 3) -> LogitPairs:
    """MLM logits (and sentence-relationship logits) of both models on random ids and token types,
    each sequence padded after a random length of at least half; compared at real tokens only."""
    length = min(config.seq_length, 64)
    ids = torch.randint(config.vocab_size, (batch_size, length), generator=generator)
    types = torch.randint(max(config.num_tokentypes, 1), (batch_size, length), generator=generator)
    real = random_padding_mask(batch_size, length, generator)
    with torch.no_grad():
        ours, binary = model(ids, types if config.num_tokentypes else None, real)
        theirs = hf_model(input_ids=ids, token_type_ids=types, attention_mask=real.long())
    ours = ours.transpose(0, 1)[..., : config.vocab_size]
    if binary is None:
        return [(ours[real], theirs.logits[real])]
    return [(ours[real], theirs.prediction_logits[real]), (binary, theirs.seq_relationship_logits)]


BERT = HFFamily(
    name="BERT", model_types=("bert",), model="bert", config_from_hf=config_from_hf, hf_to_global=bert_hf_to_global,
    parameter_names=parameter_names, placement=placement, stage_of=stage_of,
    export_needs="post-norm layers, LayerNorm, a GELU MLP, biases and token types", export_misfits=misfits,
    global_to_hf=global_to_hf, hf_config=hf_config, compare=compare,
)
