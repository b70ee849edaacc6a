"""GPT: vocab-parallel embedding (+ learned or rotary positions) -> transformer block -> tied or
untied output layer -> vocab-parallel cross-entropy.

Initialisation is exact across layouts and independent of which parts a process builds: the
embedding, each layer and the output layer draw from their own generator seeded from
`init_seed` and their index, so a pipeline stage that builds only some layers gets the same
weights one process would (and tensor-parallel ranks keep their slices of those).
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.config import ModelConfig, ParallelConfig
from megalith.models.parallel_context import ParallelContext
from megalith.models.transformer import TransformerBlock, TransformerLayer, dropout, rotary_cos_sin
from megalith.parallel import comm
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    mark_sequence_parallel,
    normal_init,
    parallel_lm_logits,
    scaled_normal_init,
    sequence_parallel_parameters,
)
from megalith.parallel.rng import model_parallel_rng_tracker

EMBEDDING_STREAM, OUTPUT_STREAM, FIRST_LAYER_STREAM = 0, 1, 2


def init_generator(seed: int, stream: int) -> torch.Generator:
    """A generator per model part: the same weights whichever parts this process builds."""
    return torch.Generator().manual_seed(seed * 100_003 + stream)


class GPTEmbedding(nn.Module):
    """Word embeddings (vocab-parallel) plus learned positions; output `[s, b, h]` (SP: `[s/tp, b, h]`)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        init = normal_init(config.init_method_std, generator)
        self.word_embeddings = VocabParallelEmbedding(
            config.vocab_size, config.hidden_size, tp_group=ctx.tp_group,
            make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
            sequence_parallel=ctx.sequence_parallel, init_method=init,
            params_dtype=config.torch_dtype, device=ctx.device,
        )
        self.position_embeddings = None
        if config.position_embedding_type == "learned_absolute":
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size, dtype=config.torch_dtype, device=ctx.device
            )
            with torch.no_grad():
                weight = torch.empty(self.position_embeddings.weight.shape)
                init(weight)
                self.position_embeddings.weight.copy_(weight)
            mark_sequence_parallel(self.position_embeddings, ctx.sequence_parallel)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.word_embeddings(input_ids.t())  # ids [b, s] -> [s, b, h]
        if self.position_embeddings is not None:
            seq = input_ids.shape[1]
            positions = torch.arange(seq, device=input_ids.device)
            if self.ctx.sequence_parallel:
                positions = positions.chunk(self.ctx.tp_size)[self.ctx.tp_rank]
            h = h + self.position_embeddings(positions).unsqueeze(1)
        return dropout(h, self.config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)


class GPTModel(nn.Module):
    """A decoder-only language model. `forward(input_ids [b, s], labels [b, s])` -> per-token
    loss `[b, s]` (fp32); without labels, this rank's logits `[s, b, padded_vocab / tp]`.

    `attention_mask` (bool, True = masked out, broadcastable to `[b, 1, s, s]`) adds padding
    masks to the causal one.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext | None = None, init_seed: int = 1234) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        config.check_parallel(ParallelConfig(ctx.tp_size, sequence_parallel=ctx.sequence_parallel))
        if ctx.rng_tracker is None:
            ctx.rng_tracker = model_parallel_rng_tracker(init_seed, ctx.tp_rank, ctx.device or "cpu")
        self.config, self.ctx = config, ctx
        self.embedding = GPTEmbedding(config, ctx, init_generator(init_seed, EMBEDDING_STREAM))
        layers = []
        for index in range(config.num_layers):
            generator = init_generator(init_seed, FIRST_LAYER_STREAM + index)
            layers.append(TransformerLayer(
                config, ctx, normal_init(config.init_method_std, generator),
                scaled_normal_init(config.init_method_std, config.num_layers, generator),
            ))
        self.decoder = TransformerBlock(config, ctx, layers)
        self.output_layer = None
        if config.untie_embeddings_and_output_weights:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, self.embedding.word_embeddings.padded_num_embeddings, tp_group=ctx.tp_group,
                bias=False, sequence_parallel=ctx.sequence_parallel,
                init_method=normal_init(config.init_method_std, init_generator(init_seed, OUTPUT_STREAM)),
                params_dtype=config.torch_dtype, device=ctx.device,
            )

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        return self.embedding.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        if input_ids.shape[1] > config.seq_length and config.position_embedding_type == "learned_absolute":
            raise ValueError(f"input of {input_ids.shape[1]} tokens exceeds seq_length {config.seq_length}")
        h = self.embedding(input_ids)
        rotary = None
        if config.position_embedding_type == "rope":
            rotary = rotary_cos_sin(input_ids.shape[1], config.kv_channels, config.rotary_base, input_ids.device)
        h = self.decoder(h, rotary, attention_mask)
        logits = parallel_lm_logits(h, self.output_weight(), self.ctx.tp_group, sequence_parallel=self.ctx.sequence_parallel)
        if labels is None:
            return logits
        loss = vocab_parallel_cross_entropy(logits, labels.t(), self.ctx.tp_group, vocab_size=config.vocab_size)
        return loss.t()

    def finish_grad_sync(self) -> None:
        """Sum over tp the gradients that each rank computed from its tokens only (SP)."""
        comm.all_reduce_grads(sequence_parallel_parameters(self), self.ctx.tp_group)
