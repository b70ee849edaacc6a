"""The Triton flash attention equals the reference: output, lse and dq/dk/dv (issue 19).

Runs under TRITON_INTERPRET=1 on a CPU (tests/conftest.py sets it), so the shapes are small;
the unmarked cases are the quick tier, the matrix is marked slow. Errors are max-abs-err over
max-abs-ref; fp32 must be below 1e-5. bf16 and fp16 round q, k, v, the probabilities and the
output to 8 (fp16: 11) mantissa bits where the reference stays in fp32 until its output:
tolerance 3e-2 for bf16 and 5e-3 for fp16 (measured: about 7e-3 and 1e-3). The last test
compiles the kernels for a real GPU (sm_90) ahead of time, which needs no GPU.
"""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: pip install 'megalith[triton]'")

import megalith_kernels  # noqa: E402

MIN = torch.finfo(torch.float32).min
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def relative_error(got, want):
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()


def run_both(b=2, s=17, sk=None, heads=4, kv_heads=2, d=40, causal=False, mask=None, dtype=torch.float32,
             scale=None, seed=0, transpose_inputs=False):
    """(reference, triton) results: out, lse, dq, dk, dv for one random problem, with random
    upstream gradients on out and on the lse of rows that are not fully masked."""
    sk = s if sk is None else sk
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    if transpose_inputs:  # [b, h, s, d] storage seen as [b, s, h, d]: non-contiguous strides
        q = rand(b, heads, s, d).transpose(1, 2)
        k, v = rand(b, kv_heads, sk, d).transpose(1, 2), rand(b, kv_heads, sk, d).transpose(1, 2)
    else:
        q, k, v = rand(b, s, heads, d), rand(b, sk, kv_heads, d), rand(b, sk, kv_heads, d)
    grad_out, grad_lse = rand(b, s, heads, d), torch.randn(b, heads, s, generator=gen)
    results = []
    for backend in ("torch", "triton"):
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        out, lse = megalith_kernels.flash_attention(*leaves, causal=causal, scale=scale, attention_mask=mask,
                                                    return_lse=True, backend=backend)
        assert out.shape == q.shape and out.dtype == dtype and lse.shape == (b, heads, s)
        assert lse.dtype == torch.float32
        live = lse > MIN
        ((out.float() * grad_out.float()).sum() + (torch.where(live, lse, 0.0) * grad_lse).sum()).backward()
        results.append((out.detach(), lse.detach(), *(t.grad for t in leaves)))
    return results


def assert_close(reference, triton, dtype=torch.float32):
    (out0, lse0, *grads0), (out1, lse1, *grads1) = reference, triton
    tol = TOLERANCE[dtype]
    full0, full1 = lse0 == MIN, lse1 == MIN
    assert torch.equal(full0, full1), "fully masked rows differ"
    assert relative_error(out1, out0) < tol, "out"
    if (~full0).any():
        assert relative_error(lse1[~full0], lse0[~full0]) < max(tol, 1e-5), "lse"
    for name, got, want in zip(("dq", "dk", "dv"), grads1, grads0):
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert relative_error(got, want) < tol, name


def padding_mask(b, sk, seed=1):
    """[b, 1, 1, sk]: batch row i pads its last few keys."""
    mask = torch.zeros(b, 1, 1, sk, dtype=torch.bool)
    for i in range(b):
        mask[i, ..., max(1, sk - 3 * (i + 1)):] = True
    return mask


def full_mask(b, s, sk, seed=1):
    """[b, 1, s, sk] random, with query row 3 of batch 0 fully masked (it averages v)."""
    mask = torch.rand(b, 1, s, sk, generator=torch.Generator().manual_seed(seed)) < 0.3
    mask[0, 0, min(3, s - 1)] = True
    return mask


# quick tier: one GQA causal case with a full mask (fully masked row) and one cross-attention case

