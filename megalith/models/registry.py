"""Models by name: how to build one, and what a batch for it looks like.

`megalith verify --model NAME` and `megalith pretrain --model NAME` look models up
here. `build(config, ctx, init_seed, stage)` gives one pipeline stage (StageSpec) of the model:
a module with the pipeline engine's interface (`pipeline_forward`, `pipeline_shapes`,
`outputs_freeable`) whose last stage returns the per-token loss `[b, s]`, and
`finish_grad_sync()` for what sequence parallelism and tied embeddings leave to be summed.

A NAME is a built-in model (`gpt`, `bert`, `t5`), a `module.path:ATTRIBUTE` naming a ModelSpec that Python
can import, or the name of an entry point in the group `megalith.models` that an installed
package declares. Nothing is registered at run time, so there is no table to mutate: every
process (a forked rank, a torchrun rank) resolves the same name to the same spec on its own,
because imports are deterministic. docs/custom_models.md walks through defining one.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Callable

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.bert import BertModel
from megalith.models.gpt import GPTModel
from megalith.models.t5 import T5Model, resolve_t5_config
from megalith.models.parallel_context import ParallelContext, StageSpec

BuildModel = Callable[[ModelConfig, ParallelContext, int, StageSpec], nn.Module]
MakeBatch = Callable[[ModelConfig, int, torch.Generator], dict]
ENTRY_POINT_GROUP = "megalith.models"  # installed packages declare their models here (name = "module:attr")


@dataclass(frozen=True)
class ModelSpec:
    """A model as the training loop and verify see it: `build` one pipeline stage, `make_batch`
    a seeded global batch (tensors with the batch first; `loss_mask [b, s]` is required), and
    `defaults` for the model flags not given; `resolve` derives model-specific fields (T5: its
    encoder and decoder layers, whose sum becomes num_layers, the layers the pipeline splits)."""

    name: str
    description: str
    build: BuildModel
    make_batch: MakeBatch
    defaults: dict = field(default_factory=dict)  # ModelConfig fields for small CPU runs
    resolve: Callable[[ModelConfig], ModelConfig] | None = None  # fills what only this model derives (T5)
    dataset: str = "gpt"  # the --data-path samples it trains on: "gpt", "bert" or "t5"
    interleaved_pipeline: bool = True  # whether its stages may be interleaved (vpp > 1)

    def resolved(self, config: ModelConfig) -> ModelConfig:
        """`config` with what this model derives filled in (idempotent; most models change nothing)."""
        return self.resolve(config) if self.resolve is not None else config

    def check_virtual_pipeline(self, vpp: int) -> None:
        if vpp > 1 and not self.interleaved_pipeline:
            raise ConfigError(f"model {self.name!r} does not support interleaved pipelines (vpp {vpp}); "
                              "drop --num-layers-per-virtual-pipeline-stage (or the vpp token)")


def gpt_batch(config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict:
    """A learnable token stream (next = 3 * token + 1 mod V, with 10% noise) and a loss mask
    that drops about 10% of the tokens, so masking is exercised and the loss can fall."""
    vocab, seq = config.vocab_size, config.seq_length
    tokens = [torch.randint(0, vocab, (batch_size,), generator=generator)]
    for _ in range(seq):
        follow = (tokens[-1] * 3 + 1) % vocab
        noise = torch.randint(0, vocab, (batch_size,), generator=generator)
        keep = torch.rand(batch_size, generator=generator) >= 0.1
        tokens.append(torch.where(keep, follow, noise))
    stream = torch.stack(tokens, dim=1)  # [b, s + 1]
    loss_mask = (torch.rand(batch_size, seq, generator=generator) >= 0.1).float()
    return {"input_ids": stream[:, :-1], "labels": stream[:, 1:], "loss_mask": loss_mask}


BERT_PAD, BERT_CLS, BERT_SEP, BERT_MASK = 0, 1, 2, 3  # mock BERT's special ids; words are 4 .. V-1


def bert_batch(config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict:
    """BertDataset items, batched: `[CLS] A [SEP] B [SEP]` and padding, where A + B is a learnable
    stream (next = 3 * word + 1 over the words) of random length, split at a random point and,
    when `is_random`, swapped (sentence order); 15% of the words (at least one) become [MASK]."""
    words, seq = config.vocab_size - 4, config.seq_length
    if words < 4 or seq < 8:
        raise ConfigError(f"mock BERT batches need --vocab-size >= 8 and --seq-length >= 8, got "
                          f"{config.vocab_size} and {seq}")
    binary = not config.bert_no_binary_head
    keys = ("input_ids", "token_type_ids", "labels", "loss_mask", "padding_mask", "is_random")
    items = {key: [] for key in keys}
    for _ in range(batch_size):
        n = int(torch.randint(seq // 2, seq + 1, (), generator=generator))  # real tokens
        length = n - 3 if binary else n - 2
        stream = [int(torch.randint(0, words, (), generator=generator))]
        while len(stream) < length:
            stream.append((3 * stream[-1] + 1) % words)
        stream = torch.tensor(stream) + 4
        swapped = binary and bool(torch.rand((), generator=generator) < 0.5)
        if binary:
            pivot = int(torch.randint(1, length, (), generator=generator))
            a, b = (stream[pivot:], stream[:pivot]) if swapped else (stream[:pivot], stream[pivot:])
            tokens = torch.cat([torch.tensor([BERT_CLS]), a, torch.tensor([BERT_SEP]), b, torch.tensor([BERT_SEP])])
            types = torch.cat([torch.zeros(len(a) + 2, dtype=torch.long), torch.ones(len(b) + 1, dtype=torch.long)])
        else:
            tokens = torch.cat([torch.tensor([BERT_CLS]), stream, torch.tensor([BERT_SEP])])
            types = torch.zeros(n, dtype=torch.long)
        candidates = ((tokens != BERT_CLS) & (tokens != BERT_SEP)).nonzero().flatten()
        count = max(1, round(0.15 * len(candidates)))
        positions = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        padded = lambda values, fill: torch.cat([values, torch.full((seq - n,), fill, dtype=values.dtype)])
        labels = torch.full((n,), -1, dtype=torch.long)
        labels[positions] = tokens[positions]
        masked = tokens.clone()
        masked[positions] = BERT_MASK
        items["input_ids"].append(padded(masked, BERT_PAD))
        items["token_type_ids"].append(padded(types, 0))
        items["labels"].append(padded(labels, -1))
        items["loss_mask"].append(padded((labels >= 0).float(), 0.0))
        items["padding_mask"].append(padded(torch.ones(n, dtype=torch.bool), False))
        items["is_random"].append(torch.tensor(int(swapped)))
    return {key: torch.stack(values) for key, values in items.items()}


T5_PAD, T5_BOS, T5_EOS, T5_SENTINELS = 0, 1, 2, 8  # mock T5's special ids: sentinels 3..10, words 11 .. V-1


def t5_batch(config: ModelConfig, batch_size: int, generator: torch.Generator) -> dict:
    """T5Dataset items, batched: a learnable stream (next = 3 * word + 1 over the words) of random
    length in which one to three spans become sentinels; the decoder reads [bos] + target and
    predicts target + [eos], where the target is each sentinel followed by its span."""
    first_word, se, sd = 3 + T5_SENTINELS, config.seq_length, config.decoder_seq_length or config.seq_length
    words = config.vocab_size - first_word
    if words < 4 or se < 8 or sd < 6:
        raise ConfigError(f"mock T5 batches need --vocab-size >= {first_word + 4}, --seq-length >= 8 and "
                          f"--decoder-seq-length >= 6, got {config.vocab_size}, {se} and {sd}")
    keys = ("encoder_input_ids", "decoder_input_ids", "labels", "loss_mask", "encoder_padding_mask",
            "decoder_padding_mask")
    items = {key: [] for key in keys}
    for _ in range(batch_size):
        n = int(torch.randint(se // 2, se + 1, (), generator=generator))
        stream = [int(torch.randint(0, words, (), generator=generator))]
        while len(stream) < n:
            stream.append((3 * stream[-1] + 1) % words)
        stream = torch.tensor(stream) + first_word
        spans = int(torch.randint(1, min(3, (sd - 1) // 3) + 1, (), generator=generator))
        starts = sorted(torch.randperm(n // 2, generator=generator)[:spans].mul(2).tolist())
        encoder, target, previous = [], [], 0
        for k, start in enumerate(starts):
            length = min(2, n - start) if k + 1 == len(starts) else min(2, starts[k + 1] - start)
            encoder += stream[previous:start].tolist() + [3 + k]
            target += [3 + k] + stream[start:start + length].tolist()
            previous = start + length
        encoder += stream[previous:].tolist()
        target = target[:sd - 1]
        pad = lambda values, fill, size: torch.tensor(values + [fill] * (size - len(values)))
        items["encoder_input_ids"].append(pad(encoder, T5_PAD, se))
        items["decoder_input_ids"].append(pad([T5_BOS] + target, T5_PAD, sd))
        items["labels"].append(pad(target + [T5_EOS], -1, sd))
        items["loss_mask"].append(pad([1.0] * (len(target) + 1), 0.0, sd))
        items["encoder_padding_mask"].append(pad([True] * len(encoder), False, se))
        items["decoder_padding_mask"].append(pad([True] * (len(target) + 1), False, sd))
    return {key: torch.stack(values) for key, values in items.items()}


def _build_gpt(config: ModelConfig, ctx: ParallelContext, init_seed: int, stage: StageSpec) -> nn.Module:
    return GPTModel(config, ctx, init_seed, stage)


BUILTIN_MODELS = MappingProxyType({
    "gpt": ModelSpec(
        name="gpt",
        description="decoder-only GPT (learned or rotary positions, GQA, GELU or SwiGLU, LayerNorm or RMSNorm)",
        build=_build_gpt,
        make_batch=gpt_batch,
        defaults=dict(num_layers=8, hidden_size=64, num_attention_heads=8, seq_length=32, vocab_size=300,
                      hidden_dropout=0.0, attention_dropout=0.0),
    ),
    "bert": ModelSpec(
        name="bert",
        description="BERT (bidirectional encoder): masked LM with tied output + sentence-order binary head",
        build=BertModel,
        make_batch=bert_batch,
        defaults=dict(num_layers=4, hidden_size=64, num_attention_heads=8, seq_length=32, vocab_size=300,
                      num_tokentypes=2, hidden_dropout=0.0, attention_dropout=0.0),
        dataset="bert",
    ),
    "t5": ModelSpec(
        name="t5",
        description="T5 (encoder-decoder): relative position buckets, cross-attention, span-corruption targets",
        build=T5Model,
        make_batch=t5_batch,
        defaults=dict(num_layers=2, hidden_size=64, num_attention_heads=8, seq_length=32, decoder_seq_length=16,
                      vocab_size=300, normalization="RMSNorm", norm_epsilon=1e-6, disable_bias_linear=True,
                      activation="relu", position_embedding_type="relative", hidden_dropout=0.0,
                      attention_dropout=0.0),
        resolve=resolve_t5_config,
        dataset="t5",
        interleaved_pipeline=False,
    ),
})


def get_model_spec(name: str) -> ModelSpec:
    """The spec a --model NAME stands for: built-in, then `module.path:ATTRIBUTE`, then an entry point."""
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]
    if ":" in name:
        return _spec_from_path(name, name)
    points = [point for point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if point.name == name]
    if not points:
        raise ConfigError(
            f"unknown model {name!r}; known models: {', '.join(BUILTIN_MODELS)}; for your own model give "
            f"'module.path:ATTRIBUTE' (a ModelSpec Python can import) or install a package that declares it as an "
            f"entry point in the group {ENTRY_POINT_GROUP!r}"
        )
    values = sorted({f"{point.module}:{point.attr}" for point in points})
    if len(values) > 1:
        raise ConfigError(f"model {name!r} is declared by {len(values)} entry points in the group "
                          f"{ENTRY_POINT_GROUP!r} ({', '.join(values)}); uninstall one or give 'module.path:ATTRIBUTE'")
    return _spec_from_path(values[0], f"{name!r} (entry point {values[0]!r})")


def _spec_from_path(path: str, what: str) -> ModelSpec:
    """Import `module.path` and follow `ATTRIBUTE` (dots allowed, as in entry points) to a ModelSpec."""
    module_name, _, attribute = path.partition(":")
    if not module_name or not attribute or ":" in attribute:
        raise ConfigError(f"model {what} is not of the form 'module.path:ATTRIBUTE'; "
                          "e.g. --model examples.custom_model.tiny_lm:SPEC")
    try:
        target = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name and (module_name + ".").startswith(error.name + "."):  # the module itself (or a parent)
            raise ConfigError(f"model {what}: no module named {error.name!r} on the Python path; install its package "
                              "or add the directory that holds it to PYTHONPATH (python -m megalith also searches the "
                              "current directory)") from None
        raise ConfigError(f"model {what}: importing {module_name!r} failed: {_one_line(error)}; install what it "
                          "needs") from None
    except Exception as error:  # the module's own code raised: say so in one line, not a traceback
        raise ConfigError(f"model {what}: importing {module_name!r} raised {type(error).__name__}: "
                          f"{_one_line(error)}; fix the module") from None
    module = target
    for part in attribute.split("."):
        if not hasattr(target, part):
            specs = [n for n, v in vars(module).items() if isinstance(v, ModelSpec)]
            hint = f"it defines the ModelSpecs {', '.join(specs)}" if specs else "it defines no ModelSpec"
            raise ConfigError(f"model {what}: {module_name!r} has no attribute {attribute!r} ({hint}); "
                              "name the ModelSpec after the colon")
        target = getattr(target, part)
    if not isinstance(target, ModelSpec):
        raise ConfigError(f"model {what}: {module_name}:{attribute} is a {type(target).__name__}, not a "
                          "megalith.models.registry.ModelSpec; name a ModelSpec(name=..., build=..., make_batch=...)")
    return target


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
