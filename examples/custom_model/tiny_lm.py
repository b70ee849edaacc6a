"""tiny_lm: a language model defined outside megalith, from megalith's parallel layers.

Its layer is GPT-J's parallel block: one norm, and attention and MLP both read it and add to
the residual together, `x + attention(norm(x)) + mlp(norm(x))`, which megalith's GPT cannot
express. Positions are rotary and the output layer is untied whatever the config says; every
other ModelConfig field (sizes, GQA, SwiGLU, norm, biases, dropout, recompute, dtype) is
honoured. Because every split tensor lives in megalith's layers, tensor, sequence, pipeline and
data parallelism all apply, and `megalith verify` proves them equal to one process:

    python -m megalith verify --model examples.custom_model.tiny_lm:SPEC --layouts tp2.sp pp2 tp2.pp2.sp
    python -m megalith pretrain --model examples.custom_model.tiny_lm:SPEC --mock-data --train-iters 20

docs/custom_models.md explains each part.
"""

from __future__ import annotations

import torch
from torch import nn

from megalith.config import Layout, ModelConfig
from megalith.models.parallel_context import ParallelContext, StageSpec
from megalith.models.registry import ModelSpec
from megalith.models.transformer import MLP, SelfAttention, TransformerBlock, build_norm, dropout, rotary_cos_sin
from megalith.parallel import comm
from megalith.parallel.cross_entropy import vocab_parallel_cross_entropy
from megalith.parallel.layers import (
    ColumnParallelLinear,
    VocabParallelEmbedding,
    normal_init,
    padded_vocab_size,
    scaled_normal_init,
    sequence_parallel_parameters,
)
from megalith.parallel.rng import model_parallel_rng_tracker

EMBEDDING_STREAM, OUTPUT_STREAM, FIRST_LAYER_STREAM = 0, 1, 2


def init_generator(seed: int, stream: int) -> torch.Generator:
    """One random stream per part (embedding, output, each layer), so a pipeline stage that
    builds only some parts draws exactly the weights one process would."""
    return torch.Generator().manual_seed(seed * 100_003 + stream)


