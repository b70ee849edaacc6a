"""The pipeline and DeepSpeed peers of benchmarks/peers.py do megalith's work: same stage split,
same weights and batches, losses equal to megalith's over two steps (the second after an
optimizer step). Nothing here is timed."""

from dataclasses import replace

import pytest

from megalith.bench import pipelining
from megalith.bench.stages import rank_stages, tied_parameters
from megalith.bench.work import Work
from megalith.config import ModelConfig
from megalith.parallel.spawn import RankFailedError
from megalith.testing import FP32_RELATIVE_TOLERANCE

TINY = ModelConfig(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                   hidden_dropout=0.0, attention_dropout=0.0)
LR = 1e-2  # large enough that a wrong gradient shows in the second step's loss (see the negative control)
STEPS = 2


def with_lr(case):
    return replace(case, work=replace(case.work, lr=LR))


def train_both(ctx, case, steps, skip_tied_sum=False):
    """Both sides' losses per step on this rank (None on idle ranks); `skip_tied_sum` builds the
    pipelining peer without the tied embedding's gradient sum (the negative control)."""
    original = pipelining.tied_parameters
    if skip_tied_sum:
        pipelining.tied_parameters = lambda stages, work: []
    try:
        sides = case.build(ctx, case.work)
    finally:
        pipelining.tied_parameters = original
    if sides is None:
        return None
    return [[side.step(step) for step in range(steps)] for side in sides]


def errors_per_step(per_rank):
    """Relative loss differences peer vs megalith per step, after checking that every rank of a side
    reports the same loss (the Side contract)."""
    ranks = [r for r in per_rank if r is not None]
    assert ranks, "no rank trained"
    ours, theirs = ranks[0]
    for other in ranks[1:]:
        assert other == [ours, theirs]
    assert len(ours) == len(theirs) == STEPS
    return [abs(a - b) / abs(a) for a, b in zip(ours, theirs)]


PIPELINE_ROWS = [("pp2 1F1B", "pipelining", 2), ("pp4 1F1B", "pipelining", 4),
                 ("pp2 interleaved 1F1B (2 chunks)", "pipelining", 2)]


def test_pipelining_rows():
    cases = pipelining.cases(TINY, quick=True, micro_batch_size=2, micro_batches=4)
    assert [(c.work_name, c.peer, c.ranks) for c in cases] == PIPELINE_ROWS
    assert {(c.work.micro_batch_size, c.work.micro_batches, c.work.dp) for c in cases} == {(2, 4, 1)}
    assert {(c.work.micro_batch_size, c.work.micro_batches) for c in pipelining.cases(TINY, quick=False)} == {(4, 8)}


@pytest.mark.parametrize("index", range(len(PIPELINE_ROWS)), ids=[row[0] for row in PIPELINE_ROWS])
def test_pipelining_case_matches_megalith(rank_pools, index):
    case = with_lr(pipelining.cases(TINY, quick=True, micro_batch_size=2, micro_batches=4)[index])
    errors = errors_per_step(rank_pools(4).run(train_both, case, STEPS))
    assert max(errors) < FP32_RELATIVE_TOLERANCE, (case.work_name, errors)


def test_pipelining_without_the_tied_sum_fails(rank_pools):
    """Negative control: the peer's last stage trains its embedding copy alone, and step 2 shows it."""
    case = with_lr(pipelining.cases(TINY, quick=True, micro_batch_size=2, micro_batches=4)[0])
    errors = errors_per_step(rank_pools(4).run(train_both, case, STEPS, skip_tied_sum=True))
    assert errors[0] < FP32_RELATIVE_TOLERANCE  # same weights, same batch
    assert errors[1] > 1e-4


def test_peer_stages_hold_megaliths_split():
    """pp2 with 2 chunks: rank 0 holds global stages 0 and 2, rank 1 stages 1 and 3; the embedding
    is on stage 0 only, the head (with its tied copy) on stage 3 only."""
    work = Work(TINY, micro_batch_size=2, micro_batches=4)
    by_rank = {rank: rank_stages(work, pp=2, vpp=2, pp_rank=rank) for rank in (0, 1)}
    assert [[s.index for s in by_rank[r]] for r in (0, 1)] == [[0, 2], [1, 3]]
    assert [len(s.layers) for r in (0, 1) for s in by_rank[r]] == [1, 1, 1, 1]
    assert [(s.embedding is not None, s.head is not None) for s in by_rank[0] + by_rank[1]] == [
        (True, False), (False, False), (False, False), (False, True)]
    first, last = by_rank[0][0], by_rank[1][1]
    assert [id(p) for p in tied_parameters(by_rank[0], work)] == [id(first.embedding.word_embeddings.weight)]
    assert [id(p) for p in tied_parameters(by_rank[1], work)] == [id(last.head.weight)]
    assert last.head.weight is not first.embedding.word_embeddings.weight
    assert (last.head.weight == first.embedding.word_embeddings.weight).all()
    assert tied_parameters(by_rank[1], replace(work, config=replace(TINY, untie_embeddings_and_output_weights=True))) == []


def test_deepspeed_partition_check_refuses_another_split():
    from megalith.bench.deepspeed_peer import check_partition

    roles = ["embedding", "embedding", "layer 0", "layer 1", "layer 2", "layer 3", "head", "head"]
    check_partition([0, 4, 8], roles, [[0, 1], [2, 3]])
    with pytest.raises(RuntimeError, match="stage 0 holds"):
        check_partition([0, 3, 8], roles, [[0, 1], [2, 3]])


@pytest.mark.slow  # about 5 s: deepspeed's import and two engines on every rank
def test_deepspeed_cases_match_megalith(rank_pools):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional peer: pip install -e '.[bench]'")
    from megalith.bench import deepspeed_peer

    cases = deepspeed_peer.cases(TINY, quick=True, micro_batch_size=2, micro_batches=4, dp_micro_batches=2)
    assert [(c.work_name, c.peer, c.ranks) for c in cases] == [("pp2 1F1B", "deepspeed", 2),
                                                               ("dp2+distopt", "deepspeed", 2)]
    for case in cases:
        errors = errors_per_step(rank_pools(2).run(train_both, with_lr(case), STEPS))
        assert max(errors) < FP32_RELATIVE_TOLERANCE, (case.work_name, errors)


def test_deepspeed_refuses_a_larger_pool(rank_pools):
    """Refused before deepspeed is imported: this runs without it."""
    from megalith.bench import deepspeed_peer

    case = deepspeed_peer.cases(TINY, quick=True, micro_batch_size=2, micro_batches=4)[0]
    with pytest.raises(RankFailedError, match="pool of exactly 2 ranks, not 4"):
        rank_pools(4).run(train_both, case, STEPS)
