"""BERT: vocab-parallel word embedding + learned positions + token types -> bidirectional
transformer block -> masked-LM head (tied to the word embedding) and sentence-order head.

Two layer orders: Megatron's pre-norm layers with a final norm (the default), or, with
`post_layer_norm`, the original BERT's post-norm layers after an embedding norm (Hugging
Face's BertModel; `megalith.convert.bert.bert_hf_to_global` maps its weights here).

Initialisation is exact across layouts as in GPT: the embedding, the heads and each layer draw
from their own generator seeded from `init_seed` and their index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from megalith.config import Layout, ModelConfig
from megalith.errors import ConfigError
from megalith.models.gpt import (
    EMBEDDING_STREAM, OUTPUT_STREAM, init_generator, layer_inits, mark_tied_embedding, sum_tied_embedding_grads,
    weight_init, word_embeddings,
)
from megalith.models.parallel_context import ParallelContext, StageSpec, with_kernels
from megalith.models.transformer import TransformerBlock, TransformerLayer, build_norm, dropout, loss_per_token
from megalith.parallel import comm
from megalith.parallel.layers import (
    InitMethod,
    mark_sequence_parallel,
    padded_vocab_size,
    parallel_lm_logits,
    sequence_parallel_parameters,
)
from megalith.parallel.rng import model_parallel_rng_tracker


def replicated_linear(in_features: int, out_features: int, init: InitMethod, config: ModelConfig,
                      ctx: ParallelContext) -> nn.Linear:
    """A linear layer replicated over tp: the full weight drawn from `init` (never torch's global
    RNG, so the draw is the same in every layout), bias zero."""
    layer = skip_init(nn.Linear, in_features, out_features, dtype=config.torch_dtype, device=ctx.device or "cpu")
    weight = torch.empty(out_features, in_features)
    init(weight)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.zero_()
    return layer


def _embedding_table(rows: int, config: ModelConfig, ctx: ParallelContext, init: InitMethod) -> nn.Embedding:
    table = skip_init(nn.Embedding, rows, config.hidden_size, dtype=config.torch_dtype, device=ctx.device or "cpu")
    weight = torch.empty(rows, config.hidden_size)
    init(weight)
    with torch.no_grad():
        table.weight.copy_(weight)
    return mark_sequence_parallel(table, ctx.sequence_parallel)


def _sequence_slice(ids: torch.Tensor, ctx: ParallelContext) -> torch.Tensor:
    """`[s, ...]` -> this rank's part of the sequence under SP (the whole of it otherwise)."""
    return ids.chunk(ctx.tp_size)[ctx.tp_rank] if ctx.sequence_parallel else ids


