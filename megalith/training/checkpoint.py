"""Save and load a training run on every rank: model, optimizer, schedule, scaler, RNG, data position.

Written (megalith.training.checkpoint_format has the layout on disk):

- the model: each tensor-parallel x pipeline rank's parameters, by its data-parallel rank 0, as
  pieces of the global tensors (the tied head copy is the embedding, stored once). Expert
  parameters (`expert_parallel`) differ across ep ranks, which are dp ranks of the dense
  factorization: each expert-tensor x expert x pipeline rank's are written by its expert-data-
  parallel rank 0 into a file of their own, as pieces of the global [E, ...] tensors (ep splits
  dim 0, etp their tensor-parallel dim); and persistent buffers (the router's expert_bias, which
  training updates), whole;
- the optimizer: per parameter, the fp32 main weight (when the model is bf16/fp16) and every
  per-element state (Adam's moments, SGD's momentum). Under ZeRO (any stage) each dp rank holds
  fragments of them; they are summed over dp (an expert's over edp, which ZeRO shards them
  over) into whole shards first (Megatron's legacy
  distributed optimizer checkpoint gathers to dp rank 0 too), so the files depend neither on dp
  nor on the sharding strategy. ZeRO-3's parameters are fragments too and are assembled the same
  way; loading scatters each rank's fragments back into its shards;
- each rank's random states; and, from rank 0, metadata.json: iteration, consumed samples,
  the validation stream's position, the resolved config, the layout, the LR scheduler, the loss
  scaler and the optimizer's step count.

Atomic: every rank writes into `iter_N.tmp`; only when all have written (a failure flag summed
over the job, so one failing rank stops all) does rank 0 rename it to `iter_N` and then
replace the tracker file by rename. Killed at any moment, the tracker names a complete
checkpoint. Loading reads any layout's checkpoint into this layout (resharding): every rank
assembles its shards from the pieces; RNG states are restored only under the same layout.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, fields
from typing import Callable

import torch

from megalith import device as device_policy
from megalith.config.model import KERNEL_FIELDS
from megalith.models.gpt import PADDED_VOCAB_PARAMETERS, TIED_COPY_ALIASES
from megalith.parallel.comm import all_reduce, max_over_job
from megalith.parallel.data_parallel import is_expert
from megalith.training.checkpoint_format import (
    FORMAT_VERSION, METADATA_FILE, RANK_LAYOUT_KEYS, CheckpointError, CheckpointReader, Placement, expert_file_name,
    global_shape, iteration_dir_name, layout_record,
    load_tensors, pieces, read_local, read_tracker, rng_file_name, save_pieces, save_tensors, saved_layout,
    shard_file_name, write_tracker,
)

# ModelConfig fields that may differ between the run that saved and the run that loads.
RUNTIME_FIELDS = ("params_dtype", "hidden_dropout", "attention_dropout", "recompute_granularity", "recompute_method",
                  "recompute_num_layers", "attention_backend", "attention_softmax_in_fp32", "seq_length",
                  "encoder_seq_length", "decoder_seq_length", "make_vocab_size_divisible_by", "group_query_attention",
                  "transformer_impl", "init_method_xavier_uniform", "init_method_std") + KERNEL_FIELDS


def model_name(name: str) -> str:
    """The global name of a chunk's parameter (the tied head copy is the embedding)."""
    for copy, original in TIED_COPY_ALIASES.items():
        if name.endswith(copy):
            name = name[: -len(copy)] + original
    return "model/" + name


def placement_of(name: str, param: torch.Tensor, vocab_size: int) -> Placement:
    padded = name.endswith(PADDED_VOCAB_PARAMETERS)
    return Placement(getattr(param, "tensor_parallel_dim", None), getattr(param, "tensor_parallel_stride", 1),
                     vocab_size if padded else None, experts=is_expert(param))


def _any_rank_failed(failed: bool, state) -> bool:
    """Whether any rank of the job failed; a barrier too."""
    return max_over_job(1.0 if failed else 0.0, state) > 0


