"""Rotary embedding (rotate-half) as a Triton kernel, forward and backward.

One program takes one (batch, position) and a block of heads, so each position's cos and sin are
loaded once for all its heads. x is read through its four strides (no copy for a transposed or
sliced layout); the features past rot_dim are copied through. The backward is the same kernel
run as the transposed rotation: with first/second halves (x1, x2) the forward is
y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2, so dx1 = dy1 c1 + dy2 s2, dx2 = dy2 c2 - dy1 s1 — the
inverse rotation (sin negated) when cos and sin repeat across the halves, as Megatron's do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rope(x_ptr, cos_ptr, sin_ptr, y_ptr, seq, heads, dim,
          sx_b, sx_s, sx_h, sx_d, sc_s, sc_r, ss_s, ss_r,
          HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
          TRANSPOSE: tl.constexpr):
    """y is contiguous [b, s, h, dim]; TRANSPOSE applies the rotation's transpose (the backward)."""
    position = tl.program_id(0).to(tl.int64)  # b * seq + s
    b = position // seq
    s = position % seq
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    f = tl.arange(0, BLOCK_HALF)
    in_h = h < heads
    in_f = f < HALF
    c1 = tl.load(cos_ptr + s * sc_s + f * sc_r, mask=in_f, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + s * sc_s + (f + HALF) * sc_r, mask=in_f, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + s * ss_s + f * ss_r, mask=in_f, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + s * ss_s + (f + HALF) * ss_r, mask=in_f, other=0.0).to(tl.float32)
    if TRANSPOSE:
        s1, s2 = -s2, -s1
    rows = b * sx_b + s * sx_s + h[:, None].to(tl.int64) * sx_h
    mask = in_h[:, None] & in_f[None, :]
    x1 = tl.load(x_ptr + rows + f[None, :] * sx_d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + rows + (f[None, :] + HALF) * sx_d, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * c1[None, :] - x2 * s1[None, :]
    y2 = x2 * c2[None, :] + x1 * s2[None, :]
    out = y_ptr + position * heads * dim + h[:, None].to(tl.int64) * dim
    tl.store(out + f[None, :], y1.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(out + f[None, :] + HALF, y2.to(y_ptr.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = in_h[:, None] & (p < dim)[None, :]
        rest = tl.load(x_ptr + rows + p[None, :] * sx_d, mask=pmask, other=0.0)
        tl.store(out + p[None, :], rest.to(y_ptr.dtype.element_ty), mask=pmask)


def _apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, transpose: bool) -> torch.Tensor:
    batch, seq, heads, dim = x.shape
    rotary = cos.shape[-1]
    y = torch.empty((batch, seq, heads, dim), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    # a cos/sin of one position broadcasts over the sequence, as in the reference
    cos_s = cos.stride(0) if cos.shape[0] == seq else 0
    sin_s = sin.stride(0) if sin.shape[0] == seq else 0
    block_h = min(triton.next_power_of_2(heads), 16)
    block_half = triton.next_power_of_2(rotary // 2)
    block_pass = triton.next_power_of_2(dim - rotary) if dim > rotary else 0
    grid = (batch * seq, triton.cdiv(heads, block_h))
    _rope[grid](x, cos, sin, y, seq, heads, dim, *x.stride(), cos_s, cos.stride(1), sin_s, sin.stride(1),
                HALF=rotary // 2, BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_PASS=block_pass,
                TRANSPOSE=transpose, num_warps=4)
    return y


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _apply(x, cos, sin, transpose=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _apply(dy, cos, sin, transpose=True), None, None


def _check(x, cos, sin):
    if x.dim() != 4:
        raise ValueError(f"rope needs x as [batch, seq, heads, head_dim], got shape {tuple(x.shape)}")
    seq, dim = x.shape[1], x.shape[3]
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.shape[0] not in (seq, 1) or t.shape[1] % 2 or not 0 < t.shape[1] <= dim:
            raise ValueError(f"rope needs {name} as [seq={seq}, rot_dim] with rot_dim even and <= head_dim={dim}, "
                             f"got shape {tuple(t.shape)}")
    if cos.shape != sin.shape:
        raise ValueError(f"rope needs cos and sin of one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("the Triton rope gives no gradient for cos and sin: pass them detached (they are buffers)")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [b, s, h, d] with any strides; cos and sin [s, rot_dim]; fp32 math, x's dtype out (contiguous)."""
    _check(x, cos, sin)
    return _Rope.apply(x, cos, sin)
