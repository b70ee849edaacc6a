"""The MoE benchmark's pieces (issue 21, item 7; benchmarks/moe.py runs them and prints the tables).

(a) `alltoall_bytes_on_rank`: the alltoall dispatcher over an ep group, forward and backward, counted by the
    comm ledger, whose all_to_all convention is "the input this rank sends, its own rows included". Per rank
    and per direction (dispatch: tokens to experts; combine: expert outputs back) the formula is
    top-k x tokens x h x bytes per element, tokens being this rank's, before any dropping (ep runs dropless):
    - dispatch forward, and combine backward (its gradient goes the dispatch way), send exactly this rank's
      top-k x T rows;
    - combine forward and dispatch backward send the rows this rank's experts received, which add up over
      the ep ranks to ep x top-k x T rows (per rank they follow the routing);
    - the local share, the rows whose expert lives on the sending rank, is counted but crosses no wire: with
      balanced routing it is 1/ep of the rows;
    - before the rows, each dispatch exchanges the per-expert counts (E int64 per rank).
(b) `time_moe_against_dense`: training steps (forward, backward, Adam) of an MoE GPT and of a dense GPT with
    the same active parameters per token (dense ffn = top-k x moe ffn), alternating, medians.
(c) `time_grouped_against_loop`: the experts' compute (forward and backward of Experts on routed rows) with
    --moe-grouped-gemm (torch._grouped_mm where it takes the operands) against the loop over experts.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist

from megalith.config import ModelConfig
from megalith.device import synchronize
from megalith.models.gpt import GPTModel
from megalith.models.moe import MoELayer
from megalith.models.moe.experts import Experts, grouped_mm_usable
from megalith.models.parallel_context import ParallelContext
from megalith.parallel.comm_ledger import CommLedger, counting
from megalith.parallel.layers import normal_init

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dispatch_formula_bytes(topk: int, tokens: int, hidden: int, element_size: int) -> int:
    """Bytes one rank's dispatch sends: top-k x tokens x h x bytes per element (before dropping)."""
    return topk * tokens * hidden * element_size


def layer_config(hidden: int = 16, experts: int = 4, topk: int = 2, ffn: int = 8, **extra) -> ModelConfig:
    """The MoE layer the byte count runs: alltoall, dropless, no biases (what ep runs today)."""
    return ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=ffn, seq_length=8,
                       vocab_size=64, num_experts=experts, moe_router_topk=topk,
                       moe_token_dispatcher_type="alltoall", disable_bias_linear=True, **extra)


def alltoall_bytes_on_rank(rank_ctx, seq: int = 8, batch: int = 2, **config_options) -> dict:
    """On every rank of a RankPool (the pool's ranks are the ep group): one MoE layer's forward and backward
    with the ledger on; the all_to_all calls' bytes in order and what the formula needs."""
    config = layer_config(**config_options)
    group = dist.new_group(list(range(dist.get_world_size())))
    ep, rank = dist.get_world_size(group), dist.get_rank(group)
    ctx = ParallelContext()
    ctx.ep_group = group
    layer = MoELayer(config, ctx, normal_init(0.2, torch.Generator().manual_seed(5)),
                     normal_init(0.2, torch.Generator().manual_seed(6)))
    x = torch.randn(seq, batch, config.hidden_size, generator=torch.Generator().manual_seed(10 + rank),
                    requires_grad=True)
    ledger = CommLedger({group: "ep"}, record_calls=True)
    with counting(ledger):
        out = layer(x)
    forward = [call.bytes for call in ledger.history if call.op == "all_to_all"]
    ledger.reset()
    with counting(ledger):
        out.backward(torch.ones_like(out))
    backward = [call.bytes for call in ledger.history if call.op == "all_to_all"]
    local = config.num_experts // ep
    per_expert = layer.last_stats["tokens_per_expert"]
    element = x.element_size()
    return {"ep": ep, "rank": rank, "tokens": seq * batch, "topk": config.moe_router_topk,
            "hidden": config.hidden_size, "element_size": element, "experts": config.num_experts,
            "forward": forward, "backward": backward,
            "local_rows": int(per_expert[rank * local:(rank + 1) * local].sum()),
            "formula": dispatch_formula_bytes(config.moe_router_topk, seq * batch, config.hidden_size, element)}


def summarize_bytes(per_rank: list[dict]) -> dict:
    """The ranks' counts by direction (forward: [counts, dispatch, combine]; backward: [combine's gradient,
    dispatch's gradient]) against the formula."""
    first = per_rank[0]
    ep = first["ep"]
    dispatch = [r["forward"][1] for r in per_rank]
    combine = [r["forward"][2] for r in per_rank]
    row_bytes = first["hidden"] * first["element_size"]
    return {
        "ep": ep, "tokens per rank": first["tokens"], "topk": first["topk"], "hidden": first["hidden"],
        "bytes per element": first["element_size"], "formula per rank": first["formula"],
        "dispatch forward per rank": dispatch,
        "combine backward per rank (dispatch direction)": [r["backward"][0] for r in per_rank],
        "combine forward per rank": combine,
        "dispatch backward per rank (combine direction)": [r["backward"][1] for r in per_rank],
        "combine forward, all ranks": sum(combine), "formula, all ranks": ep * first["formula"],
        "counts exchange per rank": [r["forward"][0] for r in per_rank],
        "local share of dispatch (rows kept on the rank)": [r["local_rows"] * row_bytes for r in per_rank],
    }


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _sync(device: torch.device) -> None:
    synchronize(device)  # the timer's fence on an accelerator


