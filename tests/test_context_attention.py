"""Context-parallel attention (megalith.parallel.context) against core_attention on the full
sequence in one process: outputs and the gradients of q, k, v, for every comm type, causal and
bidirectional with padding, GQA, and a sequence that is not a power of two. Also the load-balanced
layout, the bytes the ledger counts, and the activations the ring saves. Nothing here is timed."""

from __future__ import annotations

import pytest
import torch

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.parallel_context import ParallelContext
from megalith.models.transformer import core_attention
from megalith.parallel.comm_ledger import CommLedger, counting
from megalith.parallel.context import (context_parallel_attention, expected_bytes, load_balanced_indices,
                                       restore_global_order, split_for_context_parallel, wire_bytes)
from megalith.parallel.context.ulysses import check_heads
from megalith.testing import FP32_RELATIVE_TOLERANCE, relative_error

SEQ, BATCH, HEAD_DIM = 24, 2, 8  # 24: not a power of two, divisible by 2*cp for cp 2, 3 and 4


def shapes(cp: int) -> dict:
    """GQA with two query heads per group; heads and groups divisible by cp (so a2a runs too)."""
    return dict(seq_length=SEQ, batch=BATCH, heads=2 * cp, groups=cp, head_dim=HEAD_DIM)


def inputs(heads: int, groups: int, causal: bool):
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(SEQ, BATCH, heads, HEAD_DIM, generator=gen)
    k = torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=gen)
    v = torch.randn(SEQ, BATCH, groups, HEAD_DIM, generator=gen)
    grad = torch.randn(SEQ, BATCH, heads * HEAD_DIM, generator=gen)
    # BERT-style right padding: sample 0 keeps 20 tokens, sample 1 keeps 13
    padding = None if causal else torch.arange(SEQ)[None, :] >= torch.tensor([[20], [13]])
    return q, k, v, grad, padding


def reference(q, k, v, grad, padding, causal):
    """core_attention over the whole sequence in one process: output and q, k, v gradients."""
    heads, groups = q.shape[2], k.shape[2]
    config = ModelConfig(num_layers=1, hidden_size=heads * HEAD_DIM, num_attention_heads=heads,
                         num_query_groups=groups, group_query_attention=True, seq_length=SEQ, vocab_size=64,
                         attention_dropout=0.0)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    mask = None if padding is None else padding[:, None, None, :]
    out = core_attention(*leaves, mask, config=config, ctx=ParallelContext(), training=False, causal=causal)
    (out * grad).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def run_local(group, cp, rank, comm_type, causal, q, k, v, grad, padding, split=split_for_context_parallel):
    """This rank's output and q, k, v gradients, with the ledger's counts after forward and after backward."""
    leaves = [split(t, 0, cp, rank).clone().requires_grad_() for t in (q, k, v)]
    ledger = CommLedger({group: "cp"})
    with counting(ledger):
        out = context_parallel_attention(*leaves, group=group, comm_type=comm_type, causal=causal,
                                         key_padding_mask=padding)
        forward = {op: ledger.bytes("cp", op) for op in ("send", "recv", "all_gather", "all_to_all")}
        (out * split(grad, 0, cp, rank)).sum().backward()
    backward = {op: ledger.bytes("cp", op) - forward.get(op, 0)
                for op in ("send", "recv", "reduce_scatter", "all_to_all")}
    return [out.detach()] + [t.grad for t in leaves], ({o: b for o, b in forward.items() if b},
                                                       {o: b for o, b in backward.items() if b})


def check_case(rank_ctx, cp: int, comm_type: str, causal: bool, contiguous_split: bool = False):
    """Per rank: errors against the reference (this rank's rows of output and gradients), ledger counts."""
    state = rank_ctx.parallel_state(cp=cp, dp=1)
    if state is None:
        return None
    s = shapes(cp)
    q, k, v, grad, padding = inputs(s["heads"], s["groups"], causal)
    expected = reference(q, k, v, grad, padding, causal)
    split = split_for_context_parallel
    if contiguous_split:  # negative control: plain contiguous chunks, not the load-balanced order
        split = lambda t, dim, cp_, rank: t.chunk(cp_, dim)[rank]  # noqa: E731
    got, counts = run_local(state.cp_group, cp, state.cp_rank, comm_type, causal, q, k, v, grad, padding, split)
    mine = [split(t, 0, cp, state.cp_rank) for t in expected]
    errors = {name: relative_error(a, b) for name, a, b in zip(("out", "dq", "dk", "dv"), got, mine)}
    return errors, counts, got


