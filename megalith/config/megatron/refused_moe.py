"""Refused Megatron flags of mixture of experts (issue 21), multi-latent attention, inference, and the fp8 / fp4
recipes and Transformer Engine options beyond the delayed-scaling fp8 that megalith implements (model flags)."""

from __future__ import annotations

from megalith.config.megatron.records import FP8, MOE, flag, not_planned

_MLA = not_planned("multi-latent attention (DeepSeek's MLA)")
_INFERENCE = not_planned("Megatron's inference engine")

MOE_FLAGS = (
    flag("--moe-shared-expert-overlap", "true", False, "run the shared experts beside the token dispatch", MOE),
    flag("--moe-use-legacy-grouped-gemm", "true", False, "the older GroupedMLP kernel", MOE),
    flag("--moe-layer-recompute", "true", False, "recompute MoE layers (deprecated)", MOE),
    flag("--moe-extended-tp", "true", False, "deprecated spelling of expert tensor parallelism", MOE),
    flag("--moe-use-upcycling", "true", False, "turn a dense checkpoint into an MoE model", MOE),
    flag("--moe-router-fusion", "true", False, "fused top-k routing and aux loss", MOE),
    flag("--moe-router-num-groups", "int", None, "expert groups for group-limited routing", MOE),
    flag("--moe-router-group-topk", "int", None, "groups chosen per token in group-limited routing", MOE),
    flag("--moe-router-force-load-balancing", "true", False, "random routing for benchmarks", MOE),
    flag("--moe-router-padding-for-fp8", "true", False, "pad each expert's tokens for fp8 GEMMs", MOE),
    flag("--moe-input-jitter-eps", "float", None, "multiplicative jitter on the router input", MOE),
    flag("--moe-enable-deepep", "true", False, "DeepEP dispatch kernels (flex dispatcher)", MOE),
    flag("--moe-deepep-num-sms", "int", 20, "SMs given to DeepEP", MOE),
    flag("--moe-permute-fusion", "true", False, "fused token permutation", MOE),
    flag("--moe-apply-probs-on-input", "true", False, "multiply by the routing probability before the MLP", MOE),
    flag("--overlap-moe-expert-parallel-comm", "true", False, "overlap the expert all-to-all across "
         "micro-batches", MOE),
    flag("--delay-wgrad-compute", "true", False, "delay weight gradients for that overlap", MOE),
    flag("--moe-upcycling-granularity", "int", 1, "how much smaller the upcycled experts are", MOE),
    flag("--moe-pad-experts-for-cuda-graph-inference", "true", False, "capacity padding for CUDA-graph "
         "decoding", MOE),
    flag("--use-fused-weighted-squared-relu", "true", False, "fused weighted squared ReLU of MoE experts", MOE),
)

MLA_FLAGS = (
    flag("--multi-latent-attention", "true", False, "multi-latent attention", _MLA),
    flag("--q-lora-rank", "int", None, "MLA: rank of the query's low-rank projection", _MLA),
    flag("--kv-lora-rank", "int", 32, "MLA: rank of the key/value low-rank projection", _MLA),
    flag("--qk-head-dim", "int", 128, "MLA: head size of the query/key projection", _MLA),
    flag("--qk-pos-emb-head-dim", "int", 64, "MLA: head size of the rotary part", _MLA),
    flag("--v-head-dim", "int", 128, "MLA: head size of the value projection", _MLA),
    flag("--rotary-scaling-factor", "float", 1.0, "MLA: YaRN rotary scaling factor", _MLA),
    flag("--mscale", "float", 1.0, "MLA: YaRN mscale", _MLA),
    flag("--mscale-all-dim", "float", 0.0, "MLA: YaRN mscale over all dimensions", _MLA),
    flag("--cache-mla-latents", "true", False, "MLA: cache the latents when decoding", _MLA),
)

