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

from megalith.config import Layout, ModelConfig
from megalith.errors import ConfigError
from megalith.models.parallel_context import ParallelContext, StageSpec, with_kernels
from megalith.models.transformer import TransformerBlock, TransformerLayer, dropout, loss_per_token, rotary_cos_sin
from megalith.parallel import comm
from megalith.parallel.layers import (
    ColumnParallelLinear,
    InitMethod,
    VocabParallelEmbedding,
    mark_sequence_parallel,
    normal_init,
    padded_vocab_size,
    parallel_lm_logits,
    scaled_normal_init,
    sequence_parallel_parameters,
    xavier_uniform_init,
)
from megalith.parallel.rng import model_parallel_rng_tracker

EMBEDDING_STREAM, OUTPUT_STREAM, FIRST_LAYER_STREAM = 0, 1, 2
# Parameters whose rows are the (padded) vocabulary, and the tied head copy's original.
PADDED_VOCAB_PARAMETERS = ("word_embeddings.weight", "output_layer.weight", "word_embeddings_for_head.weight")
TIED_COPY_ALIASES = {"word_embeddings_for_head.weight": "embedding.word_embeddings.weight"}


def init_generator(seed: int, stream: int) -> torch.Generator:
    """A generator per model part: the same weights whichever parts this process builds."""
    return torch.Generator().manual_seed(seed * 100_003 + stream)


def weight_init(config: ModelConfig, generator: torch.Generator) -> InitMethod:
    """How every weight matrix and table is drawn: N(0, --init-method-std), or Xavier-uniform with
    --init-method-xavier-uniform (Megatron then uses it for every init, embeddings included)."""
    if config.init_method_xavier_uniform:
        return xavier_uniform_init(generator)
    return normal_init(config.init_method_std, generator)


def output_weight_init(config: ModelConfig, generator: torch.Generator) -> InitMethod:
    """The layers that write into the residual (attention's and the MLP's output projections):
    N(0, std / sqrt(2 * num_layers)), or Xavier-uniform like every other weight (Megatron)."""
    if config.init_method_xavier_uniform:
        return xavier_uniform_init(generator)
    return scaled_normal_init(config.init_method_std, config.num_layers, generator)


def layer_inits(config: ModelConfig, seed: int, index: int) -> tuple[InitMethod, InitMethod]:
    """Layer `index`'s (weight, output-projection) inits, from the layer's own generator."""
    generator = init_generator(seed, FIRST_LAYER_STREAM + index)
    return weight_init(config, generator), output_weight_init(config, generator)


def word_embeddings(config: ModelConfig, ctx: ParallelContext, generator: torch.Generator) -> VocabParallelEmbedding:
    """The vocab-parallel word embedding: the first draw from the embedding's generator."""
    return VocabParallelEmbedding(
        config.vocab_size, config.hidden_size, tp_group=ctx.tp_group,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        sequence_parallel=ctx.sequence_parallel, init_method=weight_init(config, generator),
        params_dtype=config.torch_dtype, device=ctx.device,
    )


def mark_tied_embedding(word_embedding: nn.Module | None, head_copy: nn.Module | None) -> None:
    """A word embedding tied to the output across pipeline stages: both copies' gradients are
    summed over the embedding group (`sum_tied_embedding_grads`) and the copy on the last stage
    is counted once in the global grad norm."""
    for module in (word_embedding, head_copy):
        if module is not None:
            module.weight.shared_embedding = True
    if head_copy is not None:
        head_copy.weight.is_tied_copy = True


def sum_tied_embedding_grads(model: nn.Module, embedding_group) -> None:
    """The tied embedding's two copies' gradients, summed over the first and last stage."""
    shared = [p for p in model.parameters() if getattr(p, "shared_embedding", False)]
    if shared:
        if embedding_group is None:
            raise RuntimeError("a tied embedding split over pipeline stages needs ctx.embedding_group")
        comm.all_reduce_grads(shared, embedding_group)


