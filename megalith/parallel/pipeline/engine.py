"""Executes one rank's schedule (a list of Actions) on its model chunks.

The engine knows nothing about which schedule it runs: warm-up, steady state and interleaving
are all in the action list. Consecutive communication actions are posted as one batch of
non-blocking point-to-point operations (batch_isend_irecv, which works on gloo and NCCL); a
forward or backward waits only for the receive it consumes. Tensor shapes come from the
chunks (`pipeline_shapes`), so no shape handshake precedes a message. Once a sent
activation has left, its storage is released (only the gradient is needed for backward) if
the chunk says its outputs are not saved by autograd (`outputs_freeable`).

A schedule with BACKWARD_INPUT and BACKWARD_WEIGHT actions (zero bubble) splits backward: each
forward runs inside a weight-gradient queue (megalith.parallel.weight_grad), B is the chunk's
autograd backward with the linears' weight gradients deferred into it, and W runs the queue.

A chunk is a module with `pipeline_forward(inputs, batch)` (inputs: the received tensors, None
on the first stage; returns the tensors to send, or the per-token loss on the last stage) and
`pipeline_shapes(micro_batch_size)` (the shapes of the tensors it receives); a chunk whose outputs
differ from its inputs (T5's stages around the end of the encoder) also has
`pipeline_output_shapes(micro_batch_size)`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from megalith.parallel import comm
from megalith.parallel.comm import group_size
from megalith.parallel.pipeline.actions import Action, Kind, TimelineEvent, holder_of, peer_of, stage_of
from megalith.parallel.weight_grad import deferring_weight_grads, run_deferred

_ACCUMULATES = (Kind.BACKWARD, Kind.BACKWARD_WEIGHT)  # actions that add to the parameters' gradients


@dataclass
class StepResult:
    loss: float  # the step's loss, the same number on every rank of the pipeline
    events: list[TimelineEvent] = field(default_factory=list)  # compute actions, when recorded


def _release(tensor: torch.Tensor) -> None:
    """Drop a tensor's storage but keep its autograd node (Megatron's deallocate_output_tensor)."""
    tensor.data = torch.empty((1,), dtype=tensor.dtype, device=tensor.device)


def _backward(outputs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...]) -> None:
    """Backward from outputs whose storage may have been released (shapes then differ from grads)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    # the public torch.autograd.backward would compare the released output's shape with the grad's
    torch.autograd.Variable._execution_engine.run_backward(
        tuple(o for o, _ in pairs), tuple(g for _, g in pairs), False, False, (), True, True
    )


class _LocalReceive:
    """A receive from this rank's own other chunk: waiting copies what the send left."""

    def __init__(self, mailbox: dict, key, buffers: list[torch.Tensor]) -> None:
        self.mailbox, self.key, self.buffers = mailbox, key, buffers

    def wait(self) -> bool:
        if self.key not in self.mailbox:
            raise RuntimeError(f"pipeline schedule error: {self.key[0].name} of chunk {self.key[1]} micro-batch "
                               f"{self.key[2]} waits for a hand-over its own rank has not sent yet")
        for buffer, tensor in zip(self.buffers, self.mailbox.pop(self.key)):
            buffer.copy_(tensor)
        return True


