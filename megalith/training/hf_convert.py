"""`megalith convert`: Hugging Face GPT-2 / Llama directories <-> megalith checkpoints.

Import writes a megalith checkpoint (iteration 0, no optimizer) for any tp x pp (x vpp)
layout, computing each rank's shard purely, the way megalith's layers slice the global tensor,
so no processes start. Export reads any megalith checkpoint, whatever layout wrote it, as global
tensors and writes config.json + model.safetensors that transformers' from_pretrained loads.
Both write into a temporary directory renamed into place once complete, and neither unpickles
code (pytorch_model.bin only through torch.load(weights_only=True)). `--check` runs the HF model
and megalith's GPTModel on one random batch and compares their logits.

The tensor and config mapping lives in megalith.training.hf_mapping.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, replace

import torch

from megalith.config import ModelConfig, ParallelConfig
from megalith.parallel.layers import padded_vocab_size
from megalith.parallel.pipeline.split import split_layers
from megalith.training.checkpoint_format import (
    FORMAT_VERSION, METADATA_FILE, CheckpointError, CheckpointReader, Placement, global_shape, iteration_dir_name,
    pieces, read_local, read_tracker, save_pieces, shard_file_name, write_tracker,
)
from megalith.training.hf_mapping import (
    ConvertError, global_to_hf, hf_config_from_model, hf_to_global, megalith_parameter_names, model_config_from_hf,
    placement, stage_of,
)

CHECK_TOLERANCE = 1e-5  # fp32: largest |a - b| over largest |b|
HF_CONFIG, HF_WEIGHTS, HF_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
HF_PICKLE, HF_PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


# --- output directories -----------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_directory(path: str):
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


# --- Hugging Face directories -----------------------------------------------------------------


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, HF_CONFIG)
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such file; point --input at a directory written by save_pretrained")
    try:
        return json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConvertError(f"{path} is not valid JSON ({error.msg}); fix or re-download it") from None


def _load_pickled(path: str) -> dict[str, torch.Tensor]:
    import pickle

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


def load_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory: safetensors (one file or sharded), else pytorch_model.bin."""
    from safetensors.torch import load_file

    def exists(name: str) -> bool:
        return os.path.isfile(os.path.join(hf_dir, name))

    if exists(HF_INDEX):
        files, loader = _index_files(hf_dir, HF_INDEX), load_file
    elif exists(HF_WEIGHTS):
        files, loader = [os.path.join(hf_dir, HF_WEIGHTS)], load_file
    elif exists(HF_PICKLE_INDEX):
        files, loader = _index_files(hf_dir, HF_PICKLE_INDEX), _load_pickled
    elif exists(HF_PICKLE):
        files, loader = [os.path.join(hf_dir, HF_PICKLE)], _load_pickled
    else:
        raise ConvertError(f"{hf_dir} holds no {HF_WEIGHTS}, {HF_INDEX} or {HF_PICKLE}; point --input at a "
                           "directory written by save_pretrained")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(loader(path))
        except ConvertError:
            raise
        except Exception as error:  # safetensors raises its own types for a bad header
            raise ConvertError(f"{path}: not a readable weights file ({error}); re-download it") from None
    return tensors


# --- HF -> megalith -----------------------------------------------------------------------------


def shard(full: torch.Tensor, where: Placement, tp_rank: int, tp_size: int, config: ModelConfig) -> torch.Tensor:
    """tp rank's shard of a global tensor, as megalith's layers slice it (vocabulary padded first)."""
    if where.dim is None:
        return full
    if where.valid_rows is not None:
        rows = padded_vocab_size(where.valid_rows, tp_size, config.make_vocab_size_divisible_by)
        full = torch.cat([full, full.new_zeros(rows - full.shape[0], *full.shape[1:])])
    parts = full.unflatten(where.dim, (where.stride, -1))
    return parts.chunk(tp_size, dim=where.dim + 1)[tp_rank].flatten(where.dim, where.dim + 1).contiguous()


def metadata(config: ModelConfig, tp: int, pp: int, vpp: int, model_type: str) -> dict:
    """metadata.json of a converted checkpoint: iteration 0, weights only."""
    return {
        "format_version": FORMAT_VERSION, "iteration": 0, "consumed_samples": 0, "valid_batches": 0, "model": "gpt",
        "model_config": asdict(config),
        "layout": {"world_size": tp * pp, "tp": tp, "pp": pp, "vpp": vpp, "dp": 1, "zero1": False,
                   "params_dtype": "fp32"},
        "has_optimizer": False, "optimizer": None, "scheduler": None, "loss_scaler": None, "config": None,
        "source": f"hf:{model_type}",
    }


