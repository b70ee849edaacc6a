"""Ring attention (cp_comm_type "p2p"): key/value blocks travel around the cp ring.

Forward: at step i rank r holds the KV block of rank r-i; it posts the send of that block to
r+1 (and the receive of the next from r-1) before computing the current block, so the
transfer overlaps the compute, and merges each block's partial output by its log-sum-exp.
cp-1 KV sends per rank. Only the local q, k, v, output and log-sum-exp are saved: activation
memory per rank is 1/cp of one process's.

Backward (FlashAttention-2 per block): the KV blocks go around once more (cp-1 sends) and each
block's dK/dV accumulator follows it: it starts on the rank after the owner, picks up each
rank's contribution and finally hops back to the owner (cp-1 sends), who adds its own. The
accumulators travel in float32.

Under causal attention with the load-balanced layout, a step sees only half a block: keys
before the local chunks are seen by every query but only through their first chunk, keys
after them only by the second query chunk. Each step computes just the query rows and key
columns that see anything (a row masked everywhere therefore averages over the keys the
causal structure leaves it, which no real sequence has: a token always sees itself).
"""

from __future__ import annotations

import math

import torch

from megalith.parallel import comm
from megalith.parallel.comm_ledger import active_ledger
from megalith.parallel.context.blocks import (backward_block, block_mask, forward_block, from_grouped, group_queries,
                                              merge)
from megalith.parallel.context.layout import load_balanced_indices


def _visible(q_pos: torch.Tensor, k_pos: torch.Tensor, causal: bool):
    """(rows, cols): the query rows and key columns of a block that see anything; None = all of them;
    rows empty means the block is skipped."""
    if not causal:
        return None, None
    seen = k_pos[None, :] <= q_pos[:, None]
    rows, cols = seen.any(dim=1), seen.any(dim=0)
    return (None if rows.all() else rows.nonzero().squeeze(1)), (None if cols.all() else cols.nonzero().squeeze(1))


def _take(x: torch.Tensor, dim: int, index: torch.Tensor | None) -> torch.Tensor:
    return x if index is None else x.index_select(dim, index)


class _Ring:
    """One rank's view of the ring: its rank, peers, and the global positions of every block."""

    def __init__(self, group, seq_local: int, device) -> None:
        self.group, self.size, self.rank = group, comm.group_size(group), comm.group_rank(group)
        self.seq = seq_local * self.size
        if self.size > 1:
            self.next = comm.global_rank(group, (self.rank + 1) % self.size)
            self.prev = comm.global_rank(group, (self.rank - 1) % self.size)
        self.device = device

    def positions(self, step: int) -> tuple[int, torch.Tensor]:
        """The owner of the block held at `step` and its global positions."""
        owner = (self.rank - step) % self.size
        return owner, load_balanced_indices(self.seq, self.size, owner, device=self.device)

    def shift(self, tensor: torch.Tensor, ledger) -> tuple[torch.Tensor, list]:
        """Post: send `tensor` to the next rank, receive one like it from the previous."""
        incoming = torch.empty_like(tensor)
        works = comm.batch_isend_irecv([comm.PointToPoint(tensor, self.next, self.group),
                                        comm.PointToPoint(incoming, self.prev, self.group, recv=True)], ledger=ledger)
        return incoming, works

    def send(self, tensor: torch.Tensor, ledger) -> list:
        return comm.batch_isend_irecv([comm.PointToPoint(tensor, self.next, self.group)], ledger=ledger)

    def receive(self, like: torch.Tensor, ledger) -> tuple[torch.Tensor, list]:
        incoming = torch.empty_like(like)
        return incoming, comm.batch_isend_irecv([comm.PointToPoint(incoming, self.prev, self.group, recv=True)],
                                                ledger=ledger)


def _wait(works: list) -> None:
    for work in works:
        work.wait()


