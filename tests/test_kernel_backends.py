"""The kernel seam (megalith.kernel_choice): which implementation runs each piece, the one-line
refusals, and the models wired to the record. Transformer Engine and apex cannot run here, so
stand-in modules injected into sys.modules test the selection and the wiring."""

import contextlib
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import megalith_kernels.dispatch as dispatch
from megalith.config import ModelConfig
from megalith.config.arguments import build_pretrain_parser, resolve_pretrain_config
from megalith.config.model import megatron_flag_rules
from megalith.errors import ConfigError
from megalith.kernel_choice import KernelChoice, resolve_kernels
from megalith.models.gpt import GPTModel
from megalith.models.parallel_context import ParallelContext
from megalith.models.registry import BUILTIN_MODELS

GPT = BUILTIN_MODELS["gpt"].defaults
CUDA = torch.device("cuda")  # the seam only reads the device's type: no CUDA call is made


def gpt(**changes) -> ModelConfig:
    return ModelConfig(**{**GPT, "hidden_dropout": 0.0, "attention_dropout": 0.0, **changes})


def refusal(config, device="cpu") -> str:
    with pytest.raises(ConfigError) as error:
        resolve_kernels(config, device)
    text = str(error.value)
    assert text and "\n" not in text, text
    return text


# --- the record on a CPU --------------------------------------------------------------------------


def test_cpu_defaults_run_torch_only():
    choice = resolve_kernels(gpt())
    assert choice.plain and choice.attention == "sdpa" and choice.backend == "torch" and choice.linears == "local"
    assert megatron_flag_rules(gpt())[1] == []
    assert resolve_kernels(gpt(attention_backend="local")).attention == "unfused"


def test_triton_under_the_interpreter_selects_every_kernel():
    choice = resolve_kernels(gpt(kernel_backend="triton", swiglu=True, normalization="RMSNorm",
                                 position_embedding_type="rope", attention_backend="flash",
                                 cross_entropy_loss_fusion=True))
    assert (choice.backend, choice.norm, choice.attention, choice.rope, choice.activation) == (
        "triton", "triton", "flash", "kernels", "kernels")
    assert resolve_kernels(gpt(kernel_backend="triton", attention_backend="auto")).attention == "sdpa"  # CPU: SDPA
    off = resolve_kernels(gpt(kernel_backend="triton", swiglu=True, bias_swiglu_fusion=False, rope_fusion=False))
    assert (off.activation, off.rope) == ("torch", "torch")


def test_bias_gelu_fusion_needs_the_tanh_gelu():
    exact = resolve_kernels(gpt(kernel_backend="triton"))
    assert exact.activation == "torch" and any("tanh-approximate" in line for line in exact.notices)
    assert resolve_kernels(gpt(kernel_backend="triton", openai_gelu=True)).activation == "kernels"
    assert resolve_kernels(gpt(kernel_backend="triton", openai_gelu=True, bias_gelu_fusion=False)).activation == "torch"


def test_flash_on_cpu_with_auto_runs_the_reference_with_a_notice():
    choice = resolve_kernels(gpt(attention_backend="flash"))
    assert choice.attention == "flash" and choice.backend == "torch"
    assert any("PyTorch reference" in line for line in choice.notices)
    config, notices = megatron_flag_rules(gpt(attention_backend="flash"))
    assert notices[-1] == choice.describe()


def test_t5_self_attention_keeps_sdpa_under_flash():
    t5 = BUILTIN_MODELS["t5"]
    config = t5.resolved(ModelConfig(**{**t5.defaults, "attention_backend": "flash", "attention_dropout": 0.0}))
    choice = resolve_kernels(config)
    assert any("relative position bias" in line for line in choice.notices)
    assert choice.attention_for(has_bias=True) == "sdpa" and choice.attention_for(has_bias=False) == "flash"


def test_fusions_without_a_kernel_are_named_once():
    notices = resolve_kernels(gpt(bias_dropout_fusion=False, persist_layer_norm=False)).notices
    assert notices == ("--no-bias-dropout-fusion, --no-persist-layer-norm: megalith has no such fused kernel to turn "
                       "off; the same math runs",)


# --- one-line refusals ----------------------------------------------------------------------------


