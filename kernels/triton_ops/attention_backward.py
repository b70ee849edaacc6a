"""The FlashAttention-2 backward: probabilities recomputed from the saved fp32 log-sum-exp.

Three kernels: delta = rowsum(dO * O) - dlse (the softmax backward's row term; dlse is the
gradient reaching a returned lse), then dK/dV with one program per key block of a kv head that
loops over the query heads of its GQA group (over a share of them, summed in torch, when there
are too few programs to fill a GPU), then dQ with one program per query block. A
fully masked row (lse = finfo(fp32).min) gets p = 0 in the kernels: its scores are constants,
so it feeds no gradient to q or k, and its uniform weights add dO / sk to every value row,
which torch adds afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# finfo(float32).min: the score of a masked position, as megalith's local attention path uses.
MASKED = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation; "upcast" multiplies in fp32 (the CPU interpreter's bf16 dot is wrong)."""
    if PRECISION == "upcast":
        product = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        product = tl.dot(a, b, input_precision=PRECISION)
    return product


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, stride_ob, stride_os, stride_oh, stride_od,
                  stride_gb, stride_gs, stride_gh, stride_gd, s_q, heads, D,
                  HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta[b, h, i] = sum_d dO * O - dlse, in fp32."""
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = (bh % heads).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < s_q
    mask = row_ok[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * s_q + rows, mask=row_ok, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * s_q + rows, delta, mask=row_ok)


@triton.jit
def _row_lse(LSE, offset, row_ok):
    """The saved lse, +inf past the end and on fully masked rows (lse = finfo.min): p = 0 there."""
    lse = tl.load(LSE + offset, mask=row_ok, other=float("inf"))
    return tl.where(lse == MASKED, float("inf"), lse)


@triton.jit
def _probs(q, k, lse, mask_base, rows, row_ok, cols, col_ok, stride_ms, stride_mk, diag, scale,
           CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """The softmax probabilities of one [BLOCK_M, BLOCK_N] tile, 0 where masked; lse is +inf on
    fully masked rows (see _row_lse), so they are 0 too."""
    scores = _mm(q, tl.trans(k), PRECISION) * scale
    if CAUSAL:
        scores = tl.where(cols[None, :] > rows[:, None] + diag, MASKED, scores)
    if HAS_MASK:
        hidden = tl.load(mask_base + rows[:, None].to(tl.int64) * stride_ms + cols[None, :] * stride_mk,
                         mask=row_ok[:, None] & col_ok[None, :], other=0)
        scores = tl.where(hidden != 0, MASKED, scores)
    return tl.where(col_ok[None, :], tl.exp(scores - lse[:, None]), 0.0)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, LSE, DELTA, MASK, DK, DV,
                 stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
                 stride_vb, stride_vs, stride_vh, stride_vd, stride_gb, stride_gs, stride_gh, stride_gd,
                 stride_mb, stride_mh, stride_ms, stride_mk,
                 s_q, s_k, heads, kv_heads, group, per_split, split_stride, scale, D,
                 CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Program (key block, batch * kv head, split): dK and dV summed over `per_split` query heads
    of the kv head's group. DK and DV are contiguous [splits, b, sk, kv_heads, d]."""
    start_n = tl.program_id(0) * BLOCK_N
    bkv = tl.program_id(1)
    b = (bkv // kv_heads).to(tl.int64)
    kvh = (bkv % kv_heads).to(tl.int64)
    cols = start_n + tl.arange(0, BLOCK_N)
    col_ok = cols < s_k
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * stride_kb + kvh * stride_kh + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + kvh * stride_vh + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    diag = s_k - s_q
    lo = 0
    if CAUSAL:  # rows before start_n - diag see none of this block (fully masked rows are 0 here)
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
    first = tl.program_id(2) * per_split
    for g in range(first, tl.minimum(first + per_split, group)):
        h = kvh * group + g
        bh = b * heads + h
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_gb + h * stride_gh
        mask_base = MASK + b * stride_mb + h * stride_mh
        for start_m in range(lo, s_q, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < s_q
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=q_mask, other=0.0)
            do = tl.load(do_base + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=q_mask, other=0.0)
            lse = _row_lse(LSE, bh * s_q + rows, row_ok)
            delta = tl.load(DELTA + bh * s_q + rows, mask=row_ok, other=0.0)
            p = _probs(q, k, lse, mask_base, rows, row_ok, cols, col_ok, stride_ms, stride_mk, diag, scale,
                       CAUSAL, HAS_MASK, PRECISION)
            dv += _mm(tl.trans(p).to(do.dtype), do, PRECISION)
            dp = _mm(do, tl.trans(v), PRECISION)
            ds = p * (dp - delta[:, None])
            dk += _mm(tl.trans(ds).to(q.dtype), q, PRECISION)
    out_offs = (tl.program_id(2).to(tl.int64) * split_stride + b * s_k * kv_heads * D + cols[:, None] * (kv_heads * D)
                + kvh * D + offs_d[None, :])
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, MASK, DQ,
               stride_qb, stride_qs, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
               stride_vb, stride_vs, stride_vh, stride_vd, stride_gb, stride_gs, stride_gh, stride_gd,
               stride_mb, stride_mh, stride_ms, stride_mk,
               s_q, s_k, heads, group, scale, D,
               CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """Program (query block, batch * head): dQ for BLOCK_M rows. DQ is contiguous [b, s, heads, d]."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b = bh // heads
    h = bh % heads
    kvh = h // group
    rows = start_m + tl.arange(0, BLOCK_M)
    row_ok = rows < s_q
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=q_mask, other=0.0)
    do = tl.load(DO + b * stride_gb + h * stride_gh + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=q_mask, other=0.0)
    lse = _row_lse(LSE, bh * s_q + rows, row_ok)
    delta = tl.load(DELTA + bh * s_q + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + kvh * stride_kh
    v_base = V + b * stride_vb + kvh * stride_vh
    mask_base = MASK + b * stride_mb + h * stride_mh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    diag = s_k - s_q
    hi = s_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(start_m + BLOCK_M + diag, s_k), 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < s_k
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
        p = _probs(q, k, lse, mask_base, rows, row_ok, cols, col_ok, stride_ms, stride_mk, diag, scale,
                   CAUSAL, HAS_MASK, PRECISION)
        dp = _mm(do, tl.trans(v), PRECISION)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, PRECISION)
    out_offs = b * s_q * heads * D + rows[:, None] * (heads * D) + h * D + offs_d[None, :]
    tl.store(DQ + out_offs, (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)


def precision(dtype: torch.dtype, device: torch.device) -> str:
    """fp32 inputs multiply in full fp32 ("ieee", not TF32): the kernels must equal the reference.
    bf16 under the CPU interpreter multiplies its bf16-rounded operands in fp32, as its bf16 dot
    returns garbage (triton 3.9); on a GPU bf16 and fp16 use the tensor cores."""
    if dtype == torch.float32:
        return "ieee"
    return "upcast" if dtype == torch.bfloat16 and device.type == "cpu" else "tf32"


def tiles(table: dict, head_dim: int, dtype: torch.dtype, cuda: bool) -> dict:
    """Block sizes for head_dim: 32 x 32 on the CPU interpreter (each program is numpy), from
    `table` on CUDA. BLOCK_D is head_dim padded to a power of two (masked), at least 16 for tl.dot."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if not cuda:
        return dict(BLOCK_M=32, BLOCK_N=32, BLOCK_D=block_d)
    for bound, block_m, block_n, warps in table[min(dtype.itemsize, 4)]:
        if head_dim <= bound:
            return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=warps, num_stages=2)
    raise ValueError(f"head_dim {head_dim} is over 256")


