"""The distributed section: Megatron's flags for how a job is split and how gradients travel.

PretrainConfig resolves them, with the world size, into the one Layout value.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megalith.config.flags import flag_field
from megalith.config.validators import check_choices, check_int, check_range
from megalith.device import KNOWN_BACKENDS
from megalith.errors import ConfigError
from megalith.parallel.pipeline.schedules import SCHEDULES

# Megatron's --data-parallel-sharding-strategy names, in ZeRO stage order (index = stage)
SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")


def zero_stage(strategy: str, use_distributed_optimizer: bool) -> int:
    """The ZeRO stage of a strategy name; --use-distributed-optimizer is the alias of `optim`."""
    stage = SHARDING_STRATEGIES.index(strategy)
    return max(stage, 1) if use_distributed_optimizer else stage


@dataclass(frozen=True)
class DistributedConfig:
    """How the job is split over processes, and how gradients travel (group "distributed")."""

    tensor_model_parallel_size: int = flag_field(1, "tensor-parallel size (tp)")
    pipeline_model_parallel_size: int = flag_field(1, "pipeline-parallel size (pp)")
    num_layers_per_virtual_pipeline_stage: int | None = flag_field(
        None, "layers per virtual pipeline stage; vpp = num layers / (pp x this) (None: no interleaving)")
    context_parallel_size: int = flag_field(1, "context-parallel size (cp; only 1 is supported yet)",
                                            status="(a) for 1; larger sizes are issue 22")
    expert_model_parallel_size: int = flag_field(1, "expert-parallel size (ep): experts split over ep ranks; "
                                                 "needs --num-experts")
    expert_tensor_parallel_size: int | None = flag_field(
        None, "tensor-parallel size inside each expert (etp; None: tp); edp = world / (etp x ep x pp)")
    sequence_parallel: bool = flag_field(False, "split norms, dropout and residuals along the sequence over tp")
    decoder_first_pipeline_num_layers: int | None = flag_field(None, "layers of the first pipeline stage (None: even)")
    decoder_last_pipeline_num_layers: int | None = flag_field(None, "layers of the last pipeline stage (None: even)")
    pipeline_schedule: str | None = flag_field(
        None, "pipeline schedule (None: no-pipelining at pp 1, 1f1b, interleaved-1f1b with vpp; zb-h1: "
        "zero bubble, backward split into input and weight gradients)", SCHEDULES)
    use_distributed_optimizer: bool = flag_field(False, "shard optimizer state over data parallelism (ZeRO-1; the "
                                                 "alias of --data-parallel-sharding-strategy optim)")
    data_parallel_sharding_strategy: str = flag_field(
        "no_shard", "what is sharded over dp: no_shard, optim (ZeRO-1), optim_grads (ZeRO-2: also gradients), "
        "optim_grads_params (ZeRO-3: also parameters, gathered layer by layer)", SHARDING_STRATEGIES)
    overlap_grad_reduce: bool = flag_field(False, "reduce gradient buckets during backward")
    ddp_bucket_size: int | None = flag_field(None, "elements per gradient bucket with --overlap-grad-reduce (None: max(40M, 1M x dp)); one bucket without it")
    overlap_param_gather: bool = flag_field(False, "with --use-distributed-optimizer: all-gather the updated "
                                            "parameters bucket by bucket as the next forward reaches them")
    grad_reduce_in_bf16: bool = flag_field(False, "reduce gradients over dp in bf16 (halves the bytes; needs --bf16)")
    accumulate_allreduce_grads_in_fp32: bool = flag_field(
        False, "accumulate and reduce gradients in fp32 (forced on with --bf16)")
    distributed_backend: str | None = flag_field(None, "process-group backend (None: nccl with CUDA, gloo otherwise)",
                                                 KNOWN_BACKENDS)
    distributed_timeout_minutes: float | None = flag_field(
        None, "timeout of collectives in minutes (None: 1 under gloo, 10 under nccl)")

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                     "expert_model_parallel_size"):
            check_int(name, getattr(self, name))
        for name in ("expert_tensor_parallel_size", "num_layers_per_virtual_pipeline_stage", "decoder_first_pipeline_num_layers",
                     "decoder_last_pipeline_num_layers", "ddp_bucket_size"):
            check_int(name, getattr(self, name), optional=True)
        check_choices(self)
        check_range("distributed_timeout_minutes", self.distributed_timeout_minutes, 0, open_low=True, optional=True)
        if self.overlap_param_gather and self.zero_stage == 0:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer or a "
                              "--data-parallel-sharding-strategy other than no_shard (only sharded parameters are "
                              "all-gathered); add one or drop --overlap-param-gather")
        if self.overlap_param_gather and not self.overlap_grad_reduce:
            raise ConfigError("--overlap-param-gather needs --overlap-grad-reduce (as in Megatron); add it or drop "
                              "--overlap-param-gather")


    @property
    def zero_stage(self) -> int:
        """0..3 from --data-parallel-sharding-strategy and its alias --use-distributed-optimizer."""
        return zero_stage(self.data_parallel_sharding_strategy, self.use_distributed_optimizer)


def gradient_precision(dist: DistributedConfig, bf16: bool, notices: list[str]) -> DistributedConfig:
    """Megatron's rules for the dtype gradients accumulate and travel over dp in, each change with a
    notice: --bf16 turns --accumulate-allreduce-grads-in-fp32 on, unless --grad-reduce-in-bf16 asks
    for bf16 buffers (then it is turned off); --grad-reduce-in-bf16 does nothing without --bf16."""
    if dist.grad_reduce_in_bf16 and not bf16:
        notices.append("--grad-reduce-in-bf16 applies to --bf16 only (gradients travel in the parameters' dtype); "
                       "ignored")
        return replace(dist, grad_reduce_in_bf16=False)
    if dist.grad_reduce_in_bf16:
        if dist.accumulate_allreduce_grads_in_fp32:
            notices.append("--grad-reduce-in-bf16: gradients accumulate and reduce in bf16; "
                           "--accumulate-allreduce-grads-in-fp32 turned off (as in Megatron)")
        return replace(dist, accumulate_allreduce_grads_in_fp32=False)
    if bf16 and not dist.accumulate_allreduce_grads_in_fp32:
        notices.append("--bf16: gradients are accumulated and all-reduced in fp32 "
                       "(--accumulate-allreduce-grads-in-fp32 turned on, as in Megatron)")
        return replace(dist, accumulate_allreduce_grads_in_fp32=True)
    return dist
