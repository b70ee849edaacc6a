"""ZeRO-3 (--data-parallel-sharding-strategy optim_grads_params): parameters kept as 1/dp shards,
gathered unit by unit for forward and backward and freed after.

Units: each transformer layer (an element of a `layers` ModuleDict/ModuleList) is one unit;
everything else of the chunk (embeddings, final norm, output layer, tied head copy, heads) is
the chunk's root unit, gathered when the chunk's forward starts and kept until that
micro-batch's backward of the chunk is done: the model reads some of those parameters
directly, not through a module call a hook could see.

Each unit's parameters are fixed views into full-size flat buffers (one per bucket of the
data-parallel buffer; a unit has one bucket, the root one more when a tied embedding needs its
own). Freeing resizes a buffer's storage to 0 and gathering resizes it back and all-gathers
into it, so the views autograd saved in forward stay valid for backward. Writing into the
buffer keeps its version counter: the values gathered are the ones forward saw.

A reference count decides gather and free, so full recompute (forward re-run inside
backward) and 1F1B's interleaving of micro-batches stay correct: +1 at a layer's forward
pre-hook, -1 at its forward hook; +1 when the gradient of the layer's output arrives (a tensor
hook, before the layer's backward runs), -1 when every parameter of the unit has had its
post-accumulate hook in that backward (so a zero-bubble W pass, which fires them later, is
waited for). The root: +1 at the chunk's forward pre-hook, -1 when its parameters' gradients
are all in (or at once when the forward builds no graph). `release_all` at the end of a step
frees whatever a parameter without gradient left held.

With `prefetch` (--overlap-param-gather) a layer's forward starts the all-gather of the next
layer (forward order), and its backward the one of the layer before, asynchronously.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from megalith.parallel.comm import all_gather_into
from megalith.parallel.comm_ledger import active_ledger


def find_units(module: nn.Module, params: list[nn.Parameter]) -> list[list[nn.Parameter]]:
    """[root unit, layer units in forward (registration) order]: each a list of trainable params."""
    wanted = {id(p) for p in params}
    layers: list[nn.Module] = []
    for sub in module.modules():
        group = getattr(sub, "layers", None)
        if isinstance(group, (nn.ModuleDict, nn.ModuleList)):
            layers += list(group.values()) if isinstance(group, nn.ModuleDict) else list(group)
    taken: set[int] = set()
    units = []
    for layer in layers:
        own = [p for p in layer.parameters() if id(p) in wanted and id(p) not in taken]
        taken.update(id(p) for p in own)
        units.append(own)
    root = [p for p in params if id(p) not in taken]
    return [root] + units


@dataclass(eq=False)
class Unit:
    """One gather/free unit: its buckets (of the data-parallel buffer) and reference count."""

    index: int  # 0: the root; 1.. the layers in forward order
    modules: list[nn.Module]
    buckets: list = field(default_factory=list)
    param_ids: frozenset = frozenset()
    holds: int = 0
    backward_holds: int = 0  # gathers for a backward still to finish
    state: str = "free"  # "free", "inflight" (an async gather started) or "full"
    works: list = field(default_factory=list)
    pending: set = field(default_factory=set)  # parameters whose gradient this backward still lacks

    @property
    def nbytes(self) -> int:
        return sum(b.size * b.param_full.element_size() for b in self.buckets)


class ParameterUnits:
    """The gather/free machinery of one chunk's sharded parameters (owned by DataParallelGrads)."""

    def __init__(self, buffer, module: nn.Module, units: list[list[nn.Parameter]], prefetch: bool) -> None:
        self.buffer, self.prefetch = buffer, prefetch
        self.units: list[Unit] = []
        self.unit_of: dict[int, Unit] = {}
        for index, params in enumerate(units):
            unit = Unit(index, [], param_ids=frozenset(id(p) for p in params))
            unit.pending = set(unit.param_ids)
            self.units.append(unit)
            for p in params:
                self.unit_of[id(p)] = unit
        for bucket in buffer.buckets:
            self.unit_of[id(bucket.params[0])].buckets.append(bucket)
        self.gathered_bytes = 0
        self.peak_bytes = 0
        self._install(module)

    # --- gather / free ----------------------------------------------------------------------

    def _ledger(self):
        return active_ledger() or self.buffer._ledger

    def _start(self, unit: Unit, async_op: bool) -> None:
        buffer = self.buffer
        for bucket in unit.buckets:
            full = bucket.param_full
            full.untyped_storage().resize_(bucket.size * full.element_size())
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(full):
                if buffer.dp_size == 1:
                    full.copy_(bucket.param_shard)
                else:
                    work = all_gather_into(full, bucket.param_shard, buffer.dp_group, async_op=async_op,
                                           ledger=self._ledger())
                    if async_op:
                        unit.works.append(work)
        self.gathered_bytes += unit.nbytes
        self.peak_bytes = max(self.peak_bytes, self.gathered_bytes)
        unit.state = "inflight" if unit.works else "full"

    def _wait(self, unit: Unit) -> None:
        for work in unit.works:
            work.wait()
        unit.works = []
        unit.state = "full"

    def _free(self, unit: Unit) -> None:
        if unit.state == "free":
            return
        self._wait(unit)
        for bucket in unit.buckets:
            bucket.param_full.untyped_storage().resize_(0)
        self.gathered_bytes -= unit.nbytes
        unit.state = "free"

    def gather(self, unit: Unit) -> None:
        """Hold the unit's full parameters (gathering them unless already held or in flight)."""
        if not unit.buckets:
            return
        if unit.state == "free":
            self._start(unit, async_op=False)
        self._wait(unit)
        unit.holds += 1

    def release(self, unit: Unit) -> None:
        if not unit.buckets or unit.holds == 0:
            return
        unit.holds -= 1
        if unit.holds == 0:
            self._free(unit)

    def _prefetch(self, index: int) -> None:
        if self.prefetch and 1 <= index < len(self.units):
            unit = self.units[index]
            if unit.buckets and unit.state == "free":
                self._start(unit, async_op=True)

    def release_all(self) -> None:
        """End of a step: nothing stays gathered (a unit whose parameters got no gradient stays held)."""
        for unit in self.units:
            unit.holds = unit.backward_holds = 0
            unit.pending = set(unit.param_ids)
            self._free(unit)

    @contextmanager
    def gathered(self) -> Iterator[None]:
        """Every unit's full parameters for code outside forward (checks, checkpoint save)."""
        for unit in self.units:
            self.gather(unit)
        try:
            yield
        finally:
            for unit in self.units:
                self.release(unit)

    # --- hooks ----------------------------------------------------------------------------------

    def _install(self, module: nn.Module) -> None:
        root = self.units[0]
        module.register_forward_pre_hook(lambda mod, args: self.gather(root))
        module.register_forward_hook(lambda mod, args, out: None if torch.is_grad_enabled() else self.release(root))
        layers = []
        for sub in module.modules():
            group = getattr(sub, "layers", None)
            if isinstance(group, (nn.ModuleDict, nn.ModuleList)):
                layers += list(group.values()) if isinstance(group, nn.ModuleDict) else list(group)
        for unit, layer in zip(self.units[1:], layers):
            unit.modules.append(layer)
            layer.register_forward_pre_hook(lambda mod, args, unit=unit: self._before_forward(unit))
            layer.register_forward_hook(lambda mod, args, out, unit=unit: self._after_forward(unit, out))

    def _before_forward(self, unit: Unit) -> None:
        self.gather(unit)
        self._prefetch(unit.index + 1)

    def _after_forward(self, unit: Unit, output) -> None:
        first = output
        if isinstance(output, (tuple, list)):
            first = next((t for t in output if torch.is_tensor(t) and t.requires_grad), None)
        if torch.is_tensor(first) and first.requires_grad and torch.is_grad_enabled():
            first.register_hook(lambda grad, unit=unit: self._before_backward(unit))
        self.release(unit)

    def _before_backward(self, unit: Unit) -> None:
        self.gather(unit)
        unit.backward_holds += 1
        self._prefetch(unit.index - 1)

    def after_gradient(self, param: nn.Parameter) -> None:
        """A parameter's post-accumulate hook fired: the unit's backward is over when all have."""
        unit = self.unit_of.get(id(param))
        if unit is None:
            return
        unit.pending.discard(id(param))
        if unit.pending:
            return
        unit.pending = set(unit.param_ids)
        if unit.index == 0:
            self.release(unit)
        elif unit.backward_holds > 0:
            unit.backward_holds -= 1
            self.release(unit)
