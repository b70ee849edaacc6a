"""Hugging Face directories on disk, and atomic output directories, for `megalith convert`.

Reads config.json and the weights save_pretrained writes: model.safetensors, sharded safetensors
with their index, or pytorch_model.bin (one or sharded) through torch.load(weights_only=True), so
no pickled code ever runs. Outputs are written into a temporary sibling renamed into place only
once complete, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import tempfile

import torch

from megalith.convert.mapping import ConvertError

HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
HF_PICKLE, HF_PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yield a temporary sibling of `path`; rename it to `path` only if the block completes."""
    path = os.path.abspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ConvertError(f"{path} already exists and is not empty; choose a new --output or remove it")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    temporary = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        yield temporary
        if os.path.isdir(path):
            os.rmdir(path)  # empty: checked above
        os.rename(temporary, path)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file; point --input at a directory written by save_pretrained")
    try:
        return json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path} is not valid JSON ({error.msg}); fix or re-download it") from None


def _load_pickled(path: str) -> dict[str, torch.Tensor]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConvertError(f"{path} is not a plain tensor file ({first}); megalith loads weights only, never "
                           "pickled code: save the model with safe_serialization") from None


def _index_files(hf_dir: str, index_name: str) -> list[str]:
    path = os.path.join(hf_dir, index_name)
    try:
        weight_map = json.load(open(path, encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ConvertError(f"{path} has no weight_map; it is not a sharded-checkpoint index") from None
    files = [os.path.join(hf_dir, name) for name in sorted(set(weight_map.values()))]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ConvertError(f"{missing[0]}: no such file, though {index_name} names it; the download is incomplete")
    return files


def _weight_files(hf_dir: str) -> tuple[list[str], bool]:
    """The weight files of an HF directory, and whether they are safetensors (else weights-only pickles)."""
    def exists(name: str) -> bool:
        return os.path.isfile(os.path.join(hf_dir, name))

    if exists(HF_INDEX):
        return _index_files(hf_dir, HF_INDEX), True
    if exists(HF_WEIGHTS):
        return [os.path.join(hf_dir, HF_WEIGHTS)], True
    if exists(HF_PICKLE_INDEX):
        return _index_files(hf_dir, HF_PICKLE_INDEX), False
    if exists(HF_PICKLE):
        return [os.path.join(hf_dir, HF_PICKLE)], False
    raise ConvertError(f"{hf_dir} holds no {HF_WEIGHTS}, {HF_INDEX} or {HF_PICKLE}; point --input at a "
                       "directory written by save_pretrained")


def _read(path: str, safetensors: bool, names_only: bool):
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not safetensors:
            tensors = _load_pickled(path)
            return list(tensors) if names_only else tensors
        if names_only:
            with safe_open(path, "pt") as file:
                return list(file.keys())
        return load_file(path)
    except ConvertError:
        raise
    except Exception as error:  # safetensors raises its own types for a bad header
        raise ConvertError(f"{path}: not a readable weights file ({error}); re-download it") from None


def hf_weight_names(hf_dir: str) -> list[str]:
    """The tensor names of an HF directory, without reading safetensors data (pickles are loaded)."""
    files, safetensors = _weight_files(hf_dir)
    return [name for path in files for name in _read(path, safetensors, names_only=True)]


def load_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory: safetensors (one file or sharded), else pytorch_model.bin."""
    files, safetensors = _weight_files(hf_dir)
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(_read(path, safetensors, names_only=False))
    return tensors
