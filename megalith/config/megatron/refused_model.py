"""Refused Megatron flags of model variants megalith does not build: architecture options, Mamba and
hybrid models, Retro, vision, the ICT/REALM biencoder, Muon, RL, SFT and Kitchen quantization."""

from __future__ import annotations

from megalith.config.megatron.records import flag, not_planned

_VARIANT = not_planned("this transformer variant")
_INIT = not_planned("this initialisation option")
_MUON = not_planned("the Muon optimizer")
_WD = not_planned("a weight-decay schedule")
_HYBRID = not_planned("Mamba and hybrid models")
_SPEC = not_planned("Megatron's module specs and YAML configs (megalith: --model and --config FILE.yaml)")
_RETRO = not_planned("Retro (retrieval-augmented) models")
_VISION = not_planned("vision models (ViT, Swin, DINO)")
_BIENCODER = not_planned("the ICT/REALM biencoder")
_RL = not_planned("reinforcement learning (GRPO)")
_SFT = not_planned("Megatron's SFT mode")
_KITCHEN = not_planned("Kitchen quantization")

ARCHITECTURE_FLAGS = (
    flag("--softmax-type", "str", "vanilla", "attention softmax: vanilla, off-by-one or learnable offset", _VARIANT),
    flag("--window-size", "str", None, "sliding-window attention size 'left,right' (None: full)", _VARIANT),
    flag("--window-attn-skip-freq", "str", None, "which layers use full attention among window layers", _VARIANT),
    flag("--rotary-interleaved", "true", False, "rotate interleaved channel pairs instead of halves", _VARIANT),
    flag("--rotary-seq-len-interpolation-factor", "int", None, "linear position interpolation of rotary "
         "embeddings", _VARIANT),
    flag("--use-rope-scaling", "true", False, "Llama 3.1 rotary frequency scaling", _VARIANT),
    flag("--rope-scaling-factor", "float", 8.0, "factor of that scaling", _VARIANT),
    flag("--rope-type", "str", None, "rotary kind: rope or yarn (None: rope; MLA: yarn)", _VARIANT, ("rope",)),
    flag("--no-rope-freq", "str", None, "layers that skip rotary embeddings (every Nth, or a pattern)", _VARIANT),
    flag("--mrope-section", "int+", None, "multimodal rotary sections of the channels", _VARIANT),
    flag("--apply-residual-connection-post-layernorm", "true", False, "the residual branch starts after the "
         "norm (original BERT ordering)", _VARIANT),
    flag("--squared-relu", "true", False, "squared-ReLU MLP activation", _VARIANT),
    flag("--quick-geglu", "true", False, "quick-GELU gated MLP", _VARIANT),
    flag("--activation-func-clamp-value", "float", None, "clamp of the first MLP projection (quick-GEGLU)", _VARIANT),
    flag("--glu-linear-offset", "float", 0.0, "offset added to the linear half of a GLU", _VARIANT),
    flag("--onnx-safe", "str", None, "workarounds for the ONNX exporter", _VARIANT),
    flag("--mtp-num-layers", "int", None, "multi-token prediction layers", _VARIANT),
    flag("--mtp-loss-scaling-factor", "float", 0.1, "weight of the multi-token prediction loss", _VARIANT),
    flag("--qk-l2-norm", "true", False, "Llama 4 L2 norm of queries and keys", _VARIANT),
    flag("--fp32-residual-connection", "true", False, "residual stream in fp32 under bf16/fp16", _VARIANT),
    flag("--apply-query-key-layer-scaling", "true", False, "scale Q.K by 1/layer number (fp16 stability); also "
         "softmax in fp32", _VARIANT),
    flag("--fp16-lm-cross-entropy", "true", False, "language-model cross entropy in fp16", _VARIANT),
    flag("--heterogeneous-layers-config-path", "str", None, "JSON of per-layer shapes (Nemotron-style "
         "heterogeneous models)", _VARIANT),
    flag("--heterogeneous-layers-config-encoded-json", "str", None, "the same configuration as a JSON string",
         _VARIANT),
    flag("--use-legacy-models", "true", False, "Megatron's legacy (non-core) model classes", _VARIANT),
    flag("--enable-experimental", "true", False, "Megatron's experimental code paths", _VARIANT),
)

TRAINING_VARIANT_FLAGS = (
    flag("--data-parallel-random-init", "true", False, "different initial weights on each dp rank", _INIT),
    flag("--embedding-init-method-std", "float", None, "own init std for the embedding (and no weight decay "
         "on it)", _INIT),
    flag("--start-weight-decay", "float", None, "weight decay at the start of a schedule", _WD),
    flag("--end-weight-decay", "float", None, "weight decay at the end of a schedule", _WD),
    flag("--weight-decay-incr-style", "str", "constant", "weight-decay schedule: constant, linear or cosine", _WD),
    flag("--muon-momentum", "float", 0.9, "Muon momentum", _MUON),
    flag("--muon-no-split-qkv", "false", True, "Muon on the fused QKV matrix as one", _MUON),
    flag("--muon-use-nesterov", "true", False, "Nesterov momentum inside Muon", _MUON),
    flag("--muon-scale-mode", "str", "spectral", "Muon update scaling", _MUON),
    flag("--muon-fp32-matmul-prec", "str", "medium", "matmul precision of Newton-Schulz", _MUON),
    flag("--muon-num-ns-steps", "int", 5, "Newton-Schulz iterations", _MUON),
    flag("--muon-tp-mode", "str", "blockwise", "Newton-Schulz of tensor-parallel weights", _MUON),
    flag("--muon-extra-scale-factor", "float", 1.0, "extra scale of the Muon update", _MUON),
)