# (head_dim bound, BLOCK_M, BLOCK_N, num_warps) on CUDA, per kernel, for 2-byte and fp32 inputs
# (as attention.FORWARD_TILES): the dK/dV program keeps k, v, dk and dv tiles resident.
DKDV_TILES = {2: ((64, 64, 64, 8), (128, 32, 32, 4), (256, 32, 32, 4)),
              4: ((64, 16, 32, 4), (128, 16, 16, 8), (256, 16, 16, 8))}
DQ_TILES = {2: ((64, 64, 64, 8), (128, 64, 64, 8), (256, 32, 64, 8)),
            4: ((64, 32, 32, 8), (128, 32, 16, 8), (256, 16, 16, 8))}


def group_splits(programs: int, group: int, cuda: bool) -> int:
    """How many programs share one kv head's query heads in dK/dV: with few kv heads and a small
    batch (MQA, or GQA under tensor parallelism) one program per key block leaves most of a GPU
    idle, so split the group until there are some 512 programs; each split then writes fp32
    partial sums that torch adds. One on the CPU interpreter, which gains nothing."""
    if not cuda or group == 1:
        return 1
    return max(1, min(group, triton.cdiv(512, programs)))


def attention_backward(q, k, v, out, lse, mask, dout, dlse, *, causal: bool, scale: float, splits: int | None = None):
    """dq, dk, dv (in q's dtype) for out, lse = attention(q, k, v); mask is the forward's uint8
    [b, heads, s, sk] operand or None; `splits` overrides group_splits (tests)."""
    b, s, heads, d = q.shape
    sk, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    if dout is None:
        dout = torch.zeros_like(out)
    dkdv_tiles, dq_tiles = (tiles(table, d, q.dtype, q.is_cuda) for table in (DKDV_TILES, DQ_TILES))
    delta = torch.empty_like(lse)
    dlse_arg = dlse.contiguous() if dlse is not None else lse
    _delta_kernel[(triton.cdiv(s, dq_tiles["BLOCK_M"]), b * heads)](
        out, dout, dlse_arg, delta, *out.stride(), *dout.stride(), s, heads, d, HAS_DLSE=dlse is not None,
        BLOCK_M=dq_tiles["BLOCK_M"], BLOCK_D=dq_tiles["BLOCK_D"])
    has_mask = mask is not None
    if mask is None:
        mask, mask_strides = torch.zeros(1, dtype=torch.uint8, device=q.device), (0, 0, 0, 0)
    else:
        mask_strides = tuple(mask.stride())
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *mask_strides)
    flags = dict(CAUSAL=causal, HAS_MASK=has_mask, PRECISION=precision(q.dtype, q.device))
    key_blocks = triton.cdiv(sk, dkdv_tiles["BLOCK_N"])
    splits = group_splits(key_blocks * b * kv_heads, group, q.is_cuda) if splits is None else splits
    per_split = triton.cdiv(group, splits)
    splits = triton.cdiv(group, per_split)
    partial = torch.float32 if splits > 1 else k.dtype
    dk = torch.empty(splits, b, sk, kv_heads, d, dtype=partial, device=k.device)
    dv = torch.empty(splits, b, sk, kv_heads, d, dtype=partial, device=v.device)
    _dkdv_kernel[(key_blocks, b * kv_heads, splits)](
        q, k, v, dout, lse, delta, mask, dk, dv, *strides, s, sk, heads, kv_heads, group, per_split, dk[0].numel(),
        scale, d, **flags, **dkdv_tiles)
    dk, dv = (dk[0], dv[0]) if splits == 1 else (dk.sum(0).to(k.dtype), dv.sum(0))
    dq = torch.empty(b, s, heads, d, dtype=q.dtype, device=q.device)
    _dq_kernel[(triton.cdiv(s, dq_tiles["BLOCK_M"]), b * heads)](
        q, k, v, dout, lse, delta, mask, dq, *strides, s, sk, heads, group, scale, d, **flags, **dq_tiles)
    if has_mask or (causal and s > sk):  # fully masked rows weight every key 1 / sk
        full = (lse == torch.finfo(torch.float32).min).to(dout.dtype).unsqueeze(2)  # [b, heads, 1, s]
        spread = torch.matmul(full, dout.transpose(1, 2)).float()  # [b, heads, 1, d]: sum of their dO
        spread = spread.view(b, kv_heads, group, d).sum(dim=2) / sk
        dv = dv.float() + spread.unsqueeze(1)
    return dq, dk, dv.to(v.dtype)
