"""The Triton cross-entropy (Megatron's --cross-entropy-loss-fusion) equals the reference and
F.cross_entropy, loss and logits gradient, on one process and vocab-parallel over tp=2.

On a CPU the kernel runs under TRITON_INTERPRET=1 (tests/conftest.py), so shapes stay small.
Errors are max-abs-err / max-abs-ref (megalith.testing.relative_error).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: pip install 'megalith[triton]'")

from megalith_kernels import reference, triton_ops  # noqa: E402

from megalith.errors import ConfigError  # noqa: E402
from megalith.parallel.comm_ledger import CommLedger, counting  # noqa: E402
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy  # noqa: E402
from megalith.testing import relative_error  # noqa: E402

FP32 = 1e-5
BF16_LOSS = 1e-5  # both sides compute in fp32 from the same bf16 values
BF16_GRAD = 8e-3  # each side rounds its fp32 gradient to bf16 (2**-8 relative), so they may differ by one ulp


def case(tokens, vocab, padded=None, dtype=torch.float32, seed=0):
    """Logits (padding columns large, so they would show if they took part), targets with an
    ignored row and the last real column, and an incoming gradient."""
    gen = torch.Generator().manual_seed(seed + 31 * tokens + vocab)
    padded = padded or vocab
    logits = torch.randn(tokens, padded, generator=gen) * 3.0
    logits[:, vocab:] = 50.0
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    if tokens > 2:
        target[1], target[2] = -100, vocab - 1
    return logits.to(dtype), target, torch.randn(tokens, generator=gen)


def loss_and_grad(fn, logits, target, grad_loss, **kwargs):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, target, **kwargs)
    loss.backward(grad_loss)
    return loss, x.grad


def torch_loss_and_grad(logits, target, grad_loss, vocab, eps=0.0):
    """F.cross_entropy on the real columns; padding columns get a zero gradient."""
    x = logits.detach().float()[:, :vocab].clone().requires_grad_(True)
    loss = F.cross_entropy(x, target, reduction="none", label_smoothing=eps)
    loss.backward(grad_loss)
    return loss, torch.cat([x.grad, torch.zeros(len(target), logits.shape[1] - vocab)], dim=1)


def check(tokens, vocab, padded=None, eps=0.0, dtype=torch.float32, transpose=False, shift_late_block=False):
    logits, target, grad_loss = case(tokens, vocab, padded, dtype)
    if shift_late_block:
        logits[:, vocab - 300:vocab] += 12.0
    if transpose:  # the same values through a column-major view: strides, not a copy
        logits = logits.t().contiguous().t()
        assert not logits.is_contiguous()
    kwargs = dict(vocab_size=vocab, label_smoothing=eps)
    loss, grad = loss_and_grad(triton_ops.cross_entropy, logits, target, grad_loss, **kwargs)
    ref_loss, ref_grad = loss_and_grad(reference.cross_entropy, logits, target, grad_loss, **kwargs)
    assert loss.dtype == torch.float32 and grad.dtype == dtype and grad.shape == logits.shape
    ignored = target == -100
    assert not loss[ignored].any() and not grad[ignored].any()
    assert not grad[:, vocab:].any(), "padding columns got a gradient"
    loss_tol, grad_tol = (FP32, FP32) if dtype == torch.float32 else (BF16_LOSS, BF16_GRAD)
    errors = {"loss vs reference": relative_error(loss, ref_loss), "grad vs reference": relative_error(grad, ref_grad)}
    if dtype == torch.float32:
        f_loss, f_grad = torch_loss_and_grad(logits, target, grad_loss, vocab, eps)
        errors |= {"loss vs torch": relative_error(loss, f_loss), "grad vs torch": relative_error(grad, f_grad)}
    bad = {k: v for k, v in errors.items() if v >= (loss_tol if k.startswith("loss") else grad_tol)}
    assert not bad, bad


# --- fast: one case of each kind ------------------------------------------------------------


def test_fp32_equals_reference_and_torch():
    check(17, 257, padded=264, eps=0.1)


def test_vocab_wider_than_one_block():
    """Past 4096 columns the forward loops over blocks (the online max and sum rescale) and
    backward tiles the columns; the large logits of one late block move the max mid-row."""
    logits, _, _ = case(5, 4500, padded=4608)
    assert logits.shape[1] > triton_ops.losses._MAX_BLOCK_V
    check(5, 4500, padded=4608, eps=0.1, shift_late_block=True)


def test_bf16_saves_no_fp32_copy_of_the_logits():
    tokens, vocab = 17, 257
    logits, target, grad_loss = case(tokens, vocab, dtype=torch.bfloat16)
    saved = []
    x = logits.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.numel())) or t, lambda t: t):
        loss = triton_ops.cross_entropy(x, target)
    loss.backward(grad_loss)
    assert saved, "the hook saw nothing saved"
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= tokens * vocab], saved
    assert max(n for dtype, n in saved if dtype == torch.float32) == tokens  # the log-sum-exp per token
    check(tokens, vocab, dtype=torch.bfloat16)


def test_one_process_kernel_equals_torch_path_and_names_bad_kernels():
    logits, target, grad_loss = case(3 * 5, 40, padded=48)
    logits, target, grad_loss = logits.view(3, 5, 48), target.view(3, 5), grad_loss.view(3, 5)
    torch_path = loss_and_grad(vocab_parallel_cross_entropy, logits, target, grad_loss, tp_group=None,
                               vocab_size=40, label_smoothing=0.1)
    fused = loss_and_grad(vocab_parallel_cross_entropy, logits, target, grad_loss, tp_group=None,
                          vocab_size=40, label_smoothing=0.1, kernel="triton")
    assert fused[0].shape == target.shape and fused[1].shape == logits.shape
    assert relative_error(fused[0], torch_path[0]) < FP32 and relative_error(fused[1], torch_path[1]) < FP32
    with pytest.raises(ConfigError, match="cross-entropy kernel 'cuda' is not one of torch, auto, triton"):
        vocab_parallel_cross_entropy(logits, target, None, kernel="cuda")


# --- slow (but for one tp=2 case): the shape grid, smoothing, padding, strides, half precision, tp=2 --


@pytest.mark.slow
@pytest.mark.parametrize("tokens", [1, 17, 100])
@pytest.mark.parametrize("vocab", [40, 257, 1000])
def test_fp32_shapes(tokens, vocab):
    check(tokens, vocab)


@pytest.mark.slow
@pytest.mark.parametrize("vocab,padded", [(40, 64), (257, 257), (1000, 1024)])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_padding_and_label_smoothing(vocab, padded, eps):
    check(17, vocab, padded, eps)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_and_strides(dtype):
    check(100, 1000, padded=1024, eps=0.1, dtype=dtype, transpose=True)
    check(17, 40, dtype=torch.float32, transpose=True)


def tp_cross_entropy(ctx, kernel: str, eps: float, vocab: int):
    """On each rank of tp=2: vocab_parallel_cross_entropy with `kernel` over 80 padded columns
    against one process's F.cross_entropy on the whole (unpadded) logits; also the collectives
    the comm seam counted."""
    state = ctx.parallel_state(tp=2)
    rank, seq, batch, padded = state.tp_rank, 6, 3, 80
    logits, target, grad_loss = case(seq * batch, vocab, padded)
    ref_loss, ref_grad = torch_loss_and_grad(logits, target, grad_loss, vocab, eps)
    logits, target, grad_loss = logits.view(seq, batch, padded), target.view(seq, batch), grad_loss.view(seq, batch)
    local = logits.chunk(2, dim=-1)[rank]
    ledger = CommLedger.for_state(state, record_calls=True)
    with counting(ledger):
        loss, grad = loss_and_grad(vocab_parallel_cross_entropy, local, target, grad_loss, tp_group=state.tp_group,
                                   vocab_size=vocab, label_smoothing=eps, kernel=kernel)
    return {"loss": relative_error(loss.reshape(-1), ref_loss),
            "grad": relative_error(grad.reshape(-1, padded // 2), ref_grad.chunk(2, dim=-1)[rank]),
            "calls": [(c.kind, c.op, c.bytes) for c in ledger.history]}


# vocab 75: rank 1 holds 35 real columns and 5 padding; vocab 38: rank 1 holds padding only.
# "auto" on a CPU is the reference, with all_reduce.
TP_CASES = [("triton", 0.0, 75), ("triton", 0.1, 38), ("auto", 0.0, 75), ("auto", 0.1, 75), ("auto", 0.1, 38)]


@pytest.mark.parametrize("kernel,eps,vocab", [("triton", 0.1, 75),
                                              *[pytest.param(*c, marks=pytest.mark.slow) for c in TP_CASES]])
def test_tp2_equals_one_process(rank_pools, kernel, eps, vocab):
    tokens = 6 * 3
    sums = (3 if eps or kernel != "triton" else 2) * tokens * 4  # the reference always sends the logit sum
    for result in rank_pools(4).run(tp_cross_entropy, kernel, eps, vocab):
        assert result["loss"] < FP32 and result["grad"] < FP32, result
        # the max, then one stacked sum, each of [tokens] fp32 vectors, counted at the comm seam
        assert result["calls"] == [("tp", "all_reduce", tokens * 4), ("tp", "all_reduce", sums)], result["calls"]
