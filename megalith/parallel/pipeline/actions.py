"""The vocabulary of pipeline schedules: what one rank does, in order, during one step.

Rank r of a pipeline of `pp` ranks holds `v` model chunks. In the "interleaved" placement
chunk c of rank r is global stage `c * pp + r` (Megatron's assignment; with v = 1, stage =
rank). In the "v" placement (zero-bubble ZB-V, two chunks) rank r holds stages r and
2 pp - 1 - r, so the first and the last stage both sit on rank 0 and the turn of the V (stage
pp - 1 to pp) stays on rank pp - 1. Activations flow from stage s to s + 1 and gradients back
from s + 1 to s.

Compute actions: FORWARD and BACKWARD of (chunk, micro-batch). BACKWARD_INPUT and
BACKWARD_WEIGHT split a backward into its input-gradient part (sent upstream at once) and its
weight-gradient part (which sends nothing, so a schedule may defer it), for zero-bubble
schedules. The engine runs them (megalith.parallel.weight_grad defers the linears' W).

Communication actions name the tensor they move, never a peer: RECV_FORWARD(c, i) receives
the input of this rank's chunk c for micro-batch i (from stage s - 1), SEND_FORWARD sends its
output (to s + 1), RECV_BACKWARD receives the gradient of that output (from s + 1),
SEND_BACKWARD sends the gradient of its input (to s - 1). Consecutive communication actions
form one batch, posted together without blocking (batch_isend_irecv); a compute action waits
only for the receive it consumes. Sends are never waited on before the end of the step.

A TimelineEvent records when one compute action ran, in a simulation (simulate.py) or in a
real step (engine.py); timeline.py draws them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Kind(str, Enum):
    FORWARD = "F"
    BACKWARD = "B"
    BACKWARD_INPUT = "BI"
    BACKWARD_WEIGHT = "BW"
    SEND_FORWARD = "SF"
    RECV_FORWARD = "RF"
    SEND_BACKWARD = "SB"
    RECV_BACKWARD = "RB"

    @property
    def is_compute(self) -> bool:
        return self in (Kind.FORWARD, Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)

    @property
    def is_backward(self) -> bool:
        """A backward that consumes the output gradient and sends the input gradient (fused or BI)."""
        return self in (Kind.BACKWARD, Kind.BACKWARD_INPUT)

    @property
    def is_send(self) -> bool:
        return self in (Kind.SEND_FORWARD, Kind.SEND_BACKWARD)

    @property
    def is_recv(self) -> bool:
        return self in (Kind.RECV_FORWARD, Kind.RECV_BACKWARD)


@dataclass(frozen=True)
class Action:
    kind: Kind
    chunk: int
    microbatch: int

    def __str__(self) -> str:
        return f"{self.kind.value}{self.chunk}.{self.microbatch}"


PLACEMENTS = ("interleaved", "v")


def _check_placement(placement: str, chunk: int | None = None) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown stage placement {placement!r}; use one of {', '.join(PLACEMENTS)}")
    if placement == "v" and chunk is not None and chunk not in (0, 1):
        raise ValueError(f"the v placement holds chunks 0 and 1, got chunk {chunk}")


def stage_of(rank: int, chunk: int, pp: int, placement: str = "interleaved") -> int:
    """Global stage held by (rank, chunk)."""
    _check_placement(placement, chunk)
    if placement == "v":
        return rank if chunk == 0 else 2 * pp - 1 - rank
    return chunk * pp + rank


def holder_of(stage: int, pp: int, placement: str = "interleaved") -> tuple[int, int]:
    """(rank, chunk) holding a global stage."""
    _check_placement(placement)
    if placement == "v":
        return (stage, 0) if stage < pp else (2 * pp - 1 - stage, 1)
    return stage % pp, stage // pp


def peer_of(action: Action, rank: int, pp: int, placement: str = "interleaved") -> tuple[int, int]:
    """(peer rank, peer chunk) that a communication action talks to (in the v placement the
    turn's peer is the rank itself)."""
    stage = stage_of(rank, action.chunk, pp, placement)
    if action.kind in (Kind.SEND_FORWARD, Kind.RECV_BACKWARD):
        return holder_of(stage + 1, pp, placement)
    if action.kind in (Kind.RECV_FORWARD, Kind.SEND_BACKWARD):
        return holder_of(stage - 1, pp, placement)
    raise ValueError(f"{action} is not a communication action")


@dataclass(frozen=True)
class TimelineEvent:
    """One compute action (F, B, BI or BW): which rank, what, and when (seconds, or the simulator's units)."""

    rank: int
    kind: str
    chunk: int
    microbatch: int
    start: float
    end: float
