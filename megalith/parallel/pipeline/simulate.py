"""Run all ranks' action lists against a cost model, without processes.

Semantics match the engine: consecutive communication actions are posted at once and never
block; a forward or backward starts when its rank is free and the message it consumes has
arrived (posted by the peer, plus the p2p cost). If no rank can move, the schedule deadlocks.
With p2p cost 0 and equal stage costs, the bubble equals the textbook formula exactly
(use ints or Fractions for exact arithmetic). A message from a rank to itself (the turn of
the V placement) is a local hand-over and costs no p2p time.

The bubble is (makespan - mean busy time per rank) / mean busy time, the makespan measured
from time 0 (when rank 0 starts) to the end of the last action on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction

from megalith.errors import ConfigError
from megalith.parallel.pipeline.actions import Action, Kind, TimelineEvent, peer_of, stage_of

Cost = int | float | Fraction  # ints and Fractions keep the simulated bubble exact


class ScheduleError(ConfigError):
    """A schedule that is malformed, mismatched or deadlocks."""


@dataclass
class SimulationResult:
    events: list[TimelineEvent]
    makespan: Cost
    busy_per_rank: list[Cost]
    bubble_fraction: Cost = field(init=False)

    def __post_init__(self) -> None:
        mean_busy = sum(self.busy_per_rank) / len(self.busy_per_rank)
        self.bubble_fraction = (self.makespan - mean_busy) / mean_busy if mean_busy else 0


def message_of(action: Action, rank: int, pp: int, placement: str = "interleaved") -> tuple[str, int, int]:
    """(direction, receiving stage, micro-batch): what a send or receive carries."""
    stage = stage_of(rank, action.chunk, pp, placement)
    if action.kind is Kind.SEND_FORWARD:
        return "F", stage + 1, action.microbatch
    if action.kind is Kind.SEND_BACKWARD:
        return "B", stage - 1, action.microbatch
    if action.kind is Kind.RECV_FORWARD:
        return "F", stage, action.microbatch
    if action.kind is Kind.RECV_BACKWARD:
        return "B", stage, action.microbatch
    raise ValueError(f"{action} moves no message")


def action_cost(kind: Kind, forward_cost: Cost, backward_cost: Cost, wgrad_cost: Cost | None) -> Cost:
    """wgrad_cost None: backward is fused and costs backward_cost (split actions are refused).
    Otherwise BACKWARD_INPUT costs backward_cost, BACKWARD_WEIGHT wgrad_cost and a fused
    BACKWARD both, so split and fused schedules do the same work."""
    if kind is Kind.FORWARD:
        return forward_cost
    if wgrad_cost is None:
        if kind is not Kind.BACKWARD:
            raise ScheduleError(f"a schedule with {kind.name} actions splits backward; give a weight-gradient cost")
        return backward_cost
    if kind is Kind.BACKWARD:
        return backward_cost + wgrad_cost
    return backward_cost if kind is Kind.BACKWARD_INPUT else wgrad_cost


def simulate(schedules: list[list[Action]], pp: int, vpp: int, microbatches: int,
             forward_cost: Cost = 1, backward_cost: Cost = 2, p2p_cost: Cost = 0,
             wgrad_cost: Cost | None = None, placement: str = "interleaved") -> SimulationResult:
    """Times of every compute action; raises ScheduleError naming the stuck ranks on a deadlock.

    Costs are per chunk: with vpp chunks per rank, pass f / vpp and b / vpp to keep the work of
    the whole model the same as without interleaving. See action_cost for wgrad_cost."""
    if len(schedules) != pp:
        raise ScheduleError(f"{len(schedules)} rank schedules for pipeline size {pp}; give one per rank")
    last = pp * vpp - 1
    position = [0] * pp
    clock = [0] * pp
    busy = [0] * pp
    arrival: dict[tuple[str, int, int], Cost] = {}
    events: list[TimelineEvent] = []
    done = 0
    total = sum(len(s) for s in schedules)
    while done < total:
        moved = False
        for rank in range(pp):
            actions = schedules[rank]
            while position[rank] < len(actions):
                action = actions[position[rank]]
                if not action.kind.is_compute:
                    if action.kind.is_send:
                        local = peer_of(action, rank, pp, placement)[0] == rank
                        arrival[message_of(action, rank, pp, placement)] = clock[rank] + (0 if local else p2p_cost)
                    position[rank] += 1
                    done += 1
                    moved = True
                    continue
                stage = stage_of(rank, action.chunk, pp, placement)
                needs = None
                if action.kind is Kind.FORWARD and stage > 0:
                    needs = ("F", stage, action.microbatch)
                elif action.kind.is_backward and stage < last:
                    needs = ("B", stage, action.microbatch)
                if needs is not None and needs not in arrival:
                    break
                start = max(clock[rank], arrival[needs]) if needs is not None else clock[rank]
                cost = action_cost(action.kind, forward_cost, backward_cost, wgrad_cost)
                clock[rank] = start + cost
                busy[rank] += cost
                events.append(TimelineEvent(rank, action.kind.value, action.chunk, action.microbatch, start, start + cost))
                position[rank] += 1
                done += 1
                moved = True
        if not moved:
            stuck = ", ".join(f"rank {r} at {schedules[r][position[r]]}" for r in range(pp)
                              if position[r] < len(schedules[r]))
            raise ScheduleError(f"the schedule deadlocks: {stuck} wait for messages never sent")
    return SimulationResult(events, max(clock), busy)


def predicted_bubble(name: str, pp: int, vpp: int, microbatches: int, forward_cost: Cost = 1,
                     backward_cost: Cost = 2, wgrad_cost: Cost | None = None) -> Fraction | None:
    """The textbook bubble: (p-1)/m for GPipe and 1F1B, (p-1)/(v m) interleaved, 0 without a pipeline;
    ZB-H1 (p-1)(f+b-w)/(m(f+b+w)) when w <= f+b (Qi et al.); None where no formula holds (zb-v,
    ZB-H1 with w > f+b or without a weight-gradient cost)."""
    if name == "no-pipelining":
        return Fraction(0)
    if name == "interleaved-1f1b":
        return Fraction(pp - 1, vpp * microbatches)
    if name == "zb-h1":
        f, b, w = (Fraction(c) for c in (forward_cost, backward_cost, wgrad_cost if wgrad_cost is not None else -1))
        return (pp - 1) * (f + b - w) / (microbatches * (f + b + w)) if 0 <= w <= f + b else None
    if name == "zb-v":
        return None
    return Fraction(pp - 1, microbatches)
