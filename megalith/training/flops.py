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

T5 (`t5_flops_per_iteration`) counts the same GEMMs per stack: encoder layers over the encoder's
tokens, decoder layers over the decoder's, plus each decoder layer's cross-attention (queries
from the decoder, keys and values projected from the encoder's tokens, scores decoder x encoder
long) and the logits over the decoder's tokens.
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


def _layer_forward_flops(tokens: int, keys: int, h: int, f: int, n: int, g: int, d: int, swiglu: bool) -> float:
    """One self-attention layer's forward GEMMs over `tokens` tokens attending to `keys` each."""
    return 2.0 * tokens * (h * d * (n + 2 * g) + 2 * keys * n * d + n * d * h + h * f * (3 if swiglu else 2))


def t5_flops_per_iteration(*, batch_size: int, encoder_seq_length: int, decoder_seq_length: int,
                           encoder_num_layers: int, decoder_num_layers: int, hidden_size: int, ffn_hidden_size: int,
                           num_attention_heads: int, num_query_groups: int, kv_channels: int, padded_vocab_size: int,
                           swiglu: bool) -> float:
    """FLOPs of one T5 training iteration (forward + backward) over `batch_size` samples."""
    sizes = dict(batch_size=batch_size, encoder_seq_length=encoder_seq_length, decoder_seq_length=decoder_seq_length,
                 hidden_size=hidden_size, ffn_hidden_size=ffn_hidden_size, num_attention_heads=num_attention_heads,
                 num_query_groups=num_query_groups, kv_channels=kv_channels, padded_vocab_size=padded_vocab_size)
    bad = [f"{name}={value}" for name, value in sizes.items() if value < 1]
    if bad:
        raise ValueError(f"FLOP model needs positive sizes, got {', '.join(bad)}")
    h, f, n, g, d = hidden_size, ffn_hidden_size, num_attention_heads, num_query_groups, kv_channels
    se, sd = encoder_seq_length, decoder_seq_length
    encoder_tokens, decoder_tokens = batch_size * se, batch_size * sd
    cross = 2.0 * (decoder_tokens * (h * n * d + 2 * se * n * d + n * d * h) + encoder_tokens * h * 2 * n * d)
    forward = (encoder_num_layers * _layer_forward_flops(encoder_tokens, se, h, f, n, g, d, swiglu)
               + decoder_num_layers * (_layer_forward_flops(decoder_tokens, sd, h, f, n, g, d, swiglu) + cross)
               + 2.0 * decoder_tokens * h * padded_vocab_size)
    return 3.0 * forward


def model_flops_per_iteration(config, batch_size: int, padded_vocab_size: int) -> float:
    """The FLOP model that fits `config` (a ModelConfig): T5's when it has an encoder and a decoder."""
    common = dict(batch_size=batch_size, hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size,
                  num_attention_heads=config.num_attention_heads, num_query_groups=config.num_query_groups,
                  kv_channels=config.kv_channels, padded_vocab_size=padded_vocab_size, swiglu=config.swiglu)
    if config.encoder_num_layers is not None and config.decoder_num_layers is not None:
        return t5_flops_per_iteration(encoder_seq_length=config.seq_length,
                                      decoder_seq_length=config.decoder_seq_length or config.seq_length,
                                      encoder_num_layers=config.encoder_num_layers,
                                      decoder_num_layers=config.decoder_num_layers, **common)
    return gpt_flops_per_iteration(seq_length=config.seq_length, num_layers=config.num_layers, **common)


def tflops_per_device(flops: float, seconds: float, world_size: int) -> float:
    """Achieved TFLOP/s per device: the iteration's FLOPs spread evenly over every rank."""
    if not seconds > 0:
        raise ValueError(f"iteration time must be positive, got {seconds} s")
    if world_size < 1:
        raise ValueError(f"world size must be positive, got {world_size}")
    return flops / (seconds * world_size * 1e12)