class PipelineEngine:
    """Runs schedules for pipeline rank `rank` of `pp` with `chunks[c]` as its chunk c."""

    def __init__(
        self,
        chunks: list[nn.Module],
        *,
        rank: int,
        pp: int,
        pp_group,
        micro_batch_size: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
        record: bool = False,
        placement: str = "interleaved",
    ) -> None:
        if pp > 1 and group_size(pp_group) != pp:
            raise ValueError(f"the pipeline group has {group_size(pp_group)} ranks, expected {pp}")
        self.chunks, self.rank, self.pp, self.pp_group = chunks, rank, pp, pp_group
        self.micro_batch_size, self.dtype = micro_batch_size, dtype
        self.device = device or torch.device("cpu")
        self.record = record
        self.placement = placement  # how (rank, chunk) maps to stages: "interleaved", or zb-v's "v"
        self.num_stages = pp * len(chunks)

    def _global_rank(self, pipeline_rank: int) -> int:
        return comm.global_rank(self.pp_group, pipeline_rank)

    def _buffers(self, chunk: int, outputs: bool = False) -> list[torch.Tensor]:
        """Receive buffers for a chunk's inputs, or (`outputs`) for its outputs' gradients."""
        module = self.chunks[chunk]
        shapes = (getattr(module, "pipeline_output_shapes", module.pipeline_shapes) if outputs
                  else module.pipeline_shapes)(self.micro_batch_size)
        return [torch.empty(shape, dtype=self.dtype, device=self.device) for shape in shapes]

    def step(
        self,
        actions: list[Action],
        get_batch: Callable[[int], dict],
        loss_fn: Callable[[torch.Tensor, dict], torch.Tensor],
        *,
        loss_scale: float = 1.0,
        before_backward: Callable[[int, bool], None] | None = None,
    ) -> StepResult:
        """Run one step. `loss_fn(per_token_loss, batch)` gives a micro-batch's share of the step
        loss (already divided as the step's loss definition wants); backward starts from it,
        times `loss_scale` (fp16). `before_backward(chunk, last)` is told before every backward
        whether it is the chunk's last of the step: the one in which data-parallel gradient
        reduction may start."""
        # the chunk's last action that accumulates weight gradients: its backward, or its last W
        last_backward = {a.chunk: i for i, a in enumerate(actions) if a.kind in _ACCUMULATES}
        split = any(a.kind is Kind.BACKWARD_INPUT for a in actions)
        run = _StepRun(self, get_batch, loss_fn, loss_scale, split)
        index = 0
        while index < len(actions):
            if actions[index].kind.is_compute:
                if before_backward is not None and actions[index].kind is not Kind.FORWARD:
                    chunk = actions[index].chunk
                    before_backward(chunk, last_backward[chunk] == index)
                run.compute(actions[index])
                index += 1
                continue
            end = index
            while end < len(actions) and not actions[end].kind.is_compute:
                end += 1
            run.communicate(actions[index:end])
            index = end
        run.finish_sends()
        return StepResult(self._report(run.loss_sum), run.events)

    def _report(self, loss_sum: torch.Tensor) -> float:
        """The last stage's loss, broadcast so every pipeline rank can log it."""
        if self.pp == 1:
            return float(loss_sum)
        value = loss_sum.detach().reshape(1).to(torch.float64)
        last_rank = holder_of(self.num_stages - 1, self.pp, self.placement)[0]
        comm.broadcast(value, self._global_rank(last_rank), self.pp_group)
        return float(value)


