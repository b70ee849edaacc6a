"""Cross-entropy over vocab-parallel logits, without ever gathering the logits.

Each rank holds `[..., V/tp]` logits. Two all-reduces (a max, then one stacked sum) give the
log-sum-exp, the target logit and, for label smoothing, the sum of all logits — so the loss
equals `torch.nn.functional.cross_entropy(..., label_smoothing=eps)` on the full logits for any
tp. (Megatron's smoothing term averages over the local shard only and so changes with tp.)

Columns past the real vocabulary (Megatron's padding) are excluded from the softmax, so the
loss does not depend on how much padding a layout needs.

`kernel="torch"` is the autograd Function below (it keeps an fp32 copy of the exponentials for
backward); any megalith_kernels backend name ("triton", "auto") hands the flattened logits to
megalith_kernels.cross_entropy instead (Megatron's --cross-entropy-loss-fusion), which keeps only
`[tokens]`-sized statistics and combines ranks through this module's comm seam, so its bytes are
counted like every other collective.
"""

from __future__ import annotations

import megalith_kernels
import torch

from megalith.errors import ConfigError
from megalith.parallel import comm

# "torch" is this module's Function; the others are megalith_kernels backends (its "torch" reference aside)
KERNELS = ("torch",) + tuple(b for b in megalith_kernels.BACKENDS if b != "torch")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, group, vocab_size, ignore_index, label_smoothing):
        tp_size, tp_rank = comm.group_size(group), comm.group_rank(group)
        local_vocab = logits.shape[-1]
        start = tp_rank * local_vocab
        real_local = max(0, min(local_vocab, vocab_size - start))  # columns that are not padding

        z_max = logits[..., :real_local].max(dim=-1).values.float() if real_local else None
        if z_max is None:  # a rank holding only padding
            z_max = torch.full(logits.shape[:-1], float("-inf"), device=logits.device)
        if tp_size > 1:
            comm.all_reduce(z_max, group, op="max")
        z = logits.float() - z_max.unsqueeze(-1)  # a new fp32 tensor: the rest works in place on it
        if real_local < local_vocab:
            z[..., real_local:] = float("-inf")

        local_target = target - start
        in_shard = (local_target >= 0) & (local_target < local_vocab)
        local_target = local_target.masked_fill(~in_shard, 0)
        target_logit = z.gather(-1, local_target.unsqueeze(-1)).squeeze(-1).masked_fill(~in_shard, 0.0)
        sums = [None, target_logit]
        if label_smoothing > 0:
            sums.append(z[..., :real_local].sum(dim=-1))
        exp = z.exp_()
        sums[0] = exp.sum(dim=-1)
        sums = torch.stack(sums)
        if tp_size > 1:
            comm.all_reduce(sums, group)
        log_sum_exp = sums[0].log()
        loss = log_sum_exp - sums[1]
        if label_smoothing > 0:
            mean_neg_log_prob = log_sum_exp - sums[2] / vocab_size
            loss = (1.0 - label_smoothing) * loss + label_smoothing * mean_neg_log_prob
        valid = target != ignore_index
        loss = loss.masked_fill(~valid, 0.0)

        # the softmax is exp / sum: divided in backward, fused with the incoming gradient
        ctx.save_for_backward(exp, sums[0], local_target, in_shard, valid)
        ctx.real_local = real_local
        ctx.vocab_size = vocab_size
        ctx.label_smoothing = label_smoothing
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        exp, sum_exp, local_target, in_shard, valid = ctx.saved_tensors
        eps = ctx.label_smoothing
        scale = (grad_loss * valid).unsqueeze(-1)
        # d loss / d z = softmax - (1 - eps) onehot - eps / V over real columns, times grad_loss
        grad = exp * (scale / sum_exp.unsqueeze(-1))  # a new tensor: backward may run twice
        hit = in_shard.to(grad.dtype).unsqueeze(-1) * (1.0 - eps) * scale
        grad.scatter_add_(-1, local_target.unsqueeze(-1), -hit)
        if eps > 0:
            grad[..., : ctx.real_local] -= scale * (eps / ctx.vocab_size)
        return grad.to(ctx.logits_dtype), None, None, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    kernel: str = "torch",
) -> torch.Tensor:
    """Per-token loss (fp32, shape of `target`) from this rank's slice of the logits.

    `vocab_size` is the real vocabulary (defaults to all columns, i.e. no padding); targets
    equal to `ignore_index` get loss 0 and no gradient. `kernel` picks the implementation: "torch"
    (this module's) or a megalith_kernels backend ("triton", "auto").
    """
    total_columns = logits.shape[-1] * comm.group_size(tp_group)
    vocab_size = total_columns if vocab_size is None else vocab_size
    if not 0 < vocab_size <= total_columns:
        raise ConfigError(
            f"vocab size {vocab_size} must be between 1 and the {total_columns} logit columns over tp; "
            "pass the unpadded vocabulary size"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"label smoothing {label_smoothing} must be in [0, 1)")
    if target.shape != logits.shape[:-1]:
        raise ConfigError(
            f"target shape {tuple(target.shape)} does not match logits shape {tuple(logits.shape)} minus the vocab dim"
        )
    if kernel not in KERNELS:
        raise ConfigError(f"cross-entropy kernel {kernel!r} is not one of {', '.join(KERNELS)}")
    if kernel == "torch":
        return _VocabParallelCrossEntropy.apply(logits, target, tp_group, vocab_size, ignore_index, label_smoothing)
    return _fused(logits, target, tp_group, vocab_size, ignore_index, label_smoothing, kernel)


def _fused(logits, target, tp_group, vocab_size, ignore_index, label_smoothing, kernel):
    """megalith_kernels.cross_entropy over `[tokens, V/tp]`, ranks combined by comm.all_reduce on tp."""
    local_vocab = logits.shape[-1]
    combine = None
    if comm.group_size(tp_group) > 1:
        def combine(tensor, op):
            comm.all_reduce(tensor, tp_group, op=op)
    loss = megalith_kernels.cross_entropy(
        logits.reshape(-1, local_vocab), target.reshape(-1), vocab_start=comm.group_rank(tp_group) * local_vocab,
        vocab_size=vocab_size, ignore_index=ignore_index, label_smoothing=label_smoothing, all_reduce=combine,
        backend=kernel)
    return loss.reshape(target.shape)
