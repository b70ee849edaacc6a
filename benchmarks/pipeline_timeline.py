"""Record a real pipeline run's timeline and set its measured bubble beside the simulator's.

    .venv/bin/python benchmarks/pipeline_timeline.py --pp 4 --micro-batches 8 --out /tmp/pp4

Trains GPT (pp ranks on this CPU, gloo) for a few steps with the engine recording every
forward and backward, writes the last step's timeline as OUT.json (Chrome trace, opens in
Perfetto) and OUT.png (Gantt chart), and prints the measured bubble next to the simulator's
prediction from the measured median forward and backward times. On a 2-core machine several
ranks share a core, so absolute times are inflated and the measured bubble is noisy.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace

from megalith.config import ModelConfig, parse_layout
from megalith.models.registry import BUILTIN_MODELS
from megalith.parallel.pipeline.schedules import build_schedule
from megalith.parallel.pipeline.simulate import predicted_bubble, simulate
from megalith.parallel.pipeline.timeline import draw_gantt, measured_bubble, write_chrome_trace
from megalith.parallel.spawn import RankPool
from megalith.parallel.pipeline.schedules import default_schedule
from megalith.verify import VerifySettings, train


def record_on_rank(ctx, settings, layout_text):
    layout = parse_layout(layout_text)
    state = ctx.parallel_state(tp=layout.tp, pp=layout.pp)
    steps = {}
    train(settings, layout, state, step_hook=lambda step, result: steps.__setitem__(step, result.pipeline.events))
    return steps[settings.steps - 1] if state.tp_rank == 0 and state.dp_rank == 0 else []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--vpp", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default="pipeline_timeline")
    args = parser.parse_args()

    config = ModelConfig(**{**BUILTIN_MODELS["gpt"].defaults, "hidden_size": 128, "seq_length": 64})
    settings = VerifySettings("gpt", config, steps=args.steps, micro_batches=args.micro_batches, micro_batch_size=2)
    layout = f"pp{args.pp}" + (f".vpp{args.vpp}" if args.vpp > 1 else "")
    with RankPool(args.pp) as pool:
        events = [e for rank_events in pool.run(record_on_rank, settings, layout) for e in rank_events]
    origin = min(e.start for e in events)
    events = [replace(e, start=(e.start - origin) * 1e3, end=(e.end - origin) * 1e3) for e in events]  # ms

    schedule = default_schedule(args.pp, args.vpp)
    forward = statistics.median(e.end - e.start for e in events if e.kind == "F")
    backward = statistics.median(e.end - e.start for e in events if e.kind == "B")
    actions = [build_schedule(schedule, args.pp, args.vpp, args.micro_batches, r) for r in range(args.pp)]
    simulated = simulate(actions, args.pp, args.vpp, args.micro_batches, forward, backward)

    write_chrome_trace(events, f"{args.out}.json", time_unit_us=1e3)
    draw_gantt(events, f"{args.out}.png", f"GPT {layout}, {schedule}, m={args.micro_batches} (recorded on CPU)", "ms")
    print(f"{layout} {schedule} m={args.micro_batches}: median forward {forward:.2f} ms, backward {backward:.2f} ms")
    print(f"bubble: measured {measured_bubble(events):.3f}, simulated from measured costs "
          f"{float(simulated.bubble_fraction):.3f}, formula {float(predicted_bubble(schedule, args.pp, args.vpp, args.micro_batches)):.3f}")
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