def test_causal_gqa_full_mask_matches_reference():
    assert_close(*run_both(s=17, heads=4, kv_heads=2, d=40, causal=True, mask=full_mask(2, 17, 17)))


def test_cross_attention_padding_mask_matches_reference():
    assert_close(*run_both(s=9, sk=20, heads=2, kv_heads=1, d=24, causal=False, mask=padding_mask(2, 20)))


def test_bad_inputs_are_one_line():
    q, k = torch.randn(1, 4, 4, 8), torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="must divide"):
        megalith_kernels.flash_attention(q, k, k, causal=False, backend="triton")
    with pytest.raises(ValueError, match="head_dim"):
        big = torch.randn(1, 2, 1, 300)
        megalith_kernels.flash_attention(big, big, big, causal=False, backend="triton")
    with pytest.raises(ValueError, match="one dtype"):
        megalith_kernels.flash_attention(q, q.half(), q, causal=False, backend="triton")
    with pytest.raises(ValueError, match="does not broadcast"):
        wrong = torch.zeros(1, 1, 4, 5, dtype=torch.bool)
        megalith_kernels.flash_attention(q, q, q, causal=False, attention_mask=wrong, backend="triton")


# slow tier: the matrix

@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("kv_heads", [1, 2])
@pytest.mark.parametrize("d", [40, 80])
@pytest.mark.parametrize("s", [1, 17, 100])
def test_matrix_matches_reference(s, d, kv_heads, causal):
    assert_close(*run_both(b=1 if s == 100 else 2, s=s, heads=4, kv_heads=kv_heads, d=d, causal=causal))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [1, 17, 100])
def test_padding_mask_matches_reference(s, causal):
    assert_close(*run_both(b=2, s=s, heads=2, kv_heads=1, d=40, causal=causal, mask=padding_mask(2, s)))


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s", [17, 100])
def test_full_mask_with_a_fully_masked_row_matches_reference(s, causal):
    assert_close(*run_both(b=2, s=s, heads=4, kv_heads=2, d=40, causal=causal, mask=full_mask(2, s, s)))


@pytest.mark.slow
@pytest.mark.parametrize("s, sk", [(1, 33), (17, 50), (50, 17), (100, 7)])
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_lengths_match_reference(s, sk, causal):
    # causal with s > sk: the first s - sk query rows see no key (fully masked, averaging v)
    assert_close(*run_both(b=2, s=s, sk=sk, heads=4, kv_heads=2, d=40, causal=causal))


@pytest.mark.slow
def test_cross_attention_full_mask_matches_reference():
    assert_close(*run_both(b=2, s=17, sk=40, heads=2, kv_heads=2, d=80, mask=full_mask(2, 17, 40)))


@pytest.mark.slow
@pytest.mark.parametrize("d", [1, 16, 100, 256])
def test_head_dims_match_reference(d):
    assert_close(*run_both(b=1, s=20, heads=2, kv_heads=1, d=d, causal=True))


@pytest.mark.slow
def test_scale_and_strided_inputs_match_reference():
    assert_close(*run_both(s=33, heads=4, kv_heads=4, d=40, causal=True, scale=0.3, transpose_inputs=True))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_matches_reference(dtype, causal):
    assert_close(*run_both(s=40, heads=4, kv_heads=2, d=80, causal=causal, mask=padding_mask(2, 40), dtype=dtype),
                 dtype)


