"""megalith_kernels: fused ops, each with a plain-PyTorch reference, behind one call per op.

The folder is `kernels/` in the repository and imports as `megalith_kernels` (setuptools
`package-dir`), because transformers 5 brings Hugging Face's own top-level `kernels` module.

Every op exists twice with one signature: `megalith_kernels.reference.<op>` (plain PyTorch,
the definition of the result) and `megalith_kernels.triton_ops.<op>` (a Triton kernel, as a
`torch.autograd.Function` with its own backward). `megalith_kernels.<op>(..., backend=...)`
picks one: see `megalith_kernels.dispatch`. Shapes are fixed so that callers can rely on them.
"""

from __future__ import annotations

if __name__ == "kernels":  # found as `kernels` from the repository root (the current directory is on sys.path)
    from importlib import machinery as _machinery, util as _util
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _spec = _machinery.PathFinder.find_spec(
        "kernels", [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root])
    if _spec is None:
        raise ImportError("`kernels` here is megalith's kernels/ folder, which imports as megalith_kernels; "
                          "no other `kernels` package is installed")
    # hand the name to the installed package (Hugging Face's, which transformers imports)
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from megalith_kernels.dispatch import BACKENDS, KernelUnavailable, implementation, resolve_backend

__all__ = ["BACKENDS", "KernelUnavailable", "bias_gelu", "cross_entropy", "flash_attention", "implementation",
           "layer_norm", "resolve_backend", "rms_norm", "rope", "swiglu"]


def rms_norm(x, weight, eps: float = 1e-5, *, zero_centered_gamma: bool = False, backend: str = "auto"):
    """x / rms(x) * weight over the last dimension; with `zero_centered_gamma` (Megatron's
    --apply-layernorm-1p) the weight is stored as gamma - 1 and applied as 1 + weight."""
    op = implementation("rms_norm", x.device, backend)
    return op(x, weight, eps, zero_centered_gamma=zero_centered_gamma)


def layer_norm(x, weight, bias, eps: float = 1e-5, *, zero_centered_gamma: bool = False, backend: str = "auto"):
    """LayerNorm over the last dimension (bias may be None); `zero_centered_gamma` as in rms_norm."""
    op = implementation("layer_norm", x.device, backend)
    return op(x, weight, bias, eps, zero_centered_gamma=zero_centered_gamma)


def flash_attention(q, k, v, *, causal: bool, scale: float | None = None, attention_mask=None,
                    return_lse: bool = False, backend: str = "auto"):
    """softmax(q k^T * scale, masked) v. q `[b, s, heads, d]`, k and v `[b, sk, kv_heads, d]`
    (kv_heads divides heads: GQA); `attention_mask` is boolean, True = masked out (Megatron's
    convention), broadcastable to `[b, 1, s, sk]`. Returns `[b, s, heads, d]`, and with
    `return_lse` also the fp32 log-sum-exp of the scaled, masked scores, `[b, heads, s]`."""
    op = implementation("flash_attention", q.device, backend)
    return op(q, k, v, causal=causal, scale=scale, attention_mask=attention_mask, return_lse=return_lse)


def rope(x, cos, sin, *, backend: str = "auto"):
    """Rotary embedding, Megatron's rotate-half convention: x `[b, s, heads, d]`, cos and sin
    `[s, rot_dim]`; the first rot_dim features of each head rotate, the rest pass through."""
    return implementation("rope", x.device, backend)(x, cos, sin)


def bias_gelu(x, bias, *, backend: str = "auto"):
    """gelu(x + bias) with the tanh approximation, as Megatron's fused bias-GeLU; bias `[x.shape[-1]]`."""
    return implementation("bias_gelu", x.device, backend)(x, bias)


def swiglu(x, *, backend: str = "auto"):
    """silu(x[..., :f]) * x[..., f:] for x `[..., 2f]` (gate first, as Megatron's fc1)."""
    return implementation("swiglu", x.device, backend)(x)


def cross_entropy(logits, target, *, vocab_start: int = 0, vocab_size: int | None = None, ignore_index: int = -100,
                  label_smoothing: float = 0.0, all_reduce=None, backend: str = "auto"):
    """Per-token loss `[tokens]` (fp32) from logits `[tokens, local_vocab]` and target `[tokens]`,
    without an fp32 copy of the logits. Under vocab parallelism the logits are columns
    `vocab_start ..` of a `vocab_size` vocabulary (columns at or past vocab_size are padding)
    and `all_reduce(tensor, op)` ("max" or "sum", in place) combines the ranks' partial results;
    the caller supplies it so that communication stays at its own seam."""
    op = implementation("cross_entropy", logits.device, backend)
    return op(logits, target, vocab_start=vocab_start, vocab_size=vocab_size, ignore_index=ignore_index,
              label_smoothing=label_smoothing, all_reduce=all_reduce)
