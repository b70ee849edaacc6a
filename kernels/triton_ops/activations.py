"""The MLP's fused activations as Triton kernels: bias + tanh-GeLU, and SwiGLU, forward and backward.

Both work on x viewed as [rows, features] in 2-D tiles. gelu_tanh(z) = 0.5 z (1 + tanh(u)) is
written as z * sigmoid(2u), the same function without a tanh. The bias grad is the column sum
of dz: each row-block of programs writes its fp32 partial sums, and torch adds the few partial
rows (no atomics, so the sum is the same on every run).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_K = math.sqrt(2.0 / math.pi)  # tanh-GeLU: u = K (z + A z^3)
_A = 0.044715
BLOCK_M, BLOCK_N = 16, 128


@triton.jit
def _gelu_parts(z, K: tl.constexpr, A: tl.constexpr):
    """gelu_tanh(z) and its derivative, in fp32."""
    u = K * (z + A * z * z * z)
    sig = tl.sigmoid(2.0 * u)
    grad = sig + z * 2.0 * sig * (1.0 - sig) * K * (1.0 + 3.0 * A * z * z)
    return z * sig, grad


@triton.jit
def _bias_gelu_forward(x_ptr, b_ptr, y_ptr, rows, cols, sx, sy, K: tl.constexpr, A: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    z = tl.load(x_ptr + r[:, None] * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
    z += tl.load(b_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_parts(z, K, A)
    tl.store(y_ptr + r[:, None] * sy + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward(x_ptr, b_ptr, dy_ptr, dx_ptr, db_part_ptr, rows, cols, sx, sdy, sdx,
                        K: tl.constexpr, A: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx = dy * gelu'(x + b); row-block p's column sums of dx go to row p of db_part."""
    block = tl.program_id(0)
    r = block.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < rows)[:, None] & (c < cols)[None, :]
    z = tl.load(x_ptr + r[:, None] * sx + c[None, :], mask=mask, other=0.0).to(tl.float32)
    z += tl.load(b_ptr + c, mask=c < cols, other=0.0).to(tl.float32)[None, :]
    dy = tl.load(dy_ptr + r[:, None] * sdy + c[None, :], mask=mask, other=0.0).to(tl.float32)
    _, grad = _gelu_parts(z, K, A)
    dx = tl.where(mask, dy * grad, 0.0)
    tl.store(dx_ptr + r[:, None] * sdx + c[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(db_part_ptr + block.to(tl.int64) * cols + c, tl.sum(dx, axis=0), mask=c < cols)


@triton.jit
def _swiglu_forward(x_ptr, y_ptr, rows, half, sx, sy, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < rows)[:, None] & (c < half)[None, :]
    at = x_ptr + r[:, None] * sx + c[None, :]
    gate = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(at + half, mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + r[:, None] * sy + c[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_backward(x_ptr, dy_ptr, dx_ptr, rows, half, sx, sdy, sdx, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """d gate = dy * up * silu'(gate), d up = dy * silu(gate), written to the two halves of dx."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (r < rows)[:, None] & (c < half)[None, :]
    at = x_ptr + r[:, None] * sx + c[None, :]
    gate = tl.load(at, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(at + half, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + r[:, None] * sdy + c[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    d_gate = dy * up * (sig + silu * (1.0 - sig))
    out = dx_ptr + r[:, None] * sdx + c[None, :]
    tl.store(out, d_gate.to(dx_ptr.dtype.element_ty), mask=mask)
    tl.store(out + half, (dy * silu).to(dx_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with unit column stride (a copy only when the layout needs one)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _grid(rows: int, cols: int):
    return (triton.cdiv(rows, BLOCK_M), triton.cdiv(cols, BLOCK_N))


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias):
        cols = x.shape[-1]
        x2, bias_c = _rows(x, cols), bias.contiguous()
        y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
        if x2.numel():
            _bias_gelu_forward[_grid(*x2.shape)](x2, bias_c, y, *x2.shape, x2.stride(0), y.stride(0),
                                                 K=_K, A=_A, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        ctx.save_for_backward(x2, bias_c)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, bias = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = _rows(dy, cols)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        grid = _grid(rows, cols)
        db_part = torch.zeros((max(grid[0], 1), cols), dtype=torch.float32, device=x2.device)
        if x2.numel():
            _bias_gelu_backward[grid](x2, bias, dy2, dx, db_part, rows, cols, x2.stride(0), dy2.stride(0),
                                      dx.stride(0), K=_K, A=_A, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        return dx.view(ctx.x_shape), db_part.sum(0).to(bias.dtype)


class _Swiglu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x2 = _rows(x, x.shape[-1])
        rows, half = x2.shape[0], x2.shape[1] // 2
        y = torch.empty((rows, half), dtype=x.dtype, device=x.device)
        if y.numel():
            _swiglu_forward[_grid(rows, half)](x2, y, rows, half, x2.stride(0), y.stride(0),
                                               BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        ctx.save_for_backward(x2)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], half)

    @staticmethod
    def backward(ctx, dy):
        (x2,) = ctx.saved_tensors
        rows, half = x2.shape[0], x2.shape[1] // 2
        dy2 = _rows(dy, half)
        dx = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        if dx.numel():
            _swiglu_backward[_grid(rows, half)](x2, dy2, dx, rows, half, x2.stride(0), dy2.stride(0), dx.stride(0),
                                                BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N)
        return dx.view(ctx.x_shape)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(x + bias), bias [x.shape[-1]]; fp32 inside (x + bias not rounded first), x's dtype out."""
    if x.dim() == 0 or tuple(bias.shape) != (x.shape[-1],):
        raise ValueError(f"bias_gelu needs bias of shape (x.shape[-1],), got x {tuple(x.shape)} "
                         f"and bias {tuple(bias.shape)}")
    return _BiasGelu.apply(x, bias)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x [..., 2f] = [gate | up]; fp32 inside, x's dtype out [..., f]."""
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension [..., 2f], got shape {tuple(x.shape)}")
    return _Swiglu.apply(x)
