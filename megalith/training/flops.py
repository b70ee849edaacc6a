"""The FLOP model behind the TFLOP/s in the per-iteration log line (Megatron's, for dense GPT).

Only matrix multiplications are counted (norms, softmax, activations are noise at scale), at
2 FLOPs per multiply-add. For T = b x s tokens, per layer and forward pass, with n attention
heads, g query groups, d = kv_channels, h = hidden size, f = ffn hidden size, V = padded vocab:

    QKV projection          2 T h d (n + 2g)
    scores Q K^T            2 T s n d      (full s x s matrix; the causal mask is not discounted)
    scores x V              2 T s n d
    output projection       2 T n d h
    MLP                     4 T h f        (6 T h f with SwiGLU: the first projection is twice as wide)
    logits (once, not per layer)  2 T h V

Backward costs twice the forward (a gradient for the input and one for the weights of every
GEMM), so each term is multiplied by 3. Collected, this is Megatron's expression:

    12 b s L h^2 [ (1 + g/n + s/h) (n d / h)        attention
                 + (f / h) (3/2 if swiglu else 1)   MLP
                 + V / (2 L h) ]                    logits

Activation recompute re-runs the forward but is not counted (as in Megatron), so the figure
measures useful model FLOPs, comparable across recompute settings. Newer Megatron releases
halve the s/h term for causal attention; this model keeps the classic full-matrix count.
"""

from __future__ import annotations


def gpt_flops_per_iteration(
    *,
    batch_size: int,
    seq_length: int,
    num_layers: int,
    hidden_size: int,
    ffn_hidden_size: int,
    num_attention_heads: int,
    num_query_groups: int,
    kv_channels: int,
    padded_vocab_size: int,
    swiglu: bool,
) -> float:
    """FLOPs of one training iteration (forward + backward) over `batch_size` sequences (the global batch)."""
    sizes = dict(
        batch_size=batch_size, seq_length=seq_length, num_layers=num_layers, hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size, num_attention_heads=num_attention_heads,
        num_query_groups=num_query_groups, kv_channels=kv_channels, padded_vocab_size=padded_vocab_size,
    )
    bad = [f"{name}={value}" for name, value in sizes.items() if value < 1]
    if bad:
        raise ValueError(f"FLOP model needs positive sizes, got {', '.join(bad)}")
    b, s, L, h = batch_size, seq_length, num_layers, hidden_size
    n, g, f, V = num_attention_heads, num_query_groups, ffn_hidden_size, padded_vocab_size
    attention = (1 + g / n + s / h) * (kv_channels * n / h)
    mlp = (f / h) * (1.5 if swiglu else 1.0)
    logits = V / (2 * L * h)
    return 12.0 * b * s * L * h * h * (attention + mlp + logits)


def tflops_per_device(flops: float, seconds: float, world_size: int) -> float:
    """Achieved TFLOP/s per device: the iteration's FLOPs spread evenly over every rank."""
    if not seconds > 0:
        raise ValueError(f"iteration time must be positive, got {seconds} s")
    if world_size < 1:
        raise ValueError(f"world size must be positive, got {world_size}")
    return flops / (seconds * world_size * 1e12)
