"""Accepted Megatron flags (case c): GPU-only tuning knobs and log-only switches that change no
number megalith computes. Each is parsed and ignored, with one notice line; `note` says why."""

from __future__ import annotations

from megalith.config.megatron.records import flag

_FUSION = "nothing: megalith has no such fused kernel; the unfused math is the same"
_CUDA = "nothing: a CUDA / NCCL performance setting; results are the same"
_TP_OVERLAP = "nothing: Transformer Engine's userbuffer overlap of tp communication with GEMMs (GPU only)"
_GRAPHS = "nothing: megalith does not capture CUDA graphs; results are the same"
_TIMING = "nothing: changes when communication is issued, not what it computes"
_LOG = "nothing: megalith does not log this"
_TELEMETRY = "nothing: NVIDIA-internal telemetry"
_STRAGGLER = "nothing: megalith has no straggler detector (step times are in the log line)"
_DEPRECATED = "nothing: Megatron ignores it too"
_CKPT = "nothing: megalith writes and reads its own reshardable format, synchronously"

ACCEPTED = (
    # Fusions without a kernel in megalith: the same math, unfused here (the others are model flags).
    flag("--no-gradient-accumulation-fusion", "false", True, "no fused weight-gradient accumulation in the "
         "linear layers' backward", _FUSION),
    # Model implementation switches that megalith has one answer to.
    flag("--use-mcore-models", "true", False, "use Megatron-Core models (Megatron's default; deprecated)",
         "nothing: megalith has one model implementation"),
    flag("--no-async-tensor-model-parallel-allreduce", "false", True, "deprecated; Megatron ignores it", _DEPRECATED),
    flag("--no-query-key-layer-scaling", "false", True, "older Megatron: turn off Q.K layer-number scaling",
         "nothing: megalith never scales Q.K by the layer number"),
    flag("--fp8-interval", "int", 1, "deprecated fp8 scaling interval; Megatron ignores it", _DEPRECATED),
    flag("--use-cpu-initialization", "true", None, "initialise weights on the CPU, the same for every tp",
         "nothing: megalith initialises every layout identically already"),
    flag("--no-initialization", "false", True, "skip weight initialisation when a checkpoint will be loaded",
         "nothing: megalith always initialises (a loaded checkpoint overwrites it)"),
    flag("--no-clone-scatter-output-in-embedding", "false", True, "do not clone the embedding's scattered "
         "output", "nothing: a memory-release detail"),
    flag("--distribute-saved-activations", "true", False, "split recomputed layers' saved inputs over tp",
         "nothing: saved activations stay whole on each tp rank (same results, more memory)"),
    flag("--distribute-checkpointed-activations", "true", False, "older name of --distribute-saved-activations",
         "nothing: saved activations stay whole on each tp rank (same results, more memory)"),
    flag("--no-check-for-nan-in-loss-and-grad", "false", True, "do not stop when the loss or gradients are NaN",
         "nothing: megalith does not stop on NaN; a non-finite step is skipped and counted in the log line"),
    flag("--check-weight-hash-across-dp-replicas-interval", "int", None, "compare weight hashes of dp replicas "
         "every N iterations", "nothing: megalith does not hash weights (megalith verify proves dp exact)"),
    flag("--use-pytorch-profiler", "true", False, "--profile with torch.profiler instead of nsys",
         "nothing: megalith's --profile always uses torch.profiler"),
    flag("--no-create-attention-mask-in-dataloader", "false", True, "the data loader builds no attention mask",
         "nothing: megalith's masks are built in the model"),
    flag("--num-dataset-builder-threads", "int", 1, "threads that build the dataset indices",
         "nothing: one thread builds them; the indices are the same"),
    flag("--data-impl", "str", "infer", "older Megatron: dataset reader (mmap, lazy, cached, infer)",
         "nothing: megalith reads the indexed .bin/.idx format"),
    flag("--mmap-warmup", "true", False, "older Megatron: touch the memory-mapped data at start",
         "nothing: a start-up timing detail"),
    flag("--tiktoken-pattern", "str", None, "TikTokenizer's split pattern: v1 or v2",
         "nothing: applies to TikTokenizer, which megalith's --tokenizer-type does not offer"),
    flag("--tiktoken-num-special-tokens", "int", 1000, "TikTokenizer's special-token count",
         "nothing: applies to TikTokenizer, which megalith's --tokenizer-type does not offer"),
    flag("--tiktoken-special-tokens", "str+", None, "TikTokenizer's special tokens",
         "nothing: applies to TikTokenizer, which megalith's --tokenizer-type does not offer"),
    flag(("--DDP-impl", "--ddp-impl"), "str", "local", "older Megatron: local or torch data parallelism",
         "nothing: megalith has one data-parallel implementation"),
    flag("--use-contiguous-buffers-in-local-ddp", "true", False, "older Megatron: gradients in one buffer",
         "nothing: a memory-layout detail"),
    flag("--no-contiguous-buffers-in-local-ddp", "false", True, "older Megatron: no contiguous gradient buffer",
         "nothing: a memory-layout detail"),
    # Communication timing and devices.
    flag("--tp-comm-overlap", "true", False, "overlap tp communication with GEMMs (Transformer Engine)", _TP_OVERLAP),
    flag("--tp-comm-overlap-cfg", "str", None, "config file of that overlap", _TP_OVERLAP),
    flag("--disable-tp-comm-overlap-ag", "false", True, "no all-gather overlap", _TP_OVERLAP),
    flag("--disable-tp-comm-overlap-rs", "false", True, "no reduce-scatter overlap", _TP_OVERLAP),
    flag("--tp-comm-overlap-rs-dgrad", "true", False, "reduce-scatter overlap with the dgrad GEMM", _TP_OVERLAP),
    flag("--disable-tp-comm-bulk-dgrad", "false", True, "no bulk all-gather overlap in dgrad", _TP_OVERLAP),
    flag("--disable-tp-comm-bulk-wgrad", "false", True, "no bulk reduce-scatter overlap in wgrad", _TP_OVERLAP),
    flag("--disable-tp-comm-split-ag", "false", True, "no split all-gather overlap in fprop", _TP_OVERLAP),
    flag("--disable-tp-comm-split-rs", "false", True, "no split reduce-scatter overlap in fprop", _TP_OVERLAP),
    flag("--tp-comm-bootstrap-backend", "str", "nccl", "bootstrap backend of the userbuffers", _TP_OVERLAP),
    flag("--no-overlap-p2p-communication", "false", True, "no overlap of pipeline sends with compute", _TIMING),
    flag("--overlap-p2p-communication-warmup-flush", "true", False, "overlap pipeline sends in warm-up and flush",
         _TIMING),
    flag("--no-align-grad-reduce", "false", True, "each stage launches its gradient reduction alone", _TIMING),
    flag("--no-align-param-gather", "false", True, "each stage launches its parameter all-gather alone", _TIMING),
    flag("--overlap-param-gather-with-optimizer-step", "true", False, "start the first bucket's all-gather "
         "with the optimizer step", _TIMING),
    flag("--no-scatter-gather-tensors-in-pipeline", "false", True, "send whole tensors between stages", _TIMING),
    flag("--use-ring-exchange-p2p", "true", False, "custom ring-exchange p2p kernels", _CUDA),
    flag("--ddp-pad-buckets-for-high-nccl-busbw", "true", False, "pad buckets for NCCL bandwidth", _CUDA),
    flag("--use-nccl-ub", "true", False, "NCCL userbuffer registration", _CUDA),
    flag("--disable-symmetric-registration", "true", False, "local instead of symmetric NCCL registration", _CUDA),
    flag("--use-sharp", "true", False, "InfiniBand SHARP", _CUDA),
    flag("--sharp-enabled-group", "str", None, "group that uses SHARP: dp or dp_replica", _CUDA),
    flag("--nccl-communicator-config-path", "str", None, "YAML of NCCL communicator settings", _CUDA),
    flag("--high-priority-stream-groups", "str*", [], "groups on high-priority CUDA streams", _CUDA),
    flag("--pipeline-model-parallel-comm-backend", "str", None, "backend of pipeline p2p: nccl or ucc", _CUDA),
    flag("--no-pin-cpu-grads", "false", True, "no pinned CPU memory for offloaded gradients", _CUDA),
    flag("--no-pin-cpu-params", "false", True, "no pinned CPU memory for offloaded parameters", _CUDA),
    flag("--record-memory-history", "true", False, "record the CUDA allocator's history", _CUDA),
    flag("--memory-snapshot-path", "str", "snapshot.pickle", "where that history is written", _CUDA),
    flag("--train-sync-interval", "int", None, "iterations between CPU-GPU synchronisations", _CUDA),
    flag("--disable-gloo-process-groups", "false", True, "no Gloo side groups beside NCCL",
         "nothing: a process-group detail with no effect on results"),
    flag("--distributed-timeout-seconds-after-init", "int", None, "collective timeout after start-up",
         "nothing: megalith keeps --distributed-timeout-minutes throughout"),
    flag("--local-rank", "int", None, "local rank from the launcher (Megatron's default: LOCAL_RANK)",
         "nothing: megalith reads LOCAL_RANK from the environment"),
    flag("--enable-cuda-graph", "true", False, "deprecated: local CUDA graphs", _GRAPHS),
    flag("--external-cuda-graph", "true", False, "deprecated: Transformer Engine CUDA graphs", _GRAPHS),
    flag("--cuda-graph-impl", "str", "none", "CUDA graph capture: none, local or transformer_engine", _GRAPHS),
    flag("--cuda-graph-scope", "str", "full", "what a CUDA graph captures: full, attn or full_iteration", _GRAPHS),
    flag("--cuda-graph-warmup-steps", "int", 3, "warm-up steps before capture", _GRAPHS),
    flag("--disable-msc", "false", True, "no Multi-Storage Client", "nothing: megalith has no Multi-Storage Client"),
    # Checkpoint-writing details of Megatron's own formats.
    flag("--use-dist-ckpt", "true", False, "deprecated; --ckpt-format chooses", _DEPRECATED),
    flag("--dist-ckpt-format", "str", None, "deprecated; --ckpt-format chooses", _DEPRECATED),
    flag("--ckpt-fully-parallel-save", "true", False, "deprecated; parallel save is Megatron's default", _DEPRECATED),
    flag("--no-ckpt-fully-parallel-save", "false", True, "save without spreading the work over dp", _CKPT),
    flag("--ckpt-fully-parallel-load", "true", False, "spread the load over dp", _CKPT),
    flag("--ckpt-assume-constant-structure", "true", False, "cache the checkpoint structure between saves", _CKPT),
    flag("--async-save", "true", None, "save in the background", _CKPT),
    flag("--use-persistent-ckpt-worker", "true", False, "a persistent worker for background saves", _CKPT),
    flag("--auto-detect-ckpt-format", "true", False, "detect legacy or distributed format at load", _CKPT),
    flag("--dist-ckpt-save-pre-mcore-014", "true", False, "write the torch_dist layout before Megatron-Core 0.14",
         _CKPT),
    flag("--dist-ckpt-optim-fully-reshardable", "true", False, "optimizer checkpoints reshardable over all axes",
         "nothing: megalith's checkpoints reshard over every layout already"),
    flag("--distrib-optim-fully-reshardable-mem-efficient", "true", False, "lower-memory reshardable optimizer "
         "checkpoints", _CKPT),
    # Logging, telemetry and monitors.
    flag("--log-params-norm", "true", False, "log the norm of the parameters", _LOG),
    flag("--log-num-zeros-in-grad", "true", False, "log the number of zero gradients", _LOG),
    flag("--log-progress", "true", False, "write tokens and FLOPs so far to progress.txt", _LOG),
    flag("--log-energy", "true", False, "log GPU energy in joules", _LOG),
    flag("--no-barrier-with-level-1-timing", "false", True, "level-1 timers without a barrier", _LOG),
    flag("--timing-log-option", "str", "minmax", "timers across ranks: max, minmax or all",
         "nothing: megalith reports the last rank's times"),
    flag("--tensorboard-queue-size", "int", 1000, "TensorBoard events queued before a flush", _LOG),
    flag("--no-log-loss-scale-to-tensorboard", "false", True, "no loss scale in TensorBoard", _LOG),
    flag("--log-world-size-to-tensorboard", "true", False, "world size in TensorBoard", _LOG),
    flag("--log-batch-size-to-tensorboard", "true", False, "older Megatron: batch size in TensorBoard", _LOG),
    flag("--no-log-learnig-rate-to-tensorboard", "false", True, "older Megatron (its spelling): no learning rate "
         "in TensorBoard", _LOG),
    flag("--wandb-entity", "str", "", "W&B entity (team) of the run",
         "nothing: W&B uses your default entity (set WANDB_ENTITY to choose one)"),
    flag("--logging-level", "int", None, "Python logging level", "nothing: megalith's log lines are fixed"),
    flag("--config-logger-dir", "str", "", "dump every config object to this directory",
         "nothing: megalith writes the resolved config.yaml beside its logs"),
    flag("--run-workload-inspector-server", "true", False, "a server for on-demand profiling", _LOG),
    flag("--no-one-logger", "false", True, "no one-logger telemetry", _TELEMETRY),
    flag("--one-logger-project", "str", "megatron-lm", "one-logger project", _TELEMETRY),
    flag("--one-logger-run-name", "str", None, "one-logger run name", _TELEMETRY),
    flag("--one-logger-async", "true", False, "one-logger in async mode", _TELEMETRY),
    flag("--app-tag-run-name", "str", None, "telemetry name shared by the jobs of one run", _TELEMETRY),
    flag("--app-tag-run-version", "str", "0.0.0", "telemetry version of the run", _TELEMETRY),
    flag("--log-straggler", "true", False, "track slow GPUs", _STRAGGLER),
    flag("--disable-straggler-on-startup", "true", False, "straggler detector off at start", _STRAGGLER),
    flag("--straggler-ctrlr-port", "int", 65535, "port that toggles the straggler detector", _STRAGGLER),
    flag("--straggler-minmax-count", "int", 1, "ranks reported as fastest and slowest", _STRAGGLER),
)
