"""Configuration dataclasses (Megatron's names) and the checks that run before any process starts.

Every rule that ties model shapes to the layout lives here, so that a bad combination is one
clear line at start-up instead of a shape error (or a hang) deep inside a collective.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace

import torch

from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid


def _divides(size: int, count: int, what: str, flag: str = "--tensor-model-parallel-size") -> None:
    if count % size != 0:
        raise ConfigError(f"{what} {count} is not divisible by {flag} {size}; choose a {flag} that divides {count}")


@dataclass(frozen=True)
class ParallelConfig:
    """How the job is split: Megatron's flag names without the dashes."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    data_parallel_size: int | None = None  # None: whatever the world leaves
    sequence_parallel: bool = False

    def grid(self, world_size: int) -> RankGrid:
        """The rank grid of this layout over `world_size` processes (raises if they do not fit)."""
        return RankGrid(
            world_size,
            tp=self.tensor_model_parallel_size,
            pp=self.pipeline_model_parallel_size,
            cp=self.context_parallel_size,
            dp=self.data_parallel_size,
        )

    def check_model_shapes(
        self,
        *,
        hidden_size: int,
        num_attention_heads: int | None = None,
        num_query_groups: int | None = None,
        ffn_hidden_size: int | None = None,
        seq_length: int | None = None,
    ) -> None:
        """Every shape that tensor (and sequence) parallelism splits must split evenly."""
        tp = self.tensor_model_parallel_size
        _divides(tp, hidden_size, "hidden size")
        if num_attention_heads is not None:
            _divides(tp, num_attention_heads, "number of attention heads")
            if hidden_size % num_attention_heads != 0:
                raise ConfigError(
                    f"hidden size {hidden_size} is not divisible by the number of attention heads "
                    f"{num_attention_heads}; set --kv-channels or change one of them"
                )
        if num_query_groups is not None:
            _divides(tp, num_query_groups, "number of query groups")
            if num_attention_heads is not None and num_attention_heads % num_query_groups != 0:
                raise ConfigError(
                    f"number of attention heads {num_attention_heads} is not divisible by the number of query "
                    f"groups {num_query_groups}; use a --num-query-groups that divides it"
                )
        if ffn_hidden_size is not None:
            _divides(tp, ffn_hidden_size, "ffn hidden size")
        if self.sequence_parallel and seq_length is not None and seq_length % tp != 0:
            raise ConfigError(
                f"sequence length {seq_length} is not divisible by --tensor-model-parallel-size {tp} under "
                f"--sequence-parallel; use a --seq-length that is a multiple of {tp} or drop --sequence-parallel"
            )


LAYOUT_TOKENS = ("tpN", "ppN", "vppN", "dpN", "mbN", "sp", "zero1", "recompute-full", "recompute-selective",
                 "bf16", "fp16")