def _virtual_stages(config: ModelConfig, pp: int, vpp_layers: int | None) -> int:
    if vpp_layers is None:
        return 1
    if vpp_layers < 1 or config.num_layers % (pp * vpp_layers) != 0:
        raise ConvertError(f"--num-layers-per-virtual-pipeline-stage {vpp_layers} does not divide the "
                           f"{config.num_layers} layers over {pp} pipeline stages; choose one that does")
    return config.num_layers // (pp * vpp_layers)


def write_checkpoint(tensors: dict[str, torch.Tensor], config: ModelConfig, root: str, tp: int, pp: int,
                     vpp: int = 1, model_type: str = "gpt") -> None:
    """A megalith checkpoint (iteration 0) of global `tensors` in layout tp x pp x vpp, at `root`."""
    config.check_parallel(ParallelConfig(tp))
    stages = split_layers(config.num_layers, pp, vpp)
    layer_stages = {layer: stage for stage, layers in enumerate(stages) for layer in layers}
    owner = {name: stage_of(name, layer_stages, len(stages) - 1) % pp for name in tensors}
    with _atomic_directory(root) as temporary:
        directory = os.path.join(temporary, iteration_dir_name(0))
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                local = {}
                for name, full in tensors.items():
                    if owner[name] != pp_rank:
                        continue
                    where = placement(name, config)
                    part = shard(full, where, tp_rank, tp, config)
                    shape = tuple(part.shape)
                    local[f"model/{name}"] = (part, global_shape(shape, where, tp), pieces(shape, where, tp_rank, tp))
                save_pieces(os.path.join(directory, shard_file_name(tp_rank, pp_rank)), local)
        with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as out:
            json.dump(metadata(config, tp, pp, vpp, model_type), out, indent=2)
        write_tracker(temporary, 0)


def hf_to_megalith(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, vpp_layers: int | None = None) -> ModelConfig:
    """Convert an HF GPT-2 or Llama directory into a megalith checkpoint of layout tp x pp (x vpp)."""
    hf = read_hf_config(hf_dir)
    config = model_config_from_hf(hf)
    vpp = _virtual_stages(config, pp, vpp_layers)
    config.check_parallel(ParallelConfig(tp))
    split_layers(config.num_layers, pp, vpp)  # a bad split fails before any tensor is read
    tensors = hf_to_global(load_hf_weights(hf_dir), config, hf["model_type"])
    write_checkpoint(tensors, config, out_dir, tp, pp, vpp, hf["model_type"])
    return config


# --- megalith -> HF -----------------------------------------------------------------------------


def open_checkpoint(ckpt_dir: str) -> tuple[CheckpointReader, ModelConfig]:
    """The reader of the iteration the tracker names (or of `ckpt_dir` itself, an iter_ folder)."""
    directory = ckpt_dir
    if not os.path.isfile(os.path.join(ckpt_dir, METADATA_FILE)):
        iteration = read_tracker(ckpt_dir) if os.path.isdir(ckpt_dir) else None
        if iteration is None:
            raise CheckpointError(f"{ckpt_dir} holds no latest_checkpointed_iteration.txt; point --input at a "
                                  "megalith checkpoint directory")
        directory = os.path.join(ckpt_dir, iteration_dir_name(iteration))
    reader = CheckpointReader(directory)
    if reader.metadata.get("model") != "gpt":
        raise ConvertError(f"{directory} holds a {reader.metadata.get('model')!r} model; megalith converts GPT only")
    stored = dict(reader.metadata.get("model_config") or {})
    unknown = sorted(set(stored) - set(ModelConfig.field_names()))
    if unknown or not stored:
        raise ConvertError(f"{directory}: metadata.json's model_config is missing or has fields this megalith does "
                           f"not know ({', '.join(unknown)}); convert with the megalith that wrote it")
    return reader, ModelConfig(**stored)