HYBRID_FLAGS = (
    flag("--spec", "str*", None, "module and function returning a custom layer spec ('local' for local)", _SPEC),
    flag("--yaml-cfg", "str", None, "Megatron's experimental YAML config", _SPEC),
    flag("--hybrid-attention-ratio", "float", 0.0, "share of attention layers in a hybrid model", _HYBRID),
    flag("--hybrid-mlp-ratio", "float", 0.0, "share of MLP layers in a hybrid model", _HYBRID),
    flag("--hybrid-override-pattern", "str", None, "explicit layer pattern of a hybrid model", _HYBRID),
    flag("--mamba-state-dim", "int", 128, "Mamba state size", _HYBRID),
    flag("--mamba-head-dim", "int", 64, "Mamba head size", _HYBRID),
    flag("--mamba-num-groups", "int", 8, "Mamba groups", _HYBRID),
    flag("--mamba-num-heads", "int", None, "Mamba heads", _HYBRID),
    flag("--is-hybrid-model", "true", False, "the model is a Mamba hybrid", _HYBRID),
    flag("--disable-mamba-mem-eff-path", "true", False, "Mamba without its memory-efficient path", _HYBRID),
)

RETRO_FLAGS = (
    flag("--retro-project-dir", "str", None, "Retro project directory (database, neighbours)", _RETRO),
    flag("--retro-add-retriever", "true", False, "add Retro's retriever to the model", _RETRO),
    flag("--retro-cyclic-train-iters", "int", None, "iterations of cyclic Retro training", _RETRO),
    flag("--retro-encoder-layers", "int", 2, "layers of the retrieval encoder", _RETRO),
    flag("--retro-encoder-hidden-dropout", "float", 0.1, "hidden dropout of the retrieval encoder", _RETRO),
    flag("--retro-encoder-attention-dropout", "float", 0.1, "attention dropout of the retrieval encoder", _RETRO),
    flag("--retro-num-neighbors", "int", 2, "neighbours retrieved per chunk", _RETRO),
    flag("--retro-num-retrieved-chunks", "int", 2, "chunks retrieved from the database", _RETRO),
    flag("--retro-attention-gate", "float", 1, "gate of the cross attention", _RETRO),
    flag("--retro-no-verify-neighbor-count", "false", True, "skip checking the neighbour count", _RETRO),
)

VISION_FLAGS = (
    flag("--num-classes", "int", 1000, "classes of image classification", _VISION),
    flag("--img-h", "int", 224, "image height", _VISION),
    flag("--img-w", "int", 224, "image width", _VISION),
    flag("--num-channels", "int", 3, "image channels", _VISION),
    flag("--patch-dim", "int", 16, "patch size", _VISION),
    flag("--classes-fraction", "float", 1.0, "share of the classes trained on", _VISION),
    flag("--data-per-class-fraction", "float", 1.0, "share of each class's data", _VISION),
    flag("--no-data-sharding", "false", True, "no sharding of the image data", _VISION),
    flag("--head-lr-mult", "float", 1.0, "learning-rate multiplier of the head when fine-tuning", _VISION),
    flag("--vision-pretraining", "true", False, "vision pretraining", _VISION),
    flag("--vision-pretraining-type", "str", "classify", "objective: classify, inpaint or dino", _VISION),
    flag("--vision-backbone-type", "str", "vit", "backbone: vit, mit or swin", _VISION),
    flag("--swin-backbone-type", "str", "tiny", "Swin size", _VISION),
    flag("--mask-type", "str", "random", "inpainting mask: random or row", _VISION),
    flag("--mask-factor", "float", 1.0, "inpainting mask size", _VISION),
    flag("--iter-per-epoch", "int", 1250, "iterations per epoch (DINO)", _VISION),
    flag("--dino-local-img-size", "int", 96, "DINO local crop size", _VISION),
    flag("--dino-local-crops-number", "int", 10, "DINO local crops", _VISION),
    flag("--dino-head-hidden-size", "int", 2048, "DINO head width", _VISION),
    flag("--dino-bottleneck-size", "int", 256, "DINO bottleneck width", _VISION),
    flag("--dino-freeze-last-layer", "float", 1, "epochs the last DINO layer stays frozen", _VISION),
    flag("--dino-norm-last-layer", "true", False, "normalise the last DINO layer", _VISION),
    flag("--dino-warmup-teacher-temp", "float", 0.04, "DINO teacher temperature during warm-up", _VISION),
    flag("--dino-teacher-temp", "float", 0.07, "DINO teacher temperature", _VISION),
    flag("--dino-warmup-teacher-temp-epochs", "int", 30, "epochs of the teacher temperature warm-up", _VISION),
)