class GPTEmbedding(nn.Module):
    """Word embeddings (vocab-parallel) plus learned positions (none with rope, or with
    --no-position-embedding); output `[s, b, h]` (SP: `[s/tp, b, h]`)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        init = weight_init(config, generator)
        self.word_embeddings = word_embeddings(config, ctx, generator)
        self.position_embeddings = None
        if config.has_position_table:
            self.position_embeddings = nn.Embedding(
                config.max_position_embeddings, config.hidden_size, dtype=config.torch_dtype, device=ctx.device
            )
            with torch.no_grad():
                weight = torch.empty(self.position_embeddings.weight.shape)
                init(weight)
                self.position_embeddings.weight.copy_(weight)
            mark_sequence_parallel(self.position_embeddings, ctx.sequence_parallel)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """`position_ids [b, s]` (None: 0..s-1 for every sequence) index the learned positions."""
        h = self.word_embeddings(input_ids.t())  # ids [b, s] -> [s, b, h]
        if self.position_embeddings is not None:
            if position_ids is None:
                positions = torch.arange(input_ids.shape[1], device=input_ids.device)[:, None]  # [s, 1]
            else:
                positions = position_ids.t()  # [s, b]
            if self.ctx.sequence_parallel:
                positions = positions.chunk(self.ctx.tp_size)[self.ctx.tp_rank]
            h = h + self.position_embeddings(positions)
        return dropout(h, self.config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)


class GPTModel(nn.Module):
    """A decoder-only language model, or one pipeline stage of it.

    Whole model: `forward(input_ids [b, s], labels [b, s])` -> per-token loss `[b, s]` (fp32);
    without labels, this rank's logits `[s, b, padded_vocab / tp]`. A stage (`stage=StageSpec`)
    holds the embedding if it is the first, its layers, and the final norm, output layer and
    loss if it is the last; `hidden` carries the activations `[s, b, h]` (`[s/tp, b, h]` under
    SP) from the previous stage. With tied embeddings and more than one stage, the last stage
    holds `word_embeddings_for_head`, a copy of the word embedding that starts equal and stays
    equal because `finish_grad_sync` sums both copies' gradients over the embedding group.

    `attention_mask` (bool, True = masked out, broadcastable to `[b, 1, s, s]`) adds padding
    or document masks to the causal one; `position_ids [b, s]` (None: 0..s-1) restart positions
    at document boundaries (Megatron's --reset-position-ids), learned or rotary alike.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext | None = None, init_seed: int = 1234,
                 stage: StageSpec | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        stage = stage or StageSpec(layers=tuple(range(config.num_layers)))
        Layout(tp=ctx.tp_size, sequence_parallel=ctx.sequence_parallel).check_model(config)
        if config.post_layer_norm:
            raise ConfigError("--post-layer-norm is for BERT-style encoders; GPT is pre-norm (drop the flag)")
        if ctx.rng_tracker is None:
            ctx.rng_tracker = model_parallel_rng_tracker(init_seed, ctx.tp_rank, ctx.device or "cpu")
        ctx = with_kernels(config, ctx)  # the record of which implementation runs each piece, resolved once
        self.config, self.ctx, self.stage = config, ctx, stage
        self.embedding = GPTEmbedding(config, ctx, init_generator(init_seed, EMBEDDING_STREAM)) if stage.is_first else None
        layers = {index: TransformerLayer(config, ctx, *layer_inits(config, init_seed, index), layer_index=index) for index in stage.layers}
        self.decoder = TransformerBlock(config, ctx, layers, final_norm=stage.is_last)
        self.output_layer = self.word_embeddings_for_head = None
        if stage.is_last and config.untie_embeddings_and_output_weights:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, padded_vocab_size(config.vocab_size, ctx.tp_size, config.make_vocab_size_divisible_by),
                tp_group=ctx.tp_group, bias=False, sequence_parallel=ctx.sequence_parallel,
                init_method=weight_init(config, init_generator(init_seed, OUTPUT_STREAM)),
                params_dtype=config.torch_dtype, device=ctx.device,
            )
        elif stage.is_last and not stage.is_first:  # drawn from the embedding's generator: equal at start
            self.word_embeddings_for_head = word_embeddings(config, ctx, init_generator(init_seed, EMBEDDING_STREAM))
        if stage.count > 1 and not config.untie_embeddings_and_output_weights:
            mark_tied_embedding(self.embedding and self.embedding.word_embeddings, self.word_embeddings_for_head)

    def output_weight(self) -> torch.Tensor:
        if self.output_layer is not None:
            return self.output_layer.weight
        if self.word_embeddings_for_head is not None:
            return self.word_embeddings_for_head.weight
        return self.embedding.word_embeddings.weight

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        if input_ids.shape[1] > config.seq_length and config.has_position_table:
            raise ValueError(f"input of {input_ids.shape[1]} tokens exceeds seq_length {config.seq_length}")
        h = self.embedding(input_ids, position_ids) if self.stage.is_first else hidden
        rotary = None
        if config.position_embedding_type == "rope":
            rotary = rotary_cos_sin(input_ids.shape[1], config.rotary_dim, config.rotary_base, input_ids.device,
                                    position_ids)
        h = self.decoder(h, rotary, attention_mask)
        if not self.stage.is_last:
            return h
        logits = parallel_lm_logits(h, self.output_weight(), self.ctx.tp_group, sequence_parallel=self.ctx.sequence_parallel)
        if labels is None:
            return logits
        loss = loss_per_token(logits, labels.t(), self.ctx, self.ctx.kernels, vocab_size=config.vocab_size)
        return loss.t()

    # --- the pipeline engine's interface ------------------------------------------------

    @property
    def outputs_freeable(self) -> bool:
        """A stage's output is a residual sum (or the embedding), which autograd does not keep,
        so the engine may drop its storage once sent; a layerless middle stage passes its input on."""
        return bool(self.stage.layers) or self.stage.is_first

    def pipeline_forward(self, inputs: tuple[torch.Tensor, ...] | None, batch: dict):
        """One stage's step: the tensors received (None on the first stage) -> the tensors to
        send on, or the per-token loss on the last stage."""
        out = self(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"),
                   hidden=inputs[0] if inputs else None, position_ids=batch.get("position_ids"))
        return out if self.stage.is_last else (out,)

    def pipeline_shapes(self, micro_batch_size: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors passed between stages, known before any data flows."""
        seq = self.config.seq_length // (self.ctx.tp_size if self.ctx.sequence_parallel else 1)
        return [(seq, micro_batch_size, self.config.hidden_size)]

    def finish_grad_sync(self) -> None:
        """Sum over tp the gradients each rank computed from its tokens only (SP), then the tied
        embedding's two copies over the embedding group."""
        comm.all_reduce_grads(sequence_parallel_parameters(self), self.ctx.tp_group)
        sum_tied_embedding_grads(self, self.ctx.embedding_group)
