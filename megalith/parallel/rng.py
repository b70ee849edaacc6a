"""Named random streams for tensor parallelism, and recompute that replays them.

Dropout on activations that every tp rank holds in full must draw the same mask on every
rank (the `TP_SHARED` stream); dropout on sharded activations — attention heads inside a
tensor-parallel region, or the sequence shard under sequence parallelism — must draw
different masks per rank (the `TP_LOCAL` stream). A tracker owns both streams as saved
generator states and swaps them in with `fork(name)`; it is an object passed to the model,
not a global.

`checkpoint(function, *args, rng_tracker=...)` drops the activations of `function` and
recomputes them in backward with the device RNG and the tracker's streams restored to their
forward-time states, so dropout masks are the same the second time.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch

from megalith import device as device_helper
from megalith.errors import ConfigError
from megalith.parallel.comm_ledger import active_ledger, counting

TP_SHARED = "tp-shared"
TP_LOCAL = "tp-local"
TP_LOCAL_SEED_OFFSET = 2718  # Megatron's offset for the tensor-parallel stream
PIPELINE_SEED_STRIDE = 100  # Megatron's per-stage seed offset


class RNGStatesTracker:
    """Named generator states for one device, swapped in and out around random ops."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._states: dict[str, torch.Tensor] = {}

    def add(self, name: str, seed: int) -> None:
        """Register a stream started from `seed`, leaving the current RNG state untouched."""
        if name in self._states:
            raise ConfigError(f"random stream {name!r} is already registered; use a new name or reset()")
        saved = device_helper.get_rng_state(self.device)
        device_helper.manual_seed(seed, self.device)
        self._states[name] = device_helper.get_rng_state(self.device)
        device_helper.set_rng_state(saved, self.device)

    def names(self) -> list[str]:
        return list(self._states)

    def get_states(self) -> dict[str, torch.Tensor]:
        """Copies of every stream's state (for checkpoints and recompute)."""
        return {name: state.clone() for name, state in self._states.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self._states = {name: state.clone() for name, state in states.items()}

    def reset(self) -> None:
        self._states = {}

    @contextlib.contextmanager
    def fork(self, name: str = TP_LOCAL) -> Iterator[None]:
        """Run the body with stream `name` as the device RNG; its advance is kept for next time."""
        if name not in self._states:
            raise ConfigError(f"random stream {name!r} is not registered; known: {', '.join(self._states) or 'none'}")
        outer = device_helper.get_rng_state(self.device)
        device_helper.set_rng_state(self._states[name], self.device)
        try:
            yield
        finally:
            self._states[name] = device_helper.get_rng_state(self.device)
            device_helper.set_rng_state(outer, self.device)


def model_parallel_rng_tracker(
    seed: int, tp_rank: int, device: torch.device | str = "cpu", pp_rank: int = 0
) -> RNGStatesTracker:
    """A tracker with the two tensor-parallel streams, seeded as Megatron does.

    TP_SHARED uses `seed + 100 * pp_rank` on every tp rank; TP_LOCAL adds 2718 + tp_rank.
    """
    base = seed + PIPELINE_SEED_STRIDE * pp_rank
    tracker = RNGStatesTracker(device)
    tracker.add(TP_SHARED, base)
    tracker.add(TP_LOCAL, base + TP_LOCAL_SEED_OFFSET + tp_rank)
    return tracker


def _capture(device: torch.device, tracker: RNGStatesTracker | None) -> tuple:
    cpu = torch.get_rng_state()
    accel = device_helper.get_rng_state(device) if device.type != "cpu" else None
    streams = tracker.get_states() if tracker is not None else None
    return cpu, accel, streams


def _restore(device: torch.device, tracker: RNGStatesTracker | None, states: tuple) -> None:
    cpu, accel, streams = states
    torch.set_rng_state(cpu)
    if accel is not None:
        device_helper.set_rng_state(accel, device)
    if streams is not None:
        tracker.set_states(streams)


class _Recompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, tracker, device, tensor_mask, *args):
        ctx.function, ctx.tracker, ctx.device, ctx.tensor_mask = function, tracker, device, tensor_mask
        ctx.rng_states = _capture(device, tracker)
        ctx.ledger = active_ledger()  # the recompute's collectives count where the forward's did
        ctx.constants = [None if is_tensor else arg for arg, is_tensor in zip(args, tensor_mask)]
        ctx.save_for_backward(*(arg for arg, is_tensor in zip(args, tensor_mask) if is_tensor))
        with torch.no_grad():
            return function(*args)

    @staticmethod
    def backward(ctx, *grads):
        tensors = iter(ctx.saved_tensors)
        inputs = []
        for constant, is_tensor in zip(ctx.constants, ctx.tensor_mask):
            if is_tensor:
                saved = next(tensors)
                inputs.append(saved.detach().requires_grad_(saved.requires_grad))
            else:
                inputs.append(constant)
        now = _capture(ctx.device, ctx.tracker)
        _restore(ctx.device, ctx.tracker, ctx.rng_states)
        try:
            with torch.enable_grad(), counting(ctx.ledger):
                outputs = ctx.function(*inputs)
        finally:
            _restore(ctx.device, ctx.tracker, now)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else tuple(outputs)
        pairs = [(o, g) for o, g in zip(outputs, grads) if isinstance(o, torch.Tensor) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(x.grad if isinstance(x, torch.Tensor) else None for x in inputs)
        return (None, None, None, None) + input_grads


def checkpoint(function: Callable[..., Any], *args: Any, rng_tracker: RNGStatesTracker | None = None):
    """Run `function(*args)` without keeping its activations; recompute them in backward.

    At least one tensor argument must require grad (as with any reentrant checkpoint).
    """
    tensor_mask = tuple(isinstance(arg, torch.Tensor) for arg in args)
    if not any(tensor_mask):
        raise ConfigError("checkpoint needs at least one tensor argument")
    device = next(arg.device for arg in args if isinstance(arg, torch.Tensor))
    return _Recompute.apply(function, rng_tracker, device, tensor_mask, *args)
