"""The FLOP model equals a hand expansion and a count of every GEMM a GPT actually runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megalith.training.flops import gpt_flops_per_iteration, tflops_per_device


def test_hand_expansion_of_one_configuration():
    # b=2, s=8, L=3, h=16, ffn=64, n=4 heads, g=2 groups, d=4, V=100, GELU:
    # 12*b*s*L*h^2 = 12*2*8*3*256 = 147456
    # attention (1 + 2/4 + 8/16) * (4*4/16) = 2; MLP 64/16 = 4; logits 100/(2*3*16) = 100/96
    # 147456 * 6 = 884736, 147456 * 100/96 = 153600 -> 1038336
    flops = gpt_flops_per_iteration(
        batch_size=2, seq_length=8, num_layers=3, hidden_size=16, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=4, padded_vocab_size=100, swiglu=False,
    )
    assert flops == pytest.approx(1038336, rel=1e-12)
    with_swiglu = gpt_flops_per_iteration(
        batch_size=2, seq_length=8, num_layers=3, hidden_size=16, ffn_hidden_size=64, num_attention_heads=4,
        num_query_groups=2, kv_channels=4, padded_vocab_size=100, swiglu=True,
    )
    assert with_swiglu - flops == pytest.approx(147456 * 4 * 0.5, rel=1e-12)  # MLP term 4 -> 6


CONFIGS = [
    # b, s, L, h, ffn, n, g, d, V, swiglu
    (2, 8, 3, 16, 64, 4, 2, 4, 100, False),
    (1, 16, 2, 32, 48, 4, 4, 8, 64, False),
    (3, 12, 1, 24, 40, 6, 3, 5, 50, True),  # n*d = 30 != h
    (2, 5, 2, 8, 16, 2, 1, 4, 7, True),
]


def _gemm_count(b, s, L, h, ffn, n, g, d, V, swiglu):
    """2*m*n*k for every forward GEMM of the GPT, summed, times 3 for forward + backward."""
    tokens = b * s
    per_layer = [
        (tokens, (n + 2 * g) * d, h),  # fused QKV projection
        *[(s, s, d)] * (b * n),  # Q K^T for every sequence and head
        *[(s, d, s)] * (b * n),  # probabilities x V
        (tokens, h, n * d),  # output projection
        (tokens, ffn * (2 if swiglu else 1), h),  # fc1 (gate and up with SwiGLU)
        (tokens, h, ffn),  # fc2
    ]
    logits = (tokens, V, h)
    forward = L * sum(2 * m * nn * k for m, nn, k in per_layer) + 2 * logits[0] * logits[1] * logits[2]
    return 3 * forward


@pytest.mark.parametrize("config", CONFIGS)
def test_equals_a_count_of_gemm_shapes(config):
    b, s, L, h, ffn, n, g, d, V, swiglu = config
    flops = gpt_flops_per_iteration(
        batch_size=b, seq_length=s, num_layers=L, hidden_size=h, ffn_hidden_size=ffn, num_attention_heads=n,
        num_query_groups=g, kv_channels=d, padded_vocab_size=V, swiglu=swiglu,
    )
    assert flops == pytest.approx(_gemm_count(*config), rel=1e-12)


def _tiny_gpt_step(b, s, L, h, ffn, n, g, d, V, swiglu):
    """Forward and backward of a GPT with explicit attention matmuls (so torch's counter sees them)."""
    torch.manual_seed(0)

    def weight(*shape):
        return (torch.randn(*shape) * 0.02).requires_grad_()

    embedding = weight(V, h)
    layers = [
        dict(qkv=weight((n + 2 * g) * d, h), out=weight(h, n * d),
             fc1=weight(ffn * (2 if swiglu else 1), h), fc2=weight(h, ffn))
        for _ in range(L)
    ]
    ids = torch.randint(0, V, (b, s))
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)
    x = embedding[ids]  # [b, s, h]
    for p in layers:
        q, k, v = F.linear(x, p["qkv"]).split([n * d, g * d, g * d], dim=-1)
        q = q.view(b, s, n, d).transpose(1, 2)
        k = k.view(b, s, g, d).transpose(1, 2).repeat_interleave(n // g, dim=1)
        v = v.view(b, s, g, d).transpose(1, 2).repeat_interleave(n // g, dim=1)
        scores = (q @ k.transpose(-1, -2)) / d**0.5
        probs = scores.masked_fill(mask, float("-inf")).softmax(-1)
        context = (probs @ v).transpose(1, 2).reshape(b, s, n * d)
        x = x + F.linear(context, p["out"])
        y = F.linear(F.layer_norm(x, (h,)), p["fc1"])
        if swiglu:
            gate, up = y.chunk(2, dim=-1)
            y = F.silu(gate) * up
        else:
            y = F.gelu(y)
        x = x + F.linear(y, p["fc2"])
    logits = x @ embedding.t()
    F.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()


@pytest.mark.parametrize("config", CONFIGS)
def test_equals_what_torch_counts_for_a_training_step(config):
    b, s, L, h, ffn, n, g, d, V, swiglu = config
    with FlopCounterMode(display=False) as counter:
        _tiny_gpt_step(*config)
    flops = gpt_flops_per_iteration(
        batch_size=b, seq_length=s, num_layers=L, hidden_size=h, ffn_hidden_size=ffn, num_attention_heads=n,
        num_query_groups=g, kv_channels=d, padded_vocab_size=V, swiglu=swiglu,
    )
    assert flops == pytest.approx(counter.get_total_flops(), rel=1e-12)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="FLOP model needs positive sizes, got hidden_size=0"):
        gpt_flops_per_iteration(
            batch_size=1, seq_length=8, num_layers=1, hidden_size=0, ffn_hidden_size=4, num_attention_heads=1,
            num_query_groups=1, kv_channels=4, padded_vocab_size=8, swiglu=False,
        )


def test_tflops_per_device():
    assert tflops_per_device(3e15, 2.0, 4) == pytest.approx(375.0)
    assert tflops_per_device(1e12, 1.0, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="iteration time must be positive"):
        tflops_per_device(1e12, 0.0, 1)
    with pytest.raises(ValueError, match="world size must be positive"):
        tflops_per_device(1e12, 1.0, 0)


@pytest.mark.parametrize("encoders, decoders, swiglu", [(2, 1, False), (1, 2, True)])
def test_t5_model_equals_what_torch_counts_for_megaliths_t5(encoders, decoders, swiglu):
    """The T5 FLOP model against a count of the GEMMs megalith's own T5Model runs (explicit
    attention matmuls) in a forward and backward."""
    from megalith.config import ModelConfig
    from megalith.models.registry import BUILTIN_MODELS, t5_batch
    from megalith.models.t5 import T5Model
    from megalith.parallel.layers import padded_vocab_size
    from megalith.training.flops import model_flops_per_iteration

    spec = BUILTIN_MODELS["t5"]
    changes = dict(encoder_num_layers=encoders, decoder_num_layers=decoders, hidden_size=32, ffn_hidden_size=48,
                   num_attention_heads=4, kv_channels=6, seq_length=16, decoder_seq_length=8,
                   attention_backend="unfused", swiglu=swiglu)
    if swiglu:
        changes["activation"] = "gelu"
    config = spec.resolved(ModelConfig(**{**spec.defaults, **changes}))
    model = T5Model(config)
    batch = t5_batch(config, 3, torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        loss = model(batch["encoder_input_ids"], batch["decoder_input_ids"], batch["labels"],
                     batch["encoder_padding_mask"], batch["decoder_padding_mask"])
        loss.sum().backward()
    expected = model_flops_per_iteration(config, 3, padded_vocab_size(config.vocab_size, 1))
    assert expected == pytest.approx(counter.get_total_flops(), rel=1e-12)
