"""Timelines of a pipeline step (simulated or recorded): Chrome-trace JSON, PNG, bubble, summary."""

from __future__ import annotations

import json
from dataclasses import dataclass

from megalith.errors import ConfigError


@dataclass(frozen=True)
class TimelineEvent:
    """One forward or backward: which rank, what, and when (seconds, or the simulator's units)."""

    rank: int
    kind: str
    chunk: int
    microbatch: int
    start: float
    end: float


def to_chrome_trace(events: list[TimelineEvent], time_unit_us: float = 1.0) -> dict:
    """Chrome trace-event format (opens in Perfetto): one row (thread) per rank."""
    trace = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}}
             for rank in sorted({e.rank for e in events})]
    for e in events:
        trace.append({
            "name": f"{e.kind} c{e.chunk} mb{e.microbatch}", "cat": e.kind, "ph": "X", "pid": 0, "tid": e.rank,
            "ts": float(e.start) * time_unit_us, "dur": float(e.end - e.start) * time_unit_us,
            "args": {"chunk": e.chunk, "microbatch": e.microbatch},
        })
    return {"traceEvents": trace, "displayTimeUnit": "ms"}


def write_chrome_trace(events: list[TimelineEvent], path, time_unit_us: float = 1.0) -> None:
    with open(path, "w") as handle:
        json.dump(to_chrome_trace(events, time_unit_us), handle)


def measured_bubble(events: list[TimelineEvent]) -> float:
    """(span of the step - mean busy time per rank) / mean busy time: the simulator's definition."""
    ranks = sorted({e.rank for e in events})
    span = max(e.end for e in events) - min(e.start for e in events)
    mean_busy = sum(e.end - e.start for e in events) / len(ranks)
    return float((span - mean_busy) / mean_busy)


def draw_gantt(events: list[TimelineEvent], path, title: str, time_unit: str = "time") -> None:
    """A PNG Gantt chart: one row per rank (rank 0 on top), forwards blue, backwards orange,
    later chunks darker, micro-batch numbers in the boxes."""
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError("drawing a PNG needs matplotlib: pip install 'megalith[plot]'") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot

    ranks = sorted({e.rank for e in events})
    chunks = max(e.chunk for e in events) + 1
    span = max(e.end for e in events) - min(e.start for e in events)
    figure, axes = pyplot.subplots(figsize=(12, 0.6 * len(ranks) + 1.8))
    palette = {"F": pyplot.get_cmap("Blues"), "B": pyplot.get_cmap("Oranges")}
    for e in events:
        shade = 0.45 + 0.4 * (e.chunk / max(chunks - 1, 1))
        colour = palette.get(e.kind, pyplot.get_cmap("Greys"))(shade)
        row = len(ranks) - 1 - ranks.index(e.rank)
        width = float(e.end - e.start)
        axes.barh(row, width, left=float(e.start), height=0.8, color=colour, edgecolor="black", linewidth=0.4)
        if width > span / 60:
            axes.text(float(e.start) + width / 2, row, str(e.microbatch), ha="center", va="center", fontsize=7)
    from matplotlib.patches import Patch

    legend = [Patch(color=palette[kind](0.45 + 0.4 * (c / max(chunks - 1, 1))), label=f"{name} chunk {c}")
              for kind, name in (("F", "forward"), ("B", "backward")) for c in range(chunks)]
    axes.legend(handles=legend, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=min(len(legend), 8),
                fontsize=8, frameon=False)
    axes.set_yticks(range(len(ranks)), [f"rank {r}" for r in reversed(ranks)])
    axes.set_xlabel(time_unit)
    axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def describe_schedule(name: str, pp: int, vpp: int, microbatches: int, forward_cost: float = 1.0,
                      backward_cost: float = 2.0, p2p_cost: float = 0.0, trace_path=None, png_path=None) -> str:
    """Build, check and simulate a schedule on every rank; write its timeline; summarise in a few lines."""
    from megalith.parallel.pipeline.checks import check_schedule, peak_in_flight
    from megalith.parallel.pipeline.schedules import build_schedule
    from megalith.parallel.pipeline.simulate import predicted_bubble, simulate

    schedules = [build_schedule(name, pp, vpp, microbatches, rank) for rank in range(pp)]
    check_schedule(schedules, pp, vpp, microbatches)
    result = simulate(schedules, pp, vpp, microbatches, forward_cost / vpp, backward_cost / vpp, p2p_cost)
    lines = [
        f"{name}: pp {pp}, vpp {vpp}, {microbatches} micro-batches; forward {forward_cost:g}, backward "
        f"{backward_cost:g} per stage of the whole model, p2p {p2p_cost:g}",
        "checked: every forward before its backward, sends in receive order on every channel, no deadlock",
        f"bubble: formula {float(predicted_bubble(name, pp, vpp, microbatches)):.4f}, "
        f"simulated {float(result.bubble_fraction):.4f}; step time {float(result.makespan):g}",
        "peak in-flight micro-batches per rank: " + ", ".join(str(peak_in_flight(s)) for s in schedules),
    ]
    if trace_path:
        write_chrome_trace(result.events, trace_path)
        lines.append(f"wrote {trace_path} (open in Perfetto)")
    if png_path:
        draw_gantt(result.events, png_path, f"{name}: pp {pp}, vpp {vpp}, m {microbatches} (simulated)", "cost units")
        lines.append(f"wrote {png_path}")
    return "\n".join(lines)
