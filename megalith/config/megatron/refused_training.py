"""Refused Megatron flags of training, checkpointing, data and distribution: ZeRO-2/3 (issue 20),
context parallelism (issue 22), fault tolerance (issue 23), zero-bubble pipelines (issue 18),
flags Megatron itself rejects now, and options megalith does not plan."""

from __future__ import annotations

from megalith.config.megatron.records import (CONTEXT_PARALLEL, FAULT_TOLERANCE, KERNELS, ZERO, ZERO_BUBBLE, flag,
                                              not_planned, removed)

_OFFLOAD = not_planned("CPU offloading (optimizer state, activations)")
_OPTION = not_planned("this training option")
_CKPT = not_planned("this checkpointing option")
_DATA = not_planned("this data option")
_PIPE = not_planned("this pipeline split (use --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers)")
_EVAL = not_planned("this validation mode")

ZERO_FLAGS = (
    flag("--use-megatron-fsdp", "true", False, "Megatron's FSDP code path", ZERO),
    flag("--init-model-with-meta-device", "true", False, "build the model on the meta device (FSDP)", ZERO),
    flag("--no-gradient-reduce-div-fusion", "false", True, "FSDP: divide gradients after the reduction", ZERO),
    flag("--fsdp-double-buffer", "true", False, "FSDP: double-buffered communication memory", ZERO),
    flag("--suggested-communication-unit-size", "int", None, "FSDP: elements per communication", ZERO),
    flag("--keep-fp8-transpose-cache", "true", False, "FSDP: keep the fp8 transpose cache", ZERO),
    flag("--enable-full-sharding-in-hsdp", "true", False, "FSDP: full sharding in hybrid sharded mode", ZERO),
    flag("--num-distributed-optimizer-instances", "int", 1, "copies of the distributed optimizer over dp", ZERO),
    flag("--use-torch-fsdp2", "true", False, "PyTorch FSDP2", ZERO),
    flag("--torch-fsdp2-no-reshard-after-forward", "false", True, "FSDP2 keeps weights gathered after forward "
         "(ZeRO-2)", ZERO),
    flag("--no-strict-fsdp-dtensor-load", "false", True, "non-strict load of fsdp_dtensor checkpoints", ZERO),
)

CONTEXT_PARALLEL_FLAGS = (
    flag("--cp-comm-type", "str+", ["p2p"], "context-parallel attention exchange: p2p, a2a, allgather, a2a+p2p "
         "(one, or one per layer)", CONTEXT_PARALLEL),
    flag("--hierarchical-context-parallel-sizes", "int+", None, "levels of hierarchical context parallelism",
         CONTEXT_PARALLEL),
)

