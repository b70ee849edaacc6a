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

from megalith.config.checkpoint import CheckpointConfig
from megalith.config.data import DataConfig
from megalith.config.layout import Layout
from megalith.config.logs import LoggingConfig, check_profile_output
from megalith.config.model import ModelConfig
from megalith.config.optimizer import OptimizerConfig
from megalith.config.parallel import DistributedConfig
from megalith.config.precision import PrecisionConfig
from megalith.config.training import TrainingConfig
from megalith.device import check_backend, default_backend
from megalith.errors import ConfigError
from megalith.models.registry import get_model_spec
from megalith.parallel.data_parallel import default_bucket_size
from megalith.parallel.pipeline.schedules import validate_schedule_args
from megalith.parallel.pipeline.split import split_layers
from megalith.training.batch import BatchPlan, check_interleaved_micro_batches
from megalith.training.lr_schedule import LRSchedule

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
                                   cp=sections["distributed"].context_parallel_size)
        layout.check_implemented()
        sections = _adjusted(sections, notices)
        dist, model, training = sections["distributed"], sections["model"], sections["training"]
        replace(layout, sequence_parallel=dist.sequence_parallel).check_model(model)
        vpp = _virtual_pipeline_size(dist, model.num_layers)
        get_model_spec(training.model).check_virtual_pipeline(vpp)
        split_layers(model.num_layers, layout.pp, vpp, dist.decoder_first_pipeline_num_layers,
                     dist.decoder_last_pipeline_num_layers)
        dp = layout.dp
        batch = BatchPlan(training.global_batch_size or training.micro_batch_size * dp, training.micro_batch_size, dp)
        layout = Layout(tp=layout.tp, pp=layout.pp, vpp=vpp, cp=layout.cp, dp=dp,
                        sequence_parallel=dist.sequence_parallel, zero=1 if dist.use_distributed_optimizer else 0,
                        recompute=model.recompute_granularity, precision=model.params_dtype,
                        schedule=_schedule(dist.pipeline_schedule, layout.pp, vpp, batch))
        training = sections["training"] = replace(training, train_iters=_train_iters(training, batch))
        sections["optimizer"].lr_schedule(training.train_iters)  # checks warm-up, decay and WSD against the run
        check_profile_output(training, sections["logging"], world_size)
        return cls(**sections, layout=layout, num_micro_batches=batch.num_micro_batches,
                   global_batch_size=batch.global_batch_size,
                   ddp_bucket_size=dist.ddp_bucket_size or default_bucket_size(dp),
                   distributed_backend=check_backend(dist.distributed_backend or default_backend()),
                   notices=tuple(notices))

    def batch_plan(self) -> BatchPlan:
        return BatchPlan(self.global_batch_size, self.training.micro_batch_size, self.layout.dp)

    def stage_layers(self) -> list[list[int]]:
        """Every global pipeline stage's layers (--decoder-first/last-pipeline-num-layers honoured)."""
        dist = self.distributed
        return split_layers(self.model.num_layers, self.layout.pp, self.layout.vpp,
                            dist.decoder_first_pipeline_num_layers, dist.decoder_last_pipeline_num_layers)

    def lr_schedule(self) -> LRSchedule:
        return self.optimizer.lr_schedule(self.training.train_iters)

    def to_dict(self) -> dict:
        """Sections of plain values (YAML-safe), keys sorted, plus a `derived` record.

        The model's params_dtype is left out (it follows the precision section), and so is
        anything `--config` would not read back: `derived` is recomputed when a file is loaded.
        """
        out = {name: {key: list(value) if isinstance(value, tuple) else value
                      for key, value in sorted(asdict(getattr(self, name)).items())} for name in SECTIONS}
        del out["model"]["params_dtype"]
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
    if dist.sequence_parallel and dist.tensor_model_parallel_size == 1:
        dist = replace(dist, sequence_parallel=False)
        notices.append("--sequence-parallel does nothing with --tensor-model-parallel-size 1; turned off")
    if precision.bf16 and not dist.accumulate_allreduce_grads_in_fp32:
        dist = replace(dist, accumulate_allreduce_grads_in_fp32=True)
        notices.append("--bf16: gradients are accumulated and all-reduced in fp32 "
                       "(--accumulate-allreduce-grads-in-fp32 turned on, as in Megatron)")
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


def _train_iters(training: TrainingConfig, batch: BatchPlan) -> int:
    """--train-iters, else the steps --train-samples takes (Megatron's floor division), else 100."""
    if training.train_samples is not None:
        return max(1, training.train_samples // batch.global_batch_size)
    return training.train_iters if training.train_iters is not None else DEFAULT_TRAIN_ITERS


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


def _schedule(given: str | None, pp: int, vpp: int, batch: BatchPlan) -> str:
    schedule = given or Layout(pp=pp, vpp=vpp).pipeline_schedule
    if schedule == "interleaved-1f1b" and pp > 1:
        check_interleaved_micro_batches(batch.num_micro_batches, pp, micro_batch_size=batch.micro_batch_size,
                                        data_parallel_size=batch.data_parallel_size)
    try:
        validate_schedule_args(schedule, pp, vpp, batch.num_micro_batches)
    except ConfigError as error:
        raise ConfigError(f"--pipeline-schedule {schedule}: {error}") from None
    return schedule


def section_fields() -> dict[str, tuple[str, object]]:
    """Every flag's dest -> (section name, dataclass field), across all sections."""
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in fields(cls)}