def assert_exact(results, cp, comm_type):
    ranks = [r for r in results if r is not None]
    assert len(ranks) == cp
    for errors, counts, _ in ranks:
        assert max(errors.values()) < FP32_RELATIVE_TOLERANCE, errors
        assert counts[0] == expected_bytes(comm_type, cp=cp, **shapes(cp)), counts
        assert counts[1] == expected_bytes(comm_type, cp=cp, backward=True, **shapes(cp)), counts


# --- pure: the layout, the formulas, bad input -------------------------------------------------


def test_load_balanced_order():
    assert load_balanced_indices(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert load_balanced_indices(8, 2, 1).tolist() == [2, 3, 4, 5]
    assert load_balanced_indices(24, 3, 1).tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    everyone = torch.cat([load_balanced_indices(24, 4, r) for r in range(4)])
    assert sorted(everyone.tolist()) == list(range(24))
    x = torch.randn(24, 3)
    assert torch.equal(restore_global_order([split_for_context_parallel(x, 0, 3, r) for r in range(3)], 0), x)


def test_bad_input_is_one_line():
    with pytest.raises(ConfigError, match="not divisible by 2 x context-parallel size = 4"):
        load_balanced_indices(10, 2, 0)
    with pytest.raises(ConfigError, match="must both be divisible by the context-parallel size 4"):
        check_heads(6, 2, 4)
    q = torch.zeros(4, 1, 2, 8)
    with pytest.raises(ConfigError, match="unknown cp_comm_type"):
        context_parallel_attention(q, q, q, group=None, comm_type="ring", causal=True)
    with pytest.raises(ConfigError, match="not divisible by 2 query groups"):
        context_parallel_attention(torch.zeros(4, 1, 3, 8), q, q, group=None, comm_type="p2p", causal=True)


def test_wire_formulas():
    """The issue's formulas: all_gather KV (cp-1)/cp; a2a 4 b s h (cp-1)/cp^2 with groups = heads; p2p
    (cp-1) KV blocks forward and twice that backward."""
    cp, s, b, n, d = 4, 32, 2, 8, 4
    mha = dict(cp=cp, seq_length=s, batch=b, heads=n, groups=n, head_dim=d)
    kv = 2 * s * b * n * d * 4
    assert wire_bytes("all_gather", **mha) == kv * (cp - 1) // cp
    assert wire_bytes("a2a", **mha) == 4 * b * s * n * d * 4 * (cp - 1) // cp ** 2
    assert wire_bytes("p2p", **mha) == (cp - 1) * kv // cp
    assert wire_bytes("p2p", backward=True, **mha) == 2 * (cp - 1) * kv // cp


def test_one_process_is_core_attention():
    """cp 1 (group None): every comm type is core_attention itself."""
    q, k, v, grad, padding = inputs(4, 2, causal=False)
    expected = reference(q, k, v, grad, padding, False)
    for comm_type in ("p2p", "all_gather", "a2a"):
        got, _ = run_local(None, 1, 0, comm_type, False, q, k, v, grad, padding)
        for a, b in zip(got, expected):
            assert relative_error(a, b) < FP32_RELATIVE_TOLERANCE


# --- against one process on a pool -----------------------------------------------------------


def test_ring_cp2_causal_gqa(rank_pools):
    assert_exact(rank_pools(4).run(check_case, 2, "p2p", True), 2, "p2p")


@pytest.mark.slow
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "padded"])
@pytest.mark.parametrize("comm_type", ["p2p", "all_gather", "a2a"])
@pytest.mark.parametrize("cp", [2, 3, 4])
def test_matches_one_process(rank_pools, cp, comm_type, causal):
    assert_exact(rank_pools(4).run(check_case, cp, comm_type, causal), cp, comm_type)


