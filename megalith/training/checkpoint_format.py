"""A checkpoint on disk: Megatron's directory convention, safetensors files, global coordinates.

    DIR/latest_checkpointed_iteration.txt          the newest complete checkpoint's iteration
    DIR/iter_0000100/metadata.json                  iteration, data position, config, layout,
                                                    LR scheduler, loss scaler, optimizer step
    DIR/iter_0000100/mp_rank_TT_PPP.safetensors     model and optimizer tensors of tensor-parallel
                                                    rank TT, pipeline rank PPP (its dp rank 0 writes)
    DIR/iter_0000100/rng/rank_RRRRR.safetensors     each rank's random-number states

Every stored tensor is a *piece* of a global tensor, the one a single process would hold:
the safetensors header records, per piece, the global name, the global shape (vocabulary
padding left out) and where the piece sits (a dimension and a start, or the whole tensor).
A reader assembles any slice of any global tensor from the pieces that cover it, so a
checkpoint written under one layout loads under any other. Nothing here unpickles: tensors
come from safetensors, everything else from JSON.

Pure: no process groups. megalith.training.checkpoint does the collective parts.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from megalith.errors import ConfigError

FORMAT_VERSION = 1
TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
RNG_DIR = "rng"
PIECES_KEY = "megalith_pieces"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded: missing, incomplete, corrupt, unsafe or for another model."""


RANK_LAYOUT_KEYS = ("world_size", "tp", "pp", "dp")  # the keys that decide which rank holds what


def layout_record(layout) -> dict:
    """The `layout` entry of a checkpoint's metadata: a megalith.config.Layout in plain values."""
    return {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vpp": layout.vpp,
            "zero1": layout.distributed_optimizer, "zero": layout.zero, "params_dtype": layout.precision}


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


def rng_file_name(rank: int) -> str:
    return os.path.join(RNG_DIR, f"rank_{rank:05d}.safetensors")


def read_tracker(root: str) -> int | None:
    """The iteration the tracker names, or None when DIR holds no checkpoint yet."""
    path = os.path.join(root, TRACKER_FILE)
    if not os.path.isfile(path):
        return None
    text = open(path, encoding="utf-8").read().strip()
    if text == "release":
        return 0
    if not text.isdigit():
        raise CheckpointError(f"{path} holds {text!r}, not an iteration number; fix or remove it")
    return int(text)


