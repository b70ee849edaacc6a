"""Checks of a schedule without processes: structure, channel order, deadlock, in-flight bound."""

from __future__ import annotations

from collections import Counter

from megalith.parallel.pipeline.actions import Action, Kind, peer_of, stage_of
from megalith.parallel.pipeline.simulate import ScheduleError, message_of, simulate


def _expected_actions(rank: int, pp: int, vpp: int, microbatches: int) -> Counter:
    last = pp * vpp - 1
    expected = Counter()
    for chunk in range(vpp):
        stage = stage_of(rank, chunk, pp)
        kinds = [Kind.FORWARD, Kind.BACKWARD]
        kinds += [Kind.RECV_FORWARD, Kind.SEND_BACKWARD] if stage > 0 else []
        kinds += [Kind.SEND_FORWARD, Kind.RECV_BACKWARD] if stage < last else []
        expected.update(Action(kind, chunk, i) for kind in kinds for i in range(microbatches))
    return expected


def _check_rank(actions: list[Action], rank: int, pp: int, vpp: int, microbatches: int) -> None:
    counts = Counter(actions)
    expected = _expected_actions(rank, pp, vpp, microbatches)
    if counts != expected:
        extra, missing = counts - expected, expected - counts
        what = f"extra {', '.join(map(str, extra))}" if extra else f"missing {', '.join(map(str, missing))}"
        raise ScheduleError(f"rank {rank}: {what}")
    seen: set[tuple[Kind, int, int]] = set()
    needs = {Kind.FORWARD: Kind.RECV_FORWARD, Kind.BACKWARD: Kind.RECV_BACKWARD,
             Kind.SEND_FORWARD: Kind.FORWARD, Kind.SEND_BACKWARD: Kind.BACKWARD}
    for action in actions:
        key = (action.chunk, action.microbatch)
        if action.kind is Kind.BACKWARD and (Kind.FORWARD, *key) not in seen:
            raise ScheduleError(f"rank {rank}: {action} comes before its forward")
        required = needs.get(action.kind)
        if required is not None and Action(required, *key) in counts and (required, *key) not in seen:
            raise ScheduleError(f"rank {rank}: {action} comes before {Action(required, *key)}")
        seen.add((action.kind, *key))


def _check_channels(schedules: list[list[Action]], pp: int) -> None:
    """Per ordered pair of ranks, messages are sent in the order they are received (NCCL matches by order)."""
    sent: dict[tuple[int, int], list] = {}
    received: dict[tuple[int, int], list] = {}
    for rank, actions in enumerate(schedules):
        for action in actions:
            if action.kind.is_compute:
                continue
            peer = peer_of(action, rank, pp)[0]
            channel = (rank, peer) if action.kind.is_send else (peer, rank)
            (sent if action.kind.is_send else received).setdefault(channel, []).append(message_of(action, rank, pp))
    for channel in sorted(set(sent) | set(received)):
        if sent.get(channel, []) != received.get(channel, []):
            raise ScheduleError(
                f"rank {channel[0]} sends to rank {channel[1]} in an order its receives do not follow: "
                f"{sent.get(channel, [])[:4]}... vs {received.get(channel, [])[:4]}..."
            )


def check_schedule(schedules: list[list[Action]], pp: int, vpp: int, microbatches: int) -> None:
    """Raise ScheduleError on the first problem: structure, order on a channel, or a deadlock."""
    if len(schedules) != pp:
        raise ScheduleError(f"{len(schedules)} rank schedules for pipeline size {pp}")
    for rank, actions in enumerate(schedules):
        _check_rank(actions, rank, pp, vpp, microbatches)
    _check_channels(schedules, pp)
    simulate(schedules, pp, vpp, microbatches)


def peak_in_flight(actions: list[Action]) -> int:
    """Most (chunk, micro-batch) forwards done whose backward is not: activations held at once."""
    live = peak = 0
    for action in actions:
        if action.kind is Kind.FORWARD:
            live += 1
            peak = max(peak, live)
        elif action.kind is Kind.BACKWARD:
            live -= 1
    return peak


def theoretical_peak_in_flight(name: str, pp: int, vpp: int, microbatches: int, rank: int) -> int:
    """1F1B: min(pp - rank, m); interleaved: min(m v, 2 (pp - rank - 1) + (v - 1) pp + 1); GPipe: m."""
    if name == "1f1b":
        return min(pp - rank, microbatches)
    if name == "interleaved-1f1b":
        return min(microbatches * vpp, 2 * (pp - rank - 1) + (vpp - 1) * pp + 1)
    if name == "gpipe":
        return microbatches
    return 1
