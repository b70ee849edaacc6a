"""Data-parallel gradients: contiguous buffers split into buckets, each reduced as soon as it is ready.

One `DataParallelGrads` per model chunk (Megatron's DDP wrapper, without wrapping the module).
Parameters are laid out in reverse registration order, roughly the order in which backward
produces their gradients, and grouped into buckets of about `bucket_size` elements. Each
parameter gets `param.main_grad`, a view into the buffer; a post-accumulate hook adds every
micro-batch's `param.grad` into it and drops `param.grad`, so gradient accumulation happens in
the buffer's dtype (fp32 with `accumulate_in_fp32`, Megatron's
`--accumulate-allreduce-grads-in-fp32`).

Only the backward of a chunk's last micro-batch is "synchronising" (`set_last_microbatch`): in
it, once every parameter of a bucket has its gradient, the bucket's reduction starts
asynchronously (`overlap=True`) while backward goes on with earlier layers; earlier
micro-batches communicate nothing. `finish()` starts what is left and waits for everything.

Reduction is a sum: the step's loss is already divided by the global batch (each dp rank
contributes its share), so summing over dp gives exactly one process's gradient. With
`shard=True` (distributed optimizer, ZeRO-1) each bucket is padded to a multiple of dp and
reduce-scattered: dp rank r then owns the r-th contiguous slice of every bucket, gradients and
(through `param_data`) parameters, which the optimizer all-gathers after its step.

With `overlap_param_gather` (Megatron's --overlap-param-gather) the optimizer's all-gather only
starts each bucket's collective; a forward pre-hook on every module waits for the buckets of
the module's own parameters, so the next forward computes while later buckets still travel.
Parameters used without their module being called (the output layer and tied head copy, whose
weights the model reads directly) are found in the first forward, which has nothing pending:
their buckets go first and the chunk's own pre-hook waits for them.

Reductions are counted in the communication ledger that was active when the hooks were armed
(`set_last_microbatch(True)`, on the thread that runs the schedule): the hooks themselves run
on autograd's thread, where no ledger is active on a GPU.

With `shard_grads=True` (ZeRO-2, Megatron's --data-parallel-sharding-strategy optim_grads) the
gradient is kept only as this rank's shard: `grad_data` is the concatenation of this rank's
slice of every bucket (1/dp of the elements). A bucket's full-size gradient buffer exists only
while one micro-batch's gradients arrive: allocated at its first gradient, reduce-scattered as
soon as its last one is final (during backward with `overlap`, else when that micro-batch's
backward completes the bucket), added into the shard and released when the collective is done
(at the latest before the chunk's next backward). So every micro-batch communicates, as
DeepSpeed's stage 2 does, and the full gradient never exists in memory at once. `main_grad` is
bound only while its bucket's buffer exists; `full_grads` lends whole gradients for the
post-reduction sums over tp and the embedding group (which add matching elements, so a shard
padded with zeros sums correctly).

With `shard_params=True` (ZeRO-3, optim_grads_params) every unit (a layer, or the chunk's root:
megalith.parallel.zero3) gets buckets of its own, whose parameters live as this rank's shard
(`param_shard`) and are gathered into `param_full` only while a forward or backward needs
them; the gradient path is ZeRO-2's with one bucket per unit, and the optimizer updates the
shard in place (`param_slice`), so nothing is all-gathered after the step. Code that reads whole
parameters outside forward uses `gathered_parameters()`.

Parameters marked `shared_embedding` (a tied embedding split over pipeline stages) get a bucket
of their own, so their slice boundaries are the same on the first and the last stage and the
embedding-group sum after the reduce-scatter adds matching elements (Megatron bug #844).

Expert parameters (`param.expert_parallel = True`, issue 21) are replicated over the experts'
data parallelism (edp), not over dp: a chunk holding some gets two buffers, `experts=False`
over dp and `experts=True` over edp (`split_by_experts`), each with its own buckets and, when
sharded, its own slices; a chunk without any keeps its one buffer, exactly as before.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator

import torch
from torch import nn

from megalith.errors import ConfigError
from megalith.parallel.comm import all_gather_into, all_reduce, group_rank, group_size, reduce_scatter_into
from megalith.parallel.comm_ledger import active_ledger
from megalith.parallel.zero3 import ParameterUnits, find_units

DEFAULT_BUCKET_ELEMENTS = 40_000_000  # Megatron: max(40M, 1M x dp)
MAX_REDUCTIONS_IN_FLIGHT = 2  # ZeRO-2/3: older reductions are waited for when a newer one starts


def default_bucket_size(dp_size: int) -> int:
    return max(DEFAULT_BUCKET_ELEMENTS, 1_000_000 * dp_size)


def is_expert(param: nn.Parameter) -> bool:
    """An expert's parameter: its gradient is summed over the experts' data parallelism only."""
    return bool(getattr(param, "expert_parallel", False))


def split_by_experts(module: nn.Module, dp_group, edp_group, **options) -> tuple["DataParallelGrads", "DataParallelGrads | None"]:
    """The chunk's buffer over dp and, when it holds expert parameters, theirs over edp (else None:
    the one buffer of before, every parameter in it)."""
    if not any(is_expert(p) for p in module.parameters() if p.requires_grad):
        return DataParallelGrads(module, dp_group, **options), None
    return (DataParallelGrads(module, dp_group, experts=False, **options),
            DataParallelGrads(module, edp_group, experts=True, **options))


@dataclass(eq=False)
class Bucket:
    """A contiguous range [start, end) of the buffers, reduced by one collective."""

    index: int
    params: list[nn.Parameter]
    start: int
    end: int
    pending: set = field(default_factory=set)  # ids of parameters whose gradient is not final yet
    work: object = None
    shard_out: torch.Tensor | None = None  # reduce-scatter output before it is copied into the buffer
    gather: tuple | None = None  # (work, source) of an all-gather in flight (--overlap-param-gather)
    grad: torch.Tensor | None = None  # ZeRO-2: the full-size buffer of the micro-batch in progress
    shard_offset: int = 0  # ZeRO-2: where this bucket's slice starts inside the gradient shard
    param_full: torch.Tensor | None = None  # ZeRO-3: the gathered parameters (storage 0 while freed)
    param_shard: torch.Tensor | None = None  # ZeRO-3: this rank's persistent slice of them

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class BucketLaunch:
    """A reduction launched during backward: proof of overlap when hooks were still to come."""

    bucket: int
    hooks_fired: int  # parameters whose gradient was final when the bucket was launched
    hooks_total: int
    bytes: int = 0  # what this rank puts into the collective (0 at dp 1: nothing is sent)


@dataclass(frozen=True)
class GatherEvent:
    """An all-gather of a bucket's parameters: started, or waited for (in a forward pre-hook,
    or by `finish_param_gather` when something must read the parameters first)."""

    kind: str  # "start", "forward" or "finish"
    bucket: int


class DataParallelGrads:
    """The gradient (and, sharded, parameter) buffer of one model chunk and its buckets."""

    def __init__(
        self,
        module: nn.Module,
        dp_group,
        *,
        bucket_size: int | None = None,
        overlap: bool = False,
        accumulate_in_fp32: bool = False,
        shard: bool = False,
        shard_grads: bool = False,
        shard_params: bool = False,
        overlap_param_gather: bool = False,
        experts: bool | None = None,
    ) -> None:
        """`experts`: None every trainable parameter, True only the expert ones (`dp_group` is then
        the experts' data-parallel group), False all others."""
        named = [(name, p) for name, p in module.named_parameters()
                 if p.requires_grad and (experts is None or is_expert(p) == experts)]
        self.expert = bool(experts)
        if not named:
            raise ConfigError("a model chunk without trainable parameters cannot be data-parallel; check the stage split")
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            raise ConfigError(f"a model chunk mixes parameter dtypes {sorted(map(str, dtypes))}; use one --params-dtype")
        if bucket_size is not None and bucket_size < 1:
            raise ConfigError(f"--ddp-bucket-size must be a positive number of elements, got {bucket_size}")
        if overlap_param_gather and not shard:
            raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (only sharded parameters are "
                              "all-gathered); add it or drop --overlap-param-gather")
        shard_grads = shard_grads or shard_params
        shard = shard or shard_grads  # ZeRO-2 shards the optimizer too, ZeRO-3 the gradients as well
        self.dp_group, self.overlap, self.shard, self.shard_grads = dp_group, overlap, shard, shard_grads
        self.shard_params = shard_params
        self.overlap_param_gather = overlap_param_gather
        self.dp_size, self.dp_rank = group_size(dp_group), group_rank(dp_group)
        self.param_dtype = dtypes.pop()
        self.grad_dtype = torch.float32 if accumulate_in_fp32 else self.param_dtype
        self.names = {id(p): name for name, p in named}
        self.params = [p for _, p in named]
        self.bucket_size = bucket_size or default_bucket_size(self.dp_size)
        self.units = None
        if shard_params:  # one bucket (at least) per unit, so a unit gathers whole buckets
            unit_params = find_units(module, self.params)
            self.buckets = []
            for params in reversed(unit_params):
                if params:
                    start = self.buckets[-1].end if self.buckets else 0
                    for bucket in self._layout(list(reversed(params)), unbounded=True):
                        bucket.index, bucket.start, bucket.end = len(self.buckets), start, start + bucket.size
                        start = bucket.end
                        self.buckets.append(bucket)
        else:
            self.buckets = self._layout(list(reversed(self.params)))
        total = self.buckets[-1].end
        device = self.params[0].device
        shard_elements = 0
        for bucket in self.buckets:
            bucket.shard_offset = shard_elements
            shard_elements += bucket.size // self.dp_size
        self.grad_data = torch.zeros(shard_elements if shard_grads else total, dtype=self.grad_dtype, device=device)
        self.in_flight: list[tuple[Bucket, object, torch.Tensor, torch.Tensor]] = []  # ZeRO-2 reductions
        self.peak_bucket_grad_bytes = 0  # ZeRO-2: the most bytes of full-size bucket buffers alive at once
        self.param_data = torch.zeros(total, dtype=self.param_dtype, device=device) if shard and not shard_params else None
        self._bucket_of: dict[int, Bucket] = {}
        self.ranges: dict[int, tuple[int, int]] = {}
        for bucket in self.buckets:
            offset = bucket.start
            for param in bucket.params:
                start, end = offset, offset + param.numel()
                offset = end
                self.ranges[id(param)] = (start, end)
                self._bucket_of[id(param)] = bucket
                param.main_grad = None if shard_grads else self.grad_data[start:end].view(param.shape)
                if shard_params:
                    if bucket.param_full is None:
                        bucket.param_full = torch.zeros(bucket.size, dtype=self.param_dtype, device=device)
                    bucket.param_full[start - bucket.start:end - bucket.start].copy_(param.data.reshape(-1))
                    param.data = bucket.param_full[start - bucket.start:end - bucket.start].view(param.shape)
                elif shard:
                    self.param_data[start:end].copy_(param.data.reshape(-1))
                    param.data = self.param_data[start:end].view(param.shape)
                param.register_post_accumulate_grad_hook(self._accumulate)
            if shard_params:
                low, high = self.shard_range(bucket)
                bucket.param_shard = bucket.param_full[low - bucket.start:high - bucket.start].clone()
                bucket.param_full.untyped_storage().resize_(0)  # freed until a unit gathers it
        self._sync = True
        self._ledger = None  # the communication ledger of the armed backward (see set_last_microbatch)
        self.launches: list[BucketLaunch] = []
        self.gather_events: list[GatherEvent] = []
        self._reset_buckets()
        self._seen: set[int] = set()  # parameters whose module's pre-hook has fired
        self._root_seen = False
        self._unhooked: set[int] | None = None  # fixed at the first gather, the same on every dp rank
        if shard_params:
            self.units = ParameterUnits(self, module, unit_params, prefetch=overlap_param_gather)
        elif overlap_param_gather:
            self._install_forward_hooks(module)

    # --- layout ---------------------------------------------------------------------------

    def _layout(self, params: list[nn.Parameter], unbounded: bool = False) -> list[Bucket]:
        """Buckets of about bucket_size elements (`unbounded`: one, a ZeRO-3 unit's); a shared
        embedding alone; padded for sharding."""
        buckets: list[Bucket] = []
        current: list[nn.Parameter] = []
        start = 0

        def close() -> None:
            nonlocal current, start
            if current:
                size = sum(p.numel() for p in current)
                if self.shard:
                    size = -(-size // self.dp_size) * self.dp_size  # every dp rank gets an equal slice
                buckets.append(Bucket(len(buckets), current, start, start + size))
                start += size
                current = []

        for param in params:
            alone = self._own_bucket(param)
            if alone:
                close()
            current.append(param)
            if alone or (not unbounded and sum(p.numel() for p in current) >= self.bucket_size):
                close()
        close()
        return buckets

    @staticmethod
    def _own_bucket(param: nn.Parameter) -> bool:
        """A tied embedding split over stages: its slices must match on the first and last stage."""
        return getattr(param, "shared_embedding", False)

    def shard_range(self, bucket: Bucket) -> tuple[int, int]:
        """The slice [start, end) of a bucket that this dp rank owns (the whole bucket unsharded)."""
        if not self.shard:
            return bucket.start, bucket.end
        size = bucket.size // self.dp_size
        return bucket.start + self.dp_rank * size, bucket.start + (self.dp_rank + 1) * size

    def grad_slice(self, start: int, end: int) -> torch.Tensor:
        """The reduced gradient of buffer elements [start, end), which lie in this rank's shard of
        one bucket when sharded (ZeRO-2 keeps only the shard: its storage is indexed differently)."""
        if not self.shard_grads:
            return self.grad_data[start:end]
        bucket = self._bucket_containing(start)
        low, _ = self.shard_range(bucket)
        offset = bucket.shard_offset + start - low
        return self.grad_data[offset:offset + end - start]

    def param_slice(self, start: int, end: int) -> torch.Tensor:
        """This rank's parameter elements [start, end) of one bucket (sharded): what the optimizer
        updates in place (ZeRO-3: the persistent shard; ZeRO-1/2: the full buffer)."""
        if not self.shard_params:
            return self.param_data[start:end]
        bucket = self._bucket_containing(start)
        low, _ = self.shard_range(bucket)
        return bucket.param_shard[start - low:end - low]

    @contextmanager
    def gathered_parameters(self, writeback: bool = False) -> Iterator[None]:
        """ZeRO-3: every parameter whole inside the block (a collective over dp), sharded again
        after; for code that reads parameters outside forward. `writeback`: what the block wrote
        into the parameters (the same on every dp rank: a checkpoint load) is kept, each rank
        keeping its slice. A no-op otherwise."""
        if self.units is None:
            yield
            return
        with self.units.gathered(writeback):
            yield

    @property
    def gathered_peak_bytes(self) -> int:
        """ZeRO-3: the most bytes of gathered full parameters alive at once so far (0 otherwise)."""
        return self.units.peak_bytes if self.units is not None else 0

    def persistent_param_tensors(self) -> list[torch.Tensor]:
        """The tensors that hold this rank's parameters between steps (ZeRO-3: the shards)."""
        if self.units is not None:
            return [b.param_shard for b in self.buckets]
        return list(self.params)

    def _bucket_containing(self, element: int) -> Bucket:
        for bucket in self.buckets:
            if bucket.start <= element < bucket.end:
                return bucket
        raise IndexError(f"element {element} is outside the buffer")

    # --- backward -------------------------------------------------------------------------

    def set_last_microbatch(self, last: bool) -> None:
        """Whether the next backward is this chunk's last of the step (the one that communicates);
        arming it captures the active communication ledger for the hooks' reductions."""
        if self.shard_grads:  # every micro-batch reduces: finish the previous one's first
            self._drain()
            self._sync, self._ledger = True, active_ledger()
            return
        self._sync = last
        if last:
            self._ledger = active_ledger()

    def _accumulate(self, param: nn.Parameter) -> None:
        bucket = self._bucket_of[id(param)]
        if param.grad is not None:
            if self.shard_grads and bucket.grad is None:
                self._open_bucket(bucket)
            param.main_grad.add_(param.grad)
            param.grad = None
        if self.units is not None:
            self.units.after_gradient(param)
        if not self._sync:
            return
        if id(param) in bucket.pending:
            bucket.pending.discard(id(param))
            self._hooks_fired += 1
            if (self.overlap or self.shard_grads) and not bucket.pending:
                self._launch(bucket)
                if self.shard_grads and not self.overlap:
                    self._drain()

    def _open_bucket(self, bucket: Bucket) -> None:
        """ZeRO-2: the bucket's full-size buffer for one micro-batch, bound as its parameters' main_grad."""
        bucket.grad = torch.zeros(bucket.size, dtype=self.grad_dtype, device=self.grad_data.device)
        for param in bucket.params:
            start, end = self.ranges[id(param)]
            param.main_grad = bucket.grad[start - bucket.start:end - bucket.start].view(param.shape)
        alive = sum(b.grad.numel() for b in self.buckets if b.grad is not None)
        alive += sum(full.numel() for _, _, full, _ in self.in_flight)
        self.peak_bucket_grad_bytes = max(self.peak_bucket_grad_bytes, alive * self.grad_data.element_size())

    def _close_bucket(self, bucket: Bucket) -> None:
        bucket.grad = None
        for param in bucket.params:
            param.main_grad = None

    def _drain(self, keep: int = 0) -> None:
        """ZeRO-2: wait for the reduce-scatters in flight (all but the `keep` latest), add each into
        the shard, free its buffer."""
        while len(self.in_flight) > keep:
            bucket, work, _full, out = self.in_flight.pop(0)
            work.wait()
            offset = bucket.shard_offset
            self.grad_data[offset:offset + out.numel()].add_(out)

    def _launch(self, bucket: Bucket) -> None:
        if self.shard_grads:
            self._launch_into_shard(bucket)
            return
        if bucket.work is not None or bucket.shard_out is not None:
            return
        view = self.grad_data[bucket.start:bucket.end]
        sent = view.numel() * view.element_size() if self.dp_size > 1 else 0
        self.launches.append(BucketLaunch(bucket.index, self._hooks_fired, len(self.params), sent))
        if self.dp_size == 1:
            bucket.work = _Done()
        elif self.shard:
            bucket.shard_out = torch.empty(bucket.size // self.dp_size, dtype=view.dtype, device=view.device)
            bucket.work = reduce_scatter_into(bucket.shard_out, view, self.dp_group, async_op=True, ledger=self._ledger)
        else:
            bucket.work = all_reduce(view, self.dp_group, async_op=True, ledger=self._ledger)

    def _launch_into_shard(self, bucket: Bucket) -> None:
        """ZeRO-2: reduce-scatter this micro-batch's buffer of the bucket (none: nothing arrived)."""
        full = bucket.grad
        if full is None:
            return
        self._close_bucket(bucket)
        bucket.pending = {id(p) for p in bucket.params}  # the next micro-batch's gradients
        sent = full.numel() * full.element_size() if self.dp_size > 1 else 0
        self.launches.append(BucketLaunch(bucket.index, self._hooks_fired, len(self.params), sent))
        if self.dp_size == 1:
            self.in_flight.append((bucket, _Done(), full, full))
            return
        out = torch.empty(bucket.size // self.dp_size, dtype=full.dtype, device=full.device)
        work = reduce_scatter_into(out, full, self.dp_group, async_op=True, ledger=self._ledger)
        self.in_flight.append((bucket, work, full, out))
        self._drain(keep=MAX_REDUCTIONS_IN_FLIGHT)  # bounds the full-size buffers alive

    def finish(self) -> None:
        """Start every bucket not started yet, wait for all; then main_grad holds the dp sum
        (sharded: on this rank's slice of each bucket only; ZeRO-2: `grad_data` is the shard)."""
        self._ledger = active_ledger()  # what is left is launched here, on the caller's thread
        if self.shard_grads:
            for bucket in self.buckets:
                self._launch_into_shard(bucket)
            self._drain()
            self._reset_buckets()
            if self.units is not None:
                self.units.release_all()
            return
        for bucket in self.buckets:
            self._launch(bucket)
        for bucket in self.buckets:
            bucket.work.wait()
            if bucket.shard_out is not None:
                start, end = self.shard_range(bucket)
                self.grad_data[start:end].copy_(bucket.shard_out)
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        for bucket in self.buckets:
            bucket.pending = {id(p) for p in bucket.params}
            bucket.work = bucket.shard_out = None
        self._hooks_fired = 0
        self._ledger = None

    def zero_grad(self) -> None:
        self.grad_data.zero_()
        if self.shard_grads:
            self._drain()
            self.grad_data.zero_()
            for bucket in self.buckets:
                self._close_bucket(bucket)
        for param in self.params:
            param.grad = None
        self._reset_buckets()
        self.launches = []

    def scale_gradients(self, factor: float) -> None:
        """Multiply the reduced gradients (--calculate-per-token-loss: 1 / the step's tokens)."""
        self.grad_data.mul_(factor)

    # --- after the optimizer (sharded) ----------------------------------------------------

    def all_gather_params(self) -> None:
        """Every dp rank's updated slice of every bucket to every rank (distributed optimizer);
        with overlap_param_gather only started, each bucket waited for by the next forward."""
        if not self.shard or self.dp_size == 1 or self.shard_params:  # ZeRO-3: params stay sharded
            return
        if not self.overlap_param_gather or not self._root_seen:  # no forward seen: nothing to wait in
            for bucket in self.buckets:
                start, end = self.shard_range(bucket)
                mine = self.param_data[start:end].clone()
                all_gather_into(self.param_data[bucket.start:bucket.end], mine, self.dp_group)
            return
        self.gather_events = []  # this round's record only
        if self._unhooked is None:
            self._unhooked = {id(p) for p in self.params if id(p) not in self._seen}
        forward_order = list(reversed(self.buckets))
        first = [b for b in forward_order if any(id(p) in self._unhooked for p in b.params)]
        for bucket in first + [b for b in forward_order if b not in first]:
            start, end = self.shard_range(bucket)
            mine = self.param_data[start:end].clone()  # the source must not alias the output
            work = all_gather_into(self.param_data[bucket.start:bucket.end], mine, self.dp_group, async_op=True)
            bucket.gather = (work, mine)
            self.gather_events.append(GatherEvent("start", bucket.index))

    def _wait_gather(self, bucket: Bucket, kind: str) -> None:
        if bucket.gather is not None:
            bucket.gather[0].wait()
            bucket.gather = None
            self.gather_events.append(GatherEvent(kind, bucket.index))

    def finish_param_gather(self) -> None:
        """Wait for every all-gather still in flight: before anything reads or writes parameters
        outside a forward (evaluation entry, checkpoint save, the optimizer's next step)."""
        for bucket in reversed(self.buckets):
            self._wait_gather(bucket, "finish")

    def _install_forward_hooks(self, module: nn.Module) -> None:
        for sub in module.modules():
            own = [id(p) for p in sub.parameters(recurse=False) if id(p) in self.ranges]
            if own:
                sub.register_forward_pre_hook(partial(self._before_module, own))
        module.register_forward_pre_hook(self._before_chunk)

    def _before_module(self, ids: list[int], module, args) -> None:
        self._seen.update(ids)
        for bucket in {self._bucket_of[i].index: self._bucket_of[i] for i in ids}.values():
            self._wait_gather(bucket, "forward")

    def _before_chunk(self, module, args) -> None:
        self._root_seen = True
        for bucket in reversed(self.buckets):
            if self._unhooked and any(id(p) in self._unhooked for p in bucket.params):
                self._wait_gather(bucket, "forward")

    def _whole_grads(self) -> torch.Tensor:
        """ZeRO-2: the full-size reduced gradient, every rank's shard gathered (a collective over dp)."""
        whole = torch.zeros(self.buckets[-1].end, dtype=self.grad_dtype, device=self.grad_data.device)
        for bucket in self.buckets:
            mine = self.grad_data[bucket.shard_offset:bucket.shard_offset + bucket.size // self.dp_size]
            if self.dp_size == 1:
                whole[bucket.start:bucket.end].copy_(mine)
            else:
                all_gather_into(whole[bucket.start:bucket.end], mine.clone(), self.dp_group)
        return whole

    @contextmanager
    def full_grads(self, params: list[nn.Parameter] | None = None) -> Iterator[None]:
        """ZeRO-2: bind `main_grad` of `params` (None: all) to whole-size tensors holding this rank's
        shard and zeros elsewhere, for sums over other groups after the reduction (SP norms over tp,
        the tied embedding over its group), and write the shard back after. Element-wise sums of
        matching layouts keep the shard exact. A no-op when gradients are not sharded."""
        if not self.shard_grads:
            yield
            return
        chosen = [p for p in (self.params if params is None else params) if id(p) in self.ranges]
        lent = {}
        for param in chosen:
            start, end = self.ranges[id(param)]
            low, high = self.shard_range(self._bucket_of[id(param)])
            full = torch.zeros(param.numel(), dtype=self.grad_dtype, device=self.grad_data.device)
            a, b = max(start, low), min(end, high)
            if a < b:
                full[a - start:b - start].copy_(self.grad_slice(a, b))
            param.main_grad = full.view(param.shape)
            lent[id(param)] = (param, a, b, start)
        try:
            yield
        finally:
            for param, a, b, start in lent.values():
                if a < b:
                    self.grad_slice(a, b).copy_(param.main_grad.reshape(-1)[a - start:b - start])
                param.main_grad = None

    def full_main_grads(self) -> dict[str, torch.Tensor]:
        """Each parameter's reduced gradient, whole (a collective over dp when sharded): for checks."""
        if self.shard_grads:
            whole = self._whole_grads()
            return {self.names[id(p)]: whole[slice(*self.ranges[id(p)])].view(p.shape) for p in self.params}
        grads = self.grad_data
        if self.shard and self.dp_size > 1:
            grads = self.grad_data.clone()
            for bucket in self.buckets:
                start, end = self.shard_range(bucket)
                all_gather_into(grads[bucket.start:bucket.end], grads[start:end].clone(), self.dp_group)
        return {self.names[id(p)]: grads[slice(*self.ranges[id(p)])].view(p.shape) for p in self.params}


class _Done:
    """The finished work of a reduction that needed no communication (dp = 1)."""

    def wait(self) -> None:
        return None