def write_tracker(root: str, iteration: int) -> None:
    """Point the tracker at `iteration`, by rename: a reader sees the old value or the new one."""
    path = os.path.join(root, TRACKER_FILE)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(f"{iteration}\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)


# --- where a rank's shard sits in the global tensor -----------------------------------------


@dataclass(frozen=True)
class Placement:
    """How a parameter is split over tensor parallelism, and how much of it is real."""

    dim: int | None  # the dimension split over tp (None: replicated)
    stride: int = 1  # equal parts along dim, each split over tp (SwiGLU's [gate; up])
    valid_rows: int | None = None  # rows of dim 0 that are real (the vocabulary); the rest is padding


@dataclass(frozen=True)
class Piece:
    """Local rows [local_start, local_start + length) along `dim` sit at global `global_start`."""

    dim: int | None
    local_start: int
    global_start: int
    length: int


def global_shape(local_shape: tuple[int, ...], placement: Placement, tp_size: int) -> tuple[int, ...]:
    """The shape one process holds, without vocabulary padding."""
    shape = list(local_shape)
    if placement.dim is not None:
        shape[placement.dim] *= tp_size
    if placement.valid_rows is not None:
        shape[0] = placement.valid_rows
    return tuple(shape)


def pieces(local_shape: tuple[int, ...], placement: Placement, tp_rank: int, tp_size: int) -> list[Piece]:
    """The parts of a tp rank's shard and where each sits in the global tensor (padding left out)."""
    if placement.dim is None:
        return [Piece(None, 0, 0, local_shape[0] if local_shape else 1)]
    dim, stride = placement.dim, placement.stride
    part = local_shape[dim] // stride
    out = []
    for j in range(stride):
        local_start, global_start, length = j * part, j * part * tp_size + tp_rank * part, part
        if placement.valid_rows is not None and dim == 0:
            length = max(0, min(length, placement.valid_rows - global_start))
        if length > 0:
            out.append(Piece(dim, local_start, global_start, length))
    return out


# --- writing ----------------------------------------------------------------------------------


def save_pieces(path: str, tensors: dict[str, tuple[torch.Tensor, tuple[int, ...], list[Piece]]]) -> None:
    """Write `{global name: (local tensor, global shape, its pieces)}` with their coordinates to `path`."""
    from safetensors.torch import save_file

    stored, where = {}, {}
    for name, (tensor, shape, parts) in tensors.items():
        for index, piece in enumerate(parts):
            key = f"{name}@{index}"
            part = tensor if piece.dim is None else tensor.narrow(piece.dim, piece.local_start, piece.length)
            stored[key] = part.detach().contiguous().cpu()
            where[key] = {"name": name, "shape": list(shape), "dim": piece.dim, "start": piece.global_start}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(stored, path, metadata={PIECES_KEY: json.dumps(where), "format_version": str(FORMAT_VERSION)})


def read_local(reader: "CheckpointReader", name: str, local_shape: tuple[int, ...], placement: Placement,
               tp_rank: int, tp_size: int) -> torch.Tensor:
    """A tp rank's shard of global tensor `name` under this layout (vocabulary padding zero)."""
    expected = global_shape(local_shape, placement, tp_size)
    if reader.shape(name) != expected:
        raise CheckpointError(f"{name} is {list(reader.shape(name))} in the checkpoint but {list(expected)} in this "
                              "model; load it into the model it was written for")
    parts = pieces(local_shape, placement, tp_rank, tp_size)
    if placement.dim is None:
        return reader.read(name)
    out = None
    for piece in parts:
        data = reader.read(name, piece.dim, piece.global_start, piece.length)
        if out is None:
            out = torch.zeros(local_shape, dtype=data.dtype)
        out.narrow(piece.dim, piece.local_start, piece.length).copy_(data)
    return out if out is not None else torch.zeros(local_shape)


def save_tensors(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """Plain named tensors (RNG states) with no global coordinates."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, path)


def load_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


# --- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stored:
    path: str
    key: str
    dim: int | None
    start: int


class CheckpointReader:
    """The global tensors of one checkpoint directory, assembled from its pieces on demand."""

    def __init__(self, directory: str) -> None:
        from safetensors import safe_open

        self.directory = directory
        meta_path = os.path.join(directory, METADATA_FILE)
        if not os.path.isfile(meta_path):
            unsafe = [f for f in sorted(os.listdir(directory)) if f.endswith(PICKLE_SUFFIXES)] \
                if os.path.isdir(directory) else []
            if unsafe or _has_pickles(directory):
                raise CheckpointError(f"{directory} holds pickled files ({', '.join(unsafe) or 'in sub-folders'}), "
                                      "which can run code when loaded; megalith loads only its safetensors "
                                      "checkpoints (convert the weights with megalith convert)")
            raise CheckpointError(f"{meta_path}: no such file; {directory} is not a complete megalith checkpoint")
        try:
            self.metadata = json.load(open(meta_path, encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{meta_path} is not valid JSON ({error.msg}); the checkpoint is corrupt") from None
        if self.metadata.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{meta_path}: checkpoint format {self.metadata.get('format_version')!r}, this "
                                  f"megalith reads format {FORMAT_VERSION}")
        self._index: dict[str, list[_Stored]] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._handles = {}
        for file_name in sorted(os.listdir(directory)):
            if not file_name.endswith(".safetensors"):
                continue
            path = os.path.join(directory, file_name)
            try:
                handle = safe_open(path, framework="pt")
                where = json.loads((handle.metadata() or {}).get(PIECES_KEY, "{}"))
            except Exception as error:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{path}: not a readable safetensors file ({error}); the checkpoint is "
                                      "corrupt") from None
            self._handles[path] = handle
            for key, info in where.items():
                self._index.setdefault(info["name"], []).append(_Stored(path, key, info["dim"], info["start"]))
                self._shapes[info["name"]] = tuple(info["shape"])

    def names(self) -> list[str]:
        return sorted(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Global tensor `name`, or its rows [start, start + length) along `dim`, from the pieces."""
        if name not in self._index:
            raise CheckpointError(f"{self.directory} has no tensor {name!r}; it was written for another model "
                                  "(check --load)")
        shape = list(self._shapes[name])
        if dim is None:  # the whole tensor: along the dimension its pieces are split on, if any
            split = next((s.dim for s in self._index[name] if s.dim is not None), 0)
            dim, start, length = split, 0, shape[split] if shape else 1
        length = shape[dim] - start if length is None else length
        out, covered = None, 0
        for stored in self._index[name]:
            tensor = self._handles[stored.path].get_tensor(stored.key)
            if out is None:
                out = torch.zeros(*shape[:dim], length, *shape[dim + 1:], dtype=tensor.dtype) if shape else \
                    torch.zeros((), dtype=tensor.dtype)
            if stored.dim is None:
                out = tensor.narrow(dim, start, length).clone() if shape else tensor.clone()
                covered = length
                break
            if stored.dim != dim:
                raise CheckpointError(f"{name} is split along dim {stored.dim} in the checkpoint, not {dim}")
            low, high = max(start, stored.start), min(start + length, stored.start + tensor.shape[dim])
            if low < high:
                out.narrow(dim, low - start, high - low).copy_(tensor.narrow(dim, low - stored.start, high - low))
                covered += high - low
        if covered != length:
            raise CheckpointError(f"{self.directory}: the pieces of {name} cover {covered} of the {length} rows "
                                  "asked for; the checkpoint is incomplete")
        return out


def _has_pickles(directory: str) -> bool:
    for _, _, files in os.walk(directory):
        if any(f.endswith(PICKLE_SUFFIXES) for f in files):
            return True
    return False


def describe(root: str) -> str:
    """`megalith checkpoint inspect`: the newest checkpoint under `root` (or a checkpoint directory):
    iteration, data position, layout, model config and every global tensor with its shape."""
    directory = root
    if not os.path.isfile(os.path.join(root, METADATA_FILE)):
        iteration = read_tracker(root)
        if iteration is None:
            raise CheckpointError(f"{root} holds no checkpoint ({TRACKER_FILE} and {METADATA_FILE} are both missing); "
                                  "give a --save directory or one of its iter_* folders")
        directory = os.path.join(root, iteration_dir_name(iteration))
    reader = CheckpointReader(directory)
    meta = reader.metadata
    layout = meta.get("layout") or {}
    lines = [f"checkpoint {directory}",
             f"iteration {meta.get('iteration')}, consumed samples {meta.get('consumed_samples')}, "
             f"source {meta.get('source')}",
             "layout " + ", ".join(f"{key} {value}" for key, value in layout.items()),
             f"optimizer {meta.get('optimizer')}; scheduler {meta.get('scheduler')}; loss scaler {meta.get('loss_scaler')}",
             f"model {meta.get('model')}: " + ", ".join(f"{k}={v}" for k, v in (meta.get("model_config") or {}).items())]
    names = reader.names()
    lines.append(f"{len(names)} tensors:")
    lines += [f"  {name:<72} {list(reader.shape(name))}" for name in names]
    return "\n".join(lines)