def test_triton_on_cpu_without_the_interpreter_is_one_line(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    text = refusal(gpt(kernel_backend="triton"))
    assert text.startswith("--kernel-backend triton:") and "TRITON_INTERPRET=1" in text


def test_triton_missing_is_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_installed", lambda: False)
    assert "pip install 'megalith[triton]'" in refusal(gpt(kernel_backend="triton"))
    assert resolve_kernels(gpt(), CUDA).backend == "torch"  # auto on CUDA without triton: the references


def test_transformer_engine_missing_is_one_line():
    text = refusal(gpt(transformer_impl="transformer_engine"))
    assert "Transformer Engine on CUDA" in text and "--transformer-impl local" in text
    assert "Transformer Engine" in refusal(gpt(transformer_impl="transformer_engine"), CUDA)  # not installed here


def test_fp8_needs_transformer_engine():
    assert "--fp8-format hybrid needs Transformer Engine" in refusal(gpt(fp8_format="hybrid"))
    assert "--fp8-format" in refusal(gpt(fp8_param_gather=True))


def test_flash_with_attention_dropout_is_one_line():
    text = refusal(gpt(attention_backend="flash", attention_dropout=0.1))
    assert "--attention-dropout 0" in text
    assert resolve_kernels(gpt(attention_dropout=0.1), CUDA).attention == "sdpa"  # auto picks what can run


def test_apex_missing_is_one_line():
    assert "apex" in refusal(gpt(kernel_backend="apex"), CUDA)
    assert "apex" in refusal(gpt(kernel_backend="apex"))


def test_cross_entropy_te_without_te_is_one_line():
    assert "--cross-entropy-fusion-impl te needs Transformer Engine" in refusal(
        gpt(cross_entropy_loss_fusion=True, cross_entropy_fusion_impl="te"))


def test_pretrain_refuses_before_any_process_group():
    parser = build_pretrain_parser()
    for words in (["--transformer-impl", "transformer_engine"], ["--fp8-format", "e4m3"], ["--kernel-backend", "apex"],
                  ["--attention-backend", "flash", "--attention-dropout", "0.1"]):
        with pytest.raises(ConfigError):
            resolve_pretrain_config(parser.parse_args(["--mock-data", *words]), world_size=1)


# --- stand-ins for apex and Transformer Engine ----------------------------------------------------


def fake_apex(monkeypatch):
    apex, normalization = types.ModuleType("apex"), types.ModuleType("apex.normalization")
    fused = types.ModuleType("apex.normalization.fused_layer_norm")
    fused.fused_layer_norm_affine = lambda x, w, b, shape, eps: F.layer_norm(x, shape, w, b, eps)
    fused.fused_rms_norm_affine = lambda x, w, shape, eps: F.rms_norm(x, shape, w, eps)
    for module in (apex, normalization, fused):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def test_apex_norms_on_cuda_with_auto(monkeypatch):
    fake_apex(monkeypatch)
    assert resolve_kernels(gpt(), CUDA).norm == "apex"
    assert resolve_kernels(gpt(kernel_backend="apex"), CUDA).norm == "apex"
    assert resolve_kernels(gpt(kernel_backend="torch"), CUDA).norm == "torch"
    assert resolve_kernels(gpt()).norm == "torch"  # never on a CPU


class _Linear(nn.Module):
    def __init__(self, in_size, out_size, *, bias, tp_size, return_bias, params_dtype, **_):
        super().__init__()
        assert tp_size == 1
        self.return_bias = return_bias
        self.weight = nn.Parameter(torch.empty(out_size, in_size, dtype=params_dtype))
        self.bias = nn.Parameter(torch.empty(out_size, dtype=params_dtype)) if bias else None

    def forward(self, x):
        if self.return_bias:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias)


class _LayerNorm(nn.LayerNorm):
    def __init__(self, size, *, eps, params_dtype, zero_centered_gamma, **_):
        assert not zero_centered_gamma
        super().__init__(size, eps=eps, dtype=params_dtype)


class _Attention(nn.Module):
    def __init__(self, heads, kv_channels, *, num_gqa_groups, qkv_format, softmax_scale, **_):
        super().__init__()
        assert qkv_format == "sbhd"
        self.scale = softmax_scale

    def forward(self, q, k, v, *, attention_mask, attn_mask_type):
        assert attention_mask is None and attn_mask_type == "causal"
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
        return out.permute(2, 0, 1, 3).flatten(2)


class _Recipe:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def fake_te(monkeypatch) -> types.ModuleType:
    root, pytorch = types.ModuleType("transformer_engine"), types.ModuleType("transformer_engine.pytorch")
    common, recipe = types.ModuleType("transformer_engine.common"), types.ModuleType("transformer_engine.common.recipe")
    pytorch.Linear, pytorch.LayerNorm, pytorch.RMSNorm, pytorch.DotProductAttention = (_Linear, _LayerNorm, None,
                                                                                       _Attention)
    pytorch.autocasts = []
    pytorch.fp8_autocast = lambda enabled, fp8_recipe: pytorch.autocasts.append(fp8_recipe) or contextlib.nullcontext()
    recipe.DelayedScaling, recipe.Format = _Recipe, types.SimpleNamespace(E4M3="E4M3", HYBRID="HYBRID")
    for module in (root, pytorch, common, recipe):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return pytorch


