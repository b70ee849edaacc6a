"""Fused cross-entropy (Megatron's --cross-entropy-loss-fusion) that never makes an fp32 copy of the logits.

The logits are the largest activation of a language model (`[tokens, vocab]`), so an fp32 copy of
bf16 logits, kept for backward, costs twice their size again. Here a forward kernel reads the logits
in their own dtype, vocab block by vocab block, and keeps only per-row statistics: the running max
and sum of exponentials (an online softmax), the target logit and, for label smoothing, the sum of
the logits. Under vocab parallelism the caller's `all_reduce` combines those `[tokens]` vectors
(max first, then each rank rescales its sum to the global max, then one sum), the loss follows in
torch, and backward is a second kernel that recomputes the softmax from the saved logits and the
saved log-sum-exp and writes the gradient in the logits' dtype.

The gradient goes to a new tensor, not into the logits' storage: the caller may still hold the
logits (or another op may have saved them), and writing over them would corrupt both silently;
a new tensor in the logits' dtype is what autograd would allocate anyway.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

_TILE = 8192  # elements of one [rows, columns] tile a program holds at once
_MAX_BLOCK_V = 4096


@triton.jit
def _forward_stats(logits, target, row_max, stats, n_rows, n_real, stride_r, stride_c, vocab_start,
                   SMOOTH: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Per row over the real columns: max, sum of exp(z - max), the target logit and the sum of z."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    row_base = logits + rows.to(tl.int64)[:, None] * stride_r
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_T], tl.float32)
    z_sum = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, n_real, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        ok = row_ok[:, None] & (cols < n_real)[None, :]
        z = tl.load(row_base + cols.to(tl.int64)[None, :] * stride_c, mask=ok, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing real yet: no nan
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
        m = m_new
        if SMOOTH:
            z_sum += tl.sum(tl.where(ok, z, 0.0), axis=1)
    local = tl.load(target + rows, mask=row_ok, other=0).to(tl.int64) - vocab_start
    hit = row_ok & (local >= 0) & (local < n_real)
    z_t = tl.load(logits + rows.to(tl.int64) * stride_r + local * stride_c, mask=hit, other=0.0).to(tl.float32)
    tl.store(row_max + rows, m, mask=row_ok)
    tl.store(stats + rows, s, mask=row_ok)
    tl.store(stats + n_rows + rows, z_t, mask=row_ok)
    if SMOOTH:
        tl.store(stats + 2 * n_rows + rows, z_sum, mask=row_ok)


@triton.jit
def _backward_grad(logits, target, lse, grad_loss, grad, n_rows, n_cols, n_real, stride_r, stride_c, vocab_start,
                   keep, smooth_per_column, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """grad = (softmax - keep * onehot - smooth_per_column over real columns) * grad_loss; 0 on padding."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    real = row_ok[:, None] & (cols < n_real)[None, :]
    offsets = rows.to(tl.int64)[:, None] * stride_r + cols.to(tl.int64)[None, :] * stride_c
    z = tl.load(logits + offsets, mask=real, other=float("-inf")).to(tl.float32)
    row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
    g = tl.load(grad_loss + rows, mask=row_ok, other=0.0)
    local = tl.load(target + rows, mask=row_ok, other=0).to(tl.int64) - vocab_start
    p = tl.exp(z - row_lse[:, None])
    p = p - tl.where(cols[None, :] == local[:, None], keep, 0.0) - smooth_per_column
    out = tl.where(real, p * g[:, None], 0.0)
    written = row_ok[:, None] & (cols < n_cols)[None, :]
    out_offsets = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    tl.store(grad + out_offsets, out.to(grad.dtype.element_ty), mask=written)


def _blocks(n_rows: int, n_cols: int) -> tuple[int, int]:
    block_v = min(triton.next_power_of_2(max(n_cols, 1)), _MAX_BLOCK_V)
    block_t = max(1, min(triton.next_power_of_2(max(n_rows, 1)), _TILE // block_v))
    return block_t, block_v


class _CrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_size, ignore_index, label_smoothing, all_reduce):
        n_rows, n_cols = logits.shape
        n_real = max(0, min(n_cols, vocab_size - vocab_start))
        smooth = label_smoothing > 0
        target = target.contiguous()
        row_max = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
        stats = torch.empty(3 if smooth else 2, n_rows, dtype=torch.float32, device=logits.device)
        block_t, block_v = _blocks(n_rows, n_real)
        if n_rows:
            _forward_stats[(triton.cdiv(n_rows, block_t),)](
                logits, target, row_max, stats, n_rows, n_real, logits.stride(0), logits.stride(1), vocab_start,
                SMOOTH=smooth, BLOCK_T=block_t, BLOCK_V=block_v)
        if all_reduce is not None:
            local_max = row_max.clone()
            all_reduce(row_max, "max")
            # each rank's sum of exponentials was taken about its own max: bring it to the global one
            rescale = torch.where(local_max == float("-inf"), 0.0, torch.exp(local_max - row_max))
            stats[0].mul_(rescale)
            all_reduce(stats, "sum")
        lse = row_max + stats[0].log()
        loss = lse - stats[1]
        if smooth:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - stats[2] / vocab_size)
        valid = target != ignore_index
        loss = torch.where(valid, loss, 0.0)
        ctx.save_for_backward(logits, target, lse, valid)
        ctx.geometry = (n_real, vocab_start, vocab_size, label_smoothing)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, target, lse, valid = ctx.saved_tensors
        n_real, vocab_start, vocab_size, eps = ctx.geometry
        n_rows, n_cols = logits.shape
        grad = torch.empty((n_rows, n_cols), dtype=logits.dtype, device=logits.device)
        scale = torch.where(valid, grad_loss.float(), 0.0).contiguous()
        block_t, block_v = _blocks(n_rows, n_cols)
        if grad.numel():
            grid = (triton.cdiv(n_rows, block_t), triton.cdiv(n_cols, block_v))
            _backward_grad[grid](logits, target, lse, scale, grad, n_rows, n_cols, n_real, logits.stride(0),
                                 logits.stride(1), vocab_start, 1.0 - eps, eps / vocab_size,
                                 BLOCK_T=block_t, BLOCK_V=block_v)
        return grad, None, None, None, None, None, None


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int = 0, vocab_size: int | None = None,
                  ignore_index: int = -100, label_smoothing: float = 0.0, all_reduce=None) -> torch.Tensor:
    """Per-token fp32 loss from `[tokens, local_vocab]` logits (any float dtype, any strides)."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"cross_entropy wants logits [tokens, vocab] and target [tokens], "
                         f"not {tuple(logits.shape)} and {tuple(target.shape)}")
    vocab_size = vocab_start + logits.shape[1] if vocab_size is None else vocab_size
    return _CrossEntropy.apply(logits, target, vocab_start, vocab_size, ignore_index, label_smoothing, all_reduce)
