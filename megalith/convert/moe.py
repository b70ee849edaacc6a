"""Hugging Face Mixtral and Qwen2-MoE <-> megalith's GPT with MoE layers (`--model gpt --num-experts E`).

Both are Llama (gpt.py) with MoE MLPs, so attention, norms and embeddings map as Llama's do. What differs:

- Experts: HF files hold one Linear per expert (Mixtral's w1 gate, w3 up, w2 down; Qwen2-MoE's gate_proj,
  up_proj, down_proj); megalith stacks them, `experts.weight1` [E, 2F, h] = [gate; up] per expert and
  `experts.weight2` [E, h, F]. transformers 5 fuses them the same way in memory (`experts.gate_up_proj`,
  `experts.down_proj`); such tensors are read too. The router (`gate`) is megalith's `router.weight`.
- Routing: Mixtral's softmax over all experts, top-k, renormalised, is a softmax over the k chosen logits
  (megalith's default). Qwen2-MoE's `norm_topk_prob` false is --moe-router-pre-softmax (top-k of the softmax
  over all experts, not renormalised); true is Mixtral's.
- Qwen2-MoE's layers: MoE where (i + 1) % decoder_sparse_step == 0 and i is not in mlp_only_layers; the others
  are dense MLPs of intermediate_size. megalith's --moe-layer-freq gets the 0/1 list (or 1: every layer).
- Qwen2-MoE's shared expert (shared_expert_intermediate_size) is gated by sigmoid(shared_expert_gate(x)):
  --moe-shared-expert-gate, `shared_experts.gate_weight` [1, h].
"""

from __future__ import annotations

from typing import Collection

import torch

from megalith.config import ModelConfig
import megalith.convert.gpt as gpt
from megalith.convert.mapping import HFFamily, Tensors, TensorTaker, placement, refuse, stage_of
from megalith.models.moe import moe_layer_pattern

