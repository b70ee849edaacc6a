"""Random streams for tensor parallelism, and recompute that replays them exactly."""

import pytest
import torch
import torch.nn.functional as F

from megalith.errors import ConfigError
from megalith.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalith.parallel.rng import TP_LOCAL, TP_SHARED, RNGStatesTracker, checkpoint, model_parallel_rng_tracker

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"))]


def test_streams_are_independent_of_the_default_generator():
    torch.manual_seed(0)
    tracker = RNGStatesTracker()
    tracker.add("a", 123)
    untouched = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), untouched), "add() must not move the default generator"

    with tracker.fork("a"):
        first = torch.rand(4)
    with tracker.fork("a"):
        second = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(torch.cat([first, second]), torch.rand(8)), "a stream continues where it stopped"
    with pytest.raises(ConfigError, match="already registered"):
        tracker.add("a", 1)
    with pytest.raises(ConfigError, match="'b' is not registered"):
        with tracker.fork("b"):
            pass


def _block(x, w1, w2, tracker, p):
    """Dropout from the default generator and from a tracker stream, around two matmuls."""
    h = F.dropout(x @ w1, p=p, training=True)
    with tracker.fork(TP_LOCAL):
        h = F.dropout(torch.tanh(h), p=p, training=True)
    return h @ w2, h.sum()  # two outputs, one unused in the loss


def _grads(recompute: bool, device: str):
    torch.manual_seed(5)
    tracker = model_parallel_rng_tracker(77, tp_rank=1, device=device)
    x = torch.randn(6, 5, device=device, requires_grad=True)
    w1 = torch.randn(5, 8, device=device, requires_grad=True)
    w2 = torch.randn(8, 3, device=device, requires_grad=True)
    if recompute:
        out, _ = checkpoint(_block, x, w1, w2, tracker, 0.5, rng_tracker=tracker)
    else:
        out, _ = _block(x, w1, w2, tracker, 0.5)
    out.pow(2).sum().backward()
    after = (torch.rand(2, device=device), tracker.get_states())
    return out.detach(), x.grad, w1.grad, w2.grad, after


@pytest.mark.parametrize("device", DEVICES)
def test_recompute_with_dropout_gives_the_same_gradients(device):
    plain, recomputed = _grads(False, device), _grads(True, device)
    for name, a, b in zip(["output", "x.grad", "w1.grad", "w2.grad"], plain[:4], recomputed[:4]):
        assert torch.equal(a, b), f"{name} differs under recompute"
    # recompute must leave every generator where the plain run left it
    assert torch.equal(plain[4][0], recomputed[4][0])
    for name in (TP_SHARED, TP_LOCAL):
        assert torch.equal(plain[4][1][name], recomputed[4][1][name])


def test_recompute_without_dropout_would_differ_if_rng_were_not_restored():
    """Guard for the test above: dropout really does draw a fresh mask on each call."""
    torch.manual_seed(5)
    x = torch.ones(100)
    assert not torch.equal(F.dropout(x, 0.5), F.dropout(x, 0.5))


def test_checkpoint_needs_a_tensor():
    with pytest.raises(ConfigError, match="at least one tensor"):
        checkpoint(lambda a: a, 3)


def stream_draws(ctx):
    state = ctx.parallel_state(tp=2)
    tracker = model_parallel_rng_tracker(1234, state.tp_rank)
    with tracker.fork(TP_SHARED):
        shared = torch.rand(4)
    with tracker.fork(TP_LOCAL):
        local = torch.rand(4)
    return state.tp_rank, shared, local


def test_shared_stream_agrees_and_local_stream_differs_across_tp(rank_pools):
    results = rank_pools(4).run(stream_draws)
    shared = [r[1] for r in results]
    assert all(torch.equal(s, shared[0]) for s in shared)
    local = {tp_rank: draw for tp_rank, _, draw in results}
    assert not torch.equal(local[0], local[1]), "tp ranks must draw different masks"
    assert all(torch.equal(draw, local[tp_rank]) for tp_rank, _, draw in results), "same tp rank, same stream"


def _tp_mlp(x, fc1, fc2, tracker):
    h = F.gelu(fc1(x))
    with tracker.fork(TP_LOCAL):  # h is sharded over tp: each rank its own mask
        h = F.dropout(h, p=0.3, training=True)
    return fc2(h)


def tp_recompute_grads(ctx, recompute):
    state = ctx.parallel_state(tp=2)
    torch.manual_seed(3)
    fc1 = ColumnParallelLinear(6, 8, tp_group=state.tp_group)
    fc2 = RowParallelLinear(8, 6, tp_group=state.tp_group, input_is_parallel=True)
    tracker = model_parallel_rng_tracker(99, state.tp_rank)
    x = torch.randn(4, 2, 6, requires_grad=True)
    if recompute:
        y = checkpoint(_tp_mlp, x, fc1, fc2, tracker, rng_tracker=tracker)
    else:
        y = _tp_mlp(x, fc1, fc2, tracker)
    y.square().sum().backward()
    return y.detach(), x.grad, fc1.weight.grad, fc2.weight.grad


def test_recompute_of_a_tensor_parallel_block_matches(rank_pools):
    pool = rank_pools(4)
    for plain, recomputed in zip(pool.run(tp_recompute_grads, False), pool.run(tp_recompute_grads, True)):
        for a, b in zip(plain, recomputed):
            assert torch.equal(a, b)
