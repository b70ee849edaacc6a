"""`megalith pretrain`'s memory report: once at startup, what each model-parallel rank will hold,
and once after the first iteration, what it held.

At startup (as Megatron's theoretical memory report): the parameters, gradient buffers and
optimizer state counted from what this rank built (the optimizer's fp32 main weights and its
moments, sharded under ZeRO), ZeRO-3's gathered working set, and the peak activations from
Korthikanti et al. 2022 (megalith.plan.memory) for the transformer layers on this rank times the
most layers' activations the pipeline schedule keeps at once. `formula_bytes` is the ZeRO
paper's per-strategy count the measured numbers are checked against. After the first iteration: CUDA's allocator
counters (Megatron's report_memory line), or the process's peak resident set on CPU, where
PyTorch keeps no counters.

Every rank of a model-parallel group (tp x pp) sends its row to the others over that group; the
last rank, which prints the log, prints its group's rows. Other data-parallel replicas hold the
same, so one group tells the whole job.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from megalith.config.parallel import SHARDING_STRATEGIES
from megalith.config.pretrain import PretrainConfig
from megalith.device import report_memory_counters
from megalith.models.transformer import TransformerLayer
from megalith.parallel import comm
from megalith.parallel.pipeline.actions import Kind
from megalith.plan.memory import activation_bytes_per_layer
from megalith.training.housekeeping import max_rss_bytes

MB = 1 << 20

STRATEGIES = SHARDING_STRATEGIES  # --data-parallel-sharding-strategy by ZeRO stage (tokens zero1, zero2, zero3)


def formula_bytes(strategy: str, params: int, dp: int, *, param_bytes: int = 2, grad_bytes: int = 4,
                  state_bytes: int = 12) -> dict[str, float]:
    """One rank's persistent bytes for `params` parameters (Ψ) under a sharding strategy over dp ranks
    (ZeRO, Rajbhandari et al. 2020, with Megatron's names): `state_bytes` per parameter of optimizer
    state (bf16 with Adam: 4 main weight + 8 moments = 12). ZeRO-3's gathered layers are not in it."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown sharding strategy {strategy!r}; one of {', '.join(STRATEGIES)}")
    stage = STRATEGIES.index(strategy)
    return {"params_bytes": param_bytes * params / (dp if stage >= 3 else 1),
            "grads_bytes": grad_bytes * params / (dp if stage >= 2 else 1),
            "optimizer_bytes": state_bytes * params / (dp if stage >= 1 else 1)}


@dataclass(frozen=True)
class StartupMemory:
    """One rank's expected bytes."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    peak_layers: float  # layers' worth of activations the schedule keeps at once (micro-batches x layers)
    gathered: float = 0.0  # ZeRO-3: the full parameters gathered at once, at most (0 otherwise)

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.gathered + self.activations

    def as_row(self) -> list[float]:
        return [self.parameters, self.gradients, self.optimizer, self.activations, self.peak_layers, self.gathered]


def persistent_memory(runner) -> dict[str, int]:
    """This rank's bytes of parameters, gradients and optimizer state that live through the run,
    counted from the tensors' storage, and ZeRO-3's largest gathered working set so far beside them
    (the JSON log's "memory" record)."""
    return runner.memory_bytes()


def _layers_per_chunk(chunks: list[nn.Module]) -> list[int]:
    return [sum(isinstance(m, TransformerLayer) for m in chunk.modules()) for chunk in chunks]


def peak_layers_in_flight(actions, layers_per_chunk: list[int]) -> int:
    """The most layers' activations held at once: each forward of a chunk adds its layers, each
    backward (or input-gradient half of one) of it releases them, in the schedule's order."""
    held = peak = 0
    for action in actions:
        if action.kind is Kind.FORWARD:
            held += layers_per_chunk[action.chunk]
            peak = max(peak, held)
        elif action.kind in (Kind.BACKWARD, Kind.BACKWARD_INPUT):
            held -= layers_per_chunk[action.chunk]
    return peak


def gathered_bound_bytes(chunks: list[nn.Module], zero: int) -> float:
    """ZeRO-3's working set at most: every chunk's root unit (everything but its transformer
    layers, kept from the chunk's forward to its backward) and two layers (the one computing and
    the one prefetched); 0 under the other strategies, which gather nothing."""
    if zero < 3:
        return 0.0
    roots = layer = 0
    for chunk in chunks:
        in_layers = 0
        for module in chunk.modules():
            if isinstance(module, TransformerLayer):
                size = sum(p.numel() * p.element_size() for p in module.parameters())
                layer, in_layers = max(layer, size), in_layers + size
        roots += sum(p.numel() * p.element_size() for p in chunk.parameters()) - in_layers
    return float(roots + 2 * layer)


def startup_memory(runner, config: PretrainConfig, tp_size: int) -> StartupMemory:
    """This rank's parameters, gradients and optimizer state as built (counted from storage; the
    moments, which exist only after the first step, from the fragments they will cover), ZeRO-3's
    gathered bound and its peak activations."""
    optimizer = runner.optimizer
    built = persistent_memory(runner)
    moments = {"adam": 2, "sgd": 1 if config.optimizer.sgd_momentum else 0}[config.optimizer.optimizer]
    on_device = [f for f in optimizer.fragments if not f.offloaded]  # --optimizer-cpu-offload's share is on the host
    mains = sum(f.main.numel() * f.main.element_size() for f in on_device if f.model is not None)
    state = moments * sum(f.main.numel() * f.main.element_size() for f in on_device)
    m = config.model
    per_layer = activation_bytes_per_layer(
        m.seq_length, config.training.micro_batch_size, m.hidden_size, m.num_attention_heads, tp=tp_size,
        sequence_parallel=config.distributed.sequence_parallel, recompute=m.recompute_granularity,
        attention_scores=m.attention_path == "unfused", value_bytes=torch.finfo(m.torch_dtype).bits // 8,
        hidden_dropout=m.hidden_dropout > 0, attention_dropout=m.attention_dropout > 0)
    layers = peak_layers_in_flight(runner.actions, _layers_per_chunk(runner.chunks))
    return StartupMemory(built["params_bytes"], built["grads_bytes"], mains + state, per_layer * layers, layers,
                         gathered_bound_bytes(runner.chunks, config.layout.zero))


def measured_memory(device: torch.device) -> dict[str, float]:
    """Megatron's report_memory counters on CUDA; the peak resident set elsewhere."""
    counters = report_memory_counters(device)
    return ({name: float(value) for name, value in counters.items()} if counters
            else {"max rss": float(max_rss_bytes() or 0)})


def _rows_over(group, row: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's row of `group` (one all-gather), in group-rank order."""
    local = torch.tensor(row, dtype=torch.float64, device=device)
    if comm.group_size(group) == 1:
        return [local.tolist()]
    rows = torch.empty((comm.group_size(group), local.numel()), dtype=torch.float64, device=device)
    comm.all_gather_into(rows.view(-1), local, group)
    return rows.cpu().tolist()


def _label(state, rank: int) -> str:
    coords = state.grid.coords(rank)
    return f"[Rank {rank}] (tp {coords.tp}, pp {coords.pp})"


def startup_lines(state, memory: StartupMemory) -> list[str]:
    """Collective over the model-parallel group; the lines, on every rank."""
    ranks = state.grid.group_of("mp", state.rank) or [state.rank]
    lines = ["memory per rank at startup (MB): parameters, gradients and optimizer state as built (persistent); "
             "gathered: ZeRO-3's full parameters in use at most; activations by Korthikanti et al. 2022 for the "
             "layers the schedule holds at its peak"]
    for rank, row in zip(ranks, _rows_over(state.mp_group, memory.as_row(), state.device)):
        mem = StartupMemory(*row)
        lines.append(f"{_label(state, rank)} parameters {mem.parameters / MB:.2f} | gradients {mem.gradients / MB:.2f}"
                     f" | optimizer {mem.optimizer / MB:.2f} | gathered {mem.gathered / MB:.2f}"
                     f" | activations {mem.activations / MB:.2f} "
                     f"(peak: {mem.peak_layers:.0f} layers' worth) | total {mem.total / MB:.2f}")
    return lines


def measured_lines(state, iteration: int) -> list[str]:
    """Collective over the model-parallel group: Megatron's report_memory line per rank."""
    ranks = state.grid.group_of("mp", state.rank) or [state.rank]
    measured = measured_memory(state.device)
    names = list(measured)  # the same names on every rank: one device type per job
    lines = []
    for rank, row in zip(ranks, _rows_over(state.mp_group, list(measured.values()), state.device)):
        numbers = " | ".join(f"{name}: {value / MB:.2f}" for name, value in zip(names, row))
        lines.append(f"[Rank {rank}] (after {iteration} iterations) memory (MB) | {numbers}")
    return lines
