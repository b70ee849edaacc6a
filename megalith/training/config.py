"""`megalith pretrain`'s configuration: one frozen dataclass per topic, Megatron's flag names.

Every field is a Megatron flag without the dashes (`--tensor-model-parallel-size` ->
`tensor_model_parallel_size`), so a Megatron launch script's flags carry over. Each section
checks what it can alone; `PretrainConfig` checks what ties sections to each other and to the
world size, and fills in the derived values (data-parallel size, micro-batches, schedule...).
All of it is pure: nothing here starts a process group, so a bad combination is one line at
start-up instead of a hang inside a collective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from megalith.config import ModelConfig, ParallelConfig, flag_field
from megalith.data.tokenizers import TOKENIZER_TYPES
from megalith.device import KNOWN_BACKENDS, check_backend, default_backend
from megalith.errors import ConfigError
from megalith.models.registry import BUILTIN_MODELS, get_model_spec
from megalith.parallel.pipeline.schedules import SCHEDULES, validate_schedule_args
from megalith.parallel.pipeline.split import split_layers
from megalith.training.batch import BatchPlan, check_interleaved_micro_batches
from megalith.parallel.data_parallel import default_bucket_size
from megalith.training.loss_scaler import ConstantLossScaler, DynamicLossScaler, make_loss_scaler
from megalith.training.lr_schedule import LR_DECAY_STYLES, LR_WSD_DECAY_STYLES, LRSchedule
from megalith.training.timers import TIMING_LOG_LEVELS

OPTIMIZER_NAMES = ("adam", "sgd")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_int(section, name: str, minimum: int, optional: bool = False) -> None:
    value = getattr(section, name)
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{_flag(name)} must be an integer >= {minimum}, got {value!r}")


def _check_range(section, name: str, low: float, high: float | None = None, *, open_low: bool = False,
                 open_high: bool = True, optional: bool = False) -> None:
    """low <= value (< or <=) high; `open_low` makes the lower bound strict."""
    value = getattr(section, name)
    if optional and value is None:
        return
    above = value > low if open_low else value >= low
    below = high is None or (value < high if open_high else value <= high)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (above and below):
        bounds = ("(" if open_low else "[") + f"{low}, " + ("inf)" if high is None else f"{high}" + (")" if open_high else "]"))
        raise ConfigError(f"{_flag(name)} must be in {bounds}, got {value!r}")


def _check_choice(section, name: str, allowed) -> None:
    value = getattr(section, name)
    if value is not None and value not in allowed:
        raise ConfigError(f"{_flag(name)} {value!r} is not one of {', '.join(map(str, allowed))}")


@dataclass(frozen=True)
class DistributedConfig:
    """How the job is split over processes, and how gradients travel (group "distributed")."""

    tensor_model_parallel_size: int = flag_field(1, "tensor-parallel size (tp)")
    pipeline_model_parallel_size: int = flag_field(1, "pipeline-parallel size (pp)")
    num_layers_per_virtual_pipeline_stage: int | None = flag_field(
        None, "layers per virtual pipeline stage; vpp = num layers / (pp x this) (None: no interleaving)")
    context_parallel_size: int = flag_field(1, "context-parallel size (only 1 is supported)")
    sequence_parallel: bool = flag_field(False, "split norms, dropout and residuals along the sequence over tp")
    decoder_first_pipeline_num_layers: int | None = flag_field(None, "layers of the first pipeline stage (None: even)")
    decoder_last_pipeline_num_layers: int | None = flag_field(None, "layers of the last pipeline stage (None: even)")
    pipeline_schedule: str | None = flag_field(
        None, "pipeline schedule (None: no-pipelining at pp 1, 1f1b, interleaved-1f1b with vpp)", SCHEDULES)
    use_distributed_optimizer: bool = flag_field(False, "shard optimizer state over data parallelism (ZeRO-1)")
    overlap_grad_reduce: bool = flag_field(False, "reduce gradient buckets during backward")
    ddp_bucket_size: int | None = flag_field(None, "elements per gradient bucket with --overlap-grad-reduce (None: max(40M, 1M x dp)); one bucket without it")
    accumulate_allreduce_grads_in_fp32: bool = flag_field(
        False, "accumulate and reduce gradients in fp32 (forced on with --bf16)")
    distributed_backend: str | None = flag_field(None, "process-group backend (None: nccl with CUDA, gloo otherwise)",
                                                 KNOWN_BACKENDS)
    distributed_timeout_minutes: float | None = flag_field(
        None, "timeout of collectives in minutes (None: 1 under gloo, 10 under nccl)")

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size"):
            _check_int(self, name, 1)
        if self.context_parallel_size > 1:
            raise ConfigError(f"--context-parallel-size {self.context_parallel_size} is not supported yet (context "
                              "parallelism is not implemented); use --context-parallel-size 1")
        for name in ("num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
                     "decoder_last_pipeline_num_layers", "ddp_bucket_size"):
            _check_int(self, name, 1, optional=True)
        _check_choice(self, "pipeline_schedule", SCHEDULES)
        _check_choice(self, "distributed_backend", KNOWN_BACKENDS)
        _check_range(self, "distributed_timeout_minutes", 0, open_low=True, optional=True)


@dataclass(frozen=True)
class PrecisionConfig:
    """bf16 / fp16 parameters and fp16's loss scaling (group "mixed precision")."""

    bf16: bool = flag_field(False, "bf16 parameters, fp32 main weights and gradient reduction")
    fp16: bool = flag_field(False, "fp16 parameters with loss scaling, fp32 main weights")
    loss_scale: float | None = flag_field(None, "static fp16 loss scale (None: dynamic)")
    initial_loss_scale: float = flag_field(2.0**32, "first dynamic loss scale")
    min_loss_scale: float = flag_field(1.0, "floor of the dynamic loss scale")
    loss_scale_window: int = flag_field(1000, "clean steps before the dynamic scale doubles")
    hysteresis: int = flag_field(2, "overflows tolerated before the dynamic scale halves")

    def __post_init__(self) -> None:
        if self.bf16 and self.fp16:
            raise ConfigError("--bf16 and --fp16 are both set; choose one")
        # The scalers own the rules on their numbers; building them checks every flag once.
        if self.loss_scale is not None:
            ConstantLossScaler(self.loss_scale)
        DynamicLossScaler(initial_scale=self.initial_loss_scale, min_scale=self.min_loss_scale,
                          growth_interval=self.loss_scale_window, hysteresis=self.hysteresis)

    @property
    def params_dtype(self) -> str:
        """The model's parameter dtype these flags ask for (ModelConfig's spelling)."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "fp32"

    def make_loss_scaler(self) -> ConstantLossScaler | DynamicLossScaler | None:
        """fp16's scaler (static with --loss-scale, else dynamic); None for bf16 and fp32."""
        return make_loss_scaler(fp16=self.fp16, loss_scale=self.loss_scale, initial_loss_scale=self.initial_loss_scale,
                                min_loss_scale=self.min_loss_scale, loss_scale_window=self.loss_scale_window,
                                hysteresis=self.hysteresis)


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and the learning-rate schedule (group "optimizer and learning rate")."""

    optimizer: str = flag_field("adam", "adam is AdamW (decoupled weight decay), as Megatron's adam",
                                OPTIMIZER_NAMES)
    lr: float = flag_field(1e-4, "peak learning rate")
    min_lr: float = flag_field(0.0, "learning rate at the end of the decay")
    weight_decay: float = flag_field(0.01, "decoupled weight decay (not on biases and norms)")
    adam_beta1: float = flag_field(0.9, "Adam beta1")
    adam_beta2: float = flag_field(0.999, "Adam beta2")
    adam_eps: float = flag_field(1e-8, "Adam epsilon")
    sgd_momentum: float = flag_field(0.9, "SGD momentum")
    clip_grad: float = flag_field(1.0, "clip the global gradient norm to this (0: off)")
    lr_warmup_iters: int = flag_field(0, "linear warm-up iterations")
    lr_warmup_fraction: float | None = flag_field(None, "warm-up as a fraction of the decay iterations")
    lr_warmup_init: float = flag_field(0.0, "learning rate at the start of the warm-up")
    lr_decay_style: str = flag_field("linear", "decay after the warm-up", LR_DECAY_STYLES)
    lr_decay_iters: int | None = flag_field(None, "iterations until --min-lr (None: --train-iters)")
    lr_wsd_decay_iters: int | None = flag_field(None, "WSD: length of the final anneal")
    lr_wsd_decay_style: str = flag_field("exponential", "WSD: shape of the final anneal", LR_WSD_DECAY_STYLES)

    def __post_init__(self) -> None:
        _check_choice(self, "optimizer", OPTIMIZER_NAMES)
        _check_range(self, "weight_decay", 0.0)
        _check_range(self, "adam_beta1", 0.0, 1.0)
        _check_range(self, "adam_beta2", 0.0, 1.0)
        _check_range(self, "adam_eps", 0.0, open_low=True)
        _check_range(self, "sgd_momentum", 0.0)
        _check_range(self, "clip_grad", 0.0)

    def lr_schedule(self, train_iters: int) -> LRSchedule:
        """The learning rate of every step; raises if the schedule does not fit `train_iters`."""
        return LRSchedule(lr=self.lr, train_iters=train_iters, min_lr=self.min_lr,
                          lr_warmup_iters=self.lr_warmup_iters, lr_warmup_fraction=self.lr_warmup_fraction,
                          lr_warmup_init=self.lr_warmup_init, lr_decay_style=self.lr_decay_style,
                          lr_decay_iters=self.lr_decay_iters, lr_wsd_decay_iters=self.lr_wsd_decay_iters,
                          lr_wsd_decay_style=self.lr_wsd_decay_style)


@dataclass(frozen=True)
class TrainingConfig:
    """What to train, for how long, on which batches (group "training")."""

    model: str = flag_field("gpt", f"a built-in model ({', '.join(BUILTIN_MODELS)}), module.path:ATTRIBUTE naming a "
                            "ModelSpec, or an entry point of the group megalith.models (docs/custom_models.md)")
    train_iters: int = flag_field(100, "optimizer steps")
    micro_batch_size: int = flag_field(1, "sequences per micro-batch")
    global_batch_size: int | None = flag_field(None, "sequences per step (None: micro-batch size x dp)")
    seed: int = flag_field(1234, "seed of initialisation, data and dropout")
    eval_interval: int = flag_field(1000, "iterations between evaluations")
    eval_iters: int = flag_field(100, "batches per evaluation (0: none)")
    log_interval: int = flag_field(100, "iterations between log lines")

    def __post_init__(self) -> None:
        get_model_spec(self.model)
        for name in ("train_iters", "micro_batch_size", "eval_interval", "log_interval"):
            _check_int(self, name, 1)
        _check_int(self, "global_batch_size", 1, optional=True)
        _check_int(self, "eval_iters", 0)
        _check_int(self, "seed", 0)


@dataclass(frozen=True)
class DataConfig:
    """Where the tokens come from (group "data and tokenizer"); Megatron's flags and meanings."""

    data_path: tuple[str, ...] | None = flag_field(
        None, "indexed datasets (PREFIX of PREFIX.bin/.idx), optionally weighted: [W1] PREFIX1 [W2 PREFIX2 ...]")
    split: str = flag_field("969,30,1", "train,valid,test proportions of each dataset's documents")
    data_cache_path: str | None = flag_field(
        None, "where the sample indices are cached (None: a cache folder beside each dataset)")
    mock_data: bool = flag_field(False, "train on synthetic batches from the model's registry entry")
    tokenizer_type: str | None = flag_field(None, "tokenizer of the datasets (needed with --data-path)",
                                            TOKENIZER_TYPES)
    tokenizer_model: str | None = flag_field(None, "SentencePiece .model file, or a HuggingFace tokenizer directory")
    vocab_file: str | None = flag_field(None, "GPT-2 BPE vocab.json")
    merge_file: str | None = flag_field(None, "GPT-2 BPE merges.txt")
    vocab_extra_ids: int = flag_field(0, "T5 sentinel tokens added to the vocabulary")
    eod_mask_loss: bool = flag_field(False, "no loss on the end-of-document token's position")
    reset_position_ids: bool = flag_field(False, "positions restart after each end-of-document token")
    reset_attention_mask: bool = flag_field(False, "no attention across end-of-document tokens")
    mask_prob: float = flag_field(0.15, "BERT, T5: share of a sample's tokens masked (BERT) or corrupted in spans (T5)")
    short_seq_prob: float = flag_field(0.1, "BERT, T5: probability that a sample is cut to a random shorter length")

    def __post_init__(self) -> None:
        _check_choice(self, "tokenizer_type", TOKENIZER_TYPES)
        _check_int(self, "vocab_extra_ids", 0)
        _check_range(self, "mask_prob", 0.0, 1.0, open_low=True)
        _check_range(self, "short_seq_prob", 0.0, 1.0, open_high=False)
        if self.mock_data and self.data_path:
            raise ConfigError("--mock-data and --data-path are both given; drop one (mock data is synthetic, "
                              "--data-path reads datasets)")
        if not self.mock_data and not self.data_path:
            raise ConfigError("no training data: give --data-path PREFIX (a .bin/.idx pair from megalith preprocess, "
                              "with --tokenizer-type) or --mock-data for synthetic batches")
        if self.data_path and self.tokenizer_type is None:
            raise ConfigError("--data-path needs --tokenizer-type (and its files, e.g. --tokenizer-model) to know the "
                              "vocabulary and the end-of-document token")


