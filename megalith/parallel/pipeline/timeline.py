"""Timelines of a pipeline step (simulated or recorded): Chrome-trace JSON, PNG, bubble, summary."""

from __future__ import annotations

import json
from fractions import Fraction

from megalith.errors import ConfigError
from megalith.parallel.pipeline.actions import TimelineEvent
from megalith.parallel.pipeline.checks import check_schedule, peak_in_flight
from megalith.parallel.pipeline.schedules import build_schedule, placement_of, splits_backward
from megalith.parallel.pipeline.simulate import predicted_bubble, simulate

KIND_NAMES = (("F", "forward"), ("B", "backward"), ("BI", "input grad (B)"), ("BW", "weight grad (W)"))


def to_chrome_trace(events: list[TimelineEvent], time_unit_us: float = 1.0) -> dict:
    """Chrome trace-event format (opens in Perfetto): one row (thread) per rank.

    Perfetto colours a slice by its name with the digits dropped, so "F c mb", "B c mb",
    "BI c mb" and "BW c mb" (forward, fused backward, input and weight gradient) each get one colour."""
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
    if not events:
        raise ConfigError("measuring a bubble needs at least one timeline event, got none")
    ranks = sorted({e.rank for e in events})
    span = max(e.end for e in events) - min(e.start for e in events)
    mean_busy = sum(e.end - e.start for e in events) / len(ranks)
    return float((span - mean_busy) / mean_busy)


def draw_gantt(events: list[TimelineEvent], path, title: str, time_unit: str = "time") -> None:
    """A PNG Gantt chart: one row per rank (rank 0 on top), forwards blue, backwards (fused or
    input gradient) orange, weight gradients green, later chunks darker, micro-batch numbers in the boxes."""
    if not events:
        raise ConfigError("drawing a Gantt chart needs at least one timeline event, got none")
    try:
        import matplotlib
    except ImportError as error:
        raise ConfigError("drawing a PNG needs matplotlib: pip install 'megalith[plot]'") from error
    matplotlib.use("Agg")
    from matplotlib import pyplot

    ranks = sorted({e.rank for e in events})
    chunks = max(e.chunk for e in events) + 1
    begin, finish = float(min(e.start for e in events)), float(max(e.end for e in events))
    span = (finish - begin) or 1.0
    width_in, height_in, legend_in = 12.0, 0.6 * len(ranks) + 1.6, 0.35
    inches_per_unit = (width_in - 1.5) / span  # the axes take the figure's width less the rank labels
    figure, axes = pyplot.subplots(figsize=(width_in, height_in))
    palette = {"F": pyplot.get_cmap("Blues"), "B": pyplot.get_cmap("Oranges"), "BI": pyplot.get_cmap("Oranges"),
               "BW": pyplot.get_cmap("Greens")}

    def shade(chunk: int) -> float:
        return 0.45 + 0.4 * (chunk / max(chunks - 1, 1))

    for e in events:
        colour = palette.get(e.kind, pyplot.get_cmap("Greys"))(shade(e.chunk))
        row = len(ranks) - 1 - ranks.index(e.rank)
        width = float(e.end - e.start)
        axes.barh(row, width, left=float(e.start), height=0.8, color=colour, edgecolor="black", linewidth=0.4)
        label = str(e.microbatch)
        if width * inches_per_unit > (len(label) * 0.6 + 0.6) * 7 / 72:  # 7-point digits with a little margin
            axes.text(float(e.start) + width / 2, row, label, ha="center", va="center", fontsize=7)
    from matplotlib.patches import Patch

    present = {e.kind for e in events}
    legend = [Patch(facecolor=palette[kind](shade(c)), edgecolor="black", linewidth=0.4, label=f"{name} chunk {c}" if chunks > 1 else name)
              for kind, name in KIND_NAMES if kind in present for c in range(chunks)]
    figure.legend(handles=legend, loc="lower center", ncol=min(len(legend), 8), fontsize=8, frameon=False)
    axes.set_xlim(begin, begin + span * 1.01)
    axes.set_ylim(-0.6, len(ranks) - 0.4)
    axes.set_yticks(range(len(ranks)), [f"rank {r}" for r in reversed(ranks)])
    axes.set_xlabel(time_unit)
    axes.set_title(title)
    figure.tight_layout(rect=(0, legend_in / height_in, 1, 1))
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def describe_schedule(name: str, pp: int, vpp: int, microbatches: int, forward_cost: float = 1.0,
                      backward_cost: float = 2.0, p2p_cost: float = 0.0, trace_path=None, png_path=None,
                      wgrad_cost: float | None = None) -> str:
    """Build, check and simulate a schedule on every rank; write its timeline; summarise in a few lines.

    wgrad_cost None: backward is one action of backward_cost. Given, backward_cost is the input
    gradient's part and wgrad_cost the weight gradient's (a fused backward costs both); the
    zero-bubble schedules need it."""
    if wgrad_cost is None and splits_backward(name):
        raise ConfigError(f"{name} splits each backward into input and weight gradients: give the weight "
                          "gradient's cost (--wgrad-cost); the backward cost is then the input gradient's")
    placement = placement_of(name)
    schedules = [build_schedule(name, pp, vpp, microbatches, rank) for rank in range(pp)]
    check_schedule(schedules, pp, vpp, microbatches, placement)
    # exact per-chunk costs (a float converts to Fraction exactly), so formula and simulation agree to the digit
    wgrad = None if wgrad_cost is None else Fraction(wgrad_cost) / vpp
    result = simulate(schedules, pp, vpp, microbatches, Fraction(forward_cost) / vpp,
                      Fraction(backward_cost) / vpp, Fraction(p2p_cost), wgrad, placement)
    formula = predicted_bubble(name, pp, vpp, microbatches, forward_cost, backward_cost, wgrad_cost)
    wgrad_text = "" if wgrad_cost is None else f", weight gradient {wgrad_cost:g}"
    lines = [
        f"{name}: pp {pp}, vpp {vpp}, {microbatches} micro-batches; forward {forward_cost:g}, backward "
        f"{backward_cost:g}{wgrad_text} per stage of the whole model, p2p {p2p_cost:g}",
        "checked: every forward before its backward, sends in receive order on every channel, no deadlock",
        f"bubble: formula {'n/a' if formula is None else f'{float(formula):.4f}'}, "
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
