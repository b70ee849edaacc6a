"""`megalith <command>` (= `python -m megalith <command>`)."""

from __future__ import annotations

import argparse
import sys

from megalith.errors import ConfigError

DEFAULT_VERIFY_LAYOUTS = ["tp2", "tp2.sp", "tp4", "tp4.sp", "tp2.sp.recompute-full", "tp2.sp.recompute-selective",
                          "pp4", "pp2.vpp2", "tp2.pp2.sp", "dp2", "dp4.zero1", "tp2.dp2.sp.zero1", "pp2.dp2.zero1.bf16"]


def _model_config(args: argparse.Namespace):
    from megalith.config import ModelConfig, config_from_arguments
    from megalith.config.model import megatron_flag_rules

    config, notices = megatron_flag_rules(config_from_arguments(args, ModelConfig))
    for line in notices:
        print(f"notice: {line}")
    return config


def _check_megatron_flags(args: argparse.Namespace) -> None:
    """Refuse Megatron flags owned by other issues; name the accepted GPU tuning knobs once."""
    from megalith.config.megatron import compat_notice, refuse_unsupported

    refuse_unsupported(args)
    notice = compat_notice(args)
    if notice:
        print(f"note: {notice}", flush=True)


def _verify(args: argparse.Namespace) -> int:
    from megalith.config import config_from_arguments, explicit_flags, parse_layout
    from megalith.models.registry import get_model_spec
    from megalith.verify import VerifySettings, check_layouts, format_table, run_verify

    _check_megatron_flags(args)
    layouts = [parse_layout(text) for text in args.layouts]
    given = explicit_flags(args)
    for name, value in get_model_spec(args.model).defaults.items():  # the model's own small defaults
        if name not in given:
            setattr(args, name, value)
    config = get_model_spec(args.model).resolved(_model_config(args))
    settings = config_from_arguments(args, VerifySettings, model=args.model, config=config)
    check_layouts(settings, layouts)
    print(f"verify {args.model}: {config.num_layers} layers, hidden {config.hidden_size}, "
          f"{config.num_attention_heads} heads ({config.num_query_groups} query groups), {config.params_dtype}; "
          f"{settings.steps} {settings.optimizer} steps (clip {settings.clip_grad:g}, lr {settings.lr:g} "
          f"{settings.lr_decay_style}) of {settings.global_batch_size} sequences of {config.seq_length} tokens, each "
          "layout against one process in its precision", flush=True)
    from megalith.verify import reference_config

    if reference_config(config) != config:
        print("note: the reference runs torch's own code (--kernel-backend torch, local attention for a fused "
              "--attention-backend): the fused kernels are checked against the plain implementation", flush=True)
    if config.hidden_dropout > 0 or config.attention_dropout > 0:
        print("note: dropout > 0 cannot match one process under tp (streams differ by design); expect FAIL")
    results = run_verify(settings, layouts)
    print(format_table(results))
    failed = [r.layout for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def _bench_overhead(args: argparse.Namespace) -> int:
    from megalith.overhead import format_overhead, measure_overhead

    _check_megatron_flags(args)
    config = _model_config(args)
    result = measure_overhead(config, micro_batch_size=args.micro_batch_size, repeats=args.repeats,
                              warmup=args.warmup, seed=args.seed)
    print(format_overhead(result, config))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from megalith.config.arguments import resolve_pretrain_config, world_size_from_env
    from megalith.training.loop import run_pretrain

    config = resolve_pretrain_config(args, world_size_from_env())  # every check before any process group
    return run_pretrain(config)


def _topology(args: argparse.Namespace) -> int:
    from megalith.config import Layout

    grid = Layout.over_world(args.world_size, tp=args.tensor_model_parallel_size,
                             pp=args.pipeline_model_parallel_size, cp=args.context_parallel_size,
                             ep=args.expert_model_parallel_size, etp=args.expert_tensor_parallel_size).grid()
    print(f"layout {grid}, order {grid.ORDER}")
    kinds = [kind for kind in grid.GROUP_KINDS if kind != "tp_cp"]
    print("rank  tp cp dp pp  " + "  ".join(kinds))
    for rank in range(grid.world_size):
        c = grid.coords(rank)
        groups = "  ".join(str(grid.group_of(kind, rank) or "-").replace(" ", "") for kind in kinds)
        print(f"{rank:>4}  {c.tp:>2} {c.cp:>2} {c.dp:>2} {c.pp:>2}  {groups}")
    if grid.has_expert_axes:  # the experts' factorisation of the same ranks (ep 1, etp = tp: the groups above)
        print(f"experts etp{grid.etp}.ep{grid.ep}.edp{grid.edp}.pp{grid.pp}, order {grid.EXPERT_ORDER}")
        kinds = list(grid.EXPERT_GROUP_KINDS)
        print("rank  etp ep edp pp  " + "  ".join(kinds))
        for rank in range(grid.world_size):
            e = grid.expert_coords(rank)
            groups = "  ".join(str(grid.expert_group_of(kind, rank)).replace(" ", "") for kind in kinds)
            print(f"{rank:>4}  {e.etp:>3} {e.ep:>2} {e.edp:>3} {e.pp:>2}  {groups}")
    return 0


def _checkpoint_inspect(args: argparse.Namespace) -> int:
    from megalith.training.checkpoint_format import describe

    print(describe(args.directory))
    return 0


def _add_model_arguments(parser: argparse.ArgumentParser, overrides: dict) -> None:
    """The model flags, then the Megatron flags megalith does not implement (refused or ignored when run)."""
    from megalith.config import ModelConfig, add_config_arguments
    from megalith.config.megatron import add_megatron_compat_arguments

    add_config_arguments(parser.add_argument_group("model (Megatron's flag names)"), ModelConfig, overrides)
    add_megatron_compat_arguments(parser)


def _schedule(args: argparse.Namespace) -> int:
    from megalith.parallel.pipeline.schedules import SIMULATED_SCHEDULES, default_schedule, validate_schedule_args
    from megalith.parallel.pipeline.timeline import describe_schedule

    vpp = args.vpp if args.vpp is not None else (2 if args.schedule == "zb-v" else 1)
    schedule = args.schedule or default_schedule(args.pp, vpp)
    validate_schedule_args(schedule, args.pp, vpp, args.micro_batches, SIMULATED_SCHEDULES)
    print(describe_schedule(schedule, args.pp, vpp, args.micro_batches, forward_cost=args.forward_cost,
                            backward_cost=args.backward_cost, p2p_cost=args.p2p_cost,
                            trace_path=args.trace, png_path=args.png, wgrad_cost=args.wgrad_cost))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from megalith.config import add_config_arguments
    from megalith.models.registry import BUILTIN_MODELS
    from megalith.overhead import DEFAULT_BENCH_CONFIG
    from megalith.parallel.pipeline.schedules import SIMULATED_SCHEDULES
    from megalith.verify import VerifySettings

    parser = argparse.ArgumentParser(prog="megalith", description="Megatron-style 3D-parallel transformer training.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    verify = commands.add_parser(
        "verify", help="train a model under several layouts and check each against one process",
        description="Train a small model for a few steps of the real optimizer (clipping, LR schedule, loss "
        "scaling, ZeRO-1 with zero1) under one process and under each layout (CPU ranks spawned here) and print, "
        "per layout, the largest relative difference of the per-step losses and grad norms, of the first step's "
        "gradients and of the final parameters; PASS below 1e-5 in fp32 (bf16/fp16 layouts: against one process "
        "in the same precision, with the bounds of megalith.testing.RELATIVE_TOLERANCES). Exit status 1 on any FAIL.",
    )
    verify.add_argument("--model", default="gpt", metavar="NAME",
                        help=f"a built-in model ({', '.join(BUILTIN_MODELS)}), module.path:ATTRIBUTE naming a "
                        "ModelSpec, or an entry point of the group megalith.models (docs/custom_models.md; "
                        "default: %(default)s)")
    verify.add_argument("--layouts", nargs="+", default=DEFAULT_VERIFY_LAYOUTS, metavar="LAYOUT",
                        help="dotted tokens: tpN, ppN, vppN, dpN, mbN (micro-batches per dp rank), sp, zero1 "
                        "(distributed optimizer), recompute-full, recompute-selective, bf16, fp16, a schedule name "
                        "(1f1b, gpipe, interleaved-1f1b, no-pipelining), epN, etpN (expert parallelism; they need "
                        "--num-experts); cpN is parsed and refused until its layer exists (default: %(default)s)")
    add_config_arguments(verify.add_argument_group("training"), VerifySettings)
    _add_model_arguments(verify, BUILTIN_MODELS["gpt"].defaults)
    verify.set_defaults(run=_verify)

    from megalith.config.arguments import PRETRAIN_DESCRIPTION, PRETRAIN_USAGE, add_pretrain_arguments

    pretrain = commands.add_parser(
        "pretrain", help="train a model with tensor, pipeline and data parallelism (under torchrun or srun)",
        description=PRETRAIN_DESCRIPTION, usage=PRETRAIN_USAGE.replace("%(prog)s", "megalith pretrain"),
    )
    add_pretrain_arguments(pretrain)
    pretrain.set_defaults(run=_pretrain)

    bench = commands.add_parser(
        "bench-overhead", help="time megalith's GPT against a plain-PyTorch GPT of the same architecture",
        description="Time one training step (forward, backward, AdamW) of megalith's GPT (one process, tp=1) and "
        "of a plain-PyTorch GPT with the same weights, interleaved, and print the medians and their ratio.",
    )
    bench.add_argument("--micro-batch-size", type=int, default=4)
    bench.add_argument("--repeats", type=int, default=10)
    bench.add_argument("--warmup", type=int, default=3)
    bench.add_argument("--seed", type=int, default=0)
    bench_defaults = {name: getattr(DEFAULT_BENCH_CONFIG, name) for name in
                      ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "vocab_size",
                       "hidden_dropout", "attention_dropout")}
    _add_model_arguments(bench, bench_defaults)
    bench.set_defaults(run=_bench_overhead)

    schedule = commands.add_parser(
        "schedule", help="check and simulate a pipeline schedule; write its timeline (JSON for Perfetto, PNG)",
        description="Build every rank's action list of a pipeline schedule, check it (matched sends and receives, "
        "no deadlock), simulate it with a cost model and print the predicted bubble beside the formula.",
    )
    schedule.add_argument("--schedule", choices=SIMULATED_SCHEDULES, default=None,
                          help="default: 1f1b, interleaved-1f1b with --vpp above 1, no-pipelining at --pp 1 (as pretrain); "
                          "zb-h1 and zb-v (zero bubble, Qi et al. 2023) split backward into input and weight gradients; "
                          "zb-v holds two chunks per rank in a V")
    schedule.add_argument("--pipeline-model-parallel-size", "--pp", dest="pp", type=int, default=4)
    schedule.add_argument("--virtual-pipeline-model-parallel-size", "--vpp", dest="vpp", type=int, default=None,
                          help="model chunks per rank (default: 2 for zb-v, else 1)")
    schedule.add_argument("--micro-batches", type=int, default=8)
    schedule.add_argument("--forward-cost", type=float, default=1.0, help="time of one stage's forward")
    schedule.add_argument("--backward-cost", type=float, default=2.0,
                          help="time of one stage's backward; its input-gradient part when --wgrad-cost is given")
    schedule.add_argument("--wgrad-cost", type=float, default=None,
                          help="time of one stage's weight gradient (needed by zb-h1, zb-v); a fused backward then "
                          "costs --backward-cost plus this")
    schedule.add_argument("--p2p-cost", type=float, default=0.0, help="time for a message to arrive")
    schedule.add_argument("--trace", metavar="PATH", help="write a Chrome-trace JSON (opens in Perfetto)")
    schedule.add_argument("--png", metavar="PATH", help="write a Gantt chart, one row per rank")
    schedule.set_defaults(run=_schedule)

    from megalith.data.corpus import add_build_corpus_arguments, run_build_corpus
    from megalith.data.preprocess import add_preprocess_arguments, run_preprocess
    from megalith.data.tokenizers import add_train_tokenizer_arguments, run_train_tokenizer

    data_commands = [  # (name, help, description, add its arguments, run it)
        ("preprocess", "tokenize JSON lines into a Megatron-compatible indexed dataset (.bin/.idx)",
         "Tokenize a JSON-lines file (one document per line) with worker processes and write "
         "PREFIX_<key>_document.bin/.idx, byte-compatible with Megatron's tools/preprocess_data.py.",
         add_preprocess_arguments, run_preprocess),
        ("train-tokenizer", "train a SentencePiece model on a text or JSON-lines corpus",
         "Train a SentencePiece model (for --tokenizer-type SentencePieceTokenizer) with megalith's "
         "special tokens reserved in its vocabulary.", add_train_tokenizer_arguments, run_train_tokenizer),
        ("corpus", "build the embedded default corpus (text that ships with Python) and print its paths",
         "Build, once, a small real-text corpus from documentation that every Python installation "
         "carries, a SentencePiece model trained on it and its .bin/.idx dataset; nothing is downloaded.",
         add_build_corpus_arguments, run_build_corpus),
    ]
    for name, summary, description, add_arguments, run in data_commands:
        command = commands.add_parser(name, help=summary, description=description)
        add_arguments(command)
        command.set_defaults(run=run)

    from megalith.convert import add_convert_arguments, run_convert

    convert = commands.add_parser(
        "convert", help="convert Hugging Face GPT-2 / Llama / BERT / T5 checkpoints to megalith checkpoints and back",
        description="--from hf: a Hugging Face directory (config.json + safetensors or weights-only .bin) of "
        "GPT2LMHeadModel, LlamaForCausalLM, BertForMaskedLM, BertForPreTraining or T5ForConditionalGeneration "
        "(T5 v1.0) to a megalith checkpoint (--model gpt, bert or t5) for a layout; --to hf: a megalith checkpoint "
        "of any layout to a directory that transformers' from_pretrained loads. --check compares both models' "
        "logits on a random batch.",
    )
    add_convert_arguments(convert)
    convert.set_defaults(run=run_convert)

    checkpoint = commands.add_parser("checkpoint", help="look into a checkpoint directory",
                                     description="Commands on megalith checkpoints (--save directories).")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True, metavar="COMMAND")
    inspect = checkpoint_commands.add_parser(
        "inspect", help="print iteration, layout, config and tensors",
        description="Print the newest checkpoint under DIR (or the iter_* directory given): iteration, data "
        "position, layout, optimizer, schedule, model config and every global tensor with its shape.")
    inspect.add_argument("directory", metavar="DIR")
    inspect.set_defaults(run=_checkpoint_inspect)

    topology = commands.add_parser("topology", help="print every rank's coordinates and process groups",
                                   description="Print the rank grid (order tp-cp-dp-pp) of a layout: no processes started.")
    topology.add_argument("--world-size", type=int, required=True)
    topology.add_argument("--tensor-model-parallel-size", "--tp", type=int, default=1)
    topology.add_argument("--pipeline-model-parallel-size", "--pp", type=int, default=1)
    topology.add_argument("--context-parallel-size", "--cp", type=int, default=1)
    topology.add_argument("--expert-model-parallel-size", "--ep", type=int, default=1)
    topology.add_argument("--expert-tensor-parallel-size", "--etp", type=int, default=None,
                          help="tensor parallelism inside each expert (default: tp)")
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
