"""The one place that talks to CUDA.

Everything else asks this module for the device, the backend and RNG state, so the same code
runs on a CPU with gloo and on GPUs with NCCL (DESIGN.md principle 4).
"""

from __future__ import annotations

import torch

from megalith.errors import ConfigError

KNOWN_BACKENDS = ("gloo", "nccl")


def cuda_available() -> bool:
    """True when a usable CUDA device is present."""
    return torch.cuda.is_available()


def default_backend() -> str:
    """nccl where CUDA is available, gloo otherwise."""
    return "nccl" if cuda_available() else "gloo"


def check_backend(backend: str) -> str:
    """Validate a backend name before any process group is created."""
    if backend not in KNOWN_BACKENDS:
        raise ConfigError(
            f"unknown distributed backend {backend!r}; use one of {', '.join(KNOWN_BACKENDS)}"
        )
    if backend == "nccl" and not cuda_available():
        raise ConfigError("backend 'nccl' needs CUDA, which is not available; use --distributed-backend gloo")
    return backend


def backend_for_run(requested: str | None) -> tuple[str, str | None]:
    """The backend a training run uses, and a notice when it differs from the one asked for.

    `--distributed-backend nccl` on a machine without CUDA (a Megatron launch script run on a
    CPU) falls back to gloo with one line, as the run would otherwise stop before it starts;
    an unknown name is still refused.
    """
    if requested is None:
        return default_backend(), None
    if requested == "nccl" and requested in KNOWN_BACKENDS and not cuda_available():
        return "gloo", "--distributed-backend nccl needs CUDA, which is not available; using gloo"
    return check_backend(requested), None


def device_for(backend: str, local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK under NCCL, cpu under gloo."""
    if backend == "nccl":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def bind_device(device: torch.device) -> None:
    """Make `device` the current device of this process (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)


def get_rng_state(device: torch.device) -> torch.Tensor:
    """The RNG state of the generator that drives random ops on `device`."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    """Restore an RNG state captured by get_rng_state."""
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def manual_seed(seed: int, device: torch.device) -> None:
    """Seed the generator of `device` only (leaves the other generators alone)."""
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def synchronize(device: torch.device) -> None:
    """Wait for queued work on `device` (for timing); CPU work is already done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_cache(device: torch.device) -> None:
    """Hand the caching allocator's unused blocks back to the driver (a no-op off CUDA)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_stats(device: torch.device) -> dict[str, int]:
    """The allocator's counters Megatron plots (bytes allocated, reserved, peak; live allocations);
    {} off CUDA, where PyTorch keeps no such counters."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {"allocated_bytes": stats.get("allocated_bytes.all.current", 0),
            "reserved_bytes": stats.get("reserved_bytes.all.current", 0),
            "max_allocated_bytes": stats.get("allocated_bytes.all.peak", 0),
            "allocation_count": stats.get("allocation.all.current", 0)}


def report_memory_counters(device: torch.device) -> dict[str, int]:
    """Megatron's report_memory numbers (bytes allocated, max allocated, reserved, max reserved);
    {} off CUDA."""
    if device.type != "cuda":
        return {}
    return {"allocated": torch.cuda.memory_allocated(device), "max allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.memory_reserved(device), "max reserved": torch.cuda.max_memory_reserved(device)}
