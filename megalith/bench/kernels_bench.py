"""megalith_kernels against torch's own ops, and a ~350M GPT's training step on each path (issue 19).

Two parts, one JSON record (`run_benchmark`):

- kernels: each op of megalith_kernels (backend triton on CUDA) against torch's equivalent at
  GPT-350M shapes: F.rms_norm, F.layer_norm, SDPA restricted to its flash backend,
  F.cross_entropy, and eager torch for rope, bias-GeLU and SwiGLU. Forward, and forward plus
  backward (torch.autograd.grad, so no .grad accumulates), medians after warm-up, timed with
  device events (torch.Event: CUDA events on a GPU, wall clock on a CPU).
- end to end: megalith's own step (`megalith.bench.work.MegalithSide`, as `megalith verify`
  builds it, on a one-process group) for the local path (torch SDPA and the references), the
  Triton path (flash attention, triton kernels, fused cross-entropy) and Transformer Engine
  when it is importable; tokens/s, TFLOP/s from megalith's FLOP model, MFU against a peak.

`tiny=True` runs at toy shapes on a CPU with the torch backend only, so tests can check the
record's structure; the CUDA-only parts are skipped with a line that says so. Times are the
record's payload and never asserted.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import itertools
import socket
import statistics
import time
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from megalith import device as device_helper
from megalith.bench.work import Work
from megalith.config import ModelConfig
from megalith.errors import ConfigError
from megalith.parallel.layers import padded_vocab_size
from megalith.parallel.state import ParallelState
from megalith.training.flops import model_flops_per_iteration, tflops_per_device

SCHEMA = 1
# 24 x (12 h^2 + 13 h) + 50304 h + 2048 h + 2 h (final norm) = 355.9M parameters at h = 1024
GPT_350M = ModelConfig(num_layers=24, hidden_size=1024, num_attention_heads=16, seq_length=2048, vocab_size=50304,
                       hidden_dropout=0.0, attention_dropout=0.0)
TINY_GPT = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=256,
                       hidden_dropout=0.0, attention_dropout=0.0)
# the issue's GPU goals: speedup = torch's time / megalith_kernels' time (forward + backward)
KERNEL_GOAL, FLASH_GOAL, MFU_GOAL = 1.0, 0.9, 0.40
# dense bf16 peaks (TFLOP/s, no sparsity), matched against the device name, most specific first
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0))
# local: torch SDPA and the references, named (on CUDA the seam's auto defaults would pick Triton);
# kernel_backend is set only where ModelConfig has it (before the kernel seam, nothing else runs)
LOCAL_PATH = dict(attention_backend="sdpa")
LOCAL_IF_KNOWN = dict(kernel_backend="torch")
TRITON_PATH = dict(attention_backend="flash", kernel_backend="triton", cross_entropy_loss_fusion=True)
TE_PATH = dict(transformer_impl="transformer_engine")
PATHS = ("local", "triton", "te")


def peak_tflops(device_name: str | None) -> float | None:
    """The GPU's dense bf16 peak from its name (None when unknown: pass --peak-tflops)."""
    for needle, peak in PEAK_BF16_TFLOPS:
        if device_name and needle.lower() in device_name.lower():
            return peak
    return None


