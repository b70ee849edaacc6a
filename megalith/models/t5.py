"""T5: an encoder-decoder from megalith's parallel layers, as Hugging Face's T5ForConditionalGeneration.

Encoder: word embedding -> bidirectional pre-norm layers with a relative position bias -> final
norm. Decoder: the same word embedding -> causal self-attention (its own relative bias), then
cross-attention to the encoder output, then the MLP, per layer -> final norm -> output layer
(tied: the word embedding, with the hidden state scaled by hidden_size**-0.5 first, as HF's
tied T5 does; untied: an own column-parallel layer). Attention scores are not scaled by
1/sqrt(d) (T5 folds that into its initialisation). Positions are relative buckets only: they are
what the T5 checkpoints people fine-tune use, and they need no length-bound table.

Pipeline: the encoder's and the decoder's layers are one sequence of `encoder_num_layers +
decoder_num_layers` (= num_layers) layers, split over stages like GPT's. The stage that holds
the last encoder layer applies the encoder's final norm; the stage that holds the first decoder
layer embeds the decoder input. Between stages travels the encoder's hidden state while the
encoder runs, then the encoder output alone (when the split falls exactly between encoder and
decoder), then the decoder's hidden state together with the encoder output, which every decoder
layer attends to. Tables that several stages use — the word embedding (encoder input, decoder
input, tied output) and each stack's relative-bias table — are copies kept equal by summing
their gradients over the pipeline group (`finish_grad_sync`); the copy on the earliest stage is
the one checkpoints keep and the gradient norm counts.

Initialisation is exact across layouts as in GPT: the embedding, the output layer, each layer
and each bias table draw from their own generator seeded from `init_seed` and an index.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megalith.config import Layout, ModelConfig
from megalith.errors import ConfigError
from megalith.kernel_choice import kernels_of
from megalith.models.gpt import (
    EMBEDDING_STREAM, FIRST_LAYER_STREAM, OUTPUT_STREAM, init_generator, layer_inits, weight_init, word_embeddings,
)
from megalith.models.parallel_context import ParallelContext, StageSpec, with_kernels
from megalith.models.transformer import (MLP, SelfAttention, TransformerBlock, TransformerLayer, attend, build_norm,
                                         dropout, local_or_te, loss_per_token)
from megalith.parallel import comm
from megalith.parallel.layers import (
    ColumnParallelLinear,
    InitMethod,
    RowParallelLinear,
    padded_vocab_size,
    parallel_lm_logits,
    sequence_parallel_parameters,
    sharded_parameter,
)
from megalith.parallel.rng import model_parallel_rng_tracker

ENCODER, ENCODED, DECODER = "encoder", "encoded", "decoder"  # what travels between two stages
SHARED_TABLES = ("embedding.word_embeddings.weight", "encoder_relative_position.weight",
                 "decoder_relative_position.weight")


def relative_position_buckets(query_length: int, key_length: int, *, bidirectional: bool, num_buckets: int,
                              max_distance: int, device=None) -> torch.Tensor:
    """`[sq, sk]` bucket of each key position relative to each query position (T5's scheme):
    half the buckets (per direction when bidirectional) hold exact distances, the rest
    logarithmically wider ranges up to `max_distance`, beyond which distances share the last."""
    query = torch.arange(query_length, device=device)[:, None]
    key = torch.arange(key_length, device=device)[None, :]
    relative = key - query
    offset = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        offset = (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)  # a causal decoder never looks ahead
    exact = num_buckets // 2
    scaled = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    wide = (exact + (scaled * (num_buckets - exact)).long()).clamp(max=num_buckets - 1)
    return offset + torch.where(distance < exact, distance, wide)


class RelativePositionBias(nn.Module):
    """A stack's `[buckets, heads]` table of position biases, its heads split over tp like the
    attention's (each rank keeps its heads' columns); `forward(sq, sk)` -> `[1, heads/tp, sq, sk]`."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, bidirectional: bool, init: InitMethod) -> None:
        super().__init__()
        self.config, self.bidirectional = config, bidirectional
        self.weight = sharded_parameter((config.relative_attention_num_buckets, config.num_attention_heads), 1,
                                        ctx.tp_group, init, config.torch_dtype, ctx.device)

    def forward(self, query_length: int, key_length: int) -> torch.Tensor:
        buckets = relative_position_buckets(
            query_length, key_length, bidirectional=self.bidirectional, device=self.weight.device,
            num_buckets=self.config.relative_attention_num_buckets,
            max_distance=self.config.relative_attention_max_distance)
        return self.weight[buckets].permute(2, 0, 1)[None]