@dataclass(frozen=True)
class CheckpointConfig:
    """Saving, loading and leaving a run (group "checkpointing"); Megatron's flags and directory layout."""

    save: str | None = flag_field(None, "write checkpoints here (DIR/iter_0000100/, DIR/latest_checkpointed_iteration.txt)")
    save_interval: int | None = flag_field(None, "iterations between checkpoints (None: only on exit)")
    load: str | None = flag_field(None, "resume from the newest checkpoint here (any layout; none yet: start fresh)")
    no_load_optim: bool = flag_field(False, "load weights, schedule position and data position, not the optimizer")
    no_load_rng: bool = flag_field(False, "keep this run's random states")
    finetune: bool = flag_field(False, "load the weights only and start at iteration 0")
    override_opt_param_scheduler: bool = flag_field(
        False, "keep this run's LR schedule flags instead of refusing ones that differ from the checkpoint's")
    exit_signal_handler: bool = flag_field(False, "on SIGTERM save a checkpoint and exit with status 0")
    exit_interval: int | None = flag_field(None, "save and exit when the iteration is a multiple of this")
    exit_duration_in_mins: float | None = flag_field(None, "save and exit after this many minutes of training")

    def __post_init__(self) -> None:
        _check_int(self, "save_interval", 1, optional=True)
        _check_int(self, "exit_interval", 1, optional=True)
        _check_range(self, "exit_duration_in_mins", 0, open_low=True, optional=True)
        if self.save_interval is not None and self.save is None:
            raise ConfigError(f"--save-interval {self.save_interval} needs --save DIR (where to write checkpoints)")
        if self.exit_signal_handler and self.save is None:
            raise ConfigError("--exit-signal-handler saves a checkpoint on SIGTERM; give --save DIR")