@dataclass(frozen=True)
class Layout:
    """A layout written as dotted tokens, e.g. `tp2.pp2.vpp2.dp2.sp.zero1.recompute-full.bf16`.

    `mbN` splits each data-parallel rank's share of the global batch into N micro-batches
    (default: micro-batches of the reference's size); the step's loss does not depend on it.
    `zero1` is the distributed optimizer; `bf16` / `fp16` set the parameters' precision (fp32
    main weights in the optimizer either way).
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    dp: int = 1
    microbatches: int | None = None
    sequence_parallel: bool = False
    zero1: bool = False
    recompute: str | None = None  # Megatron's --recompute-granularity: "full" or "selective"
    precision: str = "fp32"

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                              data_parallel_size=self.dp, sequence_parallel=self.sequence_parallel)

    def apply_to(self, config: "ModelConfig") -> "ModelConfig":
        """The model config under this layout: a recompute token sets the granularity (full keeps
        the config's --recompute-method and --recompute-num-layers), a precision token the
        parameters' dtype; no token leaves the config as is."""
        if self.precision != "fp32":
            config = replace(config, params_dtype=self.precision)
        if self.recompute == "selective":
            return replace(config, recompute_granularity="selective", recompute_method=None, recompute_num_layers=None)
        if self.recompute == "full":
            return replace(config, recompute_granularity="full")
        return config

    def __str__(self) -> str:
        tokens = [f"tp{self.tp}"] if self.tp > 1 or (self.pp == 1 and self.dp == 1) else []
        tokens += [f"pp{self.pp}"] if self.pp > 1 else []
        tokens += [f"vpp{self.vpp}"] if self.vpp > 1 else []
        tokens += [f"dp{self.dp}"] if self.dp > 1 else []
        tokens += [f"mb{self.microbatches}"] if self.microbatches else []
        tokens += ["sp"] if self.sequence_parallel else []
        tokens += ["zero1"] if self.zero1 else []
        tokens += [f"recompute-{self.recompute}"] if self.recompute else []
        return ".".join(tokens + ([self.precision] if self.precision != "fp32" else []))


_NUMBERED_TOKENS = {"tp": "tp", "pp": "pp", "vpp": "vpp", "dp": "dp", "mb": "microbatches"}


def parse_layout(text: str) -> Layout:
    """`tp4.sp` -> Layout(tp=4, sequence_parallel=True); one clear line for anything else."""
    values: dict = {}
    for token in text.split("."):
        prefix = token.rstrip("0123456789")
        number = token[len(prefix):]
        if prefix in _NUMBERED_TOKENS and number.isdigit() and int(number) >= 1:
            key, value = _NUMBERED_TOKENS[prefix], int(number)
        elif token == "sp":
            key, value = "sequence_parallel", True
        elif token == "zero1":
            key, value = "zero1", True
        elif token in ("bf16", "fp16"):
            key, value = "precision", token
        elif token in ("recompute-full", "recompute-selective"):
            key, value = "recompute", token.split("-", 1)[1]
        else:
            raise ConfigError(
                f"unknown layout token {token!r} in {text!r}; known tokens: {', '.join(LAYOUT_TOKENS)} (e.g. tp2.sp)"
            )
        if key in values:
            raise ConfigError(f"layout {text!r} gives {key} twice; write each token once")
        values[key] = value
    return Layout(**values)


PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
POSITION_EMBEDDING_TYPES = ("learned_absolute", "rope", "relative")
ACTIVATIONS = ("gelu", "relu")
NORMALIZATIONS = ("LayerNorm", "RMSNorm")
ATTENTION_BACKENDS = ("sdpa", "unfused")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {value!r} is not one of {', '.join(map(repr, allowed))}")


def _positive(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value!r}")


def flag_field(default, help: str, choices: tuple | None = None):
    """A dataclass field whose `--flag` (see add_config_arguments) gets this help text and choices."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ModelConfig:
    """A transformer's shape and options, with Megatron's names. Derived sizes are filled in.

    ffn_hidden_size defaults to 4 * hidden_size, num_query_groups to the number of heads (plain
    multi-head attention), kv_channels to hidden_size / heads, max_position_embeddings to
    seq_length. Full recompute without a method means uniform over 1 layer, as a user of
    `--recompute-granularity full` expects.
    """

    num_layers: int = flag_field(2, "transformer layers")
    hidden_size: int = flag_field(64, "width of the hidden states")
    num_attention_heads: int = flag_field(4, "attention heads")
    ffn_hidden_size: int | None = flag_field(None, "MLP hidden size (None: 4 x hidden size)")
    num_query_groups: int | None = flag_field(None, "key/value groups of grouped-query attention (None: one per head)")
    kv_channels: int | None = flag_field(None, "size of one attention head (None: hidden size / heads)")
    seq_length: int = flag_field(32, "tokens per sequence")
    max_position_embeddings: int | None = flag_field(None, "rows of the learned position table (None: seq length)")
    vocab_size: int = flag_field(512, "vocabulary size before padding")
    make_vocab_size_divisible_by: int = flag_field(128, "pad the vocabulary to a multiple of this x tp")
    position_embedding_type: str = flag_field("learned_absolute", "position encoding")
    rotary_base: int = flag_field(10000, "base of the rotary frequencies")
    normalization: str = flag_field("LayerNorm", "normalization layer")
    norm_epsilon: float = flag_field(1e-5, "epsilon of the norms")
    swiglu: bool = flag_field(False, "SwiGLU MLP instead of GELU")
    openai_gelu: bool = flag_field(False, "tanh-approximate GELU (OpenAI's, GPT-2's) instead of the exact one")
    untie_embeddings_and_output_weights: bool = flag_field(False, "own output layer instead of the word embedding")
    disable_bias_linear: bool = flag_field(False, "no biases in the linear layers")
    add_qkv_bias: bool = flag_field(False, "bias in the QKV projection even with --disable-bias-linear")
    hidden_dropout: float = flag_field(0.1, "dropout on hidden states")
    attention_dropout: float = flag_field(0.1, "dropout on attention probabilities")
    init_method_std: float = flag_field(0.02, "standard deviation of the weight initialisation")
    attention_softmax_in_fp32: bool = flag_field(False, "attention softmax in fp32 for bf16/fp16 models")
    attention_backend: str = flag_field("sdpa", "core attention: torch SDPA or explicit matmuls")
    params_dtype: str = flag_field("fp32", "parameter dtype (pretrain: follows --bf16 / --fp16)")
    recompute_granularity: str | None = flag_field(None, "activation recompute (None: off)")
    recompute_method: str | None = flag_field(None, "full recompute: uniform groups or the first N layers")
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

    def __post_init__(self) -> None:
        if self.encoder_seq_length is not None:  # Megatron: --encoder-seq-length is the sequence length
            object.__setattr__(self, "seq_length", self.encoder_seq_length)
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                     "make_vocab_size_divisible_by", "rotary_base"):
            _positive(name, getattr(self, name))
        derived = {
            "ffn_hidden_size": 4 * self.hidden_size,
            "num_query_groups": self.num_attention_heads,
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
            _positive(name, getattr(self, name))
        for name in ("encoder_num_layers", "decoder_num_layers", "decoder_seq_length"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        self._check_choices()
        self._check_shapes()
        self._check_recompute()

    def _check_choices(self) -> None:
        _choice("position_embedding_type", self.position_embedding_type, POSITION_EMBEDDING_TYPES)
        _choice("normalization", self.normalization, NORMALIZATIONS)
        _choice("attention_backend", self.attention_backend, ATTENTION_BACKENDS)
        _choice("params_dtype", self.params_dtype, tuple(PRECISIONS))
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)} must be in [0, 1)")
        if not isinstance(self.num_tokentypes, int) or self.num_tokentypes < 0:
            raise ConfigError(f"--num-tokentypes must be a non-negative integer, got {self.num_tokentypes!r}")
        if self.init_method_std <= 0 or self.norm_epsilon <= 0:
            raise ConfigError("--init-method-std and --norm-epsilon must be positive")
        if self.openai_gelu and self.swiglu:
            raise ConfigError("--openai-gelu picks a GELU but --swiglu replaces GELU with SwiGLU; give one of the two")
        _choice("activation", self.activation, ACTIVATIONS)
        if self.activation != "gelu" and (self.openai_gelu or self.swiglu):
            raise ConfigError(f"--activation {self.activation} contradicts --openai-gelu / --swiglu; give one of them")

    def _check_shapes(self) -> None:
        if self.num_attention_heads % self.num_query_groups != 0:
            raise ConfigError(
                f"number of attention heads {self.num_attention_heads} is not divisible by the number of query "
                f"groups {self.num_query_groups}; use a --num-query-groups that divides it"
            )
        if self.position_embedding_type == "learned_absolute" and self.seq_length > self.max_position_embeddings:
            raise ConfigError(
                f"sequence length {self.seq_length} exceeds --max-position-embeddings {self.max_position_embeddings}; "
                "raise --max-position-embeddings"
            )
        if self.position_embedding_type == "rope" and self.kv_channels % 2 != 0:
            raise ConfigError(f"rotary embeddings need an even head size, got kv_channels {self.kv_channels}")

    def _check_recompute(self) -> None:
        if self.recompute_granularity is None:
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ConfigError("--recompute-method and --recompute-num-layers need --recompute-granularity full")
            return
        _choice("recompute_granularity", self.recompute_granularity, RECOMPUTE_GRANULARITIES)
        if self.recompute_granularity == "selective":
            if self.recompute_method is not None or self.recompute_num_layers is not None:
                raise ConfigError(
                    "--recompute-method and --recompute-num-layers apply to --recompute-granularity full only"
                )
            return
        _choice("recompute_method", self.recompute_method, RECOMPUTE_METHODS)
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
    def add_bias_linear(self) -> bool:
        return not self.disable_bias_linear

    def check_parallel(self, parallel: ParallelConfig) -> None:
        """The rules that tie this model to a layout (heads, groups, ffn and sequence vs tp)."""
        parallel.check_model_shapes(
            hidden_size=self.num_attention_heads * self.kv_channels,
            num_attention_heads=self.num_attention_heads,
            num_query_groups=self.num_query_groups,
            ffn_hidden_size=self.ffn_hidden_size,
            seq_length=self.seq_length,
        )
        tp = parallel.tensor_model_parallel_size
        if parallel.sequence_parallel and self.decoder_seq_length is not None and self.decoder_seq_length % tp != 0:
            raise ConfigError(
                f"--decoder-seq-length {self.decoder_seq_length} is not divisible by --tensor-model-parallel-size "
                f"{tp} under --sequence-parallel; use a multiple of {tp} or drop --sequence-parallel")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


CHOICES = {
    "position_embedding_type": POSITION_EMBEDDING_TYPES,
    "activation": ACTIVATIONS,
    "normalization": NORMALIZATIONS,
    "attention_backend": ATTENTION_BACKENDS,
    "params_dtype": tuple(PRECISIONS),
    "recompute_granularity": RECOMPUTE_GRANULARITIES,
    "recompute_method": RECOMPUTE_METHODS,
}


_EXPLICIT = "_megalith_explicit_flags"


def _remember_explicit(namespace: argparse.Namespace, dest: str) -> None:
    setattr(namespace, _EXPLICIT, explicit_flags(namespace) | {dest})


class _StoreFlag(argparse.Action):
    """Store the value and remember that the user gave it (so a config file does not override it)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)
        _remember_explicit(namespace, self.dest)


