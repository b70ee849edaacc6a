"""Zero-bubble orders (Qi et al. 2023): each backward split into B (input gradient, sent upstream
at once) and W (weight gradient, sends nothing), so the W's can wait and fill the bubbles.

Only the order of compute is decided here; schedules.py adds the communication. A micro-batch's
activations are held from its F until its W.
"""

from __future__ import annotations

from megalith.parallel.pipeline.actions import Kind, stage_of

Step = tuple[Kind, int, int]  # (compute kind, chunk, micro-batch)


def zb_h1(pp: int, m: int, rank: int) -> list[Step]:
    """1F1B's order of F and B, each W deferred by `rank` micro-batches in the steady state and
    one W after each cool-down B; the rest at the end.

    The deferred W's fill the cool-down, where 1F1B waits for gradients. Rank r holds at most
    (pp - r - 1 warm-up + 1) + r = pp micro-batches, 1F1B's peak (on rank 0). With equal F, B and
    W costs the bubble is (pp - 1) / (3 m), a third of 1F1B's."""
    warmup = min(pp - rank - 1, m)
    order: list[Step] = [(Kind.FORWARD, 0, i) for i in range(warmup)]
    deferred: list[int] = []
    for k in range(m - warmup):
        order += [(Kind.FORWARD, 0, warmup + k), (Kind.BACKWARD_INPUT, 0, k)]
        deferred.append(k)
        if len(deferred) > rank:
            order.append((Kind.BACKWARD_WEIGHT, 0, deferred.pop(0)))
    for k in range(m - warmup, m):
        order.append((Kind.BACKWARD_INPUT, 0, k))
        deferred.append(k)
        order.append((Kind.BACKWARD_WEIGHT, 0, deferred.pop(0)))
    return order + [(Kind.BACKWARD_WEIGHT, 0, i) for i in deferred]


def zb_v(pp: int, m: int) -> list[list[Step]]:
    """Every rank's order for two chunks in a V (rank r holds stages r and 2 pp - 1 - r).

    Found by list scheduling all ranks at once with equal unit costs for F, B and W of a chunk
    (the paper's assumption): whenever a rank is free it runs a B whose gradient has arrived
    (chunk 1 first), else an F whose input has arrived (chunk 1 first; chunk 0 only while fewer
    than 2 pp - 1 chunk-micro-batches are held, chunk 1 while fewer than 2 pp), else its oldest
    deferred W. So every rank holds at most 2 pp chunk-micro-batches: as many layers'
    activations as 1F1B's pp micro-batches on rank 0. Micro-batches run in order per chunk."""
    state = _VState(pp, m)
    while any(len(order) < 6 * m for order in state.orders):
        produced = [state.run_next(rank) for rank in range(pp)]  # one unit time step on every rank
        if all(message is None for message in produced):
            raise RuntimeError(f"zb-v list scheduling stalled at pp {pp}, m {m}")  # the tests sweep pp <= 8, m <= 16
        state.arrived.update(message for message in produced if message)
    return state.orders


class _VState:
    """The list scheduler's view after each unit time step: what arrived, what each rank did."""

    def __init__(self, pp: int, m: int) -> None:
        self.pp, self.m, self.last, self.caps = pp, m, 2 * pp - 1, (2 * pp - 1, 2 * pp)
        self.arrived: set[tuple[str, int, int]] = set()  # ("F" or "B", receiving stage, micro-batch)
        self.forwards = [[0, 0] for _ in range(pp)]
        self.backwards = [[0, 0] for _ in range(pp)]
        self.deferred: list[list[tuple[int, int]]] = [[] for _ in range(pp)]
        self.held = [0] * pp
        self.orders: list[list[Step]] = [[] for _ in range(pp)]

    def choose(self, rank: int) -> Step | None:
        for chunk in (1, 0):
            i, stage = self.backwards[rank][chunk], stage_of(rank, chunk, self.pp, "v")
            if i < self.forwards[rank][chunk] and (stage == self.last or ("B", stage, i) in self.arrived):
                return Kind.BACKWARD_INPUT, chunk, i
        for chunk in (1, 0):
            i, stage = self.forwards[rank][chunk], stage_of(rank, chunk, self.pp, "v")
            if i < self.m and (stage == 0 or ("F", stage, i) in self.arrived) and self.held[rank] < self.caps[chunk]:
                return Kind.FORWARD, chunk, i
        if self.deferred[rank]:
            return Kind.BACKWARD_WEIGHT, *self.deferred[rank][0]
        return None

    def run_next(self, rank: int):
        """Run the chosen step; return the message it sends ("" for none), None if the rank idles."""
        step = self.choose(rank)
        if step is None:
            return None
        kind, chunk, i = step
        stage = stage_of(rank, chunk, self.pp, "v")
        self.orders[rank].append(step)
        if kind is Kind.FORWARD:
            self.forwards[rank][chunk] += 1
            self.held[rank] += 1
            return ("F", stage + 1, i) if stage < self.last else ""
        if kind is Kind.BACKWARD_INPUT:
            self.backwards[rank][chunk] += 1
            self.deferred[rank].append((chunk, i))
            return ("B", stage - 1, i) if stage > 0 else ""
        self.deferred[rank].pop(0)
        self.held[rank] -= 1
        return ""