class CrossAttention(nn.Module):
    """Queries from the decoder (column-parallel), keys and values from the encoder output
    (one column-parallel `[k; v]` projection, each part split over tp), output row-parallel."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init: InitMethod, output_init: InitMethod,
                 softmax_scale: float | None = None) -> None:
        super().__init__()
        self.config, self.ctx, self.causal, self.softmax_scale = config, ctx, False, softmax_scale
        self.kernels = kernels_of(config, ctx)
        width = config.num_attention_heads * config.kv_channels
        common = dict(tp_group=ctx.tp_group, sequence_parallel=ctx.sequence_parallel, bias=config.add_bias_linear,
                      params_dtype=config.torch_dtype, device=ctx.device)
        self.linear_q = ColumnParallelLinear(config.hidden_size, width, init_method=init, **common)
        self.linear_kv = ColumnParallelLinear(config.hidden_size, 2 * width, stride=2, init_method=init, **common)
        self.linear_proj = RowParallelLinear(width, config.hidden_size, input_is_parallel=True,
                                             init_method=output_init, **common)
        self.linear_q, self.linear_kv, self.linear_proj = (local_or_te(layer, ctx, config) for layer in
                                                           (self.linear_q, self.linear_kv, self.linear_proj))
        self.te_attention = None
        if self.kernels.attention == "te":
            from megalith.models.te_layers import TEAttention

            self.te_attention = TEAttention(config, ctx, False, softmax_scale)

    def forward(self, x: torch.Tensor, encoder_output: torch.Tensor, attention_mask: torch.Tensor | None):
        d = self.config.kv_channels
        q = self.linear_q(x)
        q = q.view(*q.shape[:2], -1, d)
        k, v = (part.reshape(*part.shape[:2], -1, d) for part in self.linear_kv(encoder_output).chunk(2, dim=-1))
        if self.te_attention is not None:
            return self.linear_proj(self.te_attention(q, k, v, attention_mask))
        return self.linear_proj(attend(q, k, v, attention_mask, None, self))


class T5DecoderLayer(nn.Module):
    """Pre-norm: x + self-attention (causal, relative bias), + cross-attention to the encoder
    output, + MLP; each sublayer's output through dropout. Megatron-Core's names."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init: InitMethod, output_init: InitMethod) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        self.input_layernorm = build_norm(config, ctx)
        self.self_attention = SelfAttention(config, ctx, init, output_init, causal=True, softmax_scale=1.0)
        self.pre_cross_attn_layernorm = build_norm(config, ctx)
        self.cross_attention = CrossAttention(config, ctx, init, output_init, softmax_scale=1.0)
        self.pre_mlp_layernorm = build_norm(config, ctx)
        self.mlp = MLP(config, ctx, init, output_init)

    def forward(self, x, attention_mask, attention_bias, encoder_output, cross_mask) -> torch.Tensor:
        def residual(x, out):
            return x + dropout(out, self.config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)

        x = residual(x, self.self_attention(self.input_layernorm(x), None, attention_mask, attention_bias))
        x = residual(x, self.cross_attention(self.pre_cross_attn_layernorm(x), encoder_output, cross_mask))
        return residual(x, self.mlp(self.pre_mlp_layernorm(x)))


def _key_mask(padding_mask: torch.Tensor | None) -> torch.Tensor | None:
    """True-at-real-tokens `[b, s]` -> Megatron's True-masks-out `[b, 1, 1, s]` over keys."""
    return None if padding_mask is None else ~padding_mask.bool()[:, None, None, :]