def _split_kv(kv: torch.Tensor, groups: int):
    """A travelling `[s, b, 2 ng, d]` block -> grouped float32 keys and values `[b, ng, s, d]`."""
    return kv[:, :, :groups].float().permute(1, 2, 0, 3), kv[:, :, groups:].float().permute(1, 2, 0, 3)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, key_padding_mask):
        ledger = active_ledger()
        ring = _Ring(group, q.shape[0], q.device)
        groups = k.shape[2]
        q5 = group_queries(q, groups)
        q_pos = load_balanced_indices(ring.seq, ring.size, ring.rank, device=q.device)
        out = torch.zeros_like(q5)
        lse = torch.full(q5.shape[:-1], -math.inf, dtype=torch.float32, device=q.device)
        current = torch.cat([k, v], dim=2).contiguous()
        for step in range(ring.size):
            pending = []
            if step + 1 < ring.size:  # the next block's transfer runs while this one computes
                incoming, pending = ring.shift(current, ledger)
            _, k_pos = ring.positions(step)
            rows, cols = _visible(q_pos, k_pos, causal)
            if rows is None or rows.numel():
                k4, v4 = _split_kv(current, groups)
                k4, v4 = _take(k4, 2, cols), _take(v4, 2, cols)
                mask = block_mask(_take(q_pos, 0, rows), _take(k_pos, 0, cols), causal, key_padding_mask)
                block_out, block_lse = forward_block(_take(q5, 3, rows), k4, v4, mask, scale)
                merged, new_lse = merge(_take(out, 3, rows), _take(lse, 3, rows), block_out, block_lse)
                if rows is None:
                    out, lse = merged, new_lse
                else:
                    out, lse = out.index_copy(3, rows, merged), lse.index_copy(3, rows, new_lse)
            if pending:
                _wait(pending)
                current = incoming
        result = from_grouped(out).to(q.dtype)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.group, ctx.causal, ctx.scale, ctx.key_padding_mask, ctx.ledger = (group, causal, scale,
                                                                              key_padding_mask, ledger)
        return result

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        ledger, causal, scale, key_padding_mask = ctx.ledger, ctx.causal, ctx.scale, ctx.key_padding_mask
        ring = _Ring(ctx.group, q.shape[0], q.device)
        s, b, heads, d = q.shape
        groups = k.shape[2]
        r = heads // groups
        q5 = group_queries(q, groups)
        do5 = grad_out.float().reshape(s, b, groups, r, d).permute(1, 2, 3, 0, 4)
        o5 = out.float().reshape(s, b, groups, r, d).permute(1, 2, 3, 0, 4)
        delta = (do5 * o5).sum(dim=-1)
        q_pos = load_balanced_indices(ring.seq, ring.size, ring.rank, device=q.device)
        dq = torch.zeros_like(q5)
        current = torch.cat([k, v], dim=2).contiguous()
        own = None
        sends = []  # works and buffers of the accumulators sent, kept alive until they complete
        for step in range(ring.size):
            # post in the order the previous rank sends: its accumulator (end of its last step), then KV
            carried, carried_works = None, []
            if step >= 2:
                carried, carried_works = ring.receive(torch.empty((s, b, 2 * groups, d), dtype=torch.float32,
                                                                  device=q.device), ledger)
            pending = []
            if step + 1 < ring.size:
                incoming, pending = ring.shift(current, ledger)
            _, k_pos = ring.positions(step)
            rows, cols = _visible(q_pos, k_pos, causal)
            dkv = torch.zeros((s, b, 2 * groups, d), dtype=torch.float32, device=q.device)
            if rows is None or rows.numel():
                k4, v4 = _split_kv(current, groups)
                k4, v4 = _take(k4, 2, cols), _take(v4, 2, cols)
                mask = block_mask(_take(q_pos, 0, rows), _take(k_pos, 0, cols), causal, key_padding_mask)
                dq_part, dk, dv = backward_block(_take(q5, 3, rows), k4, v4, _take(do5, 3, rows),
                                                 _take(lse, 3, rows), _take(delta, 3, rows), mask, scale)
                dq = dq + dq_part if rows is None else dq.index_add(3, rows, dq_part)
                block = torch.cat([dk, dv], dim=1).permute(2, 0, 1, 3)  # [sk, b, 2 ng, d]
                dkv = dkv + block if cols is None else dkv.index_add(0, cols, block)
            if step == 0:
                own = dkv
            else:
                if carried is not None:
                    _wait(carried_works)
                    dkv = dkv + carried
                sends.append((ring.send(dkv, ledger), dkv))
            if pending:
                _wait(pending)
                current = incoming
        if ring.size > 1:  # the accumulator of this rank's own block, back from its last visit
            final, works = ring.receive(own, ledger)
            _wait(works)
            own = own + final
        for works, _ in sends:
            _wait(works)
        dq_out = dq.reshape(b, heads, s, d).permute(2, 0, 1, 3).to(q.dtype)
        dk_out = own[:, :, :groups].to(k.dtype)
        dv_out = own[:, :, groups:].to(v.dtype)
        return dq_out, dk_out, dv_out, None, None, None, None


def ring_attention(q, k, v, group, causal: bool, scale: float, key_padding_mask=None) -> torch.Tensor:
    """`[s_local, b, nh * d]`: this rank's rows of attention over the whole ring's keys."""
    return RingAttention.apply(q, k, v, group, causal, scale, key_padding_mask)
