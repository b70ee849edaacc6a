"""Optional accelerated backends, picked in one place (DESIGN: optional accelerators behind one seam).

apex and Transformer Engine are CUDA-only and never required: they are looked for only on a
CUDA device, any failure to import them (missing, or built without CUDA) is a one-line notice,
and the plain-PyTorch path is used instead. On a CPU the plain path is the only one.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

FUSED_ADAM_CANDIDATES = (
    ("Transformer Engine FusedAdam", "transformer_engine.pytorch.optimizers", "FusedAdam"),
    ("apex FusedAdam", "apex.optimizers", "FusedAdam"),
)


@dataclass(frozen=True)
class Choice:
    """What was picked and, when an accelerated backend was passed over, why (one line)."""

    name: str
    notice: str | None = None


def _import(module: str, attribute: str):
    try:
        return getattr(importlib.import_module(module), attribute)
    except Exception as error:  # a CUDA-less build of TE raises more than ImportError
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")


def make_adam(param_groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
              device: torch.device) -> tuple[torch.optim.Optimizer, Choice]:
    """Adam with decoupled weight decay (Megatron's `--optimizer adam`): TE's or apex's fused
    kernel on CUDA when importable, otherwise torch's AdamW (fused on CUDA, foreach on CPU)."""
    missing = []
    if device.type == "cuda":
        for name, module, attribute in FUSED_ADAM_CANDIDATES:
            found = _import(module, attribute)
            if not isinstance(found, str):
                return found(param_groups, lr=lr, betas=betas, eps=eps, adam_w_mode=True), Choice(name)
            missing.append(f"{name} not available ({found})")
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=fused or None,
                                  foreach=None if fused else True)
    name = f"torch AdamW ({'fused' if fused else 'foreach'})"
    return optimizer, Choice(name, "; ".join(missing) + f"; using {name}" if missing else None)


def make_sgd(param_groups: list[dict], *, lr: float, momentum: float,
             device: torch.device) -> tuple[torch.optim.Optimizer, Choice]:
    """SGD with momentum; torch's implementation on every device."""
    fused = device.type == "cuda"
    optimizer = torch.optim.SGD(param_groups, lr=lr, momentum=momentum, fused=fused or None,
                                foreach=None if fused else True)
    return optimizer, Choice(f"torch SGD ({'fused' if fused else 'foreach'})")
