"""All-gather attention (cp_comm_type "all_gather"): every rank gathers the whole sequence's keys
and values, attends its own queries to them, and reduce-scatters their gradient in backward.

Simple and one collective each way, but each rank holds (and saves) the full KV: memory for
keys and values does not fall with cp, only for the queries, outputs and the rest of the layer.
"""

from __future__ import annotations

import torch

from megalith.parallel import comm
from megalith.parallel.context.blocks import attend, block_mask, from_grouped, group_queries
from megalith.parallel.context.layout import gathered_positions, load_balanced_indices


def all_gather_attention(q, k, v, group, causal: bool, scale: float, key_padding_mask=None) -> torch.Tensor:
    """`[s_local, b, nh * d]`: this rank's query rows against the gathered keys, masked by global position."""
    cp, groups = comm.group_size(group), k.shape[2]
    seq = q.shape[0] * cp
    kv = comm.gather_from_sequence_parallel(torch.cat([k, v], dim=2), group, tensor_parallel_output_grad=True)
    k4 = kv[:, :, :groups].float().permute(1, 2, 0, 3)
    v4 = kv[:, :, groups:].float().permute(1, 2, 0, 3)
    q_pos = load_balanced_indices(seq, cp, comm.group_rank(group), device=q.device)
    mask = block_mask(q_pos, gathered_positions(seq, cp, device=q.device), causal, key_padding_mask)
    return from_grouped(attend(group_queries(q, groups), k4, v4, mask, scale)).to(q.dtype)
