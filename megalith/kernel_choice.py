"""Which implementation runs each piece of a model: the one place that decides (DESIGN principle 5).

`resolve_kernels(config, device)` turns the model's flags (`--kernel-backend`,
`--attention-backend`, `--transformer-impl`, the `--no-*-fusion` switches, the fp8 flags) and
the device into a frozen `KernelChoice`; the models read that record and never the flags.
Anything asked for by name that cannot run here (triton, Transformer Engine, apex, fp8) is a
one-line ConfigError raised while the config is checked, before any process group exists;
anything megalith runs differently from what a flag names is a notice line.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from megalith.errors import ConfigError

TE_MODULE = "transformer_engine.pytorch"
APEX_MODULE = "apex.normalization"
TE_MISSING = ("--transformer-impl transformer_engine needs Transformer Engine on CUDA: pip install "
              "'megalith[te]' on a CUDA machine, or use --transformer-impl local")
FP8_FORMATS = {"e4m3": "E4M3", "hybrid": "HYBRID"}


@dataclass(frozen=True)
class Fp8Settings:
    """Transformer Engine's delayed-scaling recipe, as Megatron builds it from its fp8 flags."""

    format: str  # e4m3 | hybrid
    margin: int = 0
    amax_history_len: int = 1
    amax_compute_algo: str = "most_recent"
    param_gather: bool = False

    def recipe(self):
        """TE's DelayedScaling for these settings (imports TE: call it only when TE is chosen)."""
        recipe = importlib.import_module("transformer_engine.common.recipe")
        return recipe.DelayedScaling(margin=self.margin, fp8_format=getattr(recipe.Format, FP8_FORMATS[self.format]),
                                     amax_history_len=self.amax_history_len,
                                     amax_compute_algo=self.amax_compute_algo)


@dataclass(frozen=True)
class KernelChoice:
    """What computes each piece. `backend` is what megalith_kernels runs ("torch": the references).

    norm: torch | triton | apex | te; attention: unfused | sdpa | flash | te (a layer with an
    additive bias, T5's relative positions, runs sdpa instead of flash or te: see `attention_for`);
    rope, activation: torch | kernels; cross_entropy: torch | triton | te; linears: local | te.
    """

    backend: str = "torch"
    norm: str = "torch"
    attention: str = "sdpa"
    rope: str = "torch"
    activation: str = "torch"
    cross_entropy: str = "torch"
    linears: str = "local"
    fp8: Fp8Settings | None = None
    notices: tuple[str, ...] = ()

    def attention_for(self, has_bias: bool) -> str:
        """The path of one attention: flash and TE take no additive bias, so such a layer runs SDPA."""
        return "sdpa" if has_bias and self.attention in ("flash", "te") else self.attention

    @property
    def plain(self) -> bool:
        """True when only torch's own code runs (the references, SDPA or the explicit matmuls)."""
        return (self.backend, self.norm, self.rope, self.activation, self.cross_entropy, self.linears) == (
            "torch", "torch", "torch", "torch", "torch", "local") and self.attention in ("sdpa", "unfused")

    def describe(self) -> str:
        """One line for the start-up log: what ran."""
        fp8 = f", fp8 {self.fp8.format}" if self.fp8 else ""
        return (f"kernels: norm {self.norm}, attention {self.attention}, rope {self.rope}, activation "
                f"{self.activation}, cross-entropy {self.cross_entropy}, linears {self.linears} "
                f"(megalith_kernels backend {self.backend}){fp8}")


def importable(module: str) -> bool:
    """True when `module` imports (a CUDA-less build of TE or apex raises more than ImportError)."""
    try:
        importlib.import_module(module)
    except Exception:
        return False
    return True


def kernels_backend(requested: str, device: torch.device) -> str:
    """"torch" or "triton" for megalith_kernels; dispatch's KernelUnavailable becomes a ConfigError."""
    from megalith_kernels import KernelUnavailable, resolve_backend

    try:
        return resolve_backend(device, "auto" if requested == "apex" else requested)
    except KernelUnavailable as error:
        raise ConfigError(f"--kernel-backend {requested}: {error}") from None


def _norm(config, device: torch.device, backend: str, te: bool) -> str:
    """te with TE; apex when asked for (refused without it) or, under auto on CUDA, when it imports; else the backend."""
    if te:
        return "te"
    apex_wanted = config.kernel_backend == "apex"
    apex_found = device.type == "cuda" and importable(APEX_MODULE)
    if apex_wanted and not apex_found:
        raise ConfigError("--kernel-backend apex needs apex built with CUDA (apex.normalization's FusedLayerNorm and "
                          "FusedRMSNorm) on a CUDA device: install NVIDIA apex, or use --kernel-backend auto")
    if apex_wanted or (config.kernel_backend == "auto" and apex_found):
        return "apex"
    return backend


