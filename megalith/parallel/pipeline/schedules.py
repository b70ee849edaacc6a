"""Pipeline schedules as data: (schedule, pp, vpp, micro-batches, rank) -> that rank's actions.

Each generator only decides the order of forwards and backwards; `_with_comm` surrounds
them with the receives and sends their stage needs, so a new schedule is just another ordering
function. The zero-bubble ones (zero_bubble.py) split backward into B and W; zb-v also places
its two chunks per rank in a V (`placement_of`). The engine runs them all (SCHEDULES);
SIMULATED_SCHEDULES, what `megalith schedule` accepts, is the same list.
"""

from __future__ import annotations

from megalith.errors import ConfigError
from megalith.parallel.pipeline.actions import Action, Kind, peer_of, stage_of
from megalith.parallel.pipeline.zero_bubble import zb_h1, zb_v

SCHEDULES = ("no-pipelining", "gpipe", "1f1b", "interleaved-1f1b", "zb-h1", "zb-v")
ZERO_BUBBLE_SCHEDULES = ("zb-h1", "zb-v")
SIMULATED_SCHEDULES = SCHEDULES

Step = tuple[Kind, int, int]  # (compute kind, chunk, micro-batch), before communication is added


def placement_of(name: str) -> str:
    """How a schedule maps (rank, chunk) to stages: zb-v's V, else Megatron's interleaving."""
    return "v" if name == "zb-v" else "interleaved"


def splits_backward(name: str) -> bool:
    """Whether a schedule emits BACKWARD_INPUT and BACKWARD_WEIGHT instead of BACKWARD."""
    return name in ZERO_BUBBLE_SCHEDULES


def default_schedule(pp: int, vpp: int) -> str:
    """Megatron's choice: no pipelining on one stage, 1F1B, interleaved 1F1B with virtual stages."""
    if pp == 1:
        return "no-pipelining"
    return "1f1b" if vpp == 1 else "interleaved-1f1b"


