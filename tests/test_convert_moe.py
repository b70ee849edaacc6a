"""megalith convert for Mixtral and Qwen2-MoE (issue 21, item 5): tiny random HF models built from configs (no
download) to megalith checkpoints and back, bit for bit, with logits within fp32 1e-5; the gated shared expert
(--moe-shared-expert-gate) against its formula; one-line refusals."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from megalith.config import ModelConfig  # noqa: E402
from megalith.convert.command import (  # noqa: E402
    CHECK_TOLERANCE, check_logits, hf_to_megalith, megalith_to_hf, open_checkpoint, read_global_tensors,
)
from megalith.convert.families import family_for_hf, family_for_model  # noqa: E402
from megalith.convert.gpt import gpt_parameter_names  # noqa: E402
from megalith.convert.mapping import ConvertError, placement  # noqa: E402
from megalith.errors import ConfigError  # noqa: E402
from megalith.models.gpt import GPTModel  # noqa: E402
from megalith.models.moe import MoELayer  # noqa: E402
from megalith.models.moe.shared import GatedSharedExpert  # noqa: E402
from megalith.models.parallel_context import ParallelContext  # noqa: E402
from megalith.models.transformer import MLP  # noqa: E402
from megalith.parallel.layers import normal_init  # noqa: E402
from test_hf_convert import (  # noqa: E402
    _edit_config, _export_gives_back_the_same_tensors, _one_line, _perturb, _run,
)

SMALL = dict(vocab_size=100, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


def _save(model, path: str) -> str:
    _perturb(model, 3)  # norms at 1 and a zero-initialised router would hide a misplaced tensor
    model.save_pretrained(path)
    return path


def _mixtral(root, name: str = "mixtral", **overrides) -> str:
    config = SMALL | dict(intermediate_size=48, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2)
    return _save(transformers.MixtralForCausalLM(transformers.MixtralConfig(**config | overrides)), str(root / name))


def _qwen2_moe(root, name: str = "qwen2_moe", **overrides) -> str:
    config = SMALL | dict(intermediate_size=48, moe_intermediate_size=32, shared_expert_intermediate_size=40,
                          num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[1])
    return _save(transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**config | overrides)),
                 str(root / name))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_moe")
    return {"mixtral": _mixtral(root), "qwen2_moe": _qwen2_moe(root),
            # renormalised top-k, every second layer MoE, top-1, tied embeddings
            "qwen2_moe-norm": _qwen2_moe(root, "qwen2_moe-norm", norm_topk_prob=True, decoder_sparse_step=2,
                                         mlp_only_layers=[], num_hidden_layers=4, num_experts_per_tok=1,
                                         tie_word_embeddings=True)}


def _config(path: str) -> ModelConfig:
    hf = json.load(open(os.path.join(path, "config.json")))
    return family_for_hf(hf).config_from_hf(hf, ())


# --- configs and the placement table -----------------------------------------------------------


def test_configs_follow_the_hf_models(models):
    mixtral = _config(models["mixtral"])
    assert (mixtral.num_experts, mixtral.moe_router_topk, mixtral.moe_layer_freq, mixtral.moe_ffn_hidden_size) == \
        (4, 2, "1", 48)
    assert (mixtral.moe_router_pre_softmax, mixtral.moe_shared_expert_intermediate_size, mixtral.add_qkv_bias) == \
        (False, None, False)
    assert (mixtral.num_query_groups, mixtral.swiglu, mixtral.normalization, mixtral.rotary_base) == \
        (2, True, "RMSNorm", 1_000_000)
    qwen = _config(models["qwen2_moe"])
    assert (qwen.moe_layer_freq, qwen.ffn_hidden_size, qwen.moe_ffn_hidden_size) == ("[1,0,1]", 48, 32)
    assert (qwen.moe_shared_expert_intermediate_size, qwen.moe_shared_expert_gate, qwen.add_qkv_bias) == \
        (40, True, True)
    assert qwen.moe_router_pre_softmax  # norm_topk_prob false: top-k of the softmax over all experts
    normed = _config(models["qwen2_moe-norm"])
    assert (normed.moe_layer_freq, normed.moe_router_pre_softmax, normed.moe_router_topk) == ("[0,1,0,1]", False, 1)
    assert qwen.moe_aux_loss_coeff == mixtral.moe_aux_loss_coeff == 0.001  # router_aux_loss_coef


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_placement_table_matches_megalith_layers(models, kind):
    """The pure names and splits used to write shards are GPTModel's own parameters and attributes."""
    config = _config(models[kind])
    params = dict(GPTModel(config).named_parameters())
    assert list(params) == gpt_parameter_names(config)
    assert any(".mlp.experts.weight1" in name for name in params)
    for name, param in params.items():
        where = placement(name, config)
        assert where.dim == getattr(param, "tensor_parallel_dim", None), name
        assert where.stride == getattr(param, "tensor_parallel_stride", 1), name


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, tp, pp", [("mixtral", 2, 2), ("qwen2_moe", 2, 1), ("qwen2_moe-norm", 1, 2)])
def test_round_trip_is_exact_and_logits_match(models, tmp_path, kind, tp, pp):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    hf_to_megalith(models[kind], ckpt, tp, pp)
    assert check_logits(models[kind], ckpt) < CHECK_TOLERANCE
    _export_gives_back_the_same_tensors(models[kind], ckpt, back)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(back)
    assert type(loaded).__name__ == ("MixtralForCausalLM" if kind == "mixtral" else "Qwen2MoeForCausalLM")
    assert check_logits(back, ckpt) < CHECK_TOLERANCE
    assert _config(back) == _config(models[kind])