@pytest.mark.slow
def test_two_dim_mask_and_no_lse():
    """A plain [s, sk] mask broadcasts; without return_lse the output alone comes back, and its
    backward runs without an lse gradient."""
    mask = torch.rand(12, 12, generator=torch.Generator().manual_seed(3)) < 0.5
    mask[5] = True
    results = []
    for backend in ("torch", "triton"):
        gen = torch.Generator().manual_seed(4)
        q = torch.randn(1, 12, 2, 16, generator=gen).requires_grad_(True)
        k = torch.randn(1, 12, 1, 16, generator=gen).requires_grad_(True)
        out = megalith_kernels.flash_attention(q, k, k, causal=True, attention_mask=mask, backend=backend)
        assert isinstance(out, torch.Tensor)
        out.pow(2).sum().backward()
        results.append((out, q.grad, k.grad))
    for got, want in zip(results[1], results[0]):
        assert relative_error(got, want) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_group_splits_match_reference(splits):
    """dK/dV with a kv head's 3 query heads in one program, split 2 + 1, and one per program."""
    from megalith_kernels.triton_ops import attention
    from megalith_kernels.triton_ops.attention_backward import attention_backward

    gen = torch.Generator().manual_seed(5)
    q, k, v = torch.randn(2, 20, 6, 24, generator=gen), torch.randn(2, 20, 2, 24, generator=gen), \
        torch.randn(2, 20, 2, 24, generator=gen)
    grad_out, mask = torch.randn(2, 20, 6, 24, generator=gen), padding_mask(2, 20)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    want = megalith_kernels.flash_attention(*leaves, causal=True, attention_mask=mask, backend="torch")
    (want * grad_out).sum().backward()
    out, lse = attention.flash_attention(q, k, v, causal=True, attention_mask=mask, return_lse=True)
    operand, _ = attention.mask_operand(mask, 2, 6, 20, 20, q.device)
    got = attention_backward(q, k, v, out, lse, operand, grad_out, None, causal=True, scale=24 ** -0.5,
                             splits=splits)
    for name, g, leaf in zip(("dq", "dk", "dv"), got, leaves):
        assert g.dtype == leaf.dtype and relative_error(g, leaf.grad) < 1e-5, name


def test_group_splits_fill_a_gpu_only_when_few_programs():
    from megalith_kernels.triton_ops.attention_backward import group_splits

    assert group_splits(programs=32, group=8, cuda=True) == 8
    assert group_splits(programs=128, group=8, cuda=True) == 4
    assert group_splits(programs=4096, group=8, cuda=True) == 1
    assert group_splits(programs=32, group=8, cuda=False) == 1
    assert group_splits(programs=32, group=1, cuda=True) == 1

# Compiles each kernel ahead of time for an H100 (sm_90) with triton's own ptxas: no GPU needed,
# but not under the interpreter, so in a fresh process. Pointer arguments are the upper-case ones.
COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import megalith_kernels.triton_ops.attention as fa
import megalith_kernels.triton_ops.attention_backward as fb
import torch

POINTERS = {"MASK": "*u8", "LSE": "*fp32", "DELTA": "*fp32", "DLSE": "*fp32"}
for dtype, name, d in ((torch.bfloat16, "bf16", 128), (torch.float16, "fp16", 40), (torch.float32, "fp32", 64)):
    precision = fb.precision(dtype, torch.device("cuda"))
    kernels = ((fa._fwd_kernel, fa.FORWARD_TILES), (fb._dkdv_kernel, fb.DKDV_TILES), (fb._dq_kernel, fb.DQ_TILES),
               (fb._delta_kernel, fb.DQ_TILES))
    for kernel, table in kernels:
        tiles = fb.tiles(table, d, dtype, True)
        options = dict(num_warps=tiles.pop("num_warps"), num_stages=tiles.pop("num_stages"))
        const = dict(CAUSAL=True, HAS_MASK=True, HAS_DLSE=True, PRECISION=precision, **tiles)
        const = {key: value for key, value in const.items() if key in kernel.arg_names}
        signature = {arg: "constexpr" if arg in const else "fp32" if arg == "scale" else
                     POINTERS.get(arg, "*" + name) if arg.isupper() and arg != "D" else "i32"
                     for arg in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=const), target=GPUTarget("cuda", 90, 32),
                                  options=options)
        assert compiled.asm["cubin"], kernel.__name__
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton has no CUDA backend")
def test_kernels_compile_for_an_h100(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, leave the user's cache alone
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", COMPILE_FOR_SM90], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "compiled", done.stderr[-3000:]