def validate_schedule_args(name: str, pp: int, vpp: int, microbatches: int, known: tuple[str, ...] = SCHEDULES) -> None:
    """One line for every combination a schedule cannot run, before any process starts.

    `known` is what the caller can run: SCHEDULES for the engine, SIMULATED_SCHEDULES to simulate."""
    if name not in known:
        raise ConfigError(f"unknown pipeline schedule {name!r}; use one of {', '.join(known)}")
    for flag, value in (("pipeline size", pp), ("virtual pipeline size", vpp), ("number of micro-batches", microbatches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if name == "no-pipelining" and (pp > 1 or vpp > 1):
        raise ConfigError(f"no-pipelining runs one stage, not pp {pp} x vpp {vpp}; use 1f1b or interleaved-1f1b")
    if name in ("gpipe", "1f1b") and vpp > 1:
        raise ConfigError(f"{name} runs one model chunk per rank, got vpp {vpp}; use interleaved-1f1b or drop vpp")
    if name in ZERO_BUBBLE_SCHEDULES and pp < 2:
        raise ConfigError(f"{name} needs pp >= 2, got pp {pp}; use no-pipelining")
    if name == "zb-h1" and vpp > 1:
        raise ConfigError(f"zb-h1 runs one model chunk per rank, got vpp {vpp}; use zb-v (vpp 2) or drop vpp")
    if name == "zb-v" and vpp != 2:
        raise ConfigError(f"zb-v runs two model chunks per rank in a V, got vpp {vpp}; use vpp 2")
    if name == "interleaved-1f1b":
        if pp < 2 or vpp < 2:
            raise ConfigError(f"interleaved-1f1b needs pp >= 2 and vpp >= 2, got pp {pp} and vpp {vpp}; use 1f1b")


def build_schedule(name: str, pp: int, vpp: int, microbatches: int, rank: int) -> list[Action]:
    """Rank `rank`'s ordered actions for one step."""
    validate_schedule_args(name, pp, vpp, microbatches, SIMULATED_SCHEDULES)
    if not 0 <= rank < pp:
        raise ConfigError(f"pipeline rank {rank} is outside 0..{pp - 1}")
    if name == "zb-v":
        every = [_with_comm(order, pp, vpp, r, "v") for r, order in enumerate(zb_v(pp, microbatches))]
        return _receives_in_send_order(every, rank, pp, "v")
    match name:
        case "no-pipelining":
            order = _no_pipelining(microbatches)
        case "gpipe":
            order = _gpipe(microbatches)
        case "1f1b":
            order = _one_f_one_b(pp, microbatches, rank)
        case "zb-h1":
            order = zb_h1(pp, microbatches, rank)
        case _:
            order = _interleaved(pp, vpp, microbatches, rank)
    return _with_comm(order, pp, vpp, rank)


def _no_pipelining(m: int) -> list[Step]:
    """Gradient accumulation: each micro-batch's backward right after its forward."""
    return [(Kind.FORWARD if half == 0 else Kind.BACKWARD, 0, i) for i in range(m) for half in (0, 1)]


def _gpipe(m: int) -> list[Step]:
    """All forwards, then all backwards: simple, but holds every micro-batch's activations."""
    return [(Kind.FORWARD, 0, i) for i in range(m)] + [(Kind.BACKWARD, 0, i) for i in range(m)]


def _one_f_one_b(pp: int, m: int, rank: int) -> list[Step]:
    """Megatron's 1F1B: pp - rank - 1 warm-up forwards, then one forward + one backward, then the rest."""
    warmup = min(pp - rank - 1, m)
    order = [(Kind.FORWARD, 0, i) for i in range(warmup)]
    for k in range(m - warmup):
        order += [(Kind.FORWARD, 0, warmup + k), (Kind.BACKWARD, 0, k)]
    return order + [(Kind.BACKWARD, 0, i) for i in range(m - warmup, m)]


def _virtual(k: int, pp: int, vpp: int, forward: bool) -> tuple[int, int]:
    """(chunk, micro-batch) of a rank's k-th forward or backward in the interleaved order:
    groups of pp micro-batches go through chunk 0, 1, ... (backward: the last chunk first)."""
    group, within = divmod(k, pp * vpp)
    chunk = within // pp
    return (chunk if forward else vpp - 1 - chunk), group * pp + within % pp


def _interleaved(pp: int, vpp: int, m: int, rank: int) -> list[Step]:
    """Megatron's interleaved 1F1B: (pp - rank - 1) * 2 + (vpp - 1) * pp warm-up forwards.

    When pp does not divide m, the order is that of the next multiple of pp with the missing
    micro-batches left out: each group of pp micro-batches goes through every chunk, the last
    group holding what is left (Megatron-Core's schedule table). Leaving actions out of a
    deadlock-free order cannot create a wait cycle, and every channel keeps its order."""
    if m % pp:
        padded = -(-m // pp) * pp
        return [step for step in _interleaved(pp, vpp, padded, rank) if step[2] < m]
    total = m * vpp
    warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)
    order = [(Kind.FORWARD, *_virtual(k, pp, vpp, True)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [(Kind.FORWARD, *_virtual(warmup + k, pp, vpp, True)), (Kind.BACKWARD, *_virtual(k, pp, vpp, False))]
    return order + [(Kind.BACKWARD, *_virtual(k, pp, vpp, False)) for k in range(total - warmup, total)]


def _with_comm(order: list[Step], pp: int, vpp: int, rank: int, placement: str = "interleaved") -> list[Action]:
    """Receive just before the compute that consumes it, send right after the one that produces it.

    A send and the next receive are adjacent, so they form one batch (Megatron's
    send_forward_recv_backward): the receive is posted as soon as the previous compute ends.
    A W (BACKWARD_WEIGHT) neither receives nor sends."""
    last = pp * vpp - 1
    actions: list[Action] = []
    for kind, chunk, microbatch in order:
        stage = stage_of(rank, chunk, pp, placement)
        before = after = None
        if kind is Kind.FORWARD:
            before, after = (Kind.RECV_FORWARD if stage > 0 else None), (Kind.SEND_FORWARD if stage < last else None)
        elif kind.is_backward:
            before, after = (Kind.RECV_BACKWARD if stage < last else None), (Kind.SEND_BACKWARD if stage > 0 else None)
        if before:
            actions.append(Action(before, chunk, microbatch))
        actions.append(Action(kind, chunk, microbatch))
        if after:
            actions.append(Action(after, chunk, microbatch))
    return actions


def _receives_in_send_order(every: list[list[Action]], rank: int, pp: int, placement: str) -> list[Action]:
    """`rank`'s actions with receives moved earlier where needed, so that every channel into it
    receives in the order its sender sends (NCCL matches messages by order).

    In the V a channel carries forwards of one chunk and gradients of the other, which the two
    ranks may interleave differently. A receive never blocks (only the compute that consumes it
    waits), so posting one earlier changes no timing: each receive goes just before the first
    compute that consumes it or any later message of its channel."""
    slot: dict[Action, int] = {}  # receive -> index of the compute it is posted before
    computes: list[Action] = []
    sends_after: list[list[Action]] = [[]]  # sends_after[k + 1]: the sends right after compute k
    for action in every[rank]:
        if action.kind.is_recv:
            slot[action] = len(computes)
        elif action.kind.is_compute:
            computes.append(action)
            sends_after.append([])
        else:
            sends_after[-1].append(action)
    sequence: dict[Action, tuple[int, int]] = {}  # receive -> (sender, position on its channel)
    for peer in range(pp):
        sent = [a for a in every[peer] if a.kind.is_send and peer_of(a, peer, pp, placement)[0] == rank]
        earliest = len(computes)
        for position in reversed(range(len(sent))):
            receive = _receive_of(sent[position], peer, pp, placement)
            earliest = slot[receive] = min(earliest, slot[receive])
            sequence[receive] = (peer, position)
    actions = list(sends_after[0])
    for index, compute in enumerate(computes):
        actions += sorted((r for r in slot if slot[r] == index), key=sequence.__getitem__)
        actions += [compute] + sends_after[index + 1]
    return actions


def _receive_of(send: Action, rank: int, pp: int, placement: str) -> Action:
    """The receive on the peer that matches a send."""
    peer_chunk = peer_of(send, rank, pp, placement)[1]
    kind = Kind.RECV_FORWARD if send.kind is Kind.SEND_FORWARD else Kind.RECV_BACKWARD
    return Action(kind, peer_chunk, send.microbatch)
