"""megalith_kernels against torch's own ops, and a ~350M GPT's step on the local, Triton and TE paths.

    python benchmarks/kernels_gpu.py --json gpu_check_out/gpu_check.json      # one CUDA GPU
    python benchmarks/kernels_gpu.py --tiny --json /tmp/kernels_tiny.json     # a CPU: structure only

The logic lives in megalith.bench.kernels_bench (its docstring says what is timed and how); this
script picks the device, names it, prints the table and writes the JSON record. The GPU goals
(issue 19): every fused kernel >= 1.0x torch, flash attention forward+backward >= 0.9x SDPA's
flash backend, MFU of the 350M GPT >= 40% on an H100-class GPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

from megalith.bench.kernels_bench import PATHS, format_table, run_benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes on the CPU, torch backend only (for tests)")
    parser.add_argument("--json", type=pathlib.Path, help="write the record here")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--micro-batch-size", type=int, help="sequences per step (default 8; tiny 2)")
    parser.add_argument("--warmup", type=int, help="untimed calls first (default 3; tiny 1)")
    parser.add_argument("--repeats", type=int, help="timed calls, the median reported (default 10; tiny 2)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"end-to-end paths, of {','.join(PATHS)}")
    parser.add_argument("--no-kernels", action="store_true", help="leave out the per-kernel rows")
    parser.add_argument("--no-model", action="store_true", help="leave out the end-to-end rows")
    args = parser.parse_args(argv)
    paths = tuple(p for p in args.paths.split(",") if p)
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        parser.error(f"unknown path(s) {', '.join(unknown)}; choose from {', '.join(PATHS)}")
    # the CUDA questions are asked here, in the script: megalith itself reaches CUDA only through megalith.device
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    name = torch.cuda.get_device_name(device) if cuda else None
    try:
        record = run_benchmark(device, tiny=args.tiny, device_name=name, peak=args.peak_tflops,
                               micro_batch_size=args.micro_batch_size, warmup=args.warmup, repeats=args.repeats,
                               paths=paths, kernels=not args.no_kernels, model=not args.no_model,
                               say=lambda line: print(line, file=sys.stderr))
    except RuntimeError as error:
        print(f"kernels_gpu: {error}", file=sys.stderr)
        return 2
    print(format_table(record))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