class _StoreTuple(_StoreFlag):
    """Several words as one tuple (frozen configs stay hashable), remembered like _StoreFlag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, tuple(values), option_string)


class _SwitchFlag(argparse.BooleanOptionalAction):
    """`--flag` / `--no-flag`, remembered like _StoreFlag."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _remember_explicit(namespace, self.dest)


def explicit_flags(namespace: argparse.Namespace) -> set[str]:
    """The fields (dest names) whose flags were given on the command line, not left at their default."""
    return set(getattr(namespace, _EXPLICIT, ()))


def add_config_arguments(parser, cls, overrides: dict | None = None) -> None:
    """One `--flag-name` per dataclass field (Megatron's spelling); defaults from the class or `overrides`.

    Help text and choices come from the field's metadata (see flag_field), else from CHOICES.
    Flags the user gives are remembered on the namespace: see explicit_flags.
    """
    overrides = overrides or {}
    for f in fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = overrides.get(f.name, f.default)
        choices = f.metadata.get("choices") or CHOICES.get(f.name)
        parts = [f.metadata["help"].replace("%", "%%")] if f.metadata.get("help") else []
        parts += [f"one of {', '.join(map(str, choices))}"] if choices else []
        parts += ["default: %(default)s" + (" (derived)" if default is None and not parts else "")]
        text = "; ".join(parts)
        kind = str(f.type)
        if kind.startswith("bool"):
            action = parser.add_argument(flag, action=_SwitchFlag, default=default, help=text)
            action.help = text  # some Pythons append the default themselves; keep one
            continue
        if kind.startswith("tuple"):  # a list of words, e.g. --data-path 0.3 A 0.7 B
            parser.add_argument(flag, action=_StoreTuple, nargs="+", default=default, metavar=f.name.upper(), help=text)
            continue
        convert = int if "int" in kind else float if "float" in kind else str
        parser.add_argument(flag, action=_StoreFlag, type=convert, default=default, choices=choices,
                            metavar=f.name.upper(), help=text)


def config_from_arguments(args, cls):
    """Build the dataclass from the parsed flags that add_config_arguments added."""
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})