@dataclass(frozen=True)
class LoggingConfig:
    """Where metrics go besides the log line (group "logging")."""

    log_json: str | None = flag_field(None, "append one JSON record per log interval to this file")
    tensorboard_dir: str | None = flag_field(None, "write TensorBoard scalars here")
    wandb_project: str | None = flag_field(None, "log to this Weights & Biases project")
    wandb_exp_name: str | None = flag_field(None, "Weights & Biases run name")
    wandb_save_dir: str | None = flag_field(None, "Weights & Biases local directory")
    timing_log_level: int = flag_field(0, "0: none; 1 and 2: the last rank's forward-backward (with the gradient reduction) and optimizer times per iteration",
                                       TIMING_LOG_LEVELS)
    log_progress_bar: bool | None = flag_field(None, "tqdm progress bar (None: when stdout is a terminal)")

    def __post_init__(self) -> None:
        _check_choice(self, "timing_log_level", TIMING_LOG_LEVELS)
        if self.wandb_project and not self.wandb_exp_name:  # before any process starts, not at the first log
            raise ConfigError(f"--wandb-project {self.wandb_project} needs --wandb-exp-name; add --wandb-exp-name "
                              "NAME for the run")


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
DERIVED = ("world_size", "data_parallel_size", "virtual_pipeline_size", "num_micro_batches", "global_batch_size",
           "pipeline_schedule", "ddp_bucket_size", "distributed_backend")