def check_model_matches(meta: dict, model_config, model: str, directory: str) -> None:
    """Refuse a checkpoint of another architecture, naming every flag that differs."""
    saved = meta.get("model_config") or {}
    # a key a checkpoint written before the option existed lacks holds the option's default
    defaults = {f.name: f.default for f in fields(model_config)}
    differs = [f"--{key.replace('_', '-')} {saved.get(key, defaults[key])!r} in the checkpoint, {value!r} now"
               for key, value in asdict(model_config).items()
               if key not in RUNTIME_FIELDS and saved.get(key, defaults[key]) != value]
    if meta.get("model") not in (None, model):
        differs.insert(0, f"--model {meta.get('model')!r} in the checkpoint, {model!r} now")
    if differs:
        raise CheckpointError(f"{directory} was written for another model: {'; '.join(differs)}; load it with the "
                              "model flags it was saved with")


def check_load_target(config) -> None:
    """Before any process group: the checkpoint --load names exists, is complete and fits the model."""
    import json

    root = config.checkpointing.load
    iteration = read_tracker(root)
    if iteration is None:
        return  # nothing to load yet: the run starts fresh (with a notice)
    directory = os.path.join(root, iteration_dir_name(iteration))
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        CheckpointReader(directory)  # raises the precise error (missing, or pickled files)
    try:
        meta = json.load(open(path, encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON ({error.msg}); the checkpoint is corrupt") from None
    check_model_matches(meta, config.model, config.training.model, directory)


class Checkpointer:
    """Saves and loads one rank's part of a run (`runner`: StepRunner; `state`: ParallelState)."""

    def __init__(self, runner, state, config, *, log: Callable[[str], None] = print) -> None:
        self.runner, self.state, self.config, self.log = runner, state, config, log
        self.vocab_size = config.model.vocab_size
        self.params = {name: param for chunk in runner.chunks for name, param in chunk.named_parameters()}
        self.experts = {name for name, param in self.params.items() if is_expert(param)}
        # persistent buffers (the router's expert_bias, which training updates): replicated, stored whole
        self.buffers = {name: value for chunk in runner.chunks
                        for name, value in chunk.state_dict(keep_vars=True).items()
                        if not isinstance(value, torch.nn.Parameter)}

    def _coordinates(self, name: str) -> tuple[int, int, int, int]:
        """(tp rank, tp size, ep rank, ep size) that split parameter `name`: the expert axes' (etp, ep)
        for an expert parameter, else tp's (and no ep)."""
        s = self.state
        if name in self.experts:
            return s.etp_rank, s.etp_size, s.ep_rank, s.ep_size
        return s.tp_rank, s.tp_size, 0, 1

    # --- saving -------------------------------------------------------------------------------

    def _whole_from_fragments(self, values: dict[str, list[tuple[object, torch.Tensor]]], dtype: torch.dtype,
                              sharded: bool) -> dict[str, dict[str, torch.Tensor]]:
        """{kind: {param name: whole local (tp) tensor}} from each fragment's values, summed over dp
        (an expert parameter's over edp) when the fragments are shards (every element has one
        owner: the sum is exact in any dtype).

        `values[kind]` lists (fragment, flat value). Every dp rank builds the same keys in the same
        order (zeros where it owns no fragment), so the sums over dp line up."""
        device = self.state.device
        wholes = {kind: {name: torch.zeros(param.numel(), dtype=dtype, device=device)
                         for name, param in sorted(self.params.items())} for kind in values}
        for kind, entries in values.items():
            for fragment, value in entries:
                flat = value.detach().to(dtype).reshape(-1)
                wholes[kind][fragment.name][fragment.offset:fragment.offset + flat.numel()] = flat
        if sharded:
            for kind in values:
                for name in sorted(self.params):
                    expert = name in self.experts
                    if (self.state.edp_size if expert else self.state.dp_size) > 1:
                        all_reduce(wholes[kind][name], self.state.edp_group if expert else self.state.dp_group)
        return {kind: {name: flat.view(self.params[name].shape) for name, flat in whole.items()}
                for kind, whole in wholes.items()}

    def _optimizer_shards(self) -> dict[str, dict[str, torch.Tensor]]:
        """{state kind: {param name: whole local shard (fp32)}}, summed over dp under ZeRO."""
        optimizer = self.runner.optimizer
        kinds = sorted({key for fragment in optimizer.fragments
                        for key, value in optimizer.inner.state.get(fragment.main, {}).items()
                        if torch.is_tensor(value) and value.shape == fragment.main.shape})
        values = {kind: [(f, optimizer.inner.state[f.main][kind]) for f in optimizer.fragments] for kind in kinds}
        if any(fragment.model is not None for fragment in optimizer.fragments):
            values["main"] = [(f, f.main) for f in optimizer.fragments]
        return self._whole_from_fragments(values, torch.float32, optimizer.sharded)

    @property
    def _sharded_parameters(self) -> bool:
        """ZeRO-3: each rank holds only its fragments of the parameters."""
        return self.config.layout.zero >= 3

    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """{param name: this tp x pp rank's whole parameter}: the parameters themselves, or under
        ZeRO-3 their shards (the optimizer's fragments) summed over dp (a collective over dp)."""
        if not self._sharded_parameters:
            return {name: param.detach() for name, param in self.params.items()}
        fragments = self.runner.optimizer.fragments
        dtype = next(iter(self.params.values())).dtype
        values = {"model": [(f, f.main if f.model is None else f.model) for f in fragments]}
        return self._whole_from_fragments(values, dtype, True)["model"]

    def _optimizer_step(self) -> float | None:
        for value in self.runner.optimizer.inner.state.values():
            if "step" in value:
                return float(value["step"])
        return None

    def _write_shard(self, directory: str, model: dict, optimizer: dict, experts: bool) -> None:
        """This rank's dense parameters (`experts` False) or expert parameters, with their optimizer state."""
        tensors = {}
        for name, param in self.params.items():
            if getattr(param, "is_tied_copy", False) or (name in self.experts) != experts:
                continue
            placement = placement_of(name, param, self.vocab_size)
            tp_rank, tp_size, ep_rank, ep_size = self._coordinates(name)
            geometry = (global_shape(tuple(param.shape), placement, tp_size, ep_size),
                        pieces(tuple(param.shape), placement, tp_rank, tp_size, ep_rank, ep_size))
            tensors[model_name(name)] = (model[name], *geometry)
            for kind, shard in optimizer.items():
                if name in shard:
                    tensors[f"optimizer/{kind}/{model_name(name)[len('model/'):]}"] = (shard[name], *geometry)
        if not experts:
            for name, value in self.buffers.items():
                shape = tuple(value.shape)
                tensors[f"buffer/{name}"] = (value, shape, pieces(shape, Placement(None), 0, 1))
        s = self.state
        file_name = expert_file_name(s.etp_rank, s.ep_rank, s.pp_rank) if experts else shard_file_name(s.tp_rank,
                                                                                                      s.pp_rank)
        save_pieces(os.path.join(directory, file_name), tensors)

    def _rng_states(self) -> dict[str, torch.Tensor]:
        states = {"torch_cpu": torch.get_rng_state()}
        if self.state.device.type != "cpu":
            states["device"] = device_policy.get_rng_state(self.state.device).cpu()
        tracker = self.runner.chunks[0].ctx.rng_tracker
        if tracker is not None:
            states.update({f"tracker/{name}": value for name, value in tracker.get_states().items()})
        return states

    def metadata(self, iteration: int, consumed_samples: int, valid_batches: int, scheduler) -> dict:
        c = self.config
        scaler = self.runner.optimizer.loss_scaler
        return {
            "format_version": FORMAT_VERSION, "iteration": iteration, "consumed_samples": consumed_samples,
            "valid_batches": valid_batches, "model": c.training.model, "model_config": asdict(c.model),
            "layout": layout_record(c.layout),
            "has_optimizer": not c.checkpointing.no_save_optim,
            "optimizer": {"name": c.optimizer.optimizer, "step": self._optimizer_step()},
            "scheduler": scheduler.state_dict(), "loss_scaler": scaler.state_dict() if scaler is not None else None,
            "config": c.to_dict(), "source": "megalith pretrain",
        }

    def save(self, root: str, iteration: int, consumed_samples: int, valid_batches: int, scheduler) -> str:
        """Write checkpoint `iteration` under `root` on every rank; returns its directory."""
        import json

        final = os.path.join(root, iteration_dir_name(iteration))
        temporary = final + ".tmp"
        state = self.state
        failed = None
        if state.rank == 0:
            try:
                os.makedirs(root, exist_ok=True)
                shutil.rmtree(temporary, ignore_errors=True)  # a save that was killed before
                os.makedirs(temporary)
            except OSError as error:
                failed = error
        if _any_rank_failed(failed is not None, state):
            raise CheckpointError(f"cannot create {temporary}: {failed or 'rank 0 failed'}; check --save") from None
        self.runner.finish_param_gather()  # --overlap-param-gather: the parameters are complete first
        saving = self.config.checkpointing
        # collective over dp: every rank takes part (or none: --no-save-optim is the same on every rank)
        optimizer = {} if saving.no_save_optim else self._optimizer_shards()
        model = self._model_tensors()  # collective over dp under ZeRO-3
        try:
            if state.dp_rank == 0:
                self._write_shard(temporary, model, optimizer, experts=False)
            if self.experts and state.edp_rank == 0:  # one writer per (etp, ep, pp) coordinate
                self._write_shard(temporary, model, optimizer, experts=True)
            if not saving.no_save_rng:
                save_tensors(os.path.join(temporary, rng_file_name(state.rank)), self._rng_states())
            if state.rank == 0:
                with open(os.path.join(temporary, METADATA_FILE), "w", encoding="utf-8") as out:
                    json.dump(self.metadata(iteration, consumed_samples, valid_batches, scheduler), out, indent=1)
        except Exception as error:  # every rank must hear of it, or the others would wait at the barrier
            failed = error
        if _any_rank_failed(failed is not None, state):
            raise CheckpointError(f"saving {final} failed on a rank: {failed or 'see that rank'}; the previous "
                                  "checkpoint is untouched") from None
        if state.rank == 0:
            if os.path.isdir(final):
                shutil.rmtree(final)
            os.replace(temporary, final)
            write_tracker(root, iteration)
        _any_rank_failed(False, state)  # nobody goes on before the checkpoint is visible
        return final

    # --- loading ------------------------------------------------------------------------------

    def load(self, root: str, *, load_optim: bool = True, load_rng: bool = True, finetune: bool = False,
             scheduler=None, override_scheduler: bool = False) -> dict | None:
        """Load the checkpoint the tracker under `root` names into this rank; its metadata, or None
        when `root` holds no checkpoint yet (training starts from scratch, as in Megatron)."""
        iteration = read_tracker(root)
        if iteration is None:
            self.log(f"notice: no checkpoint in {root} ({os.path.join(root, 'latest_checkpointed_iteration.txt')} "
                     "is missing); training starts from the initial weights")
            return None
        directory = os.path.join(root, iteration_dir_name(iteration))
        reader = CheckpointReader(directory)
        meta = reader.metadata
        check_model_matches(meta, self.config.model, self.config.training.model, directory)
        self._load_model(reader)
        with_optimizer = load_optim and not finetune
        if with_optimizer and meta.get("has_optimizer"):
            self._load_optimizer(reader, meta)
            if scheduler is not None and meta.get("scheduler") is not None:
                scheduler.load_state_dict(meta["scheduler"], override_opt_param_scheduler=override_scheduler)
            scaler = self.runner.optimizer.loss_scaler
            if scaler is not None and meta.get("loss_scaler") is not None:
                scaler.load_state_dict(meta["loss_scaler"])
        else:
            self._main_from_model()
            if with_optimizer:
                self.log(f"notice: {directory} holds no optimizer state (weights only); the optimizer starts fresh")
        if load_rng and not finetune:
            self._load_rng(directory, meta)
        return meta

    def _local(self, reader: CheckpointReader, name: str, global_name: str) -> torch.Tensor:
        param = self.params[name]
        placement = placement_of(name, param, self.vocab_size)
        return read_local(reader, global_name, tuple(param.shape), placement, *self._coordinates(name))

    @torch.no_grad()
    def _load_model(self, reader: CheckpointReader) -> None:
        for name, value in self.buffers.items():  # a checkpoint written before buffers were saved keeps them
            if f"buffer/{name}" in reader:
                value.copy_(reader.read(f"buffer/{name}").to(value.dtype))
        if not self._sharded_parameters:
            for name, param in self.params.items():
                param.copy_(self._local(reader, name, model_name(name)).to(param.dtype))
            return
        whole = {}  # ZeRO-3: scattered into this rank's shards, fragment by fragment
        for fragment in self.runner.optimizer.fragments:
            if fragment.name not in whole:
                whole[fragment.name] = self._local(reader, fragment.name, model_name(fragment.name)).reshape(-1)
            target = fragment.main if fragment.model is None else fragment.model
            value = whole[fragment.name][fragment.offset:fragment.offset + target.numel()]
            target.copy_(value.to(device=target.device, dtype=target.dtype).view(target.shape))

    @torch.no_grad()
    def _main_from_model(self) -> None:
        """Fresh fp32 main weights from the loaded (bf16/fp16) parameters."""
        for fragment in self.runner.optimizer.fragments:
            if fragment.model is not None:
                fragment.main.copy_(fragment.model.float())

    @torch.no_grad()
    def _load_optimizer(self, reader: CheckpointReader, meta: dict) -> None:
        optimizer = self.runner.optimizer
        step = (meta.get("optimizer") or {}).get("step")
        kinds = sorted({name.split("/")[1] for name in reader.names() if name.startswith("optimizer/")})
        wants_main = any(f.model is not None for f in optimizer.fragments)
        for fragment in optimizer.fragments:
            global_name = model_name(fragment.name)[len("model/"):]
            state = optimizer.inner.state[fragment.main]
            for kind in kinds:
                stored = f"optimizer/{kind}/{global_name}"
                if kind == "main" and not wants_main:
                    continue
                flat = self._local(reader, fragment.name, stored).reshape(-1)
                value = flat[fragment.offset:fragment.offset + fragment.main.numel()].to(fragment.main.device)
                if kind == "main":
                    fragment.main.copy_(value)
                else:
                    state[kind] = value.to(fragment.main.dtype).clone()
            if wants_main and "main" not in kinds and fragment.model is not None:
                fragment.main.copy_(fragment.model.float())  # saved from an fp32 run: the weights are the mains
            if step is not None and kinds:
                state["step"] = torch.tensor(float(step), dtype=torch.float32)

    def _load_rng(self, directory: str, meta: dict) -> None:
        if not os.path.isdir(os.path.join(directory, os.path.dirname(rng_file_name(0)))):
            self.log(f"notice: {directory} holds no random states ({meta.get('source')}); this run's are kept")
            return
        saved = saved_layout(meta)
        ours = layout_record(self.config.layout)
        if any(saved.get(key) != ours[key] for key in RANK_LAYOUT_KEYS):
            if self.state.rank == self.state.grid.world_size - 1:
                self.log(f"notice: {directory} was written under another layout ({saved}); random states are not "
                         "restored (they belong to ranks)")
            return
        path = os.path.join(directory, rng_file_name(self.state.rank))
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: no such file; the checkpoint is incomplete (or pass --no-load-rng)")
        states = load_tensors(path)
        torch.set_rng_state(states["torch_cpu"])
        if "device" in states and self.state.device.type != "cpu":
            device_policy.set_rng_state(states["device"], self.state.device)
        tracker = self.runner.chunks[0].ctx.rng_tracker
        tracked = {key[len("tracker/"):]: value for key, value in states.items() if key.startswith("tracker/")}
        if tracker is not None and tracked:
            tracker.set_states(tracked)
