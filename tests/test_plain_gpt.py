"""megalith's GPTModel (tp=1) against an independent plain-PyTorch GPT loaded with its weights."""

from __future__ import annotations

import pytest
import torch

from megalith.config import ModelConfig
from megalith.models.gpt import GPTModel
from megalith.models.plain_gpt import PlainGPT, load_megalith_state_dict
from megalith.overhead import OverheadResult, format_overhead, measure_overhead

BATCH, SEQ = 2, 16

CONFIGS = {
    "layernorm-gelu-learned-bias": dict(hidden_size=32, num_attention_heads=4),
    "gqa": dict(hidden_size=32, num_attention_heads=4, num_query_groups=2),
    "swiglu-rmsnorm-rope-nobias": dict(
        hidden_size=64, num_attention_heads=4, num_query_groups=2, swiglu=True, normalization="RMSNorm",
        position_embedding_type="rope", disable_bias_linear=True,
    ),
    "rope-nobias-qkv-bias": dict(
        hidden_size=32, num_attention_heads=4, position_embedding_type="rope", disable_bias_linear=True,
        add_qkv_bias=True,
    ),
    "untied": dict(hidden_size=32, num_attention_heads=4, untie_embeddings_and_output_weights=True),
    "vocab-200": dict(hidden_size=32, num_attention_heads=4, vocab_size=200),
}


def _config(**overrides) -> ModelConfig:
    base = dict(num_layers=2, seq_length=SEQ, hidden_dropout=0.0, attention_dropout=0.0)
    return ModelConfig(**(base | overrides))


def _batch(config: ModelConfig, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(config.vocab_size, (BATCH, SEQ), generator=generator)
    labels = torch.randint(config.vocab_size, (BATCH, SEQ), generator=generator)
    return ids, labels


def _perturb(model: torch.nn.Module, seed: int = 2) -> None:
    """Make norms and biases non-trivial (they start at 1 and 0), so a misplaced one shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator, dtype=param.dtype))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_plain_gpt_matches_megalith(name: str) -> None:
    config = _config(**CONFIGS[name])
    torch.manual_seed(0)
    megalith_model = GPTModel(config)
    _perturb(megalith_model)
    plain_model = PlainGPT(config)
    load_megalith_state_dict(plain_model, megalith_model.state_dict())
    ids, labels = _batch(config)

    megalith_loss = megalith_model(ids, labels)
    plain_loss = plain_model(ids, labels)
    assert megalith_loss.shape == plain_loss.shape == (BATCH, SEQ)
    assert plain_loss.dtype == torch.float32
    assert _relative_error(megalith_loss, plain_loss) < 1e-5

    megalith_loss.mean().backward()
    plain_loss.mean().backward()
    megalith_grad = megalith_model.state_dict(keep_vars=True)["embedding.word_embeddings.weight"].grad
    plain_grad = plain_model.word_embeddings.weight.grad
    assert _relative_error(megalith_grad[: config.vocab_size], plain_grad) < 1e-5


def test_loader_rejects_missing_key() -> None:
    config = _config(hidden_size=32, num_attention_heads=4)
    state_dict = dict(GPTModel(config).state_dict())
    del state_dict["decoder.layers.1.mlp.linear_fc1.weight"]
    with pytest.raises(ValueError, match="decoder.layers.1.mlp.linear_fc1.weight"):
        load_megalith_state_dict(PlainGPT(config), state_dict)


def test_loader_rejects_wrong_shape() -> None:
    config = _config(hidden_size=32, num_attention_heads=4)
    state_dict = dict(GPTModel(config).state_dict())
    state_dict["decoder.final_layernorm.weight"] = torch.ones(31)
    with pytest.raises(ValueError, match="decoder.final_layernorm.weight"):
        load_megalith_state_dict(PlainGPT(config), state_dict)


def test_measure_overhead_runs() -> None:
    config = _config(hidden_size=32, num_attention_heads=4, vocab_size=256)
    result = measure_overhead(config, micro_batch_size=2, repeats=2, warmup=1)
    assert isinstance(result, OverheadResult)
    assert result.megalith_ms > 0 and result.plain_ms > 0 and result.ratio > 0
    assert result.repeats == 2
    assert "ratio" in format_overhead(result, config).splitlines()[-1]
