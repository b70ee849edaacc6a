"""`megalith convert`: Hugging Face directories <-> megalith checkpoints, for every family in
families (GPT-2, Llama, BERT, T5).

Import writes a megalith checkpoint (iteration 0, no optimizer) for any tp x pp (x vpp) layout,
computing each rank's shard purely, the way megalith's layers slice the global tensor, so no
processes start. Export reads any megalith checkpoint, whatever layout wrote it, as global
tensors and writes config.json + model.safetensors that transformers' from_pretrained loads.
`--check` runs the HF model and megalith's on one random batch and compares their logits.

Nothing here knows a model: the family (mapping.HFFamily) gives the config, the tensors,
where each one goes and how to compare; files reads HF directories and writes atomically.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, replace

import torch

from megalith.config import Layout, ModelConfig
from megalith.parallel.layers import padded_vocab_size
from megalith.parallel.pipeline.split import split_layers
from megalith.training.checkpoint_format import (
    FORMAT_VERSION, METADATA_FILE, CheckpointError, CheckpointReader, Placement, global_shape, iteration_dir_name,
    layout_record, pieces, read_local, read_tracker, save_pieces, shard_file_name, write_tracker,
)
from megalith.convert.families import FAMILIES, family_for_hf, family_for_model
from megalith.convert.files import (
    HF_CONFIG, HF_WEIGHTS, atomic_directory, hf_weight_names, load_hf_weights, read_hf_config,
)
from megalith.convert.mapping import ConvertError, HFFamily, plain_norm_weights, relative_difference

CHECK_TOLERANCE = 1e-5  # fp32: largest |a - b| over largest |b|


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


def metadata(config: ModelConfig, layout: Layout, model: str, source: str) -> dict:
    """metadata.json of a converted checkpoint: iteration 0, weights only, for `--model model`."""
    return {
        "format_version": FORMAT_VERSION, "iteration": 0, "consumed_samples": 0, "valid_batches": 0, "model": model,
        "model_config": asdict(config), "layout": layout_record(layout),
        "has_optimizer": False, "optimizer": None, "scheduler": None, "loss_scaler": None, "config": None,
        "source": source,
    }


def _model_spec(family: HFFamily):
    from megalith.models.registry import get_model_spec

    return get_model_spec(family.model)


def _virtual_stages(config: ModelConfig, family: HFFamily, pp: int, vpp_layers: int | None) -> int:
    if vpp_layers is None:
        return 1
    if not getattr(_model_spec(family), "interleaved_pipeline", True):
        raise ConvertError(f"megalith's {family.model} has no interleaved pipeline; drop "
                           "--num-layers-per-virtual-pipeline-stage")
    if vpp_layers < 1 or config.num_layers % (pp * vpp_layers) != 0:
        raise ConvertError(f"--num-layers-per-virtual-pipeline-stage {vpp_layers} does not divide the "
                           f"{config.num_layers} layers over {pp} pipeline stages; choose one that does")
    return config.num_layers // (pp * vpp_layers)


def write_checkpoint(tensors: dict[str, torch.Tensor], config: ModelConfig, root: str, layout: Layout,
                     family: HFFamily, source: str | None = None) -> None:
    """A megalith checkpoint (iteration 0) of global `tensors` in `layout` (tp x pp x vpp), at `root`."""
    layout.check_model(config)
    tp, pp = layout.tp, layout.pp
    stages = split_layers(config.num_layers, pp, layout.vpp)
    layer_stages = {layer: stage for stage, layers in enumerate(stages) for layer in layers}
    owner = {name: family.stage_of(name, config, layer_stages, len(stages) - 1) % pp for name in tensors}
    with atomic_directory(root) as temporary:
        directory = os.path.join(temporary, iteration_dir_name(0))
        for pp_rank in range(pp):
            for tp_rank in range(tp):
                local = {}
                for name, full in tensors.items():
                    if owner[name] != pp_rank:
                        continue
                    where = family.placement(name, config)
                    part = shard(full, where, tp_rank, tp, config)
                    shape = tuple(part.shape)
                    local[f"model/{name}"] = (part, global_shape(shape, where, tp), pieces(shape, where, tp_rank, tp))
                save_pieces(os.path.join(directory, shard_file_name(tp_rank, pp_rank)), local)
        with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as out:
            json.dump(metadata(config, layout, family.model, source or f"hf:{family.model_types[0]}"), out,
                      indent=2)
        write_tracker(temporary, 0)


def hf_to_megalith(hf_dir: str, out_dir: str, tp: int = 1, pp: int = 1, vpp_layers: int | None = None) -> ModelConfig:
    """Convert an HF directory of any known family into a megalith checkpoint of layout tp x pp (x vpp)."""
    hf = read_hf_config(hf_dir)
    family = family_for_hf(hf)
    config = _model_spec(family).resolved(family.config_from_hf(hf, hf_weight_names(hf_dir)))
    # the files do not depend on SP; MoE layers at tp > 1 run only with it, so the target is checked with it
    layout = Layout(tp=tp, pp=pp, vpp=_virtual_stages(config, family, pp, vpp_layers),
                    sequence_parallel=tp > 1 and bool(getattr(config, "num_experts", None)))
    layout.check_model(config)
    split_layers(config.num_layers, pp, layout.vpp)  # a bad split fails before any tensor is read
    tensors = family.hf_to_global(load_hf_weights(hf_dir), config)
    write_checkpoint(tensors, config, out_dir, layout, family, f"hf:{hf['model_type']}")
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
    stored = dict(reader.metadata.get("model_config") or {})
    unknown = sorted(set(stored) - set(ModelConfig.field_names()))
    if unknown or not stored:
        raise ConvertError(f"{directory}: metadata.json's model_config is missing or has fields this megalith does "
                           f"not know ({', '.join(unknown)}); convert with the megalith that wrote it")
    return reader, ModelConfig(**stored)


def checkpoint_family(reader: CheckpointReader, config: ModelConfig) -> HFFamily:
    """The family that exports this checkpoint (metadata without a model name: a GPT's)."""
    return family_for_model(reader.metadata.get("model") or "gpt", config)


def read_global_tensors(reader: CheckpointReader) -> dict[str, torch.Tensor]:
    """Every model tensor's global value, assembled from the pieces of whatever layout wrote them."""
    return {name[len("model/"):]: reader.read(name) for name in reader.names() if name.startswith("model/")}


def megalith_to_hf(ckpt_dir: str, out_dir: str) -> ModelConfig:
    """Write the checkpoint's model as an HF directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    reader, config = open_checkpoint(ckpt_dir)
    family = checkpoint_family(reader, config)
    tensors = family.global_to_hf(plain_norm_weights(read_global_tensors(reader), config), config)
    hf = family.hf_config(config, next(iter(tensors.values())).dtype)
    with atomic_directory(out_dir) as temporary:
        save_file(tensors, os.path.join(temporary, HF_WEIGHTS), metadata={"format": "pt"})
        with open(os.path.join(temporary, HF_CONFIG), "w", encoding="utf-8") as out:
            json.dump(hf, out, indent=2)
    return config


# --- --check ----------------------------------------------------------------------------------


def megalith_model(ckpt_dir: str):
    """The whole model (one process, tp=1, fp32, no dropout) holding the checkpoint's weights, loaded
    as `megalith pretrain --load` loads them; with its config and family."""
    from megalith.models.parallel_context import ParallelContext, StageSpec
    from megalith.training.checkpoint import model_name, placement_of

    reader, config = open_checkpoint(ckpt_dir)
    family = checkpoint_family(reader, config)
    config = replace(config, hidden_dropout=0.0, attention_dropout=0.0, params_dtype="fp32",
                     recompute_granularity=None, recompute_method=None, recompute_num_layers=None)
    spec = _model_spec(family)
    config = spec.resolved(config)
    model = spec.build(config, ParallelContext(), 0, StageSpec(layers=tuple(range(config.num_layers))))
    with torch.no_grad():
        for name, param in model.named_parameters():
            where = placement_of(name, param, config.vocab_size)
            param.copy_(read_local(reader, model_name(name), tuple(param.shape), where, 0, 1))
    return model.eval(), config, family


def check_logits(hf_dir: str, ckpt_dir: str, seed: int = 0) -> float:
    """Largest relative logit difference (max|a - b| / max|b|) of megalith's model against HF's,
    HF's being the class the family's config.json names, loaded from `hf_dir`."""
    try:
        import transformers
    except ImportError:
        raise ConvertError("--check needs transformers; pip install transformers (or drop --check)") from None
    model, config, family = megalith_model(ckpt_dir)
    architecture = family.hf_config(config, torch.float32)["architectures"][0]
    reference = getattr(transformers, architecture).from_pretrained(hf_dir).float().eval()
    return relative_difference(family.compare(reference, model, config, torch.Generator().manual_seed(seed)))


# --- command line -----------------------------------------------------------------------------


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    families = ", ".join(family.name for family in FAMILIES)
    models = ", ".join(dict.fromkeys(family.model for family in FAMILIES))
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from", dest="source", choices=("hf",), help=f"convert a Hugging Face directory "
                           f"({families}) into a megalith checkpoint")
    direction.add_argument("--to", dest="target", choices=("hf",), help=f"convert a megalith checkpoint ({models}) "
                           "into a Hugging Face directory")
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
        family = family_for_hf(read_hf_config(args.input))
        print(f"wrote {args.output}: --model {family.model} ({family.name}), {config.num_layers} layers, hidden "
              f"{config.hidden_size}, vocabulary {config.vocab_size}, layout tp{tp}.pp{pp}"
              + (f" ({layout[2]} layers per virtual stage)" if layout[2] else ""))
    else:
        if any(value is not None for value in layout):
            raise ConvertError("--to hf reads any layout; drop --tensor-model-parallel-size, "
                               "--pipeline-model-parallel-size and --num-layers-per-virtual-pipeline-stage")
        config = megalith_to_hf(args.input, args.output)
        hf_dir, ckpt_dir = args.output, args.input
        architecture = read_hf_config(args.output)["architectures"][0]
        print(f"wrote {args.output}: {architecture}, {config.num_layers} layers, hidden {config.hidden_size}, "
              f"vocabulary {config.vocab_size}")
    if not args.check:
        return 0
    difference = check_logits(hf_dir, ckpt_dir)
    passed = difference <= CHECK_TOLERANCE
    print(f"check: largest relative logit difference {difference:.3e} (HF vs megalith, fp32; tolerance "
          f"{CHECK_TOLERANCE:g}): {'ok' if passed else 'FAILED'}")
    return 0 if passed else 1