def time_ms(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median milliseconds of `fn()` after `warmup` calls; device events on CUDA (no host gaps
    counted between record and the kernel's end), the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    device_helper.synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.Event(device=device, enable_timing=True), torch.Event(device=device, enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


@dataclass(frozen=True)
class Shapes:
    """The activations of one micro-batch of a GPT: `batch` sequences of `seq` tokens."""

    batch: int
    seq: int
    hidden: int
    heads: int
    head_dim: int
    ffn: int
    vocab: int

    @classmethod
    def of(cls, config: ModelConfig, batch: int) -> "Shapes":
        return cls(batch, config.seq_length, config.hidden_size, config.num_attention_heads, config.kv_channels,
                   config.ffn_hidden_size, padded_vocab_size(config.vocab_size, 1, config.make_vocab_size_divisible_by))


@dataclass(frozen=True)
class KernelCase:
    """One op: its inputs (those with grads first), megalith_kernels' call and torch's."""

    op: str
    shape: str
    torch_impl: str
    ours: object  # callable(backend) -> output
    theirs: object  # callable() -> output
    inputs: tuple  # tensors that need a gradient


def _eager_rope(x, cos, sin):
    rot = cos.shape[-1]
    first, second = x[..., :rot // 2], x[..., rot // 2:rot]
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x[..., :rot] * cos + torch.cat([-second, first], dim=-1) * sin, x[..., rot:]], dim=-1)


def _sdpa_flash(q, k, v):
    """torch's SDPA on `[b, s, h, d]` tensors, restricted to the flash backend on CUDA (no such
    backend restriction on a CPU, where SDPA picks its own)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    restrict = sdpa_kernel(SDPBackend.FLASH_ATTENTION) if q.device.type == "cuda" else contextlib.nullcontext()
    with restrict:
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def kernel_cases(shapes: Shapes, device: torch.device, dtype: torch.dtype, seed: int = 0) -> list[KernelCase]:
    """Every op at `shapes`: norms over `[s, b, h]`, attention and rope over `[b, s, heads, d]`,
    the MLP activations over `[s, b, ffn]`, the loss over `[b s, vocab]`."""
    import megalith_kernels as mk

    generator = torch.Generator(device="cpu").manual_seed(seed)

    def tensor(*size, grad=True, scale=1.0):
        t = (torch.randn(size, generator=generator) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(grad)

    s, b, h, n, d, f, vocab = (shapes.seq, shapes.batch, shapes.hidden, shapes.heads, shapes.head_dim, shapes.ffn,
                               shapes.vocab)
    x, weight, bias = tensor(s, b, h), tensor(h), tensor(h)
    q, k, v = tensor(b, s, n, d), tensor(b, s, n, d), tensor(b, s, n, d)
    angles = torch.arange(s, dtype=torch.float32)[:, None] * torch.rand(d // 2, generator=generator)[None, :]
    cos, sin = (torch.cat([fn(angles)] * 2, dim=-1).to(device=device, dtype=dtype) for fn in (torch.cos, torch.sin))
    rot_x = tensor(b, s, n, d)
    fc1, fc1_bias, fc1_glu = tensor(s, b, f), tensor(f), tensor(s, b, 2 * f)
    logits = tensor(b * s, vocab)
    target = torch.randint(vocab, (b * s,), generator=generator).to(device)
    eps = 1e-5
    return [
        KernelCase("rms_norm", f"x [{s}, {b}, {h}]", "F.rms_norm", lambda be: mk.rms_norm(x, weight, eps, backend=be),
                   lambda: F.rms_norm(x, (h,), weight, eps), (x, weight)),
        KernelCase("layer_norm", f"x [{s}, {b}, {h}]", "F.layer_norm",
                   lambda be: mk.layer_norm(x, weight, bias, eps, backend=be),
                   lambda: F.layer_norm(x, (h,), weight, bias, eps), (x, weight, bias)),
        KernelCase("flash_attention", f"q k v [{b}, {s}, {n}, {d}] causal", "SDPA (flash backend)",
                   lambda be: mk.flash_attention(q, k, v, causal=True, backend=be), lambda: _sdpa_flash(q, k, v),
                   (q, k, v)),
        KernelCase("rope", f"x [{b}, {s}, {n}, {d}], cos sin [{s}, {d}]", "eager torch",
                   lambda be: mk.rope(rot_x, cos, sin, backend=be), lambda: _eager_rope(rot_x, cos, sin), (rot_x,)),
        KernelCase("bias_gelu", f"x [{s}, {b}, {f}]", "eager torch (F.gelu tanh)",
                   lambda be: mk.bias_gelu(fc1, fc1_bias, backend=be),
                   lambda: F.gelu(fc1 + fc1_bias, approximate="tanh"), (fc1, fc1_bias)),
        KernelCase("swiglu", f"x [{s}, {b}, {2 * f}]", "eager torch (F.silu)", lambda be: mk.swiglu(fc1_glu, backend=be),
                   lambda: (lambda gate, up: F.silu(gate) * up)(*fc1_glu.chunk(2, dim=-1)), (fc1_glu,)),
        KernelCase("cross_entropy", f"logits [{b * s}, {vocab}]", "F.cross_entropy (reduction none)",
                   lambda be: mk.cross_entropy(logits, target, backend=be),
                   lambda: F.cross_entropy(logits, target, reduction="none"), (logits,)),
    ]


def _forward_backward(fn, inputs):
    def run():
        out = fn()
        torch.autograd.grad(out, inputs, torch.ones_like(out))
    return run


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def time_kernel(case: KernelCase, backend: str, device: torch.device, warmup: int, repeats: int) -> dict:
    """One row: forward and forward+backward ms of both sides, speedup = torch / ours."""
    row = {"op": case.op, "shape": case.shape, "torch_impl": case.torch_impl, "backend": backend,
           "goal": FLASH_GOAL if case.op == "flash_attention" else KERNEL_GOAL, "error": None}
    try:
        for key, ours, theirs in (("forward_ms", lambda: case.ours(backend), case.theirs),
                                  ("forward_backward_ms", _forward_backward(lambda: case.ours(backend), case.inputs),
                                   _forward_backward(case.theirs, case.inputs))):
            ours_ms = time_ms(ours, device, warmup, repeats)
            torch_ms = time_ms(theirs, device, warmup, repeats)
            row[key] = {"ours": ours_ms, "torch": torch_ms, "speedup": torch_ms / ours_ms}
    except Exception as error:  # a kernel that cannot run is a row that says why, not a stopped benchmark
        row["error"] = _one_line(error)
    done = row["error"] is None
    row["met"] = row["forward_backward_ms"]["speedup"] >= row["goal"] if done and device.type == "cuda" else None
    return row


def time_kernels(shapes: Shapes, backend: str, device: torch.device, dtype: torch.dtype, warmup: int,
                 repeats: int) -> list[dict]:
    """Every op's row; the inputs live only as long as this call."""
    return [time_kernel(case, backend, device, warmup, repeats) for case in kernel_cases(shapes, device, dtype)]


def path_config(base: ModelConfig, path: str, dtype: str) -> ModelConfig:
    """The model of one end-to-end path; a one-line RuntimeError when ModelConfig lacks the
    path's fields (the kernel seam of issue 19 not merged), so the row says so and the rest runs."""
    extra = {"local": LOCAL_PATH, "triton": TRITON_PATH, "te": TE_PATH}[path]
    known = {f.name for f in fields(ModelConfig)}
    if path == "local":
        extra = {**extra, **{name: value for name, value in LOCAL_IF_KNOWN.items() if name in known}}
    missing = [name for name in extra if name not in known]
    if missing:
        raise RuntimeError(f"the {path} path needs ModelConfig field(s) {', '.join(missing)}, which this megalith "
                           "lacks (the kernel seam of issue 19)")
    return replace(base, params_dtype=dtype, **extra)


@contextlib.contextmanager
def one_process_state(device: torch.device):
    """A one-rank process group (nccl on CUDA, gloo on a CPU) and its ParallelState, torn down after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": str(device.index or 0), "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    state = ParallelState.initialize(backend="nccl" if device.type == "cuda" else "gloo", env=env)
    try:
        yield state
    finally:
        state.destroy()


def _kernel_choice(config: ModelConfig, device: torch.device) -> dict | None:
    """What the seam resolved for this config, when the seam exists (megalith.kernel_choice)."""
    if importlib.util.find_spec("megalith.kernel_choice") is None:
        return None
    from dataclasses import asdict

    from megalith.kernel_choice import resolve_kernels

    return {key: str(value) for key, value in asdict(resolve_kernels(config, device)).items() if key != "notices"}


def time_model(path: str, base: ModelConfig, state, micro_batch_size: int, warmup: int, repeats: int,
               dtype: str, peak: float | None) -> dict:
    """One end-to-end row: megalith's whole training step of `path`'s model on this process."""
    row = {"path": path, "skipped": None, "error": None}
    if path == "te" and importlib.util.find_spec("transformer_engine") is None:
        row["skipped"] = "Transformer Engine is not installed (pip install 'megalith[te]' on a CUDA machine)"
        return row
    try:
        config = path_config(base, path, dtype)
    except (RuntimeError, ConfigError) as error:  # a field missing, or a value this ModelConfig refuses
        row["error"] = str(error)
        return row
    device = state.device
    try:
        row["kernel_choice"] = _kernel_choice(config, device)
        work = Work(config, micro_batch_size=micro_batch_size)
        side = work.megalith_side("tp1" if dtype == "fp32" else f"tp1.{dtype}", state)
        losses, steps = [], itertools.count()
        step_ms = time_ms(lambda: losses.append(side.step(next(steps))), device, warmup, repeats)
        parameters = sum(p.numel() for chunk in side.runner.chunks for p in chunk.parameters())
    except Exception as error:
        row["error"] = _one_line(error)
        return row
    finally:
        side = None
        device_helper.empty_cache(device)
    tokens = work.global_batch_size * config.seq_length
    flops = model_flops_per_iteration(config, work.global_batch_size,
                                      padded_vocab_size(config.vocab_size, 1, config.make_vocab_size_divisible_by))
    tflops = tflops_per_device(flops, step_ms / 1e3, 1)
    row.update(parameters=parameters, micro_batch_size=micro_batch_size, seq_length=config.seq_length,
               num_layers=config.num_layers, hidden_size=config.hidden_size, dtype=dtype, step_ms=step_ms,
               tokens_per_s=tokens / (step_ms / 1e3), tflops_per_s=tflops,
               mfu=tflops / peak if peak else None, losses=losses)
    return row


def run_benchmark(device: torch.device, *, tiny: bool = False, device_name: str | None = None,
                  peak: float | None = None, micro_batch_size: int | None = None, warmup: int | None = None,
                  repeats: int | None = None, paths=PATHS, kernels: bool = True, model: bool = True,
                  dtype: str = "bf16", say=print) -> dict:
    """The whole record (see the module docstring); `say` gets one line per skipped part."""
    if device.type != "cuda" and not tiny:
        raise RuntimeError("the full benchmark needs a CUDA GPU; on a CPU run it with --tiny")
    config = TINY_GPT if tiny else GPT_350M
    micro_batch_size = micro_batch_size or (2 if tiny else 8)
    warmup, repeats = warmup if warmup is not None else (1 if tiny else 3), repeats or (2 if tiny else 10)
    peak = peak or peak_tflops(device_name)
    backend = "torch" if tiny else "triton"
    notes = []

    def note(line: str) -> None:
        notes.append(line)
        say(line)

    if device.type != "cuda":
        note("no CUDA device: CUDA-event timing of the Triton kernels is skipped; the kernel rows time the torch "
             "backend (the references) against torch on the CPU's wall clock, at tiny shapes")
    if device.type == "cuda" and peak is None:
        note(f"no bf16 peak known for {device_name!r}: MFU left out (pass --peak-tflops)")
    record = {"schema": SCHEMA, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "device": {"type": device.type, "name": device_name, "peak_bf16_tflops": peak}, "tiny": tiny,
              "dtype": dtype, "kernel_backend": backend, "warmup": warmup, "repeats": repeats,
              "goals": {"kernel_speedup": KERNEL_GOAL, "flash_attention_speedup": FLASH_GOAL, "mfu": MFU_GOAL},
              "notes": notes, "kernels": [], "end_to_end": []}
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if kernels:
        shapes = Shapes.of(config, 4 if not tiny else micro_batch_size)
        record["kernels"] = time_kernels(shapes, backend, device, torch_dtype, warmup, repeats)
        device_helper.empty_cache(device)  # the cases' tensors are gone: give the model their memory
    if model:
        with one_process_state(device) as state:
            for path in paths:
                if tiny and path != "local":
                    row = {"path": path, "skipped": f"the {path} path needs CUDA (--tiny runs the torch backend "
                                                     "only)", "error": None}
                else:
                    row = time_model(path, config, state, micro_batch_size, warmup, repeats, dtype, peak)
                if row["skipped"]:
                    note(f"end-to-end {path}: skipped, {row['skipped']}")
                record["end_to_end"].append(row)
    return record


def _cell(value, spec: str) -> str:
    return format(value, spec) if value is not None else "-"


def format_table(record: dict) -> str:
    """The record as two aligned tables (kernels, end to end), a goal column each."""
    lines = [f"device: {record['device']['name'] or record['device']['type']}  dtype {record['dtype']}  "
             f"kernels: backend {record['kernel_backend']} vs torch  (median of {record['repeats']})"]
    if record["kernels"]:
        lines.append(f"{'op':16} {'fwd ms':>9} {'torch':>9} {'x':>6} {'fwd+bwd ms':>11} {'torch':>9} {'x':>6} "
                     f"{'goal':>5}  met")
        for row in record["kernels"]:
            if row["error"]:
                lines.append(f"{row['op']:16} {row['error']}")
                continue
            fwd, both = row["forward_ms"], row["forward_backward_ms"]
            met = {None: "-", True: "yes", False: "no"}[row["met"]]
            lines.append(f"{row['op']:16} {fwd['ours']:9.3f} {fwd['torch']:9.3f} {fwd['speedup']:6.2f} "
                         f"{both['ours']:11.3f} {both['torch']:9.3f} {both['speedup']:6.2f} {row['goal']:5.2f}  {met}")
    if record["end_to_end"]:
        lines.append(f"{'path':8} {'params':>8} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}  "
                     f"(goal MFU {record['goals']['mfu']:.0%})")
        for row in record["end_to_end"]:
            if row["skipped"] or row["error"]:
                lines.append(f"{row['path']:8} {'skipped: ' + row['skipped'] if row['skipped'] else row['error']}")
                continue
            lines.append(f"{row['path']:8} {row['parameters'] / 1e6:7.1f}M {row['step_ms']:9.1f} "
                         f"{row['tokens_per_s']:10.0f} {row['tflops_per_s']:8.2f} {_cell(row['mfu'], '6.1%')}")
    return "\n".join(lines)