def read_global_tensors(reader: CheckpointReader, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Every parameter's global tensor, assembled from the pieces of whatever layout wrote them."""
    names = megalith_parameter_names(config)
    return {name: reader.read(f"model/{name}") for name in names}


def megalith_to_hf(ckpt_dir: str, out_dir: str) -> ModelConfig:
    """Write the checkpoint's model as an HF directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    reader, config = open_checkpoint(ckpt_dir)
    tensors = global_to_hf(read_global_tensors(reader, config), config)
    dtype = next(iter(tensors.values())).dtype
    hf = hf_config_from_model(config, dtype)
    with _atomic_directory(out_dir) as temporary:
        save_file(tensors, os.path.join(temporary, HF_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(temporary, HF_CONFIG), "w", encoding="utf-8") as out:
            json.dump(hf, out, indent=2)
    return config


# --- --check ----------------------------------------------------------------------------------


def megalith_model(ckpt_dir: str):
    """A whole GPTModel (one process, tp=1, fp32, no dropout) holding the checkpoint's weights."""
    from megalith.models.gpt import GPTModel

    reader, config = open_checkpoint(ckpt_dir)
    config = replace(config, hidden_dropout=0.0, attention_dropout=0.0, params_dtype="fp32",
                     recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    model = GPTModel(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(read_local(reader, f"model/{name}", tuple(param.shape), placement(name, config), 0, 1))
    return model.eval(), config


def check_logits(hf_dir: str, ckpt_dir: str, batch_size: int = 2, seq_length: int | None = None,
                 seed: int = 0) -> float:
    """Largest relative logit difference (max|a - b| / max|b|) of megalith's model against HF's."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise ConvertError("--check needs transformers; pip install transformers (or drop --check)") from None
    model, config = megalith_model(ckpt_dir)
    reference = AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    length = seq_length or min(config.seq_length, 64)
    ids = torch.randint(config.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits.float()
        actual = model(ids).transpose(0, 1)[..., : config.vocab_size].float()
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# --- command line -----------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=("hf",), help="convert a Hugging Face directory into a "
                           "megalith checkpoint")
    direction.add_argument("--to", dest="target", choices=("hf",), help="convert a megalith checkpoint into a "
                           "Hugging Face directory")
    parser.add_argument("--input", required=True, metavar="DIR", help="the directory to convert")
    parser.add_argument("--output", required=True, metavar="DIR", help="where to write (must not exist yet)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=None, metavar="T",
                        help="--from hf: tensor-parallel size of the checkpoint written; default: 1")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=None, metavar="P",
                        help="--from hf: pipeline-parallel size of the checkpoint written; default: 1")
    parser.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None, metavar="N",
                        help="--from hf: layers per virtual stage (interleaved pipeline); default: none")
    parser.add_argument("--check", action="store_true", help="compare the logits of the HF model and megalith's "
                        f"on a random batch; fail above {CHECK_TOLERANCE:g} (needs transformers)")


def run_convert(args: argparse.Namespace) -> int:
    layout = (args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
              args.num_layers_per_virtual_pipeline_stage)
    if args.source == "hf":
        tp, pp = (size if size is not None else 1 for size in layout[:2])
        if tp < 1 or pp < 1:
            raise ConvertError("--tensor-model-parallel-size and --pipeline-model-parallel-size must be positive")
        config = hf_to_megalith(args.input, args.output, tp, pp, layout[2])
        hf_dir, ckpt_dir = args.input, args.output
        print(f"wrote {args.output}: {config.num_layers} layers, hidden {config.hidden_size}, vocabulary "
              f"{config.vocab_size}, layout tp{tp}.pp{pp}" + (f" ({layout[2]} layers per virtual stage)"
                                                              if layout[2] else ""))
    else:
        if any(value is not None for value in layout):
            raise ConvertError("--to hf reads any layout; drop --tensor-model-parallel-size, "
                               "--pipeline-model-parallel-size and --num-layers-per-virtual-pipeline-stage")
        config = megalith_to_hf(args.input, args.output)
        hf_dir, ckpt_dir = args.output, args.input
        print(f"wrote {args.output}: {hf_config_from_model(config, torch.float32)['architectures'][0]}, "
              f"{config.num_layers} layers, hidden {config.hidden_size}, vocabulary {config.vocab_size}")
    if not args.check:
        return 0
    difference = check_logits(hf_dir, ckpt_dir)
    passed = difference <= CHECK_TOLERANCE
    print(f"check: largest relative logit difference {difference:.3e} (HF vs megalith, fp32; tolerance "
          f"{CHECK_TOLERANCE:g}): {'ok' if passed else 'FAILED'}")
    return 0 if passed else 1