FAULT_TOLERANCE_FLAGS = (
    flag("--enable-ft-package", "true", False, "NVIDIA's fault-tolerance package", FAULT_TOLERANCE),
    flag("--calc-ft-timeouts", "true", False, "let that package compute its timeouts", FAULT_TOLERANCE),
    flag("--inprocess-restart", "true", False, "restart inside the process after a failure", FAULT_TOLERANCE),
    flag("--inprocess-max-iterations", "int", None, "most in-process restarts", FAULT_TOLERANCE),
    flag("--inprocess-monitor-thread-interval", "float", 1.0, "seconds between monitor-thread checks", FAULT_TOLERANCE),
    flag("--inprocess-monitor-process-interval", "float", 1.0, "seconds between monitor-process checks",
         FAULT_TOLERANCE),
    flag("--inprocess-progress-watchdog-interval", "float", 1.0, "seconds between progress stamps", FAULT_TOLERANCE),
    flag("--inprocess-heartbeat-interval", "float", 30, "seconds between heartbeats", FAULT_TOLERANCE),
    flag("--inprocess-soft-timeout", "float", 60, "soft progress timeout in seconds", FAULT_TOLERANCE),
    flag("--inprocess-hard-timeout", "float", 90, "hard progress timeout in seconds", FAULT_TOLERANCE),
    flag("--inprocess-heartbeat-timeout", "float", 60, "seconds before a silent rank counts as lost", FAULT_TOLERANCE),
    flag("--inprocess-barrier-timeout", "float", 120, "timeout of the internal barrier", FAULT_TOLERANCE),
    flag("--inprocess-completion-timeout", "float", 120, "timeout of the completion barrier", FAULT_TOLERANCE),
    flag("--inprocess-last-call-wait", "float", 1, "seconds to gather concurrent failures", FAULT_TOLERANCE),
    flag("--inprocess-termination-grace-time", "float", 1, "seconds between SIGTERM and SIGKILL", FAULT_TOLERANCE),
    flag("--inprocess-granularity", "str", "node", "what restarts: node or rank", FAULT_TOLERANCE),
    flag("--inprocess-active-world-size", "int", None, "ranks that start working, the rest in reserve "
         "(Megatron's default: WORLD_SIZE)", FAULT_TOLERANCE),
    flag("--inprocess-empty-cuda-cache", "true", False, "empty the CUDA cache on each restart", FAULT_TOLERANCE),
    flag("--error-injection-rate", "int", 0, "inject a wrong result every N validations", FAULT_TOLERANCE),
    flag("--error-injection-type", "str", "transient_error", "kind of injected error", FAULT_TOLERANCE),
    flag("--rerun-mode", "str", "validate_results", "rerun engine: disabled, validate_results or report_stats "
         "(megalith behaves as disabled)", FAULT_TOLERANCE, ("disabled",)),
    flag("--check-for-spiky-loss", "true", False, "rerun the step when the loss spikes", FAULT_TOLERANCE),
    flag("--check-for-large-grads", "true", False, "rerun the step when gradients are unexpectedly large",
         FAULT_TOLERANCE),
    flag("--iterations-to-skip", "int+", [], "iterations whose batches are skipped", FAULT_TOLERANCE),
    flag("--result-rejected-tracker-filename", "str", None, "file of rejected-result events", FAULT_TOLERANCE),
    flag("--decrease-batch-size-if-needed", "true", False, "shrink the global batch when fewer dp ranks "
         "remain", FAULT_TOLERANCE),
    flag("--non-persistent-save-interval", "int", None, "iterations between non-persistent checkpoints",
         FAULT_TOLERANCE),
    flag("--non-persistent-ckpt-type", "str", None, "non-persistent checkpoints: global, local or in_memory",
         FAULT_TOLERANCE),
    flag("--non-persistent-global-ckpt-dir", "str", None, "directory of global non-persistent checkpoints",
         FAULT_TOLERANCE),
    flag("--non-persistent-local-ckpt-dir", "str", None, "directory of local non-persistent checkpoints",
         FAULT_TOLERANCE),
    flag("--non-persistent-local-ckpt-algo", "str", "fully_parallel", "algorithm of local checkpoints",
         FAULT_TOLERANCE),
    flag("--replication", "true", False, "replicate local checkpoints on other ranks", FAULT_TOLERANCE),
    flag("--replication-jump", "int", None, "rank spacing of the replicas", FAULT_TOLERANCE),
    flag("--replication-factor", "int", 2, "machines holding each replica", FAULT_TOLERANCE),
    flag("--adlr-autoresume", "true", False, "ADLR cluster autoresume", FAULT_TOLERANCE),
    flag("--adlr-autoresume-interval", "int", 1000, "iterations between autoresume checks", FAULT_TOLERANCE),
)

PIPELINE_FLAGS = (
    flag("--defer-embedding-wgrad-compute", "true", False, "compute the output layer's weight gradient at the "
         "pipeline flush", ZERO_BUBBLE),
    flag("--wgrad-deferral-limit", "int", 0, "micro-batches whose output-layer weight gradient is deferred "
         "(0: all)", ZERO_BUBBLE),
    flag("--pipeline-model-parallel-layout", "str", None, "explicit layer layout of the pipeline stages", _PIPE),
    flag("--account-for-embedding-in-pipeline-split", "true", False, "count the embedding as a layer when "
         "splitting", _PIPE),
    flag("--account-for-loss-in-pipeline-split", "true", False, "count the loss as a layer when splitting", _PIPE),
    flag("--standalone-embedding-stage", "true", False, "older Megatron: the embedding alone on the first stage",
         _PIPE),
    flag("--num-virtual-stages-per-pipeline-rank", "int", None, "virtual pipeline stages per rank (vpp)",
         not_planned("this spelling of vpp (use --num-layers-per-virtual-pipeline-stage)")),
    flag("--microbatch-group-size-per-virtual-pipeline-stage", "int", None, "consecutive micro-batches per "
         "virtual stage in the interleaved schedule (None: pp)",
         not_planned("a group size other than pp (megalith's interleaved schedule groups by pp and takes any "
                     "number of micro-batches)")),
    flag("--use-tp-pp-dp-mapping", "true", False, "rank order tp-cp-ep-pp-dp instead of tp-cp-ep-dp-pp",
         not_planned("another rank order")),
)