def test_fused_expert_tensors_are_read_too(models, tmp_path):
    """transformers 5's in-memory names (experts.gate_up_proj [E, 2F, h], experts.down_proj) give the same
    checkpoint as the per-expert files save_pretrained writes."""
    model = transformers.AutoModelForCausalLM.from_pretrained(models["mixtral"])
    state = model.state_dict()
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    fused = tmp_path / "fused"
    fused.mkdir()
    (fused / "config.json").write_text(open(os.path.join(models["mixtral"], "config.json")).read())
    save_file({key: value.contiguous() for key, value in state.items()}, str(fused / "model.safetensors"))
    hf_to_megalith(models["mixtral"], str(tmp_path / "a"))
    hf_to_megalith(str(fused), str(tmp_path / "b"))
    first, second = (read_global_tensors(open_checkpoint(str(tmp_path / n))[0]) for n in "ab")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_check_sees_the_wrong_routing_normalisation(models, tmp_path):
    """Negative control: the same weights read with norm_topk_prob flipped fail --check."""
    ckpt = str(tmp_path / "ckpt")
    hf_to_megalith(_edit_config(models["qwen2_moe"], tmp_path / "flipped", norm_topk_prob=True), ckpt)
    assert check_logits(models["qwen2_moe"], ckpt) > 1e-3


def test_command_line_both_directions_with_check(models, tmp_path, capsys):
    ckpt, back = str(tmp_path / "ckpt"), str(tmp_path / "back")
    assert _run(["--from", "hf", "--input", models["qwen2_moe"], "--output", ckpt, "--tensor-model-parallel-size",
                 "2", "--check"]) == 0
    assert _run(["--to", "hf", "--input", ckpt, "--output", back, "--check"]) == 0
    out = capsys.readouterr().out
    assert "(Qwen2-MoE)" in out and "Qwen2MoeForCausalLM" in out
    checks = [line for line in out.splitlines() if line.startswith("check:")]
    assert len(checks) == 2 and all(line.endswith("ok") for line in checks), checks


