"""The MoE flags' own rules (one line each, checked when the ModelConfig is built, before any group) and
which layers are MoE (--moe-layer-freq)."""

from __future__ import annotations

import math

from megalith.errors import ConfigError


def moe_layer_pattern(config) -> tuple[bool, ...]:
    """One entry per layer, True where the MLP is an MoE: every Nth layer from layer 0 for an int N (as
    Megatron), or the 0/1 list given; all False without --num-experts."""
    if config.num_experts is None:
        return (False,) * config.num_layers
    text = str(config.moe_layer_freq).strip()
    if text.lstrip("-").isdigit():
        every = int(text)
        if every < 1:
            raise ConfigError(f"--moe-layer-freq {text} must be a positive integer or a 0/1 list")
        return tuple(index % every == 0 for index in range(config.num_layers))
    words = text.strip("[]").replace(",", " ").split()
    if not words or any(word not in ("0", "1") for word in words):
        raise ConfigError(f"--moe-layer-freq {text!r} is neither a positive integer nor a 0/1 list like [1,0,1,0]")
    if len(words) != config.num_layers:
        raise ConfigError(f"--moe-layer-freq has {len(words)} entries but the model has {config.num_layers} layers; "
                          "give one 0/1 entry per layer")
    return tuple(word == "1" for word in words)


def expert_capacity(tokens: int, num_experts: int, topk: int, factor: float) -> int:
    """Megatron's capacity: ceil(tokens x topk / experts x factor) token slots per expert."""
    return math.ceil(tokens * topk / num_experts * factor)


def check_moe(config) -> None:
    """Refuse contradictory MoE flags in one line (a config with --num-experts)."""
    experts, topk = config.num_experts, config.moe_router_topk
    if experts < 1:
        raise ConfigError(f"--num-experts {experts} must be positive (or 0 for a dense model)")
    if not 1 <= topk <= experts:
        raise ConfigError(f"--moe-router-topk {topk} must be between 1 and --num-experts {experts}")
    moe_layer_pattern(config)
    for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
        value = getattr(config, name)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"--{name.replace('_', '-')} {value} must be a positive integer")
    if config.moe_shared_expert_gate and config.moe_shared_expert_intermediate_size is None:
        raise ConfigError("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size (the shared expert "
                          "it gates)")
    if config.moe_aux_loss_coeff < 0 or (config.moe_z_loss_coeff or 0.0) < 0:
        raise ConfigError("--moe-aux-loss-coeff and --moe-z-loss-coeff must not be negative")
    if config.moe_router_topk_scaling_factor is not None and config.moe_router_topk_scaling_factor <= 0:
        raise ConfigError(f"--moe-router-topk-scaling-factor {config.moe_router_topk_scaling_factor} must be positive")
    if config.moe_router_enable_expert_bias and config.moe_router_score_function != "sigmoid":
        raise ConfigError("--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (as Megatron)")
    if config.moe_router_bias_update_rate < 0:
        raise ConfigError(f"--moe-router-bias-update-rate {config.moe_router_bias_update_rate} must not be negative")
    factor = config.moe_expert_capacity_factor
    if factor is not None:
        if factor <= 0:
            raise ConfigError(f"--moe-expert-capacity-factor {factor} must be positive (leave it out: dropless)")
        if config.moe_token_dispatcher_type != "alltoall":
            raise ConfigError("--moe-expert-capacity-factor needs --moe-token-dispatcher-type alltoall (as Megatron: "
                              f"the {config.moe_token_dispatcher_type} dispatcher is dropless)")
    elif config.moe_pad_expert_input_to_capacity:
        raise ConfigError("--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
