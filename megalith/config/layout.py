"""The layout: one frozen value naming every parallel axis, and every rule that ties them together.

`pretrain` resolves its Megatron flags into a Layout, `verify` parses its `--layouts` text into
one, and checkpoints, conversion, `topology` and the models all take it. It builds the RankGrid
(the process groups follow from the grid) and checks, in this one place, that a model's shapes
split over the axes. Adding an axis means a field here, its coordinates in the grid, and the
layer that uses it.

Text grammar (verify's `--layouts`): dotted tokens, e.g. `tp2.sp.pp2.vpp2.dp2.zero1.bf16`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from megalith.config.model import PRECISION_NAMES, RECOMPUTE_GRANULARITIES, ModelConfig
from megalith.config.validators import check_choice, check_divides, check_int
from megalith.errors import ConfigError
from megalith.parallel.grid import RankGrid
from megalith.parallel.pipeline.schedules import SCHEDULES, default_schedule
ZERO_STAGES = (0, 1, 2, 3)  # Megatron's no_shard, optim, optim_grads, optim_grads_params
# Axes the value already names but no layer implements yet: refused in one line until one does.
_NOT_YET = {"cp": ("context parallelism", "--context-parallel-size")}

_NUMBERED_TOKENS = {"tp": "tp", "pp": "pp", "vpp": "vpp", "cp": "cp", "ep": "ep", "etp": "etp", "dp": "dp",
                    "mb": "microbatches", "zero": "zero"}
LAYOUT_TOKENS = ("tpN", "ppN", "vppN", "cpN", "epN", "etpN", "dpN", "mbN", "sp", "zero1", "zero2", "zero3",
                 "recompute-full",
                 "recompute-selective", "bf16", "fp16") + SCHEDULES


@dataclass(frozen=True)
class Layout:
    """How a job is split over processes, and the per-layout options that change what each rank runs.

    tp, cp, dp, pp multiply to the world size (Megatron's order tp-cp-dp-pp, tp fastest); vpp is
    the virtual stages per pipeline rank; ep and etp factor the same ranks again for experts.
    `microbatches` (verify's `mbN`) splits each data-parallel rank's share of the global batch
    into N micro-batches (None: micro-batches of the reference's size). `zero` is the ZeRO
    stage (1: the distributed optimizer, 2: also gradients, 3: also parameters). `precision` is the parameters' dtype (fp32 main
    weights either way). `schedule` None means Megatron's default for pp and vpp.
    """

    # the axes whose product is the world size
    tp: int = 1
    cp: int = 1
    dp: int = 1
    pp: int = 1
    # virtual stages per pipeline rank; the experts' second factorisation of the same ranks
    # (etp x ep x edp x pp, edp = world / (etp x ep x pp); etp None: etp = tp)
    vpp: int = 1
    ep: int = 1
    etp: int | None = None
    # what each rank runs under the axes
    sequence_parallel: bool = False
    zero: int = 0
    recompute: str | None = None  # Megatron's --recompute-granularity: "full" or "selective"
    precision: str = "fp32"
    schedule: str | None = None
    microbatches: int | None = None

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "vpp", "cp", "ep", "dp"):
            check_int(name, getattr(self, name))
        check_int("etp", self.etp, optional=True)
        check_int("microbatches", self.microbatches, optional=True)
        check_choice("zero", self.zero, ZERO_STAGES, optional=False)
        check_choice("recompute", self.recompute, RECOMPUTE_GRANULARITIES)
        check_choice("precision", self.precision, PRECISION_NAMES, optional=False)
        check_choice("pipeline_schedule", self.schedule, SCHEDULES)

    def check_implemented(self) -> None:
        """Refuse, in one line, an axis this value can name but no layer runs yet (`topology` and
        the planner may describe such layouts; `pretrain` and `verify` cannot train them)."""
        for axis, (what, size_flag) in _NOT_YET.items():
            if getattr(self, axis) > 1:
                raise ConfigError(f"{size_flag} {getattr(self, axis)} is not supported yet ({what} is not implemented; "
                                  f"layout token {axis}{getattr(self, axis)}); use {size_flag} 1")

    @classmethod
    def over_world(cls, world_size: int, **axes) -> "Layout":
        """The layout whose dp is what the world leaves after tp x pp x cp (Megatron's rule)."""
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ConfigError(f"world size must be a positive integer, got {world_size!r}; launch >= 1 process")
        layout = cls(**axes)
        model_parallel = layout.tp * layout.pp * layout.cp
        if world_size % model_parallel != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by --tensor-model-parallel-size {layout.tp} x "
                f"--pipeline-model-parallel-size {layout.pp} x --context-parallel-size {layout.cp} = {model_parallel}; "
                f"launch a multiple of {model_parallel} processes or choose sizes whose product divides {world_size}"
            )
        layout = replace(layout, dp=world_size // model_parallel)
        layout.check_expert_axes()
        return layout

    @property
    def expert_tp(self) -> int:
        """etp, defaulting to tp (Megatron's --expert-tensor-parallel-size None)."""
        return self.tp if self.etp is None else self.etp

    def check_expert_axes(self) -> None:
        """etp x ep x pp must divide the world (the experts' data parallelism takes the rest)."""
        expert = self.expert_tp * self.ep * self.pp
        if self.world_size % expert:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by --expert-tensor-parallel-size {self.expert_tp} x "
                f"--expert-model-parallel-size {self.ep} x --pipeline-model-parallel-size {self.pp} = {expert}; "
                f"choose expert sizes whose product with pp divides {self.world_size}")

    def check_experts(self, num_experts: int | None) -> str | None:
        """Expert axes need experts, and ep must split them (Megatron's two checks); an etp other than
        tp without experts changes nothing: the notice to print (Megatron ignores it silently)."""
        if not num_experts:
            if self.ep > 1:
                raise ConfigError(f"--expert-model-parallel-size {self.ep} needs a mixture-of-experts model; add "
                                  "--num-experts or use --expert-model-parallel-size 1")
            if self.etp is not None and self.etp != self.tp:
                return (f"--expert-tensor-parallel-size {self.etp} applies to experts only and this model has none "
                        "(no --num-experts); ignored")
            return None
        if num_experts % self.ep:
            raise ConfigError(f"--num-experts {num_experts} is not divisible by --expert-model-parallel-size "
                              f"{self.ep}; every ep rank holds the same number of experts")
        return None

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def distributed_optimizer(self) -> bool:
        """Optimizer state sharded over dp (ZeRO stage 1 and up)."""
        return self.zero >= 1

    @property
    def sharded_gradients(self) -> bool:
        """Gradients kept only as this rank's shard past each reduction (ZeRO stage 2 and up)."""
        return self.zero >= 2

    @property
    def sharded_parameters(self) -> bool:
        """Parameters kept as shards, gathered unit by unit for forward and backward (ZeRO-3)."""
        return self.zero >= 3

    @property
    def pipeline_schedule(self) -> str:
        """The schedule asked for, else Megatron's default for this pp and vpp."""
        return self.schedule or default_schedule(self.pp, self.vpp)

    def grid(self, world_size: int | None = None) -> RankGrid:
        """The rank grid of this layout (over `world_size` ranks, which must equal the layout's)."""
        return RankGrid(self.world_size if world_size is None else world_size, tp=self.tp, pp=self.pp, cp=self.cp,
                        dp=self.dp, ep=self.ep, etp=self.etp)

    def check_model(self, config: ModelConfig) -> None:
        """Every shape that tensor (and sequence) parallelism splits must split evenly; the MoE layers'
        rules (check_moe)."""
        self.check_moe(config)
        tp, heads, groups = self.tp, config.num_attention_heads, config.num_query_groups
        check_divides(tp, heads * config.kv_channels, "hidden size")
        check_divides(tp, heads, "number of attention heads")
        check_divides(tp, groups, "number of query groups")
        check_divides(tp, config.ffn_hidden_size, "ffn hidden size")
        if not self.sequence_parallel:
            return
        for what, flag_name, length in (("sequence length", "--seq-length", config.seq_length),
                                        ("--decoder-seq-length", "--decoder-seq-length", config.decoder_seq_length)):
            if length is not None and length % tp != 0:
                raise ConfigError(
                    f"{what} {length} is not divisible by --tensor-model-parallel-size {tp} under "
                    f"--sequence-parallel; use a {flag_name} that is a multiple of {tp} or drop --sequence-parallel")

    def check_moe(self, config: ModelConfig) -> None:
        """What the MoE layers cannot run under this layout, one line each (nothing without --num-experts).
        Each refusal is a combination that is not proven exact against one process (issue 21)."""
        experts = config.num_experts
        if not experts:
            return
        self.check_experts(experts)
        tp, ep, etp = self.tp, self.ep, self.expert_tp
        size = f"--tensor-model-parallel-size {tp}"
        if tp > 1 and not self.sequence_parallel:
            raise ConfigError(f"MoE layers with {size} need --sequence-parallel (as Megatron); add it")
        check_divides(etp, config.moe_ffn_hidden_size, "--moe-ffn-hidden-size",
                      "--expert-tensor-parallel-size (default: the tensor-parallel size)")
        if config.moe_expert_capacity_factor is not None and (tp > 1 or etp > 1):
            raise ConfigError(f"--moe-expert-capacity-factor with {size} and --expert-tensor-parallel-size {etp} is "
                              "not built yet (issue 21: each rank would drop by its share of the tokens); drop "
                              "the capacity factor or use tp 1 and etp 1")
        if config.moe_router_load_balancing_type == "seq_aux_loss" and config.moe_aux_loss_coeff > 0 and tp > 1:
            raise ConfigError(f"--moe-router-load-balancing-type seq_aux_loss with {size} is not built yet (issue "
                              "21); use aux_loss")
        if etp != tp and tp > 1 and etp > 1:
            raise ConfigError(f"--expert-tensor-parallel-size {etp} with {size} is not built yet (issue 21); use "
                              f"--expert-tensor-parallel-size {tp} (the default) or 1")
        if config.add_bias_linear and etp > 1 and (ep > 1 or etp != tp):
            raise ConfigError(f"expert biases with --expert-model-parallel-size {ep} and --expert-tensor-parallel-size "
                              f"{etp} are not built yet (issue 21); give --disable-bias-linear or use etp 1")

    def apply_to(self, config: ModelConfig) -> ModelConfig:
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
        tokens = [f"tp{self.tp}"] if self.tp > 1 or (self.pp == 1 and self.dp == 1 and self.cp == 1) else []
        for axis in ("pp", "vpp", "cp", "ep", "dp"):
            tokens += [f"{axis}{getattr(self, axis)}"] if getattr(self, axis) > 1 else []
            tokens += [f"etp{self.etp}"] if axis == "ep" and self.etp is not None else []
        tokens += [f"mb{self.microbatches}"] if self.microbatches else []
        tokens += ["sp"] if self.sequence_parallel else []
        tokens += [f"zero{self.zero}"] if self.zero else []
        tokens += [f"recompute-{self.recompute}"] if self.recompute else []
        tokens += [self.precision] if self.precision != "fp32" else []
        return ".".join(tokens + ([self.schedule] if self.schedule else []))


def parse_layout(text: str) -> Layout:
    """`tp4.sp` -> Layout(tp=4, sequence_parallel=True); one clear line for anything else."""
    values: dict = {}
    for token in text.split("."):
        prefix = token.rstrip("0123456789")
        number = token[len(prefix):]
        if token in SCHEDULES:
            key, value = "schedule", token
        elif prefix in _NUMBERED_TOKENS and number.isdigit() and (int(number) >= 1 or prefix == "zero"):
            key, value = _NUMBERED_TOKENS[prefix], int(number)
        elif token == "sp":
            key, value = "sequence_parallel", True
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
