"""Which tokens each context-parallel rank holds: Megatron's load-balanced chunk order (pure).

Under causal attention a token attends to every token before it, so the late part of a
sequence costs more than the early part. Cutting the sequence into 2*cp equal chunks and
giving rank r chunks r and 2*cp-1-r pairs a cheap chunk with an expensive one, so every rank
does the same work. Every rank's tokens sit in that order, chunk r first.
"""

from __future__ import annotations

import torch

from megalith.errors import ConfigError


def check_sequence(seq_length: int, cp: int) -> int:
    """The chunk length seq_length / (2*cp); one clear line when it does not divide."""
    if cp < 1:
        raise ConfigError(f"context-parallel size must be at least 1, got {cp}")
    if seq_length % (2 * cp) != 0:
        raise ConfigError(
            f"sequence length {seq_length} is not divisible by 2 x context-parallel size = {2 * cp}; "
            f"choose a sequence length that is a multiple of {2 * cp}")
    return seq_length // (2 * cp)


def load_balanced_indices(seq_length: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """The global positions rank `rank` holds, in its local order: chunk rank, then chunk 2*cp-1-rank."""
    chunk = check_sequence(seq_length, cp)
    if not 0 <= rank < cp:
        raise ConfigError(f"context-parallel rank {rank} is outside 0..{cp - 1}")
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    second = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, second])


def split_for_context_parallel(tensor: torch.Tensor, dim: int, cp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s tokens of `tensor` along `dim` (the global sequence), in load-balanced order."""
    if cp == 1:
        return tensor
    index = load_balanced_indices(tensor.shape[dim], cp, rank, device=tensor.device)
    return tensor.index_select(dim, index)


def gathered_positions(seq_length: int, cp: int, device=None) -> torch.Tensor:
    """The global position of each row of the concatenation of every rank's tokens in rank order
    (what an all-gather or Ulysses all-to-all over the cp group produces)."""
    return torch.cat([load_balanced_indices(seq_length, cp, r, device=device) for r in range(cp)])


def restore_global_order(per_rank: list[torch.Tensor], dim: int) -> torch.Tensor:
    """Inverse of split_for_context_parallel: every rank's piece (in rank order) back in global order."""
    cp = len(per_rank)
    joined = torch.cat(per_rank, dim=dim)
    positions = gathered_positions(joined.shape[dim], cp, device=joined.device)
    return joined.index_select(dim, torch.argsort(positions))
