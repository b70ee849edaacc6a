"""Every expert's MLP with its weights stacked: `weight1` [E, parts x F, h] ([gate; up] with SwiGLU), `weight2`
[E, h, F] (and biases [E, ...] with the model's linear biases). Expert e's slices are what a dense MLP's
linear_fc1 / linear_fc2 hold, so an expert-parallel split is a slice of dim 0. Each parameter carries
`expert_parallel = True`: its gradient is reduced over the expert-data-parallel group."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megalith.models.moe.dispatch import expert_tp_group
from megalith.parallel import comm
from megalith.parallel.layers import _check_split, _slice


def activation(config, h: torch.Tensor) -> torch.Tensor:
    """The model's MLP activation (SwiGLU on [gate; up], ReLU, or GELU), as the dense MLP applies it."""
    if config.swiglu:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    if config.activation == "relu":
        return F.relu(h)
    return F.gelu(h, approximate="tanh" if config.openai_gelu else "none")


def _expert_parameter(full: torch.Tensor, dtype, device, group=None, dim: int | None = None,
                      stride: int = 1) -> nn.Parameter:
    """This rank's slice of `full` along `dim` (split over tp, as the dense MLP's linears), marked expert-parallel."""
    kept = full if dim is None else _slice(full, dim, stride, group)
    param = nn.Parameter(kept.to(dtype=dtype, device=device).contiguous())
    param.expert_parallel = True
    param.tensor_parallel_dim, param.tensor_parallel_stride = dim, stride
    return param


def grouped_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch._grouped_mm takes these operands: present in this torch, a CUDA bf16 pair or any device
    whose strides are multiples of 16 bytes (its requirement); otherwise the loop runs."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != weight.dtype:
        return False
    if x.device.type == "cuda" and x.dtype != torch.bfloat16:
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and weight.shape[-1] % align == 0 and weight.shape[-2] % align == 0


def _matmul(x: torch.Tensor, weight: torch.Tensor, counts: list[int], grouped: bool) -> torch.Tensor:
    """x [N, in] split into consecutive chunks of `counts` rows, chunk e times weight[e]^T [in, out]."""
    if grouped and grouped_mm_usable(x, weight) and x.shape[0] > 0:
        offsets = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    chunks = torch.split(x, counts)
    return torch.cat([chunk @ weight[e].t() for e, chunk in enumerate(chunks)], dim=0)


class Experts(nn.Module):
    """This rank's experts (all E at ep = 1, else its ep rank's E / ep consecutive ones), each an MLP of
    --moe-ffn-hidden-size with the model's activation,
    split over etp (tp unless --expert-tensor-parallel-size says otherwise) as the dense MLP is split over tp
    (fc1's outputs, fc2's inputs): the output is a partial sum over etp. fc2's bias: at ep 1 with etp = tp,
    MoELayer adds it once per token as sum_e p_e x bias2[e]; otherwise (etp 1) it is added here on the rows.

    Initialised as one process would: expert e's fc1 drawn with the layer's init, then its fc2 with the output
    init, expert by expert."""

    def __init__(self, config, ctx, init, output_init) -> None:
        super().__init__()
        self.config = config
        experts, h, ffn = config.num_experts, config.hidden_size, config.moe_ffn_hidden_size
        parts = 2 if config.swiglu else 1
        fc1 = torch.zeros(experts, parts * ffn, h, dtype=torch.float32)
        fc2 = torch.zeros(experts, h, ffn, dtype=torch.float32)
        for e in range(experts):
            init(fc1[e])
            output_init(fc2[e])
        tp = expert_tp_group(ctx)
        _check_split(ffn, comm.group_size(tp), "--moe-ffn-hidden-size")
        ep_group = getattr(ctx, "ep_group", None)
        first, local = 0, experts
        if comm.group_size(ep_group) > 1:  # this rank's experts only
            local = experts // comm.group_size(ep_group)
            first = comm.group_rank(ep_group) * local
        mine = slice(first, first + local)
        dtype, device = config.torch_dtype, ctx.device
        self.weight1 = _expert_parameter(fc1[mine], dtype, device, tp, 1, parts)
        self.weight2 = _expert_parameter(fc2[mine], dtype, device, tp, 2)
        self.bias1 = self.bias2 = None
        # fc2's bias: on each expert's rows here when no one else adds it (bias_on_rows), else by MoELayer
        self.bias_on_rows = bias_on_rows(ctx)
        if config.add_bias_linear:
            self.bias1 = _expert_parameter(torch.zeros(local, parts * ffn), dtype, device, tp, 1, parts)
            self.bias2 = _expert_parameter(torch.zeros(local, h), dtype, device)
            # MoELayer adds it on each rank's own tokens: under SP its gradient is summed over tp (etp = tp)
            self.bias2.sequence_parallel = ctx.sequence_parallel and ctx.tp_size > 1 and not self.bias_on_rows

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """x [N, h]: `counts[e]` consecutive rows for expert e -> [N, h] (a partial sum over tp, no fc2 bias)."""
        grouped = self.config.moe_grouped_gemm
        h = _matmul(x, self.weight1, counts, grouped)
        if self.bias1 is not None:
            h = h + _per_row(self.bias1, counts, x.shape[0])
        out = _matmul(activation(self.config, h), self.weight2, counts, grouped)
        if self.bias2 is not None and self.bias_on_rows:
            out = out + _per_row(self.bias2, counts, x.shape[0])
        return out


def _per_row(bias: torch.Tensor, counts: list[int], rows: int) -> torch.Tensor:
    """bias [experts, n] repeated over each expert's `counts` rows -> [rows, n]."""
    return torch.repeat_interleave(bias, torch.tensor(counts, device=bias.device), dim=0, output_size=rows)


def bias_on_rows(ctx) -> bool:
    """Whether fc2's bias is added on each expert's rows (and weighted by the combine), as when experts are
    not split over tp: under ep (or an etp other than tp) MoELayer holds neither every expert's bias nor
    the tp group its gradient would be summed over. Layout.check_moe refuses biases with such an etp > 1."""
    ep = comm.group_size(getattr(ctx, "ep_group", None))
    return ep > 1 or comm.group_size(expert_tp_group(ctx)) != ctx.tp_size
