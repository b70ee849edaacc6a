"""Activation memory counted, not assumed: the bytes one transformer layer keeps for backward,
measured with saved-tensor hooks on real tp groups, against Korthikanti et al. 2022 (Table 2).

The formula counts the activations the layer needs. What megalith keeps beyond it is named and
counted here too, so each comparison is an exact equality (and so within the issue's 5%):
the causal mask of the unfused attention ([s, s] booleans, not recomputed without recompute)
and the norms' per-token statistics (mean and 1/std of each of the two norms, [s, b] in the
activations' dtype; [s/t, b] under sequence parallelism).
"""

from dataclasses import replace

import pytest
import torch

from megalith.config import ModelConfig
from megalith.models.registry import BUILTIN_MODELS
from megalith.plan.memory import activation_bytes_per_layer
from megalith.training.activation_meter import ActivationCase, SavedTensorMeter, measure_cases

S, B, H, A = 64, 4, 128, 8  # 5·a·s/h = 20: the attention scores are a third of a layer's memory
BF16 = 2
CONFIG = ModelConfig(**{**BUILTIN_MODELS["gpt"].defaults, "num_layers": 2, "hidden_size": H,
                        "num_attention_heads": A, "seq_length": S, "params_dtype": "bf16",
                        "attention_backend": "unfused", "hidden_dropout": 0.1, "attention_dropout": 0.1})
CASES = [ActivationCase(tp, sp, recompute)
         for tp, sp in ((1, False), (2, False), (2, True), (4, False), (4, True))
         for recompute in (None, "selective", "full")]


def _named_extras(case: ActivationCase) -> int:
    """Bytes megalith keeps per layer beyond the formula, each for a reason the docstring gives."""
    if case.recompute == "full":
        return 0
    tokens = S // case.tp if case.sequence_parallel else S
    norm_statistics = 2 * 2 * tokens * B * BF16
    causal_mask = S * S if case.recompute is None else 0
    return norm_statistics + causal_mask


@pytest.fixture(scope="module")
def measured(rank_pools):
    rows = {}
    for per_rank in rank_pools(4).run(measure_cases, CONFIG, B, CASES):
        for case, nbytes in per_rank:
            if nbytes is not None:
                rows.setdefault(case, set()).add(nbytes)
    return rows


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_a_layer_keeps_what_the_paper_counts(measured, case):
    assert len(measured[case]) == 1, f"tp ranks disagree: {measured[case]}"  # every rank keeps the same
    (got,) = measured[case]
    formula = activation_bytes_per_layer(S, B, H, A, tp=case.tp, sequence_parallel=case.sequence_parallel,
                                         recompute=case.recompute)
    assert got == formula + _named_extras(case)
    assert abs(got / formula - 1) < 0.05


def test_sequence_parallel_keeps_a_tp_th_of_the_one_process_layer(measured):
    """The paper's point: with sp every activation is split, so tp4.sp keeps a quarter (the mask aside)."""
    (one,), (sp4,) = measured[ActivationCase(1)], measured[ActivationCase(4, True)]
    assert sp4 - S * S == (one - S * S) / 4


def test_the_meter_counts_storages_once_and_leaves_parameters_out():
    weight = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    meter = SavedTensorMeter(exclude=[weight])
    with meter.counting():
        qkv = x @ weight  # saves x and the weight: only x counts
        q, k = qkv[:, :4], qkv[:, 4:]  # two views of one storage
        (q * k).sum()
    assert meter.bytes == x.numel() * 4 + qkv.numel() * 4



VARIANTS = {  # the formula's dtype and dropout parameters, as the startup report uses them
    "fp32": (replace(CONFIG, params_dtype="fp32"), 4, True),
    "bf16 no dropout": (replace(CONFIG, hidden_dropout=0.0, attention_dropout=0.0), BF16, False),
}
VARIANT_CASES = [ActivationCase(2, False), ActivationCase(2, True), ActivationCase(2, True, "selective")]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_the_formula_follows_the_dtype_and_the_dropout(rank_pools, variant):
    config, value_bytes, with_dropout = VARIANTS[variant]
    for per_rank in filter(None, rank_pools(4).run(measure_cases, config, B, VARIANT_CASES)):
        for case, got in per_rank:
            if got is None:
                continue
            formula = activation_bytes_per_layer(S, B, H, A, tp=case.tp, sequence_parallel=case.sequence_parallel,
                                                 recompute=case.recompute, value_bytes=value_bytes,
                                                 hidden_dropout=with_dropout, attention_dropout=with_dropout)
            tokens = S // case.tp if case.sequence_parallel else S
            extras = 2 * 2 * tokens * B * value_bytes + (S * S if case.recompute is None else 0)
            assert got == formula + extras, case
