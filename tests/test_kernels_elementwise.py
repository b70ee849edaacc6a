"""The Triton norms, rope, bias-GeLU and SwiGLU match their references, forward and every grad.

On a CPU they run under TRITON_INTERPRET=1 (tests/conftest.py). Errors are max |diff| / max |ref|:
fp32 < 1e-5; bf16 inputs are compared with the fp32 reference on the same (bf16-valued) numbers,
within BF16_TOL = 1e-2 (measured <= 7e-3: a bf16 rounding, 2**-8, of inputs, output and grads).
"""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: pip install 'megalith[triton]'")

import megalith_kernels  # noqa: E402
from megalith_kernels import reference, triton_ops  # noqa: E402

FP32_TOL = 1e-5
BF16_TOL = 1e-2


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def _leaf(t: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return t.to(dtype).detach().requires_grad_()


def _check(op, ref, inputs, tol, ref_dtype=torch.float32):
    """op(*inputs) against ref on the same values in ref_dtype: output and grads of every tensor input."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    ref_inputs = [_leaf(t, ref_dtype) if isinstance(t, torch.Tensor) and t.requires_grad else t for t in inputs]
    ref_leaves = [t for t in ref_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    got, want = op(*inputs), ref(*ref_inputs)
    assert got.shape == want.shape and got.dtype == inputs[0].dtype
    assert _rel(got, want) < tol, ("output", _rel(got, want))
    dy = torch.randn(want.shape, generator=torch.Generator().manual_seed(7)).to(got.dtype)
    grads = torch.autograd.grad(got, leaves, dy)
    ref_grads = torch.autograd.grad(want, ref_leaves, dy.to(want.dtype))
    for index, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.shape == r.shape and g.dtype == leaves[index].dtype
        assert _rel(g, r) < tol, (f"grad {index}", _rel(g, r))


def _norm_case(kind, rows, width, dtype=torch.float32, zero_centered=False, seed=0):
    """(triton op, reference op, inputs) for one norm case; the weight is not near 1, to test it."""
    gen = torch.Generator().manual_seed(seed)
    x = _leaf(torch.randn(rows, width, generator=gen) * 3 + 1, dtype)
    w = _leaf(torch.randn(width, generator=gen), dtype)
    if kind == "rms":
        return (lambda x, w: triton_ops.rms_norm(x, w, 1e-5, zero_centered_gamma=zero_centered),
                lambda x, w: reference.rms_norm(x, w, 1e-5, zero_centered_gamma=zero_centered), (x, w))
    b = _leaf(torch.randn(width, generator=gen), dtype) if kind == "layer_bias" else None
    return (lambda x, w, b=None: triton_ops.layer_norm(x, w, b, 1e-5, zero_centered_gamma=zero_centered),
            lambda x, w, b=None: reference.layer_norm(x, w, b, 1e-5, zero_centered_gamma=zero_centered),
            (x, w) if b is None else (x, w, b))


NORMS = ("rms", "layer", "layer_bias")


@pytest.mark.parametrize("kind", NORMS)
def test_norm_quick(kind):
    op, ref, inputs = _norm_case(kind, 17, 40)
    _check(op, ref, inputs, FP32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("zero_centered", (False, True))
@pytest.mark.parametrize("rows,width", ((1, 40), (17, 257), (100, 80), (3, 8192)))
@pytest.mark.parametrize("kind", NORMS)
def test_norm_fp32(kind, rows, width, zero_centered):
    op, ref, inputs = _norm_case(kind, rows, width, zero_centered=zero_centered, seed=rows + width)
    _check(op, ref, inputs, FP32_TOL)


@pytest.mark.slow
@pytest.mark.parametrize("kind", NORMS)
def test_norm_bf16(kind):
    op, ref, inputs = _norm_case(kind, 17, 257, dtype=torch.bfloat16, zero_centered=True)
    _check(op, ref, inputs, BF16_TOL)


@pytest.mark.parametrize("kind", ("rms", "layer_bias"))
def test_zero_centered_equals_reference_with_weight_plus_one(kind):
    op, _, inputs = _norm_case(kind, 17, 80, zero_centered=True)
    if kind == "rms":
        ref = lambda x, w: reference.rms_norm(x, w + 1, 1e-5)  # noqa: E731
    else:
        ref = lambda x, w, b: reference.layer_norm(x, w + 1, b, 1e-5)  # noqa: E731
    _check(op, ref, inputs, FP32_TOL)


def test_norm_non_contiguous_inputs():
    gen = torch.Generator().manual_seed(3)
    w, b = _leaf(torch.randn(40, generator=gen)), _leaf(torch.randn(40, generator=gen))
    sliced = _leaf(torch.randn(2, 9, 100, generator=gen))  # rows with a stride of 100, no copy needed
    transposed = _leaf(torch.randn(40, 17, generator=gen))  # feature stride 17: copied
    for base, view in ((sliced, lambda t: t[..., 10:50]), (transposed, lambda t: t.t())):
        _check(lambda t, w, b: triton_ops.layer_norm(view(t), w, b),
               lambda t, w, b: reference.layer_norm(view(t), w, b), (base, w, b), FP32_TOL)
        _check(lambda t, w: triton_ops.rms_norm(view(t), w), lambda t, w: reference.rms_norm(view(t), w),
               (base, w), FP32_TOL)


def test_public_call_reaches_the_triton_kernels():
    x, w = torch.randn(3, 40), torch.randn(40)
    got = megalith_kernels.rms_norm(x, w, backend="triton")
    assert _rel(got, reference.rms_norm(x, w)) < FP32_TOL
    x2 = torch.randn(2, 3, 2, 40)
    cos, sin = torch.randn(3, 40), torch.randn(3, 40)
    assert _rel(megalith_kernels.rope(x2, cos, sin, backend="triton"), reference.rope(x2, cos, sin)) < FP32_TOL


def test_bad_inputs_are_one_line():
    x = torch.randn(4, 40)
    with pytest.raises(ValueError, match=r"weight must have shape \(40,\)"):
        triton_ops.rms_norm(x, torch.randn(41))
    with pytest.raises(ValueError, match=r"bias must have shape \(40,\)"):
        triton_ops.layer_norm(x, torch.randn(40), torch.randn(4))
    with pytest.raises(ValueError, match="even last dimension"):
        triton_ops.swiglu(torch.randn(4, 41))
    with pytest.raises(ValueError, match="bias of shape"):
        triton_ops.bias_gelu(x, torch.randn(39))
    with pytest.raises(ValueError, match="rot_dim even"):
        triton_ops.rope(torch.randn(1, 3, 2, 40), torch.randn(3, 41), torch.randn(3, 41))
    with pytest.raises(ValueError, match=r"\[batch, seq, heads, head_dim\]"):
        triton_ops.rope(x, torch.randn(4, 40), torch.randn(4, 40))
    with pytest.raises(ValueError, match="no gradient for cos and sin"):
        triton_ops.rope(torch.randn(1, 3, 2, 40), torch.randn(3, 40, requires_grad=True), torch.randn(3, 40))


def _rope_tables(seq, rotary, megatron=True, seed=0):
    """Megatron's tables (angles repeated across the halves) or, to test the exact transpose, random ones."""
    if not megatron:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(seq, rotary, generator=gen), torch.randn(seq, rotary, generator=gen)
    inv = 1.0 / (10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary))
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def _rope_check(batch, seq, heads, dim, rotary, dtype=torch.float32, megatron=True, layout=None, tol=FP32_TOL):
    gen = torch.Generator().manual_seed(seq * dim + rotary)
    cos, sin = _rope_tables(seq, rotary, megatron, seed=seq)
    if layout is None:
        x = _leaf(torch.randn(batch, seq, heads, dim, generator=gen), dtype)
        _check(lambda x: triton_ops.rope(x, cos, sin), lambda x: reference.rope(x, cos, sin), (x,), tol)
    else:
        base_shape, view = layout
        x = _leaf(torch.randn(*base_shape, generator=gen), dtype)
        _check(lambda x: triton_ops.rope(view(x), cos, sin), lambda x: reference.rope(view(x), cos, sin), (x,), tol)