def time_moe_against_dense(hidden: int = 64, layers: int = 2, experts: int = 8, topk: int = 2, moe_ffn: int = 128,
                           seq: int = 64, batch: int = 4, steps: int = 5, warmup: int = 2, device: str = "cpu",
                           dtype: str = "fp32", grouped: bool = False) -> dict:
    """Medians (ms) of training steps of the MoE GPT and the dense GPT of the same active parameters,
    alternating step by step (the order flips each step) so that drift hits both alike."""
    dev = torch.device(device)
    base = ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4, seq_length=seq, vocab_size=256,
                       hidden_dropout=0.0, attention_dropout=0.0, params_dtype=dtype)
    moe = replace(base, ffn_hidden_size=moe_ffn, num_experts=experts, moe_router_topk=topk, moe_ffn_hidden_size=moe_ffn,
                  moe_aux_loss_coeff=0.01, moe_grouped_gemm=grouped)
    dense = replace(base, ffn_hidden_size=topk * moe_ffn)
    models = {}
    for name, config in (("moe", moe), ("dense", dense)):
        model = GPTModel(config, ParallelContext(device=dev), init_seed=1)
        models[name] = (model, torch.optim.Adam(model.parameters(), lr=1e-4))
    tokens = torch.randint(0, 256, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(dev)

    def step(name):
        model, optimizer = models[name]
        optimizer.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).float().mean().backward()
        optimizer.step()
        _sync(dev)

    times = {"moe": [], "dense": []}
    for index in range(warmup + steps):
        for name in (("moe", "dense") if index % 2 == 0 else ("dense", "moe")):
            seconds = _timed(lambda: step(name))
            if index >= warmup:
                times[name].append(seconds)
    active = {name: _active_params(models[name][0], experts, topk) for name in models}
    moe_ms, dense_ms = _median_ms(times["moe"]), _median_ms(times["dense"])
    return {"moe ms/step": moe_ms, "dense ms/step": dense_ms, "ratio moe/dense": moe_ms / dense_ms,
            "active params moe": active["moe"], "active params dense": active["dense"],
            "total params moe": sum(p.numel() for p in models["moe"][0].parameters()),
            "steps": steps, "device": str(dev), "dtype": dtype}


def _active_params(model, experts: int, topk: int) -> int:
    """Parameters one token uses: every parameter, with the experts' counted topk / experts."""
    total = 0
    for module in model.modules():
        if isinstance(module, Experts):
            total += sum(p.numel() for p in module.parameters(recurse=False)) * topk // experts
    others = sum(p.numel() for name, p in model.named_parameters() if ".experts." not in name)
    return total + others


def time_grouped_against_loop(hidden: int = 64, experts: int = 8, ffn: int = 128, rows: int = 1024,
                              steps: int = 10, warmup: int = 2, device: str = "cpu", dtype: str = "fp32") -> dict:
    """Medians (ms) of the experts' forward and backward on `rows` routed rows (uneven counts, fixed seed),
    grouped GEMM against the loop, alternating; and whether _grouped_mm took the operands."""
    dev = torch.device(device)
    counts_weights = torch.rand(experts, generator=torch.Generator().manual_seed(3)) + 0.5
    counts = (counts_weights / counts_weights.sum() * rows).floor().long()
    counts[0] += rows - int(counts.sum())
    counts = counts.tolist()
    config = ModelConfig(num_layers=1, hidden_size=hidden, num_attention_heads=2, ffn_hidden_size=ffn, seq_length=8,
                         vocab_size=64, num_experts=experts, moe_router_topk=2, disable_bias_linear=True,
                         params_dtype=dtype)
    modules = {}
    for name, grouped in (("grouped", True), ("loop", False)):
        init = normal_init(0.02, torch.Generator().manual_seed(4))
        modules[name] = Experts(replace(config, moe_grouped_gemm=grouped), ParallelContext(device=dev), init, init)
    x = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(5)).to(dev, DTYPES[dtype])
    x.requires_grad_()
    outputs = {}

    def run(name):
        out = modules[name](x, counts)
        out.float().square().sum().backward()
        outputs[name] = out.detach()
        _sync(dev)

    times = {"grouped": [], "loop": []}
    for index in range(warmup + steps):
        for name in (("grouped", "loop") if index % 2 == 0 else ("loop", "grouped")):
            seconds = _timed(lambda: run(name))
            if index >= warmup:
                times[name].append(seconds)
    grouped_ms, loop_ms = _median_ms(times["grouped"]), _median_ms(times["loop"])
    difference = (outputs["grouped"].float() - outputs["loop"].float()).abs().max().item()
    return {"grouped ms": grouped_ms, "loop ms": loop_ms, "ratio grouped/loop": grouped_ms / loop_ms,
            "grouped_mm used": grouped_mm_usable(x, modules["grouped"].weight1),
            "max |grouped - loop| output": difference, "rows": rows, "experts": experts, "device": str(dev),
            "dtype": dtype}
