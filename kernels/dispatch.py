"""Which implementation of an op runs: the one place that decides (DESIGN: backends behind one seam).

backend "torch" is the reference; "triton" the Triton kernel; "auto" the Triton kernel on CUDA
when triton is installed and the reference otherwise. Triton on a CPU runs only under its
interpreter (TRITON_INTERPRET=1, slow: tests and proofs), so asking for it without the
interpreter is refused, as is asking for triton when it is not installed: one line each, never
a silent fallback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")
OPS = ("rms_norm", "layer_norm", "flash_attention", "rope", "bias_gelu", "swiglu", "cross_entropy")


class KernelUnavailable(RuntimeError):
    """A kernel backend was asked for that cannot run here; the message says how to get it."""


def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def resolve_backend(device: torch.device | str, backend: str = "auto") -> str:
    """"torch" or "triton" for `backend` on `device`; KernelUnavailable (one line) when it cannot run."""
    device = torch.device(device)
    if backend not in BACKENDS:
        raise KernelUnavailable(f"kernel backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_installed() else "torch"
    if not triton_installed():
        raise KernelUnavailable("the triton kernel backend needs triton: pip install 'megalith[triton]'")
    if device.type == "cpu" and not interpreting():
        raise KernelUnavailable("Triton kernels run on a CPU only under the Triton interpreter: set "
                                "TRITON_INTERPRET=1 before starting (slow; for tests), or use the torch backend")
    if device.type not in ("cpu", "cuda"):
        raise KernelUnavailable(f"Triton kernels need a CUDA device (or a CPU under TRITON_INTERPRET=1), not {device}")
    return "triton"


def implementation(op: str, device: torch.device | str, backend: str = "auto"):
    """The callable for `op` under `backend` on `device`."""
    if op not in OPS:
        raise KernelUnavailable(f"no kernel op {op!r}; the ops are {', '.join(OPS)}")
    chosen = resolve_backend(device, backend)
    package = "megalith_kernels.reference" if chosen == "torch" else "megalith_kernels.triton_ops"
    return getattr(importlib.import_module(package), op)
