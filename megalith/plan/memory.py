"""Activation memory per transformer layer: Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", Table 2.

The paper counts the tensors one GPT layer keeps for backward at 2 bytes per activation and
1 byte per dropout mask, for s tokens, micro-batch b, hidden h, a heads and tp t:

    no parallelism          s·b·h·(34 + 5·a·s/h)
    tp                      s·b·h·(10 + 24/t + 5·a·s/(h·t))
    tp + sp                 s·b·h·(34 + 5·a·s/h) / t
    selective recompute     the 5·a·s/h term is dropped (attention's scores are recomputed)
    full recompute          2·s·b·h: only the layer's input (its shard under sp: 2·s·b·h / t)

The 34 is: the two norms' inputs (4), qkv's input (2), q, k, v (6), the output projection's input
(2), fc1's input (2), GELU's input (8), fc2's input (8) and the two hidden dropout masks (2). The
5·a·s/h is the softmax output (2), its dropout mask (1) and the dropped probabilities (2) per
score. Without sp the norms, their outputs and the masks (10) are full-size on every tp rank.
"""

from __future__ import annotations

RECOMPUTE_CHOICES = (None, "selective", "full")


def activation_bytes_per_layer(seq_length: int, micro_batch_size: int, hidden_size: int, num_heads: int,
                               tp: int = 1, sequence_parallel: bool = False, recompute: str | None = None,
                               attention_scores: bool = True, value_bytes: int = 2, hidden_dropout: bool = True,
                               attention_dropout: bool = True) -> float:
    """Bytes one transformer layer keeps for backward on one tp rank.

    The defaults are the paper's (16-bit activations, dropout everywhere). `value_bytes` 4 counts
    fp32 activations; without hidden dropout its two masks go, and without attention dropout the
    softmax output is the only s×s tensor kept. `attention_scores=False` leaves the s×s term out
    without recompute: a fused (flash) attention kernel keeps no scores."""
    if recompute not in RECOMPUTE_CHOICES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_CHOICES}, got {recompute!r}")
    sbh, e = seq_length * micro_batch_size * hidden_size, value_bytes
    shard = tp if sequence_parallel else 1  # what sp splits: the norms, their outputs, the hidden masks
    if recompute == "full":
        return e * sbh / shard
    norms_and_masks = (4 * e + (2 if hidden_dropout else 0)) / shard  # 10 at e = 2
    split_by_tp = 12 * e / tp  # q, k, v, proj's input, GELU's input and output: 24 at e = 2
    scores = 0.0
    if recompute is None and attention_scores:  # softmax output, its mask, the dropped copy: 5 at e = 2
        scores = ((2 * e + 1) if attention_dropout else e) * num_heads * seq_length / hidden_size / tp
    return sbh * (norms_and_masks + split_by_tp + scores)
