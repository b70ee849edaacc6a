"""Context parallelism: the sequence split over the cp group, attention exact against one process.

Entry point `context_parallel_attention(q, k, v, group=..., comm_type=..., causal=...)` takes each
rank's tokens in the load-balanced order of `layout` and returns what core_attention returns for
those query rows of the full-sequence attention. Comm types (Megatron's names):
"p2p" (ring, ring.py), "all_gather" (gather.py), "a2a" (DeepSpeed-Ulysses, ulysses.py).
`expected_bytes` gives what the comm ledger counts per rank and layer for each.
"""

from __future__ import annotations

import math

import torch

from megalith.errors import ConfigError
from megalith.parallel import comm
from megalith.parallel.context.gather import all_gather_attention
from megalith.parallel.context.layout import (check_sequence, gathered_positions, load_balanced_indices,
                                              restore_global_order, split_for_context_parallel)
from megalith.parallel.context.ring import ring_attention
from megalith.parallel.context.ulysses import check_heads, ulysses_attention

COMM_TYPES = {"p2p": ring_attention, "all_gather": all_gather_attention, "a2a": ulysses_attention}

__all__ = ["COMM_TYPES", "context_parallel_attention", "expected_bytes", "wire_bytes", "load_balanced_indices",
           "split_for_context_parallel", "restore_global_order", "gathered_positions", "check_sequence"]


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group, comm_type: str,
                               causal: bool, softmax_scale: float | None = None,
                               key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """q `[s_local, b, nh, d]`, k and v `[s_local, b, ng, d]` -> `[s_local, b, nh * d]`.

    `key_padding_mask`: optional bool `[b, s_global]`, True = masked out, in global order. Causal
    means by global position. float32 math inside; the output has q's dtype."""
    if comm_type not in COMM_TYPES:
        raise ConfigError(f"unknown cp_comm_type {comm_type!r}; one of {', '.join(COMM_TYPES)}")
    if q.dim() != 4 or k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ConfigError(f"context-parallel attention wants q [s, b, nh, d] and k, v [s, b, ng, d]; "
                          f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ConfigError(f"{q.shape[2]} attention heads are not divisible by {k.shape[2]} query groups")
    cp = comm.group_size(group)
    seq = q.shape[0] * cp
    check_sequence(seq, cp)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (q.shape[1], seq):
        raise ConfigError(f"key_padding_mask must be bool [batch, global sequence] = {(q.shape[1], seq)}; "
                          f"got {tuple(key_padding_mask.shape)}")
    scale = 1.0 / math.sqrt(q.shape[3]) if softmax_scale is None else softmax_scale
    return COMM_TYPES[comm_type](q, k, v, group, causal, scale, key_padding_mask)


def expected_bytes(comm_type: str, *, cp: int, seq_length: int, batch: int, heads: int, groups: int, head_dim: int,
                   element_size: int = 4, backward: bool = False) -> dict[str, int]:
    """What the comm ledger counts on each rank for one attention call over the cp group, per operation
    (its byte convention: megalith.parallel.comm_ledger). `backward`: the backward pass's instead.

    p2p: (cp-1) KV blocks sent (and received) forward; backward 2(cp-1): KV again plus the dK/dV
    accumulators, which travel in float32. all_gather: the gathered KV (forward) and its reduce-scattered
    gradient (backward). a2a: q, k, v and the output through all-to-all, forward and backward alike."""
    if cp == 1:
        return {}
    check_sequence(seq_length, cp)
    local = seq_length // cp
    kv_block = 2 * local * batch * groups * head_dim
    if comm_type == "p2p":
        sent = (cp - 1) * kv_block * (element_size + 4 if backward else element_size)
        return {"send": sent, "recv": sent}
    if comm_type == "all_gather":
        return {"reduce_scatter" if backward else "all_gather": cp * kv_block * element_size}
    if comm_type == "a2a":
        check_heads(heads, groups, cp)
        return {"all_to_all": local * batch * (2 * heads + 2 * groups) * head_dim * element_size}
    raise ConfigError(f"unknown cp_comm_type {comm_type!r}; one of {', '.join(COMM_TYPES)}")


def wire_bytes(comm_type: str, **shape) -> int:
    """Bytes that leave each rank, the issue's formulas: p2p the sends; all_gather KV (cp-1)/cp; a2a
    4 b s h (cp-1)/cp^2 forward (h = heads x head_dim, when groups = heads). The ledger counts full
    tensors; the share a rank keeps for itself never moves."""
    counted = sum(expected_bytes(comm_type, **shape).values())
    cp = shape["cp"]
    if comm_type == "p2p":
        return counted // 2  # sends only, not the receives
    return counted * (cp - 1) // cp