# --- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, changes, fragment", [
    ("mixtral", {"sliding_window": 16}, "sliding_window 16"),
    ("mixtral", {"router_jitter_noise": 0.1}, "router_jitter_noise 0.1"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window 16"),
    ("qwen2_moe", {"num_experts": 0}, "num_experts 0"),
    ("qwen2_moe", {"mlp_only_layers": []}, "has no tensor 'model.layers.1.mlp.gate.weight'"),
    ("qwen2_moe", {"num_experts": 3}, "has tensors megalith's qwen2_moe has no place for"),
])
def test_unsupported_hf_models_are_one_line(models, tmp_path, kind, changes, fragment):
    with pytest.raises(ConfigError) as error:
        hf_to_megalith(_edit_config(models[kind], tmp_path / "edited", **changes), str(tmp_path / "out"))
    assert fragment in _one_line(error)
    assert not os.path.exists(tmp_path / "out")


def test_export_picks_the_family_and_refuses_what_fits_none():
    moe = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=100,
                      normalization="RMSNorm", position_embedding_type="rope", swiglu=True, disable_bias_linear=True,
                      num_experts=4)
    assert family_for_model("gpt", moe).name == "Mixtral"  # not Llama: an MoE model is no Llama
    gated = replace(moe, moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, add_qkv_bias=True)
    assert family_for_model("gpt", gated).name == "Qwen2-MoE"
    with pytest.raises(ConvertError) as error:
        family_for_model("gpt", replace(moe, moe_router_score_function="sigmoid"))
    text = _one_line(error)
    assert "Mixtral needs" in text and "sigmoid routing" in text and "Llama needs" in text and "MoE layers" in text


# --- the gated shared expert ------------------------------------------------------------------


SHARED = ModelConfig(num_layers=2, hidden_size=16, num_attention_heads=2, ffn_hidden_size=32, seq_length=8,
                     vocab_size=64, hidden_dropout=0.0, attention_dropout=0.0, num_experts=4, swiglu=True,
                     moe_shared_expert_intermediate_size=24)


def _layer(config: ModelConfig) -> MoELayer:
    init = normal_init(0.2, torch.Generator().manual_seed(0))
    return MoELayer(config, ParallelContext(), init, init, shared_mlp=MLP)


def test_the_gated_shared_expert_is_its_formula_and_the_ungated_one_is_unchanged():
    plain = _layer(SHARED)
    assert type(plain.shared_experts) is MLP  # without the flag: the dense MLP, as before
    gated = _layer(replace(SHARED, moe_shared_expert_gate=True))
    assert isinstance(gated.shared_experts, GatedSharedExpert)
    names = [name for name, _ in gated.named_parameters()]
    assert sorted(names) == sorted([name for name, _ in plain.named_parameters()] + ["shared_experts.gate_weight"])
    weights = dict(gated.named_parameters())
    for name, param in plain.named_parameters():
        assert torch.equal(param, weights[name]), name  # every weight drawn as before; the gate is drawn last
    x = torch.randn(8, 2, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    shared = gated.shared_experts
    expected = plain.shared_experts(x) * torch.sigmoid(x @ shared.gate_weight.t())
    assert torch.allclose(shared(x), expected, rtol=1e-6, atol=1e-7)
    shared(x).square().sum().backward()
    assert shared.gate_weight.grad is not None and shared.linear_fc1.weight.grad is not None


def test_the_gate_needs_a_shared_expert():
    with pytest.raises(ConfigError) as error:
        replace(SHARED, moe_shared_expert_intermediate_size=None, moe_shared_expert_gate=True)
    assert "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size" in _one_line(error)


@pytest.mark.slow
def test_the_gated_shared_expert_under_tp2_sp_equals_one_process(rank_pools):
    """The gate's weight is replicated and its gradient summed over tp under SP, as the router's."""
    from megalith.config import parse_layout
    from megalith.models.registry import BUILTIN_MODELS
    from megalith.verify import VerifySettings, run_verify

    config = replace(ModelConfig(**BUILTIN_MODELS["gpt"].defaults), num_layers=2, num_experts=4, moe_router_topk=2,
                     moe_shared_expert_intermediate_size=32, moe_shared_expert_gate=True, moe_layer_freq="[1,0]",
                     swiglu=True)
    (result,) = run_verify(VerifySettings("gpt", config, steps=2), [parse_layout("tp2.sp")], pool=rank_pools(2))
    assert result.passed, result
