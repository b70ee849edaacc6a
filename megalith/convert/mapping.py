"""What every Hugging Face <-> megalith mapping shares: the family interface, the error type,
QKV fusing, and where megalith's standard layers put a parameter (tp split, pipeline stage).

A family (`HFFamily`) is one HF architecture and the megalith model it becomes. `megalith
convert` knows nothing model-specific: it asks the family for the config, the global tensors,
the checkpoint placement and the logit comparison. The entries live in gpt (GPT-2, Llama),
bert (BERT) and so on; families lists them.

megalith's side of every mapping is the *global* tensors of a whole model (what one process
would hold, no vocabulary padding), named as the model's parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Collection

import torch
from torch import nn

from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.models.gpt import PADDED_VOCAB_PARAMETERS
from megalith.training.checkpoint_format import Placement

Tensors = dict[str, torch.Tensor]
LogitPairs = list[tuple[torch.Tensor, torch.Tensor]]  # (megalith's, HF's), compared relative to HF's largest


class ConvertError(ConfigError):
    """A model or checkpoint that cannot be converted, with what does not fit."""


@dataclass(frozen=True)
class HFFamily:
    """One Hugging Face architecture family <-> one megalith model (`--model NAME`).

    Import: `config_from_hf(config.json dict, HF tensor names)` -> the ModelConfig (dropout 0,
    conversion is for exact weights; the names let a family see which heads the weights have),
    then `hf_to_global(HF state dict, config)` -> global tensors, refusing any HF tensor left
    unused. `parameter_names(config)` lists the whole model's parameters (one copy of each tied
    table: the one checkpoints keep), `placement(name, config)` their tp split and
    `stage_of(name, config, layer_stages, last_stage)` the global pipeline stage holding each
    (`layer_stages`: global layer index -> stage), so shards are cut without building a model.

    Export: `export_misfits(config)` names what keeps a megalith config from being this family
    (empty: it fits; `export_needs` says what the family needs, for the refusal), then
    `global_to_hf(global tensors, config)` -> the HF state dict save_pretrained would write and
    `hf_config(config, dtype)` -> config.json, whose `architectures[0]` is the transformers class
    that `--check` loads.

    Check: `compare(hf_model, megalith_model, config, generator)` runs both whole models (fp32,
    eval) on one random batch and returns (megalith's, HF's) logit pairs on the real positions.
    """

    name: str  # for people: "GPT-2"
    model_types: tuple[str, ...]  # config.json model_type values read
    model: str  # the megalith model name written to the checkpoint's metadata
    config_from_hf: Callable[[dict, Collection[str]], ModelConfig]
    hf_to_global: Callable[[Tensors, ModelConfig], Tensors]
    parameter_names: Callable[[ModelConfig], list[str]]
    placement: Callable[[str, ModelConfig], Placement]
    stage_of: Callable[[str, ModelConfig, dict[int, int], int], int]
    export_needs: str
    export_misfits: Callable[[ModelConfig], list[str]]
    global_to_hf: Callable[[Tensors, ModelConfig], Tensors]
    hf_config: Callable[[ModelConfig, torch.dtype], dict]
    compare: Callable[[nn.Module, nn.Module, ModelConfig, torch.Generator], LogitPairs]


def refuse(family: str, what: str) -> None:
    raise ConvertError(f"{family} config: {what} is not supported by megalith; convert a model without it")


# --- where megalith's layers put a parameter ----------------------------------------------------


def placement(name: str, config: ModelConfig) -> Placement:
    """How megalith's standard layers split parameter `name` over tp (tensor_parallel_dim/stride)."""
    if name.endswith(PADDED_VOCAB_PARAMETERS):
        return Placement(0, 1, config.vocab_size)
    if ".linear_qkv." in name:
        return Placement(0)
    if name.endswith((".experts.weight1", ".experts.bias1")):  # [E, parts x F, ...]: F split over tp (etp = tp)
        return Placement(1, 2 if config.swiglu else 1)
    if name.endswith(".experts.weight2"):  # [E, h, F]
        return Placement(2)
    if ".linear_fc1." in name:
        return Placement(0, 2 if config.swiglu else 1)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return Placement(1)
    return Placement(None)  # norms, row-parallel biases, positions, token types, BERT's heads, routers, gates