def default_schedule(pp: int, vpp: int) -> str:
    """Megatron's choice: no pipelining on one stage, 1F1B, interleaved 1F1B with virtual stages."""
    if pp == 1:
        return "no-pipelining"
    return "1f1b" if vpp == 1 else "interleaved-1f1b"


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a `megalith pretrain` run needs, checked as a whole; derived values filled in.

    Construction resolves what Megatron resolves: --sequence-parallel is turned off at tp 1,
    gradients accumulate in fp32 under --bf16, --loss-scale is dropped without --fp16, and the
    model's params_dtype follows --bf16 / --fp16. Each such change adds a line to `notices`
    (the last rank, which prints the log, prints them once).
    """

    model: ModelConfig
    distributed: DistributedConfig
    precision: PrecisionConfig
    optimizer: OptimizerConfig
    training: TrainingConfig
    data: DataConfig
    checkpointing: CheckpointConfig
    logging: LoggingConfig
    world_size: int
    data_parallel_size: int = field(init=False)
    virtual_pipeline_size: int = field(init=False)  # 1 without interleaving
    num_micro_batches: int = field(init=False)  # per data-parallel rank and step
    global_batch_size: int = field(init=False)
    pipeline_schedule: str = field(init=False)
    ddp_bucket_size: int = field(init=False)
    distributed_backend: str = field(init=False)
    notices: tuple[str, ...] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        notices: list[str] = []
        if isinstance(self.world_size, bool) or not isinstance(self.world_size, int) or self.world_size < 1:
            raise ConfigError(f"world size must be a positive integer, got {self.world_size!r}; launch >= 1 process")
        dp = self._data_parallel_size()
        self._resolve_sections(notices)
        dist, model, training = self.distributed, self.model, self.training
        tp, pp = dist.tensor_model_parallel_size, dist.pipeline_model_parallel_size
        model.check_parallel(ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                            context_parallel_size=dist.context_parallel_size,
                                            sequence_parallel=dist.sequence_parallel))
        vpp = self._virtual_pipeline_size()
        get_model_spec(training.model).check_virtual_pipeline(vpp)
        split_layers(model.num_layers, pp, vpp, dist.decoder_first_pipeline_num_layers,
                     dist.decoder_last_pipeline_num_layers)
        batch = BatchPlan(training.global_batch_size or training.micro_batch_size * dp, training.micro_batch_size, dp)
        schedule = self._schedule(pp, vpp, batch)
        self.optimizer.lr_schedule(training.train_iters)  # checks warm-up, decay and WSD against the run
        derived = dict(data_parallel_size=dp, virtual_pipeline_size=vpp, num_micro_batches=batch.num_micro_batches,
                       global_batch_size=batch.global_batch_size, pipeline_schedule=schedule,
                       ddp_bucket_size=dist.ddp_bucket_size or default_bucket_size(dp),
                       distributed_backend=check_backend(dist.distributed_backend or default_backend()),
                       notices=tuple(notices))
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    def _data_parallel_size(self) -> int:
        dist = self.distributed
        sizes = (dist.tensor_model_parallel_size, dist.pipeline_model_parallel_size, dist.context_parallel_size)
        model_parallel = sizes[0] * sizes[1] * sizes[2]
        if self.world_size % model_parallel != 0:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by --tensor-model-parallel-size {sizes[0]} x "
                f"--pipeline-model-parallel-size {sizes[1]} x --context-parallel-size {sizes[2]} = {model_parallel}; "
                f"launch a multiple of {model_parallel} processes or choose sizes whose product divides {self.world_size}"
            )
        return self.world_size // model_parallel

    def _resolve_sections(self, notices: list[str]) -> None:
        """Megatron's silent adjustments, made here with a notice each."""
        dist, precision = self.distributed, self.precision
        model = get_model_spec(self.training.model).resolved(self.model)
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
            if model.params_dtype != "fp32":  # fp32 is the default, which the precision flags replace
                given = f"--{wanted}" if wanted != "fp32" else "fp32 (neither --bf16 nor --fp16)"
                raise ConfigError(f"--params-dtype {model.params_dtype} contradicts {given}; drop --params-dtype "
                                  "(it follows --bf16 / --fp16)")
            model = replace(model, params_dtype=wanted)
        for name, value in (("distributed", dist), ("precision", precision), ("model", model)):
            object.__setattr__(self, name, value)

    def _virtual_pipeline_size(self) -> int:
        dist, num_layers = self.distributed, self.model.num_layers
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

    def _schedule(self, pp: int, vpp: int, batch: BatchPlan) -> str:
        given = self.distributed.pipeline_schedule
        schedule = given or default_schedule(pp, vpp)
        if schedule == "interleaved-1f1b" and pp > 1:
            check_interleaved_micro_batches(batch.num_micro_batches, pp, micro_batch_size=batch.micro_batch_size,
                                            data_parallel_size=batch.data_parallel_size)
        try:
            validate_schedule_args(schedule, pp, vpp, batch.num_micro_batches)
        except ConfigError as error:
            raise ConfigError(f"--pipeline-schedule {schedule}: {error}") from None
        return schedule

    def parallel_config(self) -> ParallelConfig:
        dist = self.distributed
        return ParallelConfig(tensor_model_parallel_size=dist.tensor_model_parallel_size,
                              pipeline_model_parallel_size=dist.pipeline_model_parallel_size,
                              context_parallel_size=dist.context_parallel_size,
                              data_parallel_size=self.data_parallel_size, sequence_parallel=dist.sequence_parallel)

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
        out["derived"] = {name: getattr(self, name) for name in DERIVED}
        return out


def section_fields() -> dict[str, tuple[str, object]]:
    """Every flag's dest -> (section name, dataclass field), across all sections."""
    return {f.name: (section, f) for section, cls in SECTIONS.items() for f in fields(cls)}