def _attention(config, device: torch.device, backend: str, te: bool, notices: list[str]) -> str:
    name = config.attention_backend
    if name in ("unfused", "local"):
        return "unfused"
    if name == "sdpa":
        return "sdpa"
    if name == "fused":
        if te:
            return "te"
        notices.append("--attention-backend fused: torch SDPA (it picks a fused kernel itself); TE's fused attention "
                       "needs --transformer-impl transformer_engine")
        return "sdpa"
    if name == "auto":  # Megatron's auto: TE's attention with TE; here the Triton kernel where it runs natively
        if te:
            return "te"
        return "flash" if device.type == "cuda" and backend == "triton" and config.attention_dropout == 0 else "sdpa"
    if config.attention_dropout > 0:
        raise ConfigError(f"--attention-backend flash has no attention dropout (the Triton kernel draws none); set "
                          f"--attention-dropout 0 (it is {config.attention_dropout:g}) or use --attention-backend sdpa")
    if backend == "torch":
        notices.append("--attention-backend flash: megalith_kernels.flash_attention's PyTorch reference (the Triton "
                       "kernel needs CUDA with triton, or --kernel-backend triton under TRITON_INTERPRET=1)")
    return "flash"


def _activation(config, backend: str, notices: list[str]) -> str:
    if backend != "triton" or config.activation == "relu":
        return "torch"
    if config.swiglu:
        return "kernels" if config.bias_swiglu_fusion else "torch"
    if not config.bias_gelu_fusion:
        return "torch"
    if not config.openai_gelu:
        notices.append("bias-GeLU fusion: megalith_kernels.bias_gelu is tanh-approximate (as Megatron's); the exact "
                       "GELU runs unfused (F.gelu); --openai-gelu selects the fused kernel")
        return "torch"
    return "kernels"


def _cross_entropy(config, backend: str, te: bool) -> str:
    if not config.cross_entropy_loss_fusion:
        return "torch"
    if config.cross_entropy_fusion_impl == "te":
        if not te:
            raise ConfigError("--cross-entropy-fusion-impl te needs Transformer Engine: use --transformer-impl "
                              "transformer_engine on CUDA with TE installed, or --cross-entropy-fusion-impl native")
        return "te"
    return "triton" if backend == "triton" else "torch"


def _fp8(config, te: bool) -> Fp8Settings | None:
    if config.fp8_format is None:
        if config.fp8_param_gather:
            raise ConfigError("--fp8-param-gather keeps parameters in fp8 and needs --fp8-format e4m3 or hybrid")
        return None
    if not te:
        raise ConfigError(f"--fp8-format {config.fp8_format} needs Transformer Engine on CUDA with --transformer-impl "
                          "transformer_engine; drop --fp8-format or run with Transformer Engine")
    return Fp8Settings(config.fp8_format, config.fp8_margin, config.fp8_amax_history_len,
                       config.fp8_amax_compute_algo, config.fp8_param_gather)


def resolve_kernels(config, device: torch.device | str | None = None) -> KernelChoice:
    """The record of what runs `config` on `device` (None: the CPU); ConfigError (one line) for what cannot."""
    device = torch.device(device or "cpu")
    notices: list[str] = []
    te = config.transformer_impl == "transformer_engine"
    if te and not (device.type == "cuda" and importable(TE_MODULE)):
        raise ConfigError(TE_MISSING)
    fp8 = _fp8(config, te)
    backend = kernels_backend(config.kernel_backend, device)
    norm = _norm(config, device, backend, te)
    attention = _attention(config, device, backend, te, notices)
    if attention in ("flash", "te") and config.position_embedding_type == "relative":
        notices.append(f"--attention-backend {config.attention_backend}: the self-attention layers add T5's relative "
                       f"position bias, which {attention} attention takes none of; they run torch SDPA (cross-attention "
                       f"runs {attention})")
    rope = "kernels" if backend == "triton" and config.rope_fusion else "torch"
    unused = [name for name, on in (("--no-bias-dropout-fusion", not config.bias_dropout_fusion),
                                    ("--no-masked-softmax-fusion", not config.masked_softmax_fusion),
                                    ("--no-persist-layer-norm", not config.persist_layer_norm)) if on]
    if unused:
        notices.append(f"{', '.join(unused)}: megalith has no such fused kernel to turn off; the same math runs")
    return KernelChoice(backend=backend, norm=norm, attention=attention, rope=rope,
                        activation=_activation(config, backend, notices),
                        cross_entropy=_cross_entropy(config, backend, te), linears="te" if te else "local", fp8=fp8,
                        notices=tuple(notices))


def kernels_of(config, ctx) -> KernelChoice:
    """The record a model's layers read: the one its ParallelContext carries, else resolved for its device."""
    choice = getattr(ctx, "kernels", None)
    return choice if choice is not None else resolve_kernels(config, getattr(ctx, "device", None))