FP8_FLAGS = (
    flag("--fp8-recipe", "str", "delayed", "fp8 scaling recipe: tensorwise, delayed, mxfp8, blockwise, custom", FP8),
    flag("--fp8-quantizer-factory", "str", None, "import path of a custom fp8 quantizer factory", FP8),
    flag("--no-fp8-wgrad", "false", True, "weight gradients in higher precision under fp8", FP8),
    flag("--first-last-layers-bf16", "true", False, "first and last layers in bf16 under fp8", FP8),
    flag("--num-layers-at-start-in-bf16", "int", 1, "layers kept in bf16 at the start", FP8),
    flag("--num-layers-at-end-in-bf16", "int", 1, "layers kept in bf16 at the end", FP8),
    flag("--fp4-format", "str", None, "fp4 (NVFP4) training: e2m1 (None: off)", FP8),
    flag("--fp4-recipe", "str", "nvfp4", "fp4 recipe: nvfp4 or custom", FP8),
    flag("--fp4-quantizer-factory", "str", None, "import path of a custom fp4 quantizer factory", FP8),
    flag("--fp4-param-gather", "true", False, "keep parameters in fp4 and all-gather them in fp4", FP8),
    flag("--te-rng-tracker", "true", False, "Transformer Engine's random-number tracker (dropout streams)", FP8),
    flag("--use-te-activation-func", "true", False, "Transformer Engine's activation kernels in the MLP", FP8),
    flag("--reuse-grad-buf-for-mxfp8-param-ag", "true", False, "reuse the gradient buffer for the MXFP8 "
         "parameter all-gather", FP8),
    flag("--use-precision-aware-optimizer", "true", False, "Transformer Engine's optimizer with low-precision "
         "main weights and moments", FP8),
    flag("--main-grads-dtype", "str", "fp32", "precision-aware optimizer: dtype of the main gradients", FP8),
    flag("--main-params-dtype", "str", "fp32", "precision-aware optimizer: dtype of the main weights", FP8),
    flag("--exp-avg-dtype", "str", "fp32", "precision-aware optimizer: dtype of Adam's first moment", FP8),
    flag("--exp-avg-sq-dtype", "str", "fp32", "precision-aware optimizer: dtype of Adam's second moment", FP8),
    flag("--fp8-e4m3", "true", False, "older Megatron: fp8 in e4m3 (now --fp8-format e4m3)", FP8),
    flag("--fp8-hybrid", "true", False, "older Megatron: fp8 hybrid (now --fp8-format hybrid)", FP8),
)

INFERENCE_FLAGS = (
    flag("--inference-rng-tracker", "true", False, "random-number tracker set up for inference", _INFERENCE),
    flag("--inference-batch-times-seqlen-threshold", "int", -1, "batch x length above which inference "
         "batches are pipelined (-1: never)", _INFERENCE),
    flag("--max-tokens-to-oom", "int", 12000, "token budget of one inference request", _INFERENCE),
    flag("--output-bert-embeddings", "true", False, "BERT returns mean-pooled embeddings", _INFERENCE),
    flag("--bert-embedder-type", "str", "megatron", "BERT embedder: megatron or huggingface", _INFERENCE),
    flag("--flash-decode", "true", False, "flash-decoding kernel", _INFERENCE),
    flag("--use-legacy-static-engine", "true", False, "the older static inference engine", _INFERENCE),
    flag("--inference-max-requests", "int", 8, "requests served at once", _INFERENCE),
    flag("--inference-max-seq-length", "int", 2560, "longest prompt plus generation", _INFERENCE),
    flag("--inference-max-batch-size", "int", None, "inference batch size", _INFERENCE),
    flag("--inference-dynamic-batching", "true", False, "dynamic batching of requests", _INFERENCE),
    flag("--inference-dynamic-batching-buffer-size-gb", "float", 40.0, "KV-cache buffer in GB", _INFERENCE),
    flag("--inference-dynamic-batching-block-size", "int", 256, "KV-cache block size", _INFERENCE),
    flag("--inference-dynamic-batching-buffer-guaranteed-fraction", "float", 0.2, "buffer kept for "
         "running requests", _INFERENCE),
    flag("--inference-dynamic-batching-buffer-overflow-factor", "float", None, "over-subscription of the "
         "buffer", _INFERENCE),
    flag("--inference-dynamic-batching-max-requests-override", "int", None, "maximum requests", _INFERENCE),
    flag("--inference-dynamic-batching-max-tokens-override", "int", None, "maximum tokens", _INFERENCE),
    flag("--inference-dynamic-batching-num-cuda-graphs", "int", 16, "CUDA graphs captured for decoding",
         _INFERENCE),
    flag("--inference-dynamic-batching-track-paused-request-events", "true", False, "record paused "
         "requests", _INFERENCE),
    flag("--decode-only-cuda-graphs", "true", False, "CUDA graphs for decode steps only", _INFERENCE),
    flag("--inference-dynamic-batching-unified-memory-level", "int", 0, "unified memory for the context",
         _INFERENCE),
    flag("--symmetric-ar-type", "str", None, "symmetric-memory all-reduce kind for inference", _INFERENCE),
    flag("--nccl-all-reduce-for-prefill", "true", False, "plain NCCL all-reduce during prefill", _INFERENCE),
    flag("--mlp-chunks-for-prefill", "int", 1, "sequence chunks of the MLP during prefill", _INFERENCE),
    flag("--disable-chunked-prefill", "true", False, "prefill in one piece", _INFERENCE),
    flag("--inference-wandb-logging-step-interval", "int", 0, "inference metrics to W&B every N steps",
         _INFERENCE),
)