class ParallelBlock(nn.Module):
    """x + dropout(attention(norm(x)) + mlp(norm(x))): `[s, b, h]` in and out (`[s/tp, b, h]` under SP)."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, generator: torch.Generator) -> None:
        super().__init__()
        self.config, self.ctx = config, ctx
        init = normal_init(config.init_method_std, generator)
        output_init = scaled_normal_init(config.init_method_std, config.num_layers, generator)
        self.input_layernorm = build_norm(config, ctx)  # replicated over tp: summed in finish_grad_sync under SP
        self.self_attention = SelfAttention(config, ctx, init, output_init)  # heads split over tp
        self.mlp = MLP(config, ctx, init, output_init)  # fc1 column-, fc2 row-parallel

    def forward(self, x: torch.Tensor, rotary=None, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.input_layernorm(x)
        out = self.self_attention(h, rotary, attention_mask) + self.mlp(h)
        return x + dropout(out, self.config.hidden_dropout, self.training, self.ctx, self.ctx.hidden_stream)


class TinyLM(nn.Module):
    """One pipeline stage (`stage`) of tiny_lm: the word embedding if it is the first, its layers,
    and the final norm, output layer and per-token loss if it is the last."""

    def __init__(self, config: ModelConfig, ctx: ParallelContext, init_seed: int, stage: StageSpec) -> None:
        super().__init__()
        Layout(tp=ctx.tp_size, sequence_parallel=ctx.sequence_parallel).check_model(config)
        if ctx.rng_tracker is None:  # built on its own, outside verify or pretrain
            ctx.rng_tracker = model_parallel_rng_tracker(init_seed, ctx.tp_rank, ctx.device or "cpu")
        self.config, self.ctx, self.stage = config, ctx, stage
        common = dict(tp_group=ctx.tp_group, sequence_parallel=ctx.sequence_parallel,
                      params_dtype=config.torch_dtype, device=ctx.device)
        self.word_embeddings = self.output_layer = None
        if stage.is_first:  # vocabulary split over tp; padding rows zero
            self.word_embeddings = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
                init_method=normal_init(config.init_method_std, init_generator(init_seed, EMBEDDING_STREAM)), **common)
        layers = {index: ParallelBlock(config, ctx, init_generator(init_seed, FIRST_LAYER_STREAM + index))
                  for index in stage.layers}
        self.decoder = TransformerBlock(config, ctx, layers, final_norm=stage.is_last)  # + full recompute
        if stage.is_last:
            draw = normal_init(config.init_method_std, init_generator(init_seed, OUTPUT_STREAM))
            padded = padded_vocab_size(config.vocab_size, ctx.tp_size, config.make_vocab_size_divisible_by)
            self.output_layer = ColumnParallelLinear(  # real rows drawn (padding zero), then each rank's slice kept
                config.hidden_size, padded, bias=False, init_method=lambda full: draw(full[: config.vocab_size]),
                **common)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """ids `[b, s]` (or the previous stage's `hidden`) -> hidden `[s, b, h]`, or on the last
        stage the per-token loss `[b, s]` (fp32), or without labels this rank's logits `[s, b, V/tp]`."""
        config = self.config
        h = self.word_embeddings(input_ids.t()) if self.stage.is_first else hidden  # [s, b, h]; SP: [s/tp, b, h]
        rotary = rotary_cos_sin(input_ids.shape[1], config.rotary_dim, config.rotary_base, input_ids.device,
                                position_ids)
        h = self.decoder(h, rotary, attention_mask)
        if not self.stage.is_last:
            return h
        logits = self.output_layer(h)  # gathers the sequence under SP: [s, b, padded V / tp]
        if labels is None:
            return logits
        return vocab_parallel_cross_entropy(logits, labels.t(), self.ctx.tp_group, vocab_size=config.vocab_size).t()

    # --- the pipeline engine's interface ------------------------------------------------

    @property
    def outputs_freeable(self) -> bool:
        """A stage's output is a fresh residual sum that autograd does not keep, so the engine may
        free it once sent; a stage without layers passes its input on, which must stay."""
        return bool(self.stage.layers) or self.stage.is_first

    def pipeline_forward(self, inputs: tuple[torch.Tensor, ...] | None, batch: dict):
        """The tensors received (None on the first stage) -> the tensors to send, or the loss `[b, s]`."""
        out = self(batch["input_ids"], batch.get("labels"), batch.get("attention_mask"),
                   hidden=inputs[0] if inputs else None, position_ids=batch.get("position_ids"))
        return out if self.stage.is_last else (out,)

    def pipeline_shapes(self, micro_batch_size: int) -> list[tuple[int, ...]]:
        """What travels between stages, known before any data flows: one `[s, b, h]` (SP: `[s/tp, b, h]`)."""
        seq = self.config.seq_length // (self.ctx.tp_size if self.ctx.sequence_parallel else 1)
        return [(seq, micro_batch_size, self.config.hidden_size)]

    def finish_grad_sync(self) -> None:
        """Under SP each tp rank saw only its tokens: sum the replicated norms' and row-parallel
        biases' gradients over tp. (No tied embedding, so nothing crosses the pipeline.)"""
        comm.all_reduce_grads(sequence_parallel_parameters(self), self.ctx.tp_group)


def copy_batch(config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict:
    """Random tokens, then the same tokens again; only the repeat counts in the loss, and only
    attention back to the first copy can predict it. Tokens come from the lower half of the
    vocabulary, so the loss falls at once (which tokens occur), then further as the model copies."""
    seq, period = config.seq_length, max(config.seq_length // 2, 1)
    first = torch.randint(0, max(config.vocab_size // 2, 1), (batch_size, period), generator=generator)
    stream = first.repeat(1, seq // period + 2)[:, : seq + 1]  # token j is token j mod period
    loss_mask = (torch.arange(seq) >= period).float().expand(batch_size, seq).contiguous()
    return {"input_ids": stream[:, :-1], "labels": stream[:, 1:], "loss_mask": loss_mask}


SPEC = ModelSpec(
    name="tiny_lm",
    description="decoder LM with GPT-J's parallel attention + MLP block, rotary positions, untied output",
    build=TinyLM,
    make_batch=copy_batch,
    defaults=dict(num_layers=4, hidden_size=64, num_attention_heads=8, group_query_attention=True,
                  num_query_groups=4, seq_length=32,
                  vocab_size=256, position_embedding_type="rope", normalization="RMSNorm", swiglu=True,
                  untie_embeddings_and_output_weights=True, hidden_dropout=0.0, attention_dropout=0.0),
)