class BertEmbedding(nn.Module):
    """Word (vocab-parallel) + learned position (none with --no-position-embedding) + token-type
    embeddings, then (post-norm models) a norm; output `[s, b, h]` (SP: `[s/tp, b, h]`). Draws:
    words, positions, token types."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        init = weight_init(config, generator)
        self.word_embeddings = word_embeddings(config, ctx, generator)
        self.position_embeddings = (_embedding_table(config.max_position_embeddings, config, ctx, init)
                                    if config.has_position_table else None)
        self.tokentype_embeddings = (_embedding_table(config.num_tokentypes, config, ctx, init)
                                     if config.num_tokentypes else None)
        self.layernorm = build_norm(config, ctx) if config.post_layer_norm else None

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        h = self.word_embeddings(input_ids.t())  # ids [b, s] -> [s, b, h]
        if self.position_embeddings is not None:
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[:, None]
            h = h + self.position_embeddings(_sequence_slice(positions, self.ctx))
        if self.tokentype_embeddings is not None:
            types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
            h = h + self.tokentype_embeddings(_sequence_slice(types.t(), self.ctx))
        if self.layernorm is not None:
            h = self.layernorm(h)
        return dropout(h, self.config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)


class BertLMHead(nn.Module):
    """dense -> GELU -> norm on this rank's tokens (replicated weights, summed over tp under SP),
    then logits against the (tied) vocab-parallel word embedding plus an output bias.

    The bias is kept whole (`[vocab]`, replicated, no padding) so that every layout holds the
    same tensor; each rank adds its vocabulary slice and `BertModel.finish_grad_sync` sums the
    slices' gradients over tp.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init: InitMethod) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        self.dense = mark_sequence_parallel(
            replicated_linear(config.hidden_size, config.hidden_size, init, config, ctx), ctx.sequence_parallel)
        self.layernorm = build_norm(config, ctx)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size, dtype=config.torch_dtype, device=ctx.device))
        self.gelu_approximate = "tanh" if config.openai_gelu else "none"

    def forward(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        h = self.layernorm(F.gelu(self.dense(h), approximate=self.gelu_approximate))
        logits = parallel_lm_logits(h, weight, self.ctx.tp_group, sequence_parallel=self.ctx.sequence_parallel)
        padded = padded_vocab_size(self.config.vocab_size, self.ctx.tp_size, self.config.make_vocab_size_divisible_by)
        bias = F.pad(self.bias, (0, padded - self.config.vocab_size))
        return logits + bias.chunk(self.ctx.tp_size)[self.ctx.tp_rank]


class BertModel(nn.Module):
    """BERT, or one pipeline stage of it.

    Whole model: `forward(input_ids, token_type_ids, padding_mask, labels, is_random)` (all
    `[b, s]` but is_random `[b]`) -> per-token loss `[b, s]` (fp32); without labels, this rank's
    MLM logits `[s, b, padded_vocab / tp]` and the binary logits `[b, 2]` (None without the
    binary head). `padding_mask` is True at real tokens; padding is masked out as a key.

    The loss: cross-entropy on the masked positions (labels -1 elsewhere are ignored, never
    indexed), plus, with the binary head, each sequence's sentence-order loss added to every one
    of its tokens. megalith's step loss takes each sequence's mean over its `loss_mask`-ed
    tokens, so a sequence contributes its MLM mean + its binary loss, and the step loss is the
    batch mean of both: Megatron's `lm_loss + sop_loss`, with the MLM part averaged per sequence
    rather than per token (megalith's one definition of a step's loss). A sequence with no
    masked token contributes nothing, binary loss included (BertDataset always masks one).

    Pipeline stages as GPT: the first holds the embedding, every stage its layers, the last the
    final norm (pre-norm only), the heads and the loss, with `word_embeddings_for_head`, a copy
    of the word embedding kept equal by `finish_grad_sync`. Positions are always learned (rope is
    refused); untie_embeddings_and_output_weights is ignored (the MLM head is tied).
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext | None = None, init_seed: int = 1234,
                 stage: StageSpec | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        stage = stage or StageSpec(layers=tuple(range(config.num_layers)))
        Layout(tp=ctx.tp_size, sequence_parallel=ctx.sequence_parallel).check_model(config)
        if config.position_embedding_type != "learned_absolute":
            raise ConfigError("BERT uses learned absolute positions; drop --position-embedding-type")
        if ctx.rng_tracker is None:
            ctx.rng_tracker = model_parallel_rng_tracker(init_seed, ctx.tp_rank, ctx.device or "cpu")
        ctx = with_kernels(config, ctx)  # the record of which implementation runs each piece, resolved once
        self.config, self.ctx, self.stage = config, ctx, stage
        self.embedding = None
        if stage.is_first:
            self.embedding = BertEmbedding(config, ctx, init_generator(init_seed, EMBEDDING_STREAM))
        layers = {index: TransformerLayer(config, ctx, *layer_inits(config, init_seed, index), causal=False,
                                           layer_index=index) for index in stage.layers}
        self.encoder = TransformerBlock(config, ctx, layers, final_norm=stage.is_last and not config.post_layer_norm)
        self.lm_head = self.pooler = self.binary_head = self.word_embeddings_for_head = None
        if stage.is_last:
            init = weight_init(config, init_generator(init_seed, OUTPUT_STREAM))
            self.lm_head = BertLMHead(config, ctx, init)
            if not config.bert_no_binary_head:
                self.pooler = replicated_linear(config.hidden_size, config.hidden_size, init, config, ctx)
                self.binary_head = replicated_linear(config.hidden_size, 2, init, config, ctx)
            if not stage.is_first:  # drawn from the embedding's generator: equal at start
                generator = init_generator(init_seed, EMBEDDING_STREAM)
                self.word_embeddings_for_head = word_embeddings(config, ctx, generator)
        if stage.count > 1:
            mark_tied_embedding(self.embedding and self.embedding.word_embeddings, self.word_embeddings_for_head)

    def output_weight(self) -> torch.Tensor:
        if self.word_embeddings_for_head is not None:
            return self.word_embeddings_for_head.weight
        return self.embedding.word_embeddings.weight

    def binary_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Pooler (dense + tanh on the first token) -> 2 classes. Under SP the sequence is
        gathered; every rank then holds the whole gradient, so backward only splits it."""
        if self.ctx.sequence_parallel:
            h = comm.gather_from_sequence_parallel(h, self.ctx.tp_group, tensor_parallel_output_grad=False)
        return self.binary_head(torch.tanh(self.pooler(h[0])))

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                padding_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                is_random: torch.Tensor | None = None, hidden: torch.Tensor | None = None):
        config = self.config
        if config.has_position_table and input_ids.shape[1] > config.max_position_embeddings:
            raise ValueError(f"input of {input_ids.shape[1]} tokens exceeds max_position_embeddings "
                             f"{config.max_position_embeddings}")
        attention_mask = None if padding_mask is None else ~padding_mask.bool()[:, None, None, :]
        h = self.embedding(input_ids, token_type_ids) if self.stage.is_first else hidden
        h = self.encoder(h, None, attention_mask)
        if not self.stage.is_last:
            return h
        logits = self.lm_head(h, self.output_weight())
        binary = self.binary_logits(h) if self.binary_head is not None else None
        if labels is None:
            return logits, binary
        loss = loss_per_token(logits, labels.t(), self.ctx, self.ctx.kernels, vocab_size=config.vocab_size,
                              ignore_index=-1).t()
        if binary is not None:
            if is_random is None:
                raise ValueError("BERT's binary head needs is_random in the batch; "
                                 "give it or set --bert-no-binary-head")
            loss = loss + F.cross_entropy(binary.float(), is_random.reshape(-1).long(), reduction="none")[:, None]
        return loss

    # --- the pipeline engine's interface ------------------------------------------------

    @property
    def outputs_freeable(self) -> bool:
        """A stage's output is a residual sum, a norm of one, or the embedding, none of which
        autograd keeps; a layerless middle stage passes its input on."""
        return bool(self.stage.layers) or self.stage.is_first

    def pipeline_forward(self, inputs: tuple[torch.Tensor, ...] | None, batch: dict):
        """One stage's step on a BertDataset micro-batch: the tensors received (None on the first
        stage) -> the tensors to send on, or the per-token loss on the last stage."""
        out = self(batch["input_ids"], batch.get("token_type_ids"), batch.get("padding_mask"),
                   batch.get("labels"), batch.get("is_random"), hidden=inputs[0] if inputs else None)
        return out if self.stage.is_last else (out,)

    def pipeline_shapes(self, micro_batch_size: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors passed between stages, known before any data flows."""
        seq = self.config.seq_length // (self.ctx.tp_size if self.ctx.sequence_parallel else 1)
        return [(seq, micro_batch_size, self.config.hidden_size)]

    def finish_grad_sync(self) -> None:
        """Sum over tp what each rank computed only part of (SP: its tokens; the output bias: its
        vocabulary slice), then the tied embedding's two copies over the embedding group."""
        partial = sequence_parallel_parameters(self)
        if self.lm_head is not None:
            partial.append(self.lm_head.bias)
        comm.all_reduce_grads(partial, self.ctx.tp_group)
        sum_tied_embedding_grads(self, self.ctx.embedding_group)
