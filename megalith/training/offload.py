"""Optimizer CPU offload (Megatron's --optimizer-cpu-offload / --optimizer-offload-fraction).

A share of this rank's optimizer fragments keeps its fp32 main weights, its gradient staging and
its optimizer state (Adam's moments, SGD's momentum) in host memory (pinned when the device is
CUDA, so the copies are plain DMA) and is stepped there by torch's own AdamW / SGD (foreach);
the rest stays on the device with the device's optimizer. Which fragments: the first ones in the
optimizer's order until their elements reach the share (whole fragments, so the share rounds up;
0 offloads none, 1 all).

Everything before the update (unscaling, the global norm, the overflow check and clipping) still
runs on the device over all gradients, so the mathematics is the one of the run without offload:
the clipped gradients go device -> host just before the step, the updated weights host -> device
after it, and a skipped step (fp16 overflow) touches neither part. For fp32 parameters the device
weights stay the truth (without offload they *are* the main weights, and a checkpoint load writes
them there): the host copy is refreshed from them before each step, one extra copy that keeps
the optimizer's checkpoint identical to the run without offload. For bf16/fp16 parameters the
host copy is the main weight and is written back (cast) as the device copy would be.

On a CPU machine host and device are the same memory, but the offloaded fragments still get host
copies and an optimizer of their own, so the code path runs and is tested there.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Callable

import torch

from megalith.backends import Choice

HOST = torch.device("cpu")


def offloaded_count(sizes: list[int], fraction: float) -> int:
    """How many fragments, taken in order, go to the host: the fewest whose elements reach
    `fraction` of the total (rounded up to whole fragments)."""
    target, taken = fraction * sum(sizes), 0
    for count, size in enumerate(sizes):
        if taken >= target or fraction <= 0:
            return count
        taken += size
    return len(sizes)


class JoinedState(Mapping):
    """The per-parameter state of several optimizers as one mapping (read and written by the
    checkpoint as `inner.state[main]`): each key goes to the optimizer that owns the parameter."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self._owner = {id(p): part for part in parts for group in part.param_groups for p in group["params"]}
        self._parts = parts

    def __getitem__(self, param: torch.Tensor) -> dict:
        owner = self._owner.get(id(param))
        if owner is None:
            raise KeyError("not a parameter of this optimizer")
        return owner.state[param]  # a defaultdict: created on first use, as torch's own state

    def get(self, param, default=None):
        owner = self._owner.get(id(param))
        return default if owner is None else owner.state.get(param, default)

    def __contains__(self, param) -> bool:
        owner = self._owner.get(id(param))
        return owner is not None and param in owner.state

    def __iter__(self) -> Iterator[torch.Tensor]:
        for part in self._parts:
            yield from part.state

    def __len__(self) -> int:
        return sum(len(part.state) for part in self._parts)


class HybridOptimizer:
    """A device optimizer and a host one seen as one: `param_groups` lists both parts' groups
    (the caller sets each group's rate), `state` joins their states, `step` steps both (the
    device part first, so its kernels run while the host part computes)."""

    def __init__(self, parts: list[torch.optim.Optimizer]) -> None:
        self.parts = parts
        self.param_groups = [group for part in parts for group in part.param_groups]
        self.state = JoinedState(parts)

    def step(self) -> None:
        for part in self.parts:
            part.step()


class HostOffload:
    """The offloaded fragments of a ParallelOptimizer: built before its optimizer (it replaces
    each offloaded fragment's `main` by a host copy), then called around the inner step."""

    def __init__(self, fragments: list, fraction: float, device: torch.device) -> None:
        pin = device.type == "cuda"
        self.total = sum(f.main.numel() for f in fragments)
        self.fragments = fragments[:offloaded_count([f.main.numel() for f in fragments], fraction)]
        self.homes: list[torch.Tensor | None] = []  # fp32: the device weights the host main mirrors
        self.grads: list[torch.Tensor] = []  # host staging of the (unscaled, clipped) gradients
        for fragment in self.fragments:
            host = torch.empty(fragment.main.shape, dtype=torch.float32, pin_memory=pin)
            host.copy_(fragment.main)
            self.homes.append(fragment.main if fragment.model is None else None)
            self.grads.append(torch.empty(fragment.main.shape, dtype=torch.float32, pin_memory=pin))
            fragment.main, fragment.offloaded = host, True

    def make_inner(self, groups: list[dict], make: Callable, device: torch.device):
        """(HybridOptimizer, Choice): `make(groups, device=...)` (make_adam / make_sgd with the
        hyper-parameters bound) once for each part's share of every group."""
        host_ids = {id(f.main) for f in self.fragments}
        parts, names, notice = [], [], None
        for on_host in (False, True):
            share = [{**g, "params": [p for p in g["params"] if (id(p) in host_ids) == on_host]} for g in groups]
            share = [g for g in share if g["params"]]
            if not share:
                continue
            optimizer, choice = make(share, device=HOST if on_host else device)
            parts.append(optimizer)
            names.append(f"{choice.name} on the host" if on_host else choice.name)
            notice = notice if on_host else choice.notice
        elements = sum(f.main.numel() for f in self.fragments)
        share = f"{elements / self.total:.0%}" if self.total else "0%"
        name = " + ".join(names) + f" (offload: {len(self.fragments)} fragments, {share} of the elements)"
        return HybridOptimizer(parts), Choice(name, notice)

    def grads_to_host(self, grads: list[torch.Tensor]) -> None:
        """Stage the offloaded fragments' gradients (`grads`: every fragment's, in the optimizer's
        order, after unscaling and clipping) and refresh fp32 host mains from the device weights."""
        for fragment, staging, grad, home in zip(self.fragments, self.grads, grads[:len(self.fragments)], self.homes):
            staging.copy_(grad)
            fragment.main.grad = staging
            if home is not None:
                fragment.main.copy_(home)

    def weights_to_device(self) -> None:
        """Updated fp32 weights back to the device (bf16/fp16 ones go back through `fragment.model`)."""
        for fragment, home in zip(self.fragments, self.homes):
            if home is not None:
                home.copy_(fragment.main)

    def host_bytes(self, state: Mapping) -> int:
        """Host memory: main weights, gradient staging and optimizer state of the offloaded fragments."""
        tensors = [f.main for f in self.fragments] + self.grads
        tensors += [v for f in self.fragments for v in state.get(f.main, {}).values()
                    if torch.is_tensor(v) and v.dim() > 0]
        return sum(t.numel() * t.element_size() for t in tensors)
