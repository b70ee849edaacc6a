"""The Hugging Face families `megalith convert` knows, and how it picks one.

Importing picks by config.json's `model_type`; exporting by the megalith model the checkpoint
was written for, then the first of that model's families its config fits (GPT: GPT-2, Llama,
Mixtral, then Qwen2-MoE). To add a family, write a module that defines an `HFFamily` (see mapping) and add it
to FAMILIES below; command needs no change.
"""

from __future__ import annotations

from megalith.config import ModelConfig
from megalith.convert.bert import BERT
from megalith.convert.gpt import GPT2, LLAMA
from megalith.convert.mapping import ConvertError, HFFamily
from megalith.convert.moe import MIXTRAL, QWEN2_MOE
from megalith.convert.t5 import T5

FAMILIES: tuple[HFFamily, ...] = (GPT2, LLAMA, MIXTRAL, QWEN2_MOE, BERT, T5)


def _known(families=FAMILIES) -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in families)


def family_for_hf(hf: dict) -> HFFamily:
    """The family of an HF config.json dict, by its model_type."""
    model_type = hf.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ConvertError(f"model_type {model_type!r} is not supported; megalith converts {_known()}")


def family_for_model(model: str, config: ModelConfig) -> HFFamily:
    """The family that exports a megalith `model` with this config, or a one-line refusal naming,
    for each candidate, what it needs and what the config has instead."""
    candidates = [family for family in FAMILIES if family.model == model]
    if not candidates:
        models = sorted({family.model for family in FAMILIES})
        raise ConvertError(f"the checkpoint holds a {model!r} model; megalith converts {', '.join(models)} models")
    reasons = []
    for family in candidates:
        misfits = family.export_misfits(config)
        if not misfits:
            return family
        reasons.append(f"{family.name} needs {family.export_needs} (it has {', '.join(misfits)})")
    raise ConvertError(f"this model fits no Hugging Face architecture megalith exports: {'; '.join(reasons)}")
