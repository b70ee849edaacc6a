"""A tiny tensor-parallel language model: the smallest thing that exercises every TP piece.

Vocab-parallel embedding -> residual MLP blocks (LayerNorm, column- then row-parallel linear)
-> final LayerNorm -> logits from the tied embedding -> vocab-parallel cross-entropy. No
attention (that arrives with the transformer layer), so it is a bigram model; it exists to
prove tensor and sequence parallelism exact end to end, and powers `megalith demo`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from megalith.config import ParallelConfig
from megalith.parallel import comm
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.parallel.layers import (
    ColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    mark_sequence_parallel,
    parallel_lm_logits,
    sequence_parallel_parameters,
)


@dataclass(frozen=True)
class TinyLMConfig:
    vocab_size: int = 97
    hidden_size: int = 32
    ffn_hidden_size: int = 64
    num_layers: int = 2
    seq_length: int = 16


class _Block(nn.Module):
    def __init__(self, config: TinyLMConfig, tp_group, sequence_parallel: bool) -> None:
        super().__init__()
        self.norm = mark_sequence_parallel(nn.LayerNorm(config.hidden_size), sequence_parallel)
        self.fc1 = ColumnParallelLinear(
            config.hidden_size, config.ffn_hidden_size, tp_group=tp_group, sequence_parallel=sequence_parallel
        )
        self.fc2 = RowParallelLinear(
            config.ffn_hidden_size, config.hidden_size, tp_group=tp_group,
            input_is_parallel=True, sequence_parallel=sequence_parallel,
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.gelu(self.fc1(self.norm(h))))


class TinyLM(nn.Module):
    """Sequence-first: ids and labels `[s, b]`; returns the per-token loss `[s, b]`."""

    def __init__(self, config: TinyLMConfig, tp_group=None, sequence_parallel: bool = False) -> None:
        super().__init__()
        ParallelConfig(comm.group_size(tp_group), sequence_parallel=sequence_parallel).check_model_shapes(
            hidden_size=config.hidden_size, ffn_hidden_size=config.ffn_hidden_size, seq_length=config.seq_length
        )
        self.config, self.tp_group, self.sequence_parallel = config, tp_group, sequence_parallel
        self.embedding = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_group=tp_group, sequence_parallel=sequence_parallel
        )
        self.blocks = nn.ModuleList(_Block(config, tp_group, sequence_parallel) for _ in range(config.num_layers))
        self.final_norm = mark_sequence_parallel(nn.LayerNorm(config.hidden_size), sequence_parallel)

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embedding(ids)
        for block in self.blocks:
            h = block(h)
        logits = parallel_lm_logits(
            self.final_norm(h), self.embedding.weight, self.tp_group, sequence_parallel=self.sequence_parallel
        )
        return vocab_parallel_cross_entropy(logits, labels, self.tp_group, vocab_size=self.config.vocab_size)

    def finish_grad_sync(self) -> None:
        """Sum the gradients of replicated parameters that each rank only saw part of (SP)."""
        comm.all_reduce_grads(sequence_parallel_parameters(self), self.tp_group)
