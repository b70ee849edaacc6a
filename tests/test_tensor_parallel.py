"""Tensor-parallel mappings, layers and cross-entropy equal their one-process references.

One pool of 4 ranks serves every layout: tp=4 is one group, tp=2 two groups, tp=1 four.
"""

import itertools

import pytest

import tp_checks
from megalith.testing import failures

TP_SIZES = [1, 2, 4]
WORLD = 4


def assert_exact(per_rank: list[dict], expected_checks: int) -> None:
    for rank, errors in enumerate(per_rank):
        assert len(errors) == expected_checks, f"rank {rank} ran {len(errors)} checks, expected {expected_checks}"
        assert not failures(errors), f"rank {rank}: {failures(errors)}"


@pytest.mark.parametrize("tp", TP_SIZES)
def test_mappings(rank_pools, tp):
    assert_exact(rank_pools(WORLD).run(tp_checks.mapping_checks, tp), 15)


@pytest.mark.parametrize(
    "tp,sequence_parallel,gather_output,skip_bias_add",
    [(tp, sp, gather, skip) for tp, sp, gather, skip in itertools.product(TP_SIZES, [False, True], [False, True], [False, True])
     if not (sp and gather)],
)
def test_column_parallel_linear(rank_pools, tp, sequence_parallel, gather_output, skip_bias_add):
    results = rank_pools(WORLD).run(tp_checks.column_checks, tp, sequence_parallel, gather_output, skip_bias_add)
    assert_exact(results, 5)


@pytest.mark.parametrize(
    "tp,sequence_parallel,input_is_parallel,skip_bias_add",
    [(tp, sp, par, skip) for tp, sp, par, skip in itertools.product(TP_SIZES, [False, True], [False, True], [False, True])
     if par or not sp],
)
def test_row_parallel_linear(rank_pools, tp, sequence_parallel, input_is_parallel, skip_bias_add):
    results = rank_pools(WORLD).run(tp_checks.row_checks, tp, sequence_parallel, input_is_parallel, skip_bias_add)
    assert_exact(results, 5)


@pytest.mark.parametrize("tp,sequence_parallel,divisible_by", list(itertools.product(TP_SIZES, [False, True], [1, 128])))
def test_vocab_parallel_embedding(rank_pools, tp, sequence_parallel, divisible_by):
    # 50 words: with divisible_by=1 that is 50 rows at tp 1 and 2 but 52 (2 padding rows) at tp 4
    results = rank_pools(WORLD).run(tp_checks.embedding_checks, tp, sequence_parallel, divisible_by)
    assert_exact(results, 4)


@pytest.mark.parametrize("tp,label_smoothing,divisible_by", list(itertools.product(TP_SIZES, [0.0, 0.1], [1, 128])))
def test_vocab_parallel_cross_entropy(rank_pools, tp, label_smoothing, divisible_by):
    results = rank_pools(WORLD).run(tp_checks.cross_entropy_checks, tp, label_smoothing, divisible_by)
    assert_exact(results, 4)


def test_shapes_that_do_not_split_give_one_line_errors(rank_pools):
    messages = rank_pools(WORLD).run(tp_checks.bad_input_messages)[0]
    expected = {
        "column": "column-parallel output size 10 is not divisible by the tensor-parallel size 4",
        "row": "row-parallel input size 10 is not divisible by the tensor-parallel size 4",
        "sequence": "dimension 0 of size 6 is not divisible by the tensor-parallel size 4",
        "sp_needs_parallel_input": "sequence_parallel needs input_is_parallel=True",
        "gather_with_sp": "gather_output cannot be combined with sequence_parallel",
        "ce_vocab": "vocab size 13 must be between 1 and the 12 logit columns",
    }
    for name, fragment in expected.items():
        assert fragment in messages[name], f"{name}: {messages[name]}"
        assert "\n" not in messages[name]
