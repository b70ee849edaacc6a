"""Checks of a schedule without processes: structure, channel order, deadlock, in-flight bound."""

from __future__ import annotations

from collections import Counter

from megalith.parallel.pipeline.actions import Action, Kind, peer_of, stage_of
from megalith.parallel.pipeline.simulate import ScheduleError, message_of, simulate


BACKWARDS = (Kind.BACKWARD, Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT)


def _expected_actions(rank: int, pp: int, vpp: int, microbatches: int, placement: str) -> Counter:
    """Forwards and communication; backwards are checked apart (fused, or split into BI and BW)."""
    last = pp * vpp - 1
    expected = Counter()
    for chunk in range(vpp):
        stage = stage_of(rank, chunk, pp, placement)
        kinds = [Kind.FORWARD]
        kinds += [Kind.RECV_FORWARD, Kind.SEND_BACKWARD] if stage > 0 else []
        kinds += [Kind.SEND_FORWARD, Kind.RECV_BACKWARD] if stage < last else []
        expected.update(Action(kind, chunk, i) for kind in kinds for i in range(microbatches))
    return expected


def _check_counts(actions: list[Action], rank: int, pp: int, vpp: int, microbatches: int, placement: str) -> Counter:
    """Every expected forward and message exactly once; per forward one B, or one BI and one BW."""
    counts = Counter(actions)
    expected = _expected_actions(rank, pp, vpp, microbatches, placement)
    for chunk in range(vpp):
        for i in range(microbatches):
            split = Action(Kind.BACKWARD_INPUT, chunk, i) in counts or Action(Kind.BACKWARD_WEIGHT, chunk, i) in counts
            kinds = (Kind.BACKWARD_INPUT, Kind.BACKWARD_WEIGHT) if split else (Kind.BACKWARD,)
            expected.update(Action(kind, chunk, i) for kind in kinds)
    if counts != expected:
        extra, missing = counts - expected, expected - counts
        what = f"extra {', '.join(map(str, extra))}" if extra else f"missing {', '.join(map(str, missing))}"
        raise ScheduleError(f"rank {rank}: {what}")
    return counts


def _check_rank(actions: list[Action], rank: int, pp: int, vpp: int, microbatches: int, placement: str) -> None:
    """F before B (or BI before BW), each receive before its compute, each send after it."""
    counts = _check_counts(actions, rank, pp, vpp, microbatches, placement)
    seen: set[tuple[Kind, int, int]] = set()
    needs = {Kind.FORWARD: [Kind.RECV_FORWARD], Kind.BACKWARD: [Kind.RECV_BACKWARD],
             Kind.BACKWARD_INPUT: [Kind.RECV_BACKWARD], Kind.BACKWARD_WEIGHT: [Kind.BACKWARD_INPUT],
             Kind.SEND_FORWARD: [Kind.FORWARD], Kind.SEND_BACKWARD: [Kind.BACKWARD, Kind.BACKWARD_INPUT]}
    for action in actions:
        key = (action.chunk, action.microbatch)
        if action.kind in BACKWARDS and (Kind.FORWARD, *key) not in seen:
            raise ScheduleError(f"rank {rank}: {action} comes before its forward")
        for required in needs.get(action.kind, []):
            if Action(required, *key) in counts and (required, *key) not in seen:
                raise ScheduleError(f"rank {rank}: {action} comes before {Action(required, *key)}")
        seen.add((action.kind, *key))


def _check_channels(schedules: list[list[Action]], pp: int, placement: str) -> None:
    """Per ordered pair of ranks, messages are sent in the order they are received (NCCL matches by order)."""
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for rank, actions in enumerate(schedules):
        for action in actions:
            if action.kind.is_compute:
                continue
            peer = peer_of(action, rank, pp, placement)[0]
            channel = (rank, peer) if action.kind.is_send else (peer, rank)
            message = message_of(action, rank, pp, placement)
            (sent if action.kind.is_send else received).setdefault(channel, []).append(message)
    for channel in sorted(set(sent) | set(received)):
        if sent.get(channel, []) != received.get(channel, []):
            raise ScheduleError(
                f"rank {channel[0]} sends to rank {channel[1]} in an order its receives do not follow: "
                f"{sent.get(channel, [])[:4]}... vs {received.get(channel, [])[:4]}..."
            )


def check_schedule(schedules: list[list[Action]], pp: int, vpp: int, microbatches: int,
                   placement: str = "interleaved") -> None:
    """Raise ScheduleError on the first problem: structure, order on a channel, or a deadlock."""
    if len(schedules) != pp:
        raise ScheduleError(f"{len(schedules)} rank schedules for pipeline size {pp}")
    if placement == "v" and vpp != 2:
        raise ScheduleError(f"the v placement holds two chunks per rank, got vpp {vpp}")
    for rank, actions in enumerate(schedules):
        _check_rank(actions, rank, pp, vpp, microbatches, placement)
    _check_channels(schedules, pp, placement)
    simulate(schedules, pp, vpp, microbatches, wgrad_cost=1, placement=placement)  # deadlock does not depend on costs


def peak_in_flight(actions: list[Action]) -> int:
    """Most (chunk, micro-batch) forwards done whose backward is not (fused B, or W when split):
    activations held at once."""
    live = peak = 0
    for action in actions:
        if action.kind is Kind.FORWARD:
            live += 1
            peak = max(peak, live)
        elif action.kind in (Kind.BACKWARD, Kind.BACKWARD_WEIGHT):
            live -= 1
    return peak


def theoretical_peak_in_flight(name: str, pp: int, vpp: int, microbatches: int, rank: int) -> int:
    """1F1B: min(pp - rank, m); interleaved: min(m v, 2 (pp - rank - 1) + (v - 1) pp + 1); GPipe: m;
    zb-h1: min(pp, m) on every rank (1F1B's peak, on rank 0); zb-v: min(2 pp, 2 m) chunk-micro-batches,
    each half a stage's layers, so as many layers' activations as 1F1B's peak."""
    if name == "zb-h1":
        return min(pp, microbatches)
    if name == "zb-v":
        return min(2 * pp, 2 * microbatches)
    if name == "1f1b":
        return min(pp - rank, microbatches)
    if name == "interleaved-1f1b":
        return min(microbatches * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)
    if name == "gpipe":
        return microbatches
    return 1
