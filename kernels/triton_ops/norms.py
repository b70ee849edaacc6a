"""RMSNorm and LayerNorm over the last dimension as Triton kernels, forward and backward.

One program normalises one row held whole in a power-of-two block (masked past the width), so
the statistics need no second pass. The backward gives dx per row; the weight and bias grads
are summed by a fixed number of programs, each over a stride of rows, into fp32 partial rows
that torch adds up: no atomics, and the same sum on every run.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WIDTH = 65536  # one row must fit one block


@triton.jit
def _norm_forward(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, x_row_stride, y_row_stride, width, eps,
                  RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=inside, other=0.0).to(tl.float32)
    if RMS:
        centred = x
    else:
        mean = tl.sum(x, axis=0) / width
        centred = tl.where(inside, x - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / width + eps)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = w + 1.0
    y = centred * rstd * w
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * y_row_stride + cols, y.to(y_ptr.dtype.element_ty), mask=inside)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _norm_backward(x_ptr, w_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, dw_part_ptr, db_part_ptr,
                   x_row_stride, dy_row_stride, dx_row_stride, rows, width,
                   RMS: tl.constexpr, HAS_BIAS: tl.constexpr, ZERO_CENTERED: tl.constexpr, BLOCK: tl.constexpr):
    """Program p handles rows p, p + P, p + 2P, ... and writes its partial weight (and bias)
    grads to row p of the partial buffers."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    w = tl.load(w_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    if ZERO_CENTERED:
        w = w + 1.0
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    db = tl.zeros((BLOCK,), dtype=tl.float32)
    first = pid.to(tl.int64)  # row offsets in int64: rows * stride may pass 2**31
    step = programs.to(tl.int64)
    x_ptr += first * x_row_stride
    dy_ptr += first * dy_row_stride
    dx_ptr += first * dx_row_stride
    for row in range(pid, rows, programs):
        x = tl.load(x_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            xhat = x * rstd
        else:
            xhat = tl.where(inside, (x - tl.load(mean_ptr + row)) * rstd, 0.0)
        wdy = w * dy
        proj = tl.sum(wdy * xhat, axis=0) / width
        if RMS:
            dx = (wdy - xhat * proj) * rstd
        else:
            dx = (wdy - tl.sum(wdy, axis=0) / width - xhat * proj) * rstd
        tl.store(dx_ptr + cols, dx.to(dx_ptr.dtype.element_ty), mask=inside)
        x_ptr += step * x_row_stride
        dy_ptr += step * dy_row_stride
        dx_ptr += step * dx_row_stride
        dw += dy * xhat
        if HAS_BIAS:
            db += dy
    tl.store(dw_part_ptr + pid * width + cols, dw, mask=inside)
    if HAS_BIAS:
        tl.store(db_part_ptr + pid * width + cols, db, mask=inside)


def _rows(t: torch.Tensor, width: int) -> torch.Tensor:
    """t as [rows, width] with unit column stride (a copy only when the layout needs one)."""
    t = t.reshape(-1, width)
    return t if t.stride(-1) == 1 else t.contiguous()


def _warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


def _backward_programs(rows: int, device: torch.device) -> int:
    """Enough programs to fill the GPU; few under the interpreter, which runs them one by one."""
    if device.type == "cuda":
        return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(rows, 4))


class _Norm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps, rms, zero_centered):
        width = x.shape[-1]
        x2 = _rows(x, width)
        rows = x2.shape[0]
        y = torch.empty((rows, width), dtype=x.dtype, device=x.device)
        mean = torch.empty(rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(width)
        weight_c = weight.contiguous()
        bias_c = bias.contiguous() if bias is not None else None
        if rows:
            _norm_forward[(rows,)](x2, weight_c, bias_c if bias_c is not None else weight_c, y, mean, rstd,
                                   x2.stride(0), y.stride(0), width, eps, RMS=rms, HAS_BIAS=bias is not None,
                                   ZERO_CENTERED=zero_centered, BLOCK=block, num_warps=_warps(block))
        ctx.save_for_backward(x2, weight_c, mean, rstd)
        ctx.flags = (rms, bias is not None, zero_centered, block, bias.dtype if bias is not None else None)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, weight, mean, rstd = ctx.saved_tensors
        rms, has_bias, zero_centered, block, bias_dtype = ctx.flags
        rows, width = x2.shape
        dy2 = _rows(dy, width)
        dx = torch.empty_like(x2, memory_format=torch.contiguous_format)
        programs = _backward_programs(rows, x2.device)
        dw_part = torch.zeros((programs, width), dtype=torch.float32, device=x2.device)
        db_part = torch.zeros((programs, width), dtype=torch.float32, device=x2.device) if has_bias else dw_part
        if rows:
            _norm_backward[(programs,)](x2, weight, dy2, dx, mean, rstd, dw_part, db_part,
                                        x2.stride(0), dy2.stride(0), dx.stride(0), rows, width,
                                        RMS=rms, HAS_BIAS=has_bias, ZERO_CENTERED=zero_centered, BLOCK=block,
                                        num_warps=_warps(block))
        dweight = dw_part.sum(0).to(weight.dtype)
        dbias = db_part.sum(0).to(bias_dtype) if has_bias else None
        return dx.view(ctx.x_shape), dweight, dbias, None, None, None


def _check(x, weight, bias, name):
    width = x.shape[-1] if x.dim() else 0
    if x.dim() == 0 or width == 0:
        raise ValueError(f"{name} needs x with a non-empty last dimension, got shape {tuple(x.shape)}")
    if width > MAX_WIDTH:
        raise ValueError(f"{name} normalises rows of at most {MAX_WIDTH} features in one block, got {width}")
    for label, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (width,):
            raise ValueError(f"{name} {label} must have shape ({width},) to match x's last dimension, "
                             f"got {tuple(t.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, zero_centered_gamma: bool = False):
    """x / rms(x) * weight (1 + weight with zero_centered_gamma), fp32 inside, x's dtype out."""
    _check(x, weight, None, "rms_norm")
    return _Norm.apply(x, weight, None, float(eps), True, bool(zero_centered_gamma))


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float = 1e-5, *,
               zero_centered_gamma: bool = False):
    """(x - mean) / std * weight + bias (bias may be None), fp32 inside, x's dtype out."""
    _check(x, weight, bias, "layer_norm")
    return _Norm.apply(x, weight, bias, float(eps), False, bool(zero_centered_gamma))