BIENCODER_FLAGS = (
    flag("--ict-head-size", "int", None, "ICT/REALM block embedding size", _BIENCODER),
    flag("--biencoder-projection-dim", "int", 0, "biencoder projection head size", _BIENCODER),
    flag("--biencoder-shared-query-context-model", "true", False, "one model for queries and contexts", _BIENCODER),
    flag("--ict-load", "str", None, "ICT checkpoint directory", _BIENCODER),
    flag("--bert-load", "str", None, "BERT checkpoint that ICT starts from", _BIENCODER),
    flag("--titles-data-path", "str", None, "titles dataset of ICT", _BIENCODER),
    flag("--query-in-block-prob", "float", 0.1, "probability that the query stays in its block", _BIENCODER),
    flag("--use-one-sent-docs", "true", False, "keep one-sentence documents", _BIENCODER),
    flag("--evidence-data-path", "str", None, "DPR Wikipedia evidence", _BIENCODER),
    flag("--retriever-report-topk-accuracies", "int+", [], "top-k accuracies to report", _BIENCODER),
    flag("--retriever-score-scaling", "true", False, "scale retriever scores by 1/sqrt(hidden)", _BIENCODER),
    flag("--block-data-path", "str", None, "where block embeddings are saved", _BIENCODER),
    flag("--embedding-path", "str", None, "where open-retrieval embeddings are saved", _BIENCODER),
    flag("--indexer-batch-size", "int", 128, "batch size of indexing jobs", _BIENCODER),
    flag("--indexer-log-interval", "int", 1000, "batches between indexer reports", _BIENCODER),
    flag("--retriever-seq-length", "int", 256, "sequence length of the retriever", _BIENCODER),
)

RL_FLAGS = (
    flag("--perform-rl-step", "true", False, "train with the RL step", _RL),
    flag("--rl-prompts-per-eval", "int", 32, "prompts per RL evaluation task", _RL),
    flag("--grpo-prompts-per-step", "int", 32, "GRPO groups per step", _RL),
    flag("--grpo-group-size", "int", 2, "samples per GRPO group", _RL),
    flag("--grpo-iterations", "int", 2, "GRPO iterations per batch of rollouts", _RL),
    flag("--grpo-clamp-eps-lower", "float", 0.01, "lower GRPO clip bound", _RL),
    flag("--grpo-clamp-eps-upper", "float", 0.01, "upper GRPO clip bound", _RL),
    flag("--grpo-kl-beta", "float", 0.001, "weight of the KL term", _RL),
    flag("--grpo-entropy-term-weight", "float", 0.0, "weight of the entropy term", _RL),
    flag("--grpo-filter-groups-with-same-reward", "true", False, "drop groups whose rewards are all equal", _RL),
    flag("--grpo-default-temperature", "float", 1.0, "sampling temperature of rollouts", _RL),
    flag("--grpo-default-top-p", "float", 0, "top-p of rollouts", _RL),
    flag("--langrl-inference-server-type", "str", "inplace_megatron", "inference server of the rollouts", _RL),
    flag("--langrl-inference-server-conversation-template", "str", None, "chat template of that server", _RL),
    flag("--langrl-external-server", "switch", False, "rollouts from an external server", _RL),
    flag("--langrl-env-config", "str", None, "YAML of the RL environments", _RL),
    flag("--rl-offload-optimizer-during-inference", "true", False, "optimizer state to CPU during rollouts", _RL),
    flag("--rl-offload-kv-cache-during-training", "switch", False, "KV cache to CPU while training", _RL),
    flag("--rl-remove-kv-cache-during-training", "switch", False, "drop the KV cache while training", _RL),
    flag("--rl-reset-cuda-graphs", "switch", False, "rebuild CUDA graphs between phases", _RL),
    flag("--rl-partial-rollouts", "switch", False, "partial rollouts", _RL),
    flag("--rl-inference-logprobs-is-correction", "switch", False, "importance-sampling correction from "
         "inference log-probabilities", _RL),
    flag("--rl-importance-sampling-truncation-coef", "float", None, "truncation of that correction", _RL),
    flag("--rl-calculate-intra-group-similarity", "switch", False, "measure rollout similarity in a group", _RL),
    flag("--rl-use-sequence-packing", "true", False, "pack rollouts into bins", _RL),
    flag("--rl-sequence-packing-bin-size", "int", 8192, "size of a packing bin", _RL),
    flag("--rl-sequence-packing-algo", "str", "fifo", "how bins are spread over ranks", _RL),
    flag("--sft", "true", False, "supervised fine-tuning mode", _SFT),
    flag("--sft-tokenizer-prompt-format", "str", "nemotron-h-aligned", "prompt format of the SFT tokenizer", _SFT),
    flag("--kitchen-config-file", "str", None, "Kitchen quantization YAML", _KITCHEN),
    flag("--kitchen-recipe-number", "int", None, "a built-in Kitchen quantization recipe", _KITCHEN),
)