MIXTRAL_NAMES = {"block": "block_sparse_moe", "gate": "w1", "up": "w3", "down": "w2"}
QWEN2_MOE_NAMES = {"block": "mlp", "gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


# --- configs ----------------------------------------------------------------------------------


def _llama_part(hf: dict, family: str) -> dict:
    """The ModelConfig fields a Llama-like decoder gives (attention, norms, rotary, vocabulary)."""
    if hf.get("hidden_act", "silu") != "silu":
        refuse(family, f"hidden_act {hf['hidden_act']!r} (megalith's SwiGLU uses silu)")
    window = hf.get("sliding_window") if hf.get("use_sliding_window", True) else None
    if window:
        refuse(family, f"sliding_window {window} (megalith's attention is fully causal)")
    if hf.get("router_jitter_noise"):
        refuse(family, f"router_jitter_noise {hf['router_jitter_noise']} (megalith has no input jitter)")
    hidden, heads = hf.get("hidden_size", 4096), hf.get("num_attention_heads", 32)
    positions, groups = hf.get("max_position_embeddings", 4096), hf.get("num_key_value_heads") or heads
    return dict(
        num_layers=hf.get("num_hidden_layers", 32), hidden_size=hidden, num_attention_heads=heads,
        num_query_groups=groups, group_query_attention=groups != heads,
        kv_channels=hf.get("head_dim") or hidden // heads, seq_length=positions, max_position_embeddings=positions,
        vocab_size=hf.get("vocab_size", 32000), norm_epsilon=hf.get("rms_norm_eps", 1e-6), normalization="RMSNorm",
        position_embedding_type="rope", rotary_base=gpt.rope_theta(hf, family), swiglu=True,
        disable_bias_linear=True, untie_embeddings_and_output_weights=not hf.get("tie_word_embeddings", False),
        init_method_std=hf.get("initializer_range", 0.02), hidden_dropout=0.0, attention_dropout=0.0,
        num_experts=None, moe_router_topk=hf.get("num_experts_per_tok", 2),
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
    )


def mixtral_config(hf: dict, names: Collection[str] = ()) -> ModelConfig:
    """megalith's GPT with an MoE MLP in every layer for a MixtralConfig dict."""
    fields = _llama_part(hf, "mixtral")
    ffn = hf.get("intermediate_size", 14336)
    return ModelConfig(**fields | dict(num_experts=hf.get("num_local_experts", 8), ffn_hidden_size=ffn,
                                       moe_ffn_hidden_size=ffn))


def qwen2_moe_layers(hf: dict) -> list[bool]:
    """transformers' rule: layer i is MoE when it is not in mlp_only_layers and (i + 1) % decoder_sparse_step
    is 0."""
    step, dense = hf.get("decoder_sparse_step", 1), set(hf.get("mlp_only_layers") or ())
    return [i not in dense and (i + 1) % step == 0 for i in range(hf.get("num_hidden_layers", 24))]


def qwen2_moe_config(hf: dict, names: Collection[str] = ()) -> ModelConfig:
    """megalith's GPT (qkv biases, MoE layers with a gated shared expert) for a Qwen2MoeConfig dict."""
    fields = _llama_part(hf, "qwen2_moe")
    experts, shared = hf.get("num_experts", 60), hf.get("shared_expert_intermediate_size", 5632)
    if not experts:
        refuse("qwen2_moe", "num_experts 0 (a dense model; convert it as Llama)")
    if not shared:
        refuse("qwen2_moe", f"shared_expert_intermediate_size {shared}")
    pattern = qwen2_moe_layers(hf)
    frequency = "1" if all(pattern) else "[" + ",".join("1" if moe else "0" for moe in pattern) + "]"
    return ModelConfig(**fields | dict(
        num_experts=experts, moe_layer_freq=frequency, ffn_hidden_size=hf.get("intermediate_size", 5632),
        moe_ffn_hidden_size=hf.get("moe_intermediate_size", 1408), moe_shared_expert_intermediate_size=shared,
        moe_shared_expert_gate=True, moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        add_qkv_bias=bool(hf.get("qkv_bias", True)), moe_router_topk=hf.get("num_experts_per_tok", 4),
    ))


def _common_misfits(config: ModelConfig) -> list[tuple[str, bool]]:
    """What keeps a megalith config from being any of these HF MoE decoders."""
    return [
        ("no MoE layers (--num-experts)", not config.is_moe),
        ("learned positions", config.position_embedding_type != "rope"),
        ("LayerNorm", config.normalization != "RMSNorm"), ("a GELU MLP", not config.swiglu),
        ("linear biases", config.add_bias_linear), ("--qk-layernorm", config.qk_layernorm),
        (f"--rotary-percent {config.rotary_percent:g}", config.rotary_percent < 1.0),
        ("sigmoid routing", config.is_moe and config.moe_router_score_function != "softmax"),
        ("--moe-router-topk-scaling-factor", config.moe_router_topk_scaling_factor is not None),
        ("--moe-router-enable-expert-bias", config.moe_router_enable_expert_bias),
        ("--moe-expert-capacity-factor (HF routing is dropless)", config.moe_expert_capacity_factor is not None),
    ]


def mixtral_misfits(config: ModelConfig) -> list[str]:
    return [what for what, bad in _common_misfits(config) + [
        ("qkv biases", config.add_qkv_bias),
        ("dense layers (--moe-layer-freq)", config.is_moe and not all(moe_layer_pattern(config))),
        ("--moe-router-pre-softmax", config.moe_router_pre_softmax),
        ("a shared expert", config.moe_shared_expert_intermediate_size is not None),
    ] if bad]


def qwen2_moe_misfits(config: ModelConfig) -> list[str]:
    return [what for what, bad in _common_misfits(config) + [
        ("no gated shared expert (--moe-shared-expert-gate)", not config.moe_shared_expert_gate),
    ] if bad]


def _llama_hf_part(config: ModelConfig, dtype: torch.dtype) -> dict:
    """The Llama part of an MoE config.json (gpt.llama_hf_config, without its MLP fields)."""
    hf = gpt.llama_hf_config(config, dtype)
    for key in ("architectures", "model_type", "intermediate_size", "mlp_bias", "attention_bias"):
        hf.pop(key)
    return hf | {"num_experts_per_tok": config.moe_router_topk, "router_aux_loss_coef": config.moe_aux_loss_coeff,
                 "output_router_logits": False}


def mixtral_hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a MixtralForCausalLM."""
    return {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"} | _llama_hf_part(config, dtype) | {
        "intermediate_size": config.moe_ffn_hidden_size, "num_local_experts": config.num_experts,
        "router_jitter_noise": 0.0, "sliding_window": None}


def qwen2_moe_hf_config(config: ModelConfig, dtype: torch.dtype) -> dict:
    """config.json of a Qwen2MoeForCausalLM (the dense layers as mlp_only_layers)."""
    dense = [i for i, moe in enumerate(moe_layer_pattern(config)) if not moe]
    return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe"} | _llama_hf_part(config, dtype) | {
        "intermediate_size": config.ffn_hidden_size, "moe_intermediate_size": config.moe_ffn_hidden_size,
        "shared_expert_intermediate_size": config.moe_shared_expert_intermediate_size,
        "num_experts": config.num_experts, "norm_topk_prob": not config.moe_router_pre_softmax,
        "decoder_sparse_step": 1, "mlp_only_layers": dense, "qkv_bias": config.add_qkv_bias,
        "use_sliding_window": False, "sliding_window": None}


# --- tensors ----------------------------------------------------------------------------------


def _is_moe_mlp(name: str) -> bool:
    return ".mlp.router." in name or ".mlp.experts." in name or ".mlp.shared_experts." in name


def _take_experts(take: TensorTaker, tensors: Tensors, layer: str, hf_names: dict, experts: int):
    """weight1 [E, 2F, h] and weight2 [E, h, F] of one layer: per-expert HF Linears, or transformers 5's
    fused in-memory tensors (under `mlp.`, Mixtral's block renamed)."""
    fused = f"{layer}.mlp.experts"
    if f"{fused}.gate_up_proj" in tensors:
        return take(f"{fused}.gate_up_proj"), take(f"{fused}.down_proj")
    block = f"{layer}.{hf_names['block']}.experts"
    weight1 = torch.stack([torch.cat([take(f"{block}.{e}.{hf_names['gate']}.weight"),
                                      take(f"{block}.{e}.{hf_names['up']}.weight")]) for e in range(experts)])
    weight2 = torch.stack([take(f"{block}.{e}.{hf_names['down']}.weight") for e in range(experts)])
    return weight1, weight2


def hf_to_global(tensors: Tensors, config: ModelConfig, hf_names: dict, family: str) -> Tensors:
    """HF state dict -> megalith's global tensors (fp32), checking that every tensor is used."""
    tensors = gpt.normalize_hf_names(tensors, "llama")
    take = TensorTaker(tensors, family)
    names = gpt.dense_hf_names(config, "llama")
    out = {}
    for name in gpt.gpt_parameter_names(config):
        if not _is_moe_mlp(name):
            out[name] = gpt.take_dense(take, name, config, "llama", names)
            continue
        index = name.split(".")[2]
        layer, ours = f"model.layers.{index}", name.split(".mlp.", 1)[1]
        if ours == "router.weight":
            router = f"{layer}.{hf_names['block']}.gate.weight"
            out[name] = take(router if router in tensors or f"{layer}.mlp.gate.weight" not in tensors
                             else f"{layer}.mlp.gate.weight")
        elif ours == "experts.weight1":
            out[name], out[name[: -len("1")] + "2"] = _take_experts(take, tensors, layer, hf_names,
                                                                    config.num_experts)
        elif ours == "shared_experts.linear_fc1.weight":
            shared = f"{layer}.mlp.shared_expert"
            out[name] = torch.cat([take(f"{shared}.gate_proj.weight"), take(f"{shared}.up_proj.weight")])
        elif ours == "shared_experts.linear_fc2.weight":
            out[name] = take(f"{layer}.mlp.shared_expert.down_proj.weight")
        elif ours == "shared_experts.gate_weight":
            out[name] = take(f"{layer}.mlp.shared_expert_gate.weight")
    if not config.untie_embeddings_and_output_weights:
        take.tied("lm_head.weight", out["embedding.word_embeddings.weight"],
                  "set tie_word_embeddings false in config.json")
    take.check_all_used(f"it is not a plain {family} model")
    return out


def global_to_hf(tensors: Tensors, config: ModelConfig, hf_names: dict) -> Tensors:
    """megalith's global tensors -> the HF state dict save_pretrained writes (one Linear per expert)."""
    names = gpt.dense_hf_names(config, "llama")
    out = {}
    for name in gpt.gpt_parameter_names(config):
        tensor = tensors[name]
        if not _is_moe_mlp(name):
            gpt.give_dense(out, name, tensor, config, "llama", names)
            continue
        index = name.split(".")[2]
        layer, ours = f"model.layers.{index}", name.split(".mlp.", 1)[1]
        block = f"{layer}.{hf_names['block']}"
        if ours == "router.weight":
            out[f"{block}.gate.weight"] = tensor.contiguous()
        elif ours == "experts.weight1":
            for e, (gate, up) in enumerate(t.chunk(2) for t in tensor):
                out[f"{block}.experts.{e}.{hf_names['gate']}.weight"] = gate.contiguous()
                out[f"{block}.experts.{e}.{hf_names['up']}.weight"] = up.contiguous()
        elif ours == "experts.weight2":
            for e, down in enumerate(tensor):
                out[f"{block}.experts.{e}.{hf_names['down']}.weight"] = down.contiguous()
        elif ours == "shared_experts.linear_fc1.weight":
            gate, up = tensor.chunk(2)
            out[f"{layer}.mlp.shared_expert.gate_proj.weight"] = gate.contiguous()
            out[f"{layer}.mlp.shared_expert.up_proj.weight"] = up.contiguous()
        elif ours == "shared_experts.linear_fc2.weight":
            out[f"{layer}.mlp.shared_expert.down_proj.weight"] = tensor.contiguous()
        elif ours == "shared_experts.gate_weight":
            out[f"{layer}.mlp.shared_expert_gate.weight"] = tensor.contiguous()
    return out


def _family(name: str, model_type: str, config_from_hf, hf_names: dict, needs: str, misfits,
            hf_config) -> HFFamily:
    return HFFamily(
        name=name, model_types=(model_type,), model="gpt", config_from_hf=config_from_hf,
        hf_to_global=lambda tensors, config: hf_to_global(tensors, config, hf_names, model_type),
        parameter_names=gpt.gpt_parameter_names, placement=placement, stage_of=stage_of, export_needs=needs,
        export_misfits=misfits, global_to_hf=lambda tensors, config: global_to_hf(tensors, config, hf_names),
        hf_config=hf_config, compare=gpt.compare,
    )


MIXTRAL = _family("Mixtral", "mixtral", mixtral_config, MIXTRAL_NAMES,
                  "Llama's layers with an MoE MLP in each (softmax routing over the chosen k, no shared expert)",
                  mixtral_misfits, mixtral_hf_config)
QWEN2_MOE = _family("Qwen2-MoE", "qwen2_moe", qwen2_moe_config, QWEN2_MOE_NAMES,
                    "Llama's layers (qkv biases allowed) with MoE MLPs and a gated shared expert",
                    qwen2_moe_misfits, qwen2_moe_hf_config)