class T5Model(nn.Module):
    """T5, or one pipeline stage of it (every stage holds at least one layer).

    Whole model: `forward(encoder_input_ids [b, se], decoder_input_ids [b, sd], labels [b, sd],
    encoder_padding_mask, decoder_padding_mask)` (masks True at real tokens) -> per-token loss
    `[b, sd]` (fp32; labels -1 are ignored); without labels, this rank's logits
    `[sd, b, padded_vocab / tp]`. A stage also takes `inputs`, the tensors the previous stage sent.
    """

    def __init__(self, config: ModelConfig, ctx: ParallelContext | None = None, init_seed: int = 1234,
                 stage: StageSpec | None = None) -> None:
        super().__init__()
        ctx = ctx or ParallelContext()
        check_t5_config(config)
        stage = stage or StageSpec(layers=tuple(range(config.num_layers)))
        Layout(tp=ctx.tp_size, sequence_parallel=ctx.sequence_parallel).check_model(config)
        if not stage.layers:
            raise ConfigError(f"T5 pipeline stage {stage.index} holds no layer; every stage needs one (change "
                              "--decoder-first/last-pipeline-num-layers)")
        if ctx.pipeline_group is not None and stage.count != comm.group_size(ctx.pipeline_group):
            raise ConfigError("T5 does not support interleaved pipelines; drop --num-layers-per-virtual-pipeline-stage")
        if ctx.rng_tracker is None:
            ctx.rng_tracker = model_parallel_rng_tracker(init_seed, ctx.tp_rank, ctx.device or "cpu")
        ctx = with_kernels(config, ctx)  # the record of which implementation runs each piece, resolved once
        self.config, self.ctx, self.stage = config, ctx, stage
        encoders = config.encoder_num_layers
        self.first_layer, self.end_layer = stage.layers[0], stage.layers[-1] + 1
        self.encoder = self.decoder = self.embedding = self.output_layer = None
        self.encoder_relative_position = self.decoder_relative_position = None

        def inits(index):
            return layer_inits(config, init_seed, index)

        def bias_init(which: int):
            return weight_init(config, init_generator(init_seed, FIRST_LAYER_STREAM + config.num_layers + which))

        encoder_layers = {i: TransformerLayer(config, ctx, *inits(i), causal=False, softmax_scale=1.0)
                          for i in stage.layers if i < encoders}
        decoder_layers = {i - encoders: T5DecoderLayer(config, ctx, *inits(i)) for i in stage.layers if i >= encoders}
        tied = not config.untie_embeddings_and_output_weights
        if stage.is_first or encoders in stage.layers or (stage.is_last and tied):
            self.embedding = nn.Module()
            self.embedding.word_embeddings = word_embeddings(config, ctx, init_generator(init_seed, EMBEDDING_STREAM))
        if encoder_layers:
            self.encoder_relative_position = RelativePositionBias(config, ctx, True, bias_init(0))
            self.encoder = TransformerBlock(config, ctx, encoder_layers, final_norm=encoders - 1 in stage.layers)
        if decoder_layers:
            self.decoder_relative_position = RelativePositionBias(config, ctx, False, bias_init(1))
            self.decoder = TransformerBlock(config, ctx, decoder_layers, final_norm=stage.is_last)
        if stage.is_last and not tied:
            self.output_layer = ColumnParallelLinear(
                config.hidden_size, padded_vocab_size(config.vocab_size, ctx.tp_size, config.make_vocab_size_divisible_by),
                tp_group=ctx.tp_group, bias=False, sequence_parallel=ctx.sequence_parallel,
                init_method=weight_init(config, init_generator(init_seed, OUTPUT_STREAM)),
                params_dtype=config.torch_dtype, device=ctx.device)
        if stage.count > 1:
            self._mark_shared_tables()

    def _mark_shared_tables(self) -> None:
        """Tables other stages may hold too: their own data-parallel bucket (matching ZeRO-1 slices
        on every stage), and all but the earliest stage's copy left out of checkpoints and norms."""
        parameters = dict(self.named_parameters())
        canonical = {SHARED_TABLES[0]: self.stage.is_first,
                     SHARED_TABLES[1]: 0 in self.stage.layers,
                     SHARED_TABLES[2]: self.config.encoder_num_layers in self.stage.layers}
        for name, is_canonical in canonical.items():
            if name in parameters:
                parameters[name].shared_embedding = True
                parameters[name].is_tied_copy = not is_canonical

    # --- one stage's computation --------------------------------------------------------

    def _form(self, position: int) -> str:
        """What travels into the stage whose first layer is `position`."""
        encoders = self.config.encoder_num_layers
        return ENCODER if position < encoders else ENCODED if position == encoders else DECODER

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embedding.word_embeddings(input_ids.t())  # ids [b, s] -> [s, b, h] (SP: [s/tp, b, h])
        return dropout(h, self.config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)

    def forward(self, encoder_input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                labels: torch.Tensor | None = None, encoder_padding_mask: torch.Tensor | None = None,
                decoder_padding_mask: torch.Tensor | None = None, inputs: tuple[torch.Tensor, ...] | None = None):
        config, stage = self.config, self.stage
        encoder_mask, decoder_mask = _key_mask(encoder_padding_mask), _key_mask(decoder_padding_mask)
        encoder_length, decoder_length = encoder_input_ids.shape[1], decoder_input_ids.shape[1]
        hidden = encoder_output = None
        form = self._form(self.first_layer)
        if stage.is_first:
            hidden = self._embed(encoder_input_ids)
        elif form == ENCODER:
            hidden = inputs[0]
        elif form == ENCODED:
            encoder_output = inputs[0]
        else:
            hidden, encoder_output = inputs
        if self.encoder is not None:
            bias = self.encoder_relative_position(encoder_length, encoder_length)
            hidden = self.encoder(hidden, None, encoder_mask, bias)
            if self.encoder.final_layernorm is None:
                return (hidden,)  # the encoder goes on in the next stage
            encoder_output = dropout(hidden, config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)
            if self.decoder is None:
                return (encoder_output,)
        if self.first_layer <= config.encoder_num_layers < self.end_layer:
            hidden = self._embed(decoder_input_ids)
        bias = self.decoder_relative_position(decoder_length, decoder_length)
        hidden = self.decoder(hidden, decoder_mask, bias, encoder_output, encoder_mask)
        if not stage.is_last:
            # a copy: the encoder output this stage's cross-attention saved must outlive the send
            return hidden, encoder_output.clone()
        hidden = dropout(hidden, config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)
        if self.output_layer is None:
            hidden = hidden * config.hidden_size ** -0.5  # HF's tied T5
        weight = self.output_layer.weight if self.output_layer is not None else self.embedding.word_embeddings.weight
        logits = parallel_lm_logits(hidden, weight, self.ctx.tp_group, sequence_parallel=self.ctx.sequence_parallel)
        if labels is None:
            return logits
        return loss_per_token(logits, labels.t(), self.ctx, self.ctx.kernels, vocab_size=config.vocab_size,
                              ignore_index=-1).t()

    # --- the pipeline engine's interface ------------------------------------------------

    @property
    def outputs_freeable(self) -> bool:
        """Every output is a residual sum, a norm's (dropped-out) output or a copy: autograd keeps none."""
        return True

    def pipeline_forward(self, inputs: tuple[torch.Tensor, ...] | None, batch: dict):
        """One stage's step on a T5Dataset micro-batch."""
        out = self(batch["encoder_input_ids"], batch["decoder_input_ids"], batch.get("labels"),
                   batch.get("encoder_padding_mask"), batch.get("decoder_padding_mask"), inputs)
        return out if self.stage.is_last else tuple(out)

    def _shapes(self, form: str, micro_batch_size: int) -> list[tuple[int, ...]]:
        split = self.ctx.tp_size if self.ctx.sequence_parallel else 1
        encoder = (self.config.seq_length // split, micro_batch_size, self.config.hidden_size)
        decoder = (self.config.decoder_seq_length // split, micro_batch_size, self.config.hidden_size)
        return [decoder, encoder] if form == DECODER else [encoder]

    def pipeline_shapes(self, micro_batch_size: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors this stage receives."""
        return self._shapes(self._form(self.first_layer), micro_batch_size)

    def pipeline_output_shapes(self, micro_batch_size: int) -> list[tuple[int, ...]]:
        """Shapes of the tensors this stage sends (what the next stage receives)."""
        return [] if self.stage.is_last else self._shapes(self._form(self.end_layer), micro_batch_size)

    def finish_grad_sync(self) -> None:
        """Sum over tp what sequence parallelism left partial, then every shared table's copies
        over the pipeline (a stage without a copy adds zeros: one collective, the same on all)."""
        comm.all_reduce_grads(sequence_parallel_parameters(self), self.ctx.tp_group)
        group = self.ctx.pipeline_group
        if comm.group_size(group) == 1:
            return
        parameters = dict(self.named_parameters())
        parts, shapes = [], self._shared_table_shapes()
        for name, shape in zip(SHARED_TABLES, shapes):
            grad = comm.gradient_of(parameters[name]) if name in parameters else None
            parts.append(grad.reshape(-1).float() if grad is not None else torch.zeros(math.prod(shape),
                                                                                       device=self.ctx.device))
        flat = torch.cat(parts)
        comm.all_reduce(flat, group)
        for name, summed in zip(SHARED_TABLES, flat.split([math.prod(shape) for shape in shapes])):
            grad = comm.gradient_of(parameters[name]) if name in parameters else None
            if grad is not None:
                grad.copy_(summed.view_as(grad))

    def _shared_table_shapes(self) -> list[tuple[int, ...]]:
        """This rank's shapes of SHARED_TABLES, known whether or not this stage holds them."""
        config, tp = self.config, self.ctx.tp_size
        vocab = padded_vocab_size(config.vocab_size, tp, config.make_vocab_size_divisible_by)
        heads = (config.relative_attention_num_buckets, config.num_attention_heads // tp)
        return [(vocab // tp, config.hidden_size), heads, heads]


def check_t5_config(config: ModelConfig) -> None:
    """What T5 needs of a (resolved) model config: one clear line otherwise."""
    if config.encoder_num_layers is None or config.decoder_num_layers is None:
        raise ConfigError("T5 needs --encoder-num-layers and --decoder-num-layers (resolve the config with "
                          "megalith.models.t5.resolve_t5_config)")
    if config.position_embedding_type != "relative":
        raise ConfigError("T5 uses relative position buckets; drop --position-embedding-type "
                          f"{config.position_embedding_type}")
    if config.num_query_groups != config.num_attention_heads:
        raise ConfigError("T5 uses plain multi-head attention; drop --num-query-groups")
    if config.post_layer_norm:
        raise ConfigError("T5 is pre-norm; drop --post-layer-norm")
    if config.qk_layernorm:
        raise ConfigError("T5 has no --qk-layernorm (Megatron's T5 layers have none); drop the flag")


def resolve_t5_config(config: ModelConfig) -> ModelConfig:
    """Megatron's T5 flags made whole: --encoder-num-layers / --decoder-num-layers default to
    --num-layers, which then becomes their sum (the layers the pipeline splits); the decoder's
    length defaults to the encoder's (--seq-length or --encoder-seq-length). Idempotent."""
    from dataclasses import replace

    encoders = config.encoder_num_layers or config.num_layers
    decoders = config.decoder_num_layers or config.num_layers
    if config.position_embedding_type != "relative":
        raise ConfigError("T5 uses relative position buckets; drop --position-embedding-type "
                          f"{config.position_embedding_type}")
    return replace(config, encoder_num_layers=encoders, decoder_num_layers=decoders, num_layers=encoders + decoders,
                   encoder_seq_length=config.seq_length, decoder_seq_length=config.decoder_seq_length or config.seq_length)
