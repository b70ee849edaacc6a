"""Megatron's model options (issue 16) change the model as Megatron's do, in every layout.

--group-query-attention, --apply-layernorm-1p, --qk-layernorm, --rotary-percent,
--no-position-embedding, --init-method-xavier-uniform, --attention-backend and
--transformer-impl: each against a direct computation or the plain-PyTorch GPT, then a GPT and
a BERT with the options together under tp (with and without SP) and pp against one process.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megalith.config import ModelConfig, parse_layout
from megalith.config.model import megatron_flag_rules
from megalith.convert.mapping import ConvertError, plain_norm_weights
from megalith.errors import ConfigError
from megalith.models.bert import BertModel
from megalith.models.gpt import GPTModel
from megalith.models.norms import ZeroCentredLayerNorm, ZeroCentredRMSNorm
from megalith.models.plain_gpt import PlainGPT, load_megalith_state_dict
from megalith.models.registry import BUILTIN_MODELS
from megalith.models.t5 import T5Model, resolve_t5_config
from megalith.models.transformer import apply_rotary, rotary_cos_sin

SMALL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=128,
             hidden_dropout=0.0, attention_dropout=0.0)


def small(**overrides) -> ModelConfig:
    return ModelConfig(**(SMALL | overrides))


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert text and "\n" not in text, text
    return text


def batch(config: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size, (2, config.seq_length), generator=generator)
    return ids, torch.randint(config.vocab_size, (2, config.seq_length), generator=generator)


# --- --group-query-attention ------------------------------------------------------------------


def test_without_the_gqa_flag_megatron_ignores_num_query_groups():
    config, notices = megatron_flag_rules(small(num_attention_heads=8, num_query_groups=2))
    assert config.num_query_groups == 8
    assert len(notices) == 1 and "--group-query-attention" in notices[0] and "\n" not in notices[0]
    config, notices = megatron_flag_rules(small(num_attention_heads=8, num_query_groups=2, group_query_attention=True))
    assert config.num_query_groups == 2 and notices == []
    assert megatron_flag_rules(small())[1] == []  # nothing given: nothing to say


def test_group_query_attention_defaults_to_one_group_as_megatron():
    assert small(group_query_attention=True).num_query_groups == 1  # Megatron's --num-query-groups default
    assert small().num_query_groups == 4
    assert small(num_query_groups=2).num_query_groups == 2  # programmatic configs are honoured as given
    qkv = GPTModel(small(group_query_attention=True)).decoder.layers["0"].self_attention.linear_qkv.weight
    assert qkv.shape[0] == (4 + 2 * 1) * 8


# --- --attention-backend, --transformer-impl ----------------------------------------------------


def test_fused_backend_named_runs_sdpa_with_one_notice_on_cpu():
    config = small(attention_backend="fused")
    assert config.attention_path == "sdpa"
    notices = megatron_flag_rules(config)[1]
    assert len(notices) == 1 and notices[0].startswith("--attention-backend fused: torch SDPA")
    for name in ("auto", "sdpa", "unfused", "local"):
        assert megatron_flag_rules(small(attention_backend=name, attention_dropout=0.0))[1] == []


def test_transformer_engine_is_refused_in_one_line():
    config = small(transformer_impl="transformer_engine")  # a valid config: the device decides, at the seam
    with pytest.raises(ConfigError) as error:
        megatron_flag_rules(config)
    assert "Transformer Engine on CUDA" in one_line(error) and "--transformer-impl local" in str(error.value)
    with pytest.raises(ConfigError):
        GPTModel(config)
    assert small(transformer_impl="local").transformer_impl == "local"


# --- --rotary-percent -----------------------------------------------------------------------------


def test_rotary_percent_rotates_the_first_channels_only():
    s, b, n, d, base = 6, 2, 3, 16, 10000
    x = torch.randn(s, b, n, d, generator=torch.Generator().manual_seed(0))
    r = small(position_embedding_type="rope", hidden_size=64, rotary_percent=0.5).rotary_dim
    assert r == 8
    out = apply_rotary(x, *rotary_cos_sin(s, r, base))
    assert torch.equal(out[..., r:], x[..., r:])  # the second half of each head passes through
    # direct: channel pairs (i, i + r/2) turn by position * base^(-2i/r)
    half = r // 2
    angle = torch.arange(s)[:, None] * base ** (-torch.arange(half) * 2.0 / r)  # [s, r/2]
    cos, sin = angle.cos()[:, None, None, :], angle.sin()[:, None, None, :]
    x1, x2 = x[..., :half], x[..., half:r]
    expected = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    torch.testing.assert_close(out[..., :r], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("percent", [0.1875, 0.0, 1.5])
def test_rotary_percent_without_an_even_count_is_refused(percent):
    with pytest.raises(ConfigError) as error:
        small(position_embedding_type="rope", hidden_size=64, rotary_percent=percent)  # kv_channels 16
    assert "--rotary-percent" in one_line(error)


# --- --apply-layernorm-1p -------------------------------------------------------------------------


@pytest.mark.parametrize("normalization, kind", [("LayerNorm", ZeroCentredLayerNorm), ("RMSNorm", ZeroCentredRMSNorm)])
def test_layernorm_1p_starts_at_zero_and_equals_the_plain_norm(normalization, kind):
    config = small(normalization=normalization, qk_layernorm=True)
    plain, centred = GPTModel(config, init_seed=5), GPTModel(replace(config, apply_layernorm_1p=True), init_seed=5)
    norms = [m for m in centred.modules() if isinstance(m, kind)]
    assert len(norms) == 2 * 4 + 1  # per layer: input, pre-MLP, q, k; the final norm
    assert all(torch.count_nonzero(norm.weight) == 0 for norm in norms)
    ids, labels = batch(config)
    assert torch.equal(plain(ids, labels), centred(ids, labels))  # 1 + 0 is exactly 1
    with torch.no_grad():  # stored weight w means gamma = 1 + w
        for (name, p), (_, q) in zip(plain.named_parameters(), centred.named_parameters()):
            update = 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name)))
            p.add_(update)
            q.add_(update)
    torch.testing.assert_close(plain(ids, labels), centred(ids, labels), rtol=1e-5, atol=1e-6)


def test_layernorm_1p_exports_gamma_as_hugging_face_stores_it():
    config = small(apply_layernorm_1p=True)
    tensors = {"decoder.layers.0.input_layernorm.weight": torch.zeros(3),
               "decoder.layers.0.input_layernorm.bias": torch.zeros(3), "embedding.word_embeddings.weight": torch.zeros(3)}
    plain = plain_norm_weights(tensors, config)
    assert plain["decoder.layers.0.input_layernorm.weight"].tolist() == [1.0, 1.0, 1.0]
    assert plain["decoder.layers.0.input_layernorm.bias"].tolist() == [0.0] * 3
    assert plain["embedding.word_embeddings.weight"].tolist() == [0.0] * 3
    assert plain_norm_weights(tensors, small()) is tensors


# --- --no-position-embedding, --qk-layernorm, --init-method-xavier-uniform -------------------------


def test_no_position_embedding_has_no_position_table():
    for build, config in ((GPTModel, small(position_embedding=False)),
                          (BertModel, small(position_embedding=False, num_tokentypes=2))):
        names = [name for name, _ in build(config).named_parameters()]
        assert not any("position_embeddings" in name for name in names), names
    assert any("position_embeddings" in n for n, _ in GPTModel(small()).named_parameters())
    small(position_embedding=False, seq_length=64, max_position_embeddings=16)  # no table, no bound


def test_qk_layernorm_is_a_norm_per_head_before_rotary():
    config = small(qk_layernorm=True, normalization="RMSNorm", position_embedding_type="rope", hidden_size=64)
    attention = GPTModel(config).decoder.layers["1"].self_attention
    assert attention.q_layernorm.weight.shape == attention.k_layernorm.weight.shape == (config.kv_channels,)
    with pytest.raises(ConfigError) as error:
        T5Model(resolve_t5_config(replace(small(qk_layernorm=True, position_embedding_type="relative",
                                                activation="relu"))))
    assert "--qk-layernorm" in one_line(error)


def test_xavier_uniform_draws_every_weight_with_variance_two_over_fans():
    config = small(hidden_size=64, init_method_xavier_uniform=True, untie_embeddings_and_output_weights=True)
    model = GPTModel(config)
    weights = {name: p for name, p in model.named_parameters() if p.dim() == 2}
    assert len(weights) == 3 + 4 * config.num_layers  # word, position, output; qkv, proj, fc1, fc2
    for name, weight in weights.items():
        rows = config.vocab_size if "word_embeddings" in name or "output_layer" in name else weight.shape[0]
        fan_out, fan_in = rows, weight.shape[1]
        weight = weight.detach()[:rows]
        bound = (6.0 / (fan_in + fan_out)) ** 0.5
        assert weight.abs().max() <= bound, name
        variance = weight.var().item()
        # the sample variance of U(-a, a) has relative std sqrt(0.8 / n)
        assert abs(variance / (2.0 / (fan_in + fan_out)) - 1) < 6 * (0.8 / weight.numel()) ** 0.5, name
    normal = dict(GPTModel(replace(config, init_method_xavier_uniform=False)).named_parameters())
    assert normal["decoder.layers.0.self_attention.linear_qkv.weight"].std().item() == pytest.approx(0.02, rel=0.05)


# --- together, against the plain GPT and across layouts ---------------------------------------------

OPTIONS = dict(qk_layernorm=True, position_embedding_type="rope", rotary_percent=0.5, apply_layernorm_1p=True,
               init_method_xavier_uniform=True)


@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_options_together_match_the_plain_gpt(normalization):
    config = small(hidden_size=64, normalization=normalization, **OPTIONS)
    model = GPTModel(config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # norms and biases away from their initial values, so a misplaced one shows
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    plain = PlainGPT(config)
    load_megalith_state_dict(plain, model.state_dict())
    ids, labels = batch(config)
    ours, theirs = model(ids, labels), plain(ids, labels)
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-5
    ours.mean().backward()
    theirs.mean().backward()
    grad = model.decoder.layers["0"].self_attention.q_layernorm.weight.grad
    torch.testing.assert_close(grad, plain.layers[0].attn.q_norm.weight.grad, rtol=1e-4, atol=1e-7)


def test_conversion_refuses_what_hugging_face_cannot_express():
    from megalith.convert.gpt import gpt2_misfits, llama_misfits

    llama = small(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, disable_bias_linear=True)
    assert llama_misfits(llama) == []
    assert llama_misfits(replace(llama, qk_layernorm=True)) == ["--qk-layernorm"]
    assert "--rotary-percent 0.5" in llama_misfits(replace(llama, rotary_percent=0.5))[0]
    assert llama_misfits(replace(llama, apply_layernorm_1p=True)) == []  # mapped: gamma = 1 + weight
    assert "no position table" in gpt2_misfits(small(position_embedding=False))[0]
    assert issubclass(ConvertError, ConfigError)


EXACT_LAYOUTS = ["tp2", "tp2.sp", "pp2", "tp2.pp2.sp"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_options_under_tp_sp_and_pp_equal_one_process(rank_pools, model):
    from megalith.verify import VerifySettings, run_verify

    base = ModelConfig(**BUILTIN_MODELS[model].defaults)
    # RMSNorm for both: the gradient of a LayerNorm bias on the keys is zero by mathematics wherever
    # no rotary turns it (adding one vector to every key shifts a softmax row by a constant: BERT
    # without rotary, and the unrotated half of each head under --rotary-percent 0.5), so its relative
    # error, and Adam's step on it, would compare rounding noise (it measured 1.1e-5 on one machine).
    # test_options_together_match_the_plain_gpt covers LayerNorm with these options in one process.
    options = (dict(OPTIONS, normalization="RMSNorm") if model == "gpt" else
               dict(qk_layernorm=True, apply_layernorm_1p=True, position_embedding=False,
                    init_method_xavier_uniform=True, normalization="RMSNorm"))
    config = replace(base, hidden_dropout=0.0, attention_dropout=0.0, **options)
    layouts = EXACT_LAYOUTS if model == "gpt" else ["tp2", "tp2.sp.pp2"]
    results = run_verify(VerifySettings(model, config, steps=2), [parse_layout(t) for t in layouts], pool=rank_pools(4))
    for result in results:
        assert result.passed, result


def test_layernorm_1p_model_exports_to_hugging_face_with_the_same_logits(tmp_path):
    pytest.importorskip("transformers")
    from megalith.config import Layout
    from megalith.convert.command import check_logits, megalith_to_hf, write_checkpoint
    from megalith.convert.gpt import GPT2
    from megalith.models.gpt import PADDED_VOCAB_PARAMETERS

    config = small(apply_layernorm_1p=True, num_layers=1)
    model = GPTModel(config)
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    tensors = {n: p.detach()[: config.vocab_size] if n.endswith(PADDED_VOCAB_PARAMETERS) else p.detach()
               for n, p in model.named_parameters()}
    ckpt, hf = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    write_checkpoint(tensors, config, ckpt, Layout(), GPT2)
    megalith_to_hf(ckpt, hf)
    assert check_logits(hf, ckpt) < 1e-5
