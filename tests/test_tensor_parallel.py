"""Tensor-parallel mappings, layers and cross-entropy equal their one-process references.

One pool of 4 ranks serves tp 1, 2 and 4 (tp=4 is one group, tp=2 two groups, tp=1 four);
tp=8 runs on a pool of 8 with --full.
"""

import itertools

import pytest

import tp_checks
from megalith.testing import failures

TP_SIZES = [1, 2, 4, 8]


def cases(*axes, keep=lambda *combo: True):
    """Every combination of the axes (tp first); tp=8 only with --full."""
    return [
        pytest.param(*combo, marks=[pytest.mark.full] if combo[0] == 8 else [])
        for combo in itertools.product(TP_SIZES, *axes)
        if keep(*combo)
    ]


def pool_for(rank_pools, tp):
    return rank_pools(max(4, tp))


def assert_exact(per_rank: list[dict], expected_checks: int) -> None:
    for rank, errors in enumerate(per_rank):
        assert len(errors) == expected_checks, f"rank {rank} ran {len(errors)} checks, expected {expected_checks}"
        assert not failures(errors), f"rank {rank}: {failures(errors)}"


@pytest.mark.parametrize("tp", cases())
def test_mappings(rank_pools, tp):
    assert_exact(pool_for(rank_pools, tp).run(tp_checks.mapping_checks, tp), 15)


@pytest.mark.parametrize(
    "tp,sequence_parallel,gather_output,skip_bias_add",
    cases([False, True], [False, True], [False, True], keep=lambda tp, sp, gather, skip: not (sp and gather)),
)
def test_column_parallel_linear(rank_pools, tp, sequence_parallel, gather_output, skip_bias_add):
    results = pool_for(rank_pools, tp).run(tp_checks.column_checks, tp, sequence_parallel, gather_output, skip_bias_add)
    assert_exact(results, 5)


@pytest.mark.parametrize(
    "tp,sequence_parallel,input_is_parallel,skip_bias_add",
    cases([False, True], [False, True], [False, True], keep=lambda tp, sp, parallel_input, skip: parallel_input or not sp),
)
def test_row_parallel_linear(rank_pools, tp, sequence_parallel, input_is_parallel, skip_bias_add):
    results = pool_for(rank_pools, tp).run(tp_checks.row_checks, tp, sequence_parallel, input_is_parallel, skip_bias_add)
    assert_exact(results, 5)


@pytest.mark.parametrize("tp,sequence_parallel,divisible_by", cases([False, True], [1, 128]))
def test_vocab_parallel_embedding(rank_pools, tp, sequence_parallel, divisible_by):
    # 50 words: with divisible_by=1 that is 50 rows at tp 1 and 2 but 52 (2 padding rows) at tp 4
    results = pool_for(rank_pools, tp).run(tp_checks.embedding_checks, tp, sequence_parallel, divisible_by)
    assert_exact(results, 4)


@pytest.mark.parametrize("tp,label_smoothing,divisible_by", cases([0.0, 0.1], [1, 128]))
def test_vocab_parallel_cross_entropy(rank_pools, tp, label_smoothing, divisible_by):
    results = pool_for(rank_pools, tp).run(tp_checks.cross_entropy_checks, tp, label_smoothing, divisible_by)
    assert_exact(results, 4)


def test_shapes_that_do_not_split_give_one_line_errors(rank_pools):
    messages = rank_pools(4).run(tp_checks.bad_input_messages)[0]
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