LAYER = re.compile(r"(?:decoder|encoder)\.layers\.(\d+)\.")


def stage_of(name: str, config: ModelConfig, layer_stages: dict[int, int], last_stage: int) -> int:
    """The global pipeline stage of a one-stack model's parameter (GPT, BERT): the embedding on the
    first, each layer where the split puts it, everything else (final norm, heads) on the last."""
    if name.startswith("embedding."):
        return 0
    match = LAYER.match(name)
    return layer_stages[int(match.group(1))] if match else last_stage


# --- norms ------------------------------------------------------------------------------------


def plain_norm_weights(tensors: Tensors, config: ModelConfig) -> Tensors:
    """Global tensors with every norm's gamma as Hugging Face stores it: megalith keeps
    (gamma - 1) under --apply-layernorm-1p, so 1 is added back (exact); unchanged otherwise."""
    if not config.apply_layernorm_1p:
        return tensors
    return {name: tensor + 1 if NORM_WEIGHT.search(name) else tensor for name, tensor in tensors.items()}


NORM_WEIGHT = re.compile(r"layernorm\.weight$")  # every megalith norm is named *layernorm


# --- fused attention --------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    """[all q; all k; all v] rows -> Megatron's grouped rows (per group: its q heads, k head, v head)."""
    q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in (q, k, v))
    return torch.cat([q, k, v], dim=1).reshape(-1, *q.shape[2:])


def split_qkv(qkv: torch.Tensor, config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped rows -> q `[heads*d, ...]`, k and v `[groups*d, ...]`."""
    groups, d = config.num_query_groups, config.kv_channels
    per_group = config.num_attention_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * d, *qkv.shape[1:])
    q, k, v = grouped.split([per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *qkv.shape[1:]).contiguous() for t in (q, k, v))


# --- taking HF tensors, each once ----------------------------------------------------------------


class TensorTaker:
    """Hands out an HF state dict's tensors as fp32 and remembers which were used, so a family can
    refuse weights that have no place in megalith's model rather than drop them silently."""

    def __init__(self, tensors: Tensors, family: str) -> None:
        self.tensors, self.family, self.used = tensors, family, set()

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ConvertError(f"the HF checkpoint has no tensor {key!r}, which its config.json needs; "
                               "the weights do not belong to this config")
        self.used.add(key)
        return self.tensors[key].float()

    def tied(self, key: str, expected: torch.Tensor, hint: str) -> None:
        """A tensor HF may store twice (a tied head): if present, it must equal the one kept."""
        if key in self.tensors:
            if not torch.equal(self.tensors[key].float(), expected):
                raise ConvertError(f"{key} differs from the tensor it is tied to; {hint}")
            self.used.add(key)

    def check_all_used(self, hint: str) -> None:
        unused = sorted(set(self.tensors) - self.used)
        if unused:
            raise ConvertError(f"the HF checkpoint has tensors megalith's {self.family} has no place for "
                               f"({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''}); {hint}")


def random_padding_mask(batch_size: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, length] True at real tokens: each sequence padded after a random length of at least
    half, the first one not padded, so a comparison covers both cases."""
    real_lengths = torch.randint(length // 2 + 1, length + 1, (batch_size,), generator=generator)
    real = torch.arange(length)[None, :] < real_lengths[:, None]
    real[0] = True
    return real


def relative_difference(pairs: LogitPairs) -> float:
    """Largest over the pairs of max|ours - theirs| / max|theirs| (fp32)."""
    return max(((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()
               for ours, theirs in pairs)