def test_rope_quick():
    _rope_check(1, 17, 2, 40, 20)
    _rope_check(2, 1, 1, 80, 80, megatron=False)
    x, (cos, sin) = torch.randn(2, 5, 3, 16), _rope_tables(1, 8, megatron=False)  # one position broadcasts
    assert _rel(triton_ops.rope(x, cos, sin), reference.rope(x, cos, sin)) < FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("megatron", (True, False))
@pytest.mark.parametrize("dim,half_rot", ((40, False), (40, True), (80, False), (80, True)))
@pytest.mark.parametrize("seq", (1, 17, 100))
def test_rope_fp32(seq, dim, half_rot, megatron):
    _rope_check(1 if seq == 100 else 2, seq, 3 if seq < 100 else 2, dim, dim // 2 if half_rot else dim,
                megatron=megatron)


@pytest.mark.slow
def test_rope_bf16():
    _rope_check(2, 17, 3, 80, 40, dtype=torch.bfloat16, tol=BF16_TOL)


def test_rope_non_contiguous_inputs():
    # [b, h, s, d] seen as [b, s, h, d] (attention's transposed layout), and every other feature
    _rope_check(2, 9, 3, 40, 20, layout=((2, 3, 9, 40), lambda t: t.transpose(1, 2)))
    _rope_check(1, 5, 2, 40, 40, layout=((1, 5, 2, 80), lambda t: t[..., ::2]))