@pytest.mark.slow
@pytest.mark.parametrize("comm_type", ["p2p", "all_gather", "a2a"])
def test_wrong_chunk_order_fails(rank_pools, comm_type):
    """Negative control: contiguous chunks instead of the load-balanced ones break causal attention."""
    ranks = [r for r in rank_pools(4).run(check_case, 2, comm_type, True, True) if r is not None]
    assert max(max(errors.values()) for errors, _, _ in ranks) > 1e-2


# --- activation memory -----------------------------------------------------------------------


def saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while `fn` runs (counted per tensor saved)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def ring_saved(rank_ctx, cp: int):
    """What the ring saves on this rank, and what it saves over the whole sequence in one process."""
    state = rank_ctx.parallel_state(cp=cp, dp=1)
    if state is None:
        return None
    s = shapes(cp)
    q, k, v, _, _ = inputs(s["heads"], s["groups"], True)
    local = [split_for_context_parallel(t, 0, cp, state.cp_rank).requires_grad_() for t in (q, k, v)]
    whole = [t.clone().requires_grad_() for t in (q, k, v)]
    mine = saved_bytes(lambda: context_parallel_attention(*local, group=state.cp_group, comm_type="p2p",
                                                          causal=True))
    one = saved_bytes(lambda: context_parallel_attention(*whole, group=None, comm_type="p2p", causal=True))
    return mine, one


@pytest.mark.slow
@pytest.mark.parametrize("cp", [2, 4])
def test_ring_saves_one_cp_th(rank_pools, cp):
    """q, k, v, output and log-sum-exp of the local tokens only: exactly 1/cp of one process's."""
    for mine, one in (r for r in rank_pools(4).run(ring_saved, cp) if r is not None):
        s = shapes(cp)
        per_token = BATCH * HEAD_DIM * 4 * (2 * s["heads"] + 2 * s["groups"]) + BATCH * s["heads"] * 4
        assert one == SEQ * per_token
        assert mine * cp == one


def test_ring_computes_only_the_visible_half():
    """Causal, cp 2, load-balanced: rank 1 holding rank 0's block needs only its first chunk
    (all queries see it); rank 0 holding rank 1's block needs only its second query chunk."""
    from megalith.parallel.context.ring import _visible
    rows, cols = _visible(load_balanced_indices(8, 2, 1), load_balanced_indices(8, 2, 0), True)
    assert rows is None and cols.tolist() == [0, 1]
    rows, cols = _visible(load_balanced_indices(8, 2, 0), load_balanced_indices(8, 2, 1), True)
    assert rows.tolist() == [2, 3] and cols is None
    assert _visible(load_balanced_indices(8, 2, 0), load_balanced_indices(8, 2, 0), True) == (None, None)


def bf16_case(rank_ctx, comm_type: str):
    """bf16 inputs (float32 math inside) against float32 core_attention on the same bf16-rounded values."""
    state = rank_ctx.parallel_state(cp=2, dp=1)
    if state is None:
        return None
    q, k, v, grad, _ = (t if t is None else t.bfloat16().float() for t in inputs(4, 2, True))
    expected = reference(q, k, v, grad, None, True)
    rank = state.cp_rank
    leaves = [split_for_context_parallel(t, 0, 2, rank).bfloat16().requires_grad_() for t in (q, k, v)]
    out = context_parallel_attention(*leaves, group=state.cp_group, comm_type=comm_type, causal=True)
    assert out.dtype == torch.bfloat16
    (out.float() * split_for_context_parallel(grad, 0, 2, rank)).sum().backward()
    got = [out] + [t.grad for t in leaves]
    return max(relative_error(a, split_for_context_parallel(b, 0, 2, rank)) for a, b in zip(got, expected))


@pytest.mark.slow
@pytest.mark.parametrize("comm_type", ["p2p", "all_gather", "a2a"])
def test_bf16_inputs(rank_pools, comm_type):
    """bf16 in and out, float32 inside: only the final rounding to bf16 differs (2^-8 relative)."""
    errors = [e for e in rank_pools(4).run(bf16_case, comm_type) if e is not None]
    assert max(errors) < 1e-2, errors
