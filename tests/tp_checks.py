"""Per-rank checks of the tensor-parallel pieces against one-process references.

Each function runs on every rank of a pool, builds the parallel piece and its plain-PyTorch
reference from the same seed, and returns {check name: relative error}. The full reference is
computed locally on every rank, so nothing but the piece under test communicates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megalith.errors import ConfigError
from megalith.parallel import comm
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    padded_vocab_size,
)
from megalith.testing import relative_error

SEQ, BATCH = 8, 3


def randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_weight(seed: int, *shape: int, valid_rows: int | None = None) -> torch.Tensor:
    """The weight one process initialises from `seed` (what every shard must be a slice of)."""
    torch.manual_seed(seed)
    weight = torch.zeros(*shape)
    normal_init()(weight if valid_rows is None else weight[:valid_rows])
    return weight


def shard(t: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return t.chunk(tp, dim=dim)[rank]


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def mapping_checks(ctx, tp: int) -> dict[str, float]:
    """Forward and backward of every mapping against what its definition says."""
    state = ctx.parallel_state(tp=tp)
    g, r = state.tp_group, state.tp_rank
    shape = (SEQ, BATCH, 8)
    full = randn(1, *shape)
    per_rank = [randn(100 + i, *shape) for i in range(tp)]  # a different tensor on each tp rank
    errors = {}

    x = leaf(full)
    y = comm.copy_to_tp(x, g)
    y.backward(per_rank[r])
    errors["copy_to_tp.fwd"] = relative_error(y, full)
    errors["copy_to_tp.bwd"] = relative_error(x.grad, sum(per_rank))

    x = leaf(per_rank[r])
    y = comm.reduce_from_tp(x, g)
    y.backward(full)
    errors["reduce_from_tp.fwd"] = relative_error(y, sum(per_rank))
    errors["reduce_from_tp.bwd"] = relative_error(x.grad, full)

    x = leaf(full)
    y = comm.scatter_to_tp(x, g)
    y.backward(shard(per_rank[r], -1, tp, r))
    errors["scatter_to_tp.fwd"] = relative_error(y, shard(full, -1, tp, r))
    expected = torch.cat([shard(per_rank[i], -1, tp, i) for i in range(tp)], dim=-1)
    errors["scatter_to_tp.bwd"] = relative_error(x.grad, expected)

    x = leaf(shard(full, -1, tp, r))
    y = comm.gather_from_tp(x, g)
    y.backward(per_rank[0])
    errors["gather_from_tp.fwd"] = relative_error(y, full)
    errors["gather_from_tp.bwd"] = relative_error(x.grad, shard(per_rank[0], -1, tp, r))

    x = leaf(full)
    y = comm.scatter_to_sequence_parallel(x, g)
    y.backward(shard(per_rank[r], 0, tp, r))
    errors["scatter_to_sp.fwd"] = relative_error(y, shard(full, 0, tp, r))
    expected = torch.cat([shard(per_rank[i], 0, tp, i) for i in range(tp)], dim=0)
    errors["scatter_to_sp.bwd"] = relative_error(x.grad, expected)

    x = leaf(shard(full, 0, tp, r))
    y = comm.gather_from_sequence_parallel(x, g, tensor_parallel_output_grad=True)
    y.backward(per_rank[r])
    errors["gather_from_sp.fwd"] = relative_error(y, full)
    errors["gather_from_sp.bwd_reduce_scatter"] = relative_error(x.grad, shard(sum(per_rank), 0, tp, r))

    x = leaf(shard(full, 0, tp, r))
    y = comm.gather_from_sequence_parallel(x, g, tensor_parallel_output_grad=False)
    y.backward(per_rank[0])
    errors["gather_from_sp.bwd_split"] = relative_error(x.grad, shard(per_rank[0], 0, tp, r))

    x = leaf(per_rank[r])
    y = comm.reduce_scatter_to_sequence_parallel(x, g)
    y.backward(shard(full, 0, tp, r))
    errors["reduce_scatter_to_sp.fwd"] = relative_error(y, shard(sum(per_rank), 0, tp, r))
    errors["reduce_scatter_to_sp.bwd"] = relative_error(x.grad, full)
    return errors


def _input(full: torch.Tensor, sequence_parallel: bool, tp: int, r: int) -> torch.Tensor:
    return leaf(shard(full, 0, tp, r) if sequence_parallel else full)


def column_checks(ctx, tp: int, sequence_parallel: bool, gather_output: bool, skip_bias_add: bool) -> dict:
    """ColumnParallelLinear(7 -> 16) against F.linear with the same weights."""
    state = ctx.parallel_state(tp=tp)
    g, r = state.tp_group, state.tp_rank
    in_size, out_size, seed = 7, 16, 11
    weight, bias = full_weight(seed, out_size, in_size), randn(2, out_size)
    torch.manual_seed(seed)
    layer = ColumnParallelLinear(
        in_size, out_size, tp_group=g, sequence_parallel=sequence_parallel,
        gather_output=gather_output, skip_bias_add=skip_bias_add,
    )
    with torch.no_grad():
        layer.bias.copy_(shard(bias, 0, tp, r))
    x_full, dy_full = randn(3, SEQ, BATCH, in_size), randn(4, SEQ, BATCH, out_size)

    x_ref, w_ref, b_ref = leaf(x_full), leaf(weight), leaf(bias)
    y_ref = F.linear(x_ref, w_ref, b_ref)
    y_ref.backward(dy_full)

    x = _input(x_full, sequence_parallel, tp, r)
    out = layer(x)
    y = out[0] + out[1] if skip_bias_add else out
    expected_y, dy = (y_ref, dy_full) if gather_output else (shard(y_ref, -1, tp, r), shard(dy_full, -1, tp, r))
    y.backward(dy)
    return {
        "weight.init": relative_error(layer.weight, shard(weight, 0, tp, r)),
        "output": relative_error(y, expected_y),
        "input.grad": relative_error(x.grad, shard(x_ref.grad, 0, tp, r) if sequence_parallel else x_ref.grad),
        "weight.grad": relative_error(layer.weight.grad, shard(w_ref.grad, 0, tp, r)),
        "bias.grad": relative_error(layer.bias.grad, shard(b_ref.grad, 0, tp, r)),
    }


def row_checks(ctx, tp: int, sequence_parallel: bool, input_is_parallel: bool, skip_bias_add: bool) -> dict:
    """RowParallelLinear(16 -> 7) against F.linear with the same weights."""
    state = ctx.parallel_state(tp=tp)
    g, r = state.tp_group, state.tp_rank
    in_size, out_size, seed = 16, 7, 21
    weight, bias = full_weight(seed, out_size, in_size), randn(5, out_size)
    torch.manual_seed(seed)
    layer = RowParallelLinear(
        in_size, out_size, tp_group=g, sequence_parallel=sequence_parallel,
        input_is_parallel=input_is_parallel, skip_bias_add=skip_bias_add,
    )
    with torch.no_grad():
        layer.bias.copy_(bias)
    x_full, dy_full = randn(6, SEQ, BATCH, in_size), randn(7, SEQ, BATCH, out_size)

    x_ref, w_ref, b_ref = leaf(x_full), leaf(weight), leaf(bias)
    F.linear(x_ref, w_ref, b_ref).backward(dy_full)
    y_ref = F.linear(x_full, weight, bias)

    x = leaf(shard(x_full, -1, tp, r) if input_is_parallel else x_full)
    out = layer(x)
    y = out[0] + out[1] if skip_bias_add else out
    sp_shard = (lambda t: shard(t, 0, tp, r)) if sequence_parallel else (lambda t: t)
    y.backward(sp_shard(dy_full))
    if sequence_parallel:
        assert layer.bias.sequence_parallel
        comm.all_reduce_grads([layer.bias], g)  # each rank saw only its part of the sequence
    return {
        "weight.init": relative_error(layer.weight, shard(weight, 1, tp, r)),
        "output": relative_error(y, sp_shard(y_ref)),
        "input.grad": relative_error(x.grad, shard(x_ref.grad, -1, tp, r) if input_is_parallel else x_ref.grad),
        "weight.grad": relative_error(layer.weight.grad, shard(w_ref.grad, 1, tp, r)),
        "bias.grad": relative_error(layer.bias.grad, b_ref.grad),
    }


def embedding_checks(ctx, tp: int, sequence_parallel: bool, divisible_by: int) -> dict:
    """VocabParallelEmbedding(50 words, 5 dims) against F.embedding on the unpadded table."""
    state = ctx.parallel_state(tp=tp)
    g, r = state.tp_group, state.tp_rank
    vocab, dim, seed = 50, 5, 31
    padded = padded_vocab_size(vocab, tp, divisible_by)
    weight = full_weight(seed, padded, dim, valid_rows=vocab)
    torch.manual_seed(seed)
    layer = VocabParallelEmbedding(
        vocab, dim, tp_group=g, make_vocab_size_divisible_by=divisible_by, sequence_parallel=sequence_parallel
    )
    ids = torch.randint(0, vocab, (SEQ, BATCH), generator=torch.Generator().manual_seed(8))
    ids[0, 0], ids[1, 0] = 0, vocab - 1  # both ends of the vocabulary
    dy_full = randn(9, SEQ, BATCH, dim)

    w_ref = leaf(weight[:vocab])
    y_ref = F.embedding(ids, w_ref)
    y_ref.backward(dy_full)
    grad_ref = torch.cat([w_ref.grad, torch.zeros(padded - vocab, dim)])

    y = layer(ids)
    sp_shard = (lambda t: shard(t, 0, tp, r)) if sequence_parallel else (lambda t: t)
    y.backward(sp_shard(dy_full))
    return {
        "weight.init": relative_error(layer.weight, shard(weight, 0, tp, r)),
        "output": relative_error(y, sp_shard(y_ref)),
        "weight.grad": relative_error(layer.weight.grad, shard(grad_ref, 0, tp, r)),
        "padded_rows": float(layer.padded_num_embeddings != padded),
    }


def cross_entropy_checks(ctx, tp: int, label_smoothing: float, divisible_by: int) -> dict:
    """vocab_parallel_cross_entropy against F.cross_entropy over the real (unpadded) vocabulary."""
    state = ctx.parallel_state(tp=tp)
    g, r = state.tp_group, state.tp_rank
    vocab = 50
    padded = padded_vocab_size(vocab, tp, divisible_by)
    logits = randn(12, SEQ, BATCH, padded) * 3.0
    logits[..., vocab:] = 50.0  # padding columns must not take part, however large
    target = torch.randint(0, vocab, (SEQ, BATCH), generator=torch.Generator().manual_seed(13))
    target[0, :] = -100  # ignored
    target[1, 0], target[2, 0] = 0, vocab - 1
    grad_loss = randn(14, SEQ, BATCH)

    ref_logits = leaf(logits[..., :vocab])
    ref_loss = F.cross_entropy(
        ref_logits.reshape(-1, vocab), target.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).reshape(SEQ, BATCH)
    ref_loss.backward(grad_loss)
    ref_grad = torch.cat([ref_logits.grad, torch.zeros(SEQ, BATCH, padded - vocab)], dim=-1)

    local = leaf(shard(logits, -1, tp, r))
    loss = vocab_parallel_cross_entropy(local, target, g, vocab_size=vocab, label_smoothing=label_smoothing)
    loss.backward(grad_loss)
    return {
        "loss": relative_error(loss, ref_loss),
        "logits.grad": relative_error(local.grad, shard(ref_grad, -1, tp, r)),
        "ignored.loss": float(loss[0].abs().max()),
        "ignored.grad": float(local.grad[0].abs().max()),
    }


def bad_input_messages(ctx) -> dict[str, str]:
    """The one-line errors for shapes that do not split over tp=4."""
    g = ctx.parallel_state(tp=4).tp_group
    attempts = {
        "column": lambda: ColumnParallelLinear(8, 10, tp_group=g),
        "row": lambda: RowParallelLinear(10, 8, tp_group=g, input_is_parallel=True),
        "sequence": lambda: RowParallelLinear(8, 8, tp_group=g, input_is_parallel=True, sequence_parallel=True)(
            torch.ones(6, 1, 2)
        ),
        "sp_needs_parallel_input": lambda: RowParallelLinear(8, 8, tp_group=g, sequence_parallel=True),
        "gather_with_sp": lambda: ColumnParallelLinear(8, 8, tp_group=g, gather_output=True, sequence_parallel=True),
        "ce_vocab": lambda: vocab_parallel_cross_entropy(torch.ones(2, 3), torch.zeros(2, dtype=torch.long), g, vocab_size=13),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            messages[name] = "no error"
        except ConfigError as error:
            messages[name] = str(error)
    return messages