TRAINING_FLAGS = (
    flag("--batch-size", "int", None, "old name of the micro-batch size", removed("use --micro-batch-size")),
    flag("--warmup", "int", None, "old warm-up flag", removed("use --lr-warmup-fraction or --lr-warmup-iters")),
    flag("--model-parallel-size", "int", None, "old tensor-parallel flag", removed("use --tensor-model-parallel-size")),
    flag("--checkpoint-activations", "true", False, "old recompute flag", removed("use --recompute-activations or "
         "--recompute-granularity")),
    flag("--checkpoint-num-layers", "int", 1, "older Megatron: layers per recompute chunk",
         removed("use --recompute-num-layers")),
    flag("--activations-checkpoint-method", "str", None, "older Megatron: recompute method",
         removed("use --recompute-method")),
    flag("--recompute-modules", "str*", None, "modules selective recompute covers (None: core_attn)",
         not_planned("selective recompute of modules other than core attention"), (("core_attn",),)),
    flag("--cpu-offloading-num-layers", "int", 0, "layers whose activations go to CPU memory", _OFFLOAD),
    flag("--optimizer-cpu-offload", "true", False, "optimizer state in CPU memory", _OFFLOAD),
    flag("--optimizer-offload-fraction", "float", 1.0, "share of the optimizer state offloaded", _OFFLOAD),
    flag("--use-torch-optimizer-for-cpu-offload", "true", False, "torch.optim for the offloaded state", _OFFLOAD),
    flag("--overlap-cpu-optimizer-d2h-h2d", "true", False, "overlap the offloaded optimizer's copies", _OFFLOAD),
    flag("--dump-param-to-param-group-map", "str", None, "JSON assigning parameters to optimizer groups", _OPTION),
    flag("--deterministic-mode", "true", False, "deterministic GPU algorithms only", KERNELS),
    flag("--disable-bf16-reduced-precision-matmul", "true", False, "bf16 matmuls accumulate in full precision "
         "on CUDA", KERNELS),
    flag(("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", "--use-checkpoint-lr-"
          "scheduler"), "true", False, "take the LR schedule from the checkpoint, not the flags",
         not_planned("taking the schedule from the checkpoint (give its flags, or --override-opt-param-scheduler)")),
    flag("--ddp-num-buckets", "int", None, "number of gradient buckets", not_planned("a bucket count "
         "(use --ddp-bucket-size)")),
    flag("--ddp-reduce-scatter-with-fp32-accumulation", "true", False, "low-precision reduce-scatter that "
         "accumulates in fp32", _OPTION),
    flag("--ddp-average-in-collective", "true", False, "average inside the collective instead of scaling before "
         "it", _OPTION),
    flag("--lazy-mpu-init", "str", None, "leave process-group setup to an external manager", _OPTION),
)

CHECKPOINT_FLAGS = (
    flag("--save-retain-interval", "int", None, "keep only checkpoints at multiples of this", _CKPT),
    flag("--load-main-params-from-ckpt", "true", None, "load the fp32 main weights directly", _CKPT),
    flag("--pretrained-checkpoint", "str", None, "pretrained checkpoint to fine-tune from", not_planned(
         "a separate pretrained-checkpoint directory (use --load DIR --finetune)")),
    flag("--ckpt-step", "int", None, "iteration of the checkpoint to load", _CKPT),
    flag("--use-mp-args-from-checkpoint-args", "true", False, "take the parallel sizes from the checkpoint", _CKPT),
    flag("--no-use-tokenizer-model-from-checkpoint-args", "false", True, "keep this run's tokenizer path with "
         "--use-checkpoint-args", _CKPT),
    flag("--exit-on-missing-checkpoint", "true", False, "exit when --load finds no checkpoint", _CKPT),
    flag("--ckpt-convert-format", "str", None, "convert the checkpoint to this format", not_planned(
         "converting at load time (use megalith convert)")),
    flag("--ckpt-convert-save", "str", None, "where the converted checkpoint goes", not_planned(
         "converting at load time (use megalith convert)")),
    flag("--ckpt-convert-update-legacy-dist-opt-format", "true", False, "read the pre-2024 distributed "
         "optimizer format", _CKPT),
    flag("--dist-ckpt-strictness", "str", "assume_ok_unexpected", "what a key mismatch at load does", _CKPT),
)

DATA_FLAGS = (
    flag("--per-split-data-args-path", "str", None, "JSON of the train/valid/test data paths", _DATA),
    flag("--sample-rate", "float", 1.0, "share of the training data sampled", _DATA),
    flag("--object-storage-cache-path", "str", None, "index cache for S3 / MSC datasets", _DATA),
    flag("--mid-level-dataset-surplus", "float", 0.005, "extra samples built for blended datasets", _DATA),
    flag("--allow-ambiguous-pad-tokens", "true", False, "mask every token sharing the pad token's id", _DATA),
    flag("--padded-vocab-size", "int", None, "the padded vocabulary size itself", not_planned(
         "setting the padded size (megalith pads --vocab-size to --make-vocab-size-divisible-by x tp)")),
    flag("--tokenizer-metadata", "str", None, "JSON metadata of the tokenizer", _DATA),
    flag("--legacy-tokenizer", "true", False, "Megatron's legacy tokenizer classes", _DATA),
    flag("--trust-remote-code", "true", False, "let a Hugging Face tokenizer run its own code", _DATA),
    flag("--full-validation", "true", False, "validate on the whole validation set each time", _EVAL),
    flag("--multiple-validation-sets", "true", False, "one loss per validation dataset", _EVAL),
    flag("--test-mode", "true", False, "run Megatron's real-time tests beside training", _EVAL),
    flag("--skip-train", "true", False, "no training: only evaluate and exit", _EVAL),
)
