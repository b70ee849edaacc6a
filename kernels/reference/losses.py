"""Cross-entropy per token over (possibly vocab-parallel) logits, in fp32 arithmetic.

Under vocab parallelism each rank holds columns `vocab_start ..` and `all_reduce` combines the
max, the sum of exponentials, the target logit and (for label smoothing) the sum of logits,
so the loss equals F.cross_entropy on the whole vocabulary. This reference makes fp32 copies;
the Triton kernel does not.
"""

from __future__ import annotations

import torch


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int = 0, vocab_size: int | None = None,
                  ignore_index: int = -100, label_smoothing: float = 0.0, all_reduce=None) -> torch.Tensor:
    local = logits.shape[-1]
    vocab_size = vocab_start + local if vocab_size is None else vocab_size
    real = max(0, min(local, vocab_size - vocab_start))
    z = logits.float()[:, :real]
    z_max = z.max(dim=-1).values if real else torch.full(target.shape, float("-inf"), device=logits.device)
    z_max = z_max.detach()
    if all_reduce is not None:
        all_reduce(z_max, "max")
    shifted = z - z_max[:, None]
    local_target = target - vocab_start
    hit = (local_target >= 0) & (local_target < real)
    picked = shifted.gather(-1, local_target.clamp(0, max(real - 1, 0))[:, None]).squeeze(-1) if real else \
        torch.zeros(target.shape, device=logits.device)
    sums = torch.stack([shifted.exp().sum(-1), torch.where(hit, picked, 0.0), shifted.sum(-1)])
    if all_reduce is not None:
        sums = _summed(sums, all_reduce)
    lse = sums[0].log()
    loss = lse - sums[1]
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - sums[2] / vocab_size)
    return torch.where(target != ignore_index, loss, 0.0)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(sum) forward; the gradient of a sum over ranks is the same gradient on each rank."""

    @staticmethod
    def forward(ctx, tensor, all_reduce):
        out = tensor.clone()
        all_reduce(out, "sum")
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _summed(tensor: torch.Tensor, all_reduce) -> torch.Tensor:
    return _SumOverRanks.apply(tensor, all_reduce)
