"""A checkpoint on disk: Megatron's directory convention, safetensors files, global coordinates.

    DIR/latest_checkpointed_iteration.txt          the newest complete checkpoint's iteration
    DIR/iter_0000100/metadata.json                  iteration, data position, config, layout,
                                                    LR scheduler, loss scaler, optimizer step
    DIR/iter_0000100/mp_rank_TT_PPP.safetensors     model and optimizer tensors of tensor-parallel
                                                    rank TT, pipeline rank PPP (its dp rank 0 writes)
    DIR/iter_0000100/expert_rank_TT_EEE_PPP.safetensors
                                                    the expert tensors of expert-tensor-parallel rank
                                                    TT, expert-parallel rank EEE, pipeline rank PPP
                                                    (its expert-data-parallel rank 0 writes)
    DIR/iter_0000100/rng/rank_RRRRR.safetensors     each rank's random-number states

Every stored tensor is a *piece* of a global tensor, the one a single process would hold:
the safetensors header records, per piece, the global name, the global shape (vocabulary
padding left out) and where the piece sits (a dimension and a start, or the whole tensor;
an expert piece also gives `starts`, its start in every dimension: expert parallelism splits
dim 0, the experts', and expert tensor parallelism another). A reader assembles any box of
any global tensor from the pieces that cover it, so a checkpoint written under one layout
loads under any other. Format 2 added expert pieces; format 1 checkpoints load unchanged.
Nothing here unpickles: tensors come from safetensors, everything else from JSON.

Pure: no process groups. megalith.training.checkpoint does the collective parts.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch

from megalith.errors import ConfigError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: before expert pieces (no `starts`, no ep in the layout)
TRACKER_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = "metadata.json"
RNG_DIR = "rng"
PIECES_KEY = "megalith_pieces"
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl")


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded: missing, incomplete, corrupt, unsafe or for another model."""


RANK_LAYOUT_KEYS = ("world_size", "tp", "pp", "dp", "ep", "etp")  # the keys that decide which rank holds what


def layout_record(layout) -> dict:
    """The `layout` entry of a checkpoint's metadata: a megalith.config.Layout in plain values."""
    return {"world_size": layout.world_size, "tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "vpp": layout.vpp,
            "ep": layout.ep, "etp": layout.expert_tp,
            "zero1": layout.distributed_optimizer, "zero": layout.zero, "params_dtype": layout.precision}


def saved_layout(meta: dict) -> dict:
    """A checkpoint's layout record, with what a format 1 record leaves out (ep 1, etp = tp)."""
    record = dict(meta.get("layout") or {})
    record.setdefault("ep", 1)
    record.setdefault("etp", record.get("tp"))
    return record


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def shard_file_name(tp_rank: int, pp_rank: int) -> str:
    return f"mp_rank_{tp_rank:02d}_{pp_rank:03d}.safetensors"


def expert_file_name(etp_rank: int, ep_rank: int, pp_rank: int) -> str:
    return f"expert_rank_{etp_rank:02d}_{ep_rank:03d}_{pp_rank:03d}.safetensors"


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
    """How a parameter is split over tensor parallelism (for an expert's: expert tensor
    parallelism, and dim 0 over expert parallelism), and how much of it is real."""

    dim: int | None  # the dimension split over tp (None: replicated)
    stride: int = 1  # equal parts along dim, each split over tp (SwiGLU's [gate; up])
    valid_rows: int | None = None  # rows of dim 0 that are real (the vocabulary); the rest is padding
    experts: bool = False  # dim 0 holds the experts, each ep rank its E / ep consecutive ones


@dataclass(frozen=True)
class Piece:
    """Local rows [local_start, local_start + length) along `dim` sit at global `global_start`;
    for an expert tensor, local dim 0 starts at global expert `expert_start` (else None)."""

    dim: int | None
    local_start: int
    global_start: int
    length: int
    expert_start: int | None = None


def _check_experts(placement: Placement) -> None:
    if placement.experts and placement.dim == 0:
        raise ValueError("an expert tensor's dim 0 is the experts' (split over ep); its tensor-parallel dim must "
                         "be another")


def global_shape(local_shape: tuple[int, ...], placement: Placement, tp_size: int, ep_size: int = 1) -> tuple[int, ...]:
    """The shape one process holds, without vocabulary padding (`tp_size`: etp for an expert tensor)."""
    _check_experts(placement)
    shape = list(local_shape)
    if placement.dim is not None:
        shape[placement.dim] *= tp_size
    if placement.experts:
        shape[0] *= ep_size
    if placement.valid_rows is not None:
        shape[0] = placement.valid_rows
    return tuple(shape)


def pieces(local_shape: tuple[int, ...], placement: Placement, tp_rank: int, tp_size: int, ep_rank: int = 0,
           ep_size: int = 1) -> list[Piece]:
    """The parts of a tp rank's shard and where each sits in the global tensor (padding left out);
    an expert tensor's (tp: etp) pieces also say where the ep rank's experts start."""
    _check_experts(placement)
    expert_start = ep_rank * local_shape[0] if placement.experts else None
    if placement.dim is None:
        return [Piece(None, 0, 0, local_shape[0] if local_shape else 1, expert_start)]
    dim, stride = placement.dim, placement.stride
    part = local_shape[dim] // stride
    out = []
    for j in range(stride):
        local_start, global_start, length = j * part, j * part * tp_size + tp_rank * part, part
        if placement.valid_rows is not None and dim == 0:
            length = max(0, min(length, placement.valid_rows - global_start))
        if length > 0:
            out.append(Piece(dim, local_start, global_start, length, expert_start))
    return out


