"""`megalith <command>` (= `python -m megalith <command>`)."""

from __future__ import annotations

import argparse
import sys

from megalith.errors import ConfigError

DEFAULT_DEMO_LAYOUTS = ["tp2", "tp2.sp", "tp4", "tp4.sp"]


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from megalith.config import parse_layout
    from megalith.demo import DemoSettings, format_table, run_demo

    layouts = [parse_layout(text) for text in args.layouts]
    defaults = DemoSettings()
    model = replace(
        defaults.model,
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_layers=args.num_layers,
        seq_length=args.seq_length,
    )
    settings = DemoSettings(model=model, batch_size=args.micro_batch_size, steps=args.steps, lr=args.lr, seed=args.seed)
    print(f"training a tiny tensor-parallel LM for {settings.steps} AdamW steps under each layout "
          f"and one process (fp32, CPU ranks over gloo)", flush=True)
    results = run_demo(layouts, settings)
    print(format_table(results))
    failed = [r.layout for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _topology(args: argparse.Namespace) -> int:
    from megalith.parallel.grid import RankGrid

    grid = RankGrid(args.world_size, tp=args.tensor_model_parallel_size, pp=args.pipeline_model_parallel_size,
                    cp=args.context_parallel_size)
    print(f"layout {grid}, order {grid.ORDER}")
    kinds = [kind for kind in grid.GROUP_KINDS if kind not in ("tp_cp",)]
    print("rank  tp cp dp pp  " + "  ".join(f"{kind}" for kind in kinds))
    for rank in range(grid.world_size):
        c = grid.coords(rank)
        groups = "  ".join(str(grid.group_of(kind, rank) or "-").replace(" ", "") for kind in kinds)
        print(f"{rank:>4}  {c.tp:>2} {c.cp:>2} {c.dp:>2} {c.pp:>2}  {groups}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megalith", description=__doc__.strip('"` \n'))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo", help="train a tiny tensor-parallel LM under several layouts and check each against one process",
        description="Train a tiny tensor-parallel language model under each layout on CPU ranks and compare "
        "losses and final parameters with one process (PASS below 1e-5 relative). Exit status 1 on any FAIL.",
    )
    demo.add_argument("--layouts", nargs="+", default=DEFAULT_DEMO_LAYOUTS, metavar="LAYOUT",
                      help="dotted tokens: tpN, sp (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=10, help="AdamW steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=1234)
    demo.add_argument("--lr", type=float, default=1e-2)
    demo.add_argument("--micro-batch-size", type=int, default=4)
    demo.add_argument("--vocab-size", type=int, default=97)
    demo.add_argument("--hidden-size", type=int, default=32)
    demo.add_argument("--ffn-hidden-size", type=int, default=64)
    demo.add_argument("--num-layers", type=int, default=2)
    demo.add_argument("--seq-length", type=int, default=16)
    demo.set_defaults(run=_demo)

    topology = commands.add_parser("topology", help="print every rank's coordinates and process groups",
                                   description="Print the rank grid (order tp-cp-dp-pp) of a layout: no processes started.")
    topology.add_argument("--world-size", type=int, required=True)
    topology.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1)
    topology.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1)
    topology.add_argument("--context-parallel-size", "--cp", type=int, default=1)
    topology.set_defaults(run=_topology)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ConfigError as error:
        print(f"megalith {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