class _StepRun:
    """The per-step state: activations, gradients and pending messages of every (chunk, mb)."""

    def __init__(self, engine: PipelineEngine, get_batch, loss_fn, loss_scale: float = 1.0, split: bool = False) -> None:
        self.engine, self.get_batch, self.loss_fn, self.loss_scale = engine, get_batch, loss_fn, loss_scale
        self.split = split  # backward split into B and W: the forwards defer their linears' weight gradients
        self.weight_grads: dict[tuple[int, int], list] = {}
        self.local: dict[tuple[Kind, int, int], list[torch.Tensor]] = {}  # messages between this rank's chunks
        self.batches: dict[int, dict] = {}
        self.inputs: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
        self.output_grads: dict[tuple[int, int], list[torch.Tensor]] = {}
        self.losses: dict[tuple[int, int], torch.Tensor] = {}
        self.receiving: dict[tuple[Kind, int, int], list] = {}
        self.sending: list[tuple[list, list[torch.Tensor], bool]] = []
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        self.events: list[TimelineEvent] = []

    def _stage(self, chunk: int) -> int:
        return stage_of(self.engine.rank, chunk, self.engine.pp, self.engine.placement)

    def _batch(self, microbatch: int) -> dict:
        if microbatch not in self.batches:
            self.batches[microbatch] = self.get_batch(microbatch)
        return self.batches[microbatch]

    def _wait(self, kind: Kind, chunk: int, microbatch: int) -> None:
        for work in self.receiving.pop((kind, chunk, microbatch), []):
            work.wait()

    # --- communication ------------------------------------------------------------------

    def communicate(self, actions: list[Action]) -> None:
        engine = self.engine
        ops, receives, sends = [], [], []  # each with the index range of its operations in `ops`
        for action in actions:
            key = (action.chunk, action.microbatch)
            peer_rank, peer_chunk = peer_of(action, engine.rank, engine.pp, engine.placement)
            if peer_rank == engine.rank:  # the turn of a V: this rank's other chunk, handed over here
                self._hand_over(action, key, peer_chunk)
                continue
            peer = engine._global_rank(peer_rank)
            freeable = False
            if action.kind is Kind.RECV_FORWARD:
                tensors = self.inputs[key] = engine._buffers(action.chunk)
            elif action.kind is Kind.RECV_BACKWARD:
                tensors = self.output_grads[key] = engine._buffers(action.chunk, outputs=True)
            elif action.kind is Kind.SEND_FORWARD:
                tensors = [t.detach() for t in self.outputs[key]]
                freeable = getattr(engine.chunks[action.chunk], "outputs_freeable", False)
            elif action.kind is Kind.SEND_BACKWARD:
                tensors = [t.grad for t in self.inputs.pop(key)]
            else:
                raise ValueError(f"{action} is not a communication action")
            span = (len(ops), len(ops) + len(tensors))
            ops.extend(comm.PointToPoint(t, peer, engine.pp_group, recv=action.kind.is_recv) for t in tensors)
            if action.kind.is_recv:
                receives.append(((action.kind, *key), span))
            else:
                sends.append((tensors, freeable, span))
        works = comm.batch_isend_irecv(ops)

        def works_of(span):
            # one work per operation (gloo) lets a receive be waited for alone; a coalesced batch
            # (one work, NCCL) completes as a whole
            return works[span[0]:span[1]] if len(works) == len(ops) else works

        for key, span in receives:
            self.receiving[key] = works_of(span)
        for tensors, freeable, span in sends:
            self.sending.append((works_of(span), tensors, freeable))

    def _hand_over(self, action: Action, key: tuple[int, int], peer_chunk: int) -> None:
        """A message between two chunks of this rank: a send leaves its tensors, a receive copies them
        into its own buffers when the compute that consumes it waits (it may be posted before the send)."""
        chunk, microbatch = key
        if action.kind is Kind.SEND_FORWARD:
            self.local[(Kind.RECV_FORWARD, peer_chunk, microbatch)] = [t.detach() for t in self.outputs[key]]
        elif action.kind is Kind.SEND_BACKWARD:
            self.local[(Kind.RECV_BACKWARD, peer_chunk, microbatch)] = [t.grad for t in self.inputs.pop(key)]
        else:
            target = self.inputs if action.kind is Kind.RECV_FORWARD else self.output_grads
            target[key] = self.engine._buffers(chunk, outputs=action.kind is Kind.RECV_BACKWARD)
            self.receiving[(action.kind, chunk, microbatch)] = [_LocalReceive(self.local, (action.kind, *key),
                                                                              target[key])]

    def _collect_finished_sends(self, wait: bool = False) -> None:
        pending = []
        for works, tensors, freeable in self.sending:
            if wait:
                for work in works:
                    work.wait()
            elif not all(work.is_completed() for work in works):
                pending.append((works, tensors, freeable))
                continue
            if freeable:
                for tensor in tensors:
                    _release(tensor)
        self.sending = pending

    def finish_sends(self) -> None:
        self._collect_finished_sends(wait=True)
        self.receiving.clear()

    # --- compute ------------------------------------------------------------------------

    def compute(self, action: Action) -> None:
        if action.kind is Kind.FORWARD:
            start = self._forward(action.chunk, action.microbatch)
        elif action.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):  # B defers W through the forward's queue
            start = self._backward(action.chunk, action.microbatch)
        else:
            start = time.perf_counter()
            run_deferred(self.weight_grads.pop((action.chunk, action.microbatch)))
        if self.engine.record:  # from the end of the wait for input: the compute itself
            self.events.append(TimelineEvent(self.engine.rank, action.kind.value, action.chunk, action.microbatch,
                                             start, time.perf_counter()))
        self._collect_finished_sends()

    def _forward(self, chunk: int, microbatch: int) -> float:
        key, stage = (chunk, microbatch), self._stage(chunk)
        inputs = None
        if stage > 0:
            self._wait(Kind.RECV_FORWARD, chunk, microbatch)
            inputs = self.inputs[key]
            for tensor in inputs:
                tensor.requires_grad_(True)
        start = time.perf_counter()
        batch = self._batch(microbatch)
        deferring = (deferring_weight_grads(self.weight_grads.setdefault(key, [])) if self.split
                     else contextlib.nullcontext())
        with deferring:
            out = self.engine.chunks[chunk].pipeline_forward(tuple(inputs) if inputs else None, batch)
            loss = self.loss_fn(out, batch) if stage == self.engine.num_stages - 1 else None
        if loss is not None:
            self.losses[key] = loss
            self.loss_sum += loss.detach().double()
        else:
            self.outputs[key] = tuple(out)
        return start

    def _backward(self, chunk: int, microbatch: int) -> float:
        key, stage = (chunk, microbatch), self._stage(chunk)
        if stage == self.engine.num_stages - 1:
            start = time.perf_counter()
            loss = self.losses.pop(key)
            (loss * self.loss_scale if self.loss_scale != 1.0 else loss).backward()
        else:
            self._wait(Kind.RECV_BACKWARD, chunk, microbatch)
            start = time.perf_counter()
            _backward(self.outputs.pop(key), tuple(self.output_grads.pop(key)))
        if stage == 0:
            self.inputs.pop(key, None)
        return start