def _bias_gelu_check(shape, dtype=torch.float32, tol=FP32_TOL, view=None):
    gen = torch.Generator().manual_seed(sum(shape))
    x = _leaf(torch.randn(*shape, generator=gen) * 2, dtype)
    width = view(x).shape[-1] if view else shape[-1]
    bias = _leaf(torch.randn(width, generator=gen), dtype)
    view = view or (lambda t: t)
    _check(lambda x, b: triton_ops.bias_gelu(view(x), b), lambda x, b: reference.bias_gelu(view(x), b),
           (x, bias), tol)


def _swiglu_check(shape, dtype=torch.float32, tol=FP32_TOL, view=None):
    gen = torch.Generator().manual_seed(sum(shape) + 1)
    x = _leaf(torch.randn(*shape, generator=gen) * 2, dtype)
    view = view or (lambda t: t)
    _check(lambda x: triton_ops.swiglu(view(x)), lambda x: reference.swiglu(view(x)), (x,), tol)


def test_activations_quick():
    _bias_gelu_check((2, 9, 40))
    _swiglu_check((17, 80))


@pytest.mark.slow
@pytest.mark.parametrize("rows,width", ((1, 40), (17, 257), (100, 80)))
def test_activations_fp32(rows, width):
    _bias_gelu_check((rows, width))
    _swiglu_check((rows, 2 * width))


@pytest.mark.slow
def test_activations_bf16():
    _bias_gelu_check((3, 17, 257), dtype=torch.bfloat16, tol=BF16_TOL)
    _swiglu_check((3, 17, 2 * 257), dtype=torch.bfloat16, tol=BF16_TOL)


def test_activations_non_contiguous_inputs():
    _bias_gelu_check((40, 17), view=lambda t: t.t())
    _bias_gelu_check((5, 3, 100), view=lambda t: t[:, :, 7:47])
    _swiglu_check((80, 9), view=lambda t: t.t())
    _swiglu_check((4, 3, 200), view=lambda t: t[..., 20:100])