def _global_starts(piece: Piece, rank: int) -> list[int]:
    """Where a piece of a `rank`-dimensional tensor starts in the global tensor, dim by dim."""
    starts = [0] * rank
    if piece.expert_start is not None:
        starts[0] = piece.expert_start
    if piece.dim is not None:
        starts[piece.dim] = piece.global_start
    return starts


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
            if piece.expert_start is not None:
                where[key]["starts"] = _global_starts(piece, len(shape))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    save_file(stored, path, metadata={PIECES_KEY: json.dumps(where), "format_version": str(FORMAT_VERSION)})


def read_local(reader: "CheckpointReader", name: str, local_shape: tuple[int, ...], placement: Placement,
               tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1) -> torch.Tensor:
    """A tp rank's shard of global tensor `name` under this layout (vocabulary padding zero); an
    expert tensor's shard of etp rank `tp_rank` and ep rank `ep_rank`."""
    if name not in reader:
        reader.read(name)  # the precise error
    expected = global_shape(local_shape, placement, tp_size, ep_size)
    if reader.shape(name) != expected:
        raise CheckpointError(f"{name} is {list(reader.shape(name))} in the checkpoint but {list(expected)} in this "
                              "model; load it into the model it was written for")
    parts = pieces(local_shape, placement, tp_rank, tp_size, ep_rank, ep_size)
    if placement.dim is None and not placement.experts:
        return reader.read(name)
    out = None
    for piece in parts:
        if piece.dim is None:  # replicated over etp: the ep rank's experts, whole
            out = reader.read_box(name, _global_starts(piece, len(local_shape)), list(local_shape))
            continue
        lengths = list(expected)
        lengths[piece.dim] = piece.length
        if piece.expert_start is not None:
            lengths[0] = local_shape[0]
        data = reader.read_box(name, _global_starts(piece, len(local_shape)), lengths)
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
    starts: tuple[int, ...]  # where the piece starts in the global tensor, dim by dim


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
        if self.metadata.get("format_version") not in READABLE_VERSIONS:
            raise CheckpointError(f"{meta_path}: checkpoint format {self.metadata.get('format_version')!r}, this "
                                  f"megalith reads formats {', '.join(map(str, READABLE_VERSIONS))}")
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
                starts = info.get("starts")
                if starts is None:  # split along one dim (or whole)
                    starts = [0] * len(info["shape"])
                    if info["dim"] is not None:
                        starts[info["dim"]] = info["start"]
                self._index.setdefault(info["name"], []).append(_Stored(path, key, tuple(starts)))
                self._shapes[info["name"]] = tuple(info["shape"])

    def names(self) -> list[str]:
        return sorted(self._index)

    def __contains__(self, name: str) -> bool:
        return name in self._index

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Global tensor `name`, or its rows [start, start + length) along `dim`, from the pieces."""
        shape = list(self._shape_of(name))
        if dim is None:
            return self.read_box(name, [0] * len(shape), shape)
        starts, lengths = [0] * len(shape), list(shape)
        starts[dim], lengths[dim] = start, shape[dim] - start if length is None else length
        return self.read_box(name, starts, lengths)

    def read_box(self, name: str, starts: list[int], lengths: list[int]) -> torch.Tensor:
        """The box [starts, starts + lengths) of global tensor `name`, from the pieces that cover it
        (a piece stored twice, as a replicated tensor is by every tp rank, is read once)."""
        self._shape_of(name)
        if math.prod(lengths) == 0 and starts:
            first = self._index[name][0]
            return torch.zeros(lengths, dtype=self._handles[first.path].get_slice(first.key)[:0].dtype)
        out, covered, seen = None, 0, set()
        for stored in self._index[name]:
            handle = self._handles[stored.path]
            if not starts:  # a scalar
                return handle.get_tensor(stored.key).clone()
            part = handle.get_slice(stored.key)
            extent = tuple(part.get_shape())
            if (stored.starts, extent) in seen:
                continue
            seen.add((stored.starts, extent))
            low = [max(a, s) for a, s in zip(starts, stored.starts)]
            high = [min(a + n, s + e) for a, n, s, e in zip(starts, lengths, stored.starts, extent)]
            if any(l >= h for l, h in zip(low, high)):
                continue
            data = part[tuple(slice(l - s, h - s) for l, h, s in zip(low, high, stored.starts))]
            if out is None:
                out = torch.zeros(lengths, dtype=data.dtype)
            out[tuple(slice(l - a, h - a) for l, h, a in zip(low, high, starts))] = data
            covered += data.numel()
        if out is None or covered != math.prod(lengths):
            raise CheckpointError(f"{self.directory}: the pieces of {name} cover {covered} of the "
                                  f"{math.prod(lengths)} elements asked for; the checkpoint is incomplete")
        return out

    def _shape_of(self, name: str) -> tuple[int, ...]:
        if name not in self._index:
            raise CheckpointError(f"{self.directory} has no tensor {name!r}; it was written for another model "
                                  "(check --load)")
        return self._shapes[name]


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
