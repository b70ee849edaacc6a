"""The model section: a transformer's shape and options, with Megatron's flag names.

Its own rules are checked on construction; the rules that tie it to a layout live in
megalith.config.layout (Layout.check_model).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from megalith.config.flags import flag_field
from megalith.config.validators import check_choices, check_int, check_range
from megalith.errors import ConfigError


PRECISION_NAMES = ("fp32", "bf16", "fp16")
RECOMPUTE_GRANULARITIES = ("full", "selective")
PRECISIONS = dict(zip(PRECISION_NAMES, (torch.float32, torch.bfloat16, torch.float16)))
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "relative")
ACTIVATIONS = ("gelu", "relu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
# Megatron's --attention-backend names; "sdpa" is megalith's own name for torch's SDPA path.
ATTENTION_BACKENDS = ("auto", "flash", "fused", "unfused", "local", "sdpa")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
# megalith's --kernel-backend: which implementation megalith_kernels runs (apex: apex's fused norms, the rest auto).
KERNEL_BACKENDS = ("auto", "torch", "triton", "apex")
CROSS_ENTROPY_FUSION_IMPLS = ("native", "te")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_AMAX_COMPUTE_ALGOS = ("max", "most_recent")
# Fields that pick implementations, not mathematics: a checkpoint saved under one loads under another.
KERNEL_FIELDS = ("kernel_backend", "masked_softmax_fusion", "bias_gelu_fusion", "bias_swiglu_fusion",
                 "bias_dropout_fusion", "rope_fusion", "persist_layer_norm", "cross_entropy_loss_fusion",
                 "cross_entropy_fusion_impl", "fp8_format", "fp8_margin", "fp8_amax_history_len",
                 "fp8_amax_compute_algo", "fp8_param_gather")
RECOMPUTE_METHODS = ("uniform", "block")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")
MOE_DISPATCHERS = ("allgather", "alltoall")
MOE_DROP_POLICIES = ("probs", "position")
MOE_ROUTER_DTYPES = ("fp32", "fp64")


@dataclass(frozen=True)
class ModelConfig:
    """A transformer's shape and options, with Megatron's names. Derived sizes are filled in.

    ffn_hidden_size defaults to 4 * hidden_size, num_query_groups to the number of heads (plain
    multi-head attention; with group_query_attention, Megatron's default of 1 group), kv_channels
    to hidden_size / heads, max_position_embeddings to seq_length. Full recompute without a
    method means uniform over 1 layer, as a user of `--recompute-granularity full` expects.

    The dataclass honours num_query_groups as given, as Megatron-Core's TransformerConfig does;
    Megatron's *argument* rule (--num-query-groups is ignored without --group-query-attention)
    belongs to the flag path: `megatron_flag_rules`.
    """

    num_layers: int = flag_field(2, "transformer layers")
    hidden_size: int = flag_field(64, "width of the hidden states")
    num_attention_heads: int = flag_field(4, "attention heads")
    ffn_hidden_size: int | None = flag_field(None, "MLP hidden size (None: 4 x hidden size)")
    group_query_attention: bool = flag_field(False, "grouped-query attention: --num-query-groups takes effect "
                                             "(without it Megatron ignores --num-query-groups)")
    num_query_groups: int | None = flag_field(None, "key/value groups with --group-query-attention (None: 1 with it, "
                                                  "Megatron's default; one per head without)")
    kv_channels: int | None = flag_field(None, "size of one attention head (None: hidden size / heads)")
    seq_length: int = flag_field(32, "tokens per sequence")
    max_position_embeddings: int | None = flag_field(None, "rows of the learned position table (None: seq length)")
    vocab_size: int = flag_field(512, "vocabulary size before padding")
    make_vocab_size_divisible_by: int = flag_field(128, "pad the vocabulary to a multiple of this x tp")
    position_embedding_type: str = flag_field("learned_absolute", "position encoding", POSITION_EMBEDDING_TYPES)
    rotary_base: int = flag_field(10000, "base of the rotary frequencies")
    rotary_percent: float = flag_field(1.0, "share of each head's channels that rotary embeddings rotate")
    position_embedding: bool = flag_field(True, "learned absolute position table (--no-position-embedding: none, "
                                          "as Megatron's add_position_embedding)")
    normalization: str = flag_field("LayerNorm", "normalization layer", NORMALIZATIONS)
    norm_epsilon: float = flag_field(1e-5, "epsilon of the norms")
    apply_layernorm_1p: bool = flag_field(False, "LayerNorm weights stored as (weight - 1), initialised to zero "
                                          "(zero-centred gamma)")
    qk_layernorm: bool = flag_field(False, "normalise queries and keys per head before attention")
    swiglu: bool = flag_field(False, "SwiGLU MLP instead of GELU")
    openai_gelu: bool = flag_field(False, "tanh-approximate GELU (OpenAI's, GPT-2's) instead of the exact one")
    untie_embeddings_and_output_weights: bool = flag_field(False, "own output layer instead of the word embedding")
    disable_bias_linear: bool = flag_field(False, "no biases in the linear layers")
    add_qkv_bias: bool = flag_field(False, "bias in the QKV projection even with --disable-bias-linear")
    hidden_dropout: float = flag_field(0.1, "dropout on hidden states")
    attention_dropout: float = flag_field(0.1, "dropout on attention probabilities")
    init_method_std: float = flag_field(0.02, "standard deviation of the weight initialisation")
    init_method_xavier_uniform: bool = flag_field(False, "Xavier-uniform initialisation of the weights instead of "
                                                  "normal(0, --init-method-std)")
    attention_softmax_in_fp32: bool = flag_field(False, "attention softmax in fp32 for bf16/fp16 models")
    attention_backend: str = flag_field("auto", "core attention (Megatron's names): auto = the Triton flash kernel on "
                                        "CUDA with triton (TE's with --transformer-impl transformer_engine), else torch "
                                        "SDPA; flash = megalith_kernels.flash_attention (no attention dropout); fused = "
                                        "TE's fused attention with TE, else torch SDPA; unfused and local: explicit "
                                        "matmuls; sdpa: torch SDPA", ATTENTION_BACKENDS)
    transformer_impl: str = flag_field("local", "layer implementation: local (megalith's PyTorch layers, the default "
                                       "here so that CPU runs need nothing) or transformer_engine (TE's Linear, norms "
                                       "and DotProductAttention; needs TE on CUDA; Megatron's default)",
                                       TRANSFORMER_IMPLS)
    kernel_backend: str = flag_field("auto", "megalith's own: which implementation megalith_kernels runs for the fused "
                                     "ops; auto = Triton on CUDA with triton installed, else the PyTorch references; "
                                     "triton on a CPU needs TRITON_INTERPRET=1; apex = apex's fused norms (CUDA)",
                                     KERNEL_BACKENDS)
    masked_softmax_fusion: bool = flag_field(True, "fused scale-mask-softmax (--no-masked-softmax-fusion: off); megalith "
                                             "has no such kernel (its attention paths fuse the softmax or not by "
                                             "--attention-backend), so neither value changes what runs")
    bias_gelu_fusion: bool = flag_field(True, "fused bias + GeLU (megalith_kernels.bias_gelu, tanh GELU: with "
                                        "--openai-gelu) when the kernel backend resolves to triton")
    bias_swiglu_fusion: bool = flag_field(True, "fused SwiGLU (megalith_kernels.swiglu) when the kernel backend "
                                          "resolves to triton")
    bias_dropout_fusion: bool = flag_field(True, "fused bias + dropout + add; megalith has no such kernel, so neither "
                                           "value changes what runs")
    rope_fusion: bool = flag_field(True, "fused rotary embedding (megalith_kernels.rope) when the kernel backend "
                                   "resolves to triton and positions are not per sequence")
    persist_layer_norm: bool = flag_field(True, "persistent fused LayerNorm (--no-persist-layer-norm: off); megalith has "
                                          "no persistent kernel, so neither value changes what runs")
    cross_entropy_loss_fusion: bool = flag_field(False, "fused cross-entropy (megalith_kernels.cross_entropy) when the "
                                                 "kernel backend resolves to triton")
    cross_entropy_fusion_impl: str = flag_field("native", "which fused cross-entropy: native (megalith_kernels) or te "
                                                "(needs Transformer Engine)", CROSS_ENTROPY_FUSION_IMPLS)
    fp8_format: str | None = flag_field(None, "fp8 training through Transformer Engine (needs --transformer-impl "
                                        "transformer_engine on CUDA); None: off", FP8_FORMATS)
    fp8_margin: int = flag_field(0, "fp8 scaling margin (TE's DelayedScaling)")
    fp8_amax_history_len: int = flag_field(1, "steps of amax history per tensor (TE's DelayedScaling)")
    fp8_amax_compute_algo: str = flag_field("most_recent", "amax from the history (TE's DelayedScaling)",
                                            FP8_AMAX_COMPUTE_ALGOS)
    fp8_param_gather: bool = flag_field(False, "TE layers keep their parameters in fp8 (te.fp8_model_init)")
    params_dtype: str = flag_field("fp32", "parameter dtype (pretrain: follows --bf16 / --fp16)", PRECISION_NAMES)
    recompute_granularity: str | None = flag_field(None, "activation recompute (None: off)", RECOMPUTE_GRANULARITIES)
    recompute_method: str | None = flag_field(None, "full recompute: uniform groups or the first N layers",
                                               RECOMPUTE_METHODS)
    recompute_num_layers: int | None = flag_field(None, "layers per group (uniform) or recomputed (block)")
    post_layer_norm: bool = flag_field(False, "norm after each residual sum (original BERT, HF's BertModel) "
                                              "instead of before each sublayer; no final norm")
    num_tokentypes: int = flag_field(0, "token-type (segment) embeddings; BERT: 2 (GPT ignores them)")
    bert_no_binary_head: bool = flag_field(False, "BERT without the sentence-order (binary) head")
    activation: str = flag_field("gelu", "MLP activation without --swiglu (T5: relu)", ACTIVATIONS)
    encoder_num_layers: int | None = flag_field(None, "T5: encoder layers (None: --num-layers)")
    decoder_num_layers: int | None = flag_field(None, "T5: decoder layers (None: --num-layers)")
    encoder_seq_length: int | None = flag_field(None, "T5: encoder tokens per sample; sets --seq-length (Megatron)")
    decoder_seq_length: int | None = flag_field(None, "T5: decoder tokens per sample (None: the encoder's)")
    relative_attention_num_buckets: int = flag_field(32, "T5: buckets of relative positions")
    relative_attention_max_distance: int = flag_field(128, "T5: distance beyond which relative positions share a bucket")
    # Mixture of experts (issue 21; megalith.models.moe). Without --num-experts every field below is ignored.
    num_experts: int | None = flag_field(None, "experts per MoE layer (None or 0: a dense model)")
    moe_layer_freq: str = flag_field("1", "which layers are MoE: every Nth from layer 0 (an int), or a 0/1 pattern "
                                     "with one entry per layer, e.g. [1,0,1,0]")
    moe_ffn_hidden_size: int | None = flag_field(None, "hidden size of each expert's MLP (None: --ffn-hidden-size)")
    moe_shared_expert_intermediate_size: int | None = flag_field(None, "hidden size of the shared expert, a dense MLP "
                                                                 "added to the routed output (None: none)")
    moe_shared_expert_gate: bool = flag_field(False, "multiply the shared expert's output by sigmoid(x . w), w [1, h] "
                                              "learned per layer (Qwen2-MoE's shared_expert_gate; needs "
                                              "--moe-shared-expert-intermediate-size)")
    moe_grouped_gemm: bool = flag_field(False, "one grouped GEMM over a rank's experts (torch._grouped_mm where this "
                                        "torch, device and dtype support it, else a loop; the same numbers)")
    moe_router_topk: int = flag_field(2, "experts each token is sent to")
    moe_router_score_function: str = flag_field("softmax", "routing scores", MOE_SCORE_FUNCTIONS)
    moe_router_pre_softmax: bool = flag_field(False, "softmax over all experts before the top-k choice (else over the "
                                              "chosen k)")
    moe_router_topk_scaling_factor: float | None = flag_field(None, "scale of the chosen routing probabilities")
    moe_router_dtype: str | None = flag_field(None, "dtype of the routing computation (None: the model's)",
                                              MOE_ROUTER_DTYPES)
    moe_router_load_balancing_type: str = flag_field("aux_loss", "router balancing loss: aux_loss (Switch "
                                                     "Transformer), seq_aux_loss (per sequence) or none",
                                                     MOE_LOAD_BALANCING_TYPES)
    moe_aux_loss_coeff: float = flag_field(0.0, "weight of the load-balancing loss")
    moe_z_loss_coeff: float | None = flag_field(None, "weight of the router z-loss (ST-MoE; None: off)")
    moe_router_enable_expert_bias: bool = flag_field(False, "aux-loss-free balancing (DeepSeek-V3): a non-gradient "
                                                     "per-expert bias added for the choice only, updated after each "
                                                     "step (needs --moe-router-score-function sigmoid)")
    moe_router_bias_update_rate: float = flag_field(1e-3, "step of that bias update: rate x sign(mean load - load)")
    moe_token_dispatcher_type: str = flag_field("allgather", "token dispatch", MOE_DISPATCHERS)
    moe_expert_capacity_factor: float | None = flag_field(None, "expert capacity = ceil(tokens x topk / experts x "
                                                          "factor); tokens beyond it are dropped (None: dropless; "
                                                          "needs --moe-token-dispatcher-type alltoall)")
    moe_token_drop_policy: str = flag_field("probs", "which tokens are dropped beyond capacity: the lowest "
                                            "probabilities (probs) or the latest (position)", MOE_DROP_POLICIES)
    moe_pad_expert_input_to_capacity: bool = flag_field(False, "pad every expert's input to its capacity (needs "
                                                        "--moe-expert-capacity-factor)")

    def __post_init__(self) -> None:
        if self.num_experts == 0:  # Megatron: --num-experts 0 is a dense model
            object.__setattr__(self, "num_experts", None)
        if self.encoder_seq_length is not None:  # Megatron: --encoder-seq-length is the sequence length
            object.__setattr__(self, "seq_length", self.encoder_seq_length)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "make_vocab_size_divisible_by", "rotary_base"):
            check_int(name, getattr(self, name))
        derived = {
            "ffn_hidden_size": 4 * self.hidden_size,
            "num_query_groups": 1 if self.group_query_attention else self.num_attention_heads,
            "max_position_embeddings": self.seq_length,
        }
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads != 0:
                raise ConfigError(
                    f"hidden size {self.hidden_size} is not divisible by the number of attention heads "
                    f"{self.num_attention_heads}; change one of them or set --kv-channels"
                )
            derived["kv_channels"] = self.hidden_size // self.num_attention_heads
        if self.recompute_granularity == "full":
            derived["recompute_method"] = "uniform"
            derived["recompute_num_layers"] = 1
        for name, value in derived.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        for name in ("ffn_hidden_size", "num_query_groups", "kv_channels", "max_position_embeddings",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            check_int(name, getattr(self, name))
        for name in ("encoder_num_layers", "decoder_num_layers", "decoder_seq_length"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name))
        self._check_choices()
        self._check_shapes()
        self._check_recompute()
        if self.num_experts is not None:
            from megalith.models.moe.config import check_moe

            check_moe(self)
            if self.moe_ffn_hidden_size is None:
                object.__setattr__(self, "moe_ffn_hidden_size", self.ffn_hidden_size)

    def _check_choices(self) -> None:
        check_choices(self)
        for name in ("hidden_dropout", "attention_dropout"):
            check_range(name, getattr(self, name), 0.0, 1.0)
        check_int("num_tokentypes", self.num_tokentypes, 0)
        if self.init_method_std <= 0 or self.norm_epsilon <= 0:
            raise ConfigError("--init-method-std and --norm-epsilon must be positive")
        check_int("fp8_margin", self.fp8_margin, 0)
        check_int("fp8_amax_history_len", self.fp8_amax_history_len)
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ConfigError(f"--rotary-percent {self.rotary_percent} is not a share of the head; give one in (0, 1]")
        if self.openai_gelu and self.swiglu:
            raise ConfigError("--openai-gelu picks a GELU but --swiglu replaces GELU with SwiGLU; give one of the two")
        if self.activation != "gelu" and (self.openai_gelu or self.swiglu):
            raise ConfigError(f"--activation {self.activation} contradicts --openai-gelu / --swiglu; give one of them")

    def _check_shapes(self) -> None:
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ConfigError(
                f"number of attention heads {self.num_attention_heads} is not divisible by the number of query "
                f"groups {self.num_query_groups}; use a --num-query-groups that divides it"
            )
        if self.has_position_table and self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"sequence length {self.seq_length} exceeds --max-position-embeddings {self.max_position_embeddings}; "
                "raise --max-position-embeddings"
            )
        if self.position_embedding_type == "rope" and (self.rotary_dim % 2 != 0 or self.rotary_dim == 0):
            raise ConfigError(
                f"rotary embeddings rotate int(--rotary-percent {self.rotary_percent:g} x kv_channels "
                f"{self.kv_channels}) = {self.rotary_dim} channels of each head, which must be even and positive; "
                "choose a --rotary-percent (or --kv-channels) that gives an even count"
            )

    def _check_recompute(self) -> None:
        if self.recompute_granularity is None:
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")
            return
        if self.recompute_granularity == "selective":
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ConfigError(
                    "--recompute-method and --recompute-num-layers apply to --recompute-granularity full only"
                )
            return
        lowest = 1 if self.recompute_method == "uniform" else 0
        if not lowest <= self.recompute_num_layers <= self.num_layers:
            raise ConfigError(
                f"--recompute-num-layers {self.recompute_num_layers} must be between {lowest} and the "
                f"{self.num_layers} layers with --recompute-method {self.recompute_method}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return PRECISIONS[self.params_dtype]

    @property
    def attention_path(self) -> str:
        """"unfused" (explicit matmuls, the score matrix kept: unfused and local) or "sdpa" (no score
        matrix kept: the others); which of those paths runs is megalith.kernel_choice's decision."""
        return "unfused" if self.attention_backend in ("unfused", "local") else "sdpa"

    @property
    def rotary_dim(self) -> int:
        """Channels of each head that rotary embeddings rotate (Megatron: int(kv_channels x rotary_percent))."""
        return self.kv_channels if self.rotary_percent >= 1.0 else int(self.kv_channels * self.rotary_percent)

    @property
    def has_position_table(self) -> bool:
        """Whether the model adds a learned absolute position table (not with --no-position-embedding)."""
        return self.position_embedding_type == "learned_absolute" and self.position_embedding

    @property
    def is_moe(self) -> bool:
        """Whether some layers have an MoE MLP (--num-experts given, not 0)."""
        return self.num_experts is not None

    @property
    def add_bias_linear(self) -> bool:
        return not self.disable_bias_linear

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def megatron_flag_rules(config: ModelConfig, device: torch.device | str | None = None) -> tuple[ModelConfig, list[str]]:
    """Megatron's argument rules for a config built from flags, with a notice line for each.

    --num-query-groups takes effect only with --group-query-attention (Megatron passes no query
    groups to the model otherwise). The implementations are resolved for `device` (None: the
    CPU) by megalith.kernel_choice, so a backend that cannot run is refused here, in one line,
    and what runs differently from a flag's name is a notice.
    Programmatic configs skip this: ModelConfig(num_query_groups=2) is grouped-query attention.
    """
    from megalith.kernel_choice import resolve_kernels

    notices = []
    if not config.group_query_attention and config.num_query_groups != config.num_attention_heads:
        notices.append(f"--num-query-groups {config.num_query_groups} takes effect only with --group-query-attention "
                       f"(as in Megatron); using {config.num_attention_heads} query groups, one per head")
        config = replace(config, num_query_groups=config.num_attention_heads)
    kernels = resolve_kernels(config, device)
    notices.extend(kernels.notices)
    if not kernels.plain:
        notices.append(kernels.describe())
    return config, notices