def test_transformer_engine_selection_and_fp8_recipe(monkeypatch):
    fake_te(monkeypatch)
    te = gpt(transformer_impl="transformer_engine")
    choice = resolve_kernels(te, CUDA)
    assert (choice.linears, choice.norm, choice.attention) == ("te", "te", "te")
    assert resolve_kernels(gpt(transformer_impl="transformer_engine", attention_backend="fused"), CUDA).attention == "te"
    assert resolve_kernels(gpt(transformer_impl="transformer_engine", attention_backend="local"), CUDA).attention == (
        "unfused")
    fp8 = resolve_kernels(gpt(transformer_impl="transformer_engine", fp8_format="hybrid", fp8_margin=1,
                              fp8_amax_history_len=1024, fp8_amax_compute_algo="max"), CUDA).fp8
    assert fp8.recipe().kwargs == {"margin": 1, "fp8_format": "HYBRID", "amax_history_len": 1024,
                                   "amax_compute_algo": "max"}
    with pytest.raises(ConfigError, match="needs Transformer Engine on CUDA with --transformer-impl"):
        resolve_kernels(gpt(fp8_format="e4m3"), CUDA)  # TE importable, but the layers are megalith's
    assert "Transformer Engine" in refusal(te)  # TE importable, but no CUDA


def test_transformer_engine_layers_keep_names_weights_and_loss(monkeypatch):
    """GPT built from the stand-in TE layers: the same parameter names and initial weights as the local
    layers, and the same loss; with fp8 the block runs inside fp8_autocast with the recipe."""
    pytorch = fake_te(monkeypatch)
    config = gpt(num_layers=1, transformer_impl="transformer_engine", fp8_format="e4m3")
    choice = resolve_kernels(config, CUDA)
    local = GPTModel(gpt(num_layers=1))
    with_te = GPTModel(config, ParallelContext(kernels=choice))
    assert isinstance(with_te.decoder.layers["0"].self_attention.linear_qkv, _Linear)
    assert isinstance(with_te.decoder.layers["0"].input_layernorm, _LayerNorm)
    assert dict(local.named_parameters()).keys() == dict(with_te.named_parameters()).keys()
    for (name, a), b in zip(local.named_parameters(), with_te.parameters()):
        assert torch.equal(a, b), name
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=torch.Generator().manual_seed(0))
    expected = local(tokens, tokens).mean()
    assert torch.allclose(with_te(tokens, tokens).mean(), expected, rtol=1e-5)
    assert len(pytorch.autocasts) == 1 and pytorch.autocasts[0].kwargs["fp8_format"] == "E4M3"


# --- the models on the record ---------------------------------------------------------------------


def test_kernel_norms_keep_torch_parameters_and_values():
    for normalization in ("LayerNorm", "RMSNorm"):
        for one_p in (False, True):
            config = gpt(normalization=normalization, apply_layernorm_1p=one_p, num_layers=1)
            local = GPTModel(config)
            kernels = GPTModel(config, ParallelContext(kernels=KernelChoice(norm="triton", backend="torch")))
            assert kernels.decoder.layers["0"].input_layernorm.kernel == "triton"
            assert [n for n, _ in local.named_parameters()] == [n for n, _ in kernels.named_parameters()]
            tokens = torch.arange(2 * config.seq_length).view(2, -1) % config.vocab_size
            torch.testing.assert_close(kernels(tokens, tokens), local(tokens, tokens), rtol=1e-6, atol=1e-6)


def test_every_reference_kernel_matches_the_local_model():
    """backend torch runs megalith_kernels' references through every kernel slot: the loss and the
    gradients equal the plain model's (fp32)."""
    config = gpt(num_layers=2, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                 num_query_groups=2)
    everything = KernelChoice(backend="torch", norm="triton", attention="flash", rope="kernels", activation="kernels")
    plain, fused = GPTModel(config), GPTModel(config, ParallelContext(kernels=everything))
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length), generator=torch.Generator().manual_seed(1))
    losses = [model(tokens, tokens).mean() for model in (plain, fused)]
    for loss in losses:
        loss.backward()
    assert abs(losses[0].item() - losses[1].item()) / losses[0].item() < 1e-5
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        assert (a.grad - b.grad).abs().max() <= 1e-5 * a.grad.abs().max(), name


def test_bias_gelu_kernel_slot_matches_tanh_gelu():
    config = gpt(num_layers=1, openai_gelu=True)
    plain = GPTModel(config)
    fused = GPTModel(config, ParallelContext(kernels=KernelChoice(backend="torch", activation="kernels")))
    assert fused.decoder.layers["0"].mlp.fused_bias_gelu
    tokens = torch.arange(2 * config.seq_length).view(2, -1) % config.vocab_size
    torch.testing.assert_close(fused(tokens, tokens), plain(tokens, tokens), rtol=1e-5, atol=1e-6)
