"""`megalith pretrain`'s whole configuration: the sections, resolved together into one frozen value.

Every field is a Megatron flag without the dashes (`--tensor-model-parallel-size` ->
`tensor_model_parallel_size`), so a Megatron launch script's flags carry over. Each section
checks what it can alone; `PretrainConfig.resolve` checks what ties sections to each other and
to the world size and returns a new value with the derived ones (the Layout, micro-batches,
bucket size, backend). All of it is pure: nothing here starts a process group, so a bad
combination is one line at start-up instead of a hang inside a collective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from megalith.config.checkpoint import CheckpointConfig, ckpt_format_notice
from megalith.config.data import DataConfig
from megalith.config.layout import Layout
from megalith.config.logs import LoggingConfig, check_profile_output
from megalith.config.model import ModelConfig, megatron_flag_rules
from megalith.config.optimizer import OptimizerConfig
from megalith.config.parallel import DistributedConfig, gradient_precision
from megalith.config.precision import PrecisionConfig
from megalith.config.training import TrainingConfig
from megalith.device import backend_for_run
from megalith.errors import ConfigError
from megalith.models.registry import get_model_spec
from megalith.parallel.data_parallel import default_bucket_size
from megalith.parallel.pipeline.schedules import validate_schedule_args
from megalith.parallel.pipeline.split import split_layers
from megalith.training.batch import BatchPlan
from megalith.training.lr_schedule import LRSchedule
from megalith.training.rampup import BatchSchedule

# The sections of PretrainConfig, in the order of --help and of the written config.yaml.
SECTIONS = {
    "model": ModelConfig,
    "distributed": DistributedConfig,
    "precision": PrecisionConfig,
    "optimizer": OptimizerConfig,
    "training": TrainingConfig,
    "data": DataConfig,
    "checkpointing": CheckpointConfig,
    "logging": LoggingConfig,
}


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a `megalith pretrain` run needs, checked as a whole; build it with `resolve`.

    `layout` is the run's one Layout value (dp from the world size, vpp from
    --num-layers-per-virtual-pipeline-stage, the resolved schedule, ZeRO stage, precision).
    Resolution makes Megatron's silent adjustments (--sequence-parallel off at tp 1, fp32
    gradient accumulation under --bf16, --loss-scale dropped without --fp16, params_dtype
    following --bf16 / --fp16), each with a line in `notices` (the last rank prints them once).
    """

    model: ModelConfig
    distributed: DistributedConfig
    precision: PrecisionConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    data: DataConfig
    checkpointing: CheckpointConfig
    logging: LoggingConfig
    layout: Layout
    num_micro_batches: int  # per data-parallel rank and step
    global_batch_size: int
    ddp_bucket_size: int
    distributed_backend: str
    notices: tuple[str, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def resolve(cls, world_size: int, **sections) -> "PretrainConfig":
        """The checked config of a run of `world_size` processes from its eight sections."""
        notices: list[str] = []
        layout = Layout.over_world(world_size, tp=sections["distributed"].tensor_model_parallel_size,
                                   pp=sections["distributed"].pipeline_model_parallel_size,
                                   cp=sections["distributed"].context_parallel_size,
                                   ep=sections["distributed"].expert_model_parallel_size,
                                   etp=sections["distributed"].expert_tensor_parallel_size)
        layout.check_implemented()
        ignored = layout.check_experts(getattr(sections["model"], "num_experts", None))  # issue 21's MoE field
        if ignored:  # etp without experts: the grid keeps no expert axes
            notices.append(ignored)
            layout = replace(layout, etp=None)
        sections = _adjusted(sections, notices)
        dist, model, training = sections["distributed"], sections["model"], sections["training"]
        training.check_length()
        replace(layout, sequence_parallel=dist.sequence_parallel).check_model(model)
        vpp = _virtual_pipeline_size(dist, model.num_layers)
        get_model_spec(training.model).check_virtual_pipeline(vpp)
        split_layers(model.num_layers, layout.pp, vpp, dist.decoder_first_pipeline_num_layers,
                     dist.decoder_last_pipeline_num_layers)
        dp = layout.dp
        batches = BatchSchedule(training.global_batch_size or training.micro_batch_size * dp,
                                training.micro_batch_size, dp, training.rampup_batch_size)
        batch = BatchPlan(batches.global_batch_size, batches.micro_batch_size, dp)  # the full batch
        layout = Layout(tp=layout.tp, pp=layout.pp, vpp=vpp, cp=layout.cp, dp=dp, ep=layout.ep, etp=layout.etp,
                        sequence_parallel=dist.sequence_parallel, zero=dist.zero_stage,
                        recompute=model.recompute_granularity, precision=model.params_dtype,
                        schedule=_schedule(dist.pipeline_schedule, layout.pp, vpp, batches))
        training = sections["training"] = replace(training, train_iters=_train_iters(training, batches))
        check_profile_output(training, sections["logging"], world_size)
        backend, backend_notice = backend_for_run(dist.distributed_backend)
        notices += [backend_notice] if backend_notice else []
        resolved = cls(**sections, layout=layout, num_micro_batches=batch.num_micro_batches,
                       global_batch_size=batch.global_batch_size,
                       ddp_bucket_size=dist.ddp_bucket_size or default_bucket_size(dp),
                       distributed_backend=backend,
                       notices=tuple(notices))
        resolved.lr_schedule()  # checks warm-up, decay, WSD and their units against the run
        return resolved

    def batch_plan(self) -> BatchPlan:
        """The full global batch's split (every step's once a --rampup-batch-size ramp is over)."""
        return BatchPlan(self.global_batch_size, self.training.micro_batch_size, self.layout.dp)

    def batch_schedule(self) -> BatchSchedule:
        """The global batch of each step, from the samples consumed before it (--rampup-batch-size)."""
        return BatchSchedule(self.global_batch_size, self.training.micro_batch_size, self.layout.dp,
                             self.training.rampup_batch_size)

    def stage_layers(self) -> list[list[int]]:
        """Every global pipeline stage's layers (--decoder-first/last-pipeline-num-layers honoured)."""
        dist = self.distributed
        return split_layers(self.model.num_layers, self.layout.pp, self.layout.vpp,
                            dist.decoder_first_pipeline_num_layers, dist.decoder_last_pipeline_num_layers)

    def lr_schedule(self) -> LRSchedule:
        """Counted in samples: by --train-samples and the sample flags, else by the iteration flags x the
        full global batch (Megatron's two modes)."""
        training = self.training
        if training.train_samples is not None:
            return self.optimizer.lr_schedule(None, train_samples=training.train_samples,
                                              global_batch_size=self.global_batch_size)
        return self.optimizer.lr_schedule(training.train_iters, global_batch_size=self.global_batch_size)

    def to_dict(self) -> dict:
        """Sections of plain values (YAML-safe), keys sorted, plus a `derived` record.

        The model's params_dtype is left out (it follows the precision section), and so is
        anything `--config` would not read back: `derived` is recomputed when a file is loaded.
        """
        out = {name: {key: list(value) if isinstance(value, tuple) else value
                      for key, value in sorted(asdict(getattr(self, name)).items())} for name in SECTIONS}
        del out["model"]["params_dtype"]
        if self.training.train_samples is not None:  # the iterations follow from the samples when read back
            out["training"]["train_iters"] = None
        layout = self.layout
        out["derived"] = {"world_size": layout.world_size, "data_parallel_size": layout.dp,
                          "virtual_pipeline_size": layout.vpp, "num_micro_batches": self.num_micro_batches,
                          "global_batch_size": self.global_batch_size, "pipeline_schedule": layout.pipeline_schedule,
                          "ddp_bucket_size": self.ddp_bucket_size, "distributed_backend": self.distributed_backend}
        return out


def _adjusted(sections: dict, notices: list[str]) -> dict:
    """Megatron's silent adjustments, made on new section values with a notice each."""
    dist, precision = sections["distributed"], sections["precision"]
    model = get_model_spec(sections["training"].model).resolved(sections["model"])
    device = "cuda" if backend_for_run(dist.distributed_backend)[0] == "nccl" else "cpu"  # where the ranks run
    model, model_notices = megatron_flag_rules(model, device)
    notices.extend(model_notices)
    if dist.sequence_parallel and dist.tensor_model_parallel_size == 1:
        dist = replace(dist, sequence_parallel=False)
        notices.append("--sequence-parallel does nothing with --tensor-model-parallel-size 1; turned off")
    dist = gradient_precision(dist, precision.bf16, notices)
    checkpoint_notice = ckpt_format_notice(sections["checkpointing"].ckpt_format)
    notices += [checkpoint_notice] if checkpoint_notice else []
    if precision.loss_scale is not None and not precision.fp16:
        notices.append(f"--loss-scale {precision.loss_scale} applies to --fp16 only; ignored")
        precision = replace(precision, loss_scale=None)
    wanted = precision.params_dtype
    if model.params_dtype != wanted:
        given = f"--{wanted}" if wanted != "fp32" else "fp32 (neither --bf16 nor --fp16)"
        raise ConfigError(f"--params-dtype {model.params_dtype} contradicts {given}; drop --params-dtype "
                          "(it follows --bf16 / --fp16)")
    return {**sections, "distributed": dist, "precision": precision, "model": model}


DEFAULT_TRAIN_ITERS = 100


def _train_iters(training: TrainingConfig, batches: BatchSchedule) -> int:
    """--train-iters, else the steps --train-samples takes (Megatron's update_train_iters, ramp-up
    included; a partial last batch is dropped), else 100."""
    if training.train_samples is None:
        return training.train_iters if training.train_iters is not None else DEFAULT_TRAIN_ITERS
    iterations = batches.train_iters(training.train_samples)
    if iterations < 1:
        first = batches.global_batch_size_at(0)
        raise ConfigError(f"--train-samples {training.train_samples} is less than one global batch of {first}; "
                          f"train on at least {first} samples")
    return iterations


def _virtual_pipeline_size(dist: DistributedConfig, num_layers: int) -> int:
    pp, per_stage = dist.pipeline_model_parallel_size, dist.num_layers_per_virtual_pipeline_stage
    uneven = dist.decoder_first_pipeline_num_layers is not None or dist.decoder_last_pipeline_num_layers is not None
    if pp == 1 and (per_stage is not None or uneven):
        flag = ("--num-layers-per-virtual-pipeline-stage" if per_stage is not None
                else "--decoder-first/last-pipeline-num-layers")
        raise ConfigError(f"{flag} needs a pipeline; set --pipeline-model-parallel-size > 1 or drop {flag}")
    if per_stage is None:
        if not uneven and num_layers % pp != 0:
            raise ConfigError(
                f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp}; use a "
                f"multiple of {pp} or give --decoder-first/last-pipeline-num-layers"
            )
        return 1
    if num_layers % (pp * per_stage) != 0:
        raise ConfigError(
            f"--num-layers {num_layers} is not divisible by --pipeline-model-parallel-size {pp} x "
            f"--num-layers-per-virtual-pipeline-stage {per_stage} = {pp * per_stage}; choose --num-layers as a "
            f"multiple of {pp * per_stage}"
        )
    return num_layers // (pp * per_stage)


def _schedule(given: str | None, pp: int, vpp: int, batches: BatchSchedule) -> str:
    """The pipeline schedule, checked against every global batch the run uses (the full one first)."""
    schedule = given or Layout(pp=pp, vpp=vpp).pipeline_schedule
    full, ramp = batches.global_batch_size, batches.rampup
    for size in (full, *(s for s in batches.batch_sizes() if s != full)):
        plan = BatchPlan(size, batches.micro_batch_size, batches.data_parallel_size)
        try:
            _check_schedule(schedule, pp, vpp, plan)
        except ConfigError as error:
            if size == full:
                raise
            raise ConfigError(f"--rampup-batch-size {' '.join(map(str, ramp))} reaches a global batch of {size}: "
                              f"{error}") from None
    return schedule


def _check_schedule(schedule: str, pp: int, vpp: int, batch: BatchPlan) -> None:
    try:
        validate_schedule_args(schedule, pp, vpp, batch.num_micro_batches)
    except ConfigError as error:
        raise ConfigError(f"--pipeline-schedule {schedule}: {error}") from None


def section_fields() -> dict[str, tuple[str, object]]:
    """Every flag's dest -> (section name, dataclass field), across all sections."""
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in fields(cls)}
