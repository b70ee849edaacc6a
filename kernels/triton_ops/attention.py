"""Flash attention (the FlashAttention-2 algorithm) as a torch.autograd.Function with Triton kernels.

The forward walks the keys block by block for one block of queries, keeping a running max and
sum (online softmax) so the s x sk score matrix never exists; it saves the output and the fp32
log-sum-exp, from which the backward (attention_backward.py) recomputes the probabilities.

Masked scores are the most negative fp32 number, as in the reference, so a fully masked row
averages v over every key. The forward skips key blocks that causality hides from a whole query
block, and goes back for them only when some row of the block turned out fully masked; the
backward leaves fully masked rows out of its kernels (their scores get no gradient) and adds
their one contribution, dO / sk to every value row, in torch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from megalith_kernels.triton_ops.attention_backward import MASKED, _mm, attention_backward, precision, tiles

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_base, rows, row_ok, offs_d, d_ok, start_n,
               stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, stride_mk, s_k, diag, scale,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax: fold its scores into (acc, l_i, m_i)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < s_k
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    scores = _mm(q, tl.trans(k), PRECISION) * scale
    if CAUSAL:  # query i sees keys <= i + (sk - s)
        scores = tl.where(cols[None, :] > rows[:, None] + diag, MASKED, scores)
    if HAS_MASK:
        hidden = tl.load(mask_base + rows[:, None].to(tl.int64) * stride_ms + cols[None, :] * stride_mk,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
        scores = tl.where(hidden != 0, MASKED, scores)
    scores = tl.where(col_ok[None, :], scores, float("-inf"))  # keys past the end do not exist
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, MASK,
                stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
                stride_vb, stride_vs, stride_vh, stride_vd, stride_ob, stride_os, stride_oh, stride_od,
                stride_mb, stride_mh, stride_ms, stride_mk,
                s_q, s_k, heads, group, scale, D,
                CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block, batch * head): out and lse for BLOCK_M query rows of one head."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    kvh = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < s_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh
    m_i = tl.full([BLOCK_M], MASKED, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = s_k - s_q
    hi = s_k
    if CAUSAL:  # the block's last row sees keys < start_m + BLOCK_M + diag
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, s_k), 0)
    for start_n in range(0, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_base, rows, row_ok, offs_d, d_ok,
                                   start_n, stride_ks, stride_kd, stride_vs, stride_vd, stride_ms, stride_mk,
                                   s_k, diag, scale, CAUSAL, HAS_MASK, BLOCK_N, PRECISION)
    if CAUSAL:
        # a row that saw only masked keys averages over all of them, the hidden ones too
        full = tl.max(((m_i == MASKED) & row_ok).to(tl.int32), 0)
        if full > 0:
            for start_n in range(tl.cdiv(hi, BLOCK_N) * BLOCK_N, s_k, BLOCK_N):  # the blocks not yet seen
                acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_base, v_base, mask_base, rows, row_ok, offs_d,
                                           d_ok, start_n, stride_ks, stride_kd, stride_vs, stride_vd, stride_ms,
                                           stride_mk, s_k, diag, scale, CAUSAL, HAS_MASK, BLOCK_N, PRECISION)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=q_mask)
    tl.store(LSE + bh.to(tl.int64) * s_q + rows, m_i + tl.log(l_safe), mask=row_ok)


# (head_dim bound, BLOCK_M, BLOCK_N, num_warps) on CUDA, for 2-byte and for fp32 inputs: large
# tiles that ptxas fits in registers with little or no spilling on sm_90 (found by compiling
# ahead of time, as the test file's last test does; not timed on a GPU). fp32 multiplies without
# tensor cores ("ieee"), so its tiles are smaller.
FORWARD_TILES = {2: ((64, 64, 64, 8), (128, 64, 64, 8), (256, 32, 32, 4)),
                 4: ((64, 32, 32, 4), (128, 16, 32, 4), (256, 16, 16, 4))}


def mask_operand(attention_mask, b: int, heads: int, s: int, sk: int, device):
    """The mask as uint8 `[b, heads, s, sk]` with stride 0 on broadcast dims (no copy), and its strides."""
    if attention_mask is None:
        return torch.zeros(1, dtype=torch.uint8, device=device), (0, 0, 0, 0)
    if attention_mask.device != device:
        raise ValueError(f"attention_mask is on {attention_mask.device}, q on {device}")
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask.to(torch.bool)
    try:
        mask = torch.broadcast_to(mask, (b, heads, s, sk))
    except RuntimeError:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not broadcast to "
                         f"[b, 1, s, sk] = [{b}, 1, {s}, {sk}]") from None
    mask = mask.view(torch.uint8)
    return mask, tuple(mask.stride())


def check_inputs(q, k, v):
    """One-line errors for shapes and dtypes the kernel cannot take."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention wants q [b, s, h, d] and k, v [b, sk, kv_heads, d]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"k and v must be [b, sk, kv_heads, d] matching q {tuple(q.shape)}; got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads {k.shape[2]} must divide query heads {q.shape[2]}")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"flash_attention takes q, k, v of one dtype among fp32/bf16/fp16; got "
                         f"{q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[3] > 256 or min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"flash_attention takes head_dim 1..256 and non-empty tensors; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")


class FlashAttention(torch.autograd.Function):
    """out, lse = attention(q, k, v); backward in Triton from the saved out and lse."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, attention_mask):
        b, s, heads, d = q.shape
        sk, kv_heads = k.shape[1], k.shape[2]
        mask, mask_strides = mask_operand(attention_mask, b, heads, s, sk, q.device)
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(b, heads, s, dtype=torch.float32, device=q.device)
        config = tiles(FORWARD_TILES, d, q.dtype, q.is_cuda)
        grid = (triton.cdiv(s, config["BLOCK_M"]), b * heads)
        _fwd_kernel[grid](q, k, v, out, lse, mask, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                          *mask_strides, s, sk, heads, heads // kv_heads, scale, d, CAUSAL=causal,
                          HAS_MASK=attention_mask is not None, PRECISION=precision(q.dtype, q.device), **config)
        ctx.set_materialize_grads(False)  # an unused lse sends None, not a tensor of zeros
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.causal, ctx.scale, ctx.has_mask = causal, scale, attention_mask is not None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, mask = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, mask if ctx.has_mask else None, dout, dlse,
                                        causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, scale: float | None = None,
                    attention_mask: torch.Tensor | None = None, return_lse: bool = False):
    """The reference's signature and result; differentiable in q, k, v (and through lse when returned)."""
    check_inputs(q, k, v)
    scale = 1.0 / math.sqrt(q.shape[3]) if scale is None else float(scale)
    out, lse = FlashAttention.apply(q, k, v, bool(causal), scale, attention_mask)
    return (out, lse) if return_lse else out
