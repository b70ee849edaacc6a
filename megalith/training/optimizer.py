"""The optimizer step of a parallel job: fp32 main weights, loss-scale unscaling, overflow skip,
global-norm clipping, and (optionally) ZeRO-1/2/3 sharding over data parallelism.

The optimizer works on *fragments*: for each parameter, the part of it this rank updates.
Without the distributed optimizer a fragment is the whole parameter; with it
(`DataParallelGrads(shard=True)`) it is the intersection of the parameter with this dp rank's
slice of each bucket, so main weights and Adam state exist once across dp (Megatron's
distributed optimizer). Adam is element-wise, so updating fragments is the same mathematics
as updating whole tensors. ZeRO-2 and ZeRO-3 change only where a fragment's gradient (the
buffer's `grad_slice`: the persistent shard) and parameters (`param_slice`: ZeRO-3's shard,
which nothing all-gathers after the step) live.

Main weights are fp32: for fp32 parameters the fragment is a view of the parameter itself
(nothing is copied); for bf16/fp16 parameters it is an fp32 copy, written back (cast) after
each step. Gradients come from the data-parallel buffer (`main_grad`), in fp32 when the buffer
is fp32, otherwise cast.

The global gradient norm counts every parameter exactly once across tp, pp and dp: a parameter
replicated over tp (no `tensor_parallel_dim`: norms, row-parallel biases, positions) only on tp
rank 0; the tied embedding's copy on the last stage (`is_tied_copy`) not at all; a sharded
fragment on the one dp rank that owns it. Its square is summed over dp (sharded) and the
model-parallel group, together with the squares of the gradients not counted (so that every
gradient is checked): a non-finite sum is an overflow, agreed by every rank, and skips the step.

Expert parameters (buffers with `expert`, reduced over edp) are counted the same way on the
experts' axes: a replicated one only on expert-tp rank 0, a sharded fragment on the one edp
rank that owns it; their squares are summed over edp (sharded) and the expert model-parallel
group (etp x ep x pp), which holds each (etp, ep, pp) position once for one edp index, so every
expert shard enters the norm exactly once; the two sums are then added.

With `--decoupled-lr` the word embedding and the output layer (the tied head copy included,
position embeddings not: Megatron's `is_embedding_or_output_parameter`) form groups of their
own whose rate follows the same warm-up and decay from `--decoupled-lr` to `--decoupled-min-lr`
(else `--min-lr`); `step` takes both rates as `LearningRates`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from functools import partial

import torch

from megalith.backends import Choice, make_adam, make_sgd
from megalith.errors import ConfigError
from megalith.parallel.comm import all_reduce, group_rank, group_size
from megalith.parallel.data_parallel import DataParallelGrads
from megalith.config.optimizer import OPTIMIZER_NAMES
from megalith.training.offload import HostOffload


@dataclass(eq=False)
class Fragment:
    """The part [start, end) (in buffer elements) of one parameter that this rank updates."""

    main: torch.Tensor  # fp32; what the inner optimizer updates
    model: torch.Tensor | None  # the parameter's elements to write back (None: main is a view of them)
    grad: torch.Tensor  # the buffer's elements (the dp-reduced gradient)
    decay: bool
    counted: bool  # in the global norm on this rank
    name: str = ""  # the parameter's name in its chunk (global layer indices: unique across chunks)
    offset: int = 0  # where [start, end) begins inside the flattened parameter
    decoupled: bool = False  # in the --decoupled-lr groups (word embedding, output layer)
    offloaded: bool = False  # main (and state) in host memory (--optimizer-cpu-offload): see offload.py
    expert: bool = False  # an expert parameter's (reduced over edp; its norm sums over the expert groups)


@dataclass(frozen=True)
class LearningRates:
    """The rates of one step: `main` for every parameter, `decoupled` for the word embedding and
    output layer under --decoupled-lr (None: no decoupled rate)."""

    main: float
    decoupled: float | None = None


def learning_rates(scheduler, config) -> LearningRates:
    """Both rates at the scheduler's current point. The decoupled rate is the same schedule (warm-up
    from --lr-warmup-init, decay style, lengths) with --decoupled-lr as its peak and
    --decoupled-min-lr (else --min-lr) as its floor, as Megatron's per-group max_lr / min_lr."""
    if config.decoupled_lr is None:
        return LearningRates(scheduler.lr)
    twin = copy.copy(scheduler)  # shares the position (steps or samples), not the peak
    floor = config.min_lr if config.decoupled_min_lr is None else config.decoupled_min_lr
    twin.schedule = replace(scheduler.schedule, lr=config.decoupled_lr, min_lr=floor)
    return LearningRates(scheduler.lr, twin.lr)


EMBEDDING_OR_OUTPUT = ("word_embeddings.weight", "word_embeddings_for_head.weight", "output_layer.weight")


def is_embedding_or_output(name: str, param: torch.Tensor) -> bool:
    """Megatron's `is_embedding_or_output_parameter`: the attribute when a model sets it, else the
    built-in models' names of the word embedding, its head copy and the untied output layer."""
    marked = getattr(param, "is_embedding_or_output_parameter", None)
    if marked is not None:
        return bool(marked)
    return any(name == known or name.endswith("." + known) for known in EMBEDDING_OR_OUTPUT)


@dataclass(frozen=True)
class StepOutcome:
    skipped: bool  # non-finite gradients (fp16 overflow): no update this step
    grad_norm: float | None  # before clipping; None when skipped
    loss_scale: float


def _no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Megatron: biases and one-dimensional parameters (norm weights) get no weight decay."""
    return name.endswith(".bias") or param.dim() == 1


def _counted_in_norm(param: torch.Tensor, tp_rank: int) -> bool:
    if getattr(param, "is_tied_copy", False):
        return False
    return getattr(param, "tensor_parallel_dim", None) is not None or tp_rank == 0


class ParallelOptimizer:
    """AdamW or SGD over the fragments of every chunk's buffer, with unscale, skip, clip, write back."""

    def __init__(self, buffers: list[DataParallelGrads], config, *, tp_group=None, mp_group=None,
                 loss_scaler=None, etp_group=None, emp_group=None) -> None:
        """`etp_group`, `emp_group` (expert tensor, expert model parallel): for the buffers of expert
        parameters, which count in the norm as `tp_group`, `mp_group` do for the others."""
        if config.optimizer not in OPTIMIZER_NAMES:
            raise ConfigError(f"--optimizer {config.optimizer!r} is not one of {', '.join(OPTIMIZER_NAMES)}")
        if config.clip_grad < 0:
            raise ConfigError(f"--clip-grad must be >= 0 (0 turns clipping off), got {config.clip_grad}")
        self.buffers, self.config, self.loss_scaler = buffers, config, loss_scaler
        self.mp_group = mp_group
        self.sharded = any(b.shard for b in buffers)
        dense = [b for b in buffers if not b.expert]
        self.dp_group = dense[0].dp_group if self.sharded and dense else None
        experts = [b for b in buffers if b.expert]
        self.emp_group = emp_group
        self.edp_group = experts[0].dp_group if self.sharded and experts else None
        self.has_experts = bool(experts)
        tp_rank, etp_rank = group_rank(tp_group), group_rank(etp_group)
        self.fragments = [f for b in buffers for f in self._fragments(b, etp_rank if b.expert else tp_rank)]
        self._counted = torch.tensor([f.counted for f in self.fragments], dtype=torch.bool,
                                     device=buffers[0].grad_data.device)
        self._expert = torch.tensor([f.expert for f in self.fragments], dtype=torch.bool,
                                    device=buffers[0].grad_data.device)
        device = buffers[0].grad_data.device
        self.offload = (HostOffload(self.fragments, config.optimizer_offload_fraction, device)
                        if config.optimizer_cpu_offload else None)
        decoupled = config.decoupled_lr is not None
        groups = []
        for own_lr in ((False, True) if decoupled else (False,)):
            for decay, weight_decay in ((True, config.weight_decay), (False, 0.0)):
                params = [f.main for f in self.fragments if f.decay == decay and (f.decoupled and decoupled) == own_lr]
                if params:
                    groups.append({"params": params, "weight_decay": weight_decay, "decoupled": own_lr})
        if config.optimizer == "adam":
            make = partial(make_adam, lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
        else:
            make = partial(make_sgd, lr=config.lr, momentum=config.sgd_momentum)
        self.inner, self.choice = (make(groups, device=device) if self.offload is None
                                   else self.offload.make_inner(groups, make, device))

    @staticmethod
    def _fragments(buffer: DataParallelGrads, tp_rank: int) -> list[Fragment]:
        fragments = []
        for bucket in buffer.buckets:
            low, high = buffer.shard_range(bucket)
            for param in bucket.params:
                start, end = buffer.ranges[id(param)]
                a, b = max(start, low), min(end, high)
                if a >= b:
                    continue
                flat = buffer.param_slice(a, b) if buffer.shard else param.data.view(-1)[a - start:b - start]
                fp32 = flat.dtype == torch.float32
                main = flat if fp32 else flat.float()
                name = buffer.names[id(param)]
                fragments.append(Fragment(main, None if fp32 else flat, buffer.grad_slice(a, b),
                                          decay=not _no_weight_decay(name, param),
                                          counted=_counted_in_norm(param, tp_rank), name=name, offset=a - start,
                                          decoupled=is_embedding_or_output(name, param), expert=buffer.expert))
        return fragments

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    def zero_grad(self) -> None:
        for buffer in self.buffers:
            buffer.zero_grad()

    def _sum_over_ranks(self, value: torch.Tensor, groups: tuple | None = None) -> torch.Tensor:
        for group in groups or (self.dp_group, self.mp_group):
            if group_size(group) > 1:
                all_reduce(value, group)
        return value

    def _squares(self, grads: list[torch.Tensor], expert: bool | None = None) -> torch.Tensor:
        """[squares counted in the global norm, squares of the others] on this rank, float64
        (`expert` None: every fragment; True / False: the expert fragments or the others).
        Every gradient takes part in the overflow check (Megatron checks all main grads), so
        an inf in a gradient this rank does not count in the norm still skips the step."""
        squares = torch.zeros(2, dtype=torch.float64, device=self.buffers[0].grad_data.device)
        if grads:
            per_fragment = torch.stack(torch._foreach_norm(grads)).double().pow(2)
            counted = self._counted
            if expert is not None:
                mine = self._expert if expert else ~self._expert
                per_fragment, counted = per_fragment[mine], counted[mine]
            squares = torch.stack([per_fragment[counted].sum(), per_fragment[~counted].sum()])
        return squares

    def _global_squares(self, grads: list[torch.Tensor]) -> list[float]:
        """[counted, other] squares over every rank: the dense ones over dp (sharded) and mp, the
        expert ones over edp (sharded) and the expert model-parallel group."""
        if not self.has_experts:
            return self._sum_over_ranks(self._squares(grads)).tolist()
        dense = self._sum_over_ranks(self._squares(grads, expert=False))
        experts = self._sum_over_ranks(self._squares(grads, expert=True), (self.edp_group, self.emp_group))
        return (dense + experts).tolist()

    def step(self, lr: float | LearningRates) -> StepOutcome:
        """One update from the reduced gradients (call after the gradients are finalised); `lr` a
        float, or `LearningRates` (needed with --decoupled-lr)."""
        rates = lr if isinstance(lr, LearningRates) else LearningRates(lr)
        if self.config.decoupled_lr is not None and rates.decoupled is None:
            raise ValueError("--decoupled-lr is set: pass step() LearningRates with the decoupled rate "
                             "(megalith.training.optimizer.learning_rates)")
        for buffer in self.buffers:  # the previous step's parameter all-gathers (--overlap-param-gather)
            buffer.finish_param_gather()
        grads = []
        for fragment in self.fragments:
            grad = fragment.grad if fragment.grad.dtype == torch.float32 else fragment.grad.float()
            if not fragment.offloaded:  # an offloaded one gets a host copy at the step
                fragment.main.grad = grad
            grads.append(grad)
        scale = self.loss_scale
        if scale != 1.0:
            torch._foreach_mul_(grads, 1.0 / scale)
        counted_squares, other_squares = self._global_squares(grads)
        finite = math.isfinite(counted_squares + other_squares)
        if self.loss_scaler is not None:
            self.loss_scaler.update(not finite)
        if not finite:
            return StepOutcome(True, None, scale)
        norm = math.sqrt(counted_squares)
        clip = self.config.clip_grad
        if clip > 0:
            coefficient = clip / (norm + 1e-6)
            if coefficient < 1.0:
                torch._foreach_mul_(grads, coefficient)
        for group in self.inner.param_groups:
            group["lr"] = rates.decoupled if group.get("decoupled") else rates.main
        if self.offload is not None:
            self.offload.grads_to_host(grads)
        self.inner.step()
        if self.offload is not None:
            self.offload.weights_to_device()
        for fragment in self.fragments:
            if fragment.model is not None:
                fragment.model.copy_(fragment.main)
        for buffer in self.buffers:
            buffer.all_gather_params()
        return StepOutcome(False, norm, scale)

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of model parameters, gradient buffers, fp32 main weights that are
        copies, and optimizer state (after the first step), on the device; `offloaded`: host memory
        of --optimizer-cpu-offload (main weights, gradient staging, state)."""
        def size(tensor: torch.Tensor) -> int:
            return tensor.numel() * tensor.element_size()

        state = sum(size(v) for f in self.fragments if not f.offloaded
                    for v in self.inner.state.get(f.main, {}).values() if torch.is_tensor(v) and v.dim() > 0)
        return {
            "params": sum(size(p) for b in self.buffers for p in b.params),
            "grads": sum(size(b.grad_data) for b in self.buffers),
            "main_params": sum(size(f.main) for f in self.fragments if f.model is not None and not f.offloaded),
            "optimizer_state": state,
            "offloaded": self.offload.host_bytes(self.inner.state) if self.offload is not None else 0,
        }

    def persistent_memory_bytes(self) -> dict[str, int]:
        """This rank's persistent storage, each tensor's storage counted once: model parameters
        (`params_bytes`), gradient buffers (`grads_bytes`: ZeRO-2/3 the shard only), fp32 main
        weights that are copies plus optimizer state on the device (`optimizer_bytes`, after the
        first step), the most bytes of gathered full parameters alive at once (`gathered_peak_bytes`,
        ZeRO-3; 0 otherwise) and the host memory of --optimizer-cpu-offload (`offloaded_bytes`). The memory report and the JSON log print these."""
        seen: set[tuple[int, int]] = set()

        def stored(tensors) -> int:
            total = 0
            for tensor in tensors:
                storage = tensor.untyped_storage()
                key = (storage.data_ptr(), storage.nbytes())
                if storage.nbytes() and key not in seen:
                    seen.add(key)
                    total += storage.nbytes()
            return total

        params = stored(t for b in self.buffers for t in b.persistent_param_tensors())
        grads = stored(b.grad_data for b in self.buffers)
        on_device = [f for f in self.fragments if not f.offloaded]
        state = [v for f in on_device for v in self.inner.state.get(f.main, {}).values()
                 if torch.is_tensor(v) and v.dim() > 0]
        optimizer = stored([f.main for f in on_device if f.model is not None] + state)
        gathered = sum(getattr(b, "gathered_peak_bytes", 0) for b in self.buffers)
        offloaded = self.offload.host_bytes(self.inner.state) if self.offload is not None else 0
        return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": optimizer,
                "gathered_peak_bytes": gathered, "offloaded_bytes": offloaded}

    @property
    def backend(self) -> Choice:
        return self.choice
